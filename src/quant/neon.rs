//! aarch64 NEON and NEON+dotprod kernels, twins of `scalar.rs` (same accumulation order).
//!
//! Q8Q8 takes 4 blocks at a time: each block gives 4 partial i32 sums (SDOT, or
//! `vmull_s8`/`vmlal_s8` pairs widened with `vpadal`), two rounds of `vpaddq` turn 4 blocks
//! into one vector of their exact dot products, which is scaled and added into the low
//! (lanes 0..4) or high (lanes 4..8) accumulator, matching lane `b % 8` of the scalar code.
//! The last, partial group runs the same code with zeros for missing blocks.
//! `vdotq_s32` is still unstable in Rust 1.95, so SDOT is written as inline assembly.
//! Pair sums in the `vmull` path stay below 2^15 because activations are in -127..=127.
//! Q8Q16 runs the same code with int16 activations: weights widened to int16 and
//! `vmull_s16`/`vmlal_s16` into 4 partial i32 sums (SDOT has no int16 form).

// Kernels index several arrays (rows of a tile, lanes, blocks) with one counter; index
// loops say that most plainly and, unlike iterator adapters with closures, always inline
// into the `target_feature` functions.
#![allow(clippy::needless_range_loop)]

use std::arch::aarch64::*;
use std::arch::asm;
use std::ops::Range;

use super::format::{ActInt, QuantActs, BLOCK};
use super::tiles::{self, F32Tiles};
use super::{reduce8, scalar, OutRows, Q8Matrix};

/// Activation rows processed together against one weight row (reusing each weight block).
const TILE: usize = 4;

/// Schemes Q8Q8 (`T = i8`) and Q8Q16 (`T = i16`) for output columns `rows` with plain NEON.
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
pub(super) unsafe fn q8q8<T: NeonActs>(
    w: &Q8Matrix<'_>,
    x: &QuantActs<T>,
    rows: Range<usize>,
    out: &mut OutRows<'_>,
) {
    // SAFETY: NEON is available (this function's contract).
    unsafe { q8q8_rows::<T, false>(w, x, rows, out) }
}

/// Scheme Q8Q8 for output columns `rows` with SDOT.
///
/// # Safety
/// The CPU must support NEON and the dot-product extension.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn q8q8_dotprod(
    w: &Q8Matrix<'_>,
    x: &QuantActs<i8>,
    rows: Range<usize>,
    out: &mut OutRows<'_>,
) {
    // SAFETY: NEON and dotprod are available (this function's contract).
    unsafe { q8q8_rows::<i8, true>(w, x, rows, out) }
}

/// Scheme Q8F32 for output columns `rows`, x (m, k): the shared loop ([`tiles::q8f32`]) over
/// this instruction set's kernels.
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
pub(super) unsafe fn q8f32(w: &Q8Matrix<'_>, x: &[f32], rows: Range<usize>, out: &mut OutRows<'_>) {
    // SAFETY: forwarded contract.
    unsafe { tiles::q8f32::<Neon>(w, x, rows, out) }
}

/// This instruction set's Q8F32 kernels, for [`tiles::q8f32`].
struct Neon;

impl F32Tiles for Neon {
    #[inline(always)]
    unsafe fn rows<const R: usize>(w: &Q8Matrix<'_>, r0: usize, x: &[f32]) -> [f32; R] {
        // SAFETY: forwarded contract (NEON is available).
        unsafe { rows_q8f32::<R>(w, r0, x) }
    }

    #[inline(always)]
    unsafe fn acts<const T: usize>(w: &Q8Matrix<'_>, r: usize, x: &[f32], i0: usize) -> [f32; T] {
        // SAFETY: forwarded contract (NEON is available).
        unsafe { acts_q8f32::<T>(w, r, x, i0) }
    }
}

/// The Q8Q8 row loop; `DOT` selects SDOT. Inlined into the two `target_feature` entry points.
///
/// # Safety
/// NEON (and dotprod if `DOT`) are available.
#[inline(always)]
unsafe fn q8q8_rows<T: NeonActs, const DOT: bool>(
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
            // SAFETY: the features are available (this function's contract).
            let ys = unsafe { dot_q8q8::<T, TILE, DOT>(wq, ws, xs) };
            for (t, y) in ys.into_iter().enumerate() {
                out.set(i + t, r, y);
            }
            i += TILE;
        }
        for i in i..x.m {
            // SAFETY: as above.
            let [y] = unsafe { dot_q8q8::<T, 1, DOT>(wq, ws, [x.row(i)]) };
            out.set(i, r, y);
        }
    }
}

/// Activation types of the integer kernels: one block's dot product as 4 partial i32 sums.
pub(super) trait NeonActs: ActInt {
    /// 4 partial i32 sums of one full block's dot product (32 values at `w` and `x`), with
    /// SDOT if `DOT` and the type has it.
    ///
    /// # Safety
    /// NEON (and dotprod if `DOT`) are available; `w` and `x` are valid for 32 values of reads.
    unsafe fn partials<const DOT: bool>(w: *const i8, x: *const Self) -> int32x4_t;
}

impl NeonActs for i8 {
    #[inline(always)]
    unsafe fn partials<const DOT: bool>(w: *const i8, x: *const i8) -> int32x4_t {
        // SAFETY: forwarded contract.
        unsafe { partials::<DOT>(w, x) }
    }
}

impl NeonActs for i16 {
    #[inline(always)]
    unsafe fn partials<const DOT: bool>(w: *const i8, x: *const i16) -> int32x4_t {
        // SAFETY: forwarded contract (NEON is available).
        unsafe { partials_wide(w, x) }
    }
}

/// 4 partial i32 sums of one full block of int8 weights and int16 activations: each
/// product is at most 128 * 32767 in magnitude, 8 per lane, far from i32 overflow.
///
/// # Safety
/// NEON is available; `w` is valid for 32 int8 and `x` for 32 int16 of reads.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn partials_wide(w: *const i8, x: *const i16) -> int32x4_t {
    // SAFETY: 32 readable values at each (caller); vld1q needs no alignment.
    let (w0, w1, x0, x1, x2, x3) = unsafe {
        (
            vld1q_s8(w),
            vld1q_s8(w.add(16)),
            vld1q_s16(x),
            vld1q_s16(x.add(8)),
            vld1q_s16(x.add(16)),
            vld1q_s16(x.add(24)),
        )
    };
    let (a, b) = (vmovl_s8(vget_low_s8(w0)), vmovl_high_s8(w0));
    let (c, d) = (vmovl_s8(vget_low_s8(w1)), vmovl_high_s8(w1));
    let acc = vmull_s16(vget_low_s16(a), vget_low_s16(x0));
    let acc = vmlal_high_s16(acc, a, x0);
    let acc = vmlal_s16(acc, vget_low_s16(b), vget_low_s16(x1));
    let acc = vmlal_high_s16(acc, b, x1);
    let acc = vmlal_s16(acc, vget_low_s16(c), vget_low_s16(x2));
    let acc = vmlal_high_s16(acc, c, x2);
    let acc = vmlal_s16(acc, vget_low_s16(d), vget_low_s16(x3));
    vmlal_high_s16(acc, d, x3)
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

/// Adds 4 blocks' partial sums `v` (per row) with scales `sw`, `sx[t]` into `acc`.
///
/// # Safety
/// NEON is available.
#[inline(always)]
unsafe fn add_quad<const R: usize>(
    acc: &mut [float32x4_t; R],
    v: &[[int32x4_t; 4]; R],
    sw: float32x4_t,
    sx: [float32x4_t; R],
) {
    for t in 0..R {
        // SAFETY: NEON is available (contract).
        unsafe {
            let idot = vpaddq_s32(vpaddq_s32(v[t][0], v[t][1]), vpaddq_s32(v[t][2], v[t][3]));
            acc[t] = vaddq_f32(acc[t], vmulq_f32(vmulq_f32(sw, sx[t]), vcvtq_f32_s32(idot)));
        }
    }
}

/// Adds the 4 full blocks from block `b0` into `acc` (one accumulator half per row).
///
/// # Safety
/// NEON (and dotprod if `DOT`) are available; blocks b0..b0 + 4 are full blocks of `wq`
/// and of every `xs[t].0`.
#[inline(always)]
unsafe fn full_group<T: NeonActs, const R: usize, const DOT: bool>(
    wq: &[i8],
    ws: &[f32],
    xs: [(&[T], &[f32]); R],
    b0: usize,
    acc: &mut [float32x4_t; R],
) {
    let mut v = [[vdupq_n_s32(0); 4]; R];
    let mut sx = [vdupq_n_f32(0.0); R];
    // SAFETY: full blocks (contract), so each 32-byte read ends at or before k, and the
    // 4-float reads at b0 + 4 <= full <= nb.
    unsafe {
        for e in 0..4 {
            let off = (b0 + e) * BLOCK;
            for t in 0..R {
                v[t][e] = T::partials::<DOT>(wq.as_ptr().add(off), xs[t].0.as_ptr().add(off));
            }
        }
        for t in 0..R {
            sx[t] = vld1q_f32(xs[t].1.as_ptr().add(b0));
        }
        add_quad(acc, &v, vld1q_f32(ws.as_ptr().add(b0)), sx);
    }
}

/// Adds the last blocks, from block `b0` (a multiple of 4) to nb, into `acc`: up to 3 full
/// blocks and the short one, with missing blocks as zero vectors, the short block
/// zero-padded and missing scales zero, so each missing block adds an exact +0.
///
/// # Safety
/// NEON (and dotprod if `DOT`) are available; every `xs[t]` has the lengths of (`wq`, `ws`);
/// 0 < nb - b0 <= 4.
#[inline(always)]
unsafe fn last_group<T: NeonActs, const R: usize, const DOT: bool>(
    wq: &[i8],
    ws: &[f32],
    xs: [(&[T], &[f32]); R],
    b0: usize,
    acc: &mut [float32x4_t; R],
) {
    let (k, nb) = (wq.len(), ws.len());
    let full = k / BLOCK;
    let tail = full * BLOCK..k;
    let mut w_pad = [0i8; BLOCK];
    let mut x_pad = [[T::default(); BLOCK]; R];
    if !tail.is_empty() {
        w_pad[..tail.len()].copy_from_slice(&wq[tail.clone()]);
        for t in 0..R {
            x_pad[t][..tail.len()].copy_from_slice(&xs[t].0[tail.clone()]);
        }
    }
    let mut v = [[vdupq_n_s32(0); 4]; R];
    for e in 0..4 {
        let b = b0 + e;
        for t in 0..R {
            // SAFETY: a full block (b < full) has 32 bytes in both rows; the pads hold 32.
            unsafe {
                if b < full {
                    v[t][e] = T::partials::<DOT>(
                        wq.as_ptr().add(b * BLOCK),
                        xs[t].0.as_ptr().add(b * BLOCK),
                    );
                } else if b == full && !tail.is_empty() {
                    v[t][e] = T::partials::<DOT>(w_pad.as_ptr(), x_pad[t].as_ptr());
                }
            }
        }
    }
    let mut sw = [0f32; 4];
    sw[..nb - b0].copy_from_slice(&ws[b0..]);
    let mut sx = [vdupq_n_f32(0.0); R];
    for t in 0..R {
        let mut s = [0f32; 4];
        s[..nb - b0].copy_from_slice(&xs[t].1[b0..]);
        // SAFETY: `s` holds 4 floats.
        sx[t] = unsafe { vld1q_f32(s.as_ptr()) };
    }
    // SAFETY: NEON is available (contract); `sw` holds 4 floats.
    unsafe { add_quad(acc, &v, vld1q_f32(sw.as_ptr()), sx) };
}

/// [`reduce8`] of lanes 0..4 in `lo` and 4..8 in `hi`, in the same order.
///
/// # Safety
/// NEON is available.
#[inline(always)]
unsafe fn reduce_halves(lo: float32x4_t, hi: float32x4_t) -> f32 {
    // SAFETY: NEON is available (contract).
    unsafe {
        let s4 = vaddq_f32(lo, hi); // a0+a4, a1+a5, a2+a6, a3+a7
        let s2 = vadd_f32(vget_low_f32(s4), vget_high_f32(s4)); // (a0+a4)+(a2+a6), (a1+a5)+(a3+a7)
        vpadds_f32(s2)
    }
}

/// Schemes Q8Q8 and Q8Q16: one weight row (`wq` (k), `ws` (nb)) against R quantized
/// activation rows.
///
/// Blocks go 4 at a time, alternately into the low (lanes 0..4) and high (lanes 4..8)
/// accumulator halves, then [`last_group`] adds the remainder.
///
/// # Safety
/// NEON (and dotprod if `DOT`) are available; every `xs[t]` has the lengths of (`wq`, `ws`).
#[inline(always)]
unsafe fn dot_q8q8<T: NeonActs, const R: usize, const DOT: bool>(
    wq: &[i8],
    ws: &[f32],
    xs: [(&[T], &[f32]); R],
) -> [f32; R] {
    let (k, nb) = (wq.len(), ws.len());
    for (xq, xsc) in xs {
        assert!(xq.len() == k && xsc.len() == nb);
    }
    let full = k / BLOCK;
    // SAFETY: NEON is available (contract).
    let zero = unsafe { vdupq_n_f32(0.0) };
    let mut lo = [zero; R]; // per row: lanes 0..4
    let mut hi = [zero; R]; // per row: lanes 4..8
    let mut b0 = 0;
    // SAFETY (all calls): the features are available and the lengths match (contract); full
    // groups end at or before `full`, the last group is checked by `last_group`.
    unsafe {
        while b0 + 8 <= full {
            full_group::<T, R, DOT>(wq, ws, xs, b0, &mut lo);
            full_group::<T, R, DOT>(wq, ws, xs, b0 + 4, &mut hi);
            b0 += 8;
        }
        if b0 + 4 <= full {
            full_group::<T, R, DOT>(wq, ws, xs, b0, &mut lo);
            b0 += 4;
        }
        if b0 < nb {
            let acc = if b0 % 8 == 0 { &mut lo } else { &mut hi };
            last_group::<T, R, DOT>(wq, ws, xs, b0, acc);
        }
    }
    let mut ys = [0f32; R];
    for t in 0..R {
        // SAFETY: NEON is available (contract).
        ys[t] = unsafe { reduce_halves(lo[t], hi[t]) };
    }
    ys
}

/// The 32 int8 of one block at `wp` widened to f32; chunk c holds values 4c..4c + 4.
///
/// # Safety
/// NEON is available; `wp` is valid for 32 bytes of reads.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn widen_block(wp: *const i8) -> [float32x4_t; 8] {
    // SAFETY: 32 readable bytes (contract).
    let (w0, w1) = unsafe { (vld1q_s8(wp), vld1q_s8(wp.add(16))) };
    let h = [
        vmovl_s8(vget_low_s8(w0)),
        vmovl_high_s8(w0),
        vmovl_s8(vget_low_s8(w1)),
        vmovl_high_s8(w1),
    ];
    [
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(h[0]))),
        vcvtq_f32_s32(vmovl_high_s16(h[0])),
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(h[1]))),
        vcvtq_f32_s32(vmovl_high_s16(h[1])),
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(h[2]))),
        vcvtq_f32_s32(vmovl_high_s16(h[2])),
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(h[3]))),
        vcvtq_f32_s32(vmovl_high_s16(h[3])),
    ]
}

/// `acc += scale * sum_c wf[c] * xv[c]`, chunks c even into lanes 0..4 (`acc[0]`), odd into
/// lanes 4..8 (`acc[1]`), c increasing: lane `j % 8` of the scalar twin.
#[inline]
#[target_feature(enable = "neon")]
fn block_fma(acc: &mut [float32x4_t; 2], wf: &[float32x4_t; 8], xv: &[float32x4_t; 8], scale: f32) {
    let mut s_lo = vmulq_f32(wf[0], xv[0]);
    let mut s_hi = vmulq_f32(wf[1], xv[1]);
    for c in (2..8).step_by(2) {
        s_lo = vfmaq_f32(s_lo, wf[c], xv[c]);
        s_hi = vfmaq_f32(s_hi, wf[c + 1], xv[c + 1]);
    }
    acc[0] = vfmaq_n_f32(acc[0], s_lo, scale);
    acc[1] = vfmaq_n_f32(acc[1], s_hi, scale);
}

/// The 32 f32 of one activation block at `xp`.
///
/// # Safety
/// NEON is available; `xp` is valid for 32 floats of reads.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load_block(xp: *const f32) -> [float32x4_t; 8] {
    let mut v = [vdupq_n_f32(0.0); 8];
    for c in 0..8 {
        // SAFETY: 32 readable floats (contract).
        v[c] = unsafe { vld1q_f32(xp.add(4 * c)) };
    }
    v
}

/// The 8 lanes of `acc` plus the partial last block from column `start`, reduced.
#[inline]
#[target_feature(enable = "neon")]
fn finish_q8f32(acc: [float32x4_t; 2], wq: &[i8], ws: &[f32], x: &[f32], start: usize) -> f32 {
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe {
        vst1q_f32(lanes.as_mut_ptr(), acc[0]);
        vst1q_f32(lanes.as_mut_ptr().add(4), acc[1]);
    }
    if start < wq.len() {
        scalar::block_q8f32(&mut lanes, &wq[start..], &x[start..], ws[start / BLOCK]);
    }
    reduce8(&lanes)
}

/// Scheme Q8F32: weight rows r0..r0 + R of `w` against one activation vector x (k).
///
/// # Safety
/// NEON is available; r0 + R <= n and `x.len() == k`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn rows_q8f32<const R: usize>(w: &Q8Matrix<'_>, r0: usize, x: &[f32]) -> [f32; R] {
    let k = w.k();
    let mut rows: [(&[i8], &[f32]); R] = [(&[], &[]); R];
    for j in 0..R {
        rows[j] = w.row(r0 + j);
    }
    assert!(x.len() == k);
    let full = k / BLOCK;
    let mut acc = [[vdupq_n_f32(0.0); 2]; R]; // per row: lanes 0..4, lanes 4..8
    for b in 0..full {
        let off = b * BLOCK;
        // SAFETY: off + 32 <= k floats of x and bytes of every row.
        let xv = unsafe { load_block(x.as_ptr().add(off)) };
        for j in 0..R {
            // SAFETY: as above.
            let wf = unsafe { widen_block(rows[j].0.as_ptr().add(off)) };
            block_fma(&mut acc[j], &wf, &xv, rows[j].1[b]);
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
/// NEON is available; r < n and `x` holds at least i0 + T rows of k.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn acts_q8f32<const T: usize>(w: &Q8Matrix<'_>, r: usize, x: &[f32], i0: usize) -> [f32; T] {
    let k = w.k();
    let (wq, ws) = w.row(r);
    let mut xs: [&[f32]; T] = [&[]; T];
    for t in 0..T {
        xs[t] = &x[(i0 + t) * k..(i0 + t + 1) * k];
    }
    let full = k / BLOCK;
    let mut acc = [[vdupq_n_f32(0.0); 2]; T]; // per row: lanes 0..4, lanes 4..8
    for b in 0..full {
        let off = b * BLOCK;
        // SAFETY: off + 32 <= k bytes of the row and floats of every activation row.
        let wf = unsafe { widen_block(wq.as_ptr().add(off)) };
        for t in 0..T {
            // SAFETY: as above.
            let xv = unsafe { load_block(xs[t].as_ptr().add(off)) };
            block_fma(&mut acc[t], &wf, &xv, ws[b]);
        }
    }
    let mut ys = [0f32; T];
    for t in 0..T {
        ys[t] = finish_q8f32(acc[t], wq, ws, xs[t], full * BLOCK);
    }
    ys
}
