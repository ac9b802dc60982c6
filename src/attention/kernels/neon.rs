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
