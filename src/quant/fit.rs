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
                let err: f32 = x
                    .iter()
                    .map(|v| {
                        let e = v - (v / d).round().clamp(-127.0, 127.0) * d;
                        e * e
                    })
                    .sum();
                if err < best.0 {
                    best = (err, d);
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
}
