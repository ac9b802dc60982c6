//! The Q8F32 loop over output rows and activation tiles, shared by the SIMD variants: each
//! supplies its two inner kernels ([`F32Tiles`]), and its `target_feature` entry point calls
//! [`q8f32`], which inlines into it.
//!
//! One activation row (decode): [`MV_ROWS`] weight rows at a time. Several activation rows
//! (prefill): tiles of [`MM_ACTS`] activation rows (then 4, then 1) against one weight row
//! at a time, over chunks of [`MM_ROWS`] weight rows so a tile stays in L1 while the chunk
//! reuses it.

use std::ops::Range;

use super::{OutRows, Q8Matrix};

/// Weight rows of a matrix-vector product computed together: R independent accumulator
/// chains, and each activation block loaded into registers once for all of them.
const MV_ROWS: usize = 4;

/// Activation rows computed together against one weight row in a matrix-matrix product:
/// each weight block is widened once and reused from registers for all of them.
const MM_ACTS: usize = 8;

/// Weight rows multiplied with one tile of activation rows before the next tile (their
/// bytes stay in L1 and the tile, at most 8 x 1536 f32, in L1/L2).
const MM_ROWS: usize = 16;

/// The inner Q8F32 kernels of one instruction set.
pub(super) trait F32Tiles {
    /// Weight rows r0..r0 + R of `w` against one activation vector x (k).
    ///
    /// # Safety
    /// The instruction set is available; r0 + R <= n and `x.len() == k`.
    unsafe fn rows<const R: usize>(w: &Q8Matrix<'_>, r0: usize, x: &[f32]) -> [f32; R];

    /// Weight row r of `w` against activation rows i0..i0 + T of x (m, k).
    ///
    /// # Safety
    /// The instruction set is available; r < n and `x` holds at least i0 + T rows of k.
    unsafe fn acts<const T: usize>(w: &Q8Matrix<'_>, r: usize, x: &[f32], i0: usize) -> [f32; T];
}

/// Scheme Q8F32 for output columns `rows`, x (m, k), with the kernels of `K`.
///
/// # Safety
/// `K`'s instruction set is available.
#[inline(always)]
pub(super) unsafe fn q8f32<K: F32Tiles>(
    w: &Q8Matrix<'_>,
    x: &[f32],
    rows: Range<usize>,
    out: &mut OutRows<'_>,
) {
    let k = w.k();
    let m = x.len() / k;
    assert!(x.len() == m * k && rows.end <= w.n());
    if m == 1 {
        let mut r = rows.start;
        while r + MV_ROWS <= rows.end {
            // SAFETY: the instruction set is available (contract); rows r..r + MV_ROWS
            // exist and x has length k (checked above).
            let ys = unsafe { K::rows::<MV_ROWS>(w, r, x) };
            for (j, y) in ys.into_iter().enumerate() {
                out.set(0, r + j, y);
            }
            r += MV_ROWS;
        }
        for r in r..rows.end {
            // SAFETY: as above, for one row.
            let [y] = unsafe { K::rows::<1>(w, r, x) };
            out.set(0, r, y);
        }
        return;
    }
    let mut chunk = rows.start;
    while chunk < rows.end {
        let chunk_rows = chunk..(chunk + MM_ROWS).min(rows.end);
        let mut i = 0;
        while i + MM_ACTS <= m {
            for r in chunk_rows.clone() {
                // SAFETY: the instruction set is available; row r exists, x rows
                // i..i + MM_ACTS exist (checked above).
                let ys = unsafe { K::acts::<MM_ACTS>(w, r, x, i) };
                for (t, y) in ys.into_iter().enumerate() {
                    out.set(i + t, r, y);
                }
            }
            i += MM_ACTS;
        }
        while i + 4 <= m {
            for r in chunk_rows.clone() {
                // SAFETY: as above, for 4 activation rows.
                let ys = unsafe { K::acts::<4>(w, r, x, i) };
                for (t, y) in ys.into_iter().enumerate() {
                    out.set(i + t, r, y);
                }
            }
            i += 4;
        }
        for i in i..m {
            for r in chunk_rows.clone() {
                // SAFETY: as above, for one activation row.
                let [y] = unsafe { K::acts::<1>(w, r, x, i) };
                out.set(i, r, y);
            }
        }
        chunk = chunk_rows.end;
    }
}
