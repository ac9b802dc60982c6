//! x86_64 AVX-512 VNNI kernel: one zmm lane per weight row, so a chunk (16 rows x 4 values,
//! 64 bytes) is one register and `vpdpbusd` against 4 activation bytes broadcast from memory
//! adds 4 products to each of the 16 rows.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes: the weights are the unsigned operand as
//! `w ^ 0x80 = w + 128` (one xor per chunk, shared by the tile's activation rows) and each
//! block's accumulator starts from the activation block's bias (`QuantRows::bias`), which
//! cancels the `128 * sum(v)` the offset adds. Q15 keeps one accumulator per part; the block's
//! dot product is `(hi << 7) + lo`. Then the float steps of the module documentation, lane by
//! lane.
//!
//! A tile is one group (16 rows) against up to 8 activation rows: for Q15, 16 accumulators
//! and 8 float sums stay in registers; every weight chunk is loaded once per tile.

// Kernels index several arrays (rows of a tile, parts) with one counter; index loops say
// that most plainly and, unlike iterator adapters with closures, always inline into the
// `target_feature` functions.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::acts::QuantRows;
use super::{store_tile, Q8Tiled, CHUNK, CHUNKS, GROUP, GROUP_BLOCK, QUAD};
use crate::quant::format::BLOCK;
use crate::quant::OutRows;

/// How many group-blocks ahead a one-row product prefetches its weights.
const PREFETCH_BLOCKS: usize = 4;

/// Group g (16 weight rows) against every activation row of `a` (form `Unsigned`).
///
/// # Safety
/// The CPU must support AVX-512F, AVX-512BW and AVX-512 VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn group(w: &Q8Tiled<'_>, g: usize, a: &QuantRows, out: &mut OutRows<'_>) {
    // SAFETY: forwarded contract.
    unsafe {
        if a.parts == 1 {
            group_parts::<1>(w, g, a, out)
        } else {
            group_parts::<2>(w, g, a, out)
        }
    }
}

/// [`group`] for activations of P parts.
///
/// # Safety
/// As [`group`].
#[inline(always)]
unsafe fn group_parts<const P: usize>(
    w: &Q8Tiled<'_>,
    g: usize,
    a: &QuantRows,
    out: &mut OutRows<'_>,
) {
    let n = w.n();
    let mut i = 0;
    // SAFETY (all tiles): the features are available (contract) and rows i..i + M exist.
    unsafe {
        while i + 8 <= a.m {
            store_tile(out, n, g, i, &tile::<P, 8>(w, g, a, i));
            i += 8;
        }
        if i + 4 <= a.m {
            store_tile(out, n, g, i, &tile::<P, 4>(w, g, a, i));
            i += 4;
        }
        if i + 2 <= a.m {
            store_tile(out, n, g, i, &tile::<P, 2>(w, g, a, i));
            i += 2;
        }
        if i < a.m {
            store_tile(out, n, g, i, &tile::<P, 1>(w, g, a, i));
        }
    }
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
    assert!(a.bytes.len() == a.m * nb * P * BLOCK && a.bias.len() == a.m * nb);
    let q = w.q()[g * nb * GROUP_BLOCK..(g + 1) * nb * GROUP_BLOCK].as_ptr();
    let s = w.scales()[g * nb * GROUP..(g + 1) * nb * GROUP].as_ptr();
    let x = a.bytes[i0 * nb * P * BLOCK..].as_ptr();
    let (bias, xs) = (a.bias[i0 * nb..].as_ptr(), a.scales[i0 * nb..].as_ptr());
    let offset = _mm512_set1_epi8(-128);
    let mut sums = [_mm512_setzero_ps(); M];
    for b in 0..nb {
        if M == 1 {
            // One activation row (decode): the weights stream from memory once, as one
            // sequential run across the groups; prefetching a few blocks ahead hides part
            // of the latency. Prefetches never fault; `wrapping_add` keeps the address
            // arithmetic defined past the matrix end.
            let ahead = q.wrapping_add((b + PREFETCH_BLOCKS) * GROUP_BLOCK);
            for line in 0..GROUP_BLOCK / 64 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line * 64));
            }
        }
        let mut acc = [[_mm512_setzero_si512(); M]; P];
        // SAFETY: b < nb, t < M, c < 8, p < P: every read is inside this group's weights
        // (nb * 512 bytes, nb * 16 scales) or the tile's activation rows (M rows of nb
        // blocks of P * 32 bytes, nb biases and scales), checked above; loadu needs no
        // alignment.
        unsafe {
            for t in 0..M {
                acc[0][t] = _mm512_set1_epi32(*bias.add(t * nb + b));
            }
            for c in 0..CHUNKS {
                let wv = _mm512_loadu_si512(q.add(b * GROUP_BLOCK + c * CHUNK).cast());
                let wv = _mm512_xor_si512(wv, offset);
                for p in 0..P {
                    for t in 0..M {
                        let xp = x.add(((t * nb + b) * P + p) * BLOCK + c * QUAD);
                        let xv = _mm512_set1_epi32(xp.cast::<i32>().read_unaligned());
                        acc[p][t] = _mm512_dpbusd_epi32(acc[p][t], wv, xv);
                    }
                }
            }
            let sw = _mm512_loadu_ps(s.add(b * GROUP));
            for t in 0..M {
                let idot = if P == 2 {
                    _mm512_add_epi32(_mm512_slli_epi32::<7>(acc[0][t]), acc[1][t])
                } else {
                    acc[0][t]
                };
                let scale = _mm512_mul_ps(sw, _mm512_set1_ps(*xs.add(t * nb + b)));
                sums[t] = _mm512_add_ps(sums[t], _mm512_mul_ps(scale, _mm512_cvtepi32_ps(idot)));
            }
        }
    }
    let mut ys = [[0f32; GROUP]; M];
    for t in 0..M {
        // SAFETY: `ys[t]` holds 16 floats.
        unsafe { _mm512_storeu_ps(ys[t].as_mut_ptr(), sums[t]) };
    }
    ys
}
