//! Step 6 of the pipeline: graph rewrites on the protobuf, before tract parses it.
//!
//! Weight transposes folded into the initializers, unused initializers and dead nodes
//! dropped, the LM head limited to the logit rows asked for, the batch pinned to 1, and the
//! opset capped at what tract reads.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Context, Result};
use tract_onnx::pb::{self, tensor_proto::DataType};

use crate::quant::op as q8op;

/// Removes nodes none of whose outputs is read (by a node or as a graph output), repeatedly.
pub(super) fn remove_dead_nodes(graph: &mut pb::GraphProto) {
    loop {
        let read: HashSet<String> = graph
            .node
            .iter()
            .flat_map(|n| n.input.iter())
            .chain(graph.output.iter().map(|o| &o.name))
            .cloned()
            .collect();
        let before = graph.node.len();
        graph
            .node
            .retain(|n| n.output.iter().any(|o| !o.is_empty() && read.contains(o)));
        if graph.node.len() == before {
            break;
        }
    }
    prune_initializers(graph);
}

/// Rebuilds the node list in its order: the nodes at `remove` dropped, those at the keys of
/// `replace` swapped for its values (indices into the list as it was).
pub(super) fn splice_nodes(
    graph: &mut pb::GraphProto,
    mut replace: HashMap<usize, pb::NodeProto>,
    remove: &HashSet<usize>,
) {
    graph.node = std::mem::take(&mut graph.node)
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !remove.contains(i))
        .map(|(i, node)| replace.remove(&i).unwrap_or(node))
        .collect();
}

/// Drops initializers no node, input or output reads, so tract never loads them.
pub(super) fn prune_initializers(graph: &mut pb::GraphProto) {
    let used: HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter())
        .chain(graph.output.iter().chain(&graph.input).map(|o| &o.name))
        .cloned()
        .collect();
    graph.initializer.retain(|t| used.contains(&t.name));
}

/// Replaces `Transpose(perm=[1,0])` of a 2-D f32 initializer by the transposed initializer.
///
/// Our int8 bundles write `DequantizeLinear -> Transpose -> MatMul`; once the dequantization
/// is folded, tract would otherwise re-pack the transposed matrix on every step (the tied LM
/// head shares its constant with the embedding `Gather`, so it is not folded at load).
pub(super) fn fold_weight_transposes(graph: &mut pb::GraphProto) {
    let mut index: HashMap<String, usize> = graph
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    let mut kept = Vec::with_capacity(graph.node.len());
    for node in std::mem::take(&mut graph.node) {
        let source = (node.op_type == "Transpose" && node.output.len() == 1)
            .then(|| node.input.first().and_then(|i| index.get(i)).copied())
            .flatten()
            .map(|i| &graph.initializer[i]);
        let perm = node
            .attribute
            .iter()
            .find(|a| a.name == "perm")
            .map(|a| a.ints.as_slice());
        let transposed = match (source, perm) {
            (Some(t), Some([1, 0])) => transpose_f32(t, &node.output[0]),
            _ => None,
        };
        match transposed {
            Some(t) => {
                index.insert(t.name.clone(), graph.initializer.len());
                graph.initializer.push(t);
            }
            None => kept.push(node),
        }
    }
    graph.node = kept;
    // The untransposed copies nothing reads any more would otherwise stay in memory.
    prune_initializers(graph);
}

/// A 2-D f32 tensor with raw data, transposed under a new name.
pub(super) fn transpose_f32(t: &pb::TensorProto, name: &str) -> Option<pb::TensorProto> {
    let (rows, cols) = match t.dims.as_slice() {
        [r, c] => (usize::try_from(*r).ok()?, usize::try_from(*c).ok()?),
        _ => return None,
    };
    let bytes = rows.checked_mul(cols)?.checked_mul(4)?;
    if t.data_type != DataType::Float as i32 || t.raw_data.len() != bytes {
        return None;
    }
    let mut out = vec![0u8; t.raw_data.len()]; // (cols, rows)
    for r in 0..rows {
        for c in 0..cols {
            let (src, dst) = ((r * cols + c) * 4, (c * rows + r) * 4);
            out[dst..dst + 4].copy_from_slice(&t.raw_data[src..src + 4]);
        }
    }
    Some(pb::TensorProto {
        name: name.to_string(),
        dims: vec![cols as i64, rows as i64],
        data_type: t.data_type,
        raw_data: out,
        ..Default::default()
    })
}

/// The extra graph input naming which rows (positions) of the hidden state get logits.
pub(super) const LOGIT_ROWS: &str = "edgelm_logit_rows";

/// Makes the LM head compute logits only for the rows given in a new `int64` input
/// [`LOGIT_ROWS`] (a `Gather` on the sequence axis in front of it): prefill needs the last
/// row only, and the full (tokens, vocab) product would be a fifth of its work and its
/// largest buffer. Returns false (graph unchanged) if `logits` is not made by a `MatMul`.
pub(super) fn select_logit_rows(graph: &mut pb::GraphProto) -> bool {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    let Some(head) = graph.node.iter().position(|n| {
        n.output.first().map(String::as_str) == Some("logits")
            && (1..=2).contains(&n.input.len())
            && ((n.op_type == "MatMul" && (n.domain.is_empty() || n.domain == "ai.onnx"))
                || (n.op_type == q8op::MATMUL && n.domain == q8op::DOMAIN))
    }) else {
        return false;
    };
    let selected = format!("{LOGIT_ROWS}.hidden");
    let hidden = std::mem::replace(&mut graph.node[head].input[0], selected.clone());
    graph.node.insert(
        head,
        pb::NodeProto {
            name: selected.clone(),
            op_type: "Gather".into(),
            input: vec![hidden, LOGIT_ROWS.into()],
            output: vec![selected],
            attribute: vec![pb::AttributeProto {
                name: "axis".into(),
                r#type: pb::attribute_proto::AttributeType::Int as i32,
                i: 1,
                ..Default::default()
            }],
            ..Default::default()
        },
    );
    let rows = || Dimension {
        value: Some(Value::DimParam("logit_rows".into())),
        ..Default::default()
    };
    graph.input.push(pb::ValueInfoProto {
        name: LOGIT_ROWS.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: DataType::Int64 as i32,
                shape: Some(pb::TensorShapeProto { dim: vec![rows()] }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    });
    // The declared (batch, sequence, vocab) would tie the rows to the sequence length.
    for out in graph.output.iter_mut().filter(|o| o.name == "logits") {
        if let Some(pb::type_proto::Value::TensorType(t)) =
            out.r#type.as_mut().and_then(|t| t.value.as_mut())
        {
            if let Some(shape) = t.shape.as_mut().filter(|s| s.dim.len() == 3) {
                shape.dim[1] = rows();
            }
        }
    }
    true
}

/// Gives the batch dimension of every graph input and output the value 1.
///
/// Optimum names it `batch_size`; whatever its name, it is the first dim of `input_ids`.
/// Pinning it in the protobuf means tract never sees it as a symbol.
pub(super) fn pin_batch_to_one(graph: &mut pb::GraphProto) -> Result<()> {
    use pb::tensor_shape_proto::dimension::Value;
    fn dims(v: &mut pb::ValueInfoProto) -> Option<&mut Vec<pb::tensor_shape_proto::Dimension>> {
        match v.r#type.as_mut()?.value.as_mut()? {
            pb::type_proto::Value::TensorType(t) => Some(&mut t.shape.as_mut()?.dim),
        }
    }
    let input_ids = graph
        .input
        .iter_mut()
        .find(|i| i.name == "input_ids")
        .context("no `input_ids` input: not a decoder export")?;
    let batch = match dims(input_ids)
        .and_then(|d| d.first())
        .and_then(|d| d.value.clone())
    {
        Some(Value::DimParam(name)) => name,
        Some(Value::DimValue(1)) => return Ok(()),
        other => bail!("`input_ids` has batch dimension {other:?}; expected a symbol or 1"),
    };
    for v in graph
        .input
        .iter_mut()
        .chain(graph.output.iter_mut())
        .chain(graph.value_info.iter_mut())
    {
        for d in dims(v).into_iter().flatten() {
            if d.value.as_ref() == Some(&Value::DimParam(batch.clone())) {
                d.value = Some(Value::DimValue(1));
            }
        }
    }
    Ok(())
}

/// Declares opset 18 to tract when the graph asks for more: blocked `DequantizeLinear` (the
/// reason our bundles say 21) is gone by now, and the ops we write mean the same in 18.
pub(super) fn cap_opset(proto: &mut pb::ModelProto) {
    for o in &mut proto.opset_import {
        if (o.domain.is_empty() || o.domain == "ai.onnx") && o.version > 18 {
            o.version = 18;
        }
    }
}
