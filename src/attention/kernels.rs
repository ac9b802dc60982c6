//! Row kernels of the ring attention for one grouped-query group: the scores of G queries
//! against every key row, and the probability-weighted sum of the value rows into G outputs.
//! Each key and value row is read once for the whole group.
//!
//! The scalar code defines the arithmetic and the SIMD twins compute the same bits. Which
//! code runs follows the model's [`Kernel`]: AVX2 for `avx2` and AVX-512 for `avx512` (x86_64,
//! with F16C), NEON for `neon` and `dotprod` (aarch64), the scalar code for `scalar` and on
//! armv7:
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

    /// The 8 elements at `a` in the low half and the 8 at `b` in the high half, as f32.
    ///
    /// # Safety
    /// AVX-512F is available; `a` and `b` each point to 8 readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8x2(a: *const Self, b: *const Self) -> std::arch::x86_64::__m512;

    /// The 16 elements at `p`, as f32.
    ///
    /// # Safety
    /// AVX-512F is available; `p` points to 16 readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;

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

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load8x2(a: *const f32, b: *const f32) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: forwarded contract.
        unsafe {
            let lo = _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_loadu_ps(a)));
            let hi = _mm256_castps_pd(_mm256_loadu_ps(b));
            _mm512_castpd_ps(_mm512_insertf64x4::<1>(lo, hi))
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: forwarded contract.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
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

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx2")]
    unsafe fn load8x2(a: *const f16, b: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: forwarded contract; f16 is a plain 2-byte value, read unaligned.
        unsafe {
            let lo = _mm256_castsi128_si256(_mm_loadu_si128(a.cast::<__m128i>()));
            let hi = _mm_loadu_si128(b.cast::<__m128i>());
            _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(lo, hi))
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: forwarded contract; f16 is a plain 2-byte value, read unaligned.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast::<__m256i>())) }
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

/// Whether `kernel` runs the AVX-512 code (beside the AVX2 code it falls back on).
#[cfg(target_arch = "x86_64")]
fn x86_avx512(kernel: Kernel) -> bool {
    kernel == Kernel::Avx512 && x86_simd(kernel)
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
    if x86_avx512(kernel) {
        // SAFETY: the guard checked AVX-512F, AVX2 and F16C; lengths checked above.
        return unsafe { avx512::group_dots(qs, keys, hd, out) };
    }
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
    if x86_avx512(kernel) {
        // SAFETY: the guard checked AVX-512F, AVX2 and F16C; lengths checked above.
        return unsafe { avx512::group_axpys(probs, values, hd, cols, outs) };
    }
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

/// `row[j] *= scale` for every slot; returns the largest product (the rows of a block every
/// query may see: no masking).
pub(super) fn scale_max(kernel: Kernel, row: &mut [f32], scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if x86_avx512(kernel) {
        // SAFETY: the guard checked AVX-512F and AVX2.
        return unsafe { avx512::scale_max(row, scale) };
    }
    #[cfg(target_arch = "x86_64")]
    if x86_simd(kernel) {
        // SAFETY: the guard checked AVX2.
        return unsafe { avx2::scale_max(row, scale) };
    }
    #[cfg(target_arch = "aarch64")]
    if neon_simd(kernel) {
        // SAFETY: the guard checked NEON.
        return unsafe { neon::scale_max(row, scale) };
    }
    let _ = kernel;
    let mut max = f32::NEG_INFINITY;
    for x in row.iter_mut() {
        *x *= scale;
        max = max.max(*x);
    }
    max
}

/// `row[j] = exp(row[j] - max)` with [`exp`]; returns their sum in `dot`'s lane order (lane
/// l adds the slots j ≡ l (mod 8) in increasing j, starting from +0; [`reduce8`]).
pub(super) fn exp_sum(kernel: Kernel, row: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if x86_avx512(kernel) {
        // SAFETY: the guard checked AVX-512F and AVX2.
        return unsafe { avx512::exp_sum(row, max) };
    }
    #[cfg(target_arch = "x86_64")]
    if x86_simd(kernel) {
        // SAFETY: the guard checked AVX2.
        return unsafe { avx2::exp_sum(row, max) };
    }
    #[cfg(target_arch = "aarch64")]
    if neon_simd(kernel) {
        // SAFETY: the guard checked NEON.
        return unsafe { neon::exp_sum(row, max) };
    }
    let _ = kernel;
    let mut lanes = [0f32; 8];
    exp_tail(&mut lanes, row, max, 0);
    reduce8(&lanes)
}

/// Continues `exp_sum`'s lanes from slot `start`.
#[inline(always)]
fn exp_tail(lanes: &mut [f32; 8], row: &mut [f32], max: f32, start: usize) {
    for j in start..row.len() {
        row[j] = exp(row[j] - max);
        lanes[j % 8] += row[j];
    }
}

/// Below this, [`exp`] is 0 (e^-87 ≈ 1.6e-38, the smallest normal float's neighbourhood).
pub(super) const EXP_MIN: f32 = -87.0;
/// log2(e), and ln 2 in two parts (the high part exact in few bits, so `n * LN2_HI` is
/// exact for the n that occur).
pub(super) const LOG2E: f32 = std::f32::consts::LOG2_E;
pub(super) const LN2_HI: f32 = 355.0 / 512.0;
pub(super) const LN2_LO: f32 = -2.121_944_4e-4;
/// The polynomial of `exp(r)` on |r| <= ln2/2 (Cephes' `expf`), highest degree first.
pub(super) const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// e^x for x <= 0 as every attention kernel computes it (SIMD twins give the same bits):
/// 0 below [`EXP_MIN`] (and for -inf and NaN); else `n = floor(x log2e + 1/2)`,
/// `r = (x - n LN2_HI) - n LN2_LO`, `p = EXP_POLY` by Horner in r,
/// `e^r = ((p r²) + r) + 1`, times 2^n from the exponent bits; every product rounded, then
/// added (no fused multiply-add). Within 2 ulp of e^x; used instead of the C library's
/// `expf` because it vectorizes, and the softmax runs it once per score.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    if x.is_nan() || x < EXP_MIN {
        return 0.0;
    }
    let n = (x * LOG2E + 0.5).floor();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        p = p * r + c;
    }
    let er = (p * (r * r) + r) + 1.0;
    // n is in -126..=0 here, so 2^n is a normal float.
    er * f32::from_bits(((n as i32 + 127) as u32) << 23)
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
mod avx2;

#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(target_arch = "aarch64")]
mod neon;

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
                for n in [1, 2, 7, 33, 50] {
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

    /// The softmax steps of every available kernel against the scalar code, over lengths
    /// with and without a tail, with masked (-inf) slots, scores far below the maximum
    /// (0 after [`exp`]) and a NaN.
    #[test]
    fn softmax_twins_equal_scalar_bit_for_bit() {
        for n in [1, 3, 7, 8, 9, 15, 16, 17, 24, 31, 33, 64] {
            let mut scores: Vec<f32> = values(n, 9).iter().map(|x| x * 40.0).collect();
            scores[n / 2] = f32::NEG_INFINITY;
            if n > 4 {
                scores[3] = -300.0;
                scores[n - 1] = f32::NAN;
            }
            let run = |kernel: Kernel| {
                let mut row = scores.clone();
                let max = scale_max(kernel, &mut row, 0.37);
                let scaled = bits(&row);
                let sum = exp_sum(kernel, &mut row, max);
                (max.to_bits(), scaled, bits(&row), sum.to_bits())
            };
            let reference = run(Kernel::Scalar);
            for kernel in Kernel::available() {
                assert_eq!(run(kernel), reference, "{kernel} n {n}");
            }
        }
    }

    /// [`exp`] against f64's over its range: within 2 ulp (relative 2.4e-7) where the
    /// result is a normal float, 0 below [`EXP_MIN`] and for -inf and NaN, 1 at 0.
    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            if want > f32::MIN_POSITIVE as f64 * 2.0 {
                worst = worst.max((got - want).abs() / want);
            }
        }
        assert!(worst < 2.4e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-87.5), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::NAN), 0.0);
    }

    #[test]
    fn exp_sum_is_the_lane_order_of_the_documentation() {
        // 9 zeros after the maximum: every slot is exp(0) = 1; lane 0 gets two.
        let mut row = vec![0f32; 9];
        let sum = exp_sum(Kernel::Scalar, &mut row, 0.0);
        assert_eq!(row, vec![1f32; 9]);
        assert_eq!(sum, reduce8(&[2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]));
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
