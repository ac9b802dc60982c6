//! The portable GEMM kernel: the reference every SIMD variant is tested against, and the
//! code armv7 runs (fixed-size arrays and 16 row lanes, so it vectorizes with NEON).

// Kernels index several arrays (rows of a tile, lanes, chunks) with one counter; index
// loops say that most plainly.
#![allow(clippy::needless_range_loop)]

use super::acts::QuantRows;
use super::{store_tile, Q8Tiled, CHUNK, CHUNKS, GROUP, GROUP_BLOCK, QUAD};
use crate::quant::format::BLOCK;
use crate::quant::OutRows;

/// Activation rows per tile: each weight group-block is read once for all of them.
const TILE: usize = 4;

/// Group g (16 weight rows) against every activation row of `a` (form `Wide`).
pub(super) fn group(w: &Q8Tiled<'_>, g: usize, a: &QuantRows, out: &mut OutRows<'_>) {
    let mut i = 0;
    while i + TILE <= a.m {
        store_tile(out, w.n(), g, i, &tile::<TILE>(w, g, a, i));
        i += TILE;
    }
    for i in i..a.m {
        store_tile(out, w.n(), g, i, &tile::<1>(w, g, a, i));
    }
}

/// Group g against activation rows i0..i0 + M: `[t][l]` is output (i0 + t, 16 g + l).
#[inline(always)]
fn tile<const M: usize>(w: &Q8Tiled<'_>, g: usize, a: &QuantRows, i0: usize) -> [[f32; GROUP]; M] {
    let nb = w.blocks();
    assert!(i0 + M <= a.m && a.nb == nb);
    let mut acc = [[0f32; GROUP]; M];
    for b in 0..nb {
        let (q, s) = w.group_block(g, b);
        let q: &[i8; GROUP_BLOCK] = q.try_into().expect("a group-block is 512 bytes");
        for t in 0..M {
            let row = (i0 + t) * nb + b;
            let v: &[i16; BLOCK] = a.wide[row * BLOCK..(row + 1) * BLOCK]
                .try_into()
                .expect("a block is 32 values");
            let idot = block_dot(q, v);
            let sx = a.scales[row];
            for l in 0..GROUP {
                acc[t][l] += (s[l] * sx) * idot[l] as f32;
            }
        }
    }
    acc
}

/// The exact dot products of the 16 rows of a group-block with one block of activations.
#[inline(always)]
fn block_dot(q: &[i8; GROUP_BLOCK], v: &[i16; BLOCK]) -> [i32; GROUP] {
    let mut d = [0i32; GROUP];
    for c in 0..CHUNKS {
        for l in 0..GROUP {
            for e in 0..QUAD {
                d[l] += i32::from(q[c * CHUNK + l * QUAD + e]) * i32::from(v[c * QUAD + e]);
            }
        }
    }
    d
}
