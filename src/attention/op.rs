//! [`RingAttention`], the tract op, and [`RingState`], its per-conversation state.

use std::sync::Arc;

use anyhow::{bail, ensure, Context};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::attend::{attend, Scratch};
use crate::kv_cache::{LayerKv, Step};
use crate::quant::{Kernel, ThreadPool};

/// One layer's attention over its ring; inputs `q` (1, heads…, s, head_dim) with the heads in
/// key/value-head-major order, `k_new` and `v_new` (1, kv_heads, s, head_dim); output like `q`.
#[derive(Clone, Debug)]
pub struct RingAttention {
    /// Decoder layer, for the state's owner to find its storage.
    pub layer: usize,
    /// Multiplies `q·k` before the softmax.
    pub scale: f32,
    /// Instruction set of the row kernels.
    pub kernel: Kernel,
    /// The process's compute threads, shared with the int8 products.
    pub pool: Arc<ThreadPool>,
}

impl PartialEq for RingAttention {
    fn eq(&self, other: &Self) -> bool {
        self.layer == other.layer
            && self.scale == other.scale
            && self.kernel == other.kernel
            && Arc::ptr_eq(&self.pool, &other.pool)
    }
}

impl Eq for RingAttention {}

impl Op for RingAttention {
    fn name(&self) -> StaticName {
        "RingAttention".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "layer={} scale={} kernel={} threads={}",
            self.layer,
            self.scale,
            self.kernel,
            self.pool.threads()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for RingAttention {
    not_out_of_plan!();

    fn state(&self, _ctx: &EvalContext) -> TractResult<Option<Box<dyn OpState>>> {
        Ok(Some(Box::new(RingState {
            layer: self.layer,
            kv: None,
            steps: None,
            scratch: Scratch::default(),
        })))
    }
}

impl TypedOp for RingAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 3, "RingAttention takes (q, k_new, v_new)");
        Ok(tvec!(inputs[0].without_value()))
    }

    as_op!();
}

/// A [`RingAttention`] node's per-conversation state: its layer's storage and the current step.
#[derive(Clone, Debug)]
pub struct RingState {
    /// The decoder layer this state serves.
    pub layer: usize,
    /// Keys and values; installed by the owner before the first run.
    pub kv: Option<LayerKv>,
    /// Where this run's tokens go: one step for the whole chunk, or one per token (a local
    /// layer's ring of exactly its window, see [`crate::kv_cache::RingLayout::place_each`]);
    /// set by the owner before every run, consumed by it.
    pub steps: Option<Arc<Vec<Step>>>,
    /// Buffers reused from run to run.
    scratch: Scratch,
}

impl OpState for RingState {
    fn eval(
        &mut self,
        _ctx: &EvalContext,
        op: &dyn Op,
        inputs: TVec<TValue>,
    ) -> TractResult<TVec<TValue>> {
        let op = op
            .downcast_ref::<RingAttention>()
            .context("RingState driven by another op")?;
        let (q, k_new, v_new) = args_3!(inputs);
        let steps = self
            .steps
            .take()
            .with_context(|| format!("layer {}: no cache step was set", self.layer))?;
        let layer = self.layer;
        let kv = self
            .kv
            .as_mut()
            .with_context(|| format!("layer {layer}: no cache storage"))?;
        let mut run = |step: &Step, q: &Tensor, k: &Tensor, v: &Tensor| {
            let pool = Some(&*op.pool);
            attend(
                kv,
                step,
                op.scale,
                q,
                k,
                v,
                &mut self.scratch,
                op.kernel,
                pool,
                layer,
            )
        };
        if let [step] = steps.as_slice() {
            return Ok(tvec!(run(step, &q, &k_new, &v_new)?.into_tvalue()));
        }
        // One token at a time: its key and value written, then its query attended.
        let axis = q.rank().saturating_sub(2);
        ensure!(
            q.rank() >= 3 && q.shape()[axis] == steps.len() && k_new.rank() == 4,
            "layer {layer}: {} steps for queries {:?}",
            steps.len(),
            q.shape()
        );
        let mut outs = Vec::with_capacity(steps.len());
        for (i, step) in steps.iter().enumerate() {
            let qi = q.slice(axis, i, i + 1)?;
            let (ki, vi) = (k_new.slice(2, i, i + 1)?, v_new.slice(2, i, i + 1)?);
            outs.push(run(step, &qi, &ki, &vi)?);
        }
        Ok(tvec!(Tensor::stack_tensors(axis, &outs)?.into_tvalue()))
    }

    fn reset_lanes(&mut self, _lanes: &[LaneId]) -> TractResult<()> {
        bail!("RingAttention has one conversation per state, no lanes")
    }
}
