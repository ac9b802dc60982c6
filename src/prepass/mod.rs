//! The loader's pipeline: from a bundle's `model.onnx` to the plan tract runs.
//!
//! [`build`] runs these steps, in this order; each lives in the file named beside it:
//! 1. read (`external.rs`): memory-map `model.onnx` and decode the protobuf.
//! 2. external data (`external.rs`): check every external-data reference (inside the
//!    bundle, in range, the tensor's length) and map each file once.
//! 3. census (here): count the source ops and the parameters, for `edgelm info`.
//! 4. int8 routing (`int8.rs`): our blocked `DequantizeLinear` → `Transpose` → `MatMul` /
//!    `Gather` become `Q8MatMul` / `Q8Gather` nodes over the weights in place; ONNX Runtime's
//!    `DynamicQuantizeLinear` → `MatMulInteger` layers are requantized onto `Q8MatMul`;
//!    then the `Q8MatMul` nodes that read the same input become one node with an output per
//!    weight (one quantization, one pool round). Skipped with `--int8 fold`.
//! 5. dequantize folding (`dequantize.rs`): every other blocked `DequantizeLinear` becomes an
//!    f32 initializer.
//! 6. graph rewrites (`rewrite.rs`): the weight transposes behind folded weights folded too,
//!    unused initializers dropped, the LM head limited to the logit rows asked for, our op
//!    domain declared, the batch pinned to 1, the opset capped at 18.
//! 7. I/O names (`bind.rs`): the graph's inputs and outputs, in tract's order.
//! 8. parse and type (`plan.rs`): tract reads the rewritten protobuf, with our operators
//!    registered and the external data served from the maps of step 2.
//! 9. int8 binding (`int8.rs`): every int8 node gets its weights and kernel settings.
//! 10. KV fusion (`bind.rs`, [`crate::attention::fuse`]): when the graph matches, each
//!     layer's cache concatenation and attention become one `RingAttention` op over a ring
//!     buffer, and the cache inputs and outputs go.
//! 11. optimize: tract's declutter and optimizer.
//! 12. I/O binding (`bind.rs`): inputs and outputs matched to their roles and checked
//!     against `config.json`.
//! 13. plan (`plan.rs`): the runnable plan.
//!
//! Steps 1 to 7 work on the protobuf, before tract sees the graph; [`rewrite_protobuf`] runs
//! steps 2 to 7 and is also what the fuzzer drives ([`check_protobuf`]).

mod bind;
mod dequantize;
mod external;
mod int8;
mod plan;
mod rewrite;
#[cfg(test)]
mod tests;
mod tiled;

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use tract_onnx::pb;

use crate::config::Config;
use crate::model::{LoadSummary, MODEL_FILE};
use crate::quant::op::{self as q8op, Q8Exec, Q8Gather, Q8MatMul};
use crate::quant::{Kernel, Scheme, ThreadPool};

pub(crate) use bind::{Bindings, KvIo};
pub(crate) use plan::{Plan, Runner};

/// What the pipeline makes of a bundle.
pub(crate) struct Built {
    /// The plan every conversation runs.
    pub(crate) plan: Arc<Plan>,
    /// Where each tensor the decoder exchanges sits among the plan's inputs and outputs.
    pub(crate) io: Bindings,
    /// What was found and which fast paths were taken.
    pub(crate) summary: LoadSummary,
}

/// Runs the whole pipeline on the bundle in `dir` (its `config.json` read into `config`).
/// Our operators run `kernel` on `pool`; int8 weights run as `int8` says.
pub(crate) fn build(
    dir: &Path,
    config: &Config,
    int8: Scheme,
    kernel: Kernel,
    pool: &Arc<ThreadPool>,
) -> Result<Built> {
    let path = dir.join(MODEL_FILE);
    let proto = external::read_model_proto(&path)?; // 1
    let Prepared {
        proto,
        external,
        q8,
        mut io_names,
        mut summary,
    } = rewrite_protobuf(proto, dir, int8)?; // 2–7
    let mut typed =
        plan::to_typed(&proto, dir, external).with_context(|| format!("analysing {path:?}"))?; // 8
    drop(proto);
    let exec = Q8Exec {
        scheme: int8,
        kernel,
        pool: Arc::clone(pool),
    };
    int8::bind_q8(&mut typed, &q8, &exec, &mut summary)
        .with_context(|| format!("binding the int8 weights of {path:?}"))?; // 9
    summary.ring_cache = io_names
        .fuse_cache(&mut typed, config.num_hidden_layers, kernel, pool)
        .with_context(|| format!("fusing the KV cache of {path:?}"))?; // 10
    let optimized = typed
        .into_optimized()
        .with_context(|| format!("optimizing {path:?}"))?; // 11
    for node in optimized.nodes() {
        *summary
            .optimized_ops
            .entry(node.op.name().to_string())
            .or_default() += 1;
    }
    summary.q8_matmuls = optimized
        .nodes()
        .iter()
        .filter_map(|n| n.op_as::<Q8MatMul>())
        .map(|op| op.weights().count())
        .sum();
    summary.q8_gathers = plan::count_op(&optimized, |n| n.op_is::<Q8Gather>());
    let io = io_names
        .bind(&optimized, config, summary.ring_cache)
        .with_context(|| format!("binding the inputs and outputs of {path:?}"))?; // 12
    let plan = plan::make_plan(optimized).with_context(|| format!("planning {path:?}"))?; // 13
    Ok(Built { plan, io, summary })
}

/// The decoded `model.onnx` after the protobuf steps, and what they found.
struct Prepared {
    proto: pb::ModelProto,
    external: external::ExternalData,
    q8: int8::Q8Table,
    io_names: bind::IoNames,
    summary: LoadSummary,
}

/// Steps 2 to 7 on `proto`, whose external data lives in `dir`.
fn rewrite_protobuf(mut proto: pb::ModelProto, dir: &Path, int8: Scheme) -> Result<Prepared> {
    let path = dir.join(MODEL_FILE);
    let graph = proto
        .graph
        .as_mut()
        .ok_or_else(|| anyhow!("{path:?} has no graph"))?;
    let external = external::ExternalData::collect(graph, dir)
        .with_context(|| format!("external data of {path:?}"))?; // 2
    let mut summary = census(graph)?; // 3
    let q8 = match int8 {
        // 4
        Scheme::Fold => int8::Q8Table::new(),
        Scheme::Auto | Scheme::Q8F32 | Scheme::Q8Q16 | Scheme::Q8Q8 | Scheme::Q8Q15 => {
            let mut q8 =
                int8::route_q8(graph, &external).with_context(|| format!("rewriting {path:?}"))?;
            let ort = int8::route_matmul_integer(graph, &external)
                .with_context(|| format!("rewriting {path:?}"))?;
            summary.matmul_integer_rewritten = ort.len();
            q8.extend(ort);
            int8::merge_shared_inputs(graph);
            q8
        }
    };
    summary.dequantize_folded = dequantize::fold_blocked(graph, &external)
        .with_context(|| format!("rewriting {path:?}"))?; // 5
    if summary.dequantize_folded > 0 {
        // 6
        rewrite::fold_weight_transposes(graph);
    }
    rewrite::prune_initializers(graph);
    summary.logit_rows = rewrite::select_logit_rows(graph);
    rewrite::pin_batch_to_one(graph).with_context(|| format!("reading {path:?}"))?;
    let io_names = bind::IoNames::of(graph).with_context(|| format!("reading {path:?}"))?; // 7
    if !q8.is_empty() {
        proto.opset_import.push(pb::OperatorSetIdProto {
            domain: q8op::DOMAIN.into(),
            version: 1,
        });
    }
    rewrite::cap_opset(&mut proto);
    Ok(Prepared {
        proto,
        external,
        q8,
        io_names,
        summary,
    })
}

/// Runs the protobuf steps (1 to 7, everything before tract) on `model.onnx` bytes whose
/// external data lives in `dir`, for fuzzing: the same code [`build`] runs.
#[doc(hidden)]
pub fn check_protobuf(bytes: &[u8], dir: &Path, int8: Scheme) -> Result<()> {
    let proto = external::decode_model_proto(bytes, &dir.join(MODEL_FILE))?;
    rewrite_protobuf(proto, dir, int8).map(drop)
}

/// Step 3: op counts and parameter totals of the graph as written.
fn census(graph: &pb::GraphProto) -> Result<LoadSummary> {
    let mut summary = LoadSummary::default();
    for node in &graph.node {
        *summary.source_ops.entry(node.op_type.clone()).or_default() += 1;
    }
    for t in &graph.initializer {
        let count = external::element_count(t)?;
        summary.parameters += count;
        summary.weight_bytes += count * external::elem_size(t.data_type).unwrap_or(0);
    }
    Ok(summary)
}

/// An integer attribute of a node.
fn int_attr(node: &pb::NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}
