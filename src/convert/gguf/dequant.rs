//! Dequantization of ggml tensor types to f32, bit-identical to ggml's reference
//! `dequantize_row_*` (plain multiply and add in the reference's order, never fused).
//!
//! Block layouts follow ggml's `block_*` structs; every scale is an f16 unless noted.

use super::{GgmlType, GgufError};

/// Converts IEEE binary16 bits to f32, exactly (every f16 is an f32; NaN payloads kept).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: shift the leading 1 into the implicit bit, lowering the exponent.
            let shift = man.leading_zeros() - 21;
            sign | ((127 - 15 + 1 - shift) << 23) | (((man << shift) & 0x3ff) << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// Dequantizes `bytes` (whole blocks of `ty`) into `out`, whose length must be the number of
/// values those blocks hold.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    if !ty.can_dequantize() {
        return Err(GgufError::UnsupportedType { ty: ty.name() });
    }
    let (block_len, block_bytes) = (ty.block_len(), ty.block_bytes());
    let fits = out.len().is_multiple_of(block_len)
        && (out.len() / block_len).checked_mul(block_bytes) == Some(bytes.len());
    if !fits {
        return Err(GgufError::SizeMismatch {
            ty: ty.name(),
            bytes: bytes.len(),
            values: out.len(),
        });
    }
    match ty {
        GgmlType::F32 => blocks::<4, 1>(bytes, out, |b, y| y[0] = f32::from_le_bytes(*b)),
        GgmlType::F16 => {
            blocks::<2, 1>(bytes, out, |b, y| y[0] = f16_to_f32(u16::from_le_bytes(*b)))
        }
        GgmlType::BF16 => blocks::<2, 1>(bytes, out, |b, y| {
            y[0] = f32::from_bits(u32::from(u16::from_le_bytes(*b)) << 16)
        }),
        GgmlType::Q4_0 => blocks(bytes, out, q4_0),
        GgmlType::Q4_1 => blocks(bytes, out, q4_1),
        GgmlType::Q5_0 => blocks(bytes, out, q5_0),
        GgmlType::Q5_1 => blocks(bytes, out, q5_1),
        GgmlType::Q8_0 => blocks(bytes, out, q8_0),
        GgmlType::Q2_K => blocks(bytes, out, q2_k),
        GgmlType::Q3_K => blocks(bytes, out, q3_k),
        GgmlType::Q4_K => blocks(bytes, out, q4_k),
        GgmlType::Q5_K => blocks(bytes, out, q5_k),
        GgmlType::Q6_K => blocks(bytes, out, q6_k),
        GgmlType::Q8_K => blocks(bytes, out, q8_k),
        _ => return Err(GgufError::UnsupportedType { ty: ty.name() }),
    }
    Ok(())
}

/// Applies `f` to each `B`-byte block and its `L` output values; lengths checked by the caller.
fn blocks<const B: usize, const L: usize>(
    bytes: &[u8],
    out: &mut [f32],
    f: impl Fn(&[u8; B], &mut [f32; L]),
) {
    let (bs, _) = bytes.as_chunks::<B>();
    let (ys, _) = out.as_chunks_mut::<L>();
    for (b, y) in bs.iter().zip(ys) {
        f(b, y);
    }
}

/// d: f16, qs: 16 bytes of nibbles (low nibbles are values 0..16, high 16..32).
fn q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = (i32::from(qs[j] & 0x0f) - 8) as f32 * d;
        y[j + 16] = (i32::from(qs[j] >> 4) - 8) as f32 * d;
    }
}

/// d, m: f16, qs: 16 bytes of nibbles; value = q * d + m.
fn q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = f32::from(qs[j] & 0x0f) * d + m;
        y[j + 16] = f32::from(qs[j] >> 4) * d + m;
    }
}

/// d: f16, qh: u32 of fifth bits (bit i for value i), qs: 16 bytes of nibbles.
fn q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        let x0 = (u32::from(qs[j] & 0x0f) | h0) as i32 - 16;
        let x1 = (u32::from(qs[j] >> 4) | h1) as i32 - 16;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// d, m: f16, qh: u32 of fifth bits, qs: 16 bytes of nibbles; value = q * d + m.
fn q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        let x0 = u32::from(qs[j] & 0x0f) | h0;
        let x1 = u32::from(qs[j] >> 4) | h1;
        y[j] = x0 as f32 * d + m;
        y[j + 16] = x1 as f32 * d + m;
    }
}

/// d: f16, qs: 32 int8.
fn q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = f32::from(q as i8) * d;
    }
}

/// scales: 16 bytes (low nibble scale, high nibble min), qs: 64 bytes of 2-bit values,
/// d, dmin: f16. 16 groups of 16 values.
fn q2_k(b: &[u8; 84], y: &mut [f32; 256]) {
    let scales = &b[0..16];
    let d = f16_at(b, 80);
    let min = f16_at(b, 82);
    let mut is = 0;
    let mut yi = 0;
    for n in 0..2 {
        let q = &b[16 + 32 * n..16 + 32 * (n + 1)];
        for shift in [0, 2, 4, 6] {
            for half in [0, 16] {
                let sc = scales[is];
                is += 1;
                let dl = d * f32::from(sc & 0x0f);
                let ml = min * f32::from(sc >> 4);
                for &q in &q[half..half + 16] {
                    y[yi] = dl * f32::from((q >> shift) & 3) - ml;
                    yi += 1;
                }
            }
        }
    }
}

/// hmask: 32 bytes of third bits, qs: 64 bytes of 2-bit values, scales: 12 bytes of 6-bit
/// scales, d: f16. 16 groups of 16 values.
fn q3_k(b: &[u8; 110], y: &mut [f32; 256]) {
    let hm = &b[0..32];
    let packed = &b[96..108];
    let d_all = f16_at(b, 108);
    // (16,) scales: low 4 bits from bytes 0..8 (low then high nibbles), top 2 bits from 8..12.
    let mut scales = [0i32; 16];
    for (i, s) in scales.iter_mut().enumerate() {
        let low = if i < 8 {
            packed[i] & 0x0f
        } else {
            packed[i - 8] >> 4
        };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        *s = i32::from(low | (high << 4)) - 32;
    }
    let mut is = 0;
    let mut yi = 0;
    let mut m = 1u8;
    for n in 0..2 {
        let q = &b[32 + 32 * n..32 + 32 * (n + 1)];
        for shift in [0, 2, 4, 6] {
            for half in [0, 16] {
                let dl = d_all * scales[is] as f32;
                is += 1;
                for l in half..half + 16 {
                    let high = if hm[l] & m != 0 { 0 } else { 4 };
                    y[yi] = dl * (i32::from((q[l] >> shift) & 3) - high) as f32;
                    yi += 1;
                }
            }
            m <<= 1;
        }
    }
}

/// The j-th 6-bit (scale, min) pair of a Q4_K/Q5_K block's 12 packed bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// d, dmin: f16, scales: 12 bytes, qs: 128 bytes of nibbles. 8 groups of 32 values.
fn q4_k(b: &[u8; 144], y: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    for j in 0..4 {
        let q = &b[16 + 32 * j..16 + 32 * (j + 1)];
        let (sc, m) = scale_min_k4(2 * j, scales);
        let (d1, m1) = (d * f32::from(sc), min * f32::from(m));
        let (sc, m) = scale_min_k4(2 * j + 1, scales);
        let (d2, m2) = (d * f32::from(sc), min * f32::from(m));
        for l in 0..32 {
            y[64 * j + l] = d1 * f32::from(q[l] & 0x0f) - m1;
            y[64 * j + 32 + l] = d2 * f32::from(q[l] >> 4) - m2;
        }
    }
}

/// d, dmin: f16, scales: 12 bytes, qh: 32 bytes of fifth bits, qs: 128 bytes of nibbles.
fn q5_k(b: &[u8; 176], y: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let (mut u1, mut u2) = (1u8, 2u8);
    for j in 0..4 {
        let ql = &b[48 + 32 * j..48 + 32 * (j + 1)];
        let (sc, m) = scale_min_k4(2 * j, scales);
        let (d1, m1) = (d * f32::from(sc), min * f32::from(m));
        let (sc, m) = scale_min_k4(2 * j + 1, scales);
        let (d2, m2) = (d * f32::from(sc), min * f32::from(m));
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[64 * j + l] = d1 * f32::from((ql[l] & 0x0f) + h1) - m1;
            y[64 * j + 32 + l] = d2 * f32::from((ql[l] >> 4) + h2) - m2;
        }
        u1 <<= 2;
        u2 <<= 2;
    }
}

/// ql: 128 bytes of low nibbles, qh: 64 bytes of high 2-bit pairs, scales: 16 int8, d: f16.
fn q6_k(b: &[u8; 210], y: &mut [f32; 256]) {
    let d = f16_at(b, 208);
    for n in 0..2 {
        let ql = &b[64 * n..64 * (n + 1)];
        let qh = &b[128 + 32 * n..128 + 32 * (n + 1)];
        let sc = &b[192 + 8 * n..192 + 8 * (n + 1)];
        let y = &mut y[128 * n..128 * (n + 1)];
        for l in 0..32 {
            let is = l / 16;
            let q1 = i32::from((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i32::from((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            // (d * scale) * q, in the reference's order.
            y[l] = d * f32::from(sc[is] as i8) * q1 as f32;
            y[l + 32] = d * f32::from(sc[is + 2] as i8) * q2 as f32;
            y[l + 64] = d * f32::from(sc[is + 4] as i8) * q3 as f32;
            y[l + 96] = d * f32::from(sc[is + 6] as i8) * q4 as f32;
        }
    }
}

/// d: f32, qs: 256 int8, bsums: 16 int16 (unused here).
fn q8_k(b: &[u8; 292], y: &mut [f32; 256]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (y, &q) in y.iter_mut().zip(&b[4..260]) {
        *y = d * f32::from(q as i8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every one of the 65536 f16 bit patterns against the value the format defines,
    /// computed independently in f64: (-1)^s * 2^(e-15) * (1 + m/1024), or 2^-14 * m/1024.
    #[test]
    fn f16_to_f32_is_exact_for_every_bit_pattern() {
        for h in 0..=u16::MAX {
            let got = f16_to_f32(h);
            let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
            let e = i32::from((h >> 10) & 0x1f);
            let m = f64::from(h & 0x3ff);
            match e {
                0x1f if m == 0.0 => assert_eq!(got, sign as f32 * f32::INFINITY, "{h:#06x}"),
                0x1f => {
                    assert!(got.is_nan(), "{h:#06x}");
                    assert_eq!(got.to_bits() & 0x007f_ffff, u32::from(h & 0x3ff) << 13);
                    assert_eq!(got.is_sign_negative(), h & 0x8000 != 0);
                }
                _ => {
                    let want = if e == 0 {
                        sign * m / 1024.0 * 2f64.powi(-14)
                    } else {
                        sign * (1.0 + m / 1024.0) * 2f64.powi(e - 15)
                    };
                    assert_eq!(f64::from(got), want, "{h:#06x}");
                    assert_eq!(got.is_sign_negative(), h & 0x8000 != 0, "{h:#06x}");
                }
            }
        }
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let mut out = [0f32; 32];
        assert!(dequantize_into(GgmlType::Q4_0, &[0u8; 17], &mut out).is_err());
        assert!(dequantize_into(GgmlType::Q4_0, &[0u8; 18], &mut out[..31]).is_err());
        assert!(dequantize_into(GgmlType::Q4_0, &[0u8; 18], &mut out).is_ok());
        assert!(dequantize_into(GgmlType::IQ2_XXS, &[], &mut []).is_err());
    }

    /// A Q8_K block by its definition: f32 scale times each int8.
    #[test]
    fn q8_k_is_scale_times_int8() {
        let mut b = [0u8; 292];
        b[0..4].copy_from_slice(&0.5f32.to_le_bytes());
        b[4] = 0x80; // -128
        b[5] = 3;
        b[259] = 0x7f; // 127
        let mut y = [1f32; 256];
        dequantize_into(GgmlType::Q8_K, &b, &mut y).unwrap();
        assert_eq!((y[0], y[1], y[2], y[255]), (-64.0, 1.5, 0.0, 63.5));
    }
}
