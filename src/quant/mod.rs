//! The int8 block format (Q8: 32 int8 + one f32 scale) and its kernels.

/// Quantizes an (n, k) f32 matrix into int8 blocks of 32 along k: (q (n, k), scales (n, ceil(k/32))).
pub fn quantize_q8(w: &[f32], n: usize, k: usize) -> (Vec<i8>, Vec<f32>) {
    let nb = k.div_ceil(32);
    let mut q = vec![0i8; n * k];
    let mut s = vec![0f32; n * nb];
    for r in 0..n {
        for b in 0..nb {
            let (lo, hi) = (r * k + b * 32, r * k + ((b + 1) * 32).min(k));
            let amax = w[lo..hi].iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            s[r * nb + b] = d;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            for i in lo..hi {
                q[i] = (w[i] * id).round() as i8;
            }
        }
    }
    (q, s)
}
