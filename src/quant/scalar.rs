//! Portable kernels: the reference every SIMD variant is tested against.
//!
//! They follow the accumulation order documented in the module root exactly, and are written
//! over slices and 8 explicit lanes so the compiler can vectorize them (on armv7, the only
//! path there is, the integer dot products become NEON `vmlal` when built with `+neon`).

use std::ops::Range;

use super::format::{ActInt, QuantActs, BLOCK};
use super::{reduce8, OutRows, Q8Matrix};

/// Exact dot product of one block of int8 weights with int8 or int16 activations (up to 32
/// values: |sum| <= 32 * 128 * 32767 < 2^31, so no i32 overflow).
#[inline(always)]
pub(crate) fn idot<T: ActInt>(w: &[i8], x: &[T]) -> i32 {
    w.iter()
        .zip(x)
        .map(|(&a, &b)| i32::from(a) * b.into())
        .sum()
}

/// Schemes Q8Q8 (`T = i8`) and Q8Q16 (`T = i16`) for one weight row against one quantized
/// activation row.
#[inline(always)]
pub(crate) fn dot_q8q8<T: ActInt>(wq: &[i8], ws: &[f32], xq: &[T], xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (b, (wb, xb)) in wq.chunks(BLOCK).zip(xq.chunks(BLOCK)).enumerate() {
        acc[b % 8] += (ws[b] * xs[b]) * idot(wb, xb) as f32;
    }
    reduce8(&acc)
}

/// Adds block `b` of scheme Q8F32 (`wb`, `xb` up to 32 values, scale `s`) into `acc`.
#[inline(always)]
pub(crate) fn block_q8f32(acc: &mut [f32; 8], wb: &[i8], xb: &[f32], s: f32) {
    let mut lanes = [0f32; 8];
    for (j, (&w, &x)) in wb.iter().zip(xb).enumerate() {
        lanes[j % 8] += f32::from(w) * x;
    }
    for (a, l) in acc.iter_mut().zip(lanes) {
        *a += s * l;
    }
}

/// Scheme Q8F32 for one weight row against one f32 activation row.
#[inline(always)]
pub(crate) fn dot_q8f32(wq: &[i8], ws: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for ((wb, xb), &s) in wq.chunks(BLOCK).zip(x.chunks(BLOCK)).zip(ws) {
        block_q8f32(&mut acc, wb, xb, s);
    }
    reduce8(&acc)
}

/// Schemes Q8Q8 and Q8Q16: `out[i, r] = W[r] · x[i]` for `r` in `rows`, every activation
/// row `i`.
pub(crate) fn q8q8<T: ActInt>(
    w: &Q8Matrix<'_>,
    x: &QuantActs<T>,
    rows: Range<usize>,
    out: &mut OutRows<'_>,
) {
    for r in rows {
        let (wq, ws) = w.row(r);
        for i in 0..x.m {
            let (xq, xs) = x.row(i);
            out.set(i, r, dot_q8q8(wq, ws, xq, xs));
        }
    }
}

/// Scheme Q8F32: `out[i, r] = W[r] · x[i]` for `r` in `rows`, x (m, k).
pub(crate) fn q8f32(w: &Q8Matrix<'_>, x: &[f32], rows: Range<usize>, out: &mut OutRows<'_>) {
    let k = w.k();
    for r in rows {
        let (wq, ws) = w.row(r);
        for (i, xr) in x.chunks_exact(k).enumerate() {
            out.set(i, r, dot_q8f32(wq, ws, xr));
        }
    }
}
