//! x86_64 AVX-VNNI kernel (256-bit `vpdpbusd`, for CPUs with VNNI but without AVX-512): the
//! AVX-512 kernel's arithmetic with 8 rows per vector, so a chunk is two ymm registers
//! (rows 0..8 and 8..16). Weights enter as `w ^ 0x80`, each block's accumulators start from
//! the activation block's bias, Q15's block dot product is `(hi << 7) + lo` (see `avx512.rs`).
//!
//! With 16 ymm registers, a tile is one group against 2 activation rows for Q15 (8
//! accumulators, 4 float sums) or 3 for Q8.

// Kernels index several arrays (rows of a tile, halves, parts) with one counter; index loops
// say that most plainly and always inline into the `target_feature` functions.
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
/// The CPU must support AVX2 and AVX-VNNI.
#[target_feature(enable = "avx2,avxvnni")]
pub(super) unsafe fn group(w: &Q8Tiled<'_>, g: usize, a: &QuantRows, out: &mut OutRows<'_>) {
    let n = w.n();
    let mut i = 0;
    // SAFETY (all tiles): the features are available (contract) and rows i..i + M exist.
    unsafe {
        if a.parts == 1 {
            while i + 3 <= a.m {
                store_tile(out, n, g, i, &tile::<1, 3>(w, g, a, i));
                i += 3;
            }
            while i < a.m {
                store_tile(out, n, g, i, &tile::<1, 1>(w, g, a, i));
                i += 1;
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
    let offset = _mm256_set1_epi8(-128);
    let mut sums = [[_mm256_setzero_ps(); 2]; M]; // per row: rows 0..8, 8..16 of the group
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
        let mut acc = [[[_mm256_setzero_si256(); 2]; M]; P];
        // SAFETY: b < nb, t < M, c < 8, p < P, h < 2: every read is inside this group's
        // weights (nb * 512 bytes, nb * 16 scales) or the tile's activation rows (M rows of
        // nb blocks of P * 32 bytes, nb biases and scales), checked above; loadu needs no
        // alignment.
        unsafe {
            for t in 0..M {
                let bv = _mm256_set1_epi32(*bias.add(t * nb + b));
                acc[0][t] = [bv, bv];
            }
            for c in 0..CHUNKS {
                let wp = q.add(b * GROUP_BLOCK + c * CHUNK);
                let wv = [
                    _mm256_xor_si256(_mm256_loadu_si256(wp.cast()), offset),
                    _mm256_xor_si256(_mm256_loadu_si256(wp.add(32).cast()), offset),
                ];
                for p in 0..P {
                    for t in 0..M {
                        let xp = x.add(((t * nb + b) * P + p) * BLOCK + c * QUAD);
                        let xv = _mm256_set1_epi32(xp.cast::<i32>().read_unaligned());
                        for h in 0..2 {
                            acc[p][t][h] = _mm256_dpbusd_avx_epi32(acc[p][t][h], wv[h], xv);
                        }
                    }
                }
            }
            let sw = [
                _mm256_loadu_ps(s.add(b * GROUP)),
                _mm256_loadu_ps(s.add(b * GROUP + 8)),
            ];
            for t in 0..M {
                let sx = _mm256_set1_ps(*xs.add(t * nb + b));
                for h in 0..2 {
                    let idot = if P == 2 {
                        _mm256_add_epi32(_mm256_slli_epi32::<7>(acc[0][t][h]), acc[1][t][h])
                    } else {
                        acc[0][t][h]
                    };
                    let scale = _mm256_mul_ps(sw[h], sx);
                    let term = _mm256_mul_ps(scale, _mm256_cvtepi32_ps(idot));
                    sums[t][h] = _mm256_add_ps(sums[t][h], term);
                }
            }
        }
    }
    let mut ys = [[0f32; GROUP]; M];
    for t in 0..M {
        // SAFETY: `ys[t]` holds 16 floats.
        unsafe {
            _mm256_storeu_ps(ys[t].as_mut_ptr(), sums[t][0]);
            _mm256_storeu_ps(ys[t].as_mut_ptr().add(8), sums[t][1]);
        }
    }
    ys
}
