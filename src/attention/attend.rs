//! The attention arithmetic over one layer's ring: prefill (any number of new tokens, one
//! unit per key/value head and query position) and decode (one new token, every head at
//! once), with the same blockwise softmax, so both give the same bits for the same query.

use std::fmt;
use std::ops::Range;
use std::sync::{Mutex, PoisonError};

use anyhow::{ensure, Result};
use tract_onnx::prelude::*;

use super::kernels;
use crate::kv_cache::{HeadRows, LayerKv, Step};
use crate::quant::{Kernel, ThreadPool};

/// Writes `k_new`/`v_new` at `step.slots` and attends `q` over the ring; returns q's shape.
/// The work may be split over `pool` (decode from a long history, prefill from enough
/// query×slot pairs); the result has the same bits whatever the pool's size and `kernel`.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend(
    kv: &mut LayerKv,
    step: &Step,
    scale: f32,
    q: &Tensor,
    k_new: &Tensor,
    v_new: &Tensor,
    scratch: &mut Scratch,
    kernel: Kernel,
    pool: Option<&ThreadPool>,
    layer: usize,
) -> Result<Tensor> {
    let kernel = kernel.checked()?;
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
    let mut out = vec![0f32; q.len()]; // (heads, s, head_dim)
    let kv = &*kv;
    if s == 1 {
        // Decode: every head at once, over the pool when the history is long enough.
        let pool = pool.filter(|_| used >= PARALLEL_DECODE_SLOTS);
        decode_attention(kernel, kv, step, scale, q, &mut out, scratch, pool);
        return Tensor::from_shape(q_shape, &out);
    }
    // One unit: the `group` query heads of key/value head h at query position i.
    let unit = |h: usize, i: usize, o: &mut [f32], scratch: &mut Scratch| match kv.head(h) {
        HeadRows::F32(k, v) => group_attention(kernel, k, v, q, h, i, o, step, scale, scratch),
        HeadRows::F16(k, v) => group_attention(kernel, k, v, q, h, i, o, step, scale, scratch),
    };
    let units = kvh * s;
    match pool.filter(|p| p.threads() > 1 && s * used >= PARALLEL_WORK) {
        Some(pool) => {
            // Units are independent: each part computes every `parts`-th one (later query
            // positions see more slots, so this spreads the work evenly) with buffers of its
            // own, so the result does not depend on the number of parts.
            let parts = pool.threads().min(units);
            let width = group * hd;
            let mine = |p: usize| (p..units).step_by(parts);
            let results: Vec<Mutex<Vec<f32>>> = (0..parts).map(|_| Mutex::default()).collect();
            pool.run(parts, |p| {
                let mut scratch = Scratch::default();
                let mut o = results[p].lock().unwrap_or_else(PoisonError::into_inner);
                o.resize(mine(p).len() * width, 0.0); // (units of the part, group, head_dim)
                for (j, u) in mine(p).enumerate() {
                    unit(u / s, u % s, &mut o[j * width..][..width], &mut scratch);
                }
            });
            for (p, o) in results.iter().enumerate() {
                let o = o.lock().unwrap_or_else(PoisonError::into_inner);
                for (j, u) in mine(p).enumerate() {
                    scatter(
                        &mut out,
                        &o[j * width..][..width],
                        u / s,
                        u % s,
                        group,
                        s,
                        hd,
                    );
                }
            }
        }
        None => {
            let mut o = vec![0f32; group * hd]; // (group, head_dim)
            for u in 0..units {
                o.fill(0.0);
                unit(u / s, u % s, &mut o, scratch);
                scatter(&mut out, &o, u / s, u % s, group, s, hd);
            }
        }
    }
    Tensor::from_shape(q_shape, &out)
}

/// Per-thread buffers of the attention code; kept in the op state between runs.
#[derive(Default)]
pub struct Scratch {
    /// Scores, then their exponentials; block-major, (rows, slot) within a block.
    scores: Vec<f32>,
    /// Softmax statistics per block and query row.
    stats: Vec<BlockStat>,
    /// Per block and query row, what its partial value sum is multiplied by.
    factors: Vec<f32>,
    /// Per block, the exponential-weighted value sums of its slots: (block, rows, head_dim).
    partials: Vec<f32>,
    /// The group's queries; (group, head_dim).
    queries: Vec<f32>,
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
/// of slots gets its own maximum and sum of exponentials ([`block_softmax`]) and its own
/// value sum weighted by those exponentials, its slots in order, from zero; the blocks'
/// value sums are then added in block order, each times `exp(block max - max) / total`
/// ([`block_factors`], [`combine_blocks`]). A parallel decode gives whole blocks to threads,
/// so its result has the same bits as the serial one.
const BLOCK: usize = 64;

/// The softmax statistics of one query row over one block of slots.
#[derive(Clone, Copy, Debug, Default)]
struct BlockStat {
    /// Largest visible scaled score, -inf if no slot of the block is visible.
    max: f32,
    /// Sum of `exp(score - max)` over the visible slots ([`kernels::exp_sum`]).
    sum: f32,
}

/// Slots `lo..hi` of block `b` of `used` slots.
fn block_range(b: usize, used: usize) -> Range<usize> {
    b * BLOCK..((b + 1) * BLOCK).min(used)
}

/// Turns raw scores `q·k` (rows, n) of one block into `exp(scale·q·k - max)` per row, 0 for
/// slots the query may not see (stamp newer than `me`), and records each row's statistics.
/// The exponentials and sums are the kernels' ([`kernels::exp_sum`]).
fn block_softmax(
    kernel: Kernel,
    scores: &mut [f32],
    stamps: &[u64],
    me: u64,
    scale: f32,
    stats: &mut [BlockStat],
) {
    let n = stamps.len();
    // Decode, and every block of a prefill but the newest, sees all its slots.
    let all_visible = stamps.iter().all(|&stamp| stamp <= me);
    for (row, stat) in scores.chunks_exact_mut(n).zip(stats) {
        let max = if all_visible {
            kernels::scale_max(kernel, row, scale)
        } else {
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
            max
        };
        let sum = if max == f32::NEG_INFINITY {
            row.fill(0.0);
            0.0
        } else {
            kernels::exp_sum(kernel, row, max)
        };
        *stat = BlockStat { max, sum };
    }
}

/// One block's keys and values for the `group` queries of one key/value head: scores,
/// exponentials and statistics into `scores` (group, n) and `stats` (group), and the
/// exponential-weighted sum of the value rows added to `partial` (group, head_dim), which
/// the callers hand over zeroed.
#[allow(clippy::too_many_arguments)]
fn attend_block<E: kernels::Row>(
    kernel: Kernel,
    queries: &[f32],
    keys: &[E],
    values: &[E],
    stamps: &[u64],
    me: u64,
    scale: f32,
    scores: &mut [f32],
    stats: &mut [BlockStat],
    partial: &mut [f32],
) {
    let hd = keys.len() / stamps.len();
    kernels::group_dots(kernel, queries, keys, hd, scores);
    block_softmax(kernel, scores, stamps, me, scale, stats);
    kernels::group_axpys(kernel, scores, values, hd, 0..hd, partial);
}

/// From `stats` (block, row) of `blocks` blocks: `factors` (block, row) = `exp(max_b - max) /
/// sum over b of exp(max_b - max)·sum_b`, 0 for a block the row sees nothing of.
fn block_factors(stats: &[BlockStat], rows: usize, blocks: usize, factors: &mut Vec<f32>) {
    factors.clear();
    factors.resize(blocks * rows, 0.0);
    for row in 0..rows {
        let row_stats = || (0..blocks).map(|b| stats[b * rows + row]);
        let max = row_stats().fold(f32::NEG_INFINITY, |m, s| m.max(s.max));
        let weight = |s: BlockStat| {
            if s.max == f32::NEG_INFINITY {
                0.0
            } else {
                kernels::exp(s.max - max)
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
}

/// `out` (rows, head_dim) = sum over blocks b, in order and from zero, of `factors[b][row]`
/// times `partials[b][row]` (product rounded, then added).
fn combine_blocks(partials: &[f32], factors: &[f32], rows: usize, out: &mut [f32]) {
    let hd = out.len() / rows;
    out.fill(0.0);
    for (partial, factors) in partials
        .chunks_exact(rows * hd)
        .zip(factors.chunks_exact(rows))
    {
        for ((o, p), &f) in out
            .chunks_exact_mut(hd)
            .zip(partial.chunks_exact(hd))
            .zip(factors)
        {
            for (o, p) in o.iter_mut().zip(p) {
                *o += f * p;
            }
        }
    }
}

/// The query heads of key/value head `h` at query position `i` (q (heads, s, head_dim)) over
/// `keys`/`values` (slot, head_dim) into `o` (group, head_dim). Each key and value row is
/// read once for the whole group.
#[allow(clippy::too_many_arguments)]
pub(super) fn group_attention<E: kernels::Row>(
    kernel: Kernel,
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
        partials,
        queries,
    } = scratch;
    queries.clear();
    for g in 0..group {
        let at = ((h * group + g) * s + i) * hd;
        queries.extend_from_slice(&q[at..at + hd]);
    }
    scores.clear();
    scores.resize(group * BLOCK, 0.0);
    stats.clear();
    stats.resize(blocks * group, BlockStat::default());
    partials.clear();
    partials.resize(blocks * group * hd, 0.0);
    for b in 0..blocks {
        let r = block_range(b, used);
        attend_block(
            kernel,
            queries,
            &keys[r.start * hd..r.end * hd],
            &values[r.start * hd..r.end * hd],
            &step.stamps[r.clone()],
            me,
            scale,
            &mut scores[..group * r.len()],
            &mut stats[b * group..][..group],
            &mut partials[b * group * hd..][..group * hd],
        );
    }
    block_factors(stats, group, blocks, factors);
    combine_blocks(partials, factors, group, o);
}

/// One new token's attention for every head, q (heads, 1, head_dim) into `out` (same shape),
/// with [`group_attention`]'s arithmetic. With a pool, whole blocks of slots go to threads
/// (scores, softmax and value sums of a block on one thread, one pool round per layer); the
/// blocks are combined on this thread.
#[allow(clippy::too_many_arguments)]
pub(super) fn decode_attention(
    kernel: Kernel,
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

    // Per part, whole blocks: its scores (block-major, (kv head, group, slot) within a
    // block), statistics (block, rows) and partial value sums (block, rows, head_dim).
    let Scratch {
        scores,
        stats,
        factors,
        partials,
        ..
    } = scratch;
    scores.clear();
    scores.resize(rows * used, 0.0);
    stats.clear();
    stats.resize(blocks * rows, BlockStat::default());
    partials.clear();
    partials.resize(blocks * rows * hd, 0.0);
    let parts = threads.min(blocks).max(1);
    let mut cells = Vec::with_capacity(parts);
    {
        let (mut sc, mut st, mut pa) = (&mut scores[..], &mut stats[..], &mut partials[..]);
        for p in 0..parts {
            let (b0, b1) = (p * blocks / parts, (p + 1) * blocks / parts);
            let slots = if b0 == b1 {
                0
            } else {
                block_range(b1 - 1, used).end - block_range(b0, used).start
            };
            let (mine, rest) = std::mem::take(&mut sc).split_at_mut(rows * slots);
            let (mine_st, rest_st) = std::mem::take(&mut st).split_at_mut(rows * (b1 - b0));
            let (mine_pa, rest_pa) = std::mem::take(&mut pa).split_at_mut(rows * hd * (b1 - b0));
            (sc, st, pa) = (rest, rest_st, rest_pa);
            cells.push(Mutex::new((b0..b1, mine, mine_st, mine_pa)));
        }
    }
    let run_blocks = |p: usize| {
        let mut cell = cells[p].lock().unwrap_or_else(PoisonError::into_inner);
        let (blocks, sc, st, pa) = &mut *cell;
        let mut at = 0;
        for (bi, b) in blocks.clone().enumerate() {
            let r = block_range(b, used);
            for h in 0..kvh {
                let qs = &q[h * group * hd..(h + 1) * group * hd];
                let block = &mut sc[at..at + group * r.len()]; // (group, slot)
                let stat = &mut st[(bi * kvh + h) * group..][..group];
                let partial = &mut pa[(bi * kvh + h) * group * hd..][..group * hd];
                let stamps = &step.stamps[r.clone()];
                let at_rows = r.start * hd..r.end * hd;
                match kv.head(h) {
                    HeadRows::F32(k, v) => attend_block(
                        kernel,
                        qs,
                        &k[at_rows.clone()],
                        &v[at_rows],
                        stamps,
                        me,
                        scale,
                        block,
                        stat,
                        partial,
                    ),
                    HeadRows::F16(k, v) => attend_block(
                        kernel,
                        qs,
                        &k[at_rows.clone()],
                        &v[at_rows],
                        stamps,
                        me,
                        scale,
                        block,
                        stat,
                        partial,
                    ),
                }
                at += group * r.len();
            }
        }
    };
    match pool {
        Some(pool) if parts > 1 => pool.run(parts, run_blocks),
        _ => (0..parts).for_each(run_blocks),
    }
    drop(cells);
    block_factors(stats, rows, blocks, factors);
    combine_blocks(partials, factors, rows, out);
}

/// Query×slot pairs per head from which prefill splits its units over the pool.
pub(super) const PARALLEL_WORK: usize = 16 * 1024;

/// History length from which one token's attention is split over the pool: below
/// it, waking them costs more than the work saved.
const PARALLEL_DECODE_SLOTS: usize = 256;
