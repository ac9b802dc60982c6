//! x86_64 AVX2 kernel (no VNNI): int16 products. Each 16-byte quarter of a chunk (4 rows x 4
//! values) is sign-extended to 16 int16 and `vpmaddwd` against the chunk's 4 activation
//! integers (form `Wide`, broadcast as one 64-bit pattern) gives one i32 per (row, pair of
//! values); the accumulators of a block hold rows 0..4, 4..8, 8..12, 12..16. At the block's
//! end two `vphaddd` per 8 rows give the exact row sums, in the lane order
//! [0, 1, 4, 5, 2, 3, 6, 7] (`vphaddd` works within 128-bit halves), so the row scales are
//! permuted to that order and the float sums are put back in row order at the end.
//!
//! The int16 form makes Q8 and Q15 the same code (|w * v| pair sums < 2^23).
//! A tile is one group against 2 activation rows (8 integer accumulators, 4 float sums).

// Kernels index several arrays (rows of a tile, quarters) with one counter; index loops say
// that most plainly and always inline into the `target_feature` functions.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::acts::QuantRows;
use super::{store_tile, Q8Tiled, CHUNK, CHUNKS, GROUP, GROUP_BLOCK, QUAD};
use crate::quant::format::BLOCK;
use crate::quant::OutRows;

/// Group g (16 weight rows) against every activation row of `a` (form `Wide`).
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn group(w: &Q8Tiled<'_>, g: usize, a: &QuantRows, out: &mut OutRows<'_>) {
    let n = w.n();
    let mut i = 0;
    // SAFETY (all tiles): AVX2 is available (contract) and rows i..i + M exist.
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

/// Group g against activation rows i0..i0 + M: `[t][l]` is output (i0 + t, 16 g + l).
///
/// # Safety
/// AVX2 is available.
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
    // Lane i of an 8-row half holds row ORDER[i] of that half (an involution, so the same
    // index vector also puts the lanes back in row order).
    let order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
    let mut sums = [[_mm256_setzero_ps(); 2]; M]; // per row: rows 0..8, 8..16, lane order
    for b in 0..nb {
        let mut acc = [[_mm256_setzero_si256(); 4]; M];
        // SAFETY: b < nb, t < M, c < 8, j < 4: every read is inside this group's weights
        // (nb * 512 bytes, nb * 16 scales) or the tile's activation rows (M rows of nb
        // blocks of 32 int16, nb scales), checked above; loadu needs no alignment.
        unsafe {
            for c in 0..CHUNKS {
                let wp = q.add(b * GROUP_BLOCK + c * CHUNK);
                let mut xv = [_mm256_setzero_si256(); M];
                for t in 0..M {
                    let xp = x.add((t * nb + b) * BLOCK + c * QUAD);
                    xv[t] = _mm256_set1_epi64x(xp.cast::<i64>().read_unaligned());
                }
                for j in 0..4 {
                    let wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(wp.add(16 * j).cast()));
                    for t in 0..M {
                        acc[t][j] = _mm256_add_epi32(acc[t][j], _mm256_madd_epi16(wv, xv[t]));
                    }
                }
            }
            let sw = [
                _mm256_permutevar8x32_ps(_mm256_loadu_ps(s.add(b * GROUP)), order),
                _mm256_permutevar8x32_ps(_mm256_loadu_ps(s.add(b * GROUP + 8)), order),
            ];
            for t in 0..M {
                let sx = _mm256_set1_ps(*xs.add(t * nb + b));
                for h in 0..2 {
                    let idot = _mm256_hadd_epi32(acc[t][2 * h], acc[t][2 * h + 1]);
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
            let p = ys[t].as_mut_ptr();
            _mm256_storeu_ps(p, _mm256_permutevar8x32_ps(sums[t][0], order));
            _mm256_storeu_ps(p.add(8), _mm256_permutevar8x32_ps(sums[t][1], order));
        }
    }
    ys
}
