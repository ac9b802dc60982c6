//! NEON: two registers of 4 lanes for each key row of the scores, 4 columns per register for
//! the value sums; f16 rows widened with `fcvtl`.

use std::arch::aarch64::*;
use std::ops::Range;

use super::{dot_tail, Row};
use crate::quant::reduce8;

/// Queries handled together: two accumulators each, the key chunk loaded once.
const G: usize = 4;

/// # Safety
/// NEON is available; qs (g, hd), keys (n, hd), out (g, n).
#[target_feature(enable = "neon")]
pub(super) unsafe fn group_dots<E: Row>(qs: &[f32], keys: &[E], hd: usize, out: &mut [f32]) {
    let (g, n) = (qs.len() / hd, keys.len() / hd);
    if hd < 8 {
        for slot in 0..n {
            for r in 0..g {
                out[r * n + slot] = super::dot(&qs[r * hd..][..hd], &keys[slot * hd..][..hd]);
            }
        }
        return;
    }
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

/// Scores of the first R queries of `qs` against the n keys into `out` (R, n). When hd is a
/// multiple of 8, runs of 4 slots are reduced together ([`reduce4x8`]).
///
/// # Safety
/// NEON is available; qs holds R rows of hd, keys n rows, out R rows of n; hd >= 8.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn dots<const R: usize, E: Row>(
    qs: &[f32],
    keys: &[E],
    hd: usize,
    n: usize,
    out: &mut [f32],
) {
    assert!(qs.len() >= R * hd && keys.len() >= n * hd && out.len() >= R * n && hd >= 8);
    let full = hd / 8 * 8;
    let (qp, kp, op) = (qs.as_ptr(), keys.as_ptr(), out.as_mut_ptr());
    let mut slot = 0;
    if full == hd {
        while slot + 4 <= n {
            let mut rows = [[[vdupq_n_f32(0.0); 2]; 4]; R];
            for t in 0..4 {
                // SAFETY: slot + t < n; forwarded contract.
                let acc = unsafe { slot_dots::<R, E>(qp, kp, hd, slot + t) };
                for r in 0..R {
                    rows[r][t] = acc[r];
                }
            }
            for r in 0..R {
                // SAFETY: r < R rows of n scores, slot + 4 <= n.
                unsafe { vst1q_f32(op.add(r * n + slot), reduce4x8(&rows[r])) };
            }
            slot += 4;
        }
    }
    while slot < n {
        // SAFETY: slot < n; forwarded contract.
        let acc = unsafe { slot_dots::<R, E>(qp, kp, hd, slot) };
        for r in 0..R {
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` holds 8 floats.
            unsafe {
                vst1q_f32(lanes.as_mut_ptr(), acc[r][0]);
                vst1q_f32(lanes.as_mut_ptr().add(4), acc[r][1]);
            }
            dot_tail(
                &mut lanes,
                &qs[r * hd..][..hd],
                &keys[slot * hd..][..hd],
                full,
            );
            out[r * n + slot] = reduce8(&lanes);
        }
        slot += 1;
    }
}

/// The 8 lane sums (two registers) of R queries against the key of `slot` over its first
/// `hd / 8 * 8` columns, `dot`'s lanes: lane l sums the products of columns l, l + 8, ...
/// in order.
///
/// # Safety
/// NEON is available; qp points to R rows of hd floats, kp to more than `slot` rows of hd
/// elements; hd >= 8.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn slot_dots<const R: usize, E: Row>(
    qp: *const f32,
    kp: *const E,
    hd: usize,
    slot: usize,
) -> [[float32x4_t; 2]; R] {
    let full = hd / 8 * 8;
    // SAFETY: slot is a row of hd keys, r < R rows of hd queries, c + 8 <= full <= hd.
    unsafe {
        let k = kp.add(slot * hd);
        let (k0, k1) = (E::load4(k), E::load4(k.add(4)));
        let mut acc = [[k0, k1]; R];
        for r in 0..R {
            let q = qp.add(r * hd);
            acc[r] = [
                vmulq_f32(vld1q_f32(q), k0),
                vmulq_f32(vld1q_f32(q.add(4)), k1),
            ];
        }
        let mut c = 8;
        while c < full {
            let (k0, k1) = (E::load4(k.add(c)), E::load4(k.add(c + 4)));
            for r in 0..R {
                let q = qp.add(r * hd + c);
                acc[r][0] = vaddq_f32(acc[r][0], vmulq_f32(vld1q_f32(q), k0));
                acc[r][1] = vaddq_f32(acc[r][1], vmulq_f32(vld1q_f32(q.add(4)), k1));
            }
            c += 8;
        }
        acc
    }
}

/// [`reduce8`] of each of 4 slots' 8 lanes (low 4, high 4), in slot order:
/// `(l + l4)` for l < 4, then `(s0 + s2)`, `(s1 + s3)`, then their sum, the transposes
/// riding along with the additions.
#[inline]
#[target_feature(enable = "neon")]
fn reduce4x8(rows: &[[float32x4_t; 2]; 4]) -> float32x4_t {
    let s4 = rows.map(|[lo, hi]| vaddq_f32(lo, hi));
    // [s4_0 + s4_2, s4_1 + s4_3] of slots a and b: [a0, a1, b0, b1] + [a2, a3, b2, b3].
    let pair = |a: float32x4_t, b: float32x4_t| {
        let (a, b) = (vreinterpretq_f64_f32(a), vreinterpretq_f64_f32(b));
        vaddq_f32(
            vreinterpretq_f32_f64(vtrn1q_f64(a, b)),
            vreinterpretq_f32_f64(vtrn2q_f64(a, b)),
        )
    };
    let (ab, cd) = (pair(s4[0], s4[1]), pair(s4[2], s4[3]));
    vaddq_f32(vuzp1q_f32(ab, cd), vuzp2q_f32(ab, cd))
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

/// `kernels::scale_max` on 4 lanes (the maximum does not depend on the order; `fmaxnm`
/// ignores NaN as `f32::max` does).
///
/// # Safety
/// NEON is available.
#[target_feature(enable = "neon")]
pub(super) unsafe fn scale_max(row: &mut [f32], scale: f32) -> f32 {
    let full = row.len() / 4 * 4;
    let p = row.as_mut_ptr();
    let mut m = vdupq_n_f32(f32::NEG_INFINITY);
    for j in (0..full).step_by(4) {
        // SAFETY: j + 4 <= full <= row.len().
        unsafe {
            let x = vmulq_n_f32(vld1q_f32(p.add(j)), scale);
            vst1q_f32(p.add(j), x);
            m = vmaxnmq_f32(x, m);
        }
    }
    let mut max = vmaxnmvq_f32(m);
    for x in &mut row[full..] {
        *x *= scale;
        max = max.max(*x);
    }
    max
}

/// `kernels::exp` of 4 lanes.
#[inline]
#[target_feature(enable = "neon")]
fn exp4(x: float32x4_t) -> float32x4_t {
    use super::{EXP_MIN, EXP_POLY, LN2_HI, LN2_LO, LOG2E};
    let valid = vcgeq_f32(x, vdupq_n_f32(EXP_MIN));
    let n = vrndmq_f32(vaddq_f32(vmulq_n_f32(x, LOG2E), vdupq_n_f32(0.5)));
    let r = vsubq_f32(vsubq_f32(x, vmulq_n_f32(n, LN2_HI)), vmulq_n_f32(n, LN2_LO));
    let mut p = vdupq_n_f32(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = vaddq_f32(vmulq_f32(p, r), vdupq_n_f32(c));
    }
    let er = vaddq_f32(
        vaddq_f32(vmulq_f32(p, vmulq_f32(r, r)), r),
        vdupq_n_f32(1.0),
    );
    // Lanes outside the range hold garbage here; the mask zeroes them.
    let bits = vshlq_n_s32::<23>(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)));
    let e = vmulq_f32(er, vreinterpretq_f32_s32(bits));
    vreinterpretq_f32_u32(vandq_u32(valid, vreinterpretq_u32_f32(e)))
}

/// `kernels::exp_sum` with lanes 0-3 and 4-7 in two registers.
///
/// # Safety
/// NEON is available.
#[target_feature(enable = "neon")]
pub(super) unsafe fn exp_sum(row: &mut [f32], max: f32) -> f32 {
    let full = row.len() / 8 * 8;
    let p = row.as_mut_ptr();
    let m = vdupq_n_f32(max);
    let (mut lo, mut hi) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
    for j in (0..full).step_by(8) {
        // SAFETY: j + 8 <= full <= row.len().
        unsafe {
            let a = exp4(vsubq_f32(vld1q_f32(p.add(j)), m));
            let b = exp4(vsubq_f32(vld1q_f32(p.add(j + 4)), m));
            vst1q_f32(p.add(j), a);
            vst1q_f32(p.add(j + 4), b);
            lo = vaddq_f32(lo, a);
            hi = vaddq_f32(hi, b);
        }
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe {
        vst1q_f32(lanes.as_mut_ptr(), lo);
        vst1q_f32(lanes.as_mut_ptr().add(4), hi);
    }
    super::exp_tail(&mut lanes, row, max, full);
    reduce8(&lanes)
}
