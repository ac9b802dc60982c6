//! Step 5 of the pipeline: blocked `DequantizeLinear` folded into f32 weights.
//!
//! tract-onnx 0.23.9 refuses blocked quantization. Every `DequantizeLinear` with a
//! `block_size` that step 4 did not route (or all of them with `--int8 fold`) becomes an f32
//! initializer, so tract constant-folds the `Transpose` / `MatMul` / `Gather` behind it
//! (the tiled layout's are first pointed at row-major copies, `tiled.rs`).

use std::collections::HashMap;

use anyhow::{ensure, Context, Result};
use tract_onnx::pb::{self, tensor_proto::DataType};

use super::external::{tensor_floats, tensor_ints, ExternalData};
use super::{int_attr, rewrite};

/// Replaces every `DequantizeLinear` with a `block_size` attribute and initializer inputs by
/// an f32 initializer holding `(x - zero_point) * scale` (ONNX blocked semantics: along
/// `axis`, element `i` uses scale `i / block_size`; the last block may be ragged).
///
/// tract-onnx 0.23.9 refuses blocked quantization; folded weights let tract constant-fold the
/// `Transpose`/`MatMul`/`Gather` that follow. Returns the number of nodes replaced.
pub(super) fn fold_blocked(graph: &mut pb::GraphProto, external: &ExternalData) -> Result<usize> {
    let is_blocked = |n: &pb::NodeProto| {
        n.op_type == "DequantizeLinear"
            && (n.domain.is_empty() || n.domain == "ai.onnx")
            && int_attr(n, "block_size").unwrap_or(0) != 0
    };
    if !graph.node.iter().any(is_blocked) {
        return Ok(0);
    }
    super::tiled::untile_for_folding(graph, external)?;
    let index: HashMap<&str, usize> = graph
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let mut folded = Vec::new();
    let mut kept = Vec::with_capacity(graph.node.len());
    for node in &graph.node {
        if !is_blocked(node) {
            kept.push(node.clone());
            continue;
        }
        let label = if node.name.is_empty() {
            node.output.first()
        } else {
            Some(&node.name)
        };
        let init = |ix: usize| -> Result<Option<&pb::TensorProto>> {
            match node.input.get(ix).filter(|s| !s.is_empty()) {
                None => Ok(None),
                Some(name) => index.get(name.as_str()).map(|&i| Some(&graph.initializer[i])).with_context(
                    || format!("input {name:?} is not an initializer; only constant weights can be dequantized"),
                ),
            }
        };
        let tensor = dequantize_blocked(node, init(0)?, init(1)?, init(2)?, external)
            .with_context(|| format!("blocked DequantizeLinear {label:?}"))?;
        folded.push(tensor);
    }
    drop(index);
    let count = folded.len();
    graph.node = kept;
    graph.initializer.extend(folded);

    // Drop the int8 weights and scales nothing reads any more, so tract never loads them.
    rewrite::prune_initializers(graph);
    Ok(count)
}

/// The f32 initializer replacing one blocked `DequantizeLinear` node.
pub(super) fn dequantize_blocked(
    node: &pb::NodeProto,
    x: Option<&pb::TensorProto>,
    scale: Option<&pb::TensorProto>,
    zero_point: Option<&pb::TensorProto>,
    external: &ExternalData,
) -> Result<pb::TensorProto> {
    let x = x.context("missing input x")?;
    let scale = scale.context("missing input x_scale")?;
    let output = node
        .output
        .first()
        .filter(|s| !s.is_empty())
        .context("no output")?;
    let block = usize::try_from(int_attr(node, "block_size").unwrap_or(0))
        .ok()
        .filter(|&b| b > 0)
        .context("block_size must be positive")?;
    let rank = x.dims.len() as i64;
    let axis = int_attr(node, "axis").unwrap_or(1);
    let axis = if axis < 0 { axis + rank } else { axis };
    ensure!(
        (0..rank).contains(&axis),
        "axis {axis} out of range for rank {rank}"
    );
    let axis = axis as usize;
    if let Some(dt) = int_attr(node, "output_dtype").filter(|&d| d != 0) {
        ensure!(
            dt == DataType::Float as i64,
            "output_dtype {dt} is not float32"
        );
    }

    let dims: Vec<usize> = x.dims.iter().map(|&d| d as usize).collect();
    let blocks = dims[axis].div_ceil(block);
    let mut scale_dims = dims.clone();
    scale_dims[axis] = blocks;
    let scale_shape: Vec<i64> = scale_dims.iter().map(|&d| d as i64).collect();
    ensure!(
        scale.dims == scale_shape,
        "x_scale has shape {:?}, expected {scale_shape:?} for x {:?} with block_size {block}",
        scale.dims,
        x.dims
    );

    let q = tensor_ints(x, external)?; // dims
    let s = tensor_floats(scale, external)?; // scale_dims
    let z = match zero_point {
        Some(zp) => {
            ensure!(
                zp.dims == scale.dims,
                "x_zero_point shape {:?} differs from x_scale's",
                zp.dims
            );
            ensure!(
                zp.data_type == x.data_type,
                "x_zero_point type differs from x's"
            );
            tensor_ints(zp, external)?
        }
        None => vec![0; s.len()],
    };

    // A zero dim elsewhere would leave 2^62 empty rows to walk (a hang, found by fuzzing).
    let (outer, len, inner) = if q.is_empty() {
        (0, 0, 0)
    } else {
        (
            dims[..axis].iter().product(),
            dims[axis],
            dims[axis + 1..].iter().product(),
        )
    };
    let mut y = Vec::with_capacity(q.len()); // dims
    for o in 0..outer {
        for a in 0..len {
            let row = (o * blocks + a / block) * inner;
            let base = (o * len + a) * inner;
            for i in 0..inner {
                let j = row + i;
                y.push((q[base + i] - z[j]) as f32 * s[j]);
            }
        }
    }
    Ok(pb::TensorProto {
        name: output.clone(),
        dims: x.dims.clone(),
        data_type: DataType::Float as i32,
        raw_data: y.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    })
}
