//! AVX2 (with F16C for f16 rows): 8 lanes, one key row per register for the scores, 8
//! columns per register for the value sums.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{dot_tail, Row};
use crate::quant::reduce8;

/// Queries handled together: one accumulator each, the key chunk loaded once.
pub(super) const G: usize = 4;

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
    let (qp, kp, op) = (qs.as_ptr(), keys.as_ptr(), out.as_mut_ptr());
    let mut slot = 0;
    if full == hd {
        // Runs of 8 slots reduced together.
        while slot + 8 <= n {
            let mut rows = [[_mm256_setzero_ps(); 8]; R];
            for t in 0..8 {
                // SAFETY: slot + t < n; forwarded contract.
                let acc = unsafe { slot_dots::<R, E>(qp, kp, hd, slot + t) };
                for r in 0..R {
                    rows[r][t] = acc[r];
                }
            }
            for r in 0..R {
                // SAFETY: r < R rows of n scores, slot + 8 <= n.
                unsafe { _mm256_storeu_ps(op.add(r * n + slot), reduce8x8(&rows[r])) };
            }
            slot += 8;
        }
    }
    while slot < n {
        // SAFETY: slot < n; forwarded contract.
        let acc = unsafe { slot_dots::<R, E>(qp, kp, hd, slot) };
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
        slot += 1;
    }
}

/// The 8 lane sums of R queries against the key of `slot` over its first `hd / 8 * 8`
/// columns, `dot`'s lanes: lane l sums the products of columns l, l + 8, ... in order.
///
/// # Safety
/// AVX2 and F16C are available; qp points to R rows of hd floats, kp to more than `slot`
/// rows of hd elements; hd >= 8.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn slot_dots<const R: usize, E: Row>(
    qp: *const f32,
    kp: *const E,
    hd: usize,
    slot: usize,
) -> [__m256; R] {
    let full = hd / 8 * 8;
    // SAFETY: slot is a row of hd keys, r < R rows of hd queries, c + 8 <= full <= hd.
    unsafe {
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
    }
}

/// [`reduce`] of each of 8 registers (8 slots), in slot order: `(l + l4)` for l < 4, then
/// `(s0 + s2)`, `(s1 + s3)`, then their sum, with the transposes riding along with the
/// additions (22 instructions for the 8).
#[inline]
#[target_feature(enable = "avx2")]
fn reduce8x8(rows: &[__m256; 8]) -> __m256 {
    // Per slot, lanes 0-3 plus lanes 4-7: half h of s4[i] holds slot 2 i + h.
    let mut s4 = [_mm256_setzero_ps(); 4];
    for i in 0..4 {
        let (a, b) = (rows[2 * i], rows[2 * i + 1]);
        s4[i] = _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(a, b),
            _mm256_permute2f128_ps::<0x31>(a, b),
        );
    }
    // s4[0] + s4[2] and s4[1] + s4[3]: half h of s2[i] holds (slot 4 i + h) in its low two
    // floats and (slot 4 i + 2 + h) in its high two.
    let mut s2 = [_mm256_setzero_ps(); 2];
    for i in 0..2 {
        let (a, b) = (s4[2 * i], s4[2 * i + 1]);
        s2[i] = _mm256_add_ps(
            _mm256_shuffle_ps::<0b01_00_01_00>(a, b),
            _mm256_shuffle_ps::<0b11_10_11_10>(a, b),
        );
    }
    // s2[0] + s2[1]: float 4 h + j holds slot 2 j + h.
    let sums = _mm256_add_ps(
        _mm256_shuffle_ps::<0b10_00_10_00>(s2[0], s2[1]),
        _mm256_shuffle_ps::<0b11_01_11_01>(s2[0], s2[1]),
    );
    _mm256_permutevar8x32_ps(sums, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// [`reduce8`] of the 8 lanes of `v`, in the same order.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn reduce(v: __m256) -> f32 {
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

/// `kernels::scale_max` on 8 lanes (the maximum does not depend on the order).
///
/// # Safety
/// AVX2 is available.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn scale_max(row: &mut [f32], scale: f32) -> f32 {
    let full = row.len() / 8 * 8;
    let p = row.as_mut_ptr();
    let (s, mut m) = (_mm256_set1_ps(scale), _mm256_set1_ps(f32::NEG_INFINITY));
    for j in (0..full).step_by(8) {
        // SAFETY: j + 8 <= full <= row.len().
        unsafe {
            let x = _mm256_mul_ps(_mm256_loadu_ps(p.add(j)), s);
            _mm256_storeu_ps(p.add(j), x);
            m = _mm256_max_ps(x, m);
        }
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
    let mut max = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for x in &mut row[full..] {
        *x *= scale;
        max = max.max(*x);
    }
    max
}

/// `kernels::exp` of 8 lanes.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn exp8(x: __m256) -> __m256 {
    use super::{EXP_MIN, EXP_POLY, LN2_HI, LN2_LO, LOG2E};
    let valid = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(EXP_MIN));
    let n = _mm256_floor_ps(_mm256_add_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
        _mm256_set1_ps(0.5),
    ));
    let r = _mm256_sub_ps(
        _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(LN2_HI))),
        _mm256_mul_ps(n, _mm256_set1_ps(LN2_LO)),
    );
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c));
    }
    let er = _mm256_add_ps(
        _mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r),
        _mm256_set1_ps(1.0),
    );
    // Lanes outside the range hold garbage here; the mask zeroes them.
    let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_and_ps(valid, _mm256_mul_ps(er, _mm256_castsi256_ps(bits)))
}

/// `kernels::exp_sum` on 8 lanes.
///
/// # Safety
/// AVX2 is available.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn exp_sum(row: &mut [f32], max: f32) -> f32 {
    let full = row.len() / 8 * 8;
    let p = row.as_mut_ptr();
    let (m, mut sum) = (_mm256_set1_ps(max), _mm256_setzero_ps());
    for j in (0..full).step_by(8) {
        // SAFETY: j + 8 <= full <= row.len().
        unsafe {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(j)), m));
            _mm256_storeu_ps(p.add(j), e);
            sum = _mm256_add_ps(sum, e);
        }
    }
    if full == row.len() {
        return reduce(sum);
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
    super::exp_tail(&mut lanes, row, max, full);
    reduce8(&lanes)
}
