//! aarch64 NEON kernel without dot products (Cortex-A53, A72: Pi 3, Zero 2 W, Pi 4): int16
//! products. Each 16-byte quarter of a chunk (4 rows x 4 values) is transposed with one
//! `tbl` to value-major order (value 0 of the 4 rows, then value 1, ...) and widened to int16,
//! so `smlal` by element against one activation integer (form `Wide`) adds a product to each
//! of 4 rows: one accumulator lane per weight row, as in the other kernels, and no
//! horizontal sums. The int16 form makes Q8 and Q15 the same code (|w * v| sums < 2^27).
//!
//! A tile is one group against 2 activation rows: 8 accumulators, 8 float sums and the 2
//! rows' activation blocks (4 registers each) stay in registers.

// Kernels index several arrays (rows of a tile, quarters) with one counter; index loops say
// that most plainly and always inline into the `target_feature` functions.
#![allow(clippy::needless_range_loop)]

use std::arch::aarch64::*;

use super::acts::QuantRows;
use super::{store_tile, Q8Tiled, CHUNK, GROUP, GROUP_BLOCK};
use crate::quant::format::BLOCK;
use crate::quant::OutRows;

/// `tbl` indices turning 4 rows x 4 values (row-major bytes) into value-major order.
const TRANSPOSE: [u8; 16] = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];

/// Group g (16 weight rows) against every activation row of `a` (form `Wide`).
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
pub(super) unsafe fn group(w: &Q8Tiled<'_>, g: usize, a: &QuantRows, out: &mut OutRows<'_>) {
    let n = w.n();
    let mut i = 0;
    // SAFETY (all tiles): NEON is available (contract) and rows i..i + M exist.
    unsafe {
        while i + 2 <= a.m {
            store_tile(out, n, g, i, &tile::<2>(w, g, a, i));
            i += 2;
        }
        if i < a.m {
            store_tile(out, n, g, i, &tile::<1>(w, g, a, i));
        }
    }
}

/// One chunk's 4 quarters, transposed to value-major order and widened: `[j][0]` holds
/// values 0 and 1 of rows 4j..4j + 4, `[j][1]` values 2 and 3.
///
/// # Safety
/// NEON is available; `p` is valid for 64 bytes of reads.
#[inline(always)]
unsafe fn widen_chunk(p: *const i8, transpose: uint8x16_t) -> [[int16x8_t; 2]; 4] {
    let mut out = [[vdupq_n_s16(0); 2]; 4];
    for j in 0..4 {
        // SAFETY: 64 readable bytes (contract); vld1q needs no alignment.
        let t = unsafe { vqtbl1q_s8(vld1q_s8(p.add(16 * j)), transpose) };
        out[j] = [vmovl_s8(vget_low_s8(t)), vmovl_high_s8(t)];
    }
    out
}

/// Adds the products of one widened chunk with activation integers `LO..LO + 4` of `x`
/// (8 of the block's values) into `acc` (rows 4j..4j + 4 in `acc[j]`).
macro_rules! chunk_madd {
    ($acc:expr, $wv:expr, $x:expr, $l0:literal, $l1:literal, $l2:literal, $l3:literal) => {
        for j in 0..4 {
            let [w01, w23] = $wv[j];
            $acc[j] = vmlal_laneq_s16::<$l0>($acc[j], vget_low_s16(w01), $x);
            $acc[j] = vmlal_high_laneq_s16::<$l1>($acc[j], w01, $x);
            $acc[j] = vmlal_laneq_s16::<$l2>($acc[j], vget_low_s16(w23), $x);
            $acc[j] = vmlal_high_laneq_s16::<$l3>($acc[j], w23, $x);
        }
    };
}

/// Group g against activation rows i0..i0 + M: `[t][l]` is output (i0 + t, 16 g + l).
///
/// # Safety
/// NEON is available.
#[inline(always)]
unsafe fn tile<const M: usize>(
    w: &Q8Tiled<'_>,
    g: usize,
    a: &QuantRows,
    i0: usize,
) -> [[f32; GROUP]; M] {
    let nb = w.blocks();
    assert!(g < w.groups() && i0 + M <= a.m && a.nb == nb && a.wide.len() == a.m * nb * BLOCK);
    let q = w.q()[g * nb * GROUP_BLOCK..(g + 1) * nb * GROUP_BLOCK].as_ptr();
    let s = w.scales()[g * nb * GROUP..(g + 1) * nb * GROUP].as_ptr();
    let x = a.wide[i0 * nb * BLOCK..].as_ptr();
    let xs = a.scales[i0 * nb..].as_ptr();
    // SAFETY: TRANSPOSE holds 16 bytes.
    let transpose = unsafe { vld1q_u8(TRANSPOSE.as_ptr()) };
    let mut sums = [[vdupq_n_f32(0.0); 4]; M]; // per row: rows 0..4, ..., 12..16
    for b in 0..nb {
        let mut acc = [[vdupq_n_s32(0); 4]; M];
        // SAFETY: b < nb, t < M, r < 4: every read is inside this group's weights (nb * 512
        // bytes, nb * 16 scales) or the tile's activation rows (M rows of nb blocks of 32
        // int16, nb scales), checked above; vld1q needs no alignment.
        unsafe {
            let wb = q.add(b * GROUP_BLOCK);
            // Activation register r holds values 8r..8r + 8: chunks 2r and 2r + 1.
            for r in 0..4 {
                let mut xv = [vdupq_n_s16(0); M];
                for t in 0..M {
                    xv[t] = vld1q_s16(x.add((t * nb + b) * BLOCK + 8 * r));
                }
                let wv = widen_chunk(wb.add(2 * r * CHUNK), transpose);
                for t in 0..M {
                    chunk_madd!(acc[t], wv, xv[t], 0, 1, 2, 3);
                }
                let wv = widen_chunk(wb.add((2 * r + 1) * CHUNK), transpose);
                for t in 0..M {
                    chunk_madd!(acc[t], wv, xv[t], 4, 5, 6, 7);
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
