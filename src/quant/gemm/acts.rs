//! Activations quantized for the GEMM: per block of 32, by the Q8_0 rule with ±127 ([`Acts::Q8`])
//! or ±16256 ([`Acts::Q15`]), held in the form the chosen kernels read ([`Form`]).

use std::sync::Mutex;

use super::super::format::{quantize_row, ActInt, BLOCK};
use super::super::{blocks_per_row, ThreadPool};

/// How activations are quantized per block of 32 (see the module documentation of `gemm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Acts {
    /// int8 in -127..=127 (llama.cpp's Q8_0 rule): one int8 dot product per block.
    Q8,
    /// Integers in -16256..=16256 (= ±127 * 128), as two int8 parts `v = 128 hi + lo`:
    /// two int8 dot products per block, 2^7 times finer than [`Acts::Q8`].
    Q15,
}

impl Acts {
    /// Int8 parts per value: 1 for Q8, 2 (hi, lo) for Q15.
    pub fn parts(self) -> usize {
        match self {
            Acts::Q8 => 1,
            Acts::Q15 => 2,
        }
    }
}

/// The integer type Q15 values are quantized to: an i16 limited to ±16256, so that
/// `hi = v >> 7` stays within -127..=127 (never -128: the no-dot NEON and AVX2 pair sums of
/// two int8 products then stay below 2^15).
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub(crate) struct I15(pub i16);

impl From<I15> for i32 {
    fn from(v: I15) -> i32 {
        i32::from(v.0)
    }
}

impl ActInt for I15 {
    const QMAX: f32 = 16256.0;
    #[inline(always)]
    fn from_i32(v: i32) -> Self {
        I15(v as i16)
    }
}

/// The representation of quantized activations a kernel reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    /// The integers v as i16 (the int16 kernels and the scalar reference).
    Wide,
    /// The int8 parts, for signed x signed dot products (SDOT, SMMLA).
    Signed,
    /// The int8 parts and each block's bias, for unsigned-weight x signed dot products
    /// (`vpdpbusd` with weights offset by 128).
    Unsigned,
}

/// Activations x (m, k) quantized per block, k padded with zeros to `32 nb`.
#[derive(Debug, Clone)]
pub(crate) struct QuantRows {
    pub m: usize,
    pub nb: usize,
    /// 1 ([`Acts::Q8`]) or 2 ([`Acts::Q15`]).
    pub parts: usize,
    pub scales: Vec<f32>, // (m, nb)
    /// [`Form::Wide`] only: the integers v.
    pub wide: Vec<i16>, // (m, 32 nb)
    /// [`Form::Signed`] and [`Form::Unsigned`]: per block, its parts one after the other,
    /// 32 int8 each: Q8: v; Q15: `hi = v >> 7` then `lo = v & 127`.
    pub bytes: Vec<i8>, // (m, nb, parts, 32)
    /// [`Form::Unsigned`] only: the value a block's accumulator starts from so that the
    /// dot products with weights offset by 128 come out exact: Q8: `-128 * sum(v)` (the
    /// accumulator is the dot product); Q15: `-sum(v)` (the hi accumulator, which is then
    /// multiplied by 128 and added to the lo one).
    pub bias: Vec<i32>, // (m, nb)
}

impl QuantRows {
    /// Quantizes x (m, k) by `acts` into `form`, rows split over the pool's threads when
    /// there are enough of them, with vector code where the CPU has it (every route gives
    /// the same bits: division and rounding are exact).
    pub fn new(x: &[f32], m: usize, k: usize, acts: Acts, form: Form, pool: &ThreadPool) -> Self {
        let nb = blocks_per_row(k);
        let parts = acts.parts();
        let mut a = QuantRows {
            m,
            nb,
            parts,
            scales: vec![0.0; m * nb],
            wide: Vec::new(),
            bytes: Vec::new(),
            bias: Vec::new(),
        };
        match form {
            Form::Wide => a.wide = vec![0; m * nb * BLOCK],
            Form::Signed => a.bytes = vec![0; m * nb * parts * BLOCK],
            Form::Unsigned => {
                a.bytes = vec![0; m * nb * parts * BLOCK];
                a.bias = vec![0; m * nb];
            }
        }
        let threads = (m * k / MIN_VALUES_PER_PART).clamp(1, pool.threads().min(m));
        let per = m.div_ceil(threads);
        let chunks: Vec<Mutex<Rows<'_>>> = x
            .chunks(per * k)
            .zip(a.scales.chunks_mut(per * nb))
            .zip(chunks_or_empty(&mut a.wide, per * nb * BLOCK))
            .zip(chunks_or_empty(&mut a.bytes, per * nb * parts * BLOCK))
            .zip(chunks_or_empty(&mut a.bias, per * nb))
            .map(|((((x, scales), wide), bytes), bias)| {
                Mutex::new(Rows {
                    x,
                    scales,
                    wide,
                    bytes,
                    bias,
                })
            })
            .collect();
        let job = |p: usize| {
            let mut rows = chunks[p].lock().unwrap_or_else(|e| e.into_inner());
            rows.fill(k, nb, acts, form);
        };
        if chunks.len() == 1 {
            job(0);
        } else {
            pool.run(chunks.len(), job);
        }
        drop(chunks);
        a
    }
}

/// Activation rows per part below which quantizing on several threads costs more than it
/// saves (values, m * k).
const MIN_VALUES_PER_PART: usize = 16 * 1024;

/// `v` cut into chunks of `size`, or endless empty slices if `v` is empty (a form that does
/// not use the buffer).
fn chunks_or_empty<T>(v: &mut [T], size: usize) -> Box<dyn Iterator<Item = &mut [T]> + '_> {
    if v.is_empty() {
        Box::new(std::iter::repeat_with(|| &mut [][..]))
    } else {
        Box::new(v.chunks_mut(size))
    }
}

/// Some consecutive rows of x and their part of every buffer of a [`QuantRows`].
struct Rows<'a> {
    x: &'a [f32],          // (rows, k)
    scales: &'a mut [f32], // (rows, nb)
    wide: &'a mut [i16],   // (rows, 32 nb) or empty
    bytes: &'a mut [i8],   // (rows, nb, parts, 32) or empty
    bias: &'a mut [i32],   // (rows, nb) or empty
}

impl Rows<'_> {
    /// Quantizes these rows, with vector code where the CPU has it.
    fn fill(&mut self, k: usize, nb: usize, acts: Acts, form: Form) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { self.fill_avx2(k, nb, acts, form) };
        }
        self.fill_portable(k, nb, acts, form)
    }

    /// [`Rows::fill`] compiled for AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn fill_avx2(&mut self, k: usize, nb: usize, acts: Acts, form: Form) {
        self.fill_portable(k, nb, acts, form)
    }

    /// [`Rows::fill`] in portable code, inlined into the vector wrappers.
    #[inline(always)]
    fn fill_portable(&mut self, k: usize, nb: usize, acts: Acts, form: Form) {
        match acts {
            Acts::Q8 => self.fill_as::<i8>(k, nb, acts, form),
            Acts::Q15 => self.fill_as::<I15>(k, nb, acts, form),
        }
    }

    /// Quantizes these rows at `T`'s range and stores them in `form`.
    #[inline(always)]
    fn fill_as<T: ActInt>(&mut self, k: usize, nb: usize, acts: Acts, form: Form) {
        let parts = acts.parts();
        let mut q = vec![T::default(); k]; // one row's integers
        let mut v = vec![0i16; nb * BLOCK]; // the same, zero-padded
        for (i, xr) in self.x.chunks_exact(k).enumerate() {
            quantize_row(xr, &mut q, &mut self.scales[i * nb..(i + 1) * nb]);
            for (d, &s) in v.iter_mut().zip(&q) {
                *d = s.into() as i16;
            }
            if form == Form::Wide {
                self.wide[i * nb * BLOCK..(i + 1) * nb * BLOCK].copy_from_slice(&v);
                continue;
            }
            for (b, vb) in v.chunks_exact(BLOCK).enumerate() {
                let base = (i * nb + b) * parts * BLOCK;
                let dst = &mut self.bytes[base..base + parts * BLOCK];
                match acts {
                    Acts::Q8 => {
                        for (d, &x) in dst.iter_mut().zip(vb) {
                            *d = x as i8;
                        }
                    }
                    Acts::Q15 => {
                        let (hi, lo) = dst.split_at_mut(BLOCK);
                        for ((h, l), &x) in hi.iter_mut().zip(lo.iter_mut()).zip(vb) {
                            *h = (x >> 7) as i8;
                            *l = (x & 127) as i8;
                        }
                    }
                }
                if form == Form::Unsigned {
                    let sum: i32 = vb.iter().map(|&x| i32::from(x)).sum();
                    self.bias[i * nb + b] = match acts {
                        Acts::Q8 => -128 * sum,
                        Acts::Q15 => -sum,
                    };
                }
            }
        }
    }
}

impl QuantRows {
    /// Row i's integers v of block b (32 values) from the form the rows were made in.
    #[cfg(test)]
    pub fn values(&self, i: usize, b: usize) -> [i32; BLOCK] {
        let mut out = [0i32; BLOCK];
        if !self.wide.is_empty() {
            let row = &self.wide[(i * self.nb + b) * BLOCK..][..BLOCK];
            for (o, &v) in out.iter_mut().zip(row) {
                *o = i32::from(v);
            }
        } else {
            let base = (i * self.nb + b) * self.parts * BLOCK;
            for (j, o) in out.iter_mut().enumerate() {
                *o = i32::from(self.bytes[base + j]);
                if self.parts == 2 {
                    *o = *o * 128 + i32::from(self.bytes[base + BLOCK + j]);
                }
            }
        }
        out
    }
}
