//! aarch64 NEON + SDOT kernel (Cortex-A55/A76 and later: Pi 5): a chunk is four registers of
//! 4 rows x 4 values, and `sdot` by element against 4 activation bytes (lane `c % 4` of the
//! register holding chunks 0..4 or 4..8 of the block) adds 4 products to each of 4 rows.
//! Signed x signed, so no offset: Q15 runs the hi pass, shifts the accumulators left by 7,
//! then runs the lo pass into them (one accumulator per 4 rows, the weights reloaded from
//! L1 for the second pass), so the block's dot product is exact in one register.
//!
//! A tile is one group against 2 activation rows: 8 accumulators, 8 float sums, the 4
//! weight registers of a chunk and the 2 rows' activation part (2 registers each).
//! `sdot` (by element) is unstable as an intrinsic in Rust 1.95, so it is inline assembly.

// Kernels index several arrays (rows of a tile, quarters) with one counter; index loops say
// that most plainly and always inline into the `target_feature` functions.
#![allow(clippy::needless_range_loop)]

use std::arch::aarch64::*;
use std::arch::asm;

use super::acts::QuantRows;
use super::{store_tile, Q8Tiled, CHUNK, CHUNKS, GROUP, GROUP_BLOCK};
use crate::quant::format::BLOCK;
use crate::quant::OutRows;

/// Group g (16 weight rows) against every activation row of `a` (form `Signed`).
///
/// # Safety
/// The CPU must support NEON and the dot-product extension.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn group(w: &Q8Tiled<'_>, g: usize, a: &QuantRows, out: &mut OutRows<'_>) {
    // SAFETY: forwarded contract.
    unsafe { group_rows(w, g, a, 0, out) }
}

/// [`group`] for activation rows i0.. only (the i8mm kernel hands over a last odd row).
///
/// # Safety
/// The CPU must support NEON and the dot-product extension.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn group_rows(
    w: &Q8Tiled<'_>,
    g: usize,
    a: &QuantRows,
    i0: usize,
    out: &mut OutRows<'_>,
) {
    let n = w.n();
    let mut i = i0;
    // SAFETY (all tiles): the features are available (contract) and rows i..i + M exist.
    unsafe {
        if a.parts == 1 {
            while i + 2 <= a.m {
                store_tile(out, n, g, i, &tile::<1, 2>(w, g, a, i));
                i += 2;
            }
            if i < a.m {
                store_tile(out, n, g, i, &tile::<1, 1>(w, g, a, i));
            }
        } else {
            while i + 2 <= a.m {
                store_tile(out, n, g, i, &tile::<2, 2>(w, g, a, i));
                i += 2;
            }
            if i < a.m {
                store_tile(out, n, g, i, &tile::<2, 1>(w, g, a, i));
            }
        }
    }
}

/// `acc + sum over e of w[4 l + e] * x[4 L + e]` per lane l: SDOT by element.
///
/// # Safety
/// NEON and dotprod are available.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot_lane<const L: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: SDOT only reads and writes the named vector registers.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {w:v}.16b, {x:v}.4b[{l}]",
            acc = inout(vreg) acc,
            w = in(vreg) w,
            x = in(vreg) x,
            l = const L,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// Group g against activation rows i0..i0 + M: `[t][l]` is output (i0 + t, 16 g + l).
///
/// # Safety
/// The features of [`group`] are available.
#[inline(always)]
unsafe fn tile<const P: usize, const M: usize>(
    w: &Q8Tiled<'_>,
    g: usize,
    a: &QuantRows,
    i0: usize,
) -> [[f32; GROUP]; M] {
    let nb = w.blocks();
    assert!(g < w.groups() && i0 + M <= a.m && a.parts == P && a.nb == nb);
    assert!(a.bytes.len() == a.m * nb * P * BLOCK);
    let q = w.q()[g * nb * GROUP_BLOCK..(g + 1) * nb * GROUP_BLOCK].as_ptr();
    let s = w.scales()[g * nb * GROUP..(g + 1) * nb * GROUP].as_ptr();
    let x = a.bytes[i0 * nb * P * BLOCK..].as_ptr();
    let xs = a.scales[i0 * nb..].as_ptr();
    let mut sums = [[vdupq_n_f32(0.0); 4]; M]; // per row: rows 0..4, ..., 12..16
    for b in 0..nb {
        let mut acc = [[vdupq_n_s32(0); 4]; M];
        // SAFETY: b < nb, t < M, c < 8, p < P, j < 4: every read is inside this group's
        // weights (nb * 512 bytes, nb * 16 scales) or the tile's activation rows (M rows of
        // nb blocks of P * 32 bytes, nb scales), checked above; vld1q needs no alignment.
        unsafe {
            for p in 0..P {
                if p == 1 {
                    for t in 0..M {
                        for j in 0..4 {
                            acc[t][j] = vshlq_n_s32::<7>(acc[t][j]);
                        }
                    }
                }
                let mut xv = [[vdupq_n_s8(0); 2]; M];
                for t in 0..M {
                    let xp = x.add(((t * nb + b) * P + p) * BLOCK);
                    xv[t] = [vld1q_s8(xp), vld1q_s8(xp.add(16))];
                }
                for c in 0..CHUNKS {
                    let wp = q.add(b * GROUP_BLOCK + c * CHUNK);
                    let mut wv = [vdupq_n_s8(0); 4];
                    for j in 0..4 {
                        wv[j] = vld1q_s8(wp.add(16 * j));
                    }
                    for t in 0..M {
                        let xr = xv[t][c / 4];
                        for j in 0..4 {
                            acc[t][j] = match c % 4 {
                                0 => sdot_lane::<0>(acc[t][j], wv[j], xr),
                                1 => sdot_lane::<1>(acc[t][j], wv[j], xr),
                                2 => sdot_lane::<2>(acc[t][j], wv[j], xr),
                                _ => sdot_lane::<3>(acc[t][j], wv[j], xr),
                            };
                        }
                    }
                }
            }
            let mut sw = [vdupq_n_f32(0.0); 4];
            for j in 0..4 {
                sw[j] = vld1q_f32(s.add(b * GROUP + 4 * j));
            }
            for t in 0..M {
                let sx = *xs.add(t * nb + b);
                for j in 0..4 {
                    let term = vmulq_f32(vmulq_n_f32(sw[j], sx), vcvtq_f32_s32(acc[t][j]));
                    sums[t][j] = vaddq_f32(sums[t][j], term);
                }
            }
        }
    }
    let mut ys = [[0f32; GROUP]; M];
    for t in 0..M {
        for j in 0..4 {
            // SAFETY: `ys[t]` holds 16 floats.
            unsafe { vst1q_f32(ys[t].as_mut_ptr().add(4 * j), sums[t][j]) };
        }
    }
    ys
}
