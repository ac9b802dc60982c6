//! Attention over the ring-buffer KV cache, as a tract op, and the rewrite that puts it in
//! place of the graph's own `past_key_values` → `Concat` → attention → `present` subgraph.
//!
//! [`RingAttention`] takes `(q, k_new, v_new)` of one layer, writes the new keys and values in
//! place at the slots [`crate::kv_cache::RingLayout`] assigned them, and attends every query
//! over the valid, causally visible slots (grouped-query heads share their key/value head).
//! The slots, stamps and storage live in the op's per-conversation state, which
//! [`crate::model::State`] reaches through the plan's op states: nothing is concatenated,
//! nothing proportional to the context is copied.
//!
//! [`fuse`] recognises the Optimum / our converter layout on the typed (not yet decluttered)
//! graph: per layer a `Concat(past, new)` on the key and on the value, view ops (unsqueeze,
//! broadcast for grouped heads, reshape, transpose, scalar scaling) up to `EinSum(q, k)`, an
//! additive or `Where` mask, `Softmax` over the keys (with Optimum's `IsNaN` guard), and
//! `EinSum(p, v)`. Whatever does not match leaves the graph untouched.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::TypedConcat;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::nn::Softmax;

use crate::kv_cache::{Elem, HeadRows, LayerKv, Step};
use crate::quant::pool::ThreadPool;

use kernels::Isa;

mod kernels;

/// One layer's attention over its ring; inputs `q` (1, heads…, s, head_dim) with the heads in
/// key/value-head-major order, `k_new` and `v_new` (1, kv_heads, s, head_dim); output like `q`.
#[derive(Clone, Debug, PartialEq)]
pub struct RingAttention {
    /// Decoder layer, for the state's owner to find its storage.
    pub layer: usize,
    /// Multiplies `q·k` before the softmax.
    pub scale: f32,
}

impl Eq for RingAttention {}

impl Op for RingAttention {
    fn name(&self) -> StaticName {
        "RingAttention".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("layer={} scale={}", self.layer, self.scale)])
    }

    op_as_typed_op!();
}

impl EvalOp for RingAttention {
    not_out_of_plan!();

    fn state(&self, _ctx: &EvalContext) -> TractResult<Option<Box<dyn OpState>>> {
        Ok(Some(Box::new(RingState {
            layer: self.layer,
            kv: None,
            step: None,
            pool: None,
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
    /// Where this run's tokens go; set by the owner before every run, consumed by it.
    pub step: Option<Arc<Step>>,
    /// The int8 kernels' threads, which decode attention borrows (none: one thread).
    pub pool: Option<Arc<ThreadPool>>,
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
        let scale = op
            .downcast_ref::<RingAttention>()
            .context("RingState driven by another op")?
            .scale;
        let (q, k_new, v_new) = args_3!(inputs);
        let step = self
            .step
            .take()
            .with_context(|| format!("layer {}: no cache step was set", self.layer))?;
        let kv = self
            .kv
            .as_mut()
            .with_context(|| format!("layer {}: no cache storage", self.layer))?;
        let out = attend(
            kv,
            &step,
            scale,
            &q,
            &k_new,
            &v_new,
            &mut self.scratch,
            self.pool.as_deref(),
            self.layer,
        )?;
        Ok(tvec!(out.into_tvalue()))
    }

    fn reset_lanes(&mut self, _lanes: &[LaneId]) -> TractResult<()> {
        bail!("RingAttention has one conversation per state, no lanes")
    }
}

/// Writes `k_new`/`v_new` at `step.slots` and attends `q` over the ring; returns q's shape.
/// Decode (one new token) may split its work over `pool`; the result has the same bits
/// whatever the pool's size.
#[allow(clippy::too_many_arguments)]
fn attend(
    kv: &mut LayerKv,
    step: &Step,
    scale: f32,
    q: &Tensor,
    k_new: &Tensor,
    v_new: &Tensor,
    scratch: &mut Scratch,
    pool: Option<&ThreadPool>,
    layer: usize,
) -> Result<Tensor> {
    let (kvh, hd) = (kv.kv_heads(), kv.head_dim());
    let s = step.slots.len();
    let kv_shape = [1, kvh, s, hd];
    ensure!(
        k_new.shape() == kv_shape && v_new.shape() == kv_shape,
        "layer {layer}: new keys {:?} / values {:?}, expected {kv_shape:?}",
        k_new.shape(),
        v_new.shape()
    );
    let q_shape = q.shape();
    ensure!(
        q_shape.len() >= 3 && q_shape[q_shape.len() - 2..] == [s, hd],
        "layer {layer}: queries {q_shape:?} do not end in [{s}, {hd}]"
    );
    let q = q.try_as_plain_ram()?.as_slice::<f32>()?; // (heads, s, head_dim)
    let k_new = k_new.try_as_plain_ram()?.as_slice::<f32>()?; // (kv_heads, s, head_dim)
    let v_new = v_new.try_as_plain_ram()?.as_slice::<f32>()?; // (kv_heads, s, head_dim)
    let heads = q.len() / (s * hd);
    ensure!(
        heads > 0 && heads.is_multiple_of(kvh),
        "layer {layer}: {heads} query heads for {kvh} key/value heads"
    );
    let group = heads / kvh;

    for h in 0..kvh {
        for (i, &slot) in step.slots.iter().enumerate() {
            let at = (h * s + i) * hd;
            kv.write(h, slot, &k_new[at..at + hd], &v_new[at..at + hd]);
        }
    }

    let used = step.used;
    let isa = Isa::detect();
    let mut out = vec![0f32; q.len()]; // (heads, s, head_dim)
    let kv = &*kv;
    if s == 1 {
        // Decode: every head at once, over the pool when the history is long enough.
        let pool = pool.filter(|_| used >= PARALLEL_DECODE_SLOTS);
        decode_attention(isa, kv, step, scale, q, &mut out, scratch, pool);
        return Tensor::from_shape(q_shape, &out);
    }
    // One unit: the `group` query heads of key/value head h at query position i.
    let unit = |h: usize, i: usize, o: &mut [f32], scratch: &mut Scratch| match kv.head(h) {
        HeadRows::F32(k, v) => group_attention(isa, k, v, q, h, i, o, step, scale, scratch),
        HeadRows::F16(k, v) => group_attention(isa, k, v, q, h, i, o, step, scale, scratch),
    };
    let units = kvh * s;
    if s * used >= PARALLEL_WORK {
        // Units are independent; the matrix threads are idle while attention runs.
        let results: Vec<Vec<f32>> = (0..units)
            .into_par_iter()
            .map_init(Scratch::default, |scratch, u| {
                let mut o = vec![0f32; group * hd]; // (group, head_dim)
                unit(u / s, u % s, &mut o, scratch);
                o
            })
            .collect();
        for (u, o) in results.iter().enumerate() {
            scatter(&mut out, o, u / s, u % s, group, s, hd);
        }
    } else {
        let mut o = vec![0f32; group * hd]; // (group, head_dim)
        for u in 0..units {
            o.fill(0.0);
            unit(u / s, u % s, &mut o, scratch);
            scatter(&mut out, &o, u / s, u % s, group, s, hd);
        }
    }
    Tensor::from_shape(q_shape, &out)
}

/// Per-thread buffers of the attention code; kept in the op state between runs.
#[derive(Default)]
pub struct Scratch {
    /// Scores, then probabilities; block-major, (rows, slot) within a block.
    scores: Vec<f32>,
    /// Softmax statistics per block and query row.
    stats: Vec<BlockStat>,
    /// Per block and query row, what its exponentiated scores are multiplied by.
    factors: Vec<f32>,
    /// The group's queries; (group, head_dim).
    queries: Vec<f32>,
    /// Decode: per column part, its outputs (heads, head_dim), only its columns written.
    parts: Vec<Mutex<Vec<f32>>>,
}

impl fmt::Debug for Scratch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scratch({} scores)", self.scores.capacity())
    }
}

impl Clone for Scratch {
    fn clone(&self) -> Self {
        Scratch::default()
    }
}

/// Copies a unit's outputs `o` (group, head_dim) into `out` (heads, s, head_dim).
fn scatter(out: &mut [f32], o: &[f32], h: usize, i: usize, group: usize, s: usize, hd: usize) {
    for (g, og) in o.chunks_exact(hd).enumerate() {
        let at = ((h * group + g) * s + i) * hd;
        out[at..at + hd].copy_from_slice(og);
    }
}

/// Slots per block of the softmax. The arithmetic, shared by prefill and decode: each block
/// of slots gets its own maximum and sum of exponentials ([`block_softmax`]); the blocks are
/// then weighted by `exp(block max - max)` ([`normalize_blocks`]); the value rows are summed in
/// slot order. A parallel decode splits whole blocks, then columns, so its result has the
/// same bits as the serial one; with at most one block this is the plain softmax.
const BLOCK: usize = 64;

/// The softmax statistics of one query row over one block of slots.
#[derive(Clone, Copy, Debug, Default)]
struct BlockStat {
    /// Largest visible scaled score, -inf if no slot of the block is visible.
    max: f32,
    /// Sum of `exp(score - max)` over the visible slots, in slot order.
    sum: f32,
}

/// Slots `lo..hi` of block `b` of `used` slots.
fn block_range(b: usize, used: usize) -> Range<usize> {
    b * BLOCK..((b + 1) * BLOCK).min(used)
}

/// Turns raw scores `q·k` (rows, n) of one block into `exp(scale·q·k - max)` per row, 0 for
/// slots the query may not see (stamp newer than `me`), and records each row's statistics.
fn block_softmax(scores: &mut [f32], stamps: &[u64], me: u64, scale: f32, stats: &mut [BlockStat]) {
    let n = stamps.len();
    for (row, stat) in scores.chunks_exact_mut(n).zip(stats) {
        let mut max = f32::NEG_INFINITY;
        for (score, &stamp) in row.iter_mut().zip(stamps) {
            *score = if stamp <= me {
                let x = *score * scale;
                max = max.max(x);
                x
            } else {
                f32::NEG_INFINITY
            };
        }
        let mut sum = 0f32;
        if max == f32::NEG_INFINITY {
            row.fill(0.0);
        } else {
            for score in row.iter_mut() {
                *score = (*score - max).exp();
                sum += *score;
            }
        }
        *stat = BlockStat { max, sum };
    }
}

/// Turns the exponentials in `scores` (block-major, (rows, slot) within a block, of `used`
/// slots) into probabilities: block b of row r is multiplied by
/// `exp(max_b - max) / sum over b of exp(max_b - max)·sum_b`, from `stats` (block, row).
/// `factors` is scratch.
fn normalize_blocks(
    scores: &mut [f32],
    stats: &[BlockStat],
    rows: usize,
    used: usize,
    factors: &mut Vec<f32>,
) {
    let blocks = used.div_ceil(BLOCK);
    factors.clear();
    factors.resize(blocks * rows, 0.0);
    for row in 0..rows {
        let row_stats = || (0..blocks).map(|b| stats[b * rows + row]);
        let max = row_stats().fold(f32::NEG_INFINITY, |m, s| m.max(s.max));
        let weight = |s: BlockStat| {
            if s.max == f32::NEG_INFINITY {
                0.0
            } else {
                (s.max - max).exp()
            }
        };
        let mut total = 0f32;
        for s in row_stats() {
            total += weight(s) * s.sum;
        }
        let inv = 1.0 / total;
        for (b, s) in row_stats().enumerate() {
            factors[b * rows + row] = weight(s) * inv;
        }
    }
    for b in 0..blocks {
        let r = block_range(b, used);
        let block = &mut scores[rows * r.start..rows * r.end];
        let n = r.len();
        for (p, &f) in block.chunks_exact_mut(n).zip(&factors[b * rows..][..rows]) {
            for p in p {
                *p *= f;
            }
        }
    }
}

/// The query heads of key/value head `h` at query position `i` (q (heads, s, head_dim)) over
/// `keys`/`values` (slot, head_dim) into `o` (group, head_dim), which starts at zero. Each key
/// and value row is read once for the whole group.
#[allow(clippy::too_many_arguments)]
fn group_attention<E: Elem + 'static>(
    isa: Isa,
    keys: &[E],
    values: &[E],
    q: &[f32],
    h: usize,
    i: usize,
    o: &mut [f32],
    step: &Step,
    scale: f32,
    scratch: &mut Scratch,
) {
    let (used, s) = (step.used, step.slots.len());
    let hd = keys.len() / step.stamps.len();
    let group = o.len() / hd;
    let me = step.new_stamps[i];
    let blocks = used.div_ceil(BLOCK);
    let Scratch {
        scores,
        stats,
        factors,
        queries,
        ..
    } = scratch;
    queries.clear();
    for g in 0..group {
        let at = ((h * group + g) * s + i) * hd;
        queries.extend_from_slice(&q[at..at + hd]);
    }
    scores.clear();
    scores.resize(group * used, 0.0);
    stats.clear();
    stats.resize(blocks * group, BlockStat::default());
    for b in 0..blocks {
        let r = block_range(b, used);
        let block = &mut scores[group * r.start..group * r.end]; // (group, slot)
        kernels::group_dots(isa, queries, &keys[r.start * hd..r.end * hd], hd, block);
        let stamps = &step.stamps[r.clone()];
        block_softmax(block, stamps, me, scale, &mut stats[b * group..][..group]);
    }
    normalize_blocks(scores, stats, group, used, factors);
    for b in 0..blocks {
        let r = block_range(b, used);
        let block = &scores[group * r.start..group * r.end];
        let values = &values[r.start * hd..r.end * hd];
        kernels::group_axpys(isa, block, values, hd, 0..hd, o);
    }
}

/// One new token's attention for every head, q (heads, 1, head_dim) into `out` (same shape),
/// with [`group_attention`]'s arithmetic. With a pool: the scores by whole blocks of slots,
/// then the weighted value sums by columns, each part on its own thread.
#[allow(clippy::too_many_arguments)]
fn decode_attention(
    isa: Isa,
    kv: &LayerKv,
    step: &Step,
    scale: f32,
    q: &[f32],
    out: &mut [f32],
    scratch: &mut Scratch,
    pool: Option<&ThreadPool>,
) {
    let (kvh, hd, used) = (kv.kv_heads(), kv.head_dim(), step.used);
    let rows = q.len() / hd; // query heads
    let group = rows / kvh;
    let me = step.new_stamps[0];
    let blocks = used.div_ceil(BLOCK);
    let threads = pool.map_or(1, |p| p.threads());

    // Scores: block-major, (kv head, group, slot) within a block; a part owns whole blocks.
    let Scratch {
        scores,
        stats,
        factors,
        parts,
        ..
    } = scratch;
    scores.clear();
    scores.resize(rows * used, 0.0);
    stats.clear();
    stats.resize(blocks * rows, BlockStat::default());
    let score_parts = threads.min(blocks).max(1);
    let mut cells = Vec::with_capacity(score_parts);
    {
        let (mut sc, mut st) = (&mut scores[..], &mut stats[..]);
        for p in 0..score_parts {
            let (b0, b1) = (p * blocks / score_parts, (p + 1) * blocks / score_parts);
            let slots = block_range(b0, used).start..block_range(b1.max(1) - 1, used).end;
            let slots = if b0 == b1 { 0..0 } else { slots };
            let (mine, rest) = std::mem::take(&mut sc).split_at_mut(rows * slots.len());
            let (mine_st, rest_st) = std::mem::take(&mut st).split_at_mut(rows * (b1 - b0));
            sc = rest;
            st = rest_st;
            cells.push(Mutex::new((b0..b1, mine, mine_st)));
        }
    }
    let score_blocks = |p: usize| {
        let mut cell = cells[p].lock().unwrap_or_else(PoisonError::into_inner);
        let (blocks, sc, st) = &mut *cell;
        let (mut at, first) = (0, block_range(blocks.start, used).start);
        for (bi, b) in blocks.clone().enumerate() {
            let r = block_range(b, used);
            debug_assert_eq!(at, rows * (r.start - first));
            for h in 0..kvh {
                let block = &mut sc[at..at + group * r.len()]; // (group, slot)
                let qs = &q[h * group * hd..(h + 1) * group * hd];
                match kv.head(h) {
                    HeadRows::F32(k, _) => {
                        kernels::group_dots(isa, qs, &k[r.start * hd..r.end * hd], hd, block)
                    }
                    HeadRows::F16(k, _) => {
                        kernels::group_dots(isa, qs, &k[r.start * hd..r.end * hd], hd, block)
                    }
                }
                let stat = &mut st[(bi * kvh + h) * group..][..group];
                block_softmax(block, &step.stamps[r.clone()], me, scale, stat);
                at += group * r.len();
            }
        }
    };
    match pool {
        Some(pool) if score_parts > 1 => pool.run(score_parts, score_blocks),
        _ => (0..score_parts).for_each(score_blocks),
    }
    drop(cells);

    // Normalize (cheap, on this thread), then sum the value rows by column parts.
    normalize_blocks(scores, stats, rows, used, factors);
    let scores = &scores[..];
    let col_parts = if pool.is_some() {
        threads.min(hd / 8).max(1)
    } else {
        1
    };
    let width = hd.div_ceil(col_parts).next_multiple_of(8);
    parts.resize_with(col_parts, Mutex::default);
    let sum_values = |p: usize| {
        let cols = (p * width).min(hd)..((p + 1) * width).min(hd);
        let mut o = parts[p].lock().unwrap_or_else(PoisonError::into_inner);
        o.clear();
        o.resize(rows * hd, 0.0);
        for h in 0..kvh {
            let oh = &mut o[h * group * hd..(h + 1) * group * hd];
            for b in 0..blocks {
                let r = block_range(b, used);
                let probs = &scores[rows * r.start + h * group * r.len()..][..group * r.len()];
                let cols = cols.clone();
                match kv.head(h) {
                    HeadRows::F32(_, v) => {
                        let v = &v[r.start * hd..r.end * hd];
                        kernels::group_axpys(isa, probs, v, hd, cols, oh)
                    }
                    HeadRows::F16(_, v) => {
                        let v = &v[r.start * hd..r.end * hd];
                        kernels::group_axpys(isa, probs, v, hd, cols, oh)
                    }
                }
            }
        }
    };
    match pool {
        Some(pool) if col_parts > 1 => pool.run(col_parts, sum_values),
        _ => (0..col_parts).for_each(sum_values),
    }
    for (p, part) in parts.iter().enumerate().take(col_parts) {
        let cols = (p * width).min(hd)..((p + 1) * width).min(hd);
        let o = part.lock().unwrap_or_else(PoisonError::into_inner);
        for (dst, src) in out.chunks_exact_mut(hd).zip(o.chunks_exact(hd)) {
            dst[cols.clone()].copy_from_slice(&src[cols.clone()]);
        }
    }
}

/// Query×slot pairs per head above which prefill units run on rayon's pool.
const PARALLEL_WORK: usize = 16 * 1024;

/// History length from which one token's attention is split over the kernel threads: below
/// it, waking them costs more than the work saved.
const PARALLEL_DECODE_SLOTS: usize = 256;

/// What [`fuse`] changed: the graph inputs and outputs it removed, by index (ascending).
#[derive(Debug, Default)]
pub struct Fused {
    /// Indices into the model's inputs before the rewrite.
    pub removed_inputs: Vec<usize>,
    /// Indices into the model's outputs before the rewrite.
    pub removed_outputs: Vec<usize>,
}

/// One layer's match.
struct Site {
    layer: usize,
    past: [OutletId; 2],
    concat: [OutletId; 2],
    new: [OutletId; 2],
    q: OutletId,
    attn_out: OutletId,
    scale: f32,
}

/// Replaces each layer's cache concatenation and attention by a [`RingAttention`]; `None`
/// (graph untouched) when some layer does not have the expected shape.
pub fn fuse(model: &mut TypedModel, layers: usize) -> Result<Option<Fused>> {
    let mut sites = Vec::with_capacity(layers);
    for layer in 0..layers {
        match find_site(model, layer)? {
            Ok(site) => sites.push(site),
            Err(why) => {
                log::info!("layer {layer}: {why}");
                return Ok(None);
            }
        }
    }
    let mut fused = Fused::default();
    for site in &sites {
        for (&past, &concat) in site.past.iter().zip(&site.concat) {
            let i = model
                .inputs
                .iter()
                .position(|&o| o == past)
                .context("cache input vanished")?;
            fused.removed_inputs.push(i);
            if let Some(o) = model.outputs.iter().position(|&o| o == concat) {
                fused.removed_outputs.push(o);
            }
        }
    }
    for site in &sites {
        let mut patch = TypedModelPatch::default();
        let q = patch.tap_model(model, site.q)?;
        let k = patch.tap_model(model, site.new[0])?;
        let v = patch.tap_model(model, site.new[1])?;
        let op = RingAttention {
            layer: site.layer,
            scale: site.scale,
        };
        let out = patch.wire_node(format!("ring_attention.{}", site.layer), op, &[q, k, v])?;
        patch.shunt_outside(model, site.attn_out, out[0])?;
        patch.apply(model)?;
    }
    fused.removed_inputs.sort_unstable();
    fused.removed_outputs.sort_unstable();
    for &i in fused.removed_inputs.iter().rev() {
        model.inputs.remove(i);
    }
    for &o in fused.removed_outputs.iter().rev() {
        model.outputs.remove(o);
    }
    model.compact()?;
    Ok(Some(fused))
}

/// The layer's attention subgraph, or why it does not match.
fn find_site(model: &TypedModel, layer: usize) -> Result<std::result::Result<Site, String>> {
    macro_rules! need {
        ($cond:expr, $($why:tt)*) => {
            if !$cond {
                return Ok(Err(format!($($why)*)));
            }
        };
    }
    let mut past = [OutletId::new(0, 0); 2];
    let mut concat = [OutletId::new(0, 0); 2];
    let mut new = [OutletId::new(0, 0); 2];
    for (i, kind) in ["key", "value"].iter().enumerate() {
        let name = format!("past_key_values.{layer}.{kind}");
        let source = model
            .inputs
            .iter()
            .copied()
            .find(|o| model.node(o.node).name == name);
        need!(source.is_some(), "no input {name}");
        let source = source.context("checked")?;
        let succ = model.outlet_successors(source);
        need!(succ.len() == 1, "{name} feeds {} nodes", succ.len());
        let node = model.node(succ[0].node);
        need!(
            node.op_is::<TypedConcat>() && node.inputs.len() == 2 && succ[0].slot == 0,
            "{name} does not feed a Concat as its first input"
        );
        past[i] = source;
        concat[i] = node.id.into();
        new[i] = node.inputs[1];
        let fact = model.outlet_fact(new[i])?;
        need!(
            fact.rank() == 4 && fact.shape[0].as_i64() == Some(1),
            "new {kind}s of layer {layer} are {fact:?}, expected (1, kv_heads, s, head_dim)"
        );
    }

    let Some((qk, k_slot, k_scale)) = follow_views(model, concat[0])? else {
        return Ok(Err(format!("layer {layer}: keys do not reach an EinSum")));
    };
    let qk_node = model.node(qk);
    need!(
        qk_node.inputs.len() == 2,
        "QK EinSum has {} inputs",
        qk_node.inputs.len()
    );
    let q = qk_node.inputs[1 - k_slot];
    let k_fact = model.outlet_fact(new[0])?;
    let q_fact = model.outlet_fact(q)?;
    let scores_fact = &model.node(qk).outputs[0].fact;
    let (s, hd) = (&k_fact.shape[2], &k_fact.shape[3]);
    let total = &model.outlet_fact(concat[0])?.shape[2];
    let qr = q_fact.rank();
    let sr = scores_fact.rank();
    need!(
        qr >= 3 && &q_fact.shape[qr - 2] == s && &q_fact.shape[qr - 1] == hd,
        "layer {layer}: queries {q_fact:?} do not end in (s, head_dim)"
    );
    need!(
        sr == qr && &scores_fact.shape[sr - 2] == s && &scores_fact.shape[sr - 1] == total,
        "layer {layer}: scores {scores_fact:?} are not (…, s, past + s)"
    );

    // Scores → (scale, mask) → Softmax over the keys → PV EinSum.
    let mut scale = k_scale;
    let mut cur: OutletId = qk.into();
    let softmax = loop {
        let succ = model.outlet_successors(cur);
        need!(
            succ.len() == 1,
            "layer {layer}: scores feed {} nodes",
            succ.len()
        );
        let node = model.node(succ[0].node);
        if let Some(sm) = node.op_as::<Softmax>() {
            need!(
                sm.axes.as_slice() == [sr - 1],
                "layer {layer}: softmax is not over the keys"
            );
            break node.id;
        }
        if let Some(k) = scalar_factor(model, node, succ[0].slot)? {
            scale *= k;
        } else {
            let name = node.op.name();
            let masking =
                (name == "Add" && node.inputs.len() == 2) || (name == "Iff" && succ[0].slot >= 1);
            need!(masking, "layer {layer}: unexpected {name} on the scores");
        }
        cur = node.id.into();
    };
    let mut probs: OutletId = softmax.into();
    let succ = model.outlet_successors(probs);
    if succ.len() == 2 {
        // Optimum's guard: Where(IsNaN(p), 0, p).
        let names: Vec<_> = succ.iter().map(|i| model.node(i.node).op.name()).collect();
        let iff = succ.iter().find(|i| model.node(i.node).op.name() == "Iff");
        need!(
            names.iter().any(|n| n == "IsNan") && iff.is_some_and(|i| i.slot == 2),
            "layer {layer}: softmax output feeds {names:?}"
        );
        probs = iff.context("checked")?.node.into();
    }
    let Some((pv, p_slot, p_scale)) = follow_views(model, probs)? else {
        return Ok(Err(format!(
            "layer {layer}: probabilities do not reach an EinSum"
        )));
    };
    need!(p_scale == 1.0, "layer {layer}: scaled probabilities");
    let Some((pv_v, v_slot, v_scale)) = follow_views(model, concat[1])? else {
        return Ok(Err(format!("layer {layer}: values do not reach an EinSum")));
    };
    need!(
        pv_v == pv && v_slot != p_slot && v_scale == 1.0,
        "layer {layer}: values and probabilities meet in different EinSums"
    );
    let attn_out: OutletId = pv.into();
    let out_fact = model.outlet_fact(attn_out)?;
    need!(
        out_fact.shape == q_fact.shape,
        "layer {layer}: attention output {out_fact:?} differs from the queries {q_fact:?}"
    );
    Ok(Ok(Site {
        layer,
        past,
        concat,
        new,
        q,
        attn_out,
        scale,
    }))
}

/// From `outlet`, follows single-consumer view ops (axis ops, broadcasts, scalar factors) to
/// an `EinSum`: returns (its node, the input slot reached, the product of the factors).
fn follow_views(model: &TypedModel, outlet: OutletId) -> Result<Option<(usize, usize, f32)>> {
    let mut cur = outlet;
    let mut scale = 1f32;
    loop {
        let succ = model.outlet_successors(cur);
        if succ.len() != 1 {
            return Ok(None);
        }
        let node = model.node(succ[0].node);
        let name = node.op.name();
        if name == "EinSum" {
            return Ok(Some((node.id, succ[0].slot, scale)));
        }
        let view = node.op_is::<AxisOp>() || name == "MultiBroadcastTo";
        if !view {
            match scalar_factor(model, node, succ[0].slot)? {
                Some(k) => scale *= k,
                None => return Ok(None),
            }
        }
        cur = node.id.into();
    }
}

/// `k` when `node` computes `x * k` or `x / (1/k)` of its input `slot` with a uniform constant.
fn scalar_factor(model: &TypedModel, node: &TypedNode, slot: usize) -> Result<Option<f32>> {
    let Some(bin) = node.op_as::<TypedBinOp>() else {
        return Ok(None);
    };
    let name = bin.0.name();
    if node.inputs.len() != 2 || !(name == "Mul" || (name == "Div" && slot == 0)) {
        return Ok(None);
    }
    let Some(k) = model.outlet_fact(node.inputs[1 - slot])?.konst.clone() else {
        return Ok(None);
    };
    if k.datum_type() != f32::datum_type() {
        return Ok(None);
    }
    let values = k.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    let Some(&first) = values.first() else {
        return Ok(None);
    };
    if values.iter().any(|&v| v != first) {
        return Ok(None);
    }
    Ok(Some(if name == "Mul" { first } else { 1.0 / first }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::{KvType, RingLayout};

    /// Plain causal attention over keys/values given in conversation order.
    fn reference(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f32) -> Vec<f32> {
        let scores: Vec<f32> = keys.iter().map(|k| kernels::dot(q, k) * scale).collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f32 = e.iter().sum();
        let mut out = vec![0f32; q.len()];
        for (p, v) in e.iter().zip(values) {
            for (o, x) in out.iter_mut().zip(v) {
                *o += p / sum * x;
            }
        }
        out
    }

    fn vector(seed: usize, hd: usize) -> Vec<f32> {
        (0..hd)
            .map(|i| ((seed * 31 + i * 7) % 13) as f32 / 13.0 - 0.5)
            .collect()
    }

    /// A wrapped ring with sinks gives the same output as attending over exactly the kept
    /// tokens in order; grouped heads read their key/value head.
    #[test]
    fn wrapped_ring_attends_over_sinks_and_window() {
        let (kvh, heads, hd, cap, keep) = (2, 4, 8, 5, 2);
        let mut ring = RingLayout::new(cap, keep).unwrap();
        let mut kv = LayerKv::new(kvh, cap, hd, KvType::F32);
        let mut scratch = Scratch::default();
        let mut history: Vec<usize> = vec![]; // token index per position
        let kv_of = |t: usize, h: usize, which: usize| vector(t * 4 + h * 2 + which, hd);
        for t in 0..12 {
            let step = ring.place(&[t as u32]).unwrap();
            history.push(t);
            let k_new: Vec<f32> = (0..kvh).flat_map(|h| kv_of(t, h, 0)).collect();
            let v_new: Vec<f32> = (0..kvh).flat_map(|h| kv_of(t, h, 1)).collect();
            let q: Vec<f32> = (0..heads)
                .flat_map(|h| vector(100 + t * 5 + h, hd))
                .collect();
            let out = attend(
                &mut kv,
                &step,
                0.3,
                &Tensor::from_shape(&[1, heads, 1, hd], &q).unwrap(),
                &Tensor::from_shape(&[1, kvh, 1, hd], &k_new).unwrap(),
                &Tensor::from_shape(&[1, kvh, 1, hd], &v_new).unwrap(),
                &mut scratch,
                None,
                0,
            )
            .unwrap();
            let out = out
                .try_as_plain_ram()
                .unwrap()
                .as_slice::<f32>()
                .unwrap()
                .to_vec();
            let kept: Vec<usize> = ring.kept_tokens().iter().map(|&t| t as usize).collect();
            let want_kept: Vec<usize> = if t < cap {
                (0..=t).collect()
            } else {
                (0..keep).chain(t + 1 + keep - cap..=t).collect()
            };
            assert_eq!(kept, want_kept, "step {t}");
            for head in 0..heads {
                let h = head / (heads / kvh);
                let keys: Vec<_> = kept.iter().map(|&k| kv_of(k, h, 0)).collect();
                let values: Vec<_> = kept.iter().map(|&k| kv_of(k, h, 1)).collect();
                let want = reference(&q[head * hd..(head + 1) * hd], &keys, &values, 0.3);
                let got = &out[head * hd..(head + 1) * hd];
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() < 1e-6,
                        "step {t} head {head}: {got:?} vs {want:?}"
                    );
                }
            }
        }
    }

    /// A chunk of new tokens is causal: token i sees the cache and new tokens 0..=i.
    #[test]
    fn prefill_chunk_is_causal() {
        let (hd, cap) = (4, 8);
        let mut ring = RingLayout::new(cap, 1).unwrap();
        let mut kv = LayerKv::new(1, cap, hd, KvType::F32);
        let keys: Vec<Vec<f32>> = (0..5).map(|t| vector(t, hd)).collect();
        let values: Vec<Vec<f32>> = (0..5).map(|t| vector(50 + t, hd)).collect();
        let qs: Vec<Vec<f32>> = (0..5).map(|t| vector(90 + t, hd)).collect();
        let mut scratch = Scratch::default();
        let mut run = |ring: &mut RingLayout, kv: &mut LayerKv, range: std::ops::Range<usize>| {
            let ids: Vec<u32> = range.clone().map(|t| t as u32).collect();
            let step = ring.place(&ids).unwrap();
            let n = range.len();
            let flat = |v: &[Vec<f32>]| v[range.clone()].concat();
            let out = attend(
                kv,
                &step,
                0.5,
                &Tensor::from_shape(&[1, 1, n, hd], &flat(&qs)).unwrap(),
                &Tensor::from_shape(&[1, 1, n, hd], &flat(&keys)).unwrap(),
                &Tensor::from_shape(&[1, 1, n, hd], &flat(&values)).unwrap(),
                &mut scratch,
                None,
                0,
            )
            .unwrap();
            out.try_as_plain_ram()
                .unwrap()
                .as_slice::<f32>()
                .unwrap()
                .to_vec()
        };
        let first = run(&mut ring, &mut kv, 0..2);
        let rest = run(&mut ring, &mut kv, 2..5);
        let got = [first, rest].concat();
        for t in 0..5 {
            let want = reference(&qs[t], &keys[..=t], &values[..=t], 0.5);
            for (g, w) in got[t * hd..(t + 1) * hd].iter().zip(&want) {
                assert!((g - w).abs() < 1e-6, "token {t}");
            }
        }
    }

    /// Decode over a long history: the same bits with any number of threads (whole blocks,
    /// then columns, per part) as the per-head prefill path, close to the plain reference;
    /// empty slots, including a whole empty block, are skipped. f32 and f16 storage.
    #[test]
    fn decode_split_over_threads_has_the_bits_of_one_thread() {
        use crate::kv_cache::EMPTY;
        let (kvh, group, hd, cap, used) = (3, 3, 64, 400, 333);
        let heads = kvh * group;
        let empty = |j: usize| j == 70 || (128..192).contains(&j);
        for ty in [KvType::F32, KvType::F16] {
            let mut kv = LayerKv::new(kvh, cap, hd, ty);
            for h in 0..kvh {
                for j in 0..used {
                    let (k, v) = (vector(j * 3 + h, hd), vector(7000 + j * 5 + h, hd));
                    let k: Vec<f32> = k.iter().map(|x| x * (1.0 + (j % 17) as f32)).collect();
                    kv.write(h, j, &k, &v);
                }
            }
            let stamps: Vec<u64> = (0..cap)
                .map(|j| {
                    if j < used && !empty(j) {
                        j as u64
                    } else {
                        EMPTY
                    }
                })
                .collect();
            let step = Step {
                slots: vec![used - 1],
                new_stamps: vec![(used - 1) as u64],
                stamps,
                used,
                dropped: 0,
            };
            let q: Vec<f32> = (0..heads).flat_map(|h| vector(900 + h, hd)).collect();
            let isa = Isa::detect();
            let run = |pool: Option<&ThreadPool>| {
                let mut out = vec![0f32; heads * hd];
                decode_attention(
                    isa,
                    &kv,
                    &step,
                    0.125,
                    &q,
                    &mut out,
                    &mut Scratch::default(),
                    pool,
                );
                out.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
            };
            let serial = run(None);
            for threads in 1..=3 {
                let pool = ThreadPool::new(threads).unwrap();
                assert_eq!(run(Some(&pool)), serial, "{ty:?} {threads} threads");
            }
            let mut per_head = vec![0f32; heads * hd];
            let mut scratch = Scratch::default();
            for h in 0..kvh {
                let o = &mut per_head[h * group * hd..(h + 1) * group * hd];
                match kv.head(h) {
                    HeadRows::F32(k, v) => {
                        group_attention(isa, k, v, &q, h, 0, o, &step, 0.125, &mut scratch)
                    }
                    HeadRows::F16(k, v) => {
                        group_attention(isa, k, v, &q, h, 0, o, &step, 0.125, &mut scratch)
                    }
                }
            }
            let per_head: Vec<u32> = per_head.iter().map(|x| x.to_bits()).collect();
            assert_eq!(
                per_head, serial,
                "{ty:?}: decode and prefill arithmetic differ"
            );
            for head in 0..heads {
                let h = head / group;
                let visible: Vec<usize> = (0..used).filter(|&j| !empty(j)).collect();
                let mut k = vec![0f32; hd];
                let mut v = vec![0f32; hd];
                let keys: Vec<Vec<f32>> = visible
                    .iter()
                    .map(|&j| kv.key(h, j, &mut k).to_vec())
                    .collect();
                let values: Vec<Vec<f32>> = visible
                    .iter()
                    .map(|&j| kv.value(h, j, &mut v).to_vec())
                    .collect();
                let want = reference(&q[head * hd..(head + 1) * hd], &keys, &values, 0.125);
                for (c, w) in want.iter().enumerate() {
                    let got = f32::from_bits(serial[head * hd + c]);
                    assert!(
                        (got - w).abs() < 1e-5,
                        "{ty:?} head {head} column {c}: {got} vs {w}"
                    );
                }
            }
        }
    }

    /// Enough work to run the heads in parallel: same answers as the plain reference.
    #[test]
    fn parallel_heads_match_the_reference() {
        let (kvh, heads, hd, n) = (2, 6, 8, 128);
        let mut ring = RingLayout::new(n, 0).unwrap();
        let mut kv = LayerKv::new(kvh, n, hd, KvType::F32);
        let ids: Vec<u32> = (0..n as u32).collect();
        let step = ring.place(&ids).unwrap();
        assert!(n * n >= PARALLEL_WORK);
        let k: Vec<f32> = (0..kvh * n).flat_map(|t| vector(t, hd)).collect(); // (kvh, n, hd)
        let v: Vec<f32> = (0..kvh * n).flat_map(|t| vector(500 + t, hd)).collect();
        let q: Vec<f32> = (0..heads * n).flat_map(|t| vector(900 + t, hd)).collect();
        let out = attend(
            &mut kv,
            &step,
            0.25,
            &Tensor::from_shape(&[1, heads, n, hd], &q).unwrap(),
            &Tensor::from_shape(&[1, kvh, n, hd], &k).unwrap(),
            &Tensor::from_shape(&[1, kvh, n, hd], &v).unwrap(),
            &mut Scratch::default(),
            None,
            0,
        )
        .unwrap();
        let out = out
            .try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec();
        for head in 0..heads {
            let h = head / (heads / kvh);
            for i in 0..n {
                let row = (head * n + i) * hd;
                let keys: Vec<Vec<f32>> = (0..=i).map(|j| vector(h * n + j, hd)).collect();
                let values: Vec<Vec<f32>> = (0..=i).map(|j| vector(500 + h * n + j, hd)).collect();
                let want = reference(&q[row..row + hd], &keys, &values, 0.25);
                for (g, w) in out[row..row + hd].iter().zip(&want) {
                    assert!((g - w).abs() < 1e-6, "head {head} token {i}");
                }
            }
        }
    }
}
