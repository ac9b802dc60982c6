//! The decoder-only transformer every family is written as: [`DecoderParams`] say what the
//! blocks are made of, a [`Layout`] says where the checkpoint keeps each tensor, and
//! [`write_graph`] writes the ONNX graph with the Hugging Face Optimum
//! `text-generation-with-past` interface.
//!
//! Linear layers are `MatMul(x, W)` with W stored (in, out) in f32 bundles, or
//! `DequantizeLinear(q (out, in), scale (out, in/32), axis=1, block_size=32) -> Transpose ->
//! MatMul` in int8 bundles, so every quantized row is a run of contiguous 32-int8 blocks
//! the runtime can stream in place. No constant is transposed by the runtime in f32
//! bundles: a tied LM head is written out as its own (hidden, vocab) copy. Attention is the
//! one pattern `attention::fuse` replaces by the ring-buffer op.

use std::ops::Range;

use anyhow::{anyhow, bail, ensure, Result};

use super::onnx::{Attr, Dim, Elem, GraphBuilder};
use super::rope::{self, RopeScaling};
use super::split::quantize_rows;
use super::{Q8Blocks, Quant, Weight, WeightSource};

pub use super::params::{
    Activation, Biases, DecoderParams, Layout, Mlp, Norm, Positions, SlidingWindow, Tensor,
};

/// Writes the whole decoder graph into `g`, reading weights from `src` where `layout` says
/// they are and quantizing on `threads` threads; `progress` is called after the embeddings,
/// after each layer and after the head (`layers + 2` times).
pub fn write_graph(
    mut g: GraphBuilder,
    p: &DecoderParams,
    layout: &Layout,
    quant: Quant,
    threads: usize,
    src: &dyn WeightSource,
    progress: &mut dyn FnMut(),
) -> Result<GraphBuilder> {
    p.validate()?;
    let (kvh, hd) = (p.kv_heads as i64, p.head_dim as i64);
    let batch = Dim::Sym("batch_size");
    let seq = Dim::Sym("sequence_length");
    let past = Dim::Sym("past_sequence_length");
    let total = Dim::Sym("past_sequence_length + sequence_length");
    g.input("input_ids", Elem::I64, &[batch.clone(), seq.clone()]);
    g.input("attention_mask", Elem::I64, &[batch.clone(), total.clone()]);
    g.input("position_ids", Elem::I64, &[batch.clone(), seq.clone()]);
    for i in 0..p.layers {
        for kv in ["key", "value"] {
            let dims = [batch.clone(), Dim::Fixed(kvh), past.clone(), Dim::Fixed(hd)];
            g.input(&format!("past_key_values.{i}.{kv}"), Elem::F32, &dims);
        }
    }
    let mut w = Writer {
        g,
        p,
        layout,
        quant,
        threads: threads.max(1),
        src,
        progress,
    };
    w.body()?;
    let mut g = w.g;
    let logits_dims = [batch.clone(), seq, Dim::Fixed(p.vocab as i64)];
    g.output("logits", "logits", Elem::F32, &logits_dims);
    for i in 0..p.layers {
        for kv in ["key", "value"] {
            let name = format!("present.{i}.{kv}");
            let dims = [
                batch.clone(),
                Dim::Fixed(kvh),
                total.clone(),
                Dim::Fixed(hd),
            ];
            g.output(&name, &name, Elem::F32, &dims);
        }
    }
    Ok(g)
}

/// The graph being written and where its weights come from.
struct Writer<'a> {
    g: GraphBuilder,
    p: &'a DecoderParams,
    layout: &'a Layout,
    quant: Quant,
    threads: usize,
    src: &'a dyn WeightSource,
    progress: &'a mut dyn FnMut(),
}

impl Writer<'_> {
    /// From `input_ids`/`position_ids` to `logits`.
    fn body(&mut self) -> Result<()> {
        let p = self.p;
        let (emb, table) = self.embedding()?;
        let mut x = self.g.node(
            "Gather",
            &[&table, "input_ids"],
            vec![("axis", Attr::Int(0))],
        );
        if let Some(k) = p.embed_scale {
            let k = self.g.const_f32("embed_scale", &[], &[k]);
            x = self.g.node("Mul", &[&x, &k], vec![]);
        }
        let rope = match p.positions {
            Positions::Rope { theta } => Some(self.rope_tables(theta, p.rope_scaling)?),
            Positions::Learned => {
                x = self.add_learned_positions(&x)?;
                None
            }
        };
        // Local layers: their own unscaled RoPE base, and a mask that also hides keys
        // `window` or more positions back.
        let local = match &p.window {
            Some(w) => {
                let rope = self.rope_tables(w.rope_theta, RopeScaling::None)?;
                Some((rope, w.size))
            }
            None => None,
        };
        (self.progress)();

        let mask = self.causal_mask();
        let local_mask = local
            .as_ref()
            .map(|(_, size)| self.window_mask(&mask, *size));
        let scale = p.attn_scale.unwrap_or(1.0 / (p.head_dim as f32).sqrt());
        for l in 0..p.layers {
            let h = self.norm(&x, Tensor::AttnNorm(l))?;
            let [mut q, mut k, v] = self.qkv(&h, l)?;
            if p.qk_norm {
                q = self.head_norm(&q, Tensor::QNorm(l), p.heads)?;
                k = self.head_norm(&k, Tensor::KNorm(l), p.kv_heads)?;
            }
            let (rope, mask) = match (&local, &local_mask, p.layer_window(l)) {
                (Some((rope, _)), Some(mask), Some(_)) => (Some(rope), mask),
                _ => (rope.as_ref(), &mask),
            };
            let rope = rope.map(|(cos, sin)| (cos.as_str(), sin.as_str()));
            let o = self.attention(l, [&q, &k, &v], rope, mask, scale);
            let qn = p.heads * p.head_dim;
            let mut o = self.linear(&o, Tensor::O(l), p.hidden, qn, p.bias.output)?;
            if p.post_norms {
                o = self.norm(&o, Tensor::PostAttnNorm(l))?;
            }
            x = self.g.node("Add", &[&x, &o], vec![]);

            let h = self.norm(&x, Tensor::MlpNorm(l))?;
            let mut o = self.mlp(&h, l)?;
            if p.post_norms {
                o = self.norm(&o, Tensor::PostMlpNorm(l))?;
            }
            x = self.g.node("Add", &[&x, &o], vec![]);
            (self.progress)();
        }
        let x = self.norm(&x, Tensor::FinalNorm)?;
        self.lm_head(&x, emb, &table)?;
        (self.progress)();
        Ok(())
    }

    /// The checkpoint prefix of `t`.
    fn prefix(&self, t: Tensor) -> Result<String> {
        (self.layout.prefix)(t).ok_or_else(|| anyhow!("this model family has no tensor {t:?}"))
    }

    fn load(&mut self, name: &str, shape: &[usize]) -> Result<Weight> {
        let Some(w) = self.src.tensor(name)? else {
            bail!("checkpoint has no tensor \"{name}\"");
        };
        ensure!(
            w.shape == shape,
            "tensor \"{name}\" has shape {:?}, expected {shape:?}",
            w.shape
        );
        Ok(w)
    }

    /// The linear weight `{prefix}.weight` as (n out, k in), whichever way it is stored.
    fn load_linear(&mut self, prefix: &str, n: usize, k: usize) -> Result<Weight> {
        let name = format!("{prefix}.weight");
        if self.layout.conv1d {
            Ok(self.load(&name, &[k, n])?.transposed())
        } else {
            self.load(&name, &[n, k])
        }
    }

    fn ints(&mut self, hint: &str, v: &[i64]) -> String {
        self.g.const_i64(hint, &[v.len() as i64], v)
    }

    /// An (out, in) weight as the right-hand side of `MatMul`: (in, out) in value.
    fn matmul_rhs(&mut self, name: &str, w: &Weight) -> Result<String> {
        match self.quant {
            Quant::F32 => {
                let t = w.transposed(); // (k, n)
                let dims: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
                self.g.weight_f32(name, &dims, &t.data)
            }
            Quant::Int8 => {
                let deq = self.dequantized(name, w)?;
                Ok(self.g.node("Transpose", &[&deq], perm(&[1, 0])))
            }
        }
    }

    /// Stores an (n, k) weight as int8 blocks and returns its `DequantizeLinear` output.
    fn dequantized(&mut self, name: &str, w: &Weight) -> Result<String> {
        let blocks = quantize_rows(&w.data, w.shape[0], w.shape[1], self.threads);
        self.store_q8(name, &blocks)
    }

    /// Stores int8 blocks under `name` (in the bundle's int8 layout); returns their
    /// `DequantizeLinear` output, the (n, k) f32 matrix.
    fn store_q8(&mut self, name: &str, b: &Q8Blocks) -> Result<String> {
        self.g.dequantized_q8(name, b.shape, &b.q, &b.scales)
    }

    /// The (n, k) weight `name` as the checkpoint's own Q8_0 blocks, when an int8 bundle can
    /// carry them over unchanged.
    fn carried(&mut self, name: &str, n: usize, k: usize) -> Result<Option<Q8Blocks>> {
        if self.quant != Quant::Int8 || self.layout.conv1d {
            return Ok(None);
        }
        let Some(b) = self.src.q8_0(name, self.threads)? else {
            return Ok(None);
        };
        ensure!(
            b.shape == [n, k],
            "tensor \"{name}\" has shape {:?}, expected {:?}",
            b.shape,
            [n, k]
        );
        Ok(Some(b))
    }

    /// `x · w^T` for an (out, in) weight `w` stored under `name`.
    fn project(&mut self, x: &str, name: &str, w: &Weight) -> Result<String> {
        let rhs = self.matmul_rhs(name, w)?;
        Ok(self.g.node("MatMul", &[x, &rhs], vec![]))
    }

    /// `x · W^T (+ b)` for the (n out, k in) linear layer `t`.
    fn linear(&mut self, x: &str, t: Tensor, n: usize, k: usize, bias: bool) -> Result<String> {
        let prefix = self.prefix(t)?;
        let name = format!("{prefix}.weight");
        let y = match self.carried(&name, n, k)? {
            Some(blocks) => {
                let deq = self.store_q8(&name, &blocks)?;
                let rhs = self.g.node("Transpose", &[&deq], perm(&[1, 0]));
                self.g.node("MatMul", &[x, &rhs], vec![])
            }
            None => {
                let w = self.load_linear(&prefix, n, k)?;
                self.project(x, &name, &w)?
            }
        };
        if !bias {
            return Ok(y);
        }
        let b = self.load(&format!("{prefix}.bias"), &[n])?;
        Ok(self.add_bias(&y, &b.data))
    }

    /// `y + b` with `b` (n) broadcast over the rows.
    fn add_bias(&mut self, y: &str, b: &[f32]) -> String {
        let bias = self.g.const_f32("bias", &[b.len() as i64], b);
        self.g.node("Add", &[y, &bias], vec![])
    }

    /// Layer `l`'s Q (b, s, heads*hd), K and V (b, s, kv_heads*hd) from the normed `x`.
    fn qkv(&mut self, x: &str, l: usize) -> Result<[String; 3]> {
        let p = self.p;
        let (qn, kvn, bias) = (p.heads * p.head_dim, p.kv_heads * p.head_dim, p.bias.qkv);
        if !self.layout.fused_qkv {
            let q = self.linear(x, Tensor::Q(l), qn, p.hidden, bias)?;
            let k = self.linear(x, Tensor::K(l), kvn, p.hidden, bias)?;
            let v = self.linear(x, Tensor::V(l), kvn, p.hidden, bias)?;
            return Ok([q, k, v]);
        }
        // One fused tensor, split into the three weights the attention pattern expects.
        let prefix = self.prefix(Tensor::Qkv(l))?;
        let rows = qn + 2 * kvn;
        let w = self.load_linear(&prefix, rows, p.hidden)?; // (rows, hidden)
        let b = if bias {
            Some(self.load(&format!("{prefix}.bias"), &[rows])?)
        } else {
            None
        };
        let q = self.fused_part(x, &prefix, "q", &w, b.as_ref(), 0..qn)?;
        let k = self.fused_part(x, &prefix, "k", &w, b.as_ref(), qn..qn + kvn)?;
        let v = self.fused_part(x, &prefix, "v", &w, b.as_ref(), qn + kvn..rows)?;
        Ok([q, k, v])
    }

    /// The projection by `rows` of the fused (rows, hidden) weight `w` and bias `b`, stored
    /// as `{prefix}.{part}.weight`.
    fn fused_part(
        &mut self,
        x: &str,
        prefix: &str,
        part: &str,
        w: &Weight,
        b: Option<&Weight>,
        rows: Range<usize>,
    ) -> Result<String> {
        let k = w.shape[1];
        let part_w = Weight {
            shape: vec![rows.len(), k],
            data: w.data[rows.start * k..rows.end * k].to_vec(),
        };
        let y = self.project(x, &format!("{prefix}.{part}.weight"), &part_w)?;
        Ok(match b {
            Some(b) => self.add_bias(&y, &b.data[rows]),
            None => y,
        })
    }

    /// Layer `l`'s MLP on the normed `x`.
    fn mlp(&mut self, x: &str, l: usize) -> Result<String> {
        let p = self.p;
        let (n, k, bias) = (p.ffn, p.hidden, p.bias.mlp);
        let h = if p.mlp.gated {
            let gate = self.linear(x, Tensor::Gate(l), n, k, bias)?;
            let up = self.linear(x, Tensor::Up(l), n, k, bias)?;
            let act = self.activation(&gate);
            self.g.node("Mul", &[&act, &up], vec![])
        } else {
            let up = self.linear(x, Tensor::Up(l), n, k, bias)?;
            self.activation(&up)
        };
        self.linear(&h, Tensor::Down(l), k, n, bias)
    }

    fn activation(&mut self, x: &str) -> String {
        match self.p.mlp.activation {
            Activation::Silu => {
                let sig = self.g.node("Sigmoid", &[x], vec![]);
                self.g.node("Mul", &[x, &sig], vec![])
            }
            Activation::GeluTanh => self.gelu_tanh(x),
        }
    }

    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
    fn gelu_tanh(&mut self, x: &str) -> String {
        let c = self
            .g
            .const_f32("gelu_c", &[], &[(2.0 / std::f32::consts::PI).sqrt()]);
        let a = self.g.const_f32("gelu_a", &[], &[0.044715]);
        let half = self.g.const_f32("half", &[], &[0.5]);
        let one = self.g.const_f32("one", &[], &[1.0]);
        let x2 = self.g.node("Mul", &[x, x], vec![]);
        let x3 = self.g.node("Mul", &[&x2, x], vec![]);
        let ax3 = self.g.node("Mul", &[&a, &x3], vec![]);
        let inner = self.g.node("Add", &[x, &ax3], vec![]);
        let inner = self.g.node("Mul", &[&c, &inner], vec![]);
        let t = self.g.node("Tanh", &[&inner], vec![]);
        let t = self.g.node("Add", &[&one, &t], vec![]);
        let hx = self.g.node("Mul", &[&half, x], vec![]);
        self.g.node("Mul", &[&hx, &t], vec![])
    }

    /// The norm `t` over the last axis.
    fn norm(&mut self, x: &str, t: Tensor) -> Result<String> {
        let prefix = self.prefix(t)?;
        let n = self.p.hidden;
        let eps = self.p.norm_eps;
        let w = self.load(&format!("{prefix}.weight"), &[n])?;
        match self.p.norm {
            Norm::Rms => Ok(self.rms_norm(x, &self.rms_weight(w))),
            Norm::Layer => {
                let b = self.load(&format!("{prefix}.bias"), &[n])?;
                let w = self.g.const_f32("ln_w", &[n as i64], &w.data);
                let b = self.g.const_f32("ln_b", &[n as i64], &b.data);
                let attrs = vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps))];
                Ok(self.g.node("LayerNormalization", &[x, &w, &b], attrs))
            }
        }
    }

    /// `x / sqrt(mean(x^2) + eps) * weight` over the last axis, `weight` as wide as it.
    fn rms_norm(&mut self, x: &str, weight: &[f32]) -> String {
        let weight = self.g.const_f32("norm_w", &[weight.len() as i64], weight);
        let eps = self.g.const_f32("eps", &[], &[self.p.norm_eps]);
        let axes = self.ints("axes", &[-1]);
        let sq = self.g.node("Mul", &[x, x], vec![]);
        let mean = self.g.node(
            "ReduceMean",
            &[&sq, &axes],
            vec![("keepdims", Attr::Int(1))],
        );
        let var = self.g.node("Add", &[&mean, &eps], vec![]);
        let std = self.g.node("Sqrt", &[&var], vec![]);
        let inv = self.g.node("Reciprocal", &[&std], vec![]);
        let normed = self.g.node("Mul", &[x, &inv], vec![]);
        self.g.node("Mul", &[&weight, &normed], vec![])
    }

    /// The RMSNorm `t` over each of the `heads` heads of `x` (b, s, heads*hd).
    fn head_norm(&mut self, x: &str, t: Tensor, heads: usize) -> Result<String> {
        let hd = self.p.head_dim;
        let w = self.load(&format!("{}.weight", self.prefix(t)?), &[hd])?;
        let split = self.ints("shape", &[0, 0, heads as i64, hd as i64]);
        let flat = self.ints("shape", &[0, 0, (heads * hd) as i64]);
        let x = self.g.node("Reshape", &[x, &split], vec![]);
        let x = self.rms_norm(&x, &self.rms_weight(w));
        Ok(self.g.node("Reshape", &[&x, &flat], vec![]))
    }

    /// An RMSNorm weight as the graph multiplies by it: `offset + w`.
    fn rms_weight(&self, w: Weight) -> Vec<f32> {
        let offset = self.p.norm_offset;
        w.data.into_iter().map(|v| offset + v).collect()
    }

    /// The graph value holding the token embedding (vocab, hidden), f32 or int8, and the
    /// f32 embedding itself in f32 bundles (a tied LM head is its transposed copy).
    fn embedding(&mut self) -> Result<(Option<Weight>, String)> {
        let p = self.p;
        let name = format!("{}.weight", self.prefix(Tensor::Embedding)?);
        if let Some(blocks) = self.carried(&name, p.vocab, p.hidden)? {
            return Ok((None, self.store_q8(&name, &blocks)?));
        }
        let emb = self.load(&name, &[p.vocab, p.hidden])?;
        Ok(match self.quant {
            Quant::F32 => {
                let dims = [p.vocab as i64, p.hidden as i64];
                let table = self.g.weight_f32(&name, &dims, &emb.data)?;
                (Some(emb), table)
            }
            Quant::Int8 => (None, self.dequantized(&name, &emb)?),
        })
    }

    /// `x` plus the learned position table at `position_ids`. The table stays f32 in every
    /// bundle: (max_positions, hidden) is small.
    fn add_learned_positions(&mut self, x: &str) -> Result<String> {
        let p = self.p;
        let name = format!("{}.weight", self.prefix(Tensor::Positions)?);
        let table = self.load(&name, &[p.max_positions, p.hidden])?;
        let dims = [p.max_positions as i64, p.hidden as i64];
        let table = self.g.weight_f32(&name, &dims, &table.data)?;
        let positions = self.g.node(
            "Gather",
            &[&table, "position_ids"],
            vec![("axis", Attr::Int(0))],
        );
        Ok(self.g.node("Add", &[x, &positions], vec![]))
    }

    /// RoPE's (cos, sin), each (b, 1, s, head_dim), from `position_ids` with base `theta`
    /// rescaled by `scaling`, computed in f32 as transformers does.
    fn rope_tables(&mut self, theta: f32, scaling: RopeScaling) -> Result<(String, String)> {
        let hd = self.p.head_dim;
        let base = rope::default_inv_freq(theta, hd);
        let inv_freq = match scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } => rope::llama3_inv_freq(
                &base,
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            ),
            RopeScaling::FreqFactors => {
                let name = format!("{}.weight", self.prefix(Tensor::RopeFreqs)?);
                let factors = self.load(&name, &[hd / 2])?;
                rope::divided_inv_freq(&base, &factors.data)
            }
        };
        let inv_freq = self.g.const_f32("inv_freq", &[hd as i64 / 2], &inv_freq);
        let pos = self
            .g
            .node("Cast", &["position_ids"], vec![("to", Attr::Int(1))]);
        let ax2 = self.ints("axes", &[2]);
        let pos = self.g.node("Unsqueeze", &[&pos, &ax2], vec![]);
        let freqs = self.g.node("Mul", &[&pos, &inv_freq], vec![]);
        let angles = self
            .g
            .node("Concat", &[&freqs, &freqs], vec![("axis", Attr::Int(-1))]);
        let ax1 = self.ints("axes", &[1]);
        let cos = self.g.node("Cos", &[&angles], vec![]);
        let cos = self.g.node("Unsqueeze", &[&cos, &ax1], vec![]);
        let sin = self.g.node("Sin", &[&angles], vec![]);
        let sin = self.g.node("Unsqueeze", &[&sin, &ax1], vec![]);
        Ok((cos, sin))
    }

    /// `x * cos + rotate_half(x) * sin` on (batch, heads, seq, head_dim).
    fn rope(&mut self, x: &str, cos: &str, sin: &str) -> String {
        let half = (self.p.head_dim / 2) as i64;
        let axes = self.ints("axes", &[-1]);
        let (z, h, end) = (
            self.ints("s", &[0]),
            self.ints("s", &[half]),
            self.ints("e", &[i64::MAX]),
        );
        let x1 = self.g.node("Slice", &[x, &z, &h, &axes], vec![]);
        let x2 = self.g.node("Slice", &[x, &h, &end, &axes], vec![]);
        let neg = self.g.node("Neg", &[&x2], vec![]);
        let rot = self
            .g
            .node("Concat", &[&neg, &x1], vec![("axis", Attr::Int(-1))]);
        let a = self.g.node("Mul", &[x, cos], vec![]);
        let b = self.g.node("Mul", &[&rot, sin], vec![]);
        self.g.node("Add", &[&a, &b], vec![])
    }

    /// The attention mask (b, 1, 1, s, total): key j is visible to query i iff
    /// j <= past + i and `attention_mask[j] != 0`.
    fn causal_mask(&mut self) -> String {
        let one_idx = self.g.const_i64("idx", &[], &[1]);
        let ids_shape = self.g.node("Shape", &["input_ids"], vec![]);
        let seq_len = self.g.node(
            "Gather",
            &[&ids_shape, &one_idx],
            vec![("axis", Attr::Int(0))],
        );
        let am_shape = self.g.node("Shape", &["attention_mask"], vec![]);
        let total = self.g.node(
            "Gather",
            &[&am_shape, &one_idx],
            vec![("axis", Attr::Int(0))],
        );
        let past = self.g.node("Sub", &[&total, &seq_len], vec![]);
        let zero = self.g.const_i64("zero", &[], &[0]);
        let one = self.g.const_i64("one", &[], &[1]);
        let kpos = self.g.node("Range", &[&zero, &total, &one], vec![]);
        let qpos = self.g.node("Range", &[&past, &total, &one], vec![]);
        let ax0 = self.ints("axes", &[0]);
        let ax1 = self.ints("axes", &[1]);
        let kpos = self.g.node("Unsqueeze", &[&kpos, &ax0], vec![]);
        let qpos = self.g.node("Unsqueeze", &[&qpos, &ax1], vec![]);
        let causal = self.g.node("LessOrEqual", &[&kpos, &qpos], vec![]); // (s, total)
        let am = self
            .g
            .node("Cast", &["attention_mask"], vec![("to", Attr::Int(9))]);
        let ax123 = self.ints("axes", &[1, 2, 3]);
        let am = self.g.node("Unsqueeze", &[&am, &ax123], vec![]); // (b, 1, 1, 1, total)
        self.g.node("And", &[&causal, &am], vec![])
    }

    /// `mask` (b, 1, 1, s, total) with the keys `size` or more positions before each query
    /// hidden too: key j is visible to query i iff past + i - size < j.
    fn window_mask(&mut self, mask: &str, size: usize) -> String {
        let one_idx = self.g.const_i64("idx", &[], &[1]);
        let am_shape = self.g.node("Shape", &["attention_mask"], vec![]);
        let total = self.g.node(
            "Gather",
            &[&am_shape, &one_idx],
            vec![("axis", Attr::Int(0))],
        );
        let ids_shape = self.g.node("Shape", &["input_ids"], vec![]);
        let seq_len = self.g.node(
            "Gather",
            &[&ids_shape, &one_idx],
            vec![("axis", Attr::Int(0))],
        );
        let past = self.g.node("Sub", &[&total, &seq_len], vec![]);
        let zero = self.g.const_i64("zero", &[], &[0]);
        let one = self.g.const_i64("one", &[], &[1]);
        let size = self.g.const_i64("window", &[], &[size as i64]);
        // Key positions shifted by the window: j + size > q  <=>  j > q - size.
        let kpos = self.g.node("Range", &[&zero, &total, &one], vec![]);
        let kpos = self.g.node("Add", &[&kpos, &size], vec![]);
        let qpos = self.g.node("Range", &[&past, &total, &one], vec![]);
        let ax0 = self.ints("axes", &[0]);
        let ax1 = self.ints("axes", &[1]);
        let kpos = self.g.node("Unsqueeze", &[&kpos, &ax0], vec![]);
        let qpos = self.g.node("Unsqueeze", &[&qpos, &ax1], vec![]);
        let near = self.g.node("Greater", &[&kpos, &qpos], vec![]); // (s, total)
        self.g.node("And", &[mask, &near], vec![])
    }

    /// Layer `l`'s attention: `q` (b, s, heads*hd), `k`/`v` (b, s, kv_heads*hd), RoPE'd with
    /// `rope` = (cos, sin) if given, appended to the layer's cache inputs (which become its
    /// `present` outputs); returns (b, s, heads*hd). This exact pattern is what
    /// `attention::fuse` replaces by the ring-buffer op.
    fn attention(
        &mut self,
        l: usize,
        [q, k, v]: [&str; 3],
        rope: Option<(&str, &str)>,
        mask: &str,
        scale: f32,
    ) -> String {
        let p = self.p;
        let (h, kvh, hd) = (p.heads as i64, p.kv_heads as i64, p.head_dim as i64);
        let split_heads = self.ints("shape", &[0, 0, h, hd]);
        let split_kv = self.ints("shape", &[0, 0, kvh, hd]);
        let grouped = self.ints("shape", &[0, kvh, h / kvh, -1, hd]);
        let merged = self.ints("shape", &[0, h, -1, hd]);
        let flat = self.ints("shape", &[0, 0, h * hd]);
        let ax2 = self.ints("axes", &[2]);
        let bhsd = [0, 2, 1, 3];
        let q = self.g.node("Reshape", &[q, &split_heads], vec![]);
        let q = self.g.node("Transpose", &[&q], perm(&bhsd));
        let k = self.g.node("Reshape", &[k, &split_kv], vec![]);
        let k = self.g.node("Transpose", &[&k], perm(&bhsd));
        let v = self.g.node("Reshape", &[v, &split_kv], vec![]);
        let v = self.g.node("Transpose", &[&v], perm(&bhsd));
        let (q, k) = match rope {
            Some((cos, sin)) => (self.rope(&q, cos, sin), self.rope(&k, cos, sin)),
            None => (q, k),
        };
        let (pk, pv) = (
            format!("past_key_values.{l}.key"),
            format!("past_key_values.{l}.value"),
        );
        let (ok, ov) = (format!("present.{l}.key"), format!("present.{l}.value"));
        self.g
            .node_named("Concat", &[&pk, &k], vec![("axis", Attr::Int(2))], &ok);
        self.g
            .node_named("Concat", &[&pv, &v], vec![("axis", Attr::Int(2))], &ov);

        let neg = self.g.const_f32("neg", &[], &[f32::MIN]);
        let scale = self.g.const_f32("scale", &[], &[scale]);
        let q5 = self.g.node("Reshape", &[&q, &grouped], vec![]); // (b, kvh, g, s, hd)
        let k5 = self.g.node("Unsqueeze", &[&ok, &ax2], vec![]); // (b, kvh, 1, t, hd)
        let kt = self.g.node("Transpose", &[&k5], perm(&[0, 1, 2, 4, 3]));
        let v5 = self.g.node("Unsqueeze", &[&ov, &ax2], vec![]);
        let scores = self.g.node("MatMul", &[&q5, &kt], vec![]); // (b, kvh, g, s, t)
        let scores = self.g.node("Mul", &[&scores, &scale], vec![]);
        let scores = self.g.node("Where", &[mask, &scores, &neg], vec![]);
        let probs = self
            .g
            .node("Softmax", &[&scores], vec![("axis", Attr::Int(-1))]);
        let o = self.g.node("MatMul", &[&probs, &v5], vec![]); // (b, kvh, g, s, hd)
        let o = self.g.node("Reshape", &[&o, &merged], vec![]);
        let o = self.g.node("Transpose", &[&o], perm(&bhsd));
        self.g.node("Reshape", &[&o, &flat], vec![])
    }

    /// The `logits` output from the final hidden state `x`: the embedding `emb` (graph value
    /// `table`) when tied, else the LM head's own weight.
    fn lm_head(&mut self, x: &str, emb: Option<Weight>, table: &str) -> Result<()> {
        let p = self.p;
        let name = format!("{}.weight", self.prefix(Tensor::LmHead)?);
        let head = if p.tied_embeddings {
            match emb {
                Some(emb) => self.matmul_rhs(&name, &emb)?,
                None => self.g.node("Transpose", &[table], perm(&[1, 0])),
            }
        } else if let Some(blocks) = self.carried(&name, p.vocab, p.hidden)? {
            drop(emb);
            let deq = self.store_q8(&name, &blocks)?;
            self.g.node("Transpose", &[&deq], perm(&[1, 0]))
        } else {
            drop(emb);
            let w = self.load(&name, &[p.vocab, p.hidden])?;
            self.matmul_rhs(&name, &w)?
        };
        self.g.node_named("MatMul", &[x, &head], vec![], "logits");
        Ok(())
    }
}

fn perm(p: &[i64]) -> Vec<(&'static str, Attr)> {
    vec![("perm", Attr::Ints(p.to_vec()))]
}
