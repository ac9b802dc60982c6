//! x86_64 AVX2 + FMA kernels, twins of `scalar.rs` (same accumulation order).
//!
//! Q8Q8 takes 8 blocks at a time: per block, `maddubs(|w|, sign(x, w))` and `madd` with ones
//! give 8 partial i32 sums; `hadd` trees turn 8 such vectors into one vector of the 8 exact
//! block dot products, which are scaled and added lane-wise into the 8 lane accumulators.
//! `|w|` goes to the unsigned operand so every weight in -128..=127 is exact; activations are
//! in -127..=127 by construction, so `sign` never overflows and pair sums stay below 2^15.
//! Leftover blocks (fewer than 8, and the short last block) use the scalar code's lanes.

// Kernels index several arrays (rows of a tile, lanes, blocks) with one counter; index
// loops say that most plainly and, unlike iterator adapters with closures, always inline
// into the `target_feature` functions.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::format::{quantize_row, QuantActs, BLOCK};
use super::{reduce8, scalar, OutRows, Q8Matrix};

/// Activation rows processed together against one weight row (reusing each weight block).
const TILE: usize = 4;

/// Quantizes activations with AVX2 (the same arithmetic as the scalar quantizer).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_acts(x: &[f32], a: &mut QuantActs) {
    a.fill(x, quantize_row);
}

/// Scheme Q8Q8 for output columns `rows`.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn q8q8(
    w: &Q8Matrix<'_>,
    x: &QuantActs,
    rows: Range<usize>,
    out: &mut OutRows<'_>,
) {
    for r in rows {
        let (wq, ws) = w.row(r);
        let mut i = 0;
        while i + TILE <= x.m {
            let xs: [(&[i8], &[f32]); TILE] = [x.row(i), x.row(i + 1), x.row(i + 2), x.row(i + 3)];
            // SAFETY: AVX2 and FMA are available (this function's contract).
            let ys = unsafe { dot_q8q8::<TILE>(wq, ws, xs) };
            for (t, y) in ys.into_iter().enumerate() {
                out.set(i + t, r, y);
            }
            i += TILE;
        }
        for i in i..x.m {
            // SAFETY: as above.
            let [y] = unsafe { dot_q8q8::<1>(wq, ws, [x.row(i)]) };
            out.set(i, r, y);
        }
    }
}

/// Scheme Q8F32 for output columns `rows`, x (m, k).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn q8f32(w: &Q8Matrix<'_>, x: &[f32], rows: Range<usize>, out: &mut OutRows<'_>) {
    let k = w.k();
    let m = x.len() / k;
    let row = |i: usize| &x[i * k..(i + 1) * k];
    for r in rows {
        let (wq, ws) = w.row(r);
        let mut i = 0;
        while i + TILE <= m {
            let xs = [row(i), row(i + 1), row(i + 2), row(i + 3)];
            // SAFETY: AVX2 and FMA are available (this function's contract).
            let ys = unsafe { dot_q8f32::<TILE>(wq, ws, xs) };
            for (t, y) in ys.into_iter().enumerate() {
                out.set(i + t, r, y);
            }
            i += TILE;
        }
        for i in i..m {
            // SAFETY: as above.
            let [y] = unsafe { dot_q8f32::<1>(wq, ws, [row(i)]) };
            out.set(i, r, y);
        }
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

/// Horizontal sum of 8 i32 (exact).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
    _mm_cvtsi128_si32(s)
}

/// Scheme Q8Q8: one weight row (`wq` (k), `ws` (nb)) against R quantized activation rows.
///
/// # Safety
/// AVX2 and FMA are available; every `xs[t]` has the lengths of (`wq`, `ws`).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q8q8<const R: usize>(wq: &[i8], ws: &[f32], xs: [(&[i8], &[f32]); R]) -> [f32; R] {
    let (k, nb) = (wq.len(), ws.len());
    for (xq, xsc) in xs {
        assert!(xq.len() == k && xsc.len() == nb);
    }
    let full = k / BLOCK;
    let groups = full / 8;
    let ones = _mm256_set1_epi16(1);
    let zero = _mm256_setzero_si256();
    let mut acc = [_mm256_setzero_ps(); R];
    for g in 0..groups {
        let mut halves = [[zero; 2]; R]; // per row: blocks 0..4 and 4..8, as hadd trees
        for h in 0..2 {
            let mut pairs = [[zero; 2]; R];
            for p in 0..2 {
                let pair = g * 8 + h * 4 + p * 2;
                let mut v = [[zero; 2]; R];
                for e in 0..2 {
                    let off = (pair + e) * BLOCK;
                    for t in 0..R {
                        // SAFETY: block pair + e < full, so off + 32 <= k = len of both rows.
                        v[t][e] = unsafe {
                            block_partials(wq.as_ptr().add(off), xs[t].0.as_ptr().add(off), ones)
                        };
                    }
                }
                for t in 0..R {
                    pairs[t][p] = _mm256_hadd_epi32(v[t][0], v[t][1]);
                }
            }
            for t in 0..R {
                halves[t][h] = _mm256_hadd_epi32(pairs[t][0], pairs[t][1]);
            }
        }
        // SAFETY: g * 8 + 8 <= full <= nb floats in `ws` and in every `xs[t].1`.
        let sw = unsafe { _mm256_loadu_ps(ws.as_ptr().add(g * 8)) };
        for t in 0..R {
            // Lane j of each 128-bit half holds half-sums of block j; add the halves.
            let lo = _mm256_permute2x128_si256::<0x20>(halves[t][0], halves[t][1]);
            let hi = _mm256_permute2x128_si256::<0x31>(halves[t][0], halves[t][1]);
            let idot = _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi));
            // SAFETY: as for `sw`.
            let sx = unsafe { _mm256_loadu_ps(xs[t].1.as_ptr().add(g * 8)) };
            acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(_mm256_mul_ps(sw, sx), idot));
        }
    }
    let mut lanes = [[0f32; 8]; R];
    for t in 0..R {
        // SAFETY: `lanes[t]` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes[t].as_mut_ptr(), acc[t]) };
    }
    for b in groups * 8..nb {
        let (start, end) = (b * BLOCK, ((b + 1) * BLOCK).min(k));
        for t in 0..R {
            let idot = if end - start == BLOCK {
                // SAFETY: a full block: start + 32 <= k.
                hsum_i32(unsafe {
                    block_partials(wq.as_ptr().add(start), xs[t].0.as_ptr().add(start), ones)
                })
            } else {
                scalar::idot(&wq[start..end], &xs[t].0[start..end])
            };
            lanes[t][b % 8] += (ws[b] * xs[t].1[b]) * idot as f32;
        }
    }
    let mut ys = [0f32; R];
    for t in 0..R {
        ys[t] = reduce8(&lanes[t]);
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

/// Scheme Q8F32: one weight row (`wq` (k), `ws` (nb)) against R f32 activation rows (k).
///
/// # Safety
/// AVX2 and FMA are available; every `xs[t]` has length k.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q8f32<const R: usize>(wq: &[i8], ws: &[f32], xs: [&[f32]; R]) -> [f32; R] {
    let k = wq.len();
    for x in xs {
        assert!(x.len() == k);
    }
    let full = k / BLOCK;
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..full {
        let off = b * BLOCK;
        let wp = wq.as_ptr();
        // SAFETY: off + 32 <= k bytes of `wq`.
        let wf = unsafe {
            [
                widen8(wp.add(off)),
                widen8(wp.add(off + 8)),
                widen8(wp.add(off + 16)),
                widen8(wp.add(off + 24)),
            ]
        };
        let scale = _mm256_set1_ps(ws[b]);
        for t in 0..R {
            let xp = xs[t].as_ptr();
            // SAFETY: off + 32 <= k floats of `xs[t]`.
            let s = unsafe {
                let s = _mm256_mul_ps(wf[0], _mm256_loadu_ps(xp.add(off)));
                let s = _mm256_fmadd_ps(wf[1], _mm256_loadu_ps(xp.add(off + 8)), s);
                let s = _mm256_fmadd_ps(wf[2], _mm256_loadu_ps(xp.add(off + 16)), s);
                _mm256_fmadd_ps(wf[3], _mm256_loadu_ps(xp.add(off + 24)), s)
            };
            acc[t] = _mm256_fmadd_ps(s, scale, acc[t]);
        }
    }
    let mut lanes = [[0f32; 8]; R];
    for t in 0..R {
        // SAFETY: `lanes[t]` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes[t].as_mut_ptr(), acc[t]) };
    }
    if full * BLOCK < k {
        let start = full * BLOCK;
        for t in 0..R {
            scalar::block_q8f32(&mut lanes[t], &wq[start..], &xs[t][start..], ws[full]);
        }
    }
    let mut ys = [0f32; R];
    for t in 0..R {
        ys[t] = reduce8(&lanes[t]);
    }
    ys
}
