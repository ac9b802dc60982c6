//! x86_64 AVX-512 kernels for scheme Q8F32: the AVX2 twin's structure with 16-wide vectors,
//! so each block of 32 weights takes 2 widenings and 2 FMAs per activation row instead of 4.
//! Per block, 16 lanes hold `s[l] = sum over j ≡ l (mod 16)` and `acc += sw * s`; the lanes
//! are folded to 8 (l and l + 8) at the end and reduced like the other variants, so results
//! differ from the scalar reference by rounding only (within the bound of the module root).
//! The integer schemes have no AVX-512 code: they run the AVX2 kernels.

// Kernels index several arrays (rows of a tile, lanes, blocks) with one counter; index
// loops say that most plainly and, unlike iterator adapters with closures, always inline
// into the `target_feature` functions.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::avx2::finish_q8f32;
use super::format::BLOCK;
use super::tiles::{self, F32Tiles};
use super::{OutRows, Q8Matrix};

/// Scheme Q8F32 for output columns `rows`, x (m, k): the shared loop ([`tiles::q8f32`]) over
/// this instruction set's kernels.
///
/// # Safety
/// The CPU must support AVX-512F, AVX2 and FMA.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn q8f32(w: &Q8Matrix<'_>, x: &[f32], rows: Range<usize>, out: &mut OutRows<'_>) {
    // SAFETY: forwarded contract.
    unsafe { tiles::q8f32::<Avx512>(w, x, rows, out) }
}

/// This instruction set's Q8F32 kernels, for [`tiles::q8f32`].
struct Avx512;

impl F32Tiles for Avx512 {
    #[inline(always)]
    unsafe fn rows<const R: usize>(w: &Q8Matrix<'_>, r0: usize, x: &[f32]) -> [f32; R] {
        // SAFETY: forwarded contract (AVX-512F, AVX2 and FMA are available).
        unsafe { rows_q8f32::<R>(w, r0, x) }
    }

    #[inline(always)]
    unsafe fn acts<const T: usize>(w: &Q8Matrix<'_>, r: usize, x: &[f32], i0: usize) -> [f32; T] {
        // SAFETY: forwarded contract (AVX-512F, AVX2 and FMA are available).
        unsafe { acts_q8f32::<T>(w, r, x, i0) }
    }
}

/// 16 int8 at `p` widened to f32.
///
/// # Safety
/// AVX-512F is available; `p` is valid for 16 bytes of reads.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn widen16(p: *const i8) -> __m512 {
    // SAFETY: 16 readable bytes (caller); loadu needs no alignment.
    let v = unsafe { _mm_loadu_si128(p.cast()) };
    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v))
}

/// The 16 lanes of `acc` folded to 8 (lane l plus lane l + 8), plus the partial last block
/// from column `start`, reduced.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
fn finish(acc: __m512, wq: &[i8], ws: &[f32], x: &[f32], start: usize) -> f32 {
    let lo = _mm512_castps512_ps256(acc);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc)));
    finish_q8f32(_mm256_add_ps(lo, hi), wq, ws, x, start)
}

/// Scheme Q8F32: weight rows r0..r0 + R of `w` against one activation vector x (k).
///
/// # Safety
/// AVX-512F, AVX2 and FMA are available; r0 + R <= n and `x.len() == k`.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
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
    // Prefetch the next group of rows (contiguous with this one) at the rate this group is
    // consumed, as the AVX2 twin does. Prefetches never fault; `wrapping_add` keeps the
    // address arithmetic defined past the matrix end.
    let next = w.q().as_ptr().wrapping_add((r0 + R) * k);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..full {
        let off = b * BLOCK;
        let pf = next.wrapping_add(off * R);
        for l in (0..R * BLOCK).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(l));
        }
        // SAFETY: off + 32 <= k floats of x and bytes of every row; b < nb scales.
        unsafe {
            let xv = [
                _mm512_loadu_ps(xp.add(off)),
                _mm512_loadu_ps(xp.add(off + 16)),
            ];
            for j in 0..R {
                let p = wp[j].add(off);
                let s = _mm512_mul_ps(widen16(p), xv[0]);
                let s = _mm512_fmadd_ps(widen16(p.add(16)), xv[1], s);
                acc[j] = _mm512_fmadd_ps(s, _mm512_set1_ps(*sp[j].add(b)), acc[j]);
            }
        }
    }
    let mut ys = [0f32; R];
    for j in 0..R {
        ys[j] = finish(acc[j], rows[j].0, rows[j].1, x, full * BLOCK);
    }
    ys
}

/// Scheme Q8F32: weight row r of `w` against activation rows i0..i0 + T of x (m, k).
///
/// Each weight block is widened once and reused from registers for all T rows. (Scaling the
/// widened block once, `acc += (sw * q) * x`, saves a third of the FMAs but measured no
/// faster here: the tile's loads, not the FMAs, bound this loop.)
///
/// # Safety
/// AVX-512F, AVX2 and FMA are available; r < n and `x` holds at least i0 + T rows of k.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn acts_q8f32<const T: usize>(w: &Q8Matrix<'_>, r: usize, x: &[f32], i0: usize) -> [f32; T] {
    let k = w.k();
    let (wq, ws) = w.row(r);
    let mut xs: [&[f32]; T] = [&[]; T];
    for t in 0..T {
        xs[t] = &x[(i0 + t) * k..(i0 + t + 1) * k];
    }
    let full = k / BLOCK;
    let mut acc = [_mm512_setzero_ps(); T];
    for b in 0..full {
        let off = b * BLOCK;
        // SAFETY: off + 32 <= k bytes of the row and floats of every activation row;
        // b < nb scales.
        unsafe {
            let wp = wq.as_ptr().add(off);
            let wf = [widen16(wp), widen16(wp.add(16))];
            let scale = _mm512_set1_ps(*ws.as_ptr().add(b));
            for t in 0..T {
                let xp = xs[t].as_ptr().add(off);
                let s = _mm512_mul_ps(wf[0], _mm512_loadu_ps(xp));
                let s = _mm512_fmadd_ps(wf[1], _mm512_loadu_ps(xp.add(16)), s);
                acc[t] = _mm512_fmadd_ps(s, scale, acc[t]);
            }
        }
    }
    let mut ys = [0f32; T];
    for t in 0..T {
        ys[t] = finish(acc[t], wq, ws, xs[t], full * BLOCK);
    }
    ys
}
