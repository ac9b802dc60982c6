//! AVX-512: the AVX2 arithmetic on 16 lanes. The scores take two key rows per register (8
//! lanes each, so each row's lanes and reduction stay those of `dot`); the value sums take
//! 16 columns per register (columns are independent). What does not fill a register runs
//! the AVX2 code.

use std::arch::x86_64::*;
use std::ops::Range;

use super::avx2::{self, reduce, G};
use super::Row;

/// # Safety
/// AVX-512F, AVX2 and F16C are available; qs (g, hd), keys (n, hd), out (g, n).
#[target_feature(enable = "avx512f,avx2,f16c")]
pub(super) unsafe fn group_dots<E: Row>(qs: &[f32], keys: &[E], hd: usize, out: &mut [f32]) {
    if !hd.is_multiple_of(8) {
        // SAFETY: forwarded contract.
        return unsafe { avx2::group_dots(qs, keys, hd, out) };
    }
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

/// Rows ahead of the one being read whose cache lines are requested: the ring's rows are
/// read once per token, mostly from the last-level cache or memory.
const AHEAD: usize = 8;

/// Asks for the cache lines of `len` elements from `p` (prefetches never fault, so `p` may
/// point past the rows; it is computed with `wrapping_add`).
#[inline]
#[target_feature(enable = "avx512f")]
fn prefetch_row<E>(p: *const E, len: usize) {
    let bytes = len * std::mem::size_of::<E>();
    for at in (0..bytes).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(at));
    }
}

/// The 8 floats at `p` in both halves.
///
/// # Safety
/// AVX-512F is available; `p` points to 8 readable floats.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn twice(p: *const f32) -> __m512 {
    // SAFETY: forwarded contract.
    unsafe { _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(p)))) }
}

/// Scores of the first R queries of `qs` against the n keys into `out` (R, n), two
/// slots per register. Runs of 16 slots are reduced together ([`reduce16`]); the rest one
/// pair at a time (an odd last slot fills both halves and keeps the low one).
///
/// # Safety
/// AVX-512F, AVX2 and F16C are available; qs holds R rows of hd, keys n rows, out R rows
/// of n; hd is a positive multiple of 8.
#[inline]
#[target_feature(enable = "avx512f,avx2,f16c")]
unsafe fn dots<const R: usize, E: Row>(
    qs: &[f32],
    keys: &[E],
    hd: usize,
    n: usize,
    out: &mut [f32],
) {
    assert!(qs.len() >= R * hd && keys.len() >= n * hd && out.len() >= R * n);
    assert!(hd >= 8 && hd.is_multiple_of(8));
    let (qp, kp, op) = (qs.as_ptr(), keys.as_ptr(), out.as_mut_ptr());
    let mut slot = 0;
    while slot + 16 <= n {
        let mut pairs = [[_mm512_setzero_ps(); 8]; R];
        for p in 0..8 {
            // SAFETY: slot + 2 p + 1 < n; forwarded contract.
            let acc = unsafe { pair_dots::<R, E>(qp, kp, hd, slot + 2 * p, slot + 2 * p + 1) };
            for r in 0..R {
                pairs[r][p] = acc[r];
            }
        }
        for r in 0..R {
            // SAFETY: r < R rows of n scores, slot + 16 <= n.
            unsafe { _mm512_storeu_ps(op.add(r * n + slot), reduce16(&pairs[r])) };
        }
        slot += 16;
    }
    while slot < n {
        let next = (slot + 1).min(n - 1);
        // SAFETY: slot, next < n; forwarded contract.
        let acc = unsafe { pair_dots::<R, E>(qp, kp, hd, slot, next) };
        for r in 0..R {
            let lo = _mm512_castps512_ps256(acc[r]);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc[r])));
            out[r * n + slot] = reduce(lo);
            if next != slot {
                out[r * n + next] = reduce(hi);
            }
        }
        slot += 2;
    }
}

/// The 8 lane sums of R queries against the keys of `slot` (low half) and `next` (high
/// half), `dot`'s lanes: lane l sums the products of columns l, l + 8, ... in order.
///
/// # Safety
/// AVX-512F and F16C are available; qp points to R rows of hd floats, kp to more than
/// `slot` and `next` rows of hd elements; hd is a positive multiple of 8.
#[inline]
#[target_feature(enable = "avx512f,avx2,f16c")]
unsafe fn pair_dots<const R: usize, E: Row>(
    qp: *const f32,
    kp: *const E,
    hd: usize,
    slot: usize,
    next: usize,
) -> [__m512; R] {
    prefetch_row(kp.wrapping_add((slot + AHEAD) * hd), 2 * hd);
    // SAFETY: slot, next are rows of hd keys, r < R rows of hd queries, c + 8 <= hd.
    unsafe {
        let (ka, kb) = (kp.add(slot * hd), kp.add(next * hd));
        let k0 = E::load8x2(ka, kb);
        let mut acc = [k0; R];
        for r in 0..R {
            acc[r] = _mm512_mul_ps(twice(qp.add(r * hd)), k0);
        }
        let mut c = 8;
        while c < hd {
            let kc = E::load8x2(ka.add(c), kb.add(c));
            for r in 0..R {
                let q = twice(qp.add(r * hd + c));
                acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(q, kc));
            }
            c += 8;
        }
        acc
    }
}

/// The 16 sums of the lane pairs in `pairs` (pair p: slot 2p in the low 8 lanes, 2p + 1 in
/// the high 8), slot order, each with [`reduce`]'s additions: `(l + l4)` for l < 4, then
/// `(s0 + s2)`, `(s1 + s3)`, then their sum. The transposes ride along with the additions,
/// so 16 slots take 22 instructions instead of 16 reductions.
#[inline]
#[target_feature(enable = "avx512f")]
fn reduce16(pairs: &[__m512; 8]) -> __m512 {
    // Per slot, lanes 0-3 plus lanes 4-7: 128-bit lane q of s4[i] holds slot 4 i + q.
    let mut s4 = [_mm512_setzero_ps(); 4];
    for i in 0..4 {
        let (a, b) = (pairs[2 * i], pairs[2 * i + 1]);
        s4[i] = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
        );
    }
    // s4[0] + s4[2] and s4[1] + s4[3]: 128-bit lane q of s2[i] holds (slot 8 i + q) in its
    // low two floats and (slot 8 i + 4 + q) in its high two.
    let mut s2 = [_mm512_setzero_ps(); 2];
    for i in 0..2 {
        let (a, b) = (s4[2 * i], s4[2 * i + 1]);
        s2[i] = _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(a, b),
            _mm512_shuffle_ps::<0b11_10_11_10>(a, b),
        );
    }
    // s2[0] + s2[1]: float 4 q + j holds slot 4 j + q.
    let sums = _mm512_add_ps(
        _mm512_shuffle_ps::<0b10_00_10_00>(s2[0], s2[1]),
        _mm512_shuffle_ps::<0b11_01_11_01>(s2[0], s2[1]),
    );
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(order, sums)
}

/// # Safety
/// AVX-512F, AVX2 and F16C are available; probs (g, n), values (n, hd), outs (g, hd),
/// cols.end <= hd.
#[target_feature(enable = "avx512f,avx2,f16c")]
pub(super) unsafe fn group_axpys<E: Row>(
    probs: &[f32],
    values: &[E],
    hd: usize,
    cols: Range<usize>,
    outs: &mut [f32],
) {
    let (g, n) = (outs.len() / hd, values.len() / hd);
    let split = cols.start + cols.len() / 16 * 16;
    let mut g0 = 0;
    while g0 < g {
        let probs = &probs[g0 * n..];
        let outs = &mut outs[g0 * hd..];
        let wide = cols.start..split;
        // SAFETY: forwarded contract; each instance updates its first `G'` outputs.
        unsafe {
            match g - g0 {
                1 => axpys::<1, E>(probs, values, hd, n, wide, outs),
                2 => axpys::<2, E>(probs, values, hd, n, wide, outs),
                3 => axpys::<3, E>(probs, values, hd, n, wide, outs),
                _ => axpys::<G, E>(probs, values, hd, n, wide, outs),
            }
        }
        g0 += G;
    }
    // SAFETY: forwarded contract.
    unsafe { avx2::group_axpys(probs, values, hd, split..cols.end, outs) }
}

/// Columns `cols` (a multiple of 16 wide) of the first R outputs of `outs` (R, hd) +=
/// probs (R, n) times values (n, hd).
///
/// # Safety
/// AVX-512F, AVX2 and F16C are available; the slices hold the rows named; cols.end <= hd.
#[inline]
#[target_feature(enable = "avx512f,avx2,f16c")]
unsafe fn axpys<const R: usize, E: Row>(
    probs: &[f32],
    values: &[E],
    hd: usize,
    n: usize,
    cols: Range<usize>,
    outs: &mut [f32],
) {
    assert!(probs.len() >= R * n && values.len() >= n * hd && outs.len() >= R * hd);
    assert!(cols.end <= hd && cols.len().is_multiple_of(16));
    let (pp, vp, op) = (probs.as_ptr(), values.as_ptr(), outs.as_mut_ptr());
    let (mut c0, end) = (cols.start, cols.end);
    // Column blocks of 32, then of 16, each kept in registers over all slots.
    while c0 + 32 <= end {
        // SAFETY: c0 + 32 <= hd columns of every row; slot < n, r < R.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            for r in 0..R {
                for c in 0..2 {
                    acc[r][c] = _mm512_loadu_ps(op.add(r * hd + c0 + 16 * c));
                }
            }
            for slot in 0..n {
                prefetch_row(vp.wrapping_add((slot + AHEAD) * hd + c0), 32);
                let v = vp.add(slot * hd + c0);
                let vs = [E::load16(v), E::load16(v.add(16))];
                for r in 0..R {
                    let p = _mm512_set1_ps(*pp.add(r * n + slot));
                    for c in 0..2 {
                        acc[r][c] = _mm512_add_ps(acc[r][c], _mm512_mul_ps(p, vs[c]));
                    }
                }
            }
            for r in 0..R {
                for c in 0..2 {
                    _mm512_storeu_ps(op.add(r * hd + c0 + 16 * c), acc[r][c]);
                }
            }
        }
        c0 += 32;
    }
    if c0 < end {
        // SAFETY: c0 + 16 == end <= hd columns of every row; slot < n, r < R.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); R];
            for r in 0..R {
                acc[r] = _mm512_loadu_ps(op.add(r * hd + c0));
            }
            for slot in 0..n {
                let v = E::load16(vp.add(slot * hd + c0));
                for r in 0..R {
                    let p = _mm512_set1_ps(*pp.add(r * n + slot));
                    acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(p, v));
                }
            }
            for r in 0..R {
                _mm512_storeu_ps(op.add(r * hd + c0), acc[r]);
            }
        }
    }
}

/// `kernels::scale_max` on 16 lanes (the maximum does not depend on the order).
///
/// # Safety
/// AVX-512F and AVX2 are available.
#[target_feature(enable = "avx512f,avx2")]
pub(super) unsafe fn scale_max(row: &mut [f32], scale: f32) -> f32 {
    let full = row.len() / 16 * 16;
    let p = row.as_mut_ptr();
    let (s, mut m) = (_mm512_set1_ps(scale), _mm512_set1_ps(f32::NEG_INFINITY));
    for j in (0..full).step_by(16) {
        // SAFETY: j + 16 <= full <= row.len().
        unsafe {
            let x = _mm512_mul_ps(_mm512_loadu_ps(p.add(j)), s);
            _mm512_storeu_ps(p.add(j), x);
            m = _mm512_max_ps(x, m);
        }
    }
    let mut lanes = [0f32; 16];
    // SAFETY: `lanes` holds 16 floats; the tail runs the AVX2 code.
    unsafe {
        _mm512_storeu_ps(lanes.as_mut_ptr(), m);
        let tail = avx2::scale_max(&mut row[full..], scale);
        lanes.iter().fold(tail, |a, &b| a.max(b))
    }
}

/// `kernels::exp_sum` on 16 lanes: each register's low then high 8 lanes are added to the
/// 8 lane sums, the order of `dot`'s lanes.
///
/// # Safety
/// AVX-512F and AVX2 are available.
#[target_feature(enable = "avx512f,avx2")]
pub(super) unsafe fn exp_sum(row: &mut [f32], max: f32) -> f32 {
    use super::{EXP_MIN, EXP_POLY, LN2_HI, LN2_LO, LOG2E};
    let full = row.len() / 16 * 16;
    let p = row.as_mut_ptr();
    let (m, mut sum) = (_mm512_set1_ps(max), _mm256_setzero_ps());
    for j in (0..full).step_by(16) {
        // SAFETY: j + 16 <= full <= row.len().
        let x = unsafe { _mm512_sub_ps(_mm512_loadu_ps(p.add(j)), m) };
        let valid = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(EXP_MIN));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(
            _mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)), _mm512_set1_ps(0.5)),
        );
        let r = _mm512_sub_ps(
            _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(LN2_HI))),
            _mm512_mul_ps(n, _mm512_set1_ps(LN2_LO)),
        );
        let mut poly = _mm512_set1_ps(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            poly = _mm512_add_ps(_mm512_mul_ps(poly, r), _mm512_set1_ps(c));
        }
        let er = _mm512_add_ps(
            _mm512_add_ps(_mm512_mul_ps(poly, _mm512_mul_ps(r, r)), r),
            _mm512_set1_ps(1.0),
        );
        // Lanes outside the range hold garbage here; the mask zeroes them.
        let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        let e = _mm512_maskz_mul_ps(valid, er, _mm512_castsi512_ps(bits));
        // SAFETY: j + 16 <= row.len().
        unsafe { _mm512_storeu_ps(p.add(j), e) };
        let lo = _mm512_castps512_ps256(e);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e)));
        sum = _mm256_add_ps(_mm256_add_ps(sum, lo), hi);
    }
    let rest = row.len() - full;
    if rest == 0 {
        return reduce(sum);
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
    // What is left (fewer than 16 slots) starts at a multiple of 8, so lane l still gets
    // the slots j ≡ l (mod 8) in order.
    let (mut j, mut e8) = (full, [0f32; 8]);
    if rest >= 8 {
        // SAFETY: j + 8 <= row.len(); `e8` holds 8 floats.
        unsafe {
            let e = avx2::exp8(_mm256_sub_ps(
                _mm256_loadu_ps(p.add(j)),
                _mm256_set1_ps(max),
            ));
            _mm256_storeu_ps(p.add(j), e);
            _mm256_storeu_ps(e8.as_mut_ptr(), e);
        }
        for (lane, e) in lanes.iter_mut().zip(e8) {
            *lane += e;
        }
        j += 8;
    }
    super::exp_tail(&mut lanes, row, max, j);
    crate::quant::reduce8(&lanes)
}
