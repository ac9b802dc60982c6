//! The only file that touches tract: load (mmap), rewrite, optimize, forward.
//!
//! A bundle is a directory in the Hugging Face Optimum layout
//! (`optimum-cli export onnx --task text-generation-with-past`): `model.onnx`, optional
//! external-data files beside it, and `config.json` / `generation_config.json`.
//!
//! Loading goes: mmap `model.onnx` → decode the protobuf → pre-pass over the protobuf
//! (validate external data, route int8 weights to our operators — our blocked
//! `DequantizeLinear` in place, ONNX Runtime's `MatMulInteger` requantized — fold the other
//! blocked `DequantizeLinear`, pin the batch to 1) → tract
//! parse → typed → decluttered → optimized → plan. Everything heavy happens once, in
//! [`Model::load`]; [`State::forward`] only feeds tensors through the plan.
//!
//! The KV cache: after typing, [`crate::attention::fuse`] replaces each layer's
//! `past_key_values` → `Concat` → attention → `present` subgraph by a
//! [`crate::attention::RingAttention`] op whose state is that layer's ring buffer
//! ([`crate::kv_cache`]); [`State`] decides the slots and positions of every step. A graph that
//! does not match keeps the explicit path (each forward feeds the previous presents back as
//! pasts, bounded by the model's context), with a log line saying so.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use memmap2::Mmap;
use prost::Message;
use tract_onnx::data_resolver::ModelDataResolver;
use tract_onnx::pb::{self, tensor_proto::DataType};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::TractResult;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::source::TypedSource;
use tract_onnx::tract_core::plan::{SimplePlan, SimpleState};

use crate::attention::{self, RingState};
use crate::config::Config;
use crate::kv_cache::{KvType, LayerKv, RingLayout, Shift};
use crate::quant::op::{self as q8op, Q8Exec, Q8Gather, Q8MatMul, Q8Weights, WeightBytes};
use crate::quant::{blocks_per_row, quantize_q8_fitted, Kernel, Scheme, ThreadPool, BLOCK};

/// The graph file inside a bundle.
pub const MODEL_FILE: &str = "model.onnx";

/// How to load a bundle.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Threads for matrix products; 0 = all cores.
    pub threads: usize,
    /// How int8 weights run.
    pub int8: Int8Path,
    /// Kernel variant for the int8 path; `None` = [`Kernel::select`] (best, or `EDGELM_KERNEL`).
    pub kernel: Option<Kernel>,
}

/// How the int8 weights of a bundle are computed with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Int8Path {
    /// Our operators, int8 weights used in place, f32 activations ([`Scheme::Q8F32`]).
    #[default]
    Q8F32,
    /// Our operators, activations quantized per block too ([`Scheme::Q8Q8`], llama.cpp's).
    Q8Q8,
    /// Our operators, activations quantized per block to int16 ([`Scheme::Q8Q16`]).
    Q8Q16,
    /// The tiled GEMM with 15-bit activations (experiment: weights re-laid on the heap).
    Q8Q15Tiled,
    /// The tiled GEMM with int8 activations (experiment: weights re-laid on the heap).
    Q8Q8Tiled,
    /// Dequantized to f32 at load and run by tract (the reference; ~4x the memory).
    Fold,
}

/// Errors of [`State::forward`] a caller may want to act on (e.g. by trimming the cache).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ForwardError {
    /// `forward` was called with no tokens.
    #[error("no tokens to feed")]
    Empty,
    /// A token id is not below the vocabulary size.
    #[error("token id {token} is outside the vocabulary (size {vocab_size})")]
    TokenOutOfRange {
        /// The offending id.
        token: u32,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
    /// The cache plus the new tokens would exceed the model's context.
    #[error("context full: {cached} cached + {new} new tokens exceed the model's {max} positions")]
    ContextFull {
        /// Tokens already in the cache.
        cached: usize,
        /// Tokens passed to this call.
        new: usize,
        /// `max_position_embeddings`.
        max: usize,
    },
}

type Plan = SimplePlan<TypedFact, Box<dyn TypedOp>>;
type Runner = SimpleState<TypedFact, Box<dyn TypedOp>>;

/// The most KV-cache slots a conversation gets by default.
pub const DEFAULT_CTX: usize = 2048;

/// Sink tokens kept by default when the cache wraps (StreamingLLM uses 4).
pub const DEFAULT_KEEP: usize = 4;

/// The per-conversation KV cache: size, storage type, sink tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheOptions {
    /// Slots; 0 = the smaller of the model's context and [`DEFAULT_CTX`].
    pub ctx: usize,
    /// Storage of keys and values.
    pub kv: KvType,
    /// First tokens never evicted when the cache wraps.
    pub keep: usize,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            ctx: 0,
            kv: KvType::F32,
            keep: DEFAULT_KEEP,
        }
    }
}

/// Where each tensor the decoder exchanges sits among the plan's inputs and outputs.
#[derive(Debug, Clone)]
struct Bindings {
    /// Number of plan inputs.
    inputs: usize,
    input_ids: usize,
    attention_mask: Option<usize>,
    position_ids: Option<usize>,
    /// The rows to compute logits for, if the pre-pass added that input.
    logit_rows: Option<usize>,
    /// Per layer: (key input, value input); empty when the cache is fused into ring ops.
    past: Vec<(usize, usize)>,
    logits: usize,
    /// Per layer: (key output, value output); empty when fused.
    present: Vec<(usize, usize)>,
    /// Per layer: the node of its `RingAttention` op; empty on the explicit path.
    ring: Vec<usize>,
    /// Key/value heads and head width of the cache tensors.
    kv_heads: usize,
    head_dim: usize,
}

/// A loaded, optimized decoder; immutable and shared by any number of [`State`]s.
#[derive(Debug)]
pub struct Model {
    plan: Arc<Plan>,
    io: Arc<Bindings>,
    config: Config,
    threads: usize,
    /// The kernel threads: the int8 products and decode attention.
    pool: Arc<ThreadPool>,
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
    /// int8 linear layers run by our [`Q8MatMul`] operator.
    pub q8_matmuls: usize,
    /// int8 embedding lookups run by our [`Q8Gather`] operator.
    pub q8_gathers: usize,
    /// Of the int8 weights, those requantized or copied onto the heap (the rest are used in
    /// place from the mapped file).
    pub q8_on_heap: usize,
    /// ONNX Runtime `MatMulInteger` layers rewritten onto [`Q8MatMul`].
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

/// One conversation's KV cache and position; owned by the caller.
#[derive(Debug)]
pub struct State {
    plan: Arc<Plan>,
    io: Arc<Bindings>,
    pool: Arc<ThreadPool>,
    vocab_size: usize,
    max_positions: usize,
    kv: KvType,
    /// Created on the first forward (with the ring storage); reused so per-op state persists.
    runner: Option<Runner>,
    /// Explicit path: per layer, key then value, each (1, kv_heads, len, head_dim).
    past: Vec<TValue>,
    /// Explicit path: tokens in `past`.
    len: usize,
    /// Ring path: which slot holds which token.
    ring: RingLayout,
    /// Ring path: RoPE position of the next token.
    next_pos: usize,
    /// Shifts not yet taken by the caller.
    shifts: Vec<Shift>,
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

        let model_path = dir.join(MODEL_FILE);
        let proto = read_model_proto(&model_path)?;
        let Prepared {
            proto,
            external,
            q8,
            rewritten,
            logit_rows,
            mut io_names,
            mut summary,
        } = prepare(proto, dir, opts.int8)?;
        let mut typed =
            to_typed(&proto, dir, external).with_context(|| format!("analysing {model_path:?}"))?;
        drop(proto);
        let threads = match opts.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let pool = Arc::new(ThreadPool::new(threads).context("starting the kernel threads")?);
        if !q8.is_empty() {
            let scheme = match opts.int8 {
                Int8Path::Q8Q8 => Scheme::Q8Q8,
                Int8Path::Q8Q16 => Scheme::Q8Q16,
                _ => Scheme::Q8F32,
            };
            let kernel = match opts.kernel {
                Some(k) => k.checked()?,
                None => Kernel::select()?,
            };
            let tiled = match opts.int8 {
                Int8Path::Q8Q15Tiled => Some(crate::quant::gemm::Acts::Q15),
                Int8Path::Q8Q8Tiled => Some(crate::quant::gemm::Acts::Q8),
                _ => None,
            };
            let isa = match kernel {
                Kernel::Scalar => crate::quant::gemm::Isa::Scalar,
                _ => crate::quant::gemm::Isa::best(),
            };
            let exec = Q8Exec {
                scheme,
                kernel,
                pool: Arc::clone(&pool),
                tiled: tiled.map(|a| (a, isa)),
            };
            bind_q8(&mut typed, &q8, &exec)
                .with_context(|| format!("binding the int8 weights of {model_path:?}"))?;
            let copied = q8.values().filter(|w| !w.is_mapped()).count();
            summary.q8_on_heap = copied;
            summary.int8_exec = Some(format!("{exec:?}"));
            log::info!(
                "{} int8 weights ({} MB) run by {exec:?}; {copied} copied to the heap",
                q8.len(),
                q8.values().map(|w| w.bytes()).sum::<usize>() >> 20
            );
        }
        let fused = io_names
            .fuse_cache(&mut typed, config.num_hidden_layers)
            .with_context(|| format!("fusing the KV cache of {model_path:?}"))?;
        let optimized = typed
            .into_optimized()
            .with_context(|| format!("optimizing {model_path:?}"))?;
        for node in optimized.nodes() {
            *summary
                .optimized_ops
                .entry(node.op.name().to_string())
                .or_default() += 1;
        }
        summary.q8_matmuls = count_op(&optimized, |n| n.op_is::<Q8MatMul>());
        summary.q8_gathers = count_op(&optimized, |n| n.op_is::<Q8Gather>());
        summary.dequantize_folded = rewritten;
        summary.ring_cache = fused;
        summary.logit_rows = logit_rows;
        let io = io_names
            .bind(&optimized, &config, fused)
            .with_context(|| format!("binding the inputs and outputs of {model_path:?}"))?;
        let plan =
            make_plan(optimized, threads).with_context(|| format!("planning {model_path:?}"))?;
        log::info!(
            "loaded {model_path:?} in {:.2?} ({} layers, {} blocked DequantizeLinear folded, {}, \
             logits {})",
            started.elapsed(),
            config.num_hidden_layers,
            rewritten,
            if fused {
                "ring-buffer KV cache"
            } else {
                "explicit past/present KV cache"
            },
            if logit_rows {
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
            pool,
            summary,
        })
    }

    /// Threads the matrix products use.
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
        !self.io.ring.is_empty()
    }

    /// A fresh, empty conversation with the default cache.
    pub fn new_state(&self) -> State {
        let ctx = self.config.max_position_embeddings.min(DEFAULT_CTX);
        let opts = CacheOptions {
            ctx,
            kv: KvType::F32,
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
        // In range already (checked or derived by the callers); clamping only guards the types.
        let ring = RingLayout::clamped(ctx, opts.keep);
        State {
            plan: Arc::clone(&self.plan),
            io: Arc::clone(&self.io),
            pool: Arc::clone(&self.pool),
            vocab_size: self.config.vocab_size,
            max_positions: self.config.max_position_embeddings,
            kv: opts.kv,
            runner: None,
            past: Vec::new(),
            len: 0,
            ring,
            next_pos: 0,
            shifts: Vec::new(),
        }
    }
}

impl State {
    /// Feeds `tokens` and returns the logits of the last one, (vocab).
    pub fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.run(tokens, false)
    }

    /// Feeds `tokens` and returns the logits of every one, (tokens, vocab).
    pub fn forward_all(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.run(tokens, true)
    }

    /// Number of tokens in the cache.
    pub fn len(&self) -> usize {
        if self.io.ring.is_empty() {
            self.len
        } else {
            self.ring.len()
        }
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The RoPE position the next token gets.
    pub fn position(&self) -> usize {
        if self.io.ring.is_empty() {
            self.len
        } else {
            self.next_pos
        }
    }

    /// Slots of the KV cache (the model's context on the explicit path).
    pub fn capacity(&self) -> usize {
        if self.io.ring.is_empty() {
            self.max_positions
        } else {
            self.ring.capacity()
        }
    }

    /// The ring's bookkeeping: which token each slot holds.
    pub fn ring(&self) -> &RingLayout {
        &self.ring
    }

    /// Bytes of key/value storage allocated for this conversation (0 before the first
    /// forward; constant after it on the ring path).
    pub fn cache_bytes(&self) -> usize {
        match &self.runner {
            Some(runner) if !self.io.ring.is_empty() => self
                .io
                .ring
                .iter()
                .filter_map(|&node| ring_state(runner, node))
                .filter_map(|s| s.kv.as_ref().map(LayerKv::bytes))
                .sum(),
            _ => self
                .past
                .iter()
                .map(|t| t.len() * t.datum_type().size_of())
                .sum(),
        }
    }

    /// Storage type of the ring.
    pub fn kv_type(&self) -> KvType {
        self.kv
    }

    /// Each layer's ring storage, in layer order; `None` before the first forward or on the
    /// explicit path.
    pub fn layer_kv(&self) -> Option<Vec<&LayerKv>> {
        let runner = self.runner.as_ref()?;
        self.io
            .ring
            .iter()
            .map(|&node| ring_state(runner, node).and_then(|s| s.kv.as_ref()))
            .collect::<Option<Vec<_>>>()
            .filter(|v| !v.is_empty())
    }

    /// Replaces the conversation by a saved one: its ring layout, the next RoPE position and
    /// each layer's exported keys and values ([`LayerKv::export`] of `layout.len()` slots).
    /// On error the conversation is empty.
    pub fn restore(
        &mut self,
        layout: RingLayout,
        next_pos: usize,
        layers: &[Vec<u8>],
    ) -> Result<()> {
        ensure!(
            !self.io.ring.is_empty(),
            "this model has no ring KV cache to restore"
        );
        ensure!(
            layout.capacity() == self.ring.capacity() && layout.n_keep() == self.ring.n_keep(),
            "the saved cache has {} slots keeping {}, this one {} keeping {}",
            layout.capacity(),
            layout.n_keep(),
            self.ring.capacity(),
            self.ring.n_keep()
        );
        ensure!(
            layers.len() == self.io.ring.len(),
            "{} saved layers, the model has {}",
            layers.len(),
            self.io.ring.len()
        );
        ensure!(
            next_pos <= self.max_positions && layout.len() <= next_pos,
            "saved position {next_pos} is inconsistent with {} cached tokens and the model's {} \
             positions",
            layout.len(),
            self.max_positions
        );
        self.reset();
        self.ensure_runner()?;
        let io = Arc::clone(&self.io);
        let runner = self
            .runner
            .as_mut()
            .context("the model state was not started")?;
        for (&node, bytes) in io.ring.iter().zip(layers) {
            let kv = ring_state_mut(runner, node)?
                .kv
                .as_mut()
                .context("no cache storage")?;
            kv.import(layout.len(), bytes)?;
        }
        self.ring = layout;
        self.next_pos = next_pos;
        Ok(())
    }

    /// The cache shifts (evictions, re-positionings) since the last call, oldest first.
    pub fn take_shifts(&mut self) -> Vec<Shift> {
        std::mem::take(&mut self.shifts)
    }

    /// Forgets the conversation (the ring storage is kept, not reallocated).
    pub fn reset(&mut self) {
        self.past.clear();
        self.len = 0;
        self.ring.reset();
        self.next_pos = 0;
        self.shifts.clear();
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(ForwardError::Empty.into());
        }
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            let vocab_size = self.vocab_size;
            return Err(ForwardError::TokenOutOfRange { token, vocab_size }.into());
        }
        Ok(())
    }

    /// Feeds `tokens`; returns the logits of all of them or of the last, (n or 1, vocab).
    fn run(&mut self, tokens: &[u32], all: bool) -> Result<Vec<f32>> {
        self.check_tokens(tokens)?;
        if self.io.ring.is_empty() {
            let logits = self.run_explicit(tokens, all)?;
            let rows = logits.try_as_plain_ram()?.as_slice::<f32>()?;
            let from = if all { 0 } else { rows.len() - self.vocab_size };
            return Ok(rows[from..].to_vec());
        }
        self.ensure_runner()?;
        let mut out = Vec::new();
        let chunks: Vec<&[u32]> = tokens.chunks(self.ring.max_chunk()).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            if self.next_pos + chunk.len() > self.max_positions {
                self.reposition(chunk.len())?;
            }
            let logits = self.run_chunk(chunk, all)?;
            let rows = logits.try_as_plain_ram()?.as_slice::<f32>()?;
            if all {
                out.extend_from_slice(rows);
            } else if i + 1 == chunks.len() {
                out.extend_from_slice(&rows[rows.len() - self.vocab_size..]);
            }
        }
        Ok(out)
    }

    /// Spawns the plan's state and gives every ring op its storage (once per conversation).
    fn ensure_runner(&mut self) -> Result<()> {
        if self.runner.is_some() {
            return Ok(());
        }
        let mut runner = self.plan.spawn()?;
        let (kvh, hd, cap) = (self.io.kv_heads, self.io.head_dim, self.ring.capacity());
        for &node in &self.io.ring {
            let state = ring_state_mut(&mut runner, node)?;
            state.kv = Some(LayerKv::new(kvh, cap, hd, self.kv));
            state.pool = Some(Arc::clone(&self.pool));
        }
        self.runner = Some(runner);
        Ok(())
    }

    /// Re-prefills the kept tokens at positions `0..` so that `incoming` more fit under the
    /// model's trained context; drops the oldest non-sink tokens if they alone would not.
    fn reposition(&mut self, incoming: usize) -> Result<()> {
        let mut kept = self.ring.kept_tokens();
        let limit = (self.max_positions * 3 / 4).min(self.max_positions.saturating_sub(incoming));
        let sinks = self.ring.n_keep().min(kept.len());
        let excess = kept.len().saturating_sub(limit).min(kept.len() - sinks);
        kept.drain(sinks..sinks + excess);
        ensure!(
            kept.len() + incoming <= self.max_positions,
            ForwardError::ContextFull {
                cached: kept.len(),
                new: incoming,
                max: self.max_positions
            }
        );
        log::info!(
            "KV cache: positions reached {} of the model's {}; re-prefilling the {} kept tokens \
             at fresh positions (dropped {excess})",
            self.next_pos,
            self.max_positions,
            kept.len()
        );
        self.shifts.push(Shift {
            dropped: excess,
            kept: kept.len(),
            repositioned: true,
        });
        self.ring.reset();
        self.next_pos = 0;
        for chunk in kept.chunks(self.ring.max_chunk()) {
            self.run_chunk(chunk, false)?;
        }
        Ok(())
    }

    /// Runs one chunk that fits the ring and the position range. Returns logits (1, rows,
    /// vocab): every token's if `all`, else at least the last one's.
    fn run_chunk(&mut self, tokens: &[u32], all: bool) -> Result<TValue> {
        let n = tokens.len();
        let io = Arc::clone(&self.io);
        let before = self.ring.clone();
        let step = Arc::new(self.ring.place(tokens)?);
        let runner = self
            .runner
            .as_mut()
            .context("the model state was not started")?;
        for &node in &io.ring {
            ring_state_mut(runner, node)?.step = Some(Arc::clone(&step));
        }
        let mut inputs: Vec<Option<TValue>> = vec![None; io.inputs];
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        inputs[io.input_ids] = Some(Tensor::from_shape(&[1, n], &ids)?.into()); // (1, n)
        if let Some(ix) = io.attention_mask {
            // Unused once fused; its length only has to agree with itself.
            inputs[ix] = Some(Tensor::from_shape(&[1, n], &vec![1i64; n])?.into());
            // (1, n)
        }
        if let Some(ix) = io.position_ids {
            let positions: Vec<i64> = (self.next_pos..self.next_pos + n)
                .map(|p| p as i64)
                .collect();
            inputs[ix] = Some(Tensor::from_shape(&[1, n], &positions)?.into()); // (1, n)
        }
        let rows = logit_rows(&mut inputs, io.logit_rows, n, all)?;
        let inputs = inputs
            .into_iter()
            .collect::<Option<TVec<TValue>>>()
            .context("a model input has no binding")?;
        let mut outputs = match runner.run(inputs) {
            Ok(outputs) => outputs,
            Err(e) => {
                for &node in &io.ring {
                    if let Ok(state) = ring_state_mut(runner, node) {
                        state.step = None;
                    }
                }
                runner.reset_turn()?;
                if step.dropped == 0 {
                    // Only empty slots were written: the cache is as it was.
                    self.ring.restore(before);
                    return Err(e.context("running the model"));
                }
                self.reset();
                return Err(e.context("running the model (the conversation was reset)"));
            }
        };
        let logits = take_logits(&mut outputs, io.logits, rows, self.vocab_size)?;
        self.next_pos += n;
        if step.dropped > 0 {
            let shift = Shift {
                dropped: step.dropped,
                kept: self.ring.len(),
                repositioned: false,
            };
            log::info!(
                "KV cache full: dropped the {} oldest tokens after the first {}, keeping {}",
                shift.dropped,
                self.ring.n_keep(),
                shift.kept
            );
            self.shifts.push(shift);
        }
        Ok(logits)
    }

    /// The explicit path: feeds the previous presents back as pasts. Returns (1, rows, vocab)
    /// as [`State::run_chunk`] does.
    fn run_explicit(&mut self, tokens: &[u32], all: bool) -> Result<TValue> {
        let n = tokens.len();
        if self.len + n > self.max_positions {
            let (cached, max) = (self.len, self.max_positions);
            return Err(ForwardError::ContextFull {
                cached,
                new: n,
                max,
            }
            .into());
        }
        let io = &*self.io;
        if self.past.is_empty() {
            // (1, kv_heads, 0, head_dim)
            let empty: TValue = Tensor::zero::<f32>(&[1, io.kv_heads, 0, io.head_dim])?.into();
            self.past = vec![empty; 2 * io.past.len()];
        }

        let mut inputs: Vec<Option<TValue>> = vec![None; io.inputs];
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        inputs[io.input_ids] = Some(Tensor::from_shape(&[1, n], &ids)?.into()); // (1, n)
        if let Some(ix) = io.attention_mask {
            let mask = vec![1i64; self.len + n];
            inputs[ix] = Some(Tensor::from_shape(&[1, self.len + n], &mask)?.into());
            // (1, past+n)
        }
        if let Some(ix) = io.position_ids {
            let positions: Vec<i64> = (self.len..self.len + n).map(|p| p as i64).collect();
            inputs[ix] = Some(Tensor::from_shape(&[1, n], &positions)?.into()); // (1, n)
        }
        let rows = logit_rows(&mut inputs, io.logit_rows, n, all)?;
        for (layer, &(k, v)) in io.past.iter().enumerate() {
            inputs[k] = Some(self.past[2 * layer].clone());
            inputs[v] = Some(self.past[2 * layer + 1].clone());
        }
        let inputs = inputs
            .into_iter()
            .collect::<Option<TVec<TValue>>>()
            .context("a model input has no binding")?;

        let runner = match &mut self.runner {
            Some(runner) => runner,
            slot => slot.insert(self.plan.spawn()?),
        };
        let mut outputs = match runner.run(inputs) {
            Ok(outputs) => outputs,
            Err(e) => {
                // A failed turn leaves symbol bindings behind in tract's state; start afresh.
                self.runner = None;
                return Err(e.context("running the model"));
            }
        };

        let expected = [1, io.kv_heads, self.len + n, io.head_dim];
        let mut present = Vec::with_capacity(self.past.len());
        for &(k, v) in &io.present {
            for ix in [k, v] {
                let t = outputs[ix].clone();
                ensure!(
                    t.shape() == expected,
                    "present has shape {:?}, not {expected:?}",
                    t.shape()
                );
                present.push(t);
            }
        }
        let logits = take_logits(&mut outputs, io.logits, rows, self.vocab_size)?;
        self.past = present;
        self.len += n;
        Ok(logits)
    }
}

/// The ring op state of plan node `node`.
fn ring_state(runner: &Runner, node: usize) -> Option<&RingState> {
    runner
        .op_states
        .get(node)?
        .as_ref()?
        .downcast_ref::<RingState>()
}

fn ring_state_mut(runner: &mut Runner, node: usize) -> Result<&mut RingState> {
    runner
        .op_states
        .get_mut(node)
        .and_then(|s| s.as_mut())
        .and_then(|s| s.downcast_mut::<RingState>())
        .with_context(|| format!("plan node {node} has no ring attention state"))
}

/// Runs the protobuf pre-pass of [`Model::load`] (the part before tract: decode, external
/// data checks, int8 routing, blocked `DequantizeLinear` folding, pruning, batch pinning) on
/// `model.onnx` bytes whose external data lives in `dir`, for fuzzing: the same code
/// [`Model::load`] runs.
#[doc(hidden)]
pub fn prepass(bytes: &[u8], dir: &Path, int8: Int8Path) -> Result<()> {
    let proto = decode_model_proto(bytes, &dir.join(MODEL_FILE))?;
    prepare(proto, dir, int8).map(drop)
}

/// The decoded `model.onnx` after the pre-pass, and what it found.
struct Prepared {
    proto: pb::ModelProto,
    external: ExternalData,
    q8: Q8Table,
    /// Blocked `DequantizeLinear` nodes folded to f32.
    rewritten: usize,
    logit_rows: bool,
    io_names: IoNames,
    summary: LoadSummary,
}

/// The protobuf pre-pass (before tract): external data checks, int8 routing (our blocks and
/// ONNX Runtime's `MatMulInteger`), blocked `DequantizeLinear` folding, pruning, logit-row
/// selection, batch pinning, opset capping.
fn prepare(mut proto: pb::ModelProto, dir: &Path, int8: Int8Path) -> Result<Prepared> {
    let model_path = dir.join(MODEL_FILE);
    let graph = proto
        .graph
        .as_mut()
        .ok_or_else(|| anyhow!("{model_path:?} has no graph"))?;
    let external = ExternalData::collect(graph, dir)
        .with_context(|| format!("external data of {model_path:?}"))?;
    let mut summary = LoadSummary::default();
    for node in &graph.node {
        *summary.source_ops.entry(node.op_type.clone()).or_default() += 1;
    }
    for t in &graph.initializer {
        let count = element_count(t)?;
        summary.parameters += count;
        summary.weight_bytes += count * elem_size(t.data_type).unwrap_or(0);
    }
    let q8 = match int8 {
        Int8Path::Fold => Q8Table::new(),
        Int8Path::Q8F32
        | Int8Path::Q8Q8
        | Int8Path::Q8Q16
        | Int8Path::Q8Q15Tiled
        | Int8Path::Q8Q8Tiled => {
            let mut q8 =
                route_q8(graph, &external).with_context(|| format!("rewriting {model_path:?}"))?;
            let ort = route_matmul_integer(graph, &external)
                .with_context(|| format!("rewriting {model_path:?}"))?;
            summary.matmul_integer_rewritten = ort.len();
            q8.extend(ort);
            q8
        }
    };
    let rewritten = rewrite_blocked_dequantize(graph, &external)
        .with_context(|| format!("rewriting {model_path:?}"))?;
    if rewritten > 0 {
        fold_weight_transposes(graph);
    }
    prune_initializers(graph);
    let logit_rows = select_logit_rows(graph);
    if !q8.is_empty() {
        proto.opset_import.push(pb::OperatorSetIdProto {
            domain: q8op::DOMAIN.into(),
            version: 1,
        });
    }
    pin_batch_to_one(graph).with_context(|| format!("reading {model_path:?}"))?;
    let io_names = IoNames::of(graph).with_context(|| format!("reading {model_path:?}"))?;
    cap_opset(&mut proto);
    Ok(Prepared {
        proto,
        external,
        q8,
        rewritten,
        logit_rows,
        io_names,
        summary,
    })
}

/// Memory-maps and decodes `path`, checking that it looks like an ONNX decoder.
fn read_model_proto(path: &Path) -> Result<pb::ModelProto> {
    let file = File::open(path).with_context(|| format!("opening {path:?}"))?;
    // SAFETY: read-only map, dropped when this function returns; the bundle must not be
    // modified while loading (a concurrent truncation could fault, as with any mmap reader).
    let map = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {path:?}"))?;
    decode_model_proto(&map, path)
}

/// Decodes `bytes` (read from `path`), checking that it looks like an ONNX decoder.
fn decode_model_proto(bytes: &[u8], path: &Path) -> Result<pb::ModelProto> {
    let proto = pb::ModelProto::decode(bytes)
        .map_err(|e| anyhow!("{path:?} is not a valid ONNX model: {e}"))?;
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| anyhow!("{path:?} is not a valid ONNX model: no graph"))?;
    ensure!(
        !graph.node.is_empty() && !proto.opset_import.is_empty(),
        "{path:?} is not a valid ONNX model (truncated?): no nodes or no opset"
    );
    Ok(proto)
}

/// Byte size of one element of an ONNX data type, for the types a decoder stores.
fn elem_size(data_type: i32) -> Option<usize> {
    Some(match DataType::try_from(data_type).ok()? {
        DataType::Bool | DataType::Int8 | DataType::Uint8 => 1,
        DataType::Int16 | DataType::Uint16 | DataType::Float16 | DataType::Bfloat16 => 2,
        DataType::Int32 | DataType::Uint32 | DataType::Float => 4,
        DataType::Int64 | DataType::Uint64 | DataType::Double => 8,
        _ => return None,
    })
}

/// Element count of a tensor, refusing negative dims and overflow.
fn element_count(t: &pb::TensorProto) -> Result<usize> {
    t.dims.iter().try_fold(1usize, |acc, &d| {
        let d = u64::try_from(d).map_err(|_| anyhow!("tensor {:?} has dim {d}", t.name))?;
        // A dim past usize (32-bit boards) is as impossible to hold as an overflowing product.
        let d = usize::try_from(d).map_err(|_| anyhow!("tensor {:?} is too large", t.name))?;
        acc.checked_mul(d)
            .ok_or_else(|| anyhow!("tensor {:?} is too large", t.name))
    })
}

fn is_external(t: &pb::TensorProto) -> bool {
    t.data_location == Some(pb::tensor_proto::DataLocation::External as i32)
}

/// The value of `key` in a tensor's `external_data` entries.
fn external_entry<'a>(t: &'a pb::TensorProto, key: &str) -> Option<&'a str> {
    t.external_data
        .iter()
        .find(|e| e.key == key)
        .map(|e| e.value.as_str())
}

/// The bundle's external-data files, each memory-mapped once, with every reference checked.
///
/// Also serves tract's loader, so tensors are copied straight from the maps.
struct ExternalData {
    /// The canonical bundle directory; `None` when nothing is external.
    root: Option<PathBuf>,
    /// Canonical path → map.
    files: HashMap<PathBuf, Arc<Mmap>>,
}

impl ExternalData {
    /// Validates every external reference of `graph`'s initializers (location inside `dir`,
    /// range inside the file, length matching the tensor) and maps the files. A missing
    /// `length` entry is filled in so tract reads exactly the tensor's bytes.
    fn collect(graph: &mut pb::GraphProto, dir: &Path) -> Result<ExternalData> {
        let mut files = HashMap::new();
        if !graph.initializer.iter().any(is_external) {
            return Ok(ExternalData { root: None, files });
        }
        let root = dir
            .canonicalize()
            .with_context(|| format!("resolving {dir:?}"))?;
        for t in graph.initializer.iter_mut().filter(|t| is_external(t)) {
            let name = t.name.clone();
            let location = external_entry(t, "location")
                .with_context(|| format!("tensor {name:?}: external data without a location"))?
                .to_string();
            let relative = Path::new(&location);
            ensure!(
                relative
                    .components()
                    .all(|c| matches!(c, Component::Normal(_) | Component::CurDir)),
                "tensor {name:?}: external data location {location:?} must be a relative path \
                 inside the bundle"
            );
            let path = root
                .join(relative)
                .canonicalize()
                .with_context(|| format!("tensor {name:?}: opening external data {location:?}"))?;
            ensure!(
                path.starts_with(&root),
                "tensor {name:?}: external data {location:?} resolves outside the bundle"
            );
            let offset: usize = match external_entry(t, "offset") {
                Some(s) => {
                    let offset: u64 = s
                        .parse()
                        .with_context(|| format!("tensor {name:?}: offset {s:?}"))?;
                    // Past usize (32-bit boards) is past the end of any file we can map.
                    usize::try_from(offset).unwrap_or(usize::MAX)
                }
                None => 0,
            };
            let size = elem_size(t.data_type)
                .with_context(|| format!("tensor {name:?}: unsupported external data type"))?;
            let needed = element_count(t)?
                .checked_mul(size)
                .with_context(|| format!("tensor {name:?} is too large"))?;
            match external_entry(t, "length") {
                Some(s) => {
                    let length: usize = s
                        .parse()
                        .with_context(|| format!("tensor {name:?}: length {s:?}"))?;
                    ensure!(
                        length == needed,
                        "tensor {name:?}: external length {length} but the tensor needs {needed} bytes"
                    );
                }
                None => t.external_data.push(pb::StringStringEntryProto {
                    key: "length".into(),
                    value: needed.to_string(),
                }),
            }
            if !files.contains_key(&path) {
                let file = File::open(&path).with_context(|| format!("opening {path:?}"))?;
                // SAFETY: read-only map of a bundle file; the bundle must not be modified while
                // loading (a concurrent truncation could fault, as with any mmap reader).
                let map =
                    unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {path:?}"))?;
                files.insert(path.clone(), Arc::new(map));
            }
            let file_len = files[&path].len();
            ensure!(
                offset
                    .checked_add(needed)
                    .is_some_and(|end| end <= file_len),
                "tensor {name:?}: external data {offset}..{} is past the end of {location:?} \
                 ({file_len} bytes)",
                offset.saturating_add(needed)
            );
        }
        Ok(ExternalData {
            root: Some(root),
            files,
        })
    }

    /// The bytes of a tensor whose external reference `collect` validated.
    fn bytes_of(&self, t: &pb::TensorProto) -> Result<&[u8]> {
        let root = self
            .root
            .as_ref()
            .context("external data was not validated")?;
        let location = external_entry(t, "location").context("no location")?;
        let path = root.join(location).canonicalize()?;
        let offset: usize = external_entry(t, "offset").map_or(Ok(0), str::parse)?;
        let length: usize = external_entry(t, "length").context("no length")?.parse()?;
        self.slice(&path, offset, Some(length))
    }

    /// Where a tensor's bytes sit, for using them in place: its mapped file and range.
    fn mapped(&self, t: &pb::TensorProto) -> Result<(Arc<Mmap>, std::ops::Range<usize>)> {
        let root = self
            .root
            .as_ref()
            .context("external data was not validated")?;
        let location = external_entry(t, "location").context("no location")?;
        let path = root.join(location).canonicalize()?;
        let offset: usize = external_entry(t, "offset").map_or(Ok(0), str::parse)?;
        let length: usize = external_entry(t, "length").context("no length")?.parse()?;
        let map = self
            .files
            .get(&path)
            .with_context(|| format!("external data {path:?} was not validated"))?;
        let end = offset
            .checked_add(length)
            .context("external range overflows")?;
        ensure!(
            end <= map.len(),
            "external range {offset}..{end} is past the end of {path:?}"
        );
        Ok((Arc::clone(map), offset..end))
    }

    fn slice(&self, path: &Path, offset: usize, length: Option<usize>) -> Result<&[u8]> {
        let map = self
            .files
            .get(path)
            .with_context(|| format!("external data {path:?} was not validated"))?;
        let end = match length {
            Some(l) => offset.checked_add(l).context("external range overflows")?,
            None => map.len(),
        };
        map.get(offset..end)
            .with_context(|| format!("external range {offset}..{end} is past the end of {path:?}"))
    }
}

impl ModelDataResolver for ExternalData {
    fn read_bytes_from_path(
        &self,
        buf: &mut Vec<u8>,
        p: &Path,
        offset: usize,
        length: Option<usize>,
    ) -> TractResult<()> {
        buf.extend_from_slice(self.slice(p, offset, length)?);
        Ok(())
    }
}

/// The raw little-endian bytes of an initializer, or `None` if it uses the typed fields.
fn raw_bytes<'a>(t: &'a pb::TensorProto, external: &'a ExternalData) -> Result<Option<&'a [u8]>> {
    if is_external(t) {
        Ok(Some(external.bytes_of(t)?))
    } else if !t.raw_data.is_empty() {
        Ok(Some(&t.raw_data))
    } else {
        Ok(None)
    }
}

/// An integer initializer (int8/uint8/int16/uint16/int32) widened to i32.
fn tensor_ints(t: &pb::TensorProto, external: &ExternalData) -> Result<Vec<i32>> {
    let dt = DataType::try_from(t.data_type).ok();
    let count = element_count(t)?;
    let values: Vec<i32> = match raw_bytes(t, external)? {
        Some(bytes) => match dt {
            Some(DataType::Int8) => bytes.iter().map(|&b| i32::from(b as i8)).collect(),
            Some(DataType::Uint8) => bytes.iter().map(|&b| i32::from(b)).collect(),
            Some(DataType::Int16) => bytes
                .chunks_exact(2)
                .map(|c| i32::from(i16::from_le_bytes([c[0], c[1]])))
                .collect(),
            Some(DataType::Uint16) => bytes
                .chunks_exact(2)
                .map(|c| i32::from(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            Some(DataType::Int32) => bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            _ => bail!(
                "tensor {:?}: data type {} is not an integer type",
                t.name,
                t.data_type
            ),
        },
        None => match dt {
            Some(DataType::Int8) => t.int32_data.iter().map(|&v| i32::from(v as i8)).collect(),
            Some(DataType::Uint8) => t.int32_data.iter().map(|&v| i32::from(v as u8)).collect(),
            Some(DataType::Int16) => t.int32_data.iter().map(|&v| i32::from(v as i16)).collect(),
            Some(DataType::Uint16) => t.int32_data.iter().map(|&v| i32::from(v as u16)).collect(),
            Some(DataType::Int32) => t.int32_data.clone(),
            _ => bail!(
                "tensor {:?}: data type {} is not an integer type",
                t.name,
                t.data_type
            ),
        },
    };
    ensure!(
        values.len() == count,
        "tensor {:?} holds {} values, its shape {:?} needs {count}",
        t.name,
        values.len(),
        t.dims
    );
    Ok(values)
}

/// An f32 initializer.
fn tensor_floats(t: &pb::TensorProto, external: &ExternalData) -> Result<Vec<f32>> {
    ensure!(
        t.data_type == DataType::Float as i32,
        "tensor {:?}: data type {} is not float32",
        t.name,
        t.data_type
    );
    let count = element_count(t)?;
    let values: Vec<f32> = match raw_bytes(t, external)? {
        Some(bytes) => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        None => t.float_data.clone(),
    };
    ensure!(
        values.len() == count,
        "tensor {:?} holds {} values, its shape {:?} needs {count}",
        t.name,
        values.len(),
        t.dims
    );
    Ok(values)
}

fn int_attr(node: &pb::NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

/// Replaces every `DequantizeLinear` with a `block_size` attribute and initializer inputs by
/// an f32 initializer holding `(x - zero_point) * scale` (ONNX blocked semantics: along
/// `axis`, element `i` uses scale `i / block_size`; the last block may be ragged).
///
/// tract-onnx 0.23.9 refuses blocked quantization; folded weights let tract constant-fold the
/// `Transpose`/`MatMul`/`Gather` that follow. Returns the number of nodes replaced.
fn rewrite_blocked_dequantize(
    graph: &mut pb::GraphProto,
    external: &ExternalData,
) -> Result<usize> {
    let is_blocked = |n: &pb::NodeProto| {
        n.op_type == "DequantizeLinear"
            && (n.domain.is_empty() || n.domain == "ai.onnx")
            && int_attr(n, "block_size").unwrap_or(0) != 0
    };
    if !graph.node.iter().any(is_blocked) {
        return Ok(0);
    }
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
    prune_initializers(graph);
    Ok(count)
}

/// Weights of our int8 nodes, by the name of the `DequantizeLinear` output they replaced.
type Q8Table = HashMap<String, Arc<Q8Weights>>;

/// Replaces `DequantizeLinear(block_size=32) -> Transpose([1,0]) -> MatMul` (the weight on the
/// right) by a `Q8MatMul` node and `DequantizeLinear -> Gather(axis=0)` by a `Q8Gather` node,
/// for Q8 weights (int8 (n, k), f32 scales (n, ceil(k/32)), no zero point) held in
/// initializers, and returns those weights, in place in the mapped file where possible.
///
/// A `DequantizeLinear` with any other consumer stays, for `rewrite_blocked_dequantize` to
/// fold; so does anything that does not match exactly.
fn route_q8(graph: &mut pb::GraphProto, external: &ExternalData) -> Result<Q8Table> {
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
    let none = Vec::new();
    let mut replace: HashMap<usize, pb::NodeProto> = HashMap::new();
    let mut remove: HashSet<usize> = HashSet::new();
    let mut table = Q8Table::new();
    for (di, d) in graph.node.iter().enumerate() {
        let Some((x, scale, n, k)) = q8_candidate(d, &inits, external)? else {
            continue;
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
        let weights = Q8Weights::new(
            out,
            n,
            k,
            weight_bytes(x, external)?,
            weight_bytes(scale, external)?,
        )?;
        table.insert(out.to_string(), Arc::new(weights));
        if kept == 0 {
            remove.insert(di);
        }
    }
    drop(consumers);
    drop(inits);
    let nodes = std::mem::take(&mut graph.node);
    graph.node = nodes
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !remove.contains(i))
        .map(|(i, node)| replace.remove(&i).unwrap_or(node))
        .collect();
    Ok(table)
}

/// A tensor's bytes for the int8 operators: in the mapped file, or inline in the protobuf.
fn weight_bytes<'t>(t: &'t pb::TensorProto, external: &ExternalData) -> Result<WeightBytes<'t>> {
    if is_external(t) {
        let (map, range) = external.mapped(t)?;
        Ok(WeightBytes::Mapped(map, range))
    } else {
        Ok(WeightBytes::Inline(&t.raw_data))
    }
}

/// Nodes of `model` for which `is` holds.
fn count_op(model: &TypedModel, is: impl Fn(&TypedNode) -> bool) -> usize {
    model.nodes().iter().filter(|n| is(n)).count()
}

/// Replaces ONNX Runtime's dynamic int8 linear layers (`quantize_dynamic`):
/// `DynamicQuantizeLinear(x) → MatMulInteger(x_q, W_q (k, n), x_zp, W_zp) → Cast(float) →
/// Mul(·, x_scale · W_scale)` becomes one `Q8MatMul` on `x`, with W dequantized (per-column or
/// per-tensor scale and zero point) and requantized in memory into our blocks of 32 along k.
///
/// Activations then stay f32 (or per-block int8 with `--int8 q8q8`) instead of ORT's single
/// per-tensor u8 scale. The quantizer nodes left without consumers are removed afterwards.
/// Anything that does not match exactly stays for tract (its slow integer path).
fn route_matmul_integer(graph: &mut pb::GraphProto, external: &ExternalData) -> Result<Q8Table> {
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
    remove_dead_nodes(graph);
    Ok(table)
}

/// ORT's int8 weight W_q (k, n) with scale and zero point per column (n) or per tensor,
/// as our Q8 blocks of W (n, k).
fn requantize_matmul_integer(
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

/// Removes nodes none of whose outputs is read (by a node or as a graph output), repeatedly.
fn remove_dead_nodes(graph: &mut pb::GraphProto) {
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

/// `(x, scale, n, k)` if `node` is a `DequantizeLinear` our int8 operators can take over.
fn q8_candidate<'g>(
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
fn q8_node(
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

/// Hands every int8 node of the typed model its weights and kernel settings.
fn bind_q8(model: &mut TypedModel, table: &Q8Table, exec: &Q8Exec) -> Result<()> {
    let lookup = |name: &str| {
        table
            .get(name)
            .cloned()
            .with_context(|| format!("no int8 weights named {name:?}"))
    };
    for node in model.nodes_mut() {
        if let Some(op) = node.op_as_mut::<Q8MatMul>() {
            let w = lookup(op.weight())?;
            op.bind(w, exec.clone())?;
        } else if let Some(op) = node.op_as_mut::<Q8Gather>() {
            let w = lookup(op.weight())?;
            op.bind(w, exec.clone())?;
        }
    }
    Ok(())
}

/// Takes the logits output out of a run, checking it is f32 (1, rows, vocab).
fn take_logits(outputs: &mut [TValue], ix: usize, rows: usize, vocab: usize) -> Result<TValue> {
    let logits = std::mem::replace(&mut outputs[ix], Tensor::zero::<f32>(&[0])?.into());
    ensure!(
        logits.shape() == [1, rows, vocab] && logits.datum_type() == f32::datum_type(),
        "logits have shape {:?} {:?}, not [1, {rows}, {vocab}] f32",
        logits.shape(),
        logits.datum_type()
    );
    Ok(logits)
}

/// Fills the [`LOGIT_ROWS`] input, if the graph has it: every row of `n` if `all`, else the
/// last. Returns the number of logit rows the run will produce.
fn logit_rows(
    inputs: &mut [Option<TValue>],
    slot: Option<usize>,
    n: usize,
    all: bool,
) -> Result<usize> {
    let Some(ix) = slot else {
        return Ok(n);
    };
    let rows: Vec<i64> = if all {
        (0..n as i64).collect()
    } else {
        vec![n as i64 - 1]
    };
    inputs[ix] = Some(Tensor::from_shape(&[rows.len()], &rows)?.into()); // (rows)
    Ok(rows.len())
}

/// The extra graph input naming which rows (positions) of the hidden state get logits.
const LOGIT_ROWS: &str = "edgelm_logit_rows";

/// Makes the LM head compute logits only for the rows given in a new `int64` input
/// [`LOGIT_ROWS`] (a `Gather` on the sequence axis in front of it): prefill needs the last
/// row only, and the full (tokens, vocab) product would be a fifth of its work and its
/// largest buffer. Returns false (graph unchanged) if `logits` is not made by a `MatMul`.
fn select_logit_rows(graph: &mut pb::GraphProto) -> bool {
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

/// Drops initializers no node, input or output reads, so tract never loads them.
fn prune_initializers(graph: &mut pb::GraphProto) {
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
fn fold_weight_transposes(graph: &mut pb::GraphProto) {
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
fn transpose_f32(t: &pb::TensorProto, name: &str) -> Option<pb::TensorProto> {
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

/// Declares opset 18 to tract when the graph asks for more: blocked `DequantizeLinear` (the
/// reason our bundles say 21) is gone by now, and the ops we write mean the same in 18.
fn cap_opset(proto: &mut pb::ModelProto) {
    for o in &mut proto.opset_import {
        if (o.domain.is_empty() || o.domain == "ai.onnx") && o.version > 18 {
            o.version = 18;
        }
    }
}

/// The f32 initializer replacing one blocked `DequantizeLinear` node.
fn dequantize_blocked(
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

/// Gives the batch dimension of every graph input and output the value 1.
///
/// Optimum names it `batch_size`; whatever its name, it is the first dim of `input_ids`.
/// Pinning it in the protobuf means tract never sees it as a symbol.
fn pin_batch_to_one(graph: &mut pb::GraphProto) -> Result<()> {
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

/// The graph's input and output names in tract's order (initializers are not inputs).
struct IoNames {
    inputs: Vec<String>,
    outputs: Vec<String>,
}

impl IoNames {
    fn of(graph: &pb::GraphProto) -> Result<IoNames> {
        let initializers: HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        Ok(IoNames {
            inputs: graph
                .input
                .iter()
                .filter(|i| !initializers.contains(i.name.as_str()))
                .map(|i| i.name.clone())
                .collect(),
            outputs: graph.output.iter().map(|o| o.name.clone()).collect(),
        })
    }

    /// Folds the cache I/O into ring attention ops when the graph matches (dropping the
    /// names it removed); returns whether it did.
    fn fuse_cache(&mut self, model: &mut TypedModel, layers: usize) -> Result<bool> {
        // Checked first: everything below sizes tables by the config's layer count.
        let declared = self
            .inputs
            .iter()
            .filter(|n| n.starts_with("past_key_values.") && n.ends_with(".key"))
            .count();
        ensure!(
            declared == layers,
            "config.json says {layers} layers but the graph has a KV cache for {declared}"
        );
        let Some(fused) = attention::fuse(model, layers)? else {
            log::info!(
                "the attention does not match the ring-buffer rewrite; keeping the graph's \
                 past/present KV cache (bounded by the model's context, copied every step)"
            );
            return Ok(false);
        };
        for &i in fused.removed_inputs.iter().rev() {
            self.inputs.remove(i);
        }
        for &o in fused.removed_outputs.iter().rev() {
            self.outputs.remove(o);
        }
        Ok(true)
    }

    /// Matches names to roles, and checks the cache tensors against the config.
    fn bind(&self, model: &TypedModel, config: &Config, fused: bool) -> Result<Bindings> {
        ensure!(
            model.inputs.len() == self.inputs.len() && model.outputs.len() == self.outputs.len(),
            "tract sees {} inputs and {} outputs, the graph declares {} and {}",
            model.inputs.len(),
            model.outputs.len(),
            self.inputs.len(),
            self.outputs.len()
        );
        for (ix, name) in self.inputs.iter().enumerate() {
            let node = &model.node(model.inputs[ix].node).name;
            ensure!(
                node == name,
                "input {ix} is {node:?} in tract but {name:?} in the graph"
            );
        }
        let layers = config.num_hidden_layers;
        let mut past = vec![(None, None); layers];
        let (mut input_ids, mut attention_mask, mut position_ids) = (None, None, None);
        let mut logit_rows = None;
        for (ix, name) in self.inputs.iter().enumerate() {
            match name.as_str() {
                "input_ids" => input_ids = Some(ix),
                LOGIT_ROWS => logit_rows = Some(ix),
                "attention_mask" => attention_mask = Some(ix),
                "position_ids" => position_ids = Some(ix),
                _ => {
                    let slot = cache_slot(name, "past_key_values.", layers)
                        .filter(|_| !fused)
                        .with_context(|| format!("unexpected input {name:?}"))?;
                    set_once(&mut past, slot, ix, name)?;
                }
            }
        }
        let mut present = vec![(None, None); layers];
        let mut logits = None;
        for (ix, name) in self.outputs.iter().enumerate() {
            if name == "logits" {
                logits = Some(ix);
            } else if let Some(slot) = cache_slot(name, "present.", layers) {
                set_once(&mut present, slot, ix, name)?;
            }
        }
        let complete = |v: Vec<(Option<usize>, Option<usize>)>, what: &str| {
            v.into_iter()
                .enumerate()
                .map(|(layer, kv)| match kv {
                    (Some(k), Some(v)) => Ok((k, v)),
                    _ => bail!("missing {what}.{layer}.key or .value ({layers} layers in config)"),
                })
                .collect::<Result<Vec<_>>>()
        };
        let input_ids = input_ids.context("no `input_ids` input")?;
        let logits = logits.context("no `logits` output")?;
        if fused {
            let mut ring = vec![None; layers];
            for node in model.nodes() {
                if let Some(op) = node.op_as::<attention::RingAttention>() {
                    let slot = ring
                        .get_mut(op.layer)
                        .context("ring op of an unknown layer")?;
                    ensure!(
                        slot.replace(node.id).is_none(),
                        "two ring ops for layer {}",
                        op.layer
                    );
                }
            }
            let ring = ring
                .into_iter()
                .enumerate()
                .map(|(l, n)| n.with_context(|| format!("layer {l} lost its ring attention")))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Bindings {
                inputs: self.inputs.len(),
                input_ids,
                attention_mask,
                position_ids,
                logit_rows,
                past: vec![],
                logits,
                present: vec![],
                ring,
                kv_heads: config.num_key_value_heads,
                head_dim: config.head_dim,
            });
        }
        let past = complete(past, "past_key_values")?;
        let present = complete(present, "present")?;

        let fact = model.input_fact(past[0].0)?;
        ensure!(
            fact.datum_type == f32::datum_type() && fact.rank() == 4,
            "past_key_values.0.key is {fact:?}, expected f32 (batch, kv_heads, past, head_dim)"
        );
        let kv_heads = fact.shape[1]
            .as_i64()
            .map(|d| d as usize)
            .context("kv_heads is not a number")?;
        let head_dim = fact.shape[3]
            .as_i64()
            .map(|d| d as usize)
            .context("head_dim is not a number")?;
        ensure!(
            kv_heads == config.num_key_value_heads && head_dim == config.head_dim,
            "the cache has {kv_heads} heads of {head_dim}, config.json says {} of {}",
            config.num_key_value_heads,
            config.head_dim
        );
        let logits_fact = model.output_fact(logits)?;
        if let Some(vocab) = logits_fact
            .shape
            .last()
            .and_then(|d| d.as_i64())
            .map(|d| d as usize)
        {
            ensure!(
                vocab == config.vocab_size,
                "logits are {vocab} wide, config.json says vocab_size {}",
                config.vocab_size
            );
        }
        Ok(Bindings {
            inputs: self.inputs.len(),
            input_ids,
            attention_mask,
            position_ids,
            logit_rows,
            past,
            logits,
            present,
            ring: vec![],
            kv_heads,
            head_dim,
        })
    }
}

/// `(layer, is_value)` of a name like `past_key_values.3.value`.
fn cache_slot(name: &str, prefix: &str, layers: usize) -> Option<(usize, bool)> {
    let (layer, kind) = name.strip_prefix(prefix)?.split_once('.')?;
    let layer: usize = layer.parse().ok().filter(|&l| l < layers)?;
    match kind {
        "key" => Some((layer, false)),
        "value" => Some((layer, true)),
        _ => None,
    }
}

fn set_once(
    table: &mut [(Option<usize>, Option<usize>)],
    (layer, is_value): (usize, bool),
    ix: usize,
    name: &str,
) -> Result<()> {
    let slot = if is_value {
        &mut table[layer].1
    } else {
        &mut table[layer].0
    };
    ensure!(slot.replace(ix).is_none(), "{name:?} appears twice");
    Ok(())
}

/// Parses the (pre-passed) protobuf with tract and types it.
fn to_typed(proto: &pb::ModelProto, dir: &Path, external: ExternalData) -> Result<TypedModel> {
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

/// Builds the runnable plan with a thread pool of `threads` (at least 1).
fn make_plan(model: TypedModel, threads: usize) -> Result<Arc<Plan>> {
    let executor = if threads > 1 {
        // Built here rather than by tract, which panics when the pool cannot be created.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("edgelm-mm-{i}"))
            .build()
            .with_context(|| format!("starting {threads} threads"))?;
        multithread::Executor::MultiThread(Arc::new(pool))
    } else {
        multithread::Executor::SingleThread
    };
    let stale = per_step_constants(&model);
    if !stale.is_empty() {
        log::warn!(
            "{} nodes recompute constants every step: {stale:?}",
            stale.len()
        );
    }
    let options = RunOptions {
        executor: Some(executor),
        ..Default::default()
    };
    SimplePlan::new_with_options(model, &options)
}

/// Nodes computing a fixed value from constants, i.e. work the plan would redo on every
/// forward. Symbolic shape arithmetic (a `Range` over the sequence length) is not fixed.
fn per_step_constants(model: &TypedModel) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn no_external() -> ExternalData {
        ExternalData {
            root: None,
            files: HashMap::new(),
        }
    }

    fn value_info(name: &str, dims: &[i64]) -> pb::ValueInfoProto {
        use pb::tensor_shape_proto::{dimension::Value, Dimension};
        let dim = dims
            .iter()
            .map(|&d| Dimension {
                value: Some(Value::DimValue(d)),
                ..Default::default()
            })
            .collect();
        pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: DataType::Float as i32,
                    shape: Some(pb::TensorShapeProto { dim }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn int_attribute(name: &str, i: i64) -> pb::AttributeProto {
        pb::AttributeProto {
            name: name.into(),
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            i,
            ..Default::default()
        }
    }

    fn initializer(
        name: &str,
        dims: &[usize],
        data_type: DataType,
        raw: Vec<u8>,
    ) -> pb::TensorProto {
        pb::TensorProto {
            name: name.into(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: data_type as i32,
            raw_data: raw,
            ..Default::default()
        }
    }

    /// Blocked int8 weights of a linear layer: q (n, k), scale and zero point (n, ceil(k/32)).
    struct Blocked {
        n: usize,
        k: usize,
        q: Vec<i8>,
        scale: Vec<f32>,
        zero: Option<Vec<i8>>,
    }

    impl Blocked {
        /// Values chosen so every product and sum is exact in f32: small integers times
        /// powers of two.
        fn new(n: usize, k: usize, with_zero: bool) -> Blocked {
            let blocks = k.div_ceil(32);
            let q = (0..n * k).map(|i| ((i * 7 + 3) % 31) as i8 - 15).collect();
            let scale = (0..n * blocks)
                .map(|i| [0.5, 0.25, 0.125, 1.0][i % 4])
                .collect();
            let zero = with_zero.then(|| (0..n * blocks).map(|i| (i % 5) as i8 - 2).collect());
            Blocked {
                n,
                k,
                q,
                scale,
                zero,
            }
        }

        fn dequantized(&self, row: usize, col: usize) -> f32 {
            let b = row * self.k.div_ceil(32) + col / 32;
            let z = self.zero.as_ref().map_or(0, |z| z[b]);
            (f32::from(self.q[row * self.k + col]) - f32::from(z)) * self.scale[b]
        }

        /// x (1, k) → DequantizeLinear(block_size 32) → Transpose → MatMul → y (1, n).
        fn linear_model(&self) -> pb::ModelProto {
            let blocks = self.k.div_ceil(32);
            let mut initializers = vec![
                initializer(
                    "w_q",
                    &[self.n, self.k],
                    DataType::Int8,
                    self.q.iter().map(|&v| v as u8).collect(),
                ),
                initializer(
                    "w_scale",
                    &[self.n, blocks],
                    DataType::Float,
                    self.scale.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ),
            ];
            let mut dq_inputs = vec!["w_q".to_string(), "w_scale".to_string()];
            if let Some(zero) = &self.zero {
                initializers.push(initializer(
                    "w_zero",
                    &[self.n, blocks],
                    DataType::Int8,
                    zero.iter().map(|&v| v as u8).collect(),
                ));
                dq_inputs.push("w_zero".into());
            }
            let node = |op: &str, inputs: Vec<String>, output: &str, attribute| pb::NodeProto {
                op_type: op.into(),
                name: format!("{op}_0"),
                input: inputs,
                output: vec![output.into()],
                attribute,
                ..Default::default()
            };
            let perm = pb::AttributeProto {
                name: "perm".into(),
                r#type: pb::attribute_proto::AttributeType::Ints as i32,
                ints: vec![1, 0],
                ..Default::default()
            };
            pb::ModelProto {
                ir_version: 10,
                opset_import: vec![pb::OperatorSetIdProto {
                    domain: String::new(),
                    version: 21,
                }],
                graph: Some(pb::GraphProto {
                    node: vec![
                        node(
                            "DequantizeLinear",
                            dq_inputs,
                            "w",
                            vec![int_attribute("axis", 1), int_attribute("block_size", 32)],
                        ),
                        node("Transpose", vec!["w".into()], "w_t", vec![perm]),
                        node("MatMul", vec!["x".into(), "w_t".into()], "y", vec![]),
                    ],
                    initializer: initializers,
                    input: vec![value_info("x", &[1, self.k as i64])],
                    output: vec![value_info("y", &[1, self.n as i64])],
                    ..Default::default()
                }),
                ..Default::default()
            }
        }
    }

    fn run_linear(blocked: &Blocked) -> (Vec<f32>, Vec<f32>) {
        let mut proto = blocked.linear_model();
        let graph = proto.graph.as_mut().unwrap();
        assert_eq!(
            rewrite_blocked_dequantize(graph, &no_external()).unwrap(),
            1
        );
        assert!(graph.node.iter().all(|n| n.op_type != "DequantizeLinear"));
        let names: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["w"], "the int8 weights and scales are dropped");

        let model = to_typed(&proto, Path::new("."), no_external()).unwrap();
        let plan = make_plan(model.into_optimized().unwrap(), 1).unwrap();
        let x: Vec<f32> = (0..blocked.k).map(|i| (i % 9) as f32 - 4.0).collect(); // (1, k)
        let out = plan
            .run(tvec![Tensor::from_shape(&[1, blocked.k], &x)
                .unwrap()
                .into()])
            .unwrap();
        let got = out[0]
            .try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec(); // (1, n)
        let want = (0..blocked.n)
            .map(|row| {
                (0..blocked.k)
                    .map(|col| x[col] * blocked.dequantized(row, col))
                    .sum()
            })
            .collect();
        (got, want)
    }

    #[test]
    fn blocked_dequantize_linear_k64_matches_hand_computed() {
        let (got, want) = run_linear(&Blocked::new(5, 64, true));
        assert_eq!(got, want);
    }

    #[test]
    fn blocked_dequantize_linear_k80_ragged_last_block() {
        let (got, want) = run_linear(&Blocked::new(5, 80, true));
        assert_eq!(got, want);
    }

    #[test]
    fn blocked_dequantize_without_zero_point() {
        let (got, want) = run_linear(&Blocked::new(3, 80, false));
        assert_eq!(got, want);
    }

    #[test]
    fn blocked_dequantize_values_follow_onnx_semantics() {
        let blocked = Blocked::new(2, 80, true);
        let mut proto = blocked.linear_model();
        let graph = proto.graph.as_mut().unwrap();
        rewrite_blocked_dequantize(graph, &no_external()).unwrap();
        let w = tensor_floats(&graph.initializer[0], &no_external()).unwrap(); // (n, k)
        assert_eq!(graph.initializer[0].dims, [2, 80]);
        for row in 0..2 {
            for col in 0..80 {
                assert_eq!(
                    w[row * 80 + col],
                    blocked.dequantized(row, col),
                    "({row}, {col})"
                );
            }
        }
        // Column 79 sits in the third, ragged block (64..80).
        let b = 2 * 3 - 1;
        let zero = blocked.zero.as_ref().unwrap()[b];
        assert_eq!(
            w[79 + 80],
            (f32::from(blocked.q[80 + 79]) - f32::from(zero)) * blocked.scale[b]
        );
    }

    #[test]
    fn blocked_dequantize_rejects_a_wrong_scale_shape() {
        let mut blocked = Blocked::new(2, 64, false);
        blocked.k = 80; // scales for 2 blocks, weights needing 3
        blocked.q.resize(2 * 80, 0);
        blocked.scale.truncate(2 * 2);
        let mut proto = blocked.linear_model();
        let graph = proto.graph.as_mut().unwrap();
        for t in &mut graph.initializer {
            if t.name == "w_scale" {
                t.dims = vec![2, 2];
            }
        }
        let err = format!(
            "{:#}",
            rewrite_blocked_dequantize(graph, &no_external()).unwrap_err()
        );
        assert!(
            err.contains("x_scale has shape [2, 2], expected [2, 3]"),
            "{err}"
        );
    }

    /// ONNX Runtime's per-tensor u8 weights with a zero point, W (k, n) = (q - 128) * 0.25,
    /// become our (n, k) blocks: every value within half a quantization step of W.
    #[test]
    fn matmul_integer_weights_requantize_per_tensor_u8() {
        let (k, n) = (40, 3);
        let q: Vec<u8> = (0..k * n).map(|i| (i * 37 % 200 + 28) as u8).collect(); // (k, n)
        let w = initializer("w", &[k, n], DataType::Uint8, q.clone());
        let scale = initializer("s", &[], DataType::Float, 0.25f32.to_le_bytes().to_vec());
        let zero = initializer("z", &[], DataType::Uint8, vec![128]);
        let weights =
            requantize_matmul_integer("w", &w, &scale, Some(&zero), &no_external()).unwrap();
        let m = weights.matrix().unwrap();
        assert_eq!((m.n(), m.k()), (n, k));
        for c in 0..n {
            for r in 0..k {
                let step = m.scales()[c * m.blocks_per_row() + r / 32];
                let got = f32::from(m.q()[c * k + r]) * step;
                let want = (f32::from(q[r * n + c]) - 128.0) * 0.25;
                assert!(
                    (got - want).abs() <= step / 2.0 + 1e-6,
                    "W[{r}, {c}]: {got} vs {want}"
                );
            }
        }

        let two = initializer("s2", &[2], DataType::Float, vec![0; 8]);
        let err = requantize_matmul_integer("w", &w, &two, None, &no_external()).unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "scale of \"w\" has 2 values for 3 columns"
        );
    }

    #[test]
    fn model_is_shared_across_threads_and_state_can_move() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<Model>();
        send::<State>();
    }

    #[test]
    fn cache_slots_are_parsed() {
        assert_eq!(
            cache_slot("past_key_values.1.value", "past_key_values.", 2),
            Some((1, true))
        );
        assert_eq!(cache_slot("present.0.key", "present.", 2), Some((0, false)));
        assert_eq!(cache_slot("present.2.key", "present.", 2), None);
        assert_eq!(cache_slot("present.0.query", "present.", 2), None);
    }
}

#[cfg(test)]
mod fixture_tests {
    use super::*;

    fn fixture(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(path)
    }

    /// Regression: a tied LM head is `Transpose(embedding)` → `MatMul`; tract once re-packed
    /// that matrix on every step. Every all-constant node must be folded at load.
    #[test]
    fn tied_lm_head_is_folded_at_load() {
        for bundle in [
            "tiny-llama/onnx-f32",
            "tiny-llama/onnx-int8",
            "tiny-gpt2/onnx-f32",
            "tiny-gpt2/onnx-int8",
        ] {
            let model = Model::load(
                &fixture(bundle),
                &LoadOptions {
                    threads: 1,
                    ..Default::default()
                },
            )
            .unwrap();
            assert!(model.config().tie_word_embeddings);
            let stale = per_step_constants(model.plan.model());
            assert_eq!(stale, Vec::<String>::new(), "{bundle}");
        }
    }

    #[test]
    fn transposed_weights_are_folded_into_initializers() {
        let w = pb::TensorProto {
            name: "w".into(),
            dims: vec![2, 3],
            data_type: DataType::Float as i32,
            raw_data: [1f32, 2., 3., 4., 5., 6.]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            ..Default::default()
        };
        let transpose = pb::NodeProto {
            input: vec!["w".into()],
            output: vec!["w_t".into()],
            op_type: "Transpose".into(),
            attribute: vec![pb::AttributeProto {
                name: "perm".into(),
                ints: vec![1, 0],
                r#type: pb::attribute_proto::AttributeType::Ints as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        let matmul = pb::NodeProto {
            input: vec!["x".into(), "w_t".into()],
            output: vec!["y".into()],
            op_type: "MatMul".into(),
            ..Default::default()
        };
        let mut graph = pb::GraphProto {
            node: vec![transpose, matmul],
            initializer: vec![w],
            ..Default::default()
        };
        fold_weight_transposes(&mut graph);
        assert_eq!(graph.node.len(), 1);
        assert_eq!(
            graph.initializer.len(),
            1,
            "the untransposed copy is dropped"
        );
        let t = &graph.initializer[0];
        assert_eq!(
            (t.name.as_str(), t.dims.as_slice()),
            ("w_t", [3i64, 2].as_slice())
        );
        let v: Vec<f32> = t
            .raw_data
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(v, [1., 4., 2., 5., 3., 6.]);
    }
}
