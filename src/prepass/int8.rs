//! Step 4 (and 9) of the pipeline: int8 weights routed to our operators.
//!
//! On the protobuf, two patterns become [`Q8MatMul`] / [`Q8Gather`] nodes (domain
//! [`q8op::DOMAIN`]) naming their weight, and the weights are collected in a [`Q8Table`]:
//! - our converter's blocks: `DequantizeLinear(block_size=32) -> Transpose -> MatMul` and
//!   `DequantizeLinear -> Gather`, the weights (row-major, or tiled behind the subgraph
//!   `tiled.rs` recognises) used in place in the mapped file;
//! - ONNX Runtime's dynamic quantization: `DynamicQuantizeLinear -> MatMulInteger -> Cast ->
//!   Mul`, the weights requantized into our blocks on the heap.
//!
//! Once tract has typed the graph, [`bind_q8`] hands every such node its weights and kernel
//! settings. Anything that does not match exactly is left for the other steps.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tract_onnx::pb::{self, tensor_proto::DataType};
use tract_onnx::prelude::*;

use super::external::{is_external, tensor_floats, tensor_ints, ExternalData};
use super::{int_attr, rewrite, tiled};
use crate::model::LoadSummary;
use crate::quant::op::{self as q8op, Q8Exec, Q8Gather, Q8MatMul, Q8Weights, WeightBytes};
use crate::quant::{blocks_per_row, quantize_q8_fitted, BLOCK};

/// Weights of our int8 nodes, by the name of the `DequantizeLinear` output they replaced.
pub(super) type Q8Table = HashMap<String, Arc<Q8Weights>>;

/// Replaces `DequantizeLinear(block_size=32) -> Transpose([1,0]) -> MatMul` (the weight on the
/// right) by a `Q8MatMul` node and `DequantizeLinear -> Gather(axis=0)` by a `Q8Gather` node,
/// for Q8 weights (int8 (n, k), f32 scales (n, ceil(k/32)), no zero point) held in
/// initializers, or in the tiled layout's initializers behind its exact undoing subgraph
/// ([`tiled::match_tiled`]), and returns those weights, in place in the mapped file where
/// possible.
///
/// A `DequantizeLinear` with any other consumer stays, for [`super::dequantize`] to fold; so does anything that does not match exactly.
pub(super) fn route_q8(graph: &mut pb::GraphProto, external: &ExternalData) -> Result<Q8Table> {
    let inits: HashMap<&str, &pb::TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut consumers: HashMap<&str, Vec<(usize, usize)>> = HashMap::new(); // (node, slot)
    for (i, node) in graph.node.iter().enumerate() {
        for (slot, input) in node.input.iter().enumerate() {
            consumers.entry(input.as_str()).or_default().push((i, slot));
        }
    }
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let lookup = tiled::Lookup::of(graph);
    let none = Vec::new();
    let mut replace: HashMap<usize, pb::NodeProto> = HashMap::new();
    let mut remove: HashSet<usize> = HashSet::new();
    let mut table = Q8Table::new();
    let mut tiled_routed = false;
    for (di, d) in graph.node.iter().enumerate() {
        let (x, scale, n, k, is_tiled) = match q8_candidate(d, &inits, external)? {
            Some((x, scale, n, k)) => (x, scale, n, k, false),
            None => match tiled::match_tiled(d, &lookup, external)? {
                Some(t) => (t.q, t.scales, t.n, t.k, true),
                None => continue,
            },
        };
        let out = d.output[0].as_str();
        if outputs.contains(out) {
            continue;
        }
        let (mut routed, mut kept) = (0, 0);
        for &(ci, slot) in consumers.get(out).unwrap_or(&none) {
            let c = &graph.node[ci];
            let is_default_domain = c.domain.is_empty() || c.domain == "ai.onnx";
            let perm = c
                .attribute
                .iter()
                .find(|a| a.name == "perm")
                .map(|a| a.ints.as_slice());
            if is_default_domain
                && c.op_type == "Gather"
                && slot == 0
                && c.input.len() == 2
                && int_attr(c, "axis").unwrap_or(0) == 0
            {
                replace.insert(ci, q8_node(q8op::GATHER, &c.input[1], c, out, n, k));
                routed += 1;
            } else if is_default_domain
                && c.op_type == "Transpose"
                && perm == Some(&[1, 0])
                && c.output.len() == 1
                && !outputs.contains(c.output[0].as_str())
            {
                let mut all = true;
                for &(mi, mslot) in consumers.get(c.output[0].as_str()).unwrap_or(&none) {
                    let m = &graph.node[mi];
                    if (m.domain.is_empty() || m.domain == "ai.onnx")
                        && m.op_type == "MatMul"
                        && mslot == 1
                        && m.input.len() == 2
                    {
                        replace.insert(mi, q8_node(q8op::MATMUL, &m.input[0], m, out, n, k));
                        routed += 1;
                    } else {
                        all = false;
                    }
                }
                if all {
                    remove.insert(ci);
                } else {
                    kept += 1;
                }
            } else {
                kept += 1;
            }
        }
        if routed == 0 {
            continue;
        }
        let (x, scale) = (weight_bytes(x, external)?, weight_bytes(scale, external)?);
        let weights = if is_tiled {
            Q8Weights::new_tiled(out, n, k, x, scale)?
        } else {
            Q8Weights::new(out, n, k, x, scale)?
        };
        table.insert(out.to_string(), Arc::new(weights));
        if kept == 0 {
            remove.insert(di);
            tiled_routed |= is_tiled;
        }
    }
    drop(consumers);
    drop(inits);
    drop(lookup);
    rewrite::splice_nodes(graph, replace, &remove);
    if tiled_routed {
        // The Transpose / Reshape / Slice nodes that undid the tiling are now unread.
        rewrite::remove_dead_nodes(graph);
    }
    Ok(table)
}

/// Merges the `Q8MatMul` nodes that read the same input (a layer's query, key and value
/// projections; its gate and up projections) into one node with one output per weight
/// (attributes `weights`, `ns`, `k`), at the place of the first, so that the activations are
/// quantized once and the products share one pool round. A node making a graph output (the
/// LM head's `logits`) stays alone.
pub(super) fn merge_shared_inputs(graph: &mut pb::GraphProto) {
    use pb::attribute_proto::AttributeType;
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let mut by_input: HashMap<(&str, i64), Vec<usize>> = HashMap::new(); // (input, k) -> nodes
    for (i, node) in graph.node.iter().enumerate() {
        let single = node.domain == q8op::DOMAIN
            && node.op_type == q8op::MATMUL
            && node.input.len() == 1
            && node.output.len() == 1
            && !outputs.contains(node.output[0].as_str())
            && node.attribute.iter().any(|a| a.name == "weight")
            && int_attr(node, "n").is_some();
        if let (true, Some(k)) = (single, int_attr(node, "k")) {
            let members = by_input.entry((node.input[0].as_str(), k)).or_default();
            members.push(i);
        }
    }
    let mut merged: HashMap<usize, pb::NodeProto> = HashMap::new();
    let mut remove: HashSet<usize> = HashSet::new();
    for ((input, k), members) in by_input.into_iter().filter(|(_, m)| m.len() > 1) {
        let nodes = || members.iter().map(|&i| &graph.node[i]);
        // Each member has a `weight` attribute (checked above).
        let weights = nodes()
            .filter_map(|n| n.attribute.iter().find(|a| a.name == "weight"))
            .map(|a| a.s.clone())
            .collect();
        let node = pb::NodeProto {
            name: graph.node[members[0]].name.clone(),
            op_type: q8op::MATMUL.into(),
            domain: q8op::DOMAIN.into(),
            input: vec![input.into()],
            output: nodes().map(|n| n.output[0].clone()).collect(),
            attribute: vec![
                pb::AttributeProto {
                    name: "weights".into(),
                    r#type: AttributeType::Strings as i32,
                    strings: weights,
                    ..Default::default()
                },
                pb::AttributeProto {
                    name: "ns".into(),
                    r#type: AttributeType::Ints as i32,
                    ints: nodes().filter_map(|n| int_attr(n, "n")).collect(),
                    ..Default::default()
                },
                pb::AttributeProto {
                    name: "k".into(),
                    r#type: AttributeType::Int as i32,
                    i: k,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        merged.insert(members[0], node);
        remove.extend(&members[1..]);
    }
    drop(outputs);
    rewrite::splice_nodes(graph, merged, &remove);
}

/// A tensor's bytes for the int8 operators: in the mapped file, or inline in the protobuf.
pub(super) fn weight_bytes<'t>(
    t: &'t pb::TensorProto,
    external: &ExternalData,
) -> Result<WeightBytes<'t>> {
    if is_external(t) {
        let (map, range) = external.mapped(t)?;
        Ok(WeightBytes::Mapped(map, range))
    } else {
        Ok(WeightBytes::Inline(&t.raw_data))
    }
}

/// `(x, scale, n, k)` if `node` is a `DequantizeLinear` our int8 operators can take over.
pub(super) fn q8_candidate<'g>(
    node: &pb::NodeProto,
    inits: &HashMap<&str, &'g pb::TensorProto>,
    external: &ExternalData,
) -> Result<Option<(&'g pb::TensorProto, &'g pb::TensorProto, usize, usize)>> {
    if node.op_type != "DequantizeLinear"
        || !(node.domain.is_empty() || node.domain == "ai.onnx")
        || int_attr(node, "block_size") != Some(BLOCK as i64)
        || !matches!(int_attr(node, "axis"), None | Some(1) | Some(-1))
        || !matches!(int_attr(node, "output_dtype"), None | Some(0) | Some(1))
        || node.output.len() != 1
    {
        return Ok(None);
    }
    let init = |ix: usize| {
        node.input
            .get(ix)
            .and_then(|n| inits.get(n.as_str()).copied())
    };
    let (Some(x), Some(scale)) = (init(0), init(1)) else {
        return Ok(None);
    };
    let (n, k) = match x.dims.as_slice() {
        &[n, k] if n > 0 && k > 0 => (n as usize, k as usize),
        _ => return Ok(None),
    };
    let raw_or_external = |t: &pb::TensorProto| is_external(t) || !t.raw_data.is_empty();
    if x.data_type != DataType::Int8 as i32
        || scale.data_type != DataType::Float as i32
        || scale.dims != [n as i64, blocks_per_row(k) as i64]
        || !raw_or_external(x)
        || !raw_or_external(scale)
    {
        return Ok(None);
    }
    match node.input.get(2).filter(|s| !s.is_empty()) {
        None => {}
        Some(name) => match inits.get(name.as_str()) {
            Some(zp) if tensor_ints(zp, external)?.iter().all(|&z| z == 0) => {}
            _ => return Ok(None),
        },
    }
    Ok(Some((x, scale, n, k)))
}

/// One of our int8 nodes, taking `input` and replacing `replaced` (same name and outputs).
pub(super) fn q8_node(
    op: &str,
    input: &str,
    replaced: &pb::NodeProto,
    weight: &str,
    n: usize,
    k: usize,
) -> pb::NodeProto {
    use pb::attribute_proto::AttributeType;
    let int = |name: &str, i: usize| pb::AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: i as i64,
        ..Default::default()
    };
    pb::NodeProto {
        name: replaced.name.clone(),
        op_type: op.into(),
        domain: q8op::DOMAIN.into(),
        input: vec![input.into()],
        output: replaced.output.clone(),
        attribute: vec![
            pb::AttributeProto {
                name: "weight".into(),
                r#type: AttributeType::String as i32,
                s: weight.as_bytes().to_vec(),
                ..Default::default()
            },
            int("n", n),
            int("k", k),
        ],
        ..Default::default()
    }
}

/// Replaces ONNX Runtime's dynamic int8 linear layers (`quantize_dynamic`):
/// `DynamicQuantizeLinear(x) → MatMulInteger(x_q, W_q (k, n), x_zp, W_zp) → Cast(float) →
/// Mul(·, x_scale · W_scale)` becomes one `Q8MatMul` on `x`, with W dequantized (per-column or
/// per-tensor scale and zero point) and requantized in memory into our blocks of 32 along k.
///
/// Activations then stay f32 (or per-block int8 with `--int8 q8q8`) instead of ORT's single
/// per-tensor u8 scale. The quantizer nodes left without consumers are removed afterwards.
/// Anything that does not match exactly stays for tract (its slow integer path).
pub(super) fn route_matmul_integer(
    graph: &mut pb::GraphProto,
    external: &ExternalData,
) -> Result<Q8Table> {
    let is_op = |n: &pb::NodeProto, op: &str| {
        n.op_type == op && (n.domain.is_empty() || n.domain == "ai.onnx")
    };
    if !graph.node.iter().any(|n| is_op(n, "MatMulInteger")) {
        return Ok(Q8Table::new());
    }
    let inits: HashMap<&str, &pb::TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut producer: HashMap<&str, usize> = HashMap::new();
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, node) in graph.node.iter().enumerate() {
        for out in &node.output {
            producer.insert(out.as_str(), i);
        }
        for input in &node.input {
            consumers.entry(input.as_str()).or_default().push(i);
        }
    }
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let only_consumer = |value: &str| -> Option<usize> {
        match consumers.get(value).map(Vec::as_slice) {
            Some(&[c]) if !outputs.contains(value) => Some(c),
            _ => None,
        }
    };
    let mut replace: HashMap<usize, pb::NodeProto> = HashMap::new();
    let mut table = Q8Table::new();
    for m in graph.node.iter().filter(|n| is_op(n, "MatMulInteger")) {
        let (Some(xq), Some(w)) = (
            m.input.first(),
            m.input.get(1).and_then(|n| inits.get(n.as_str())),
        ) else {
            continue;
        };
        let Some(d) = producer.get(xq.as_str()).map(|&i| &graph.node[i]) else {
            continue;
        };
        if !is_op(d, "DynamicQuantizeLinear") || d.output.len() != 3 || d.output[0] != *xq {
            continue;
        }
        if m.input
            .get(2)
            .is_some_and(|zp| !zp.is_empty() && *zp != d.output[2])
        {
            continue;
        }
        let Some(cast_ix) = m.output.first().and_then(|o| only_consumer(o)) else {
            continue;
        };
        let cast = &graph.node[cast_ix];
        if !is_op(cast, "Cast") || int_attr(cast, "to") != Some(DataType::Float as i64) {
            continue;
        }
        let Some(mul_ix) = only_consumer(&cast.output[0]) else {
            continue;
        };
        let mul = &graph.node[mul_ix];
        if !is_op(mul, "Mul") || mul.input.len() != 2 {
            continue;
        }
        let scale_value = if mul.input[0] == cast.output[0] {
            &mul.input[1]
        } else {
            &mul.input[0]
        };
        let Some(scale_mul) = producer.get(scale_value.as_str()).map(|&i| &graph.node[i]) else {
            continue;
        };
        if !is_op(scale_mul, "Mul") || !scale_mul.input.contains(&d.output[1]) {
            continue;
        }
        let Some(w_scale) = scale_mul
            .input
            .iter()
            .find(|i| **i != d.output[1])
            .and_then(|i| inits.get(i.as_str()))
        else {
            continue;
        };
        let w_zero = match m.input.get(3).filter(|s| !s.is_empty()) {
            None => None,
            Some(name) => match inits.get(name.as_str()) {
                Some(&t) => Some(t),
                None => continue,
            },
        };
        let int8 = [DataType::Int8 as i32, DataType::Uint8 as i32];
        if !int8.contains(&w.data_type)
            || w_zero.is_some_and(|z| !int8.contains(&z.data_type))
            || w_scale.data_type != DataType::Float as i32
        {
            continue;
        }
        let label = &mul.output[0];
        let weights = requantize_matmul_integer(label, w, w_scale, w_zero, external)
            .with_context(|| format!("MatMulInteger {:?}", m.name))?;
        // Checked by the requantization: W is (k, n).
        let (k, n) = (w.dims[0] as usize, w.dims[1] as usize);
        replace.insert(mul_ix, q8_node(q8op::MATMUL, &d.input[0], mul, label, n, k));
        table.insert(label.clone(), Arc::new(weights));
    }
    drop((inits, producer, consumers, outputs));
    for (i, node) in replace {
        graph.node[i] = node;
    }
    rewrite::remove_dead_nodes(graph);
    Ok(table)
}

/// ORT's int8 weight W_q (k, n) with scale and zero point per column (n) or per tensor,
/// as our Q8 blocks of W (n, k).
pub(super) fn requantize_matmul_integer(
    name: &str,
    w: &pb::TensorProto,
    scale: &pb::TensorProto,
    zero: Option<&pb::TensorProto>,
    external: &ExternalData,
) -> Result<Q8Weights> {
    let (k, n) = match w.dims.as_slice() {
        &[k, n] if k > 0 && n > 0 => (k as usize, n as usize),
        dims => bail!("weight {:?} has dims {dims:?}, expected (k, n)", w.name),
    };
    let q = tensor_ints(w, external)?; // (k, n)
    let s = tensor_floats(scale, external)?; // (n) or (1)
    let z = match zero {
        Some(t) => tensor_ints(t, external)?, // (n) or (1)
        None => vec![0],
    };
    let per_column = |v: usize, what: &str| -> Result<bool> {
        match v {
            1 => Ok(false),
            v if v == n => Ok(true),
            v => bail!("{what} of {:?} has {v} values for {n} columns", w.name),
        }
    };
    let (s_cols, z_cols) = (
        per_column(s.len(), "scale")?,
        per_column(z.len(), "zero point")?,
    );
    let mut f = vec![0f32; n * k]; // (n, k)
    for r in 0..k {
        for c in 0..n {
            let (sc, zp) = (s[if s_cols { c } else { 0 }], z[if z_cols { c } else { 0 }]);
            f[c * k + r] = (q[r * n + c] - zp) as f32 * sc;
        }
    }
    let (q8, scales) = quantize_q8_fitted(&f, n, k);
    Q8Weights::owned(name, n, k, q8, scales)
}

/// Hands every int8 node of the typed model its weights and kernel settings, and notes in
/// `summary` how they run.
pub(super) fn bind_q8(
    model: &mut TypedModel,
    table: &Q8Table,
    exec: &Q8Exec,
    summary: &mut LoadSummary,
) -> Result<()> {
    if table.is_empty() {
        return Ok(());
    }
    let lookup = |name: &str| {
        table
            .get(name)
            .cloned()
            .with_context(|| format!("no int8 weights named {name:?}"))
    };
    for node in model.nodes_mut() {
        if let Some(op) = node.op_as_mut::<Q8MatMul>() {
            let ws = op.weights().map(lookup).collect::<Result<Vec<_>>>()?;
            for (i, w) in ws.into_iter().enumerate() {
                op.bind(i, w, exec.clone())?;
            }
        } else if let Some(op) = node.op_as_mut::<Q8Gather>() {
            let w = lookup(op.weight())?;
            op.bind(w, exec.clone())?;
        }
    }
    let copied = table.values().filter(|w| !w.is_mapped()).count();
    summary.q8_on_heap = copied;
    summary.int8_exec = Some(format!("{exec:?}"));
    log::info!(
        "{} int8 weights ({} MB) run by {exec:?}; {copied} copied to the heap",
        table.len(),
        table.values().map(|w| w.bytes()).sum::<usize>() >> 20
    );
    Ok(())
}
