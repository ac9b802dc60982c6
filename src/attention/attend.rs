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
        kernels::group_dots(kernel, queries, &keys[r.start * hd..r.end * hd], hd, block);
        let stamps = &step.stamps[r.clone()];
        block_softmax(
            kernel,
            block,
            stamps,
            me,
            scale,
            &mut stats[b * group..][..group],
        );
    }
    normalize_blocks(scores, stats, group, used, factors);
    for b in 0..blocks {
        let r = block_range(b, used);
        let block = &scores[group * r.start..group * r.end];
        let values = &values[r.start * hd..r.end * hd];
        kernels::group_axpys(kernel, block, values, hd, 0..hd, o);
    }
}

/// One new token's attention for every head, q (heads, 1, head_dim) into `out` (same shape),
/// with [`group_attention`]'s arithmetic. With a pool: the scores by whole blocks of slots,
/// then the weighted value sums by columns, each part on its own thread.
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
                        kernels::group_dots(kernel, qs, &k[r.start * hd..r.end * hd], hd, block)
                    }
                    HeadRows::F16(k, _) => {
                        kernels::group_dots(kernel, qs, &k[r.start * hd..r.end * hd], hd, block)
                    }
                }
                let stat = &mut st[(bi * kvh + h) * group..][..group];
                block_softmax(kernel, block, &step.stamps[r.clone()], me, scale, stat);
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
                        kernels::group_axpys(kernel, probs, v, hd, cols, oh)
                    }
                    HeadRows::F16(_, v) => {
                        let v = &v[r.start * hd..r.end * hd];
                        kernels::group_axpys(kernel, probs, v, hd, cols, oh)
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

/// Query×slot pairs per head from which prefill splits its units over the pool.
pub(super) const PARALLEL_WORK: usize = 16 * 1024;

/// History length from which one token's attention is split over the pool: below
/// it, waking them costs more than the work saved.
const PARALLEL_DECODE_SLOTS: usize = 256;
