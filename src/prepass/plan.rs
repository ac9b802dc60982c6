//! Steps 8 and 13 of the pipeline: tract parses and types the rewritten protobuf, and makes
//! the runnable plan of the optimized graph.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, ensure, Result};
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::source::TypedSource;
use tract_onnx::tract_core::plan::{SimplePlan, SimpleState};

use super::external::ExternalData;
use crate::quant::op as q8op;

/// The runnable graph, shared by every conversation.
pub(crate) type Plan = SimplePlan<TypedFact, Box<dyn TypedOp>>;
/// One conversation's run of the plan (its op states hold the ring storage).
pub(crate) type Runner = SimpleState<TypedFact, Box<dyn TypedOp>>;

/// Parses the (pre-passed) protobuf with tract and types it.
pub(super) fn to_typed(
    proto: &pb::ModelProto,
    dir: &Path,
    external: ExternalData,
) -> Result<TypedModel> {
    let has_external = external.root.is_some();
    let mut onnx = tract_onnx::onnx();
    q8op::register(&mut onnx);
    onnx.provider = Arc::new(external);
    let dir = match dir.to_str() {
        Some(dir) => Some(dir),
        None if has_external => bail!("the bundle path {dir:?} is not valid UTF-8"),
        None => None,
    };
    let parsed = onnx.parse(proto, dir)?;
    ensure!(
        parsed.unresolved_inputs.is_empty(),
        "unresolved inputs: {:?}",
        parsed.unresolved_inputs
    );
    parsed.model.into_typed()
}

/// Builds the runnable plan, on the calling thread alone.
///
/// tract runs single-threaded: the products that matter run in our operators, on our pool
/// (`-t` bounds it), and an int8 bundle leaves tract only element-wise work and the small
/// products of RoPE and norms. An f32 bundle (or `--int8 fold`) has tract multiply every
/// weight itself, on this one thread.
pub(super) fn make_plan(model: TypedModel) -> Result<Arc<Plan>> {
    let stale = per_step_constants(&model);
    if !stale.is_empty() {
        log::warn!(
            "{} nodes recompute constants every step: {stale:?}",
            stale.len()
        );
    }
    let options = RunOptions {
        executor: Some(multithread::Executor::SingleThread),
        ..Default::default()
    };
    SimplePlan::new_with_options(model, &options)
}

/// Nodes computing a fixed value from constants, i.e. work the plan would redo on every
/// forward. Symbolic shape arithmetic (a `Range` over the sequence length) is not fixed.
pub(super) fn per_step_constants(model: &TypedModel) -> Vec<String> {
    let fixed_const = |id: usize| {
        let node = model.node(id);
        node.op_is::<Const>()
            && node
                .outputs
                .iter()
                .all(|o| o.fact.datum_type != TDim::datum_type())
    };
    model
        .nodes()
        .iter()
        .filter(|n| {
            !n.inputs.is_empty()
                && !n.op_is::<Const>()
                && !n.op_is::<TypedSource>()
                && n.inputs.iter().all(|i| fixed_const(i.node))
                && n.outputs.iter().all(|o| o.fact.shape.is_concrete())
        })
        .map(|n| format!("{} ({})", n.name, n.op.name()))
        .collect()
}

/// Nodes of `model` for which `is` holds.
pub(super) fn count_op(model: &TypedModel, is: impl Fn(&TypedNode) -> bool) -> usize {
    model.nodes().iter().filter(|n| is(n)).count()
}
