//! Row kernels of the ring attention for one grouped-query group: the scores of G queries
//! against every key row, and the probability-weighted sum of the value rows into G outputs.
//! Each key and value row is read once for the whole group.
//!
//! The scalar code defines the arithmetic and the SIMD twins compute the same bits. Which
//! code runs follows the model's [`Kernel`]: AVX2 for `avx2` and `avx512` (x86_64), NEON for
//! `neon` and `dotprod` (aarch64), the scalar code for `scalar`:
//! - `dot(a, b)`: 8 lanes, lane l sums `a[j] * b[j]` for j ≡ l (mod 8), j increasing, each
//!   product rounded and then added (no FMA), the first 8 products starting the lanes; the
//!   lanes are reduced in [`reduce8`]'s order.
//! - `axpy`: `y[j] = y[j] + p * x[j]` (product rounded, then added), value rows in slot order.
//!
//! f16 storage always runs the scalar code (the conversion is exact, so it is the same
//! arithmetic).

// Kernels index several arrays (queries of the group, lanes) with one counter.
#![allow(clippy::needless_range_loop)]

use std::any::TypeId;
use std::ops::Range;

use crate::kv_cache::Elem;
use crate::quant::{reduce8, Kernel};

/// `rows` as f32 when E is f32 (the SIMD paths read f32 storage only).
fn as_f32<E: Elem + 'static>(rows: &[E]) -> Option<&[f32]> {
    if TypeId::of::<E>() == TypeId::of::<f32>() {
        // SAFETY: E is f32 (same type), so the slice is reinterpreted as itself.
        Some(unsafe { std::slice::from_raw_parts(rows.as_ptr().cast::<f32>(), rows.len()) })
    } else {
        None
    }
}

/// `out[g * n + slot] = dot(qs[g], keys[slot])` for queries qs (G, hd) and keys (n, hd).
pub(super) fn group_dots<E: Elem + 'static>(
    kernel: Kernel,
    qs: &[f32],
    keys: &[E],
    hd: usize,
    out: &mut [f32],
) {
    let (g, n) = (qs.len() / hd, keys.len() / hd);
    assert!(qs.len() == g * hd && keys.len() == n * hd && out.len() == g * n);
    match (kernel, as_f32(keys)) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the guard checked that this CPU runs the kernel, and avx2 and avx512 imply
        // AVX2; lengths checked above.
        (Kernel::Avx2 | Kernel::Avx512, Some(keys)) if kernel.is_available() => unsafe {
            avx2::group_dots(qs, keys, hd, out)
        },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: the guard checked that this CPU runs the kernel, and neon and dotprod imply
        // NEON; lengths checked above.
        (Kernel::Neon | Kernel::Dotprod, Some(keys)) if kernel.is_available() => unsafe {
            neon::group_dots(qs, keys, hd, out)
        },
        _ => {
            for (slot, k) in keys.chunks_exact(hd).enumerate() {
                for (gi, q) in qs.chunks_exact(hd).enumerate() {
                    out[gi * n + slot] = dot(q, k);
                }
            }
        }
    }
}

/// `outs[g][cols] += sum over slots of probs[g * n + slot] * values[slot][cols]`, slots in
/// order, for probs (G, n), values (n, hd), outs (G, hd); the other columns are untouched.
/// A column's result does not depend on which other columns are computed with it.
pub(super) fn group_axpys<E: Elem + 'static>(
    kernel: Kernel,
    probs: &[f32],
    values: &[E],
    hd: usize,
    cols: Range<usize>,
    outs: &mut [f32],
) {
    let (g, n) = (outs.len() / hd, values.len() / hd);
    assert!(outs.len() == g * hd && values.len() == n * hd && probs.len() == g * n);
    assert!(cols.start <= cols.end && cols.end <= hd);
    match (kernel, as_f32(values)) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the guard checked that this CPU runs the kernel, and avx2 and avx512 imply
        // AVX2; lengths checked above.
        (Kernel::Avx2 | Kernel::Avx512, Some(values)) if kernel.is_available() => unsafe {
            avx2::group_axpys(probs, values, hd, cols, outs)
        },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: the guard checked that this CPU runs the kernel, and neon and dotprod imply
        // NEON; lengths checked above.
        (Kernel::Neon | Kernel::Dotprod, Some(values)) if kernel.is_available() => unsafe {
            neon::group_axpys(probs, values, hd, cols, outs)
        },
        _ => {
            for (slot, v) in values.chunks_exact(hd).enumerate() {
                for (gi, o) in outs.chunks_exact_mut(hd).enumerate() {
                    let p = probs[gi * n + slot];
                    for (y, x) in o[cols.clone()].iter_mut().zip(&v[cols.clone()]) {
                        *y += p * x.get();
                    }
                }
            }
        }
    }
}

/// The scalar `dot` (see the module documentation).
pub fn dot<E: Elem>(a: &[f32], b: &[E]) -> f32 {
    let mut lanes = [0f32; 8];
    let start = if a.len() >= 8 {
        for l in 0..8 {
            lanes[l] = a[l] * b[l].get();
        }
        8
    } else {
        0
    };
    dot_tail(&mut lanes, a, b, start);
    reduce8(&lanes)
}

/// Continues `dot`'s lanes from column `start`.
#[inline(always)]
fn dot_tail<E: Elem>(lanes: &mut [f32; 8], a: &[f32], b: &[E], start: usize) {
    for j in start..a.len() {
        lanes[j % 8] += a[j] * b[j].get();
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::dot_tail;
    use crate::quant::reduce8;

    /// Queries handled together: one accumulator each, the key chunk loaded once.
    const G: usize = 4;

    /// # Safety
    /// AVX2 is available; qs (g, hd), keys (n, hd), out (g, n).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn group_dots(qs: &[f32], keys: &[f32], hd: usize, out: &mut [f32]) {
        let (g, n) = (qs.len() / hd, keys.len() / hd);
        let mut g0 = 0;
        while g0 < g {
            let qs = &qs[g0 * hd..];
            let out = &mut out[g0 * n..];
            // SAFETY: forwarded contract; each instance reads its first `G'` queries.
            unsafe {
                match g - g0 {
                    1 => dots::<1>(qs, keys, hd, n, out),
                    2 => dots::<2>(qs, keys, hd, n, out),
                    3 => dots::<3>(qs, keys, hd, n, out),
                    _ => dots::<G>(qs, keys, hd, n, out),
                }
            }
            g0 += G;
        }
    }

    /// Scores of the first R queries of `qs` against the n keys into `out` (R, n).
    ///
    /// # Safety
    /// AVX2 is available; qs holds R rows of hd, keys n rows, out R rows of n.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dots<const R: usize>(qs: &[f32], keys: &[f32], hd: usize, n: usize, out: &mut [f32]) {
        assert!(qs.len() >= R * hd && keys.len() >= n * hd && out.len() >= R * n);
        let full = hd / 8 * 8;
        if full == 0 {
            for slot in 0..n {
                for r in 0..R {
                    out[r * n + slot] = super::dot(&qs[r * hd..][..hd], &keys[slot * hd..][..hd]);
                }
            }
            return;
        }
        let (qp, kp) = (qs.as_ptr(), keys.as_ptr());
        for slot in 0..n {
            // SAFETY: slot < n rows of hd keys, r < R rows of hd queries, c + 8 <= hd.
            let acc: [__m256; R] = unsafe {
                let k = kp.add(slot * hd);
                let k0 = _mm256_loadu_ps(k);
                let mut acc = [k0; R];
                for r in 0..R {
                    acc[r] = _mm256_mul_ps(_mm256_loadu_ps(qp.add(r * hd)), k0);
                }
                let mut c = 8;
                while c < full {
                    let kc = _mm256_loadu_ps(k.add(c));
                    for r in 0..R {
                        let q = _mm256_loadu_ps(qp.add(r * hd + c));
                        acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(q, kc));
                    }
                    c += 8;
                }
                acc
            };
            for r in 0..R {
                out[r * n + slot] = if full == hd {
                    reduce(acc[r])
                } else {
                    let mut lanes = [0f32; 8];
                    // SAFETY: `lanes` holds 8 floats.
                    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r]) };
                    dot_tail(
                        &mut lanes,
                        &qs[r * hd..][..hd],
                        &keys[slot * hd..][..hd],
                        full,
                    );
                    reduce8(&lanes)
                };
            }
        }
    }

    /// [`reduce8`] of the 8 lanes of `v`, in the same order.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn reduce(v: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<0b01>(s2, s2)))
    }

    /// Output columns handled together per query (4 registers each).
    const COLS: usize = 32;

    /// # Safety
    /// AVX2 is available; probs (g, n), values (n, hd), outs (g, hd), cols.end <= hd.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn group_axpys(
        probs: &[f32],
        values: &[f32],
        hd: usize,
        cols: Range<usize>,
        outs: &mut [f32],
    ) {
        let (g, n) = (outs.len() / hd, values.len() / hd);
        let mut g0 = 0;
        while g0 < g {
            let probs = &probs[g0 * n..];
            let outs = &mut outs[g0 * hd..];
            // SAFETY: forwarded contract; each instance updates its first `G'` outputs.
            unsafe {
                let cols = cols.clone();
                match g - g0 {
                    1 => axpys::<1>(probs, values, hd, n, cols, outs),
                    2 => axpys::<2>(probs, values, hd, n, cols, outs),
                    3 => axpys::<3>(probs, values, hd, n, cols, outs),
                    _ => axpys::<G>(probs, values, hd, n, cols, outs),
                }
            }
            g0 += G;
        }
    }

    /// Columns `cols` of the first R outputs of `outs` (R, hd) += probs (R, n) times values
    /// (n, hd).
    ///
    /// # Safety
    /// AVX2 is available; the slices hold the rows named; cols.end <= hd.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn axpys<const R: usize>(
        probs: &[f32],
        values: &[f32],
        hd: usize,
        n: usize,
        cols: Range<usize>,
        outs: &mut [f32],
    ) {
        assert!(probs.len() >= R * n && values.len() >= n * hd && outs.len() >= R * hd);
        assert!(cols.end <= hd);
        let (pp, vp, op) = (probs.as_ptr(), values.as_ptr(), outs.as_mut_ptr());
        let (mut c0, end) = (cols.start, cols.end);
        // Column blocks of 32, then of 8, each kept in registers over all slots.
        while c0 + COLS <= end {
            // SAFETY: c0 + 32 <= hd columns of every row; slot < n, r < R.
            unsafe {
                let mut acc = [[_mm256_setzero_ps(); 4]; R];
                for r in 0..R {
                    for c in 0..4 {
                        acc[r][c] = _mm256_loadu_ps(op.add(r * hd + c0 + 8 * c));
                    }
                }
                for slot in 0..n {
                    let v = vp.add(slot * hd + c0);
                    let mut vs = [_mm256_setzero_ps(); 4];
                    for c in 0..4 {
                        vs[c] = _mm256_loadu_ps(v.add(8 * c));
                    }
                    for r in 0..R {
                        let p = _mm256_broadcast_ss(&*pp.add(r * n + slot));
                        for c in 0..4 {
                            acc[r][c] = _mm256_add_ps(acc[r][c], _mm256_mul_ps(p, vs[c]));
                        }
                    }
                }
                for r in 0..R {
                    for c in 0..4 {
                        _mm256_storeu_ps(op.add(r * hd + c0 + 8 * c), acc[r][c]);
                    }
                }
            }
            c0 += COLS;
        }
        while c0 + 8 <= end {
            // SAFETY: c0 + 8 <= hd columns of every row; slot < n, r < R.
            unsafe {
                let mut acc = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    acc[r] = _mm256_loadu_ps(op.add(r * hd + c0));
                }
                for slot in 0..n {
                    let v = _mm256_loadu_ps(vp.add(slot * hd + c0));
                    for r in 0..R {
                        let p = _mm256_broadcast_ss(&*pp.add(r * n + slot));
                        acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(p, v));
                    }
                }
                for r in 0..R {
                    _mm256_storeu_ps(op.add(r * hd + c0), acc[r]);
                }
            }
            c0 += 8;
        }
        for c in c0..end {
            for slot in 0..n {
                let v = values[slot * hd + c];
                for r in 0..R {
                    outs[r * hd + c] += probs[r * n + slot] * v;
                }
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;
    use std::ops::Range;

    use super::dot_tail;
    use crate::quant::reduce8;

    /// # Safety
    /// NEON is available; qs (g, hd), keys (n, hd), out (g, n).
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn group_dots(qs: &[f32], keys: &[f32], hd: usize, out: &mut [f32]) {
        let (g, n) = (qs.len() / hd, keys.len() / hd);
        let full = hd / 8 * 8;
        for slot in 0..n {
            let k = &keys[slot * hd..][..hd];
            for r in 0..g {
                let q = &qs[r * hd..][..hd];
                if full == 0 {
                    out[r * n + slot] = super::dot(q, k);
                    continue;
                }
                // SAFETY: c + 8 <= full <= hd floats of both rows.
                let (lo, hi) = unsafe {
                    let mut lo = vmulq_f32(vld1q_f32(q.as_ptr()), vld1q_f32(k.as_ptr()));
                    let mut hi =
                        vmulq_f32(vld1q_f32(q.as_ptr().add(4)), vld1q_f32(k.as_ptr().add(4)));
                    let mut c = 8;
                    while c < full {
                        lo = vaddq_f32(
                            lo,
                            vmulq_f32(vld1q_f32(q.as_ptr().add(c)), vld1q_f32(k.as_ptr().add(c))),
                        );
                        hi = vaddq_f32(
                            hi,
                            vmulq_f32(
                                vld1q_f32(q.as_ptr().add(c + 4)),
                                vld1q_f32(k.as_ptr().add(c + 4)),
                            ),
                        );
                        c += 8;
                    }
                    (lo, hi)
                };
                let mut lanes = [0f32; 8];
                // SAFETY: `lanes` holds 8 floats.
                unsafe {
                    vst1q_f32(lanes.as_mut_ptr(), lo);
                    vst1q_f32(lanes.as_mut_ptr().add(4), hi);
                }
                dot_tail(&mut lanes, q, k, full);
                out[r * n + slot] = reduce8(&lanes);
            }
        }
    }

    /// # Safety
    /// NEON is available; probs (g, n), values (n, hd), outs (g, hd), cols.end <= hd.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn group_axpys(
        probs: &[f32],
        values: &[f32],
        hd: usize,
        cols: Range<usize>,
        outs: &mut [f32],
    ) {
        let (g, n) = (outs.len() / hd, values.len() / hd);
        let full = cols.start + (cols.end - cols.start) / 4 * 4;
        for slot in 0..n {
            let v = &values[slot * hd..][..hd];
            for r in 0..g {
                let p = probs[r * n + slot];
                let o = &mut outs[r * hd..][..hd];
                let mut c = cols.start;
                while c < full {
                    // SAFETY: c + 4 <= hd floats of both rows.
                    unsafe {
                        let y = vaddq_f32(
                            vld1q_f32(o.as_ptr().add(c)),
                            vmulq_n_f32(vld1q_f32(v.as_ptr().add(c)), p),
                        );
                        vst1q_f32(o.as_mut_ptr().add(c), y);
                    }
                    c += 4;
                }
                for c in full..cols.end {
                    o[c] += p * v[c];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::prelude::f16;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(0x9e37_79b9).rotate_left(13);
                (h % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    #[test]
    fn simd_twins_equal_scalar_bit_for_bit() {
        for hd in [1, 4, 8, 12, 16, 40, 64, 72] {
            for g in 1..=6 {
                for n in [1, 2, 7, 33] {
                    let qs = values(g * hd, 1);
                    let keys = values(n * hd, 2);
                    let probs = values(g * n, 3);
                    let start = values(g * hd, 4);
                    let run = |kernel: Kernel| {
                        let mut scores = vec![0f32; g * n];
                        group_dots(kernel, &qs, &keys, hd, &mut scores);
                        let mut outs = start.clone();
                        group_axpys(kernel, &probs, &keys, hd, 0..hd, &mut outs);
                        // Column ranges: each column as when computed with all the others.
                        let mut split = start.clone();
                        let mid = (hd / 2) / 8 * 8 + hd % 3;
                        for cols in [mid..hd, 0..mid] {
                            group_axpys(kernel, &probs, &keys, hd, cols, &mut split);
                        }
                        assert_eq!(bits(&split), bits(&outs), "{kernel} hd {hd} columns split");
                        (bits(&scores), bits(&outs))
                    };
                    let reference = run(Kernel::Scalar);
                    for kernel in Kernel::available() {
                        assert_eq!(run(kernel), reference, "{kernel} hd {hd} g {g} n {n}");
                    }
                }
            }
        }
    }

    #[test]
    fn f16_rows_use_the_same_arithmetic() {
        let (hd, g, n) = (64, 3, 5);
        let qs = values(g * hd, 5);
        let keys = values(n * hd, 6);
        let halves: Vec<f16> = keys.iter().map(|&x| f16::from_f32(x)).collect();
        let widened: Vec<f32> = halves.iter().map(|h| h.to_f32()).collect();
        let mut a = vec![0f32; g * n];
        let mut b = vec![0f32; g * n];
        group_dots(Kernel::best(), &qs, &halves, hd, &mut a);
        group_dots(Kernel::best(), &qs, &widened, hd, &mut b);
        assert_eq!(bits(&a), bits(&b));
    }

    #[test]
    fn dot_is_the_lane_order_of_the_documentation() {
        // 9 values: lane 0 gets a0 b0 + a8 b8, the others one product each.
        let a: Vec<f32> = (1..=9).map(|i| i as f32).collect();
        let b = vec![1f32; 9];
        let lanes = [1.0 + 9.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        assert_eq!(dot(&a, &b), reduce8(&lanes));
        assert_eq!(dot(&a, &b), 45.0);
    }
}
