//! The converter's parallelism: a tensor's rows split into one contiguous run per thread,
//! each run on its own scoped thread (the first on the caller). Rows are independent in
//! every step that is split (dequantizing, fitting int8 blocks, carrying Q8_0 blocks), so
//! the result does not depend on the thread count.

use std::ops::Range;

use super::Q8Blocks;
use crate::quant::{quantize_q8_fitted, BLOCK};

/// `rows` split into at most `threads` contiguous runs of nearly equal length.
fn runs(rows: usize, threads: usize) -> Vec<Range<usize>> {
    let parts = threads.clamp(1, rows.max(1));
    (0..parts)
        .map(|i| rows * i / parts..rows * (i + 1) / parts)
        .collect()
}

/// `f(run)` for each run of rows, in parallel; the results in row order.
pub fn map_rows<T: Send>(
    rows: usize,
    threads: usize,
    f: impl Fn(Range<usize>) -> T + Sync,
) -> Vec<T> {
    let mut runs = runs(rows, threads).into_iter();
    let Some(first) = runs.next() else {
        return Vec::new();
    };
    std::thread::scope(|s| {
        let f = &f;
        let others: Vec<_> = runs.map(|r| s.spawn(move || f(r))).collect();
        let mut out = vec![f(first)];
        for h in others {
            match h.join() {
                Ok(v) => out.push(v),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}

/// Fills `a` (rows of `a_row` values) and `b` (rows of `b_row` values) in parallel:
/// `f(first_row, a_rows, b_rows)` for each run of rows.
pub fn fill_rows<A: Send, B: Send>(
    threads: usize,
    (a, a_row): (&mut [A], usize),
    (b, b_row): (&mut [B], usize),
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    let rows = a.len().checked_div(a_row).unwrap_or(0);
    debug_assert_eq!(a.len(), rows * a_row);
    debug_assert_eq!(b.len(), rows * b_row);
    let mut parts = Vec::new();
    let (mut a, mut b) = (a, b);
    for r in runs(rows, threads) {
        let (a_run, a_rest) = std::mem::take(&mut a).split_at_mut(r.len() * a_row);
        let (b_run, b_rest) = std::mem::take(&mut b).split_at_mut(r.len() * b_row);
        parts.push((r.start, a_run, b_run));
        (a, b) = (a_rest, b_rest);
    }
    let mut parts = parts.into_iter();
    let Some((first, a0, b0)) = parts.next() else {
        return;
    };
    std::thread::scope(|s| {
        let f = &f;
        let others: Vec<_> = parts
            .map(|(start, a, b)| s.spawn(move || f(start, a, b)))
            .collect();
        f(first, a0, b0);
        for h in others {
            if let Err(panic) = h.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
}

/// The (n, k) weight `w` as int8 blocks of 32 with fitted scales, rows split over
/// `threads` threads.
pub fn quantize_rows(w: &[f32], n: usize, k: usize, threads: usize) -> Q8Blocks {
    let parts = map_rows(n, threads, |r| {
        quantize_q8_fitted(&w[r.start * k..r.end * k], r.len(), k)
    });
    let mut q = Vec::with_capacity(n * k); // (n, k)
    let mut scales = Vec::with_capacity(n * k.div_ceil(BLOCK)); // (n, k / 32)
    for (pq, ps) in parts {
        q.extend(pq.iter().map(|&v| v as u8));
        scales.extend(ps);
    }
    Q8Blocks {
        shape: [n, k],
        q,
        scales,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cover_every_row_once() {
        assert_eq!(runs(10, 3), vec![0..3, 3..6, 6..10]);
        assert_eq!(runs(2, 8), vec![0..1, 1..2]);
        assert_eq!(runs(0, 4), vec![0..0]);
    }

    #[test]
    fn split_quantization_equals_one_thread() {
        let (n, k) = (7, 70);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let (q, s) = quantize_q8_fitted(&w, n, k);
        for threads in [1, 2, 3, 16] {
            let b = quantize_rows(&w, n, k, threads);
            assert_eq!(b.shape, [n, k]);
            assert_eq!(
                b.q,
                q.iter().map(|&v| v as u8).collect::<Vec<_>>(),
                "{threads}"
            );
            assert_eq!(b.scales, s, "{threads}");
        }
    }

    #[test]
    fn fill_rows_hands_each_run_its_first_row() {
        let mut a = vec![0usize; 5 * 3];
        let mut b = vec![0usize; 5];
        fill_rows(2, (&mut a, 3), (&mut b, 1), |first, a, b| {
            for (i, row) in a.chunks_mut(3).enumerate() {
                row.fill(first + i);
                b[i] = 10 * (first + i);
            }
        });
        assert_eq!(a, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]);
        assert_eq!(b, [0, 10, 20, 30, 40]);
    }
}
