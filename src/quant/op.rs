//! The int8 operators tract runs for us: [`Q8MatMul`] (`y = x Wᵀ`) and [`Q8Gather`] (rows
//! of W, the embedding lookup), over Q8 weights read in place from the memory-mapped bundle
//! (or, for weights requantized from another format at load, held on the heap).
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

/// One quantized matrix W (n, k): int8 values (n, k) and f32 block scales (n, ceil(k / 32)).
pub struct Q8Weights {
    name: String,
    n: usize,
    k: usize,
    q: Slice<i8>,       // (n, k)
    scales: Slice<f32>, // (n, nb)
    /// The weights in the GEMM's tiled layout for [`Scheme::Q8Q15`], made on the heap at
    /// first use (`quant::gemm` describes the bundle form that would be read in place).
    tiled: OnceLock<(Vec<i8>, Vec<f32>)>, // (G, nb, 8, 16, 4), (G, nb, 16)
}

impl fmt::Debug for Q8Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Q8Weights({:?}, {}x{}, {})",
            self.name,
            self.n,
            self.k,
            if self.is_mapped() { "mapped" } else { "copied" }
        )
    }
}

impl Q8Weights {
    /// Wraps the bytes of W's int8 values and scales, checking their sizes against (n, k).
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
            q,
            scales,
            tiled: OnceLock::new(),
        };
        w.matrix()?;
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
            q: Slice::Owned(q),
            scales: Slice::Owned(scales),
            tiled: OnceLock::new(),
        };
        w.matrix()?;
        Ok(w)
    }

    /// The weights as the kernels take them.
    pub fn matrix(&self) -> TractResult<Q8Matrix<'_>> {
        Ok(Q8Matrix::new(
            self.q.get(),
            self.scales.get(),
            self.n,
            self.k,
        )?)
    }

    /// The weights in the GEMM's tiled layout (made on the heap at the first call).
    pub fn tiled(&self) -> TractResult<Q8Tiled<'_>> {
        let (q, s) = self
            .tiled
            .get_or_init(|| gemm::tile_q8(self.q.get(), self.scales.get(), self.n, self.k));
        Ok(Q8Tiled::new(q, s, self.n, self.k)?)
    }

    /// Whether both tensors are used in place from the mapped file (no heap copy).
    pub fn is_mapped(&self) -> bool {
        self.q.is_mapped() && self.scales.is_mapped()
    }

    /// Bytes of weights and scales.
    pub fn bytes(&self) -> usize {
        self.q.get().len() + 4 * self.scales.get().len()
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
    Ok((Box::new(Q8MatMul(WeightSlot::parse(node)?)), vec![]))
}

fn parse_gather(
    _ctx: &ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((Box::new(Q8Gather(WeightSlot::parse(node)?)), vec![]))
}

/// `y = x Wᵀ` for x (..., k) f32 and W (n, k) int8 blocks: y (..., n).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Q8MatMul(WeightSlot);

impl Q8MatMul {
    /// The name of the weight this node reads (the `DequantizeLinear` output it replaced).
    pub fn weight(&self) -> &str {
        &self.0.weight
    }

    /// Gives the node its weights (checked against the node's shape) and kernel settings.
    pub fn bind(&mut self, weights: Arc<Q8Weights>, exec: Q8Exec) -> TractResult<()> {
        self.0.bind(weights, exec)
    }
}

impl Op for Q8MatMul {
    fn name(&self) -> StaticName {
        MATMUL.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} {}x{} {:?}",
            self.0.weight,
            self.0.n,
            self.0.k,
            self.0.bound.as_ref().map(|b| &b.exec)
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for Q8MatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let bound = self.0.bound()?;
        let x = input.try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?; // (m, k)
        let mut shape: TVec<usize> = input.shape().into();
        match shape.last_mut() {
            Some(last) if *last == self.0.k => *last = self.0.n,
            _ => bail!(
                "{}: input shape {:?} does not end in {}",
                self.0.weight,
                shape,
                self.0.k
            ),
        }
        let mut out = Tensor::zero::<f32>(&shape)?;
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let y = view.as_slice_mut::<f32>()?; // (m, n)
            let exec = &bound.exec;
            let rows = x.len() / self.0.k;
            match exec.scheme {
                Scheme::Q8Q15 if rows > 1 => bound.weights.tiled()?.matmul(
                    x,
                    y,
                    Acts::Q15,
                    Isa::for_kernel(exec.kernel),
                    &exec.pool,
                )?,
                Scheme::Q8Q15 => {
                    bound
                        .weights
                        .matrix()?
                        .matmul(x, y, Scheme::Q8F32, exec.kernel, &exec.pool)?
                }
                scheme => bound
                    .weights
                    .matrix()?
                    .matmul(x, y, scheme, exec.kernel, &exec.pool)?,
            }
        }
        Ok(tvec!(out.into_tvalue()))
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
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].rank, &outputs[0].rank)?;
        let (n, k) = (self.0.n as i64, self.0.k as i64);
        s.given(&inputs[0].rank, move |s, rank| {
            let last = usize::try_from(rank - 1).context("Q8MatMul needs a rank >= 1 input")?;
            for i in 0..last {
                s.equals(&inputs[0].shape[i], &outputs[0].shape[i])?;
            }
            s.equals(&inputs[0].shape[last], TDim::from(k))?;
            s.equals(&outputs[0].shape[last], TDim::from(n))
        })
    }

    as_op!();
    to_typed!();
}

impl TypedOp for Q8MatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.to_tvec();
        match shape.last_mut() {
            Some(last) if *last == self.0.k.to_dim() => *last = self.0.n.to_dim(),
            _ => bail!(
                "{}: input {:?} does not end in {}",
                self.0.weight,
                shape,
                self.0.k
            ),
        }
        Ok(tvec!(f32::fact(&shape)))
    }

    as_op!();
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
        let w = bound.weights.matrix()?;
        let ids = input.cast_to::<i64>()?;
        let ids = ids.try_as_plain_ram()?;
        let ids = ids.as_slice::<i64>()?;
        let mut shape: TVec<usize> = input.shape().into();
        shape.push(self.0.k);
        let mut out = Tensor::zero::<f32>(&shape)?;
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let y = view.as_slice_mut::<f32>()?; // (ids, k)
            let nb = blocks_per_row(self.0.k);
            for (&id, row) in ids.iter().zip(y.chunks_exact_mut(self.0.k)) {
                // ONNX Gather counts negative indices from the end.
                let r = if id < 0 { id + self.0.n as i64 } else { id };
                let r = usize::try_from(r)
                    .ok()
                    .filter(|&r| r < self.0.n)
                    .with_context(|| {
                        format!("{}: index {id} out of 0..{}", self.0.weight, self.0.n)
                    })?;
                let q = &w.q()[r * self.0.k..(r + 1) * self.0.k];
                let s = &w.scales()[r * nb..(r + 1) * nb];
                for (j, (o, &v)) in row.iter_mut().zip(q).enumerate() {
                    *o = v as f32 * s[j / super::BLOCK];
                }
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
