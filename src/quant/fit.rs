//! The weight quantizer used by the converter: Q8_0 blocks with error-fitted scales.

use super::BLOCK;

/// Quantizes an (n, k) f32 matrix into int8 blocks of 32 along k:
/// (q (n, k), scales (n, ceil(k/32))); the last block of a row may be shorter.
///
/// Each block starts from the Q8_0 scale `max|x| / 127` and keeps whichever of a few
/// slightly smaller scales (clipping the extremes to ±127) gives the least squared error:
/// re-quantizing 4-bit checkpoints this way keeps more of their grid than plain rounding.
pub fn quantize_q8_fitted(w: &[f32], n: usize, k: usize) -> (Vec<i8>, Vec<f32>) {
    let nb = k.div_ceil(BLOCK);
    let mut q = vec![0i8; n * k]; // (n, k)
    let mut s = vec![0f32; n * nb]; // (n, nb)
    for r in 0..n {
        for b in 0..nb {
            let (lo, hi) = (r * k + b * BLOCK, r * k + ((b + 1) * BLOCK).min(k));
            let x = &w[lo..hi];
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            if amax == 0.0 || !amax.is_finite() {
                continue;
            }
            let mut best = (f32::INFINITY, amax / 127.0);
            for step in 0..16 {
                let d = amax / (127.0 + step as f32 * 0.5);
                let err = block_error(x, d);
                if err < best.0 {
                    best = (err, d);
                }
            }
            // A block dequantized from a 4/5-bit format sits on a lattice `m + step * i`:
            // scales `step / j` put every level on the int8 grid up to one shared offset.
            if let Some(step) = lattice_step(x) {
                let jmax = (127.0 * step / amax).floor() as usize;
                for j in 1..=jmax.min(127) {
                    let d = step / j as f32;
                    let err = block_error(x, d);
                    if err < best.0 {
                        best = (err, d);
                    }
                }
            }
            let d = best.1;
            s[r * nb + b] = d;
            for (qi, v) in q[lo..hi].iter_mut().zip(x) {
                *qi = (v / d).round().clamp(-127.0, 127.0) as i8;
            }
        }
    }
    (q, s)
}

/// Squared error of quantizing `x` with scale `d` (clamped to ±127).
fn block_error(x: &[f32], d: f32) -> f32 {
    x.iter()
        .map(|v| {
            let e = v - (v / d).round().clamp(-127.0, 127.0) * d;
            e * e
        })
        .sum()
}

/// The spacing of the lattice `m + step * i` the block's values lie on, if they take at most
/// 16 distinct values (a 4-bit block) whose gaps are whole multiples of the smallest one.
fn lattice_step(x: &[f32]) -> Option<f32> {
    let mut v: Vec<f32> = x.to_vec();
    v.sort_by(f32::total_cmp);
    v.dedup();
    if v.len() < 2 || v.len() > 16 {
        return None;
    }
    let step = v
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(f32::INFINITY, f32::min);
    if step.is_nan() || step <= 0.0 || !step.is_finite() {
        return None;
    }
    let on_lattice = v.windows(2).all(|w| {
        let ratio = (w[1] - w[0]) / step;
        (ratio - ratio.round()).abs() < 1e-3
    });
    on_lattice.then_some(step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_blocks_round_trip_exactly() {
        // A block already on a Q8_0 grid (max at ±127) comes back unchanged.
        let d = 0.015625f32;
        let w: Vec<f32> = (0..32)
            .map(|i| (i as f32 * 8.0 - 127.0).clamp(-127.0, 127.0) * d)
            .collect();
        let (q, s) = quantize_q8_fitted(&w, 1, 32);
        assert_eq!(s, vec![d]);
        for (qi, wi) in q.iter().zip(&w) {
            assert_eq!(*qi as f32 * d, *wi);
        }
    }

    #[test]
    fn ragged_rows_and_zero_blocks() {
        let mut w = vec![0f32; 2 * 40]; // (2, 40): blocks of 32 and 8
        w[40 + 33] = -2.0;
        let (q, s) = quantize_q8_fitted(&w, 2, 40);
        assert_eq!(s.len(), 4);
        assert_eq!((s[0], s[1], s[2]), (0.0, 0.0, 0.0));
        assert_eq!(q[40 + 33] as f32 * s[3], -2.0);
        assert!(q.iter().enumerate().all(|(i, v)| i == 73 || *v == 0));
    }

    #[test]
    fn error_is_no_worse_than_plain_q8_0_rounding() {
        let w: Vec<f32> = (0..96)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let (q, s) = quantize_q8_fitted(&w, 1, 96);
        for b in 0..3 {
            let x = &w[b * 32..(b + 1) * 32];
            let d0 = x.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            let plain: f32 = x.iter().map(|v| (v - (v / d0).round() * d0).powi(2)).sum();
            let ours: f32 = (0..32)
                .map(|i| (x[i] - q[b * 32 + i] as f32 * s[b]).powi(2))
                .sum();
            assert!(ours <= plain, "block {b}: {ours} > {plain}");
        }
    }

    #[test]
    fn four_bit_lattice_blocks_are_kept_closer_than_plain_rounding() {
        // Q4_1-style blocks: m + d * q, q in 0..16, with offsets off the int8 grid.
        for (m, d) in [(-0.0371f32, 0.00513f32), (0.0123, 0.0021), (-0.2, 0.031)] {
            let w: Vec<f32> = (0..32).map(|i| m + d * ((i * 7 % 16) as f32)).collect();
            let amax = w.iter().fold(0f32, |a, v| a.max(v.abs()));
            let (q, s) = quantize_q8_fitted(&w, 1, 32);
            let ours = block_error(&w, s[0]);
            assert_eq!(q.len(), 32);
            assert!(
                ours <= block_error(&w, amax / 127.0),
                "m {m} d {d}: fitted error {ours} above plain Q8_0"
            );
        }
    }

    #[test]
    fn lattice_step_is_found_only_on_lattices() {
        let on: Vec<f32> = (0..32).map(|i| 0.25 + 0.5 * ((i % 5) * 3) as f32).collect();
        assert_eq!(lattice_step(&on), Some(0.5 * 3.0));
        let off: Vec<f32> = (0..32).map(|i| (i as f32).sqrt()).collect();
        assert_eq!(lattice_step(&off), None);
    }
}
