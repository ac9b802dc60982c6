//! The loaded model: [`Model::load`] and what it keeps.
//!
//! A bundle is a directory in the Hugging Face Optimum layout
//! (`optimum-cli export onnx --task text-generation-with-past`): `model.onnx`, optional
//! external-data files beside it, and `config.json` / `generation_config.json`.
//!
//! Everything heavy happens once, in [`Model::load`]: the pipeline of [`crate::prepass`]
//! rewrites the protobuf, has tract parse, type and optimize it, and plans it. The model is
//! then immutable and shared; each conversation is a [`State`] ([`crate::state`]) that only
//! feeds tensors through the plan.
//!
//! tract is used by [`crate::prepass`] (parsing, rewriting, optimizing and planning the
//! graph), [`crate::state`] (running the plan), [`crate::attention`] and
//! [`crate::quant::op`] (our operators inside the graph) and [`crate::convert::onnx`] (its
//! protobuf types); this file only holds what they built.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context, Result};

use crate::config::Config;
use crate::kv_cache::{KvType, RingLayout};
use crate::prepass::{self, Bindings, Built, KvIo, Plan};
use crate::quant::{Kernel, Scheme, ThreadPool};
pub use crate::state::{CacheOptions, ForwardError, State, DEFAULT_CTX, DEFAULT_KEEP};

/// The graph file inside a bundle.
pub const MODEL_FILE: &str = "model.onnx";

/// How to load a bundle.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Compute threads, the caller's included (int8 products, attention); 0 = one per core.
    pub threads: usize,
    /// How int8 weights run.
    pub int8: Scheme,
    /// Kernel variant (int8 products and attention); `None` = [`Kernel::select`]'s choice
    /// (`EDGELM_KERNEL`, else the best this CPU runs).
    pub kernel: Option<Kernel>,
}

/// A loaded, optimized decoder; immutable and shared by any number of [`State`]s.
#[derive(Debug)]
pub struct Model {
    plan: Arc<Plan>,
    io: Arc<Bindings>,
    config: Config,
    threads: usize,
    summary: LoadSummary,
}

/// What the loader found in a bundle and which fast paths it took (for `edgelm info`).
#[derive(Debug, Clone, Default)]
pub struct LoadSummary {
    /// Node count per op type in `model.onnx` as written.
    pub source_ops: BTreeMap<String, usize>,
    /// Values held by the graph's initializers (weights, in the stored precision).
    pub parameters: usize,
    /// Bytes of those initializers.
    pub weight_bytes: usize,
    /// int8 linear layers (weight matrices) run by our [`crate::quant::op::Q8MatMul`]
    /// operator; one node runs the matrices that read the same input.
    pub q8_matmuls: usize,
    /// int8 embedding lookups run by our [`crate::quant::op::Q8Gather`] operator.
    pub q8_gathers: usize,
    /// Of the int8 weights, those requantized or copied onto the heap (the rest are used in
    /// place from the mapped file).
    pub q8_on_heap: usize,
    /// ONNX Runtime `MatMulInteger` layers rewritten onto [`crate::quant::op::Q8MatMul`].
    pub matmul_integer_rewritten: usize,
    /// Blocked `DequantizeLinear` nodes folded into f32 constants (tract runs them).
    pub dequantize_folded: usize,
    /// The int8 kernel settings, when any int8 operator runs.
    pub int8_exec: Option<String>,
    /// Whether the KV cache is the fused ring buffer.
    pub ring_cache: bool,
    /// Whether the LM head computes only the logit rows asked for.
    pub logit_rows: bool,
    /// Node count per op name in the optimized graph tract runs.
    pub optimized_ops: BTreeMap<String, usize>,
}

impl Model {
    /// Loads and optimizes the bundle in `dir`.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Model> {
        let started = Instant::now();
        let meta = fs::metadata(dir).with_context(|| format!("opening model directory {dir:?}"))?;
        ensure!(
            meta.is_dir(),
            "opening model directory {dir:?}: not a directory"
        );
        let config = Config::load(dir)?;

        let threads = match opts.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let kernel = Kernel::select(opts.kernel)?;
        let pool = Arc::new(ThreadPool::new(threads).context("starting the compute threads")?);
        let Built { plan, io, summary } = prepass::build(dir, &config, opts.int8, kernel, &pool)?;
        let model_path = dir.join(MODEL_FILE);
        log::info!(
            "loaded {model_path:?} in {:.2?} ({} layers, {} blocked DequantizeLinear folded, {}, \
             logits {})",
            started.elapsed(),
            config.num_hidden_layers,
            summary.dequantize_folded,
            if summary.ring_cache {
                "ring-buffer KV cache"
            } else {
                "explicit past/present KV cache"
            },
            if summary.logit_rows {
                "of the rows asked for"
            } else {
                "of every row"
            }
        );
        Ok(Model {
            plan,
            io: Arc::new(io),
            config,
            threads,
            summary,
        })
    }

    /// Compute threads the model runs on, the caller's included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The bundle's validated configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// What the loader found and which fast paths are active.
    pub fn summary(&self) -> &LoadSummary {
        &self.summary
    }

    /// Whether the KV cache is the fixed-capacity ring (else the graph's explicit I/O).
    pub fn has_ring_cache(&self) -> bool {
        matches!(self.io.kv, KvIo::Ring { .. })
    }

    /// A fresh, empty conversation with the default cache.
    pub fn new_state(&self) -> State {
        let ctx = self.config.max_position_embeddings.min(DEFAULT_CTX);
        let opts = CacheOptions {
            ctx,
            kv: KvType::default(),
            keep: DEFAULT_KEEP.min(ctx / 2),
        };
        self.state_with(opts, ctx)
    }

    /// A fresh, empty conversation with the given cache (checked against the model).
    pub fn new_state_with(&self, opts: CacheOptions) -> Result<State> {
        let max = self.config.max_position_embeddings;
        let ctx = match opts.ctx {
            0 => max.min(DEFAULT_CTX),
            n => n,
        };
        ensure!(
            ctx <= max,
            "--ctx {ctx} exceeds the model's context of {max} positions"
        );
        RingLayout::new(ctx, opts.keep)?;
        Ok(self.state_with(opts, ctx))
    }

    fn state_with(&self, opts: CacheOptions, ctx: usize) -> State {
        State::new(
            Arc::clone(&self.plan),
            Arc::clone(&self.io),
            self.config.vocab_size,
            self.config.max_position_embeddings,
            opts,
            ctx,
            &self.config.layer_windows,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_is_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Model>();
    }
}
