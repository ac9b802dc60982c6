//! The tiled int8 layout as a bundle writes it ([`crate::quant::gemm`]'s module
//! documentation): `DequantizeLinear(Slice(Reshape(Transpose(q))), Slice(Reshape(
//! Transpose(s))))` with q (G, nb, 8, 16, 4) int8 and s (G, nb, 16) f32 initializers.
//!
//! [`match_tiled`] recognises that subgraph exactly (permutations, shapes, slice bounds),
//! for the int8 routing to read both initializers in place; [`untile_for_folding`] turns the
//! ones left (with `--int8 fold`, or read by anything but our operators) back into row-major
//! initializers, for the dequantize folding. Anything else is left alone.

use std::collections::HashMap;

use anyhow::Result;
use tract_onnx::pb::{self, tensor_proto::DataType};

use super::external::{
    element_count, is_external, raw_bytes, tensor_floats, tensor_ints, ExternalData,
};
use super::{int_attr, rewrite};
use crate::quant::gemm::{Q8Tiled, GROUP, QUAD};
use crate::quant::BLOCK;

/// The two initializers of a tiled `DequantizeLinear` and the matrix's shape (n, k).
pub(super) struct TiledSource<'g> {
    pub(super) q: &'g pb::TensorProto,      // (G, nb, 8, 16, 4)
    pub(super) scales: &'g pb::TensorProto, // (G, nb, 16)
    pub(super) n: usize,
    pub(super) k: usize,
}

/// The producer of every value, and the initializers, by name.
pub(super) struct Lookup<'g> {
    producer: HashMap<&'g str, &'g pb::NodeProto>,
    inits: HashMap<&'g str, &'g pb::TensorProto>,
}

impl<'g> Lookup<'g> {
    pub(super) fn of(graph: &'g pb::GraphProto) -> Self {
        let mut producer = HashMap::new();
        for node in &graph.node {
            for out in &node.output {
                producer.insert(out.as_str(), node);
            }
        }
        let inits = graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        Lookup { producer, inits }
    }

    /// The default-domain node `op` with one output that produces `value`.
    fn node(&self, value: &str, op: &str) -> Option<&'g pb::NodeProto> {
        self.producer.get(value).copied().filter(|n| {
            n.op_type == op && (n.domain.is_empty() || n.domain == "ai.onnx") && n.output.len() == 1
        })
    }

    /// The values of the int64 initializer `name`, if it is a short one (the shapes and
    /// bounds of the subgraph).
    fn ints(&self, name: &str, external: &ExternalData) -> Result<Option<Vec<i64>>> {
        let Some(t) = self.inits.get(name) else {
            return Ok(None);
        };
        if t.data_type != DataType::Int64 as i32 || element_count(t)? > 8 {
            return Ok(None);
        }
        let values: Vec<i64> = match raw_bytes(t, external)? {
            Some(bytes) => bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
            None => t.int64_data.clone(),
        };
        Ok((values.len() == element_count(t)?).then_some(values))
    }

    /// The initializer behind `Slice(Reshape(Transpose(init, perm), [rows, cols]), [0, 0],
    /// ends)` (no other inputs or attributes than those), with its dims, if `value` is that.
    fn untiled(
        &self,
        value: &str,
        perm: &[i64],
        reshaped: [i64; 2],
        ends: [i64; 2],
        external: &ExternalData,
    ) -> Result<Option<&'g pb::TensorProto>> {
        let Some(slice) = self.node(value, "Slice") else {
            return Ok(None);
        };
        let [data, starts, stops, rest @ ..] = slice.input.as_slice() else {
            return Ok(None);
        };
        let optional_is = |ix: usize, want: &[i64]| -> Result<bool> {
            match rest.get(ix).filter(|s| !s.is_empty()) {
                None => Ok(true),
                Some(name) => Ok(self.ints(name, external)?.as_deref() == Some(want)),
            }
        };
        if rest.len() > 2
            || self.ints(starts, external)?.as_deref() != Some(&[0, 0])
            || self.ints(stops, external)?.as_deref() != Some(&ends)
            || !optional_is(0, &[0, 1])?
            || !optional_is(1, &[1, 1])?
        {
            return Ok(None);
        }
        let Some(reshape) = self.node(data, "Reshape") else {
            return Ok(None);
        };
        if reshape.input.len() != 2
            || int_attr(reshape, "allowzero").unwrap_or(0) != 0
            || self.ints(&reshape.input[1], external)?.as_deref() != Some(&reshaped)
        {
            return Ok(None);
        }
        let Some(transpose) = self.node(&reshape.input[0], "Transpose") else {
            return Ok(None);
        };
        let perm_is = transpose
            .attribute
            .iter()
            .find(|a| a.name == "perm")
            .is_some_and(|a| a.ints == perm);
        if transpose.input.len() != 1 || !perm_is {
            return Ok(None);
        }
        Ok(self.inits.get(transpose.input[0].as_str()).copied())
    }
}

/// The tiled source of `dq` if it is a `DequantizeLinear(block_size = 32, axis = 1)` without
/// zero point over exactly the bundle form of the tiled layout.
pub(super) fn match_tiled<'g>(
    dq: &pb::NodeProto,
    lookup: &Lookup<'g>,
    external: &ExternalData,
) -> Result<Option<TiledSource<'g>>> {
    if dq.op_type != "DequantizeLinear"
        || !(dq.domain.is_empty() || dq.domain == "ai.onnx")
        || int_attr(dq, "block_size") != Some(BLOCK as i64)
        || !matches!(int_attr(dq, "axis"), None | Some(1) | Some(-1))
        || !matches!(int_attr(dq, "output_dtype"), None | Some(0) | Some(1))
        || dq.output.len() != 1
        || dq.input.len() != 2
    {
        return Ok(None);
    }
    // The Slice bounds name n and k; the initializers' dims must then be the padded ones.
    let Some(slice) = lookup.node(&dq.input[0], "Slice") else {
        return Ok(None);
    };
    let Some(ends) = slice.input.get(2) else {
        return Ok(None);
    };
    let (n, k) = match lookup.ints(ends, external)?.as_deref() {
        Some(&[n, k]) if n > 0 && k > 0 => (n, k),
        _ => return Ok(None),
    };
    let (groups, nb) = ((n - 1) / GROUP as i64 + 1, (k - 1) / BLOCK as i64 + 1);
    let (g16, quads) = (GROUP as i64, (BLOCK / QUAD) as i64);
    let Some(q) = lookup.untiled(
        &dq.input[0],
        &[0, 3, 1, 2, 4],
        [g16 * groups, BLOCK as i64 * nb],
        [n, k],
        external,
    )?
    else {
        return Ok(None);
    };
    let Some(scales) = lookup.untiled(
        &dq.input[1],
        &[0, 2, 1],
        [g16 * groups, nb],
        [n, nb],
        external,
    )?
    else {
        return Ok(None);
    };
    let raw_or_external = |t: &pb::TensorProto| is_external(t) || !t.raw_data.is_empty();
    if q.data_type != DataType::Int8 as i32
        || q.dims != [groups, nb, quads, g16, QUAD as i64]
        || scales.data_type != DataType::Float as i32
        || scales.dims != [groups, nb, g16]
        || !raw_or_external(q)
        || !raw_or_external(scales)
    {
        return Ok(None);
    }
    Ok(Some(TiledSource {
        q,
        scales,
        n: n as usize,
        k: k as usize,
    }))
}

/// Points every tiled `DequantizeLinear` left in the graph at row-major copies of its values
/// and scales (new inline initializers), so [`super::dequantize`] can fold it; the tiled
/// subgraphs then unread are removed. Returns how many were undone.
pub(super) fn untile_for_folding(
    graph: &mut pb::GraphProto,
    external: &ExternalData,
) -> Result<usize> {
    let mut undone = Vec::new(); // (node index, values, scales)
    {
        let lookup = Lookup::of(graph);
        for (i, node) in graph.node.iter().enumerate() {
            let Some(t) = match_tiled(node, &lookup, external)? else {
                continue;
            };
            let q: Vec<i8> = tensor_ints(t.q, external)?
                .into_iter()
                .map(|v| v as i8)
                .collect();
            let s = tensor_floats(t.scales, external)?;
            let (q, s) = Q8Tiled::new(&q, &s, t.n, t.k)?.to_rows();
            let name = &node.output[0];
            let values = pb::TensorProto {
                name: format!("{name}.rows.q8"),
                dims: vec![t.n as i64, t.k as i64],
                data_type: DataType::Int8 as i32,
                raw_data: q.iter().map(|&v| v as u8).collect(),
                ..Default::default()
            };
            let scales = pb::TensorProto {
                name: format!("{name}.rows.scale"),
                dims: vec![t.n as i64, t.k.div_ceil(BLOCK) as i64],
                data_type: DataType::Float as i32,
                raw_data: s.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ..Default::default()
            };
            undone.push((i, values, scales));
        }
    }
    let count = undone.len();
    for (i, values, scales) in undone {
        graph.node[i].input = vec![values.name.clone(), scales.name.clone()];
        graph.initializer.push(values);
        graph.initializer.push(scales);
    }
    if count > 0 {
        rewrite::remove_dead_nodes(graph);
    }
    Ok(count)
}
