//! aarch64 NEON and NEON+dotprod kernels, twins of `scalar.rs` (same accumulation order).
//!
//! Q8Q8 takes 4 blocks at a time: each block gives 4 partial i32 sums (SDOT, or
//! `vmull_s8`/`vmlal_s8` pairs widened with `vpadal`), two rounds of `vpaddq` turn 4 blocks
//! into one vector of their exact dot products, which is scaled and added into the low
//! (lanes 0..4) or high (lanes 4..8) accumulator, matching lane `b % 8` of the scalar code.
//! `vdotq_s32` is still unstable in Rust 1.95, so SDOT is written as inline assembly.
//! Pair sums in the `vmull` path stay below 2^15 because activations are in -127..=127.

// Kernels index several arrays (rows of a tile, lanes, blocks) with one counter; index
// loops say that most plainly and, unlike iterator adapters with closures, always inline
// into the `target_feature` functions.
#![allow(clippy::needless_range_loop)]

use std::arch::aarch64::*;
use std::arch::asm;
use std::ops::Range;

use super::format::{QuantActs, BLOCK};
use super::{reduce8, scalar, OutRows, Q8Matrix};

/// Activation rows processed together against one weight row (reusing each weight block).
const TILE: usize = 4;

/// Scheme Q8Q8 for output columns `rows` with plain NEON.
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
pub(super) unsafe fn q8q8(
    w: &Q8Matrix<'_>,
    x: &QuantActs,
    rows: Range<usize>,
    out: &mut OutRows<'_>,
) {
    // SAFETY: NEON is available (this function's contract).
    unsafe { q8q8_rows::<false>(w, x, rows, out) }
}

/// Scheme Q8Q8 for output columns `rows` with SDOT.
///
/// # Safety
/// The CPU must support NEON and the dot-product extension.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn q8q8_dotprod(
    w: &Q8Matrix<'_>,
    x: &QuantActs,
    rows: Range<usize>,
    out: &mut OutRows<'_>,
) {
    // SAFETY: NEON and dotprod are available (this function's contract).
    unsafe { q8q8_rows::<true>(w, x, rows, out) }
}

/// Scheme Q8F32 for output columns `rows`, x (m, k).
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
pub(super) unsafe fn q8f32(w: &Q8Matrix<'_>, x: &[f32], rows: Range<usize>, out: &mut OutRows<'_>) {
    let k = w.k();
    let m = x.len() / k;
    let row = |i: usize| &x[i * k..(i + 1) * k];
    for r in rows {
        let (wq, ws) = w.row(r);
        let mut i = 0;
        while i + TILE <= m {
            let xs = [row(i), row(i + 1), row(i + 2), row(i + 3)];
            // SAFETY: NEON is available (this function's contract).
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

/// The Q8Q8 row loop; `DOT` selects SDOT. Inlined into the two `target_feature` entry points.
///
/// # Safety
/// NEON (and dotprod if `DOT`) are available.
#[inline(always)]
unsafe fn q8q8_rows<const DOT: bool>(
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
            // SAFETY: the features are available (this function's contract).
            let ys = unsafe { dot_q8q8::<TILE, DOT>(wq, ws, xs) };
            for (t, y) in ys.into_iter().enumerate() {
                out.set(i + t, r, y);
            }
            i += TILE;
        }
        for i in i..x.m {
            // SAFETY: as above.
            let [y] = unsafe { dot_q8q8::<1, DOT>(wq, ws, [x.row(i)]) };
            out.set(i, r, y);
        }
    }
}

/// 4 partial i32 sums of one full block's dot product, with SDOT if `DOT`.
///
/// # Safety
/// NEON (and dotprod if `DOT`) are available; `w` and `x` are valid for 32 bytes of reads.
#[inline(always)]
unsafe fn partials<const DOT: bool>(w: *const i8, x: *const i8) -> int32x4_t {
    // SAFETY: forwarded contract.
    unsafe {
        if DOT {
            partials_sdot(w, x)
        } else {
            partials_mull(w, x)
        }
    }
}

/// 4 partial i32 sums of one full block's dot product with `vmull_s8`.
///
/// # Safety
/// NEON is available; `w` and `x` are valid for 32 bytes of reads.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn partials_mull(w: *const i8, x: *const i8) -> int32x4_t {
    // SAFETY: 32 readable bytes at each (caller); vld1q needs no alignment.
    let (w0, w1, x0, x1) = unsafe {
        (
            vld1q_s8(w),
            vld1q_s8(w.add(16)),
            vld1q_s8(x),
            vld1q_s8(x.add(16)),
        )
    };
    let lo = vmlal_s8(
        vmull_s8(vget_low_s8(w0), vget_low_s8(x0)),
        vget_low_s8(w1),
        vget_low_s8(x1),
    );
    let hi = vmlal_high_s8(vmull_high_s8(w0, x0), w1, x1);
    vpadalq_s16(vpaddlq_s16(lo), hi)
}

/// 4 partial i32 sums of one full block's dot product with SDOT.
///
/// # Safety
/// NEON and dotprod are available; `w` and `x` are valid for 32 bytes of reads.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn partials_sdot(w: *const i8, x: *const i8) -> int32x4_t {
    // SAFETY: 32 readable bytes at each (caller); vld1q needs no alignment.
    let (w0, w1, x0, x1) = unsafe {
        (
            vld1q_s8(w),
            vld1q_s8(w.add(16)),
            vld1q_s8(x),
            vld1q_s8(x.add(16)),
        )
    };
    let mut acc = vdupq_n_s32(0);
    // SAFETY: SDOT only reads and writes the named vector registers.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {w0:v}.16b, {x0:v}.16b",
            "sdot {acc:v}.4s, {w1:v}.16b, {x1:v}.16b",
            acc = inout(vreg) acc,
            w0 = in(vreg) w0,
            x0 = in(vreg) x0,
            w1 = in(vreg) w1,
            x1 = in(vreg) x1,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// Scheme Q8Q8: one weight row (`wq` (k), `ws` (nb)) against R quantized activation rows.
///
/// # Safety
/// NEON (and dotprod if `DOT`) are available; every `xs[t]` has the lengths of (`wq`, `ws`).
#[inline(always)]
unsafe fn dot_q8q8<const R: usize, const DOT: bool>(
    wq: &[i8],
    ws: &[f32],
    xs: [(&[i8], &[f32]); R],
) -> [f32; R] {
    let (k, nb) = (wq.len(), ws.len());
    for (xq, xsc) in xs {
        assert!(xq.len() == k && xsc.len() == nb);
    }
    // SAFETY (whole body): the features are available (contract); every block read below is a
    // full block (index < full, so offset + 32 <= k) and every 4-float read ends at or before
    // 4 * groups <= nb.
    unsafe {
        let full = k / BLOCK;
        let groups = full / 4;
        let mut acc = [[vdupq_n_f32(0.0); 2]; R]; // per row: lanes 0..4, lanes 4..8
        for g in 0..groups {
            let mut v = [[vdupq_n_s32(0); 4]; R];
            for e in 0..4 {
                let off = (g * 4 + e) * BLOCK;
                for t in 0..R {
                    v[t][e] = partials::<DOT>(wq.as_ptr().add(off), xs[t].0.as_ptr().add(off));
                }
            }
            let sw = vld1q_f32(ws.as_ptr().add(g * 4));
            for t in 0..R {
                let idot = vpaddq_s32(vpaddq_s32(v[t][0], v[t][1]), vpaddq_s32(v[t][2], v[t][3]));
                let d = vmulq_f32(sw, vld1q_f32(xs[t].1.as_ptr().add(g * 4)));
                let a = &mut acc[t][g % 2];
                *a = vaddq_f32(*a, vmulq_f32(d, vcvtq_f32_s32(idot)));
            }
        }
        let mut lanes = [[0f32; 8]; R];
        for t in 0..R {
            vst1q_f32(lanes[t].as_mut_ptr(), acc[t][0]);
            vst1q_f32(lanes[t].as_mut_ptr().add(4), acc[t][1]);
        }
        for b in groups * 4..nb {
            let (start, end) = (b * BLOCK, ((b + 1) * BLOCK).min(k));
            for t in 0..R {
                let idot = if end - start == BLOCK {
                    vaddvq_s32(partials::<DOT>(
                        wq.as_ptr().add(start),
                        xs[t].0.as_ptr().add(start),
                    ))
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
}

/// Scheme Q8F32: one weight row (`wq` (k), `ws` (nb)) against R f32 activation rows (k).
///
/// # Safety
/// NEON is available; every `xs[t]` has length k.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn dot_q8f32<const R: usize>(wq: &[i8], ws: &[f32], xs: [&[f32]; R]) -> [f32; R] {
    let k = wq.len();
    for x in xs {
        assert!(x.len() == k);
    }
    let full = k / BLOCK;
    let mut acc = [[vdupq_n_f32(0.0); 2]; R]; // per row: lanes 0..4, lanes 4..8
    for b in 0..full {
        let off = b * BLOCK;
        // SAFETY: off + 32 <= k bytes of `wq`.
        let (w0, w1) = unsafe {
            (
                vld1q_s8(wq.as_ptr().add(off)),
                vld1q_s8(wq.as_ptr().add(off + 16)),
            )
        };
        let h = [
            vmovl_s8(vget_low_s8(w0)),
            vmovl_high_s8(w0),
            vmovl_s8(vget_low_s8(w1)),
            vmovl_high_s8(w1),
        ];
        // Chunk c holds values 4c..4c+4 of the block: lanes 0..4 if c is even, 4..8 if odd.
        let wf: [float32x4_t; 8] = [
            vcvtq_f32_s32(vmovl_s16(vget_low_s16(h[0]))),
            vcvtq_f32_s32(vmovl_high_s16(h[0])),
            vcvtq_f32_s32(vmovl_s16(vget_low_s16(h[1]))),
            vcvtq_f32_s32(vmovl_high_s16(h[1])),
            vcvtq_f32_s32(vmovl_s16(vget_low_s16(h[2]))),
            vcvtq_f32_s32(vmovl_high_s16(h[2])),
            vcvtq_f32_s32(vmovl_s16(vget_low_s16(h[3]))),
            vcvtq_f32_s32(vmovl_high_s16(h[3])),
        ];
        let scale = ws[b];
        for t in 0..R {
            let xp = xs[t].as_ptr();
            // SAFETY: off + 32 <= k floats of `xs[t]`.
            let (s_lo, s_hi) = unsafe {
                let mut s_lo = vmulq_f32(wf[0], vld1q_f32(xp.add(off)));
                let mut s_hi = vmulq_f32(wf[1], vld1q_f32(xp.add(off + 4)));
                for c in (2..8).step_by(2) {
                    s_lo = vfmaq_f32(s_lo, wf[c], vld1q_f32(xp.add(off + 4 * c)));
                    s_hi = vfmaq_f32(s_hi, wf[c + 1], vld1q_f32(xp.add(off + 4 * c + 4)));
                }
                (s_lo, s_hi)
            };
            acc[t][0] = vfmaq_n_f32(acc[t][0], s_lo, scale);
            acc[t][1] = vfmaq_n_f32(acc[t][1], s_hi, scale);
        }
    }
    let mut lanes = [[0f32; 8]; R];
    for t in 0..R {
        // SAFETY: `lanes[t]` holds 8 floats.
        unsafe {
            vst1q_f32(lanes[t].as_mut_ptr(), acc[t][0]);
            vst1q_f32(lanes[t].as_mut_ptr().add(4), acc[t][1]);
        }
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
