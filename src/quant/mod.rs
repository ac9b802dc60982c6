//! The int8 block format (Q8: 32 int8 + one f32 scale) and its kernels.
//!
//! # Format
//! A linear layer `y = W x`, W of shape (n, k), is stored as `q: [i8]` (n, k) row-major and
//! `scales: [f32]` (n, nb) row-major with `nb = ceil(k / 32)`: each row is cut into blocks of
//! 32 consecutive values along k (the last one may be shorter), value = `q * scale`. See
//! [`Q8Matrix`] and [`quantize_q8`].
//!
//! # Schemes
//! All compute `y[i, r] = sum_j W[r, j] * x[i, j]` for activations x (m, k), y (m, n):
//! - [`Scheme::Q8Q8`]: each activation row is quantized per block of 32 by the same Q8_0 rule
//!   (scale `sx`, int8 `xq`), then per block `b` the exact integer dot product
//!   `idot_b = sum q * xq` (i32) is scaled: `t_b = (sw_b * sx_b) * (idot_b as f32)`
//!   (two f32 multiplications, in that order). This is llama.cpp's Q8_0 path.
//! - [`Scheme::Q8Q16`]: the same with activations quantized to int16 (`scale = max|x| /
//!   32767`, values in -32767..=32767): the integer sums stay exact (|idot| < 2^27), and the
//!   activation rounding is 2^8 times finer than Q8Q8's, far below the weights' own.
//! - [`Scheme::Q8F32`]: int8 weights are widened to f32 and multiplied into the f32
//!   activations, no activation rounding. Per block: `s_b[l] = sum over j ≡ l (mod 8) of
//!   q_j * x_j` (8 lanes, j increasing), then `acc[l] += sw_b * s_b[l]`.
//!
//! # Accumulation order (what makes results reproducible)
//! Per output element, block results go to 8 lanes, block `b` into lane `b % 8`, blocks in
//! increasing order, each lane starting at +0.0: `acc[b % 8] += t_b`. The lanes are then
//! reduced as `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))` ([`reduce8`] ordering), which
//! is what an 8-wide (AVX2) or two 4-wide (NEON) accumulators reduce to naturally.
//!
//! - Q8Q8, Q8Q16: integer sums are exact in any order and every float operation above is done
//!   in the same order by every variant, so scalar, AVX2, NEON and dotprod give bit-identical
//!   results.
//! - Q8F32: the SIMD variants fuse `s += q * x` and `acc += sw * s` into FMAs where the scalar
//!   code rounds twice, so they differ from the scalar reference by rounding only (bounded in
//!   the tests by `(nb + 16) * f32::EPSILON * sum |sw * q * x|`).
//!
//! # Variants and dispatch
//! [`Kernel`] names an instruction set: portable scalar, x86_64 AVX2+FMA and AVX-512 (scheme
//! Q8F32 only; the integer schemes with `Avx512` run the AVX2 code), aarch64 NEON and
//! NEON+dotprod (SDOT, scheme Q8Q8 only; Q8F32 and Q8Q16 with `Dotprod` run the NEON code). On armv7,
//! `core::arch::arm` intrinsics and `is_arm_feature_detected!` are unstable on stable Rust, so
//! the portable code is used there (written to auto-vectorize when built with `+neon`).
//! [`Kernel::select`] picks the one asked for, else the one named by `EDGELM_KERNEL`, else the
//! best available one; the attention kernels follow the same choice.
//!
//! # Threads
//! Output features (rows of W) are split into contiguous ranges, one per worker of a
//! [`ThreadPool`]; each output element is computed by exactly one worker with the code above,
//! so results are bit-identical whatever the thread count.

mod fit;
mod format;
pub mod gemm;
pub mod op;
pub mod pool;
mod scalar;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod tiles;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(test)]
mod tests;

use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;
use std::str::FromStr;

pub use fit::quantize_q8_fitted;
pub use format::{blocks_per_row, quantize_q8, Q8Matrix, BLOCK};
pub use pool::ThreadPool;

use format::{ActInt, QuantActs};

/// Environment variable that forces a kernel variant (`scalar`, `avx2`, `avx512`, `neon`,
/// `dotprod`).
pub const KERNEL_ENV: &str = "EDGELM_KERNEL";

/// Below this many weight bytes per worker, extra threads cost more than they save.
const MIN_BYTES_PER_PART: usize = 32 * 1024;

/// Errors from building a [`Q8Matrix`], calling a product, or choosing a kernel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    /// A matrix with no rows or no columns (or too large to address).
    #[error("a ({n}, {k}) int8 matrix is empty or too large")]
    EmptyShape {
        /// Rows.
        n: usize,
        /// Columns.
        k: usize,
    },
    /// The int8 values do not fill the shape.
    #[error("int8 weights of a ({n}, {k}) matrix need {expected} values, got {got}")]
    WeightsLen {
        /// Rows.
        n: usize,
        /// Columns.
        k: usize,
        /// n * k.
        expected: usize,
        /// Length given.
        got: usize,
    },
    /// The scales do not fill the shape.
    #[error("scales of a matrix with {n} rows of {nb} blocks need {expected} values, got {got}")]
    ScalesLen {
        /// Rows.
        n: usize,
        /// Blocks per row.
        nb: usize,
        /// n * nb.
        expected: usize,
        /// Length given.
        got: usize,
    },
    /// The activations are not a whole number of rows of length k.
    #[error("input of {got} values is not a whole number of rows of {k}")]
    InputLen {
        /// Row length expected.
        k: usize,
        /// Length given.
        got: usize,
    },
    /// The output buffer does not match (m, n).
    #[error("output needs {expected} values ({m} rows of {n}), got {got}")]
    OutputLen {
        /// Activation rows.
        m: usize,
        /// Output features.
        n: usize,
        /// m * n.
        expected: usize,
        /// Length given.
        got: usize,
    },
    /// A kernel name that is not one of ours.
    #[error("unknown kernel \"{0}\": expected scalar, avx2, avx512, neon or dotprod")]
    UnknownKernel(String),
    /// A scheme name that is not one of ours.
    #[error("unknown int8 scheme \"{0}\": expected auto, q8f32, q8q16, q8q8, q8q15 or fold")]
    UnknownScheme(String),
    /// [`Scheme::Fold`] asked of a product: folded weights are f32, multiplied by tract.
    #[error("the fold scheme has no int8 product (its weights are dequantized at load)")]
    NoProduct,
    /// A kernel this CPU (or this build's target) cannot run.
    #[error("kernel {0} is not supported on this CPU")]
    KernelUnavailable(Kernel),
    /// A GEMM instruction-set variant this CPU (or this build's target) cannot run.
    #[error("GEMM kernel {0} is not supported on this CPU")]
    IsaUnavailable(&'static str),
    /// [`Scheme::Q8Q15`] asked of a row-major matrix: its products run on the tiled layout.
    #[error("the q8q15 scheme runs on the tiled layout (quant::gemm), not a row-major matrix")]
    TiledOnly,
}

/// How int8 weights are computed with: the arithmetic of our products (see the module
/// documentation), or folded to f32 at load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// By the weights' layout: [`Scheme::Q8Q15`] on tiled weights (prompts on the GEMM,
    /// decode on the tiled one-row kernel, everything read in place), [`Scheme::Q8F32`] on
    /// row-major ones (no heap copy).
    #[default]
    Auto,
    /// Weights widened to f32 and multiplied into f32 activations.
    Q8F32,
    /// Activations quantized to int16 per block; int8·int16 dot products in i32.
    Q8Q16,
    /// Activations quantized to int8 per block; int8·int8 dot products in i32 (llama.cpp's).
    Q8Q8,
    /// Products of more than one row on the tiled GEMM ([`gemm`]) with activations quantized
    /// per block to 15-bit integers in two int8 parts ([`gemm::Acts::Q15`]); one-row products
    /// (decode) as [`Scheme::Q8F32`]. Row-major weights are copied into the tiled layout on
    /// the heap at first use; a tiled bundle's are read in place.
    Q8Q15,
    /// No int8 product: the weights are dequantized to f32 at load and tract multiplies them
    /// (the reference; about 4 times the memory).
    Fold,
}

impl Scheme {
    /// Every scheme, in the order the flag lists them.
    pub const ALL: [Scheme; 6] = [
        Scheme::Auto,
        Scheme::Q8F32,
        Scheme::Q8Q16,
        Scheme::Q8Q8,
        Scheme::Q8Q15,
        Scheme::Fold,
    ];

    /// The name used by `--int8`.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Auto => "auto",
            Scheme::Q8F32 => "q8f32",
            Scheme::Q8Q16 => "q8q16",
            Scheme::Q8Q8 => "q8q8",
            Scheme::Q8Q15 => "q8q15",
            Scheme::Fold => "fold",
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scheme {
    type Err = QuantError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        by_name(&Self::ALL, Self::name, s).ok_or_else(|| QuantError::UnknownScheme(s.to_owned()))
    }
}

/// An instruction-set variant of the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Portable code, the reference.
    Scalar,
    /// x86_64 AVX2 + FMA.
    Avx2,
    /// x86_64 AVX-512F (with AVX2 + FMA) for Q8F32.
    Avx512,
    /// aarch64 NEON (Advanced SIMD).
    Neon,
    /// aarch64 NEON with the dot-product extension (SDOT) for Q8Q8.
    Dotprod,
}

impl Kernel {
    /// Every variant, best last.
    pub const ALL: [Kernel; 5] = [
        Kernel::Scalar,
        Kernel::Avx2,
        Kernel::Avx512,
        Kernel::Neon,
        Kernel::Dotprod,
    ];

    /// The name used by `EDGELM_KERNEL`.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512 => "avx512",
            Kernel::Neon => "neon",
            Kernel::Dotprod => "dotprod",
        }
    }

    /// Whether this CPU and this build can run the variant.
    pub fn is_available(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(target_arch = "aarch64")]
            Kernel::Dotprod => {
                std::arch::is_aarch64_feature_detected!("neon")
                    && std::arch::is_aarch64_feature_detected!("dotprod")
            }
            #[allow(unreachable_patterns)] // which arms remain depends on the target
            _ => false,
        }
    }

    /// The variants this CPU can run, scalar first.
    pub fn available() -> Vec<Kernel> {
        Self::ALL.into_iter().filter(|k| k.is_available()).collect()
    }

    /// The fastest variant this CPU can run.
    pub fn best() -> Kernel {
        Self::ALL
            .into_iter()
            .rev()
            .find(|k| k.is_available())
            .unwrap_or(Kernel::Scalar)
    }

    /// The variant to run: `requested` (`--kernel`), else the one named by `EDGELM_KERNEL`,
    /// else [`Kernel::best`]; one this CPU cannot run is an error. The one place either is
    /// read: the int8 products and the attention both run what it returns.
    pub fn select(requested: Option<Kernel>) -> Result<Kernel, QuantError> {
        match (requested, std::env::var(KERNEL_ENV)) {
            (Some(kernel), _) => kernel.checked(),
            (None, Ok(name)) if !name.is_empty() => name.parse::<Kernel>()?.checked(),
            (None, _) => Ok(Self::best()),
        }
    }

    /// `self` if this CPU can run it, else [`QuantError::KernelUnavailable`].
    pub fn checked(self) -> Result<Kernel, QuantError> {
        if self.is_available() {
            Ok(self)
        } else {
            Err(QuantError::KernelUnavailable(self))
        }
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Kernel {
    type Err = QuantError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        by_name(&Self::ALL, Self::name, s).ok_or_else(|| QuantError::UnknownKernel(s.to_owned()))
    }
}

/// The one of `all` named `s`, ignoring case and surrounding spaces.
fn by_name<T: Copy>(all: &[T], name: fn(T) -> &'static str, s: &str) -> Option<T> {
    all.iter()
        .copied()
        .find(|&v| name(v).eq_ignore_ascii_case(s.trim()))
}

/// Reduces 8 lane accumulators in the fixed order `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))`.
#[inline(always)]
pub(crate) fn reduce8(a: &[f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

impl Q8Matrix<'_> {
    /// `y = W x` for one activation vector: x (k), y (n).
    pub fn matvec(
        &self,
        x: &[f32],
        y: &mut [f32],
        scheme: Scheme,
        kernel: Kernel,
        pool: &ThreadPool,
    ) -> Result<(), QuantError> {
        if x.len() != self.k() {
            return Err(QuantError::InputLen {
                k: self.k(),
                got: x.len(),
            });
        }
        self.matmul(x, y, scheme, kernel, pool)
    }

    /// `y = x Wᵀ` for m activation rows: x (m, k) row-major, y (m, n) row-major.
    ///
    /// Each weight block is read from memory once per call and reused for every row of x.
    pub fn matmul(
        &self,
        x: &[f32],
        y: &mut [f32],
        scheme: Scheme,
        kernel: Kernel,
        pool: &ThreadPool,
    ) -> Result<(), QuantError> {
        let (n, k) = (self.n(), self.k());
        if !x.len().is_multiple_of(k) {
            return Err(QuantError::InputLen { k, got: x.len() });
        }
        let m = x.len() / k;
        if y.len() != m * n {
            return Err(QuantError::OutputLen {
                m,
                n,
                expected: m * n,
                got: y.len(),
            });
        }
        let kernel = kernel.checked()?;
        if m == 0 {
            return Ok(());
        }
        let input = match scheme {
            Scheme::Q8Q8 => Input::Quant(quantize_acts(x, m, k, kernel)),
            Scheme::Q8Q16 => Input::Quant16(quantize_acts(x, m, k, kernel)),
            Scheme::Q8F32 | Scheme::Auto => Input::F32(x),
            Scheme::Q8Q15 => return Err(QuantError::TiledOnly),
            Scheme::Fold => return Err(QuantError::NoProduct),
        };
        let parts = (self.weight_bytes() / MIN_BYTES_PER_PART).clamp(1, pool.threads());
        if parts == 1 {
            let mut out = OutRows::whole(y, m, n);
            run_part(self, &input, kernel, 0..n, &mut out);
            return Ok(());
        }
        // Contiguous ranges of whole cache lines of scales where possible.
        let chunk = n.div_ceil(parts).next_multiple_of(16);
        let shared = SharedOut {
            ptr: y.as_mut_ptr(),
            m,
            n,
            _y: PhantomData,
        };
        pool.run(parts, |p| {
            let rows = (p * chunk).min(n)..((p + 1) * chunk).min(n);
            // SAFETY: part p owns output columns `rows`; the ranges of distinct parts are
            // disjoint, and `pool.run` returns only after every part has finished.
            let mut out = unsafe { shared.part(rows.clone()) };
            run_part(self, &input, kernel, rows, &mut out);
        });
        Ok(())
    }
}

/// The right-hand side as a kernel consumes it.
enum Input<'x> {
    Quant(QuantActs<i8>),
    Quant16(QuantActs<i16>),
    F32(&'x [f32]), // (m, k)
}

/// Quantizes activations x (m, k) with the fastest code for `kernel` (same bits for all).
fn quantize_acts<T: ActInt>(x: &[f32], m: usize, k: usize, kernel: Kernel) -> QuantActs<T> {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 | Kernel::Avx512 => {
            let mut a = QuantActs::zeroed(m, k);
            // SAFETY: `kernel` was checked available, so the CPU has AVX2 and FMA.
            unsafe { avx2::quantize_acts(x, &mut a) };
            a
        }
        _ => QuantActs::quantize_scalar(x, m, k),
    }
}

/// Computes output columns `rows` of every activation row with one variant.
fn run_part(
    w: &Q8Matrix<'_>,
    input: &Input<'_>,
    kernel: Kernel,
    rows: Range<usize>,
    out: &mut OutRows<'_>,
) {
    match (input, kernel) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `kernel` was checked available, so the CPU has AVX2 and FMA.
        (Input::Quant(x), Kernel::Avx2 | Kernel::Avx512) => unsafe { avx2::q8q8(w, x, rows, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (Input::Quant16(x), Kernel::Avx2 | Kernel::Avx512) => unsafe {
            avx2::q8q8(w, x, rows, out)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (Input::F32(x), Kernel::Avx2) => unsafe { avx2::q8f32(w, x, rows, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `kernel` was checked available, so the CPU has AVX-512F, AVX2 and FMA.
        (Input::F32(x), Kernel::Avx512) => unsafe { avx512::q8f32(w, x, rows, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: `kernel` was checked available, so the CPU has NEON.
        (Input::Quant(x), Kernel::Neon) => unsafe { neon::q8q8(w, x, rows, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: `kernel` was checked available, so the CPU has NEON and dotprod.
        (Input::Quant(x), Kernel::Dotprod) => unsafe { neon::q8q8_dotprod(w, x, rows, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: `kernel` was checked available, so the CPU has NEON.
        (Input::Quant16(x), Kernel::Neon | Kernel::Dotprod) => unsafe {
            neon::q8q8(w, x, rows, out)
        },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: `kernel` was checked available, so the CPU has NEON.
        (Input::F32(x), Kernel::Neon | Kernel::Dotprod) => unsafe { neon::q8f32(w, x, rows, out) },
        (Input::Quant(x), _) => scalar::q8q8(w, x, rows, out),
        (Input::Quant16(x), _) => scalar::q8q8(w, x, rows, out),
        (Input::F32(x), _) => scalar::q8f32(w, x, rows, out),
    }
}

/// The output y (m, n) shared by the parts of one product.
struct SharedOut<'y> {
    ptr: *mut f32,
    m: usize,
    n: usize,
    _y: PhantomData<&'y mut [f32]>,
}

// SAFETY: parts only write through `OutRows`, each to its own disjoint set of columns.
unsafe impl Send for SharedOut<'_> {}
// SAFETY: as above.
unsafe impl Sync for SharedOut<'_> {}

impl<'y> SharedOut<'y> {
    /// The writer for output columns `rows`.
    ///
    /// # Safety
    /// No two live writers may have overlapping `rows`.
    unsafe fn part(&self, rows: Range<usize>) -> OutRows<'y> {
        OutRows {
            ptr: self.ptr,
            m: self.m,
            n: self.n,
            rows,
            _y: PhantomData,
        }
    }
}

/// Write access to columns `rows` of an output y (m, n).
pub(crate) struct OutRows<'y> {
    ptr: *mut f32,
    m: usize,
    n: usize,
    rows: Range<usize>,
    _y: PhantomData<&'y mut [f32]>,
}

impl<'y> OutRows<'y> {
    /// Access to all of y (m, n).
    pub(crate) fn whole(y: &'y mut [f32], m: usize, n: usize) -> Self {
        assert_eq!(y.len(), m * n);
        Self {
            ptr: y.as_mut_ptr(),
            m,
            n,
            rows: 0..n,
            _y: PhantomData,
        }
    }

    /// `y[i, r] = v`.
    #[inline(always)]
    pub(crate) fn set(&mut self, i: usize, r: usize, v: f32) {
        assert!(
            i < self.m && self.rows.contains(&r),
            "output ({i}, {r}) outside this part"
        );
        // SAFETY: (i, r) is inside y (m, n) and in this writer's columns, which no other
        // writer shares.
        unsafe { *self.ptr.add(i * self.n + r) = v };
    }
}
