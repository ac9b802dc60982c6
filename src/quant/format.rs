//! The Q8 block format: a borrowed weight matrix, the quantizer, and quantized activations.

use super::QuantError;

/// Number of consecutive values along k that share one scale.
pub const BLOCK: usize = 32;

/// Number of blocks in a row of length `k` (the last one may be shorter than [`BLOCK`]).
pub const fn blocks_per_row(k: usize) -> usize {
    k.div_ceil(BLOCK)
}

/// A linear layer `y = W x`, W of shape (n, k), stored as int8 blocks with one f32 scale each.
///
/// Element (r, j) of W is `q[r * k + j] as f32 * scales[r * nb + j / 32]`, with
/// `nb = ceil(k / 32)`. Both slices are borrowed (typically from a memory-mapped file) and
/// need no alignment.
#[derive(Clone, Copy, Debug)]
pub struct Q8Matrix<'a> {
    q: &'a [i8],       // (n, k)
    scales: &'a [f32], // (n, nb)
    n: usize,
    k: usize,
}

impl<'a> Q8Matrix<'a> {
    /// Wraps `q` (n, k) and `scales` (n, ceil(k / 32)), checking every length.
    pub fn new(q: &'a [i8], scales: &'a [f32], n: usize, k: usize) -> Result<Self, QuantError> {
        if n == 0 || k == 0 {
            return Err(QuantError::EmptyShape { n, k });
        }
        let nb = blocks_per_row(k);
        let q_len = n.checked_mul(k).ok_or(QuantError::EmptyShape { n, k })?;
        let s_len = n.checked_mul(nb).ok_or(QuantError::EmptyShape { n, k })?;
        if q.len() != q_len {
            return Err(QuantError::WeightsLen {
                n,
                k,
                expected: q_len,
                got: q.len(),
            });
        }
        if scales.len() != s_len {
            return Err(QuantError::ScalesLen {
                n,
                nb,
                expected: s_len,
                got: scales.len(),
            });
        }
        Ok(Self { q, scales, n, k })
    }

    /// Number of output features (rows of W).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Number of input features (columns of W).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Number of scale blocks per row, `ceil(k / 32)`.
    pub fn blocks_per_row(&self) -> usize {
        blocks_per_row(self.k)
    }

    /// The int8 values, (n, k) row-major.
    pub fn q(&self) -> &'a [i8] {
        self.q
    }

    /// The block scales, (n, ceil(k / 32)) row-major.
    pub fn scales(&self) -> &'a [f32] {
        self.scales
    }

    /// Row `r` of W: its k int8 values and its nb scales.
    #[inline]
    pub(crate) fn row(&self, r: usize) -> (&'a [i8], &'a [f32]) {
        let nb = self.blocks_per_row();
        (
            &self.q[r * self.k..(r + 1) * self.k],
            &self.scales[r * nb..(r + 1) * nb],
        )
    }

    /// Bytes read from memory by one product: the int8 values plus the f32 scales.
    pub fn weight_bytes(&self) -> usize {
        self.q.len() + std::mem::size_of_val(self.scales)
    }
}

/// Quantizes W (n, k) row-major into `(q, scales)`: q (n, k), scales (n, ceil(k / 32)).
///
/// The Q8_0 rule, per block of 32 consecutive values of a row (the last block of a row may
/// be shorter): `scale = max|x| / 127`, `q = round(x / scale)` rounding half away from zero,
/// and an all-zero block gets scale 0 and q 0. Non-finite inputs give a deterministic but
/// meaningless block (a NaN makes its block's scale NaN).
///
/// # Panics
/// If `w.len() != n * k`: the caller (the converter) has already checked the tensor's shape.
pub fn quantize_q8(w: &[f32], n: usize, k: usize) -> (Vec<i8>, Vec<f32>) {
    assert_eq!(
        w.len(),
        n * k,
        "quantize_q8: w has {} values, shape ({n}, {k})",
        w.len()
    );
    let nb = blocks_per_row(k);
    let mut q = vec![0i8; n * k]; // (n, k)
    let mut scales = vec![0f32; n * nb]; // (n, nb)
    if k > 0 {
        for ((wr, qr), sr) in w
            .chunks_exact(k)
            .zip(q.chunks_exact_mut(k))
            .zip(scales.chunks_exact_mut(nb))
        {
            quantize_row(wr, qr, sr);
        }
    }
    (q, scales)
}

/// Quantizes one row: `x` (k) into `q` (k) and `scales` (ceil(k / 32)) by the Q8_0 rule
/// (for i8; see [`quantize_block`] for wider types).
///
/// `#[inline(always)]` so that SIMD wrappers compiled with more target features get a
/// vectorized copy of the same arithmetic (division and `round` are exactly rounded, so every
/// copy gives the same bits).
#[inline(always)]
pub(crate) fn quantize_row<T: ActInt>(x: &[f32], q: &mut [T], scales: &mut [f32]) {
    // Whole blocks as fixed-size arrays, so the compiler sees 32 lanes and vectorizes.
    let (x_blocks, x_tail) = x.as_chunks::<BLOCK>();
    let (q_blocks, q_tail) = q.as_chunks_mut::<BLOCK>();
    for ((xb, qb), s) in x_blocks
        .iter()
        .zip(q_blocks.iter_mut())
        .zip(scales.iter_mut())
    {
        *s = quantize_block(xb, qb);
    }
    if !x_tail.is_empty() {
        scales[x_blocks.len()] = quantize_block(x_tail, q_tail);
    }
}

/// An integer type activations are quantized to: i8 (scheme Q8Q8) or i16 (scheme Q8Q16).
pub(crate) trait ActInt: Copy + Default + Into<i32> + Send + Sync + 'static {
    /// The largest magnitude a quantized value takes, as the divisor of a block's max|x|.
    const QMAX: f32;
    /// `v`, already rounded and within ±QMAX (the conversion cannot overflow).
    fn from_i32(v: i32) -> Self;
}

impl ActInt for i8 {
    const QMAX: f32 = 127.0;
    #[inline(always)]
    fn from_i32(v: i32) -> Self {
        v as i8
    }
}

impl ActInt for i16 {
    const QMAX: f32 = 32767.0;
    #[inline(always)]
    fn from_i32(v: i32) -> Self {
        v as i16
    }
}

/// Quantizes one block (up to 32 values) by the Q8_0 rule, with ±`T::QMAX` in place of
/// ±127 for wider types, and returns its scale.
#[inline(always)]
fn quantize_block<T: ActInt>(xb: &[f32], qb: &mut [T]) -> f32 {
    // max|x| on the bit patterns with the sign cleared: for non-negative floats their order
    // is the float order, and an integer max reduction vectorizes (a NaN wins, and then
    // poisons only its own block).
    let amax_bits = xb
        .iter()
        .map(|v| v.to_bits() & 0x7fff_ffff)
        .max()
        .unwrap_or(0);
    let amax = f32::from_bits(amax_bits);
    let scale = amax / T::QMAX;
    if scale == 0.0 {
        qb.fill(T::default());
        return scale;
    }
    for (qv, &xv) in qb.iter_mut().zip(xb) {
        // max/min (not clamp) also map NaN into range, which makes the conversion sound and
        // lets it vectorize (a saturating `as` does not).
        #[allow(clippy::manual_clamp)] // clamp would keep NaN
        let v = (xv / scale).round().max(-T::QMAX).min(T::QMAX);
        // SAFETY: v is finite and within ±QMAX, which fits i32.
        *qv = T::from_i32(unsafe { v.to_int_unchecked::<i32>() });
    }
    scale
}

/// Activations quantized per block of 32: to i8 by the Q8_0 rule (scheme Q8Q8's right-hand
/// side) or to i16 by the same rule with ±32767 (scheme Q8Q16's).
#[derive(Clone, Debug, Default)]
pub(crate) struct QuantActs<T = i8> {
    pub q: Vec<T>,        // (m, k)
    pub scales: Vec<f32>, // (m, nb)
    pub m: usize,
    pub k: usize,
}

impl<T: ActInt> QuantActs<T> {
    /// Row `i`: its k quantized values (each within ±`T::QMAX`) and its nb scales.
    #[inline]
    pub fn row(&self, i: usize) -> (&[T], &[f32]) {
        let nb = blocks_per_row(self.k);
        (
            &self.q[i * self.k..(i + 1) * self.k],
            &self.scales[i * nb..(i + 1) * nb],
        )
    }

    /// Empty buffers shaped for `m` rows of `k`, to be filled by a quantizer.
    pub fn zeroed(m: usize, k: usize) -> Self {
        Self {
            q: vec![T::default(); m * k],
            scales: vec![0.0; m * blocks_per_row(k)],
            m,
            k,
        }
    }

    /// Quantizes `x` (m, k) row by row with the portable code.
    pub fn quantize_scalar(x: &[f32], m: usize, k: usize) -> Self {
        let mut a = Self::zeroed(m, k);
        a.fill_from(x);
        a
    }

    /// Quantizes `x` (m, k) into these buffers. `#[inline(always)]` so that a caller compiled
    /// with more target features gets its own vectorized copy.
    #[inline(always)]
    pub fn fill_from(&mut self, x: &[f32]) {
        let (k, nb) = (self.k, blocks_per_row(self.k));
        let rows = x
            .chunks_exact(k)
            .zip(self.q.chunks_exact_mut(k))
            .zip(self.scales.chunks_exact_mut(nb));
        for ((xr, qr), sr) in rows {
            quantize_row(xr, qr, sr);
        }
    }
}
