//! x86_64 AVX2 + FMA kernels, twins of `scalar.rs` (same accumulation order).
//!
//! Q8Q8 takes 4 blocks at a time: per block, `maddubs(|w|, sign(x, w))` and `madd` with ones
//! give 8 partial i32 sums; an `hadd` tree and one add of 128-bit halves turn 4 such vectors
//! into the 4 exact block dot products, which are scaled and added into the low (lanes 0..4)
//! or high (lanes 4..8) accumulator, matching lane `b % 8` of the scalar code. (128-bit
//! halves also avoid `vperm2i128`, slow on Zen 1.)
//! `|w|` goes to the unsigned operand so every weight in -128..=127 is exact; activations are
//! in -127..=127 by construction, so `sign` never overflows and pair sums stay below 2^15.
//! The last, partial group of 4 blocks runs the same code with zeros for missing blocks.
//!
//! Q8Q16 runs the same code with int16 activations: per block, the weights are sign-extended
//! to int16 and `madd` with the activations gives the 8 partial i32 sums directly.

// Kernels index several arrays (rows of a tile, lanes, blocks) with one counter; index
// loops say that most plainly and, unlike iterator adapters with closures, always inline
// into the `target_feature` functions.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::format::{ActInt, QuantActs, BLOCK};
use super::tiles::{self, F32Tiles};
use super::{reduce8, scalar, OutRows, Q8Matrix};

/// Activation rows processed together against one weight row (reusing each weight block).
const TILE: usize = 4;

/// Quantizes activations with AVX2 (the same arithmetic as the scalar quantizer).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_acts<T: ActInt>(x: &[f32], a: &mut QuantActs<T>) {
    a.fill_from(x);
}

/// Schemes Q8Q8 (`T = i8`) and Q8Q16 (`T = i16`) for output columns `rows`.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn q8q8<T: Avx2Acts>(
    w: &Q8Matrix<'_>,
    x: &QuantActs<T>,
    rows: Range<usize>,
    out: &mut OutRows<'_>,
) {
    for r in rows {
        let (wq, ws) = w.row(r);
        let mut i = 0;
        while i + TILE <= x.m {
            let xs: [(&[T], &[f32]); TILE] = [x.row(i), x.row(i + 1), x.row(i + 2), x.row(i + 3)];
            // SAFETY: AVX2 and FMA are available (this function's contract).
            let ys = unsafe { dot_q8q8::<T, TILE>(wq, ws, xs) };
            for (t, y) in ys.into_iter().enumerate() {
                out.set(i + t, r, y);
            }
            i += TILE;
        }
        for i in i..x.m {
            // SAFETY: as above.
            let [y] = unsafe { dot_q8q8::<T, 1>(wq, ws, [x.row(i)]) };
            out.set(i, r, y);
        }
    }
}

/// Scheme Q8F32 for output columns `rows`, x (m, k): the shared loop ([`tiles::q8f32`]) over
/// this instruction set's kernels.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn q8f32(w: &Q8Matrix<'_>, x: &[f32], rows: Range<usize>, out: &mut OutRows<'_>) {
    // SAFETY: forwarded contract.
    unsafe { tiles::q8f32::<Avx2>(w, x, rows, out) }
}

/// This instruction set's Q8F32 kernels, for [`tiles::q8f32`].
struct Avx2;

impl F32Tiles for Avx2 {
    #[inline(always)]
    unsafe fn rows<const R: usize>(w: &Q8Matrix<'_>, r0: usize, x: &[f32]) -> [f32; R] {
        // SAFETY: forwarded contract (AVX2 and FMA are available).
        unsafe { rows_q8f32::<R>(w, r0, x) }
    }

    #[inline(always)]
    unsafe fn acts<const T: usize>(w: &Q8Matrix<'_>, r: usize, x: &[f32], i0: usize) -> [f32; T] {
        // SAFETY: forwarded contract (AVX2 and FMA are available).
        unsafe { acts_q8f32::<T>(w, r, x, i0) }
    }
}

/// 8 partial i32 sums of the dot product of one full block (32 values at `w` and `x`).
///
/// # Safety
/// AVX2 is available; `w` and `x` are valid for 32 bytes of reads.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_partials(w: *const i8, x: *const i8, ones: __m256i) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes at each; loadu needs no alignment.
    let (wv, xv) = unsafe { (_mm256_loadu_si256(w.cast()), _mm256_loadu_si256(x.cast())) };
    let sx = _mm256_sign_epi8(xv, wv);
    _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(wv), sx), ones)
}

/// Activation types of the integer kernels: one block's dot product as 8 partial i32 sums.
pub(super) trait Avx2Acts: ActInt {
    /// 8 partial i32 sums of the dot product of one full block (32 values at `w` and `x`).
    ///
    /// # Safety
    /// AVX2 is available; `w` and `x` are valid for 32 values of reads.
    unsafe fn partials(w: *const i8, x: *const Self, ones: __m256i) -> __m256i;
}

impl Avx2Acts for i8 {
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn partials(w: *const i8, x: *const i8, ones: __m256i) -> __m256i {
        // SAFETY: forwarded contract.
        unsafe { block_partials(w, x, ones) }
    }
}

impl Avx2Acts for i16 {
    /// Weights sign-extended to int16, then `madd` with the activations: each pair sum is
    /// at most 2 * 128 * 32767 in magnitude, far from i32 overflow.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn partials(w: *const i8, x: *const i16, _ones: __m256i) -> __m256i {
        // SAFETY: 32 readable int8 at `w` and int16 at `x` (caller); loadu needs no alignment.
        let (w0, w1, x0, x1) = unsafe {
            (
                _mm_loadu_si128(w.cast()),
                _mm_loadu_si128(w.add(16).cast()),
                _mm256_loadu_si256(x.cast()),
                _mm256_loadu_si256(x.add(16).cast()),
            )
        };
        let p0 = _mm256_madd_epi16(_mm256_cvtepi8_epi16(w0), x0);
        let p1 = _mm256_madd_epi16(_mm256_cvtepi8_epi16(w1), x1);
        _mm256_add_epi32(p0, p1)
    }
}

/// How far ahead of the current block weights are prefetched.
const PREFETCH_BYTES: usize = 2048;

/// Lane masks for `_mm_maskload_ps`: the first `i` lanes.
const MASKS: [[i32; 4]; 5] = [
    [0; 4],
    [-1, 0, 0, 0],
    [-1, -1, 0, 0],
    [-1, -1, -1, 0],
    [-1; 4],
];

/// Adds 4 blocks into `acc` (lanes 0..4 or 4..8): `pairs` are the two `hadd`s of their
/// partial sums, `sw` and `sx` their scales. Lane j of each 128-bit half of the last `hadd`
/// holds a half-sum of block j, so one add of the halves gives the exact dot products.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn add_quad(acc: &mut __m128, pairs: [__m256i; 2], sw: __m128, sx: __m128) {
    let quad = _mm256_hadd_epi32(pairs[0], pairs[1]);
    let idot = _mm_add_epi32(
        _mm256_castsi256_si128(quad),
        _mm256_extracti128_si256::<1>(quad),
    );
    *acc = _mm_add_ps(*acc, _mm_mul_ps(_mm_mul_ps(sw, sx), _mm_cvtepi32_ps(idot)));
}

/// [`reduce8`] of lanes 0..4 in `lo` and 4..8 in `hi`, in the same order.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn reduce_halves(lo: __m128, hi: __m128) -> f32 {
    let s4 = _mm_add_ps(lo, hi); // a0+a4, a1+a5, a2+a6, a3+a7
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4)); // (a0+a4)+(a2+a6), (a1+a5)+(a3+a7)
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<0b01>(s2, s2)))
}

/// The two `hadd`s of the partial sums of the 4 full blocks from block `b0`, per row.
///
/// # Safety
/// AVX2 is available; blocks b0..b0 + 4 are full blocks of `wq` and of every `xs[t].0`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn full_quad<T: Avx2Acts, const R: usize>(
    wq: &[i8],
    xs: [(&[T], &[f32]); R],
    b0: usize,
    ones: __m256i,
) -> [[__m256i; 2]; R] {
    let zero = _mm256_setzero_si256();
    let mut pairs = [[zero; 2]; R];
    for p in 0..2 {
        let mut v = [[zero; 2]; R];
        for e in 0..2 {
            let off = (b0 + p * 2 + e) * BLOCK;
            for t in 0..R {
                // SAFETY: a full block: off + 32 <= k, the length of both rows (contract).
                v[t][e] =
                    unsafe { T::partials(wq.as_ptr().add(off), xs[t].0.as_ptr().add(off), ones) };
            }
        }
        for t in 0..R {
            pairs[t][p] = _mm256_hadd_epi32(v[t][0], v[t][1]);
        }
    }
    pairs
}

/// Adds the 4 full blocks from block `b0` into `acc` (one accumulator half per row).
///
/// # Safety
/// AVX2 is available; blocks b0..b0 + 4 are full blocks of `wq` and of every `xs[t].0`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn full_group<T: Avx2Acts, const R: usize>(
    wq: &[i8],
    ws: &[f32],
    xs: [(&[T], &[f32]); R],
    b0: usize,
    ones: __m256i,
    acc: &mut [__m128; R],
) {
    // Weights stream from DRAM; prefetching a few rows ahead hides part of the latency.
    // Prefetches never fault, and `wrapping_add` keeps the pointer arithmetic defined.
    let ahead = wq.as_ptr().wrapping_add(b0 * BLOCK + PREFETCH_BYTES);
    _mm_prefetch::<_MM_HINT_T0>(ahead);
    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
    // SAFETY: forwarded contract.
    let pairs = unsafe { full_quad(wq, xs, b0, ones) };
    // SAFETY: b0 + 4 <= full <= nb floats in `ws` and in every `xs[t].1`.
    let sw = unsafe { _mm_loadu_ps(ws.as_ptr().add(b0)) };
    for t in 0..R {
        // SAFETY: as for `sw`.
        let sx = unsafe { _mm_loadu_ps(xs[t].1.as_ptr().add(b0)) };
        add_quad(&mut acc[t], pairs[t], sw, sx);
    }
}

/// Adds the last blocks, from block `b0` (a multiple of 4) to nb, into `acc`: up to 3 full
/// blocks and the short one, with missing blocks as zero vectors, the short block
/// zero-padded and missing scales masked to zero, so each missing block adds an exact +0.
///
/// # Safety
/// AVX2 is available; every `xs[t]` has the lengths of (`wq`, `ws`); 0 < nb - b0 <= 4.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn last_group<T: Avx2Acts, const R: usize>(
    wq: &[i8],
    ws: &[f32],
    xs: [(&[T], &[f32]); R],
    b0: usize,
    ones: __m256i,
    acc: &mut [__m128; R],
) {
    let (k, nb) = (wq.len(), ws.len());
    let full = k / BLOCK;
    let tail = full * BLOCK..k;
    let zero = _mm256_setzero_si256();
    let mut w_pad = [0i8; BLOCK];
    let mut x_pad = [[T::default(); BLOCK]; R];
    if !tail.is_empty() {
        w_pad[..tail.len()].copy_from_slice(&wq[tail.clone()]);
        for t in 0..R {
            x_pad[t][..tail.len()].copy_from_slice(&xs[t].0[tail.clone()]);
        }
    }
    let mut pairs = [[zero; 2]; R];
    for p in 0..2 {
        let mut v = [[zero; 2]; R];
        for e in 0..2 {
            let b = b0 + p * 2 + e;
            for t in 0..R {
                // SAFETY: a full block (b < full) has 32 bytes in both rows; the pads hold 32.
                v[t][e] = unsafe {
                    if b < full {
                        T::partials(
                            wq.as_ptr().add(b * BLOCK),
                            xs[t].0.as_ptr().add(b * BLOCK),
                            ones,
                        )
                    } else if b == full && !tail.is_empty() {
                        T::partials(w_pad.as_ptr(), x_pad[t].as_ptr(), ones)
                    } else {
                        zero
                    }
                };
            }
        }
        for t in 0..R {
            pairs[t][p] = _mm256_hadd_epi32(v[t][0], v[t][1]);
        }
    }
    // SAFETY: the mask enables lanes b0..nb only; masked lanes are not read.
    let (mask, sw) = unsafe {
        let mask = _mm_loadu_si128(MASKS[nb - b0].as_ptr().cast());
        (mask, _mm_maskload_ps(ws.as_ptr().add(b0), mask))
    };
    for t in 0..R {
        // SAFETY: as above.
        let sx = unsafe { _mm_maskload_ps(xs[t].1.as_ptr().add(b0), mask) };
        add_quad(&mut acc[t], pairs[t], sw, sx);
    }
}

/// Schemes Q8Q8 and Q8Q16: one weight row (`wq` (k), `ws` (nb)) against R quantized
/// activation rows.
///
/// Blocks go 4 at a time, alternately into the low (lanes 0..4) and high (lanes 4..8)
/// accumulator halves, then [`last_group`] adds the remainder.
///
/// # Safety
/// AVX2 and FMA are available; every `xs[t]` has the lengths of (`wq`, `ws`).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q8q8<T: Avx2Acts, const R: usize>(
    wq: &[i8],
    ws: &[f32],
    xs: [(&[T], &[f32]); R],
) -> [f32; R] {
    let (k, nb) = (wq.len(), ws.len());
    for (xq, xsc) in xs {
        assert!(xq.len() == k && xsc.len() == nb);
    }
    let full = k / BLOCK;
    let ones = _mm256_set1_epi16(1);
    let mut lo = [_mm_setzero_ps(); R]; // per row: lanes 0..4
    let mut hi = [_mm_setzero_ps(); R]; // per row: lanes 4..8
    let mut b0 = 0;
    // SAFETY (all calls): the lengths match (contract) and every group read is in bounds:
    // full groups end at or before `full`, the last group is checked by `last_group`.
    unsafe {
        while b0 + 8 <= full {
            full_group(wq, ws, xs, b0, ones, &mut lo);
            full_group(wq, ws, xs, b0 + 4, ones, &mut hi);
            b0 += 8;
        }
        if b0 + 4 <= full {
            full_group(wq, ws, xs, b0, ones, &mut lo);
            b0 += 4;
        }
        if b0 < nb {
            let acc = if b0 % 8 == 0 { &mut lo } else { &mut hi };
            last_group(wq, ws, xs, b0, ones, acc);
        }
    }
    let mut ys = [0f32; R];
    for t in 0..R {
        ys[t] = reduce_halves(lo[t], hi[t]);
    }
    ys
}

/// 8 int8 at `p` widened to f32.
///
/// # Safety
/// AVX2 is available; `p` is valid for 8 bytes of reads.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn widen8(p: *const i8) -> __m256 {
    // SAFETY: 8 readable bytes (caller); loadl needs no alignment.
    let v = unsafe { _mm_loadl_epi64(p.cast()) };
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
}

/// Whether the matrix-vector kernel prefetches the next group of rows in software.
const MV_PREFETCH: bool = true;

/// The Q8F32 block `b` (32 values from `off = 32 b`) of one weight row against the four
/// activation vectors `xv` of the block: `acc += sw * sum_c widen(w[8c..8c + 8]) * xv[c]`.
///
/// # Safety
/// AVX2 and FMA are available; `wp` is valid for 32 bytes of reads and `sp` for one f32.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_fma(acc: __m256, wp: *const i8, sp: *const f32, xv: &[__m256; 4]) -> __m256 {
    // SAFETY: 32 readable bytes at `wp`, one f32 at `sp` (contract).
    unsafe {
        let s = _mm256_mul_ps(widen8(wp), xv[0]);
        let s = _mm256_fmadd_ps(widen8(wp.add(8)), xv[1], s);
        let s = _mm256_fmadd_ps(widen8(wp.add(16)), xv[2], s);
        let s = _mm256_fmadd_ps(widen8(wp.add(24)), xv[3], s);
        _mm256_fmadd_ps(s, _mm256_broadcast_ss(&*sp), acc)
    }
}

/// The 8 lanes of `acc` plus the partial last block from column `start`, reduced.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn finish_q8f32(acc: __m256, wq: &[i8], ws: &[f32], x: &[f32], start: usize) -> f32 {
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    if start < wq.len() {
        scalar::block_q8f32(&mut lanes, &wq[start..], &x[start..], ws[start / BLOCK]);
    }
    reduce8(&lanes)
}

/// Scheme Q8F32: weight rows r0..r0 + R of `w` against one activation vector x (k).
///
/// # Safety
/// AVX2 and FMA are available; r0 + R <= n and `x.len() == k`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_q8f32<const R: usize>(w: &Q8Matrix<'_>, r0: usize, x: &[f32]) -> [f32; R] {
    let k = w.k();
    let mut rows: [(&[i8], &[f32]); R] = [(&[], &[]); R];
    for j in 0..R {
        rows[j] = w.row(r0 + j);
    }
    assert!(x.len() == k);
    let full = k / BLOCK;
    let xp = x.as_ptr();
    let wp = rows.map(|r| r.0.as_ptr());
    let sp = rows.map(|r| r.1.as_ptr());
    // The next group of rows is contiguous with this one: prefetch it at the rate this
    // group is consumed, so it arrives as this one ends. Prefetches never fault, and
    // `wrapping_add` keeps the address arithmetic defined past the matrix end.
    let next = w.q().as_ptr().wrapping_add((r0 + R) * k);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..full {
        let off = b * BLOCK;
        if MV_PREFETCH {
            let pf = next.wrapping_add(off * R);
            for l in (0..R * BLOCK).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(l));
            }
        }
        // SAFETY: off + 32 <= k floats of x and bytes of every row; b < nb scales.
        unsafe {
            let xv = [
                _mm256_loadu_ps(xp.add(off)),
                _mm256_loadu_ps(xp.add(off + 8)),
                _mm256_loadu_ps(xp.add(off + 16)),
                _mm256_loadu_ps(xp.add(off + 24)),
            ];
            for j in 0..R {
                acc[j] = block_fma(acc[j], wp[j].add(off), sp[j].add(b), &xv);
            }
        }
    }
    let mut ys = [0f32; R];
    for j in 0..R {
        ys[j] = finish_q8f32(acc[j], rows[j].0, rows[j].1, x, full * BLOCK);
    }
    ys
}

/// Scheme Q8F32: weight row r of `w` against activation rows i0..i0 + T of x (m, k).
///
/// # Safety
/// AVX2 and FMA are available; r < n and `x` holds at least i0 + T rows of k.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn acts_q8f32<const T: usize>(w: &Q8Matrix<'_>, r: usize, x: &[f32], i0: usize) -> [f32; T] {
    let k = w.k();
    let (wq, ws) = w.row(r);
    let mut xs: [&[f32]; T] = [&[]; T];
    for t in 0..T {
        xs[t] = &x[(i0 + t) * k..(i0 + t + 1) * k];
    }
    let full = k / BLOCK;
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..full {
        let off = b * BLOCK;
        // SAFETY: off + 32 <= k bytes of the row and floats of every activation row;
        // b < nb scales.
        unsafe {
            let wp = wq.as_ptr().add(off);
            let wf = [
                widen8(wp),
                widen8(wp.add(8)),
                widen8(wp.add(16)),
                widen8(wp.add(24)),
            ];
            let scale = _mm256_broadcast_ss(&*ws.as_ptr().add(b));
            for t in 0..T {
                let xp = xs[t].as_ptr().add(off);
                let s = _mm256_mul_ps(wf[0], _mm256_loadu_ps(xp));
                let s = _mm256_fmadd_ps(wf[1], _mm256_loadu_ps(xp.add(8)), s);
                let s = _mm256_fmadd_ps(wf[2], _mm256_loadu_ps(xp.add(16)), s);
                let s = _mm256_fmadd_ps(wf[3], _mm256_loadu_ps(xp.add(24)), s);
                acc[t] = _mm256_fmadd_ps(s, scale, acc[t]);
            }
        }
    }
    let mut ys = [0f32; T];
    for t in 0..T {
        ys[t] = finish_q8f32(acc[t], wq, ws, xs[t], full * BLOCK);
    }
    ys
}
