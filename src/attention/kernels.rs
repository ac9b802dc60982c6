//! Row kernels of the ring attention for one grouped-query group: the scores of G queries
//! against every key row, and the probability-weighted sum of the value rows into G outputs.
//! Each key and value row is read once for the whole group.
//!
//! The scalar code defines the arithmetic and the SIMD twins compute the same bits. Which
//! code runs follows the model's [`Kernel`]: AVX2 for `avx2` and `avx512` (x86_64, with F16C),
//! NEON for `neon` and `dotprod` (aarch64), the scalar code for `scalar` and on armv7:
//! - `dot(a, b)`: 8 lanes, lane l sums `a[j] * b[j]` for j ≡ l (mod 8), j increasing, each
//!   product rounded and then added (no FMA), the first 8 products starting the lanes; the
//!   lanes are reduced in [`reduce8`]'s order.
//! - `axpy`: `y[j] = y[j] + p * x[j]` (product rounded, then added), value rows in slot order.
//!
//! Key and value rows are f32 or f16 ([`Row`]). f16 rows are widened to f32 in registers as
//! they are loaded (`vcvtph2ps` on x86_64, `fcvtl` on aarch64); widening is exact, so f16
//! storage runs the same arithmetic on the same values, at half the memory traffic.

// Kernels index several arrays (queries of the group, lanes) with one counter.
#![allow(clippy::needless_range_loop)]

use std::ops::Range;

use tract_onnx::prelude::f16;

use crate::kv_cache::Elem;
use crate::quant::{reduce8, Kernel};

/// A stored key/value element the SIMD kernels load as f32 lanes.
pub trait Row: Elem + 'static {
    /// The 8 elements at `p`, as f32.
    ///
    /// # Safety
    /// AVX2 and F16C are available; `p` points to 8 readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;

    /// The 4 elements at `p`, as f32.
    ///
    /// # Safety
    /// NEON is available; `p` points to 4 readable elements.
    #[cfg(target_arch = "aarch64")]
    unsafe fn load4(p: *const Self) -> std::arch::aarch64::float32x4_t;
}

impl Row for f32 {
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: forwarded contract.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }

    #[cfg(target_arch = "aarch64")]
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load4(p: *const f32) -> std::arch::aarch64::float32x4_t {
        // SAFETY: forwarded contract.
        unsafe { std::arch::aarch64::vld1q_f32(p) }
    }
}

impl Row for f16 {
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: forwarded contract; f16 is a plain 2-byte value, read unaligned.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast::<__m128i>())) }
    }

    #[cfg(target_arch = "aarch64")]
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load4(p: *const f16) -> std::arch::aarch64::float32x4_t {
        use std::arch::aarch64::*;
        // SAFETY: forwarded contract; f16 is a plain 2-byte value, read as u16 bits.
        let h = unsafe { vld1_u16(p.cast::<u16>()) };
        let out: float32x4_t;
        // SAFETY: `fcvtl` (half to single, base ARMv8 Advanced SIMD, no FEAT_FP16 needed)
        // reads and writes registers only. Stable Rust has no f16 vector intrinsics.
        unsafe {
            std::arch::asm!(
                "fcvtl {out:v}.4s, {h:v}.4h",
                h = in(vreg) h,
                out = lateout(vreg) out,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        out
    }
}

/// Whether `kernel` runs the x86_64 SIMD code: AVX2 and F16C (which every AVX2 CPU has; the
/// kernels are compiled with both).
#[cfg(target_arch = "x86_64")]
fn x86_simd(kernel: Kernel) -> bool {
    matches!(kernel, Kernel::Avx2 | Kernel::Avx512)
        && kernel.is_available()
        && is_x86_feature_detected!("f16c")
}

/// Whether `kernel` runs the NEON code (neon and dotprod imply NEON).
#[cfg(target_arch = "aarch64")]
fn neon_simd(kernel: Kernel) -> bool {
    matches!(kernel, Kernel::Neon | Kernel::Dotprod) && kernel.is_available()
}

/// `out[g * n + slot] = dot(qs[g], keys[slot])` for queries qs (G, hd) and keys (n, hd).
pub(super) fn group_dots<E: Row>(
    kernel: Kernel,
    qs: &[f32],
    keys: &[E],
    hd: usize,
    out: &mut [f32],
) {
    let (g, n) = (qs.len() / hd, keys.len() / hd);
    assert!(qs.len() == g * hd && keys.len() == n * hd && out.len() == g * n);
    #[cfg(target_arch = "x86_64")]
    if x86_simd(kernel) {
        // SAFETY: the guard checked AVX2 and F16C; lengths checked above.
        return unsafe { avx2::group_dots(qs, keys, hd, out) };
    }
    #[cfg(target_arch = "aarch64")]
    if neon_simd(kernel) {
        // SAFETY: the guard checked NEON; lengths checked above.
        return unsafe { neon::group_dots(qs, keys, hd, out) };
    }
    let _ = kernel;
    for (slot, k) in keys.chunks_exact(hd).enumerate() {
        for (gi, q) in qs.chunks_exact(hd).enumerate() {
            out[gi * n + slot] = dot(q, k);
        }
    }
}

/// `outs[g][cols] += sum over slots of probs[g * n + slot] * values[slot][cols]`, slots in
/// order, for probs (G, n), values (n, hd), outs (G, hd); the other columns are untouched.
/// A column's result does not depend on which other columns are computed with it.
pub(super) fn group_axpys<E: Row>(
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
    #[cfg(target_arch = "x86_64")]
    if x86_simd(kernel) {
        // SAFETY: the guard checked AVX2 and F16C; lengths checked above.
        return unsafe { avx2::group_axpys(probs, values, hd, cols, outs) };
    }
    #[cfg(target_arch = "aarch64")]
    if neon_simd(kernel) {
        // SAFETY: the guard checked NEON; lengths checked above.
        return unsafe { neon::group_axpys(probs, values, hd, cols, outs) };
    }
    let _ = kernel;
    for (slot, v) in values.chunks_exact(hd).enumerate() {
        for (gi, o) in outs.chunks_exact_mut(hd).enumerate() {
            let p = probs[gi * n + slot];
            for (y, x) in o[cols.clone()].iter_mut().zip(&v[cols.clone()]) {
                *y += p * x.get();
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

    use super::{dot_tail, Row};
    use crate::quant::reduce8;

    /// Queries handled together: one accumulator each, the key chunk loaded once.
    const G: usize = 4;

    /// # Safety
    /// AVX2 and F16C are available; qs (g, hd), keys (n, hd), out (g, n).
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn group_dots<E: Row>(qs: &[f32], keys: &[E], hd: usize, out: &mut [f32]) {
        let (g, n) = (qs.len() / hd, keys.len() / hd);
        let mut g0 = 0;
        while g0 < g {
            let qs = &qs[g0 * hd..];
            let out = &mut out[g0 * n..];
            // SAFETY: forwarded contract; each instance reads its first `G'` queries.
            unsafe {
                match g - g0 {
                    1 => dots::<1, E>(qs, keys, hd, n, out),
                    2 => dots::<2, E>(qs, keys, hd, n, out),
                    3 => dots::<3, E>(qs, keys, hd, n, out),
                    _ => dots::<G, E>(qs, keys, hd, n, out),
                }
            }
            g0 += G;
        }
    }

    /// Scores of the first R queries of `qs` against the n keys into `out` (R, n).
    ///
    /// # Safety
    /// AVX2 and F16C are available; qs holds R rows of hd, keys n rows, out R rows of n.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn dots<const R: usize, E: Row>(
        qs: &[f32],
        keys: &[E],
        hd: usize,
        n: usize,
        out: &mut [f32],
    ) {
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
                let k0 = E::load8(k);
                let mut acc = [k0; R];
                for r in 0..R {
                    acc[r] = _mm256_mul_ps(_mm256_loadu_ps(qp.add(r * hd)), k0);
                }
                let mut c = 8;
                while c < full {
                    let kc = E::load8(k.add(c));
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
    /// AVX2 and F16C are available; probs (g, n), values (n, hd), outs (g, hd),
    /// cols.end <= hd.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn group_axpys<E: Row>(
        probs: &[f32],
        values: &[E],
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
                    1 => axpys::<1, E>(probs, values, hd, n, cols, outs),
                    2 => axpys::<2, E>(probs, values, hd, n, cols, outs),
                    3 => axpys::<3, E>(probs, values, hd, n, cols, outs),
                    _ => axpys::<G, E>(probs, values, hd, n, cols, outs),
                }
            }
            g0 += G;
        }
    }

    /// Columns `cols` of the first R outputs of `outs` (R, hd) += probs (R, n) times values
    /// (n, hd).
    ///
    /// # Safety
    /// AVX2 and F16C are available; the slices hold the rows named; cols.end <= hd.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn axpys<const R: usize, E: Row>(
        probs: &[f32],
        values: &[E],
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
                        vs[c] = E::load8(v.add(8 * c));
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
                    let v = E::load8(vp.add(slot * hd + c0));
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
                let v = values[slot * hd + c].get();
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

    use super::{dot_tail, Row};
    use crate::quant::reduce8;

    /// # Safety
    /// NEON is available; qs (g, hd), keys (n, hd), out (g, n).
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn group_dots<E: Row>(qs: &[f32], keys: &[E], hd: usize, out: &mut [f32]) {
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
                // SAFETY: c + 8 <= full <= hd elements of both rows.
                let (lo, hi) = unsafe {
                    let (qp, kp) = (q.as_ptr(), k.as_ptr());
                    let mut lo = vmulq_f32(vld1q_f32(qp), E::load4(kp));
                    let mut hi = vmulq_f32(vld1q_f32(qp.add(4)), E::load4(kp.add(4)));
                    let mut c = 8;
                    while c < full {
                        lo = vaddq_f32(lo, vmulq_f32(vld1q_f32(qp.add(c)), E::load4(kp.add(c))));
                        hi = vaddq_f32(
                            hi,
                            vmulq_f32(vld1q_f32(qp.add(c + 4)), E::load4(kp.add(c + 4))),
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
    pub(super) unsafe fn group_axpys<E: Row>(
        probs: &[f32],
        values: &[E],
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
                    // SAFETY: c + 4 <= hd elements of both rows.
                    unsafe {
                        let y = vaddq_f32(
                            vld1q_f32(o.as_ptr().add(c)),
                            vmulq_n_f32(E::load4(v.as_ptr().add(c)), p),
                        );
                        vst1q_f32(o.as_mut_ptr().add(c), y);
                    }
                    c += 4;
                }
                for c in full..cols.end {
                    o[c] += p * v[c].get();
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

    /// Every available kernel against the scalar code over rows stored as `E`, with the
    /// value rows split into two column ranges as the parallel decode does.
    fn twins_equal_scalar<E: Row>(store: impl Fn(&[f32]) -> Vec<E>) {
        for hd in [1, 4, 8, 12, 16, 40, 64, 72] {
            for g in 1..=6 {
                for n in [1, 2, 7, 33] {
                    let qs = values(g * hd, 1);
                    let keys = store(&values(n * hd, 2));
                    let rows = store(&values(n * hd, 5));
                    let probs = values(g * n, 3);
                    let start = values(g * hd, 4);
                    let run = |kernel: Kernel| {
                        let mut scores = vec![0f32; g * n];
                        group_dots(kernel, &qs, &keys, hd, &mut scores);
                        let mut outs = start.clone();
                        group_axpys(kernel, &probs, &rows, hd, 0..hd, &mut outs);
                        // Column ranges: each column as when computed with all the others.
                        let mut split = start.clone();
                        let mid = (hd / 2) / 8 * 8 + hd % 3;
                        for cols in [mid..hd, 0..mid] {
                            group_axpys(kernel, &probs, &rows, hd, cols, &mut split);
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
    fn simd_twins_equal_scalar_bit_for_bit() {
        twins_equal_scalar(|v| v.to_vec());
    }

    /// f16 rows, with subnormal halves, ±0 and the largest finite half among them.
    #[test]
    fn f16_simd_twins_equal_scalar_bit_for_bit() {
        twins_equal_scalar(|v| {
            let special = [1e-7, -3e-6, 6.0e-5, -0.0, 0.0, 65504.0, -65504.0];
            v.iter()
                .enumerate()
                .map(|(i, &x)| f16::from_f32(if i % 5 == 0 { special[i % 7] } else { x }))
                .collect()
        });
    }

    #[test]
    fn f16_rows_give_the_bits_of_their_widened_f32_rows() {
        let (hd, g, n) = (64, 3, 5);
        let qs = values(g * hd, 5);
        let probs = values(g * n, 7);
        let halves: Vec<f16> = values(n * hd, 6)
            .iter()
            .map(|&x| f16::from_f32(x))
            .collect();
        let widened: Vec<f32> = halves.iter().map(|h| h.to_f32()).collect();
        for kernel in Kernel::available() {
            let (mut a, mut b) = (vec![0f32; g * n], vec![0f32; g * n]);
            group_dots(kernel, &qs, &halves, hd, &mut a);
            group_dots(kernel, &qs, &widened, hd, &mut b);
            assert_eq!(bits(&a), bits(&b), "{kernel} scores");
            let (mut a, mut b) = (vec![0f32; g * hd], vec![0f32; g * hd]);
            group_axpys(kernel, &probs, &halves, hd, 0..hd, &mut a);
            group_axpys(kernel, &probs, &widened, hd, 0..hd, &mut b);
            assert_eq!(bits(&a), bits(&b), "{kernel} value sums");
        }
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
