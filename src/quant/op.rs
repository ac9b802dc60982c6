//! The int8 operators tract runs for us: [`Q8MatMul`] (`y = x Wᵀ`) and [`Q8Gather`] (rows
//! of W, the embedding lookup), over Q8 weights read in place from the memory-mapped bundle,
//! row-major or in the GEMM's tiled layout (or, for weights requantized from another format
//! at load, held on the heap).
//!
//! tract's own int8 matmul is far too slow for decode and its constant folding would copy
//! every weight to the heap as f32, so the loader's pipeline ([`crate::prepass`]) replaces
//! `DequantizeLinear(block_size=32) -> Transpose -> MatMul` by a `Q8MatMul` node and
//! `DequantizeLinear -> Gather` by a `Q8Gather` node (domain [`DOMAIN`]), each naming its
//! weight. [`register`] teaches tract-onnx to parse them; once the model is typed, the loader
//! hands every node its [`Q8Weights`] and kernel settings with [`Q8MatMul::bind`] /
//! [`Q8Gather::bind`]. An unbound node refuses to run.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, OnceLock};

use memmap2::Mmap;
use tract_onnx::model::ParsingContext;
use tract_onnx::pb;
use tract_onnx::tract_hir::internal::*;

use super::gemm::{self, Acts, Isa, Q8Tiled};
use super::{blocks_per_row, Kernel, Q8Matrix, Scheme, ThreadPool};

/// ONNX domain of our nodes (not a standard op: only edgelm's loader writes them).
pub const DOMAIN: &str = "ai.edgelm";
/// Op type of the int8 linear layer node.
pub const MATMUL: &str = "Q8MatMul";
/// Op type of the int8 embedding lookup node.
pub const GATHER: &str = "Q8Gather";

/// Bytes of one weight tensor: a range of a mapped file, or a copy.
pub enum WeightBytes<'a> {
    /// `map[range]`, used in place when aligned for its element type.
    Mapped(Arc<Mmap>, Range<usize>),
    /// Bytes held inline in the protobuf; copied.
    Inline(&'a [u8]),
}

/// A slice of `T` that lives in a mapped file or on the heap.
enum Slice<T> {
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
    Owned(Vec<T>),
}

impl<T: Copy> Slice<T> {
    /// Uses `bytes` in place when the mapping is suitably aligned and the machine is
    /// little-endian; otherwise decodes a copy with `decode`.
    fn new(bytes: WeightBytes<'_>, len: usize, decode: fn([u8; 4]) -> T) -> Option<Self> {
        let size = std::mem::size_of::<T>();
        let need = len.checked_mul(size)?;
        let raw: &[u8] = match &bytes {
            WeightBytes::Mapped(map, range) => map.get(range.clone())?,
            WeightBytes::Inline(b) => b,
        };
        if raw.len() != need {
            return None;
        }
        if let WeightBytes::Mapped(map, range) = &bytes {
            let aligned = (raw.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>());
            if aligned && cfg!(target_endian = "little") {
                return Some(Slice::Mapped {
                    map: Arc::clone(map),
                    offset: range.start,
                    len,
                });
            }
        }
        let mut word = [0u8; 4];
        let owned = raw
            .chunks_exact(size)
            .map(|c| {
                word[..size].copy_from_slice(c);
                decode(word)
            })
            .collect();
        Some(Slice::Owned(owned))
    }

    fn get(&self) -> &[T] {
        match self {
            Slice::Mapped { map, offset, len } => {
                let bytes = &map[*offset..*offset + len * std::mem::size_of::<T>()];
                // SAFETY: `new` checked that this range lies in the map and is aligned for T;
                // T is i8 or f32, for which every bit pattern is valid (f32 read as
                // little-endian, which `new` checked is the native order); the map is
                // read-only and lives as long as `self`.
                unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), *len) }
            }
            Slice::Owned(v) => v,
        }
    }

    fn is_mapped(&self) -> bool {
        matches!(self, Slice::Mapped { .. })
    }
}

/// One quantized matrix W (n, k) in one of two layouts (see [`Q8Weights::is_tiled`]).
pub struct Q8Weights {
    name: String,
    n: usize,
    k: usize,
    stored: Stored,
}

/// How a [`Q8Weights`] holds its values and scales.
enum Stored {
    /// Row-major: int8 (n, k), scales (n, nb). For [`Scheme::Q8Q15`]'s prompts, the tiled
    /// copy is made on the heap at first use.
    Rows {
        q: Slice<i8>,                         // (n, k)
        scales: Slice<f32>,                   // (n, nb)
        tiled: OnceLock<(Vec<i8>, Vec<f32>)>, // (G, nb, 8, 16, 4), (G, nb, 16)
    },
    /// The GEMM's tiled layout as the converter writes it ([`gemm`]'s module documentation).
    Tiled {
        q: Slice<i8>,       // (G, nb, 8, 16, 4)
        scales: Slice<f32>, // (G, nb, 16)
    },
}

impl fmt::Debug for Q8Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Q8Weights({:?}, {}x{}, {}, {})",
            self.name,
            self.n,
            self.k,
            if self.is_tiled() { "tiled" } else { "rows" },
            if self.is_mapped() { "mapped" } else { "copied" }
        )
    }
}

impl Q8Weights {
    /// Wraps the bytes of W's row-major int8 values (n, k) and scales (n, nb), checking their
    /// sizes against (n, k).
    pub fn new(
        name: &str,
        n: usize,
        k: usize,
        q: WeightBytes<'_>,
        scales: WeightBytes<'_>,
    ) -> TractResult<Q8Weights> {
        let nb = blocks_per_row(k);
        let (q_len, s_len) = (n.saturating_mul(k), n.saturating_mul(nb));
        let q = Slice::new(q, q_len, |w| w[0] as i8)
            .with_context(|| format!("{name}: int8 values are not {q_len} bytes"))?;
        let scales = Slice::new(scales, s_len, f32::from_le_bytes)
            .with_context(|| format!("{name}: scales are not {s_len} f32"))?;
        let w = Q8Weights {
            name: name.to_string(),
            n,
            k,
            stored: Stored::Rows {
                q,
                scales,
                tiled: OnceLock::new(),
            },
        };
        w.matrix()?;
        Ok(w)
    }

    /// Wraps the bytes of W's int8 values (G, nb, 8, 16, 4) and scales (G, nb, 16) in the
    /// GEMM's tiled layout, checking their sizes against (n, k).
    pub fn new_tiled(
        name: &str,
        n: usize,
        k: usize,
        q: WeightBytes<'_>,
        scales: WeightBytes<'_>,
    ) -> TractResult<Q8Weights> {
        let gb = n.div_ceil(gemm::GROUP).saturating_mul(blocks_per_row(k));
        let (q_len, s_len) = (
            gb.saturating_mul(gemm::GROUP_BLOCK),
            gb.saturating_mul(gemm::GROUP),
        );
        let q = Slice::new(q, q_len, |w| w[0] as i8)
            .with_context(|| format!("{name}: tiled int8 values are not {q_len} bytes"))?;
        let scales = Slice::new(scales, s_len, f32::from_le_bytes)
            .with_context(|| format!("{name}: tiled scales are not {s_len} f32"))?;
        let w = Q8Weights {
            name: name.to_string(),
            n,
            k,
            stored: Stored::Tiled { q, scales },
        };
        w.tiled()?;
        Ok(w)
    }

    /// Weights made in memory (requantized from another format), owned by the node.
    pub fn owned(
        name: &str,
        n: usize,
        k: usize,
        q: Vec<i8>,
        scales: Vec<f32>,
    ) -> TractResult<Q8Weights> {
        let nb = blocks_per_row(k);
        ensure!(
            q.len() == n.saturating_mul(k) && scales.len() == n.saturating_mul(nb),
            "{name}: {} int8 values and {} scales for a {n}x{k} matrix",
            q.len(),
            scales.len()
        );
        let w = Q8Weights {
            name: name.to_string(),
            n,
            k,
            stored: Stored::Rows {
                q: Slice::Owned(q),
                scales: Slice::Owned(scales),
                tiled: OnceLock::new(),
            },
        };
        w.matrix()?;
        Ok(w)
    }

    /// The row-major weights as the row-major kernels take them.
    pub fn matrix(&self) -> TractResult<Q8Matrix<'_>> {
        match &self.stored {
            Stored::Rows { q, scales, .. } => {
                Ok(Q8Matrix::new(q.get(), scales.get(), self.n, self.k)?)
            }
            Stored::Tiled { .. } => bail!("{}: int8 weights are tiled, not row-major", self.name),
        }
    }

    /// The weights in the GEMM's tiled layout: in place, or for row-major weights a copy
    /// made on the heap at the first call.
    pub fn tiled(&self) -> TractResult<Q8Tiled<'_>> {
        let (q, s) = match &self.stored {
            Stored::Rows { q, scales, tiled } => {
                let (q, s) =
                    tiled.get_or_init(|| gemm::tile_q8(q.get(), scales.get(), self.n, self.k));
                (q.as_slice(), s.as_slice())
            }
            Stored::Tiled { q, scales } => (q.get(), scales.get()),
        };
        Ok(Q8Tiled::new(q, s, self.n, self.k)?)
    }

    /// Whether the bundle stores these weights in the GEMM's tiled layout.
    pub fn is_tiled(&self) -> bool {
        matches!(self.stored, Stored::Tiled { .. })
    }

    /// Whether both tensors are used in place from the mapped file (no heap copy).
    pub fn is_mapped(&self) -> bool {
        let (Stored::Rows { q, scales, .. } | Stored::Tiled { q, scales }) = &self.stored;
        q.is_mapped() && scales.is_mapped()
    }

    /// Bytes of weights and scales as stored.
    pub fn bytes(&self) -> usize {
        let (Stored::Rows { q, scales, .. } | Stored::Tiled { q, scales }) = &self.stored;
        q.get().len() + 4 * scales.get().len()
    }

    /// Row r (< n) of W dequantized into `out` (k).
    fn dequantize_row(&self, r: usize, out: &mut [f32]) -> TractResult<()> {
        match &self.stored {
            Stored::Rows { .. } => {
                let w = self.matrix()?;
                let nb = blocks_per_row(self.k);
                let q = &w.q()[r * self.k..(r + 1) * self.k];
                let s = &w.scales()[r * nb..(r + 1) * nb];
                for (j, (o, &v)) in out.iter_mut().zip(q).enumerate() {
                    *o = v as f32 * s[j / super::BLOCK];
                }
            }
            Stored::Tiled { .. } => self.tiled()?.dequantize_row(r, out),
        }
        Ok(())
    }
}

/// How the products run: arithmetic, instruction set, threads.
#[derive(Clone)]
pub struct Q8Exec {
    /// Activation handling (see [`Scheme`]).
    pub scheme: Scheme,
    /// Kernel variant.
    pub kernel: Kernel,
    /// Worker threads shared by every node.
    pub pool: Arc<ThreadPool>,
}

impl fmt::Debug for Q8Exec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?}/{}/{} threads",
            self.scheme,
            self.kernel,
            self.pool.threads()
        )
    }
}

/// What a node needs to run, set by the loader after typing.
#[derive(Clone, Debug)]
struct Bound {
    weights: Arc<Q8Weights>,
    exec: Q8Exec,
}

impl Eq for Bound {}

impl PartialEq for Bound {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights)
            && self.exec.scheme == other.exec.scheme
            && self.exec.kernel == other.exec.kernel
            && Arc::ptr_eq(&self.exec.pool, &other.exec.pool)
    }
}

/// Teaches tract-onnx our two node types.
pub fn register(onnx: &mut tract_onnx::Onnx) {
    onnx.op_register.insert(MATMUL, parse_matmul);
    onnx.op_register.insert(GATHER, parse_gather);
}

/// What both node types carry: the weight's name and shape (from the node's attributes),
/// and once the loader binds them, the weights and kernel settings.
#[derive(Clone, Debug, PartialEq, Eq)]
struct WeightSlot {
    weight: String,
    n: usize,
    k: usize,
    bound: Option<Bound>,
}

impl WeightSlot {
    /// Reads the `weight`, `n` and `k` attributes our pre-pass writes.
    fn parse(node: &pb::NodeProto) -> TractResult<WeightSlot> {
        let attr = |name: &str| node.attribute.iter().find(|a| a.name == name);
        let weight = attr("weight")
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
            .with_context(|| format!("{} {:?} has no weight attribute", node.op_type, node.name))?;
        let dim = |name: &str| -> TractResult<usize> {
            let v = attr(name).map(|a| a.i).unwrap_or(0);
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0)
                .with_context(|| format!("{} {:?}: bad {name} {v}", node.op_type, node.name))
        };
        Ok(WeightSlot {
            weight,
            n: dim("n")?,
            k: dim("k")?,
            bound: None,
        })
    }

    fn bind(&mut self, weights: Arc<Q8Weights>, exec: Q8Exec) -> TractResult<()> {
        ensure!(
            (weights.n, weights.k) == (self.n, self.k),
            "{}: node is {}x{} but the weights are {}x{}",
            self.weight,
            self.n,
            self.k,
            weights.n,
            weights.k
        );
        ensure!(
            !(weights.is_tiled() && exec.scheme == Scheme::Q8Q16),
            "{}: the q8q16 scheme needs row-major int8 weights and this bundle stores them \
             tiled (convert with --int8-layout rows)",
            self.weight
        );
        self.bound = Some(Bound { weights, exec });
        Ok(())
    }

    fn bound(&self) -> TractResult<&Bound> {
        self.bound
            .as_ref()
            .with_context(|| format!("{}: no weights bound", self.weight))
    }
}

fn parse_matmul(
    _ctx: &ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((Box::new(Q8MatMul::parse(node)?), vec![]))
}

fn parse_gather(
    _ctx: &ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((Box::new(Q8Gather(WeightSlot::parse(node)?)), vec![]))
}

/// `y_i = x W_iᵀ` for x (..., k) f32 and one or more W_i (n_i, k) int8 blocks: outputs
/// y_i (..., n_i), one per weight. Several weights are products that read the same input
/// (a layer's query, key and value projections; its gate and up projections): the
/// activations are quantized once and all the products share one pool round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Q8MatMul(Vec<WeightSlot>);

impl Q8MatMul {
    /// One weight (attributes `weight`, `n`, `k`) or several (`weights`, `ns`, `k`).
    fn parse(node: &pb::NodeProto) -> TractResult<Q8MatMul> {
        let Some(names) = node.attribute.iter().find(|a| a.name == "weights") else {
            return Ok(Q8MatMul(vec![WeightSlot::parse(node)?]));
        };
        let ns = node
            .attribute
            .iter()
            .find(|a| a.name == "ns")
            .map_or(&[][..], |a| a.ints.as_slice());
        let k = node
            .attribute
            .iter()
            .find(|a| a.name == "k")
            .and_then(|a| usize::try_from(a.i).ok())
            .filter(|&k| k > 0);
        let k = k.with_context(|| format!("{MATMUL} {:?}: bad or missing k", node.name))?;
        ensure!(
            !names.strings.is_empty() && names.strings.len() == ns.len(),
            "{MATMUL} {:?}: {} weights for {} sizes",
            node.name,
            names.strings.len(),
            ns.len()
        );
        let slots = names
            .strings
            .iter()
            .zip(ns)
            .map(|(name, &n)| {
                let weight = String::from_utf8_lossy(name).into_owned();
                let n = usize::try_from(n)
                    .ok()
                    .filter(|&n| n > 0)
                    .with_context(|| format!("{MATMUL} {:?}: bad n {n}", node.name))?;
                Ok(WeightSlot {
                    weight,
                    n,
                    k,
                    bound: None,
                })
            })
            .collect::<TractResult<Vec<_>>>()?;
        Ok(Q8MatMul(slots))
    }

    /// The names of the weights this node reads (the `DequantizeLinear` outputs it
    /// replaced), one per output.
    pub fn weights(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|s| s.weight.as_str())
    }

    /// Gives the node the weights of its output `i` (checked against the node's shape) and
    /// kernel settings.
    pub fn bind(&mut self, i: usize, weights: Arc<Q8Weights>, exec: Q8Exec) -> TractResult<()> {
        let slots = self.0.len();
        self.0
            .get_mut(i)
            .with_context(|| format!("{MATMUL}: no output {i} of {slots}"))?
            .bind(weights, exec)
    }

    /// Input features, the same for every weight.
    fn k(&self) -> usize {
        self.0[0].k
    }

    /// The output shape for weight `slot` from the input shape, whose last axis must be k.
    fn output_shape<D: DimLike>(&self, slot: &WeightSlot, input: &[D]) -> TractResult<TVec<D>> {
        let mut shape: TVec<D> = input.into();
        match shape.last_mut() {
            Some(last) if *last == D::from(slot.k) => *last = D::from(slot.n),
            _ => bail!(
                "{}: input {:?} does not end in {}",
                slot.weight,
                input,
                slot.k
            ),
        }
        Ok(shape)
    }
}

impl Op for Q8MatMul {
    fn name(&self) -> StaticName {
        MATMUL.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(self
            .0
            .iter()
            .map(|s| {
                format!(
                    "{} {}x{} {:?}",
                    s.weight,
                    s.n,
                    s.k,
                    s.bound.as_ref().map(|b| &b.exec)
                )
            })
            .collect())
    }

    op_as_typed_op!();
}

impl EvalOp for Q8MatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let bound = self
            .0
            .iter()
            .map(WeightSlot::bound)
            .collect::<TractResult<TVec<_>>>()?;
        let x = input.try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?; // (m, k)
        let mut outs = self
            .0
            .iter()
            .map(|slot| Tensor::zero::<f32>(&self.output_shape(slot, input.shape())?))
            .collect::<TractResult<TVec<_>>>()?;
        {
            let mut views = outs
                .iter_mut()
                .map(|t| t.try_as_plain_ram_mut())
                .collect::<TractResult<TVec<_>>>()?;
            let mut ys = views
                .iter_mut()
                .map(|v| v.as_slice_mut::<f32>())
                .collect::<TractResult<TVec<_>>>()?; // (m, n_i) each
            let ws: TVec<&Q8Weights> = bound.iter().map(|b| &*b.weights).collect();
            products(&ws, &bound[0].exec, x, &mut ys)?;
        }
        Ok(outs.into_iter().map(Tensor::into_tvalue).collect())
    }
}

impl InferenceRulesOp for Q8MatMul {
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, self.0.len())?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        let k = self.k() as i64;
        for (slot, output) in self.0.iter().zip(outputs) {
            s.equals(&output.datum_type, f32::datum_type())?;
            s.equals(&inputs[0].rank, &output.rank)?;
            let n = slot.n as i64;
            s.given(&inputs[0].rank, move |s, rank| {
                let last = usize::try_from(rank - 1).context("Q8MatMul needs a rank >= 1 input")?;
                for i in 0..last {
                    s.equals(&inputs[0].shape[i], &output.shape[i])?;
                }
                s.equals(&inputs[0].shape[last], TDim::from(k))?;
                s.equals(&output.shape[last], TDim::from(n))
            })?;
        }
        Ok(())
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(self.0.len())
    }

    as_op!();
    to_typed!();
}

impl TypedOp for Q8MatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.0
            .iter()
            .map(|slot| Ok(f32::fact(self.output_shape(slot, &inputs[0].shape)?)))
            .collect()
    }

    as_op!();
}

/// `ys[i] = x W_iᵀ` for x (m, k), ys[i] (m, n_i) as `exec` says, on either layout
/// ([`Scheme::Auto`] is Q8Q15 on tiled weights and Q8F32 on row-major ones):
/// - tiled weights: Q8F32 one row at a time on the tiled one-row kernel (the same bits as
///   the row-major Q8F32 product; prompts re-read the weights per row), Q8Q15 the same for
///   one row and the Q15 GEMM for prompts, Q8Q8 the GEMM with int8 activations for every
///   row; all the weights in one pool round per row or prompt. Q8Q16 has no tiled product
///   (refused when the node is bound);
/// - row-major weights (or a mix of layouts): one weight after another, every scheme's
///   row-major product, except that [`Scheme::Q8Q15`] runs prompts (m > 1) on the GEMM
///   over a tiled heap copy and one row as Q8F32.
fn products(ws: &[&Q8Weights], exec: &Q8Exec, x: &[f32], ys: &mut [&mut [f32]]) -> TractResult<()> {
    let rows = x.len() / ws[0].k;
    let isa = Isa::for_kernel(exec.kernel);
    let pool = &exec.pool;
    if ws.iter().all(|w| w.is_tiled()) {
        let ts = ws
            .iter()
            .map(|w| w.tiled())
            .collect::<TractResult<TVec<_>>>()?;
        match exec.scheme {
            Scheme::Q8Q15 | Scheme::Auto if rows > 1 => {
                gemm::matmul_many(&ts, x, ys, Acts::Q15, isa, pool)?
            }
            Scheme::Q8Q8 => gemm::matmul_many(&ts, x, ys, Acts::Q8, isa, pool)?,
            Scheme::Q8F32 | Scheme::Q8Q15 | Scheme::Auto => {
                for (r, xr) in x.chunks_exact(ws[0].k).enumerate() {
                    let mut yr: TVec<&mut [f32]> = ys
                        .iter_mut()
                        .zip(ws)
                        .map(|(y, w)| &mut y[r * w.n..(r + 1) * w.n])
                        .collect();
                    gemm::matvec_f32_many(&ts, xr, &mut yr, exec.kernel, pool)?;
                }
            }
            scheme @ (Scheme::Q8Q16 | Scheme::Fold) => {
                bail!("{}: no {scheme} product on tiled int8 weights", ws[0].name)
            }
        }
        return Ok(());
    }
    for (w, y) in ws.iter().zip(ys.iter_mut()) {
        if w.is_tiled() {
            products(&[*w], exec, x, &mut [&mut **y])?;
            continue;
        }
        match exec.scheme {
            Scheme::Q8Q15 if rows > 1 => w.tiled()?.matmul(x, y, Acts::Q15, isa, pool)?,
            Scheme::Q8Q15 | Scheme::Auto => {
                w.matrix()?.matmul(x, y, Scheme::Q8F32, exec.kernel, pool)?
            }
            scheme => w.matrix()?.matmul(x, y, scheme, exec.kernel, pool)?,
        }
    }
    Ok(())
}

/// Rows of W (n, k) for integer indices of any shape: output (indices..., k) f32.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Q8Gather(WeightSlot);

impl Q8Gather {
    /// The name of the weight this node reads.
    pub fn weight(&self) -> &str {
        &self.0.weight
    }

    /// Gives the node its weights (checked against the node's shape).
    pub fn bind(&mut self, weights: Arc<Q8Weights>, exec: Q8Exec) -> TractResult<()> {
        self.0.bind(weights, exec)
    }
}

impl Op for Q8Gather {
    fn name(&self) -> StaticName {
        GATHER.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{} {}x{}", self.0.weight, self.0.n, self.0.k)])
    }

    op_as_typed_op!();
}

impl EvalOp for Q8Gather {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let bound = self.0.bound()?;
        let ids = input.cast_to::<i64>()?;
        let ids = ids.try_as_plain_ram()?;
        let ids = ids.as_slice::<i64>()?;
        let mut shape: TVec<usize> = input.shape().into();
        shape.push(self.0.k);
        let mut out = Tensor::zero::<f32>(&shape)?;
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let y = view.as_slice_mut::<f32>()?; // (ids, k)
            for (&id, row) in ids.iter().zip(y.chunks_exact_mut(self.0.k)) {
                // ONNX Gather counts negative indices from the end.
                let r = if id < 0 { id + self.0.n as i64 } else { id };
                let r = usize::try_from(r)
                    .ok()
                    .filter(|&r| r < self.0.n)
                    .with_context(|| {
                        format!("{}: index {id} out of 0..{}", self.0.weight, self.0.n)
                    })?;
                bound.weights.dequantize_row(r, row)?;
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl InferenceRulesOp for Q8Gather {
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].rank, inputs[0].rank.bex() + 1)?;
        let k = self.0.k as i64;
        s.given(&inputs[0].rank, move |s, rank| {
            let rank = usize::try_from(rank).context("negative rank")?;
            for i in 0..rank {
                s.equals(&inputs[0].shape[i], &outputs[0].shape[i])?;
            }
            s.equals(&outputs[0].shape[rank], TDim::from(k))
        })
    }

    as_op!();
    to_typed!();
}

impl TypedOp for Q8Gather {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.to_tvec();
        shape.push(self.0.k.to_dim());
        Ok(tvec!(f32::fact(&shape)))
    }

    as_op!();
}
