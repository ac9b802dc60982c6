//! aarch64 i8mm kernel (`smmla`: a 2x8 by 8x2 int8 matrix product into 2x2 i32): two weight
//! rows by two activation rows per instruction, 8 values deep. Chunks c and c + 1 of a block
//! hold values 4c..4c + 8 of every row, 4 bytes at a time, so one `zip1`/`zip2` of 32-bit
//! elements of the two turns 4 rows x 4 values twice into two registers of 2 rows x 8
//! consecutive values, the form `smmla` takes; the activations of rows i and i + 1 are loaded
//! 8 bytes each into one register. Each accumulator holds (row a, act i), (a, i + 1),
//! (b, i), (b, i + 1): the float steps run on those lanes with the matching scale products.
//!
//! A tile is one group against 2 activation rows; Q15 keeps the hi and lo accumulators apart
//! (16 registers) so the zipped weights serve both parts. A last odd activation row runs the
//! SDOT kernel (every i8mm CPU has SDOT). `smmla` is unstable as an intrinsic in Rust 1.95,
//! so it is inline assembly.

// Kernels index several arrays (row pairs, parts) with one counter; index loops say that
// most plainly and always inline into the `target_feature` functions.
#![allow(clippy::needless_range_loop)]

use std::arch::aarch64::*;
use std::arch::asm;

use super::acts::QuantRows;
use super::{dotprod, store_tile, Q8Tiled, CHUNK, GROUP, GROUP_BLOCK};
use crate::quant::format::BLOCK;
use crate::quant::OutRows;

/// Group g (16 weight rows) against every activation row of `a` (form `Signed`).
///
/// # Safety
/// The CPU must support NEON, dotprod and i8mm.
#[target_feature(enable = "neon,dotprod,i8mm")]
pub(super) unsafe fn group(w: &Q8Tiled<'_>, g: usize, a: &QuantRows, out: &mut OutRows<'_>) {
    let n = w.n();
    let mut i = 0;
    // SAFETY (all tiles): the features are available (contract) and rows i, i + 1 exist.
    unsafe {
        while i + 2 <= a.m {
            let ys = if a.parts == 1 {
                tile::<1>(w, g, a, i)
            } else {
                tile::<2>(w, g, a, i)
            };
            store_tile(out, n, g, i, &ys);
            i += 2;
        }
        if i < a.m {
            dotprod::group_rows(w, g, a, i, out);
        }
    }
}

/// `acc + w (2x8) * x (2x8)ᵀ`, the 2x2 result row-major in the lanes: SMMLA.
///
/// # Safety
/// NEON and i8mm are available.
#[inline]
#[target_feature(enable = "neon,i8mm")]
unsafe fn smmla(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: SMMLA only reads and writes the named vector registers.
    unsafe {
        asm!(
            "smmla {acc:v}.4s, {w:v}.16b, {x:v}.16b",
            acc = inout(vreg) acc,
            w = in(vreg) w,
            x = in(vreg) x,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// Group g against activation rows i0 and i0 + 1: `[t][l]` is output (i0 + t, 16 g + l).
///
/// # Safety
/// The features of [`group`] are available.
#[inline(always)]
unsafe fn tile<const P: usize>(
    w: &Q8Tiled<'_>,
    g: usize,
    a: &QuantRows,
    i0: usize,
) -> [[f32; GROUP]; 2] {
    let nb = w.blocks();
    assert!(g < w.groups() && i0 + 2 <= a.m && a.parts == P && a.nb == nb);
    assert!(a.bytes.len() == a.m * nb * P * BLOCK);
    let q = w.q()[g * nb * GROUP_BLOCK..(g + 1) * nb * GROUP_BLOCK].as_ptr();
    let s = w.scales()[g * nb * GROUP..(g + 1) * nb * GROUP].as_ptr();
    let x = a.bytes[i0 * nb * P * BLOCK..].as_ptr();
    let xs = a.scales[i0 * nb..].as_ptr();
    // Lanes of pair j: (row 2j, act i0), (2j, i0 + 1), (2j + 1, i0), (2j + 1, i0 + 1).
    let mut sums = [vdupq_n_f32(0.0); 8];
    for b in 0..nb {
        let mut acc = [[vdupq_n_s32(0); 8]; P];
        // SAFETY: b < nb, h < 4, j < 4, p < P: every read is inside this group's weights
        // (nb * 512 bytes, nb * 16 scales) or the two activation rows (nb blocks of P * 32
        // bytes, nb scales), checked above; vld1 needs no alignment.
        unsafe {
            let wb = q.add(b * GROUP_BLOCK);
            // Values 8h..8h + 8: chunks 2h and 2h + 1.
            for h in 0..4 {
                let mut xv = [vdupq_n_s8(0); P];
                for p in 0..P {
                    let x0 = x.add((b * P + p) * BLOCK + 8 * h);
                    let x1 = x.add(((nb + b) * P + p) * BLOCK + 8 * h);
                    xv[p] = vcombine_s8(vld1_s8(x0), vld1_s8(x1));
                }
                for j in 0..4 {
                    let c0 = vreinterpretq_s32_s8(vld1q_s8(wb.add(2 * h * CHUNK + 16 * j)));
                    let c1 = vreinterpretq_s32_s8(vld1q_s8(wb.add((2 * h + 1) * CHUNK + 16 * j)));
                    let pairs = [
                        vreinterpretq_s8_s32(vzip1q_s32(c0, c1)), // rows 4j, 4j + 1
                        vreinterpretq_s8_s32(vzip2q_s32(c0, c1)), // rows 4j + 2, 4j + 3
                    ];
                    for p in 0..P {
                        for e in 0..2 {
                            acc[p][2 * j + e] = smmla(acc[p][2 * j + e], pairs[e], xv[p]);
                        }
                    }
                }
            }
            let sx = [*xs.add(b), *xs.add(nb + b)];
            let sx = vcombine_f32(vld1_f32(sx.as_ptr()), vld1_f32(sx.as_ptr()));
            for r in 0..4 {
                let sw = vld1q_f32(s.add(b * GROUP + 4 * r)); // rows 4r..4r + 4
                let swp = [vzip1q_f32(sw, sw), vzip2q_f32(sw, sw)]; // pairs 2r, 2r + 1
                for e in 0..2 {
                    let j = 2 * r + e;
                    let idot = if P == 2 {
                        vaddq_s32(vshlq_n_s32::<7>(acc[0][j]), acc[1][j])
                    } else {
                        acc[0][j]
                    };
                    let term = vmulq_f32(vmulq_f32(swp[e], sx), vcvtq_f32_s32(idot));
                    sums[j] = vaddq_f32(sums[j], term);
                }
            }
        }
    }
    let mut ys = [[0f32; GROUP]; 2];
    for j in 0..8 {
        let mut lanes = [0f32; 4];
        // SAFETY: `lanes` holds 4 floats.
        unsafe { vst1q_f32(lanes.as_mut_ptr(), sums[j]) };
        ys[0][2 * j] = lanes[0];
        ys[1][2 * j] = lanes[1];
        ys[0][2 * j + 1] = lanes[2];
        ys[1][2 * j + 1] = lanes[3];
    }
    ys
}
