//! One conversation: its KV cache, its position, and the forward pass over the shared plan.
//!
//! A [`State`] is made by [`crate::model::Model::new_state_with`] and owned by the caller;
//! the model it runs is immutable and shared. The graph decides, at load, which of two ways
//! the cache is kept ([`Cache`]):
//! - the ring: [`crate::attention::fuse`] replaced each layer's cache concatenation and
//!   attention by a [`crate::attention::RingAttention`] op whose state holds that layer's
//!   keys and values in a fixed-capacity ring ([`crate::kv_cache`]). This file gives every
//!   step its slots and RoPE positions, reports the tokens dropped when the ring is full, and
//!   re-prefills the kept tokens at fresh positions before the positions pass the model's
//!   context. A local (sliding-window) layer has a ring of its own of exactly its window,
//!   without sinks: keys leaving the window are the model's own semantics, never a shift;
//!   a chunk gives it one step per token, so no token's key is overwritten before every
//!   query of the chunk that sees it has attended;
//! - explicit past/present: for a graph the rewrite does not match, every forward feeds the
//!   previous `present.*` outputs back as `past_key_values.*` inputs, bounded by the model's
//!   context (and copied every step).

use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use tract_onnx::prelude::*;

use crate::attention::RingState;
use crate::kv_cache::{KvType, LayerKv, RingLayout, Shift};
use crate::prepass::{Bindings, KvIo, Plan, Runner};

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
            kv: KvType::default(),
            keep: DEFAULT_KEEP,
        }
    }
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

/// One conversation's KV cache and position; owned by the caller.
#[derive(Debug)]
pub struct State {
    graph: Graph,
    cache: Cache,
}

/// What both cache paths use: the shared plan and this conversation's run of it.
#[derive(Debug)]
struct Graph {
    plan: Arc<Plan>,
    io: Arc<Bindings>,
    vocab_size: usize,
    max_positions: usize,
    /// Created on the first forward; reused so per-op state (the ring storage) persists.
    runner: Option<Runner>,
}

/// How this conversation keeps its keys and values (fixed by the model's graph).
#[derive(Debug)]
enum Cache {
    Ring(Ring),
    Explicit(Explicit),
}

/// The ring path: the storage sits in the ring ops' states, the bookkeeping here.
#[derive(Debug)]
struct Ring {
    /// Per layer: the plan node of its `RingAttention` op.
    nodes: Vec<usize>,
    /// Which slot holds which token, on the global layers.
    layout: RingLayout,
    /// The local (sliding-window) layers' rings, one per window size.
    local: Vec<LocalRing>,
    /// RoPE position of the next token.
    next_pos: usize,
    /// Storage type of the keys and values.
    kv: KvType,
    /// Shifts not yet taken by the caller.
    shifts: Vec<Shift>,
}

/// The ring of the local layers with one window: as many slots as the window (at most the
/// global ring's), no sinks.
#[derive(Debug, Clone)]
pub struct LocalRing {
    /// The window, in tokens.
    pub window: usize,
    /// The layers (indices into `Ring::nodes`) that use it.
    pub layers: Vec<usize>,
    /// Which slot holds which token.
    pub layout: RingLayout,
}

/// The explicit path: the previous presents, fed back as pasts.
#[derive(Debug)]
struct Explicit {
    /// Per layer: (key input, value input).
    inputs: Vec<(usize, usize)>,
    /// Per layer: (key output, value output).
    outputs: Vec<(usize, usize)>,
    /// Per layer, key then value, each (1, kv_heads, len, head_dim).
    past: Vec<TValue>,
    /// Tokens in `past`.
    len: usize,
}

impl State {
    /// An empty conversation over `plan`, with a ring of `ctx` slots when the graph has one
    /// (`ctx` and `opts.keep` already checked against the model).
    /// `windows` is each layer's sliding window, `None` for a global layer.
    pub(crate) fn new(
        plan: Arc<Plan>,
        io: Arc<Bindings>,
        vocab_size: usize,
        max_positions: usize,
        opts: CacheOptions,
        ctx: usize,
        windows: &[Option<usize>],
    ) -> State {
        let cache = match &io.kv {
            KvIo::Ring { nodes } => Cache::Ring(Ring {
                nodes: nodes.clone(),
                // In range already; clamping only guards the types.
                layout: RingLayout::clamped(ctx, opts.keep),
                local: local_rings(windows, ctx),
                next_pos: 0,
                kv: opts.kv,
                shifts: Vec::new(),
            }),
            KvIo::Explicit { past, present } => Cache::Explicit(Explicit {
                inputs: past.clone(),
                outputs: present.clone(),
                past: Vec::new(),
                len: 0,
            }),
        };
        State {
            graph: Graph {
                plan,
                io,
                vocab_size,
                max_positions,
                runner: None,
            },
            cache,
        }
    }

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
        match &self.cache {
            Cache::Ring(r) => r.layout.len(),
            Cache::Explicit(e) => e.len,
        }
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The RoPE position the next token gets.
    pub fn position(&self) -> usize {
        match &self.cache {
            Cache::Ring(r) => r.next_pos,
            Cache::Explicit(e) => e.len,
        }
    }

    /// Slots of the KV cache (the model's context on the explicit path).
    pub fn capacity(&self) -> usize {
        match &self.cache {
            Cache::Ring(r) => r.layout.capacity(),
            Cache::Explicit(_) => self.graph.max_positions,
        }
    }

    /// The ring's bookkeeping, which token each slot holds; `None` on the explicit path.
    pub fn ring(&self) -> Option<&RingLayout> {
        match &self.cache {
            Cache::Ring(r) => Some(&r.layout),
            Cache::Explicit(_) => None,
        }
    }

    /// Bytes of key/value storage allocated for this conversation (0 before the first
    /// forward; constant after it on the ring path).
    pub fn cache_bytes(&self) -> usize {
        match &self.cache {
            Cache::Ring(r) => r.layers(&self.graph).map(LayerKv::bytes).sum(),
            Cache::Explicit(e) => e
                .past
                .iter()
                .map(|t| t.len() * t.datum_type().size_of())
                .sum(),
        }
    }

    /// Storage type of the keys and values.
    pub fn kv_type(&self) -> KvType {
        match &self.cache {
            Cache::Ring(r) => r.kv,
            Cache::Explicit(_) => KvType::F32,
        }
    }

    /// Each layer's ring storage, in layer order; `None` before the first forward or on the
    /// explicit path.
    pub fn layer_kv(&self) -> Option<Vec<&LayerKv>> {
        let Cache::Ring(r) = &self.cache else {
            return None;
        };
        let layers: Vec<&LayerKv> = r.layers(&self.graph).collect();
        (layers.len() == r.nodes.len() && !layers.is_empty()).then_some(layers)
    }

    /// The local layers' rings, one per window size (none on the explicit path or for a
    /// model without sliding windows).
    pub fn local_rings(&self) -> &[LocalRing] {
        match &self.cache {
            Cache::Ring(r) => &r.local,
            Cache::Explicit(_) => &[],
        }
    }

    /// Slots of each layer's ring, in layer order (empty on the explicit path).
    pub fn layer_capacities(&self) -> Vec<usize> {
        match &self.cache {
            Cache::Ring(r) => (0..r.nodes.len())
                .map(|i| r.layout_of(i).capacity())
                .collect(),
            Cache::Explicit(_) => Vec::new(),
        }
    }

    /// Replaces the conversation by a saved one: its global ring layout, its local rings'
    /// layouts (in [`State::local_rings`] order), the next RoPE position and each layer's
    /// exported keys and values ([`LayerKv::export`] of its own layout's `len()` slots).
    /// On error the conversation is empty.
    pub fn restore(
        &mut self,
        layout: RingLayout,
        local: Vec<RingLayout>,
        next_pos: usize,
        layers: &[Vec<u8>],
    ) -> Result<()> {
        let Cache::Ring(ring) = &mut self.cache else {
            bail!("this model has no ring KV cache to restore");
        };
        ring.restore(&mut self.graph, layout, local, next_pos, layers)
    }

    /// The cache shifts (evictions, re-positionings) since the last call, oldest first.
    pub fn take_shifts(&mut self) -> Vec<Shift> {
        match &mut self.cache {
            Cache::Ring(r) => std::mem::take(&mut r.shifts),
            Cache::Explicit(_) => Vec::new(),
        }
    }

    /// Forgets the conversation (the ring storage is kept, not reallocated).
    pub fn reset(&mut self) {
        match &mut self.cache {
            Cache::Ring(r) => r.reset(),
            Cache::Explicit(e) => e.reset(),
        }
    }

    /// Feeds `tokens`; returns the logits of all of them or of the last, (n or 1, vocab).
    fn run(&mut self, tokens: &[u32], all: bool) -> Result<Vec<f32>> {
        self.graph.check_tokens(tokens)?;
        match &mut self.cache {
            Cache::Ring(r) => r.run(&mut self.graph, tokens, all),
            Cache::Explicit(e) => e.run(&mut self.graph, tokens, all),
        }
    }
}

impl Graph {
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

    /// The inputs both paths feed: ids, an attention mask of `mask_len` ones, positions from
    /// `first_pos`, the logit rows (every row if `all`, else the last). The cache inputs are
    /// left empty. Returns them and the number of logit rows the run will produce.
    fn inputs(
        &self,
        tokens: &[u32],
        first_pos: usize,
        mask_len: usize,
        all: bool,
    ) -> Result<(Vec<Option<TValue>>, usize)> {
        let n = tokens.len();
        let io = &*self.io;
        let mut inputs: Vec<Option<TValue>> = vec![None; io.inputs];
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        inputs[io.input_ids] = Some(Tensor::from_shape(&[1, n], &ids)?.into()); // (1, n)
        if let Some(ix) = io.attention_mask {
            let mask = vec![1i64; mask_len]; // (1, mask_len)
            inputs[ix] = Some(Tensor::from_shape(&[1, mask_len], &mask)?.into());
        }
        if let Some(ix) = io.position_ids {
            let positions: Vec<i64> = (first_pos..first_pos + n).map(|p| p as i64).collect();
            inputs[ix] = Some(Tensor::from_shape(&[1, n], &positions)?.into()); // (1, n)
        }
        let rows = match io.logit_rows {
            None => n,
            Some(ix) => {
                let rows: Vec<i64> = if all {
                    (0..n as i64).collect()
                } else {
                    vec![n as i64 - 1]
                };
                inputs[ix] = Some(Tensor::from_shape(&[rows.len()], &rows)?.into()); // (rows)
                rows.len()
            }
        };
        Ok((inputs, rows))
    }

    /// Takes the logits output out of a run, checking it is f32 (1, rows, vocab).
    fn take_logits(&self, outputs: &mut [TValue], rows: usize) -> Result<TValue> {
        let (ix, vocab) = (self.io.logits, self.vocab_size);
        let logits = std::mem::replace(&mut outputs[ix], Tensor::zero::<f32>(&[0])?.into());
        ensure!(
            logits.shape() == [1, rows, vocab] && logits.datum_type() == f32::datum_type(),
            "logits have shape {:?} {:?}, not [1, {rows}, {vocab}] f32",
            logits.shape(),
            logits.datum_type()
        );
        Ok(logits)
    }
}

/// The filled inputs, all bound.
fn complete(inputs: Vec<Option<TValue>>) -> Result<TVec<TValue>> {
    inputs
        .into_iter()
        .collect::<Option<TVec<TValue>>>()
        .context("a model input has no binding")
}

/// The logits of every row (1, rows, vocab) if `all`, else of the last row only.
fn last_or_all(logits: &TValue, all: bool, vocab: usize) -> Result<Vec<f32>> {
    let rows = logits.try_as_plain_ram()?.as_slice::<f32>()?;
    let from = if all { 0 } else { rows.len() - vocab };
    Ok(rows[from..].to_vec())
}

/// One ring per distinct window, each of `min(window, ctx)` slots.
fn local_rings(windows: &[Option<usize>], ctx: usize) -> Vec<LocalRing> {
    let mut rings: Vec<LocalRing> = Vec::new();
    for (l, w) in windows.iter().enumerate() {
        let Some(window) = *w else { continue };
        match rings.iter_mut().find(|r| r.window == window) {
            Some(r) => r.layers.push(l),
            None => rings.push(LocalRing {
                window,
                layers: vec![l],
                layout: RingLayout::clamped(window.min(ctx), 0),
            }),
        }
    }
    rings
}

impl Ring {
    /// The layout layer `i` (an index into `nodes`) is kept by.
    fn layout_of(&self, i: usize) -> &RingLayout {
        self.local
            .iter()
            .find(|r| r.layers.contains(&i))
            .map_or(&self.layout, |r| &r.layout)
    }

    fn run(&mut self, g: &mut Graph, tokens: &[u32], all: bool) -> Result<Vec<f32>> {
        self.start(g)?;
        let mut out = Vec::new();
        let chunks: Vec<&[u32]> = tokens.chunks(self.layout.max_chunk()).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            if self.next_pos + chunk.len() > g.max_positions {
                self.reposition(g, chunk.len())?;
            }
            let logits = self.run_chunk(g, chunk, all)?;
            if all || i + 1 == chunks.len() {
                out.extend(last_or_all(&logits, all, g.vocab_size)?);
            }
        }
        Ok(out)
    }

    /// Spawns the plan's state and gives every ring op its storage (once per conversation).
    fn start<'g>(&self, g: &'g mut Graph) -> Result<&'g mut Runner> {
        if g.runner.is_none() {
            let mut runner = g.plan.spawn()?;
            let (kvh, hd) = (g.io.kv_heads, g.io.head_dim);
            for (i, &node) in self.nodes.iter().enumerate() {
                let cap = self.layout_of(i).capacity();
                ring_state_mut(&mut runner, node)?.kv = Some(LayerKv::new(kvh, cap, hd, self.kv));
            }
            g.runner = Some(runner);
        }
        g.runner.as_mut().context("the model state was not started")
    }

    /// Each layer's storage that exists (all of them once started, none before).
    fn layers<'a>(&'a self, g: &'a Graph) -> impl Iterator<Item = &'a LayerKv> + 'a {
        let runner = g.runner.as_ref();
        self.nodes
            .iter()
            .filter_map(move |&node| ring_state(runner?, node)?.kv.as_ref())
    }

    fn reset(&mut self) {
        self.layout.reset();
        for r in &mut self.local {
            r.layout.reset();
        }
        self.next_pos = 0;
        self.shifts.clear();
    }

    fn restore(
        &mut self,
        g: &mut Graph,
        layout: RingLayout,
        local: Vec<RingLayout>,
        next_pos: usize,
        layers: &[Vec<u8>],
    ) -> Result<()> {
        ensure!(
            local.len() == self.local.len(),
            "the saved cache has {} sliding-window rings, this model {}",
            local.len(),
            self.local.len()
        );
        for (saved, r) in local.iter().zip(&self.local) {
            ensure!(
                saved.capacity() == r.layout.capacity() && saved.n_keep() == 0,
                "the saved sliding-window ring has {} slots keeping {}, this one {} keeping 0",
                saved.capacity(),
                saved.n_keep(),
                r.layout.capacity()
            );
            ensure!(
                saved.len() <= layout.len().max(next_pos),
                "the saved sliding-window ring holds {} tokens, more than the conversation",
                saved.len()
            );
        }
        ensure!(
            layout.capacity() == self.layout.capacity() && layout.n_keep() == self.layout.n_keep(),
            "the saved cache has {} slots keeping {}, this one {} keeping {}",
            layout.capacity(),
            layout.n_keep(),
            self.layout.capacity(),
            self.layout.n_keep()
        );
        ensure!(
            layers.len() == self.nodes.len(),
            "{} saved layers, the model has {}",
            layers.len(),
            self.nodes.len()
        );
        ensure!(
            next_pos <= g.max_positions && layout.len() <= next_pos,
            "saved position {next_pos} is inconsistent with {} cached tokens and the model's {} \
             positions",
            layout.len(),
            g.max_positions
        );
        self.reset();
        let used: Vec<usize> = (0..self.nodes.len())
            .map(
                |i| match self.local.iter().position(|r| r.layers.contains(&i)) {
                    Some(r) => local[r].len(),
                    None => layout.len(),
                },
            )
            .collect();
        let runner = self.start(g)?;
        for ((&node, bytes), used) in self.nodes.iter().zip(layers).zip(used) {
            let kv = ring_state_mut(runner, node)?
                .kv
                .as_mut()
                .context("no cache storage")?;
            kv.import(used, bytes)?;
        }
        self.layout = layout;
        for (r, saved) in self.local.iter_mut().zip(local) {
            r.layout = saved;
        }
        self.next_pos = next_pos;
        Ok(())
    }

    /// Re-prefills the kept tokens at positions `0..` so that `incoming` more fit under the
    /// model's trained context; drops the oldest non-sink tokens if they alone would not.
    fn reposition(&mut self, g: &mut Graph, incoming: usize) -> Result<()> {
        let max = g.max_positions;
        let mut kept = self.layout.kept_tokens();
        let limit = (max * 3 / 4).min(max.saturating_sub(incoming));
        let sinks = self.layout.n_keep().min(kept.len());
        let excess = kept.len().saturating_sub(limit).min(kept.len() - sinks);
        kept.drain(sinks..sinks + excess);
        ensure!(
            kept.len() + incoming <= max,
            ForwardError::ContextFull {
                cached: kept.len(),
                new: incoming,
                max
            }
        );
        log::info!(
            "KV cache: positions reached {} of the model's {max}; re-prefilling the {} kept \
             tokens at fresh positions (dropped {excess})",
            self.next_pos,
            kept.len()
        );
        self.shifts.push(Shift {
            dropped: excess,
            kept: kept.len(),
            repositioned: true,
        });
        self.layout.reset();
        for r in &mut self.local {
            r.layout.reset();
        }
        self.next_pos = 0;
        for chunk in kept.chunks(self.layout.max_chunk()) {
            self.run_chunk(g, chunk, false)?;
        }
        Ok(())
    }

    /// Runs one chunk that fits the ring and the position range. Returns logits (1, rows,
    /// vocab): every token's if `all`, else at least the last one's.
    fn run_chunk(&mut self, g: &mut Graph, tokens: &[u32], all: bool) -> Result<TValue> {
        let n = tokens.len();
        let before = self.layout.clone();
        let local_before: Vec<RingLayout> = self.local.iter().map(|r| r.layout.clone()).collect();
        let step = Arc::new(vec![self.layout.place(tokens)?]);
        let mut steps = vec![Arc::clone(&step); self.nodes.len()];
        for r in &mut self.local {
            let each = Arc::new(r.layout.place_each(tokens)?);
            for &i in &r.layers {
                steps[i] = Arc::clone(&each);
            }
        }
        let step = &step[0];
        // The mask is unused once fused; its length only has to agree with itself.
        let (inputs, rows) = g.inputs(tokens, self.next_pos, n, all)?;
        let inputs = complete(inputs)?;
        let runner = g
            .runner
            .as_mut()
            .context("the model state was not started")?;
        for (&node, steps) in self.nodes.iter().zip(steps) {
            ring_state_mut(runner, node)?.steps = Some(steps);
        }
        let mut outputs = match runner.run(inputs) {
            Ok(outputs) => outputs,
            Err(e) => {
                for &node in &self.nodes {
                    if let Ok(state) = ring_state_mut(runner, node) {
                        state.steps = None;
                    }
                }
                runner.reset_turn()?;
                let local_dropped = local_before.iter().any(|b| b.len() + n > b.capacity());
                if step.dropped == 0 && !local_dropped {
                    // Only empty slots were written: the cache is as it was.
                    self.layout.restore(before);
                    for (r, before) in self.local.iter_mut().zip(local_before) {
                        r.layout.restore(before);
                    }
                    return Err(e.context("running the model"));
                }
                self.reset();
                return Err(e.context("running the model (the conversation was reset)"));
            }
        };
        let logits = g.take_logits(&mut outputs, rows)?;
        self.next_pos += n;
        if step.dropped > 0 {
            let shift = Shift {
                dropped: step.dropped,
                kept: self.layout.len(),
                repositioned: false,
            };
            log::info!(
                "KV cache full: dropped the {} oldest tokens after the first {}, keeping {}",
                shift.dropped,
                self.layout.n_keep(),
                shift.kept
            );
            self.shifts.push(shift);
        }
        Ok(logits)
    }
}

impl Explicit {
    fn reset(&mut self) {
        self.past.clear();
        self.len = 0;
    }

    /// Feeds the previous presents back as pasts.
    fn run(&mut self, g: &mut Graph, tokens: &[u32], all: bool) -> Result<Vec<f32>> {
        let n = tokens.len();
        if self.len + n > g.max_positions {
            let (cached, max) = (self.len, g.max_positions);
            return Err(ForwardError::ContextFull {
                cached,
                new: n,
                max,
            }
            .into());
        }
        let (kv_heads, head_dim) = (g.io.kv_heads, g.io.head_dim);
        if self.past.is_empty() {
            // (1, kv_heads, 0, head_dim)
            let empty: TValue = Tensor::zero::<f32>(&[1, kv_heads, 0, head_dim])?.into();
            self.past = vec![empty; 2 * self.inputs.len()];
        }
        let (mut inputs, rows) = g.inputs(tokens, self.len, self.len + n, all)?;
        for (layer, &(k, v)) in self.inputs.iter().enumerate() {
            inputs[k] = Some(self.past[2 * layer].clone());
            inputs[v] = Some(self.past[2 * layer + 1].clone());
        }
        let inputs = complete(inputs)?;
        let runner = match &mut g.runner {
            Some(runner) => runner,
            slot => slot.insert(g.plan.spawn()?),
        };
        let mut outputs = match runner.run(inputs) {
            Ok(outputs) => outputs,
            Err(e) => {
                // A failed turn leaves symbol bindings behind in tract's state; start afresh.
                g.runner = None;
                return Err(e.context("running the model"));
            }
        };
        let expected = [1, kv_heads, self.len + n, head_dim];
        let mut present = Vec::with_capacity(self.past.len());
        for &(k, v) in &self.outputs {
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
        let logits = g.take_logits(&mut outputs, rows)?;
        self.past = present;
        self.len += n;
        last_or_all(&logits, all, g.vocab_size)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<State>();
    }
}
