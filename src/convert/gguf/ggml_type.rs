//! The ggml tensor element types: GGUF ids, names and block sizes.

use std::fmt;

/// A ggml tensor element type, with the id GGUF stores for it.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GgmlType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16: the top half of an f32.
    BF16,
    /// 64-bit IEEE float.
    F64,
    /// 8-bit signed integer.
    I8,
    /// 16-bit signed integer.
    I16,
    /// 32-bit signed integer.
    I32,
    /// 64-bit signed integer.
    I64,
    /// 4-bit, 32 per block, f16 scale.
    Q4_0,
    /// 4-bit, 32 per block, f16 scale and min.
    Q4_1,
    /// 5-bit, 32 per block, f16 scale.
    Q5_0,
    /// 5-bit, 32 per block, f16 scale and min.
    Q5_1,
    /// 8-bit, 32 per block, f16 scale.
    Q8_0,
    /// 8-bit, 32 per block, f16 scale and sum (intermediate type).
    Q8_1,
    /// 2-bit k-quant, 256 per super-block.
    Q2_K,
    /// 3-bit k-quant, 256 per super-block.
    Q3_K,
    /// 4-bit k-quant, 256 per super-block.
    Q4_K,
    /// 5-bit k-quant, 256 per super-block.
    Q5_K,
    /// 6-bit k-quant, 256 per super-block.
    Q6_K,
    /// 8-bit k-quant, 256 per block, f32 scale (intermediate type).
    Q8_K,
    /// i-quant, 2.06 bits per weight.
    IQ2_XXS,
    /// i-quant, 2.31 bits per weight.
    IQ2_XS,
    /// i-quant, 3.06 bits per weight.
    IQ3_XXS,
    /// i-quant, 1.56 bits per weight.
    IQ1_S,
    /// i-quant, 4.5 bits per weight, non-linear.
    IQ4_NL,
    /// i-quant, 3.44 bits per weight.
    IQ3_S,
    /// i-quant, 2.56 bits per weight.
    IQ2_S,
    /// i-quant, 4.25 bits per weight.
    IQ4_XS,
    /// i-quant, 1.75 bits per weight.
    IQ1_M,
    /// ternary, 1.69 bits per weight.
    TQ1_0,
    /// ternary, 2.06 bits per weight.
    TQ2_0,
    /// microscaling FP4, 32 per block, e8m0 scale.
    MXFP4,
}

impl GgmlType {
    /// Every known type, in id order.
    pub const ALL: [GgmlType; 32] = {
        use GgmlType::*;
        [
            F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K,
            IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ4_NL, IQ3_S, IQ2_S, IQ4_XS, I8, I16, I32, I64, F64,
            IQ1_M, BF16, TQ1_0, TQ2_0, MXFP4,
        ]
    };

    /// (GGUF id, name, values per block, bytes per block), as in ggml's `type_traits`.
    fn traits(self) -> (u32, &'static str, usize, usize) {
        use GgmlType::*;
        const QK_K: usize = 256;
        match self {
            F32 => (0, "F32", 1, 4),
            F16 => (1, "F16", 1, 2),
            Q4_0 => (2, "Q4_0", 32, 2 + 16),
            Q4_1 => (3, "Q4_1", 32, 2 + 2 + 16),
            Q5_0 => (6, "Q5_0", 32, 2 + 4 + 16),
            Q5_1 => (7, "Q5_1", 32, 2 + 2 + 4 + 16),
            Q8_0 => (8, "Q8_0", 32, 2 + 32),
            // Two f16 (d, s) and 32 int8, as `block_q8_1` is today.
            Q8_1 => (9, "Q8_1", 32, 2 + 2 + 32),
            Q2_K => (10, "Q2_K", QK_K, 2 + 2 + QK_K / 16 + QK_K / 4),
            Q3_K => (11, "Q3_K", QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),
            Q4_K => (12, "Q4_K", QK_K, 2 + 2 + QK_K / 2 + 12),
            Q5_K => (13, "Q5_K", QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12),
            Q6_K => (14, "Q6_K", QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16),
            Q8_K => (15, "Q8_K", QK_K, 4 + QK_K + QK_K / 8),
            IQ2_XXS => (16, "IQ2_XXS", QK_K, 2 + QK_K / 4),
            IQ2_XS => (17, "IQ2_XS", QK_K, 2 + QK_K / 4 + QK_K / 32),
            IQ3_XXS => (18, "IQ3_XXS", QK_K, 2 + QK_K / 4 + QK_K / 8),
            IQ1_S => (19, "IQ1_S", QK_K, 2 + QK_K / 8 + QK_K / 16),
            IQ4_NL => (20, "IQ4_NL", 32, 2 + 16),
            IQ3_S => (21, "IQ3_S", QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4),
            IQ2_S => (22, "IQ2_S", QK_K, 2 + QK_K / 4 + QK_K / 16),
            IQ4_XS => (23, "IQ4_XS", QK_K, 2 + 2 + QK_K / 2 + QK_K / 64),
            I8 => (24, "I8", 1, 1),
            I16 => (25, "I16", 1, 2),
            I32 => (26, "I32", 1, 4),
            I64 => (27, "I64", 1, 8),
            F64 => (28, "F64", 1, 8),
            IQ1_M => (29, "IQ1_M", QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
            BF16 => (30, "BF16", 1, 2),
            TQ1_0 => (34, "TQ1_0", QK_K, 2 + 4 * 13),
            TQ2_0 => (35, "TQ2_0", QK_K, 2 + 64),
            MXFP4 => (39, "MXFP4", 32, 1 + 16),
        }
    }

    /// The type with this GGUF/ggml id, if known.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| t.id() == id)
    }

    /// The id GGUF stores for this type.
    pub fn id(self) -> u32 {
        self.traits().0
    }

    /// Values per block (1 for plain float and integer types).
    pub fn block_len(self) -> usize {
        self.traits().2
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.traits().3
    }

    /// ggml's name for the type, upper case ("Q4_K").
    pub fn name(self) -> &'static str {
        self.traits().1
    }

    /// Whether [`super::dequantize_into`] supports this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16
                | BF16
                | Q4_0
                | Q4_1
                | Q5_0
                | Q5_1
                | Q8_0
                | Q2_K
                | Q3_K
                | Q4_K
                | Q5_K
                | Q6_K
                | Q8_K
        )
    }

    /// Bytes that `n_elements` values take, or `None` on overflow or a partial block.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        let block_len = self.block_len() as u64;
        if !n_elements.is_multiple_of(block_len) {
            return None;
        }
        (n_elements / block_len).checked_mul(self.block_bytes() as u64)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_round_trips_through_its_id() {
        let ids: Vec<u32> = GgmlType::ALL.iter().map(|t| t.id()).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ALL is in id order, ids unique"
        );
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert_eq!(format!("{t:?}"), t.name());
        }
        assert_eq!(GgmlType::from_id(4), None);
        assert_eq!(GgmlType::from_id(u32::MAX), None);
    }

    /// Sizes from ggml's block structs, written out.
    #[test]
    fn block_sizes_match_ggml() {
        use GgmlType::*;
        let sizes = [
            (F32, 1, 4),
            (F16, 1, 2),
            (BF16, 1, 2),
            (Q4_0, 32, 18),
            (Q4_1, 32, 20),
            (Q5_0, 32, 22),
            (Q5_1, 32, 24),
            (Q8_0, 32, 34),
            (Q2_K, 256, 84),
            (Q3_K, 256, 110),
            (Q4_K, 256, 144),
            (Q5_K, 256, 176),
            (Q6_K, 256, 210),
            (Q8_K, 256, 292),
        ];
        for (t, len, bytes) in sizes {
            assert_eq!((t.block_len(), t.block_bytes()), (len, bytes), "{t}");
        }
    }
}
