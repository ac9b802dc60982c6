//! NEON: two registers of 4 lanes for each key row of the scores, 4 columns per register for
//! the value sums; f16 rows widened with `fcvtl`.

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
