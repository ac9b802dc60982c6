//! The int8 GEMM on integer dot products: weights in an interleaved ("tiled") layout,
//! activations quantized per block of 32 to int8 or to 15-bit integers, exact integer block
//! dot products, then the same float operations in every kernel.
//!
//! # Weight layout
//! W (n, k) in Q8 blocks (32 int8 along k, one f32 scale each) is stored in groups of
//! [`GROUP`] = 16 rows. With `G = ceil(n / 16)` and `nb = ceil(k / 32)`:
//! - `q: [i8]` (G, nb, 8, 16, 4): `q[g][b][c][l][e] = W[16 g + l][32 b + 4 c + e]`. One
//!   group-block (16 rows x 32 values) is 512 contiguous bytes; within it, chunk `c` (64
//!   bytes, one cache line) holds 4 consecutive values of each of the 16 rows.
//! - `scales: [f32]` (G, nb, 16): `scales[g][b][l]` is the scale of row 16 g + l, block b.
//!
//! Rows past n and values past k are zero (and padded rows have scale 0), so kernels only see
//! whole groups and whole blocks. [`tile_q8`] turns the row-major Q8 form into this one.
//!
//! Why this layout: a SIMD lane holds one weight row, so an integer dot product instruction
//! that sums 4 products per 32-bit lane (x86 `vpdpbusd`, ARM `sdot`) against 4 activation
//! bytes broadcast to every lane accumulates 16 (AVX-512), 8 (AVX2) or 4 (NEON) rows at once,
//! and after the 8 chunks of a block each lane holds that row's exact block dot product: no
//! horizontal sums. i8mm's `smmla` wants 8 consecutive values of 2 rows, which one `zip` of
//! two chunks gives; the int16 kernels widen a chunk and multiply pairs.
//!
//! # The layout in a bundle
//! `edgelm convert` writes every int8 matrix in this layout by default, as standard ONNX
//! that other runtimes read (`convert::onnx::GraphBuilder::dequantized_q8`; the test
//! `tiled_layout_reads_back_through_standard_onnx_ops` runs the subgraph through tract-onnx):
//! - the int8 initializer has shape (G, nb, 8, 16, 4) and the scales initializer
//!   (G, nb, 16), both in the external data file as they are in memory here;
//! - `Transpose(perm = [0, 3, 1, 2, 4])` -> (G, 16, nb, 8, 4), `Reshape` -> (16 G, 32 nb),
//!   `Slice` -> (n, k) undo it for the values; `Transpose([0, 2, 1])`, `Reshape` ->
//!   (16 G, nb), `Slice` -> (n, nb) for the scales;
//! - then the `DequantizeLinear(axis = 1, block_size = 32)` -> `MatMul` (or `Gather`) that a
//!   row-major bundle has.
//!
//! The pre-pass (`prepass/tiled.rs`) recognises `DequantizeLinear(Slice(Reshape(
//! Transpose(q))), Slice(Reshape(Transpose(s))))` with exactly these permutations and shapes
//! (anything else is left alone) and binds `Q8MatMul` to a [`Q8Tiled`] borrowing both
//! initializers from the mapping; the embedding `Gather` reads rows with
//! [`Q8Tiled::dequantize_row`]. Prompts run the GEMM here; decode runs
//! [`Q8Tiled::matvec_f32`] (`matvec.rs`), f32 activations with the row-major Q8F32 kernels'
//! arithmetic, so decode's results do not depend on the layout. A row-major bundle's
//! matrices are copied into this layout on the heap by [`Scheme::Q8Q15`](super::Scheme::Q8Q15).
//!
//! # Arithmetic
//! For activations x (m, k) and outputs y (m, n) = x Wᵀ, each activation row is cut into
//! blocks of 32 (zero-padded to 32 nb) and each block quantized with scale
//! `sx = max|x| / QMAX` to integers `v = round(x / sx)` (half away from zero, within
//! ±QMAX; an all-zero block has scale 0). See [`Acts`]:
//! - [`Acts::Q8`]: QMAX = 127, llama.cpp's Q8_0 rule;
//! - [`Acts::Q15`]: QMAX = 16256 = 127 * 128, so `v = 128 hi + lo` with `hi = v >> 7` in
//!   -127..=127 and `lo = v & 127` in 0..=127: two int8 parts, two int8 dot products per
//!   block, and 2^7 times finer steps than Q8.
//!
//! Then for every output (i, r): `acc = +0.0`, and for each block b in increasing order
//! `acc += (sw[r][b] * sx[i][b]) * (idot as f32)` (two roundings, no fused multiply-add)
//! where `idot = sum_j W_q[r][32 b + j] * v[i][32 b + j]` is exact in i32 (|idot| < 2^27).
//! Every kernel computes each `idot` exactly, by whatever integer route its instruction set
//! has, and then exactly these float operations, so all kernels give the same bits, and a
//! row's result does not depend on m, on how rows are tiled, or on the thread count.
//!
//! # Kernels
//! [`Isa`] names the instruction sets; each kernel processes one group of 16 weight rows
//! against all m activation rows, register-blocked over several activation rows:
//! - scalar (the reference; on armv7 this is the only code, written to vectorize with NEON);
//! - x86_64 AVX2 (int16: weights widened, `vpmaddwd` with v), AVX-VNNI (`vpdpbusd`, 8 rows
//!   per vector) and AVX-512 VNNI (`vpdpbusd`, 16 rows per vector): `vpdpbusd` multiplies
//!   unsigned by signed bytes, so weights enter as `w ^ 0x80 = w + 128` and each block's
//!   accumulator starts from a per-activation-block bias that cancels the `128 * sum(v)`;
//! - aarch64 NEON without dot products (int16, `smlal` by element on weights transposed
//!   in registers), NEON with SDOT (`sdot` by element), and i8mm (`smmla` on pairs of rows).

mod acts;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avxvnni;
#[cfg(target_arch = "aarch64")]
mod dotprod;
#[cfg(target_arch = "aarch64")]
mod i8mm;
mod matvec;
#[cfg(target_arch = "aarch64")]
mod neon;
mod scalar;
#[cfg(test)]
mod tests;

use std::marker::PhantomData;
use std::ops::Range;

use tract_onnx::prelude::{tvec, TVec};

pub use acts::Acts;
use acts::{Form, QuantRows};
pub use matvec::matvec_f32_many;

use super::format::BLOCK;
use super::{blocks_per_row, Kernel, QuantError, SharedOut, ThreadPool};

/// Weight rows interleaved in one group.
pub const GROUP: usize = 16;
/// Consecutive values of one row in a chunk (the width of a 4-way integer dot product).
pub const QUAD: usize = 4;
/// Bytes of one chunk: 4 values of each of the 16 rows of a group.
pub const CHUNK: usize = GROUP * QUAD;
/// Chunks per block of 32 values.
pub const CHUNKS: usize = BLOCK / QUAD;
/// Bytes of one group-block: 16 rows x 32 values.
pub const GROUP_BLOCK: usize = GROUP * BLOCK;

/// Below this many weight bytes per worker, extra threads cost more than they save.
const MIN_BYTES_PER_PART: usize = 32 * 1024;

/// A weight matrix W (n, k) in the tiled layout (see the module documentation), borrowed
/// (typically from a memory-mapped file; no alignment needed).
#[derive(Clone, Copy, Debug)]
pub struct Q8Tiled<'a> {
    q: &'a [i8],       // (G, nb, 8, 16, 4)
    scales: &'a [f32], // (G, nb, 16)
    n: usize,
    k: usize,
}

impl<'a> Q8Tiled<'a> {
    /// Wraps `q` (G, nb, 8, 16, 4) and `scales` (G, nb, 16) of a (n, k) matrix, checking
    /// their lengths.
    pub fn new(q: &'a [i8], scales: &'a [f32], n: usize, k: usize) -> Result<Self, QuantError> {
        if n == 0 || k == 0 {
            return Err(QuantError::EmptyShape { n, k });
        }
        let (groups, nb) = (n.div_ceil(GROUP), blocks_per_row(k));
        let too_large = QuantError::EmptyShape { n, k };
        let q_len = groups
            .checked_mul(nb)
            .and_then(|v| v.checked_mul(GROUP_BLOCK))
            .ok_or(too_large.clone())?;
        let s_len = groups
            .checked_mul(nb)
            .and_then(|v| v.checked_mul(GROUP))
            .ok_or(too_large)?;
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
                n: groups * GROUP,
                nb,
                expected: s_len,
                got: scales.len(),
            });
        }
        Ok(Self { q, scales, n, k })
    }

    /// Output features (rows of W).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features (columns of W).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Groups of 16 rows, `ceil(n / 16)`.
    pub fn groups(&self) -> usize {
        self.n.div_ceil(GROUP)
    }

    /// Blocks of 32 values per row, `ceil(k / 32)`.
    pub fn blocks(&self) -> usize {
        blocks_per_row(self.k)
    }

    /// The int8 values, (G, nb, 8, 16, 4).
    pub fn q(&self) -> &'a [i8] {
        self.q
    }

    /// The scales, (G, nb, 16).
    pub fn scales(&self) -> &'a [f32] {
        self.scales
    }

    /// Bytes read by one product: int8 values and scales, padding included.
    pub fn weight_bytes(&self) -> usize {
        self.q.len() + std::mem::size_of_val(self.scales)
    }

    /// The values (8, 16, 4) and scales (16) of group g, block b.
    #[inline(always)]
    pub(crate) fn group_block(&self, g: usize, b: usize) -> (&'a [i8], &'a [f32]) {
        let gb = g * self.blocks() + b;
        (
            &self.q[gb * GROUP_BLOCK..(gb + 1) * GROUP_BLOCK],
            &self.scales[gb * GROUP..(gb + 1) * GROUP],
        )
    }

    /// Row r of W dequantized into `out` (k): the embedding lookup.
    ///
    /// # Panics
    /// If `r >= n` or `out.len() != k`.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(
            r < self.n && out.len() == self.k,
            "row {r} of a {}x{} matrix",
            self.n,
            self.k
        );
        let (g, l) = (r / GROUP, r % GROUP);
        for (b, ob) in out.chunks_mut(BLOCK).enumerate() {
            let (q, s) = self.group_block(g, b);
            for (j, o) in ob.iter_mut().enumerate() {
                *o = f32::from(q[(j / QUAD) * CHUNK + l * QUAD + j % QUAD]) * s[l];
            }
        }
    }

    /// The row-major Q8 form: (q (n, k), scales (n, ceil(k / 32))), [`tile_q8`] undone.
    pub fn to_rows(&self) -> (Vec<i8>, Vec<f32>) {
        let (n, k, nb) = (self.n, self.k, self.blocks());
        let mut q = vec![0i8; n * k];
        let mut scales = vec![0f32; n * nb];
        for r in 0..n {
            let (g, l) = (r / GROUP, r % GROUP);
            for b in 0..nb {
                let (tq, ts) = self.group_block(g, b);
                scales[r * nb + b] = ts[l];
                for j in 0..BLOCK.min(k - b * BLOCK) {
                    q[r * k + b * BLOCK + j] = tq[(j / QUAD) * CHUNK + l * QUAD + j % QUAD];
                }
            }
        }
        (q, scales)
    }

    /// `y = x Wᵀ` for m activation rows: x (m, k) and y (m, n) row-major.
    pub fn matmul(
        &self,
        x: &[f32],
        y: &mut [f32],
        acts: Acts,
        isa: Isa,
        pool: &ThreadPool,
    ) -> Result<(), QuantError> {
        matmul_many(&[*self], x, &mut [y], acts, isa, pool)
    }
}

/// `ys[i] = x ws[i]ᵀ` for matrices that read the same activations x (m, k) (a layer's
/// query, key and value projections; its gate and up projections): x is quantized once and
/// every matrix's groups share one pool round. Each output has the bits
/// [`Q8Tiled::matmul`] gives it alone.
pub fn matmul_many(
    ws: &[Q8Tiled<'_>],
    x: &[f32],
    ys: &mut [&mut [f32]],
    acts: Acts,
    isa: Isa,
    pool: &ThreadPool,
) -> Result<(), QuantError> {
    let (k, m) = check_many(ws, x, ys)?;
    let isa = isa.checked()?;
    if m == 0 {
        return Ok(());
    }
    let a = QuantRows::new(x, m, k, acts, isa.form(), pool);
    let outs = shared_outs(ws, ys, m);
    let split = Split::new(ws, pool.threads());
    pool.run(split.parts, |p| {
        for (i, groups) in split.ranges(p) {
            let n = ws[i].n;
            let cols = (groups.start * GROUP).min(n)..(groups.end * GROUP).min(n);
            // SAFETY: part p writes only columns `cols` of output i (the rows of its groups
            // of matrix i); the ranges of distinct parts are disjoint, and `pool.run`
            // returns only after every part has finished.
            let mut out = unsafe { outs[i].part(cols) };
            run_groups(&ws[i], &a, isa, groups, &mut out);
        }
    });
    Ok(())
}

/// Checks that `ws` is not empty, that every matrix has the same k, that x is (m, k) and
/// each `ys[i]` (m, n_i); returns (k, m).
fn check_many(
    ws: &[Q8Tiled<'_>],
    x: &[f32],
    ys: &[&mut [f32]],
) -> Result<(usize, usize), QuantError> {
    let k = ws.first().map_or(0, |w| w.k);
    if ws.is_empty() || ws.len() != ys.len() {
        return Err(QuantError::EmptyShape { n: ys.len(), k });
    }
    if !x.len().is_multiple_of(k) {
        return Err(QuantError::InputLen { k, got: x.len() });
    }
    let m = x.len() / k;
    for (w, y) in ws.iter().zip(ys) {
        if w.k != k {
            return Err(QuantError::InputLen {
                k: w.k,
                got: x.len(),
            });
        }
        if y.len() != m * w.n {
            return Err(QuantError::OutputLen {
                m,
                n: w.n,
                expected: m * w.n,
                got: y.len(),
            });
        }
    }
    Ok((k, m))
}

/// One shared writer per output `ys[i]` (m, n_i).
fn shared_outs<'y>(ws: &[Q8Tiled<'_>], ys: &'y mut [&mut [f32]], m: usize) -> TVec<SharedOut<'y>> {
    ws.iter()
        .zip(ys.iter_mut())
        .map(|(w, y)| SharedOut {
            ptr: y.as_mut_ptr(),
            m,
            n: w.n,
            _y: PhantomData,
        })
        .collect()
}

/// The groups of several matrices with the same k, numbered one matrix after another and
/// cut into `parts` runs of equal length (a group is the same work in every matrix); each
/// part gets, per matrix, a range of that matrix's groups.
struct Split {
    parts: usize,
    per_part: usize,
    /// The first group number of each matrix, then the total.
    starts: TVec<usize>,
}

impl Split {
    /// As many parts as `threads`, groups and [`MIN_BYTES_PER_PART`] allow.
    fn new(ws: &[Q8Tiled<'_>], threads: usize) -> Self {
        let mut starts: TVec<usize> = tvec![0];
        for w in ws {
            starts.push(starts[starts.len() - 1] + w.groups());
        }
        let total = starts[ws.len()];
        let bytes: usize = ws.iter().map(Q8Tiled::weight_bytes).sum();
        let parts = (bytes / MIN_BYTES_PER_PART).clamp(1, threads.min(total).max(1));
        Split {
            parts,
            per_part: total.div_ceil(parts),
            starts,
        }
    }

    /// Part p's (matrix, groups of that matrix) pairs, in matrix order.
    fn ranges(&self, p: usize) -> impl Iterator<Item = (usize, Range<usize>)> + '_ {
        let total = self.starts[self.starts.len() - 1];
        let (lo, hi) = (
            (p * self.per_part).min(total),
            ((p + 1) * self.per_part).min(total),
        );
        self.starts
            .windows(2)
            .enumerate()
            .filter_map(move |(i, w)| {
                let (a, b) = (lo.max(w[0]), hi.min(w[1]));
                (a < b).then(|| (i, a - w[0]..b - w[0]))
            })
    }
}

/// Turns a row-major Q8 matrix (q (n, k), scales (n, ceil(k / 32))) into the tiled layout:
/// (q (G, nb, 8, 16, 4), scales (G, nb, 16)), zero-padded.
///
/// # Panics
/// If the lengths do not match (n, k).
pub fn tile_q8(q: &[i8], scales: &[f32], n: usize, k: usize) -> (Vec<i8>, Vec<f32>) {
    let nb = blocks_per_row(k);
    assert!(
        q.len() == n * k && scales.len() == n * nb,
        "tile_q8: lengths of a {n}x{k} matrix"
    );
    let groups = n.div_ceil(GROUP);
    let mut tq = vec![0i8; groups * nb * GROUP_BLOCK];
    let mut ts = vec![0f32; groups * nb * GROUP];
    for r in 0..n {
        let (g, l) = (r / GROUP, r % GROUP);
        for b in 0..nb {
            let gb = g * nb + b;
            ts[gb * GROUP + l] = scales[r * nb + b];
            for j in 0..BLOCK.min(k - b * BLOCK) {
                tq[gb * GROUP_BLOCK + (j / QUAD) * CHUNK + l * QUAD + j % QUAD] =
                    q[r * k + b * BLOCK + j];
            }
        }
    }
    (tq, ts)
}

/// An instruction-set variant of the GEMM kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable code, the reference.
    Scalar,
    /// x86_64 AVX2 (int16 products).
    Avx2,
    /// x86_64 AVX-VNNI (256-bit `vpdpbusd`).
    AvxVnni,
    /// x86_64 AVX-512 VNNI (512-bit `vpdpbusd`).
    Avx512Vnni,
    /// aarch64 NEON without dot products (int16 products).
    Neon,
    /// aarch64 NEON with SDOT.
    Dotprod,
    /// aarch64 NEON with SDOT and SMMLA (i8mm).
    I8mm,
}

impl Isa {
    /// Every variant, best last within each architecture.
    pub const ALL: [Isa; 7] = [
        Isa::Scalar,
        Isa::Avx2,
        Isa::AvxVnni,
        Isa::Avx512Vnni,
        Isa::Neon,
        Isa::Dotprod,
        Isa::I8mm,
    ];

    /// A short lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::AvxVnni => "avxvnni",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Neon => "neon",
            Isa::Dotprod => "dotprod",
            Isa::I8mm => "i8mm",
        }
    }

    /// Whether this CPU and this build can run the variant.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Isa::AvxVnni => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("avxvnni"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(target_arch = "aarch64")]
            Isa::Dotprod => {
                std::arch::is_aarch64_feature_detected!("neon")
                    && std::arch::is_aarch64_feature_detected!("dotprod")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::I8mm => {
                std::arch::is_aarch64_feature_detected!("neon")
                    && std::arch::is_aarch64_feature_detected!("dotprod")
                    && std::arch::is_aarch64_feature_detected!("i8mm")
            }
            #[allow(unreachable_patterns)] // which arms remain depends on the target
            _ => false,
        }
    }

    /// The variants this CPU can run, scalar first.
    pub fn available() -> Vec<Isa> {
        Self::ALL.into_iter().filter(|i| i.is_available()).collect()
    }

    /// The fastest variant this CPU can run.
    pub fn best() -> Isa {
        Self::ALL
            .into_iter()
            .rev()
            .find(|i| i.is_available())
            .unwrap_or(Isa::Scalar)
    }

    /// The variant that runs for the one kernel choice ([`Kernel::select`]): the best
    /// available one of the kernel's family (scalar for `Scalar`; AVX2 or AVX-VNNI for
    /// `Avx2`, those or AVX-512 VNNI for `Avx512`; NEON for `Neon`; SDOT or i8mm for
    /// `Dotprod`), else scalar.
    pub fn for_kernel(kernel: Kernel) -> Isa {
        let family: &[Isa] = match kernel {
            Kernel::Scalar => &[],
            Kernel::Avx2 => &[Isa::Avx2, Isa::AvxVnni],
            Kernel::Avx512 => &[Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni],
            Kernel::Neon => &[Isa::Neon],
            Kernel::Dotprod => &[Isa::Neon, Isa::Dotprod, Isa::I8mm],
        };
        family
            .iter()
            .rev()
            .copied()
            .find(|i| i.is_available())
            .unwrap_or(Isa::Scalar)
    }

    /// `self` if this CPU can run it.
    pub fn checked(self) -> Result<Isa, QuantError> {
        if self.is_available() {
            Ok(self)
        } else {
            Err(QuantError::IsaUnavailable(self.name()))
        }
    }

    /// The activation form this variant's kernels read.
    fn form(self) -> Form {
        match self {
            Isa::AvxVnni | Isa::Avx512Vnni => Form::Unsigned,
            Isa::Dotprod | Isa::I8mm => Form::Signed,
            Isa::Scalar | Isa::Avx2 | Isa::Neon => Form::Wide,
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Computes output columns of groups `groups` for every activation row with one variant.
fn run_groups(
    w: &Q8Tiled<'_>,
    a: &QuantRows,
    isa: Isa,
    groups: Range<usize>,
    out: &mut super::OutRows<'_>,
) {
    for g in groups {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` was checked available, so the CPU has AVX2.
            Isa::Avx2 => unsafe { avx2::group(w, g, a, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` was checked available, so the CPU has AVX2 and AVX-VNNI.
            Isa::AvxVnni => unsafe { avxvnni::group(w, g, a, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` was checked available, so the CPU has AVX-512F, BW and VNNI.
            Isa::Avx512Vnni => unsafe { avx512::group(w, g, a, out) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `isa` was checked available, so the CPU has NEON.
            Isa::Neon => unsafe { neon::group(w, g, a, out) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `isa` was checked available, so the CPU has NEON and dotprod.
            Isa::Dotprod => unsafe { dotprod::group(w, g, a, out) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `isa` was checked available, so the CPU has NEON, dotprod and i8mm.
            Isa::I8mm => unsafe { i8mm::group(w, g, a, out) },
            _ => scalar::group(w, g, a, out),
        }
    }
}

/// Writes the tile `ys` (rows i0.., the 16 outputs of group g each) into `out`, dropping
/// padded rows past n.
#[inline(always)]
fn store_tile<const M: usize>(
    out: &mut super::OutRows<'_>,
    n: usize,
    g: usize,
    i0: usize,
    ys: &[[f32; GROUP]; M],
) {
    let rows = GROUP.min(n - g * GROUP);
    for (t, y) in ys.iter().enumerate() {
        for (l, &v) in y[..rows].iter().enumerate() {
            out.set(i0 + t, g * GROUP + l, v);
        }
    }
}
