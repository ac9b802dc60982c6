//! The int8 block format (Q8: 32 int8 + one f32 scale) and its kernels.
