//! The Llama decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) written as an ONNX
//! graph with the Hugging Face Optimum `text-generation-with-past` interface.
//!
//! Linear layers are `MatMul(x, W)` with W stored (in, out) in f32 bundles, or
//! `DequantizeLinear(q (out, in), scale (out, in/32), axis=1, block_size=32) -> Transpose ->
//! MatMul` in int8 bundles, so every quantized row is a run of contiguous 32-int8 blocks
//! the runtime can stream in place. No constant is transposed by the runtime in f32
//! bundles: the tied LM head is written out as its own (hidden, vocab) copy.

use anyhow::{bail, ensure, Result};

use super::onnx::{Attr, Dim, Elem, GraphBuilder};
use super::{Quant, Weight, WeightSource};
use crate::quant::quantize_q8_fitted;

/// Block length of the int8 format (one f32 scale per 32 weights).
pub const BLOCK: usize = 32;

/// Which decoder block the graph is built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// RMSNorm, RoPE, grouped-query attention, SwiGLU (Llama, Mistral, Qwen2).
    Llama,
    /// LayerNorm, learned absolute positions, fused QKV, gelu_new MLP.
    Gpt2,
}

/// Hyper-parameters of a decoder: the Llama family, or GPT-2 (`arch`), which ignores the
/// RoPE fields.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaParams {
    /// Block layout.
    pub arch: Arch,
    /// Vocabulary size.
    pub vocab: usize,
    /// Hidden size (embedding width).
    pub hidden: usize,
    /// Number of decoder layers.
    pub layers: usize,
    /// Number of query heads.
    pub heads: usize,
    /// Number of key/value heads (grouped-query attention).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Inner width of the SwiGLU MLP.
    pub ffn: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Trained context length.
    pub max_positions: usize,
    /// Whether the LM head shares the embedding matrix.
    pub tied_embeddings: bool,
    /// Whether the Q/K/V projections have biases (Qwen2; always for GPT-2).
    pub attention_bias: bool,
}

impl LlamaParams {
    /// Checks the shapes agree with each other.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.vocab > 0 && self.hidden > 0 && self.layers > 0 && self.ffn > 0,
            "model has a zero dimension: {self:?}"
        );
        ensure!(
            self.heads > 0 && self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads),
            "{} attention heads is not a multiple of {} key/value heads",
            self.heads,
            self.kv_heads
        );
        ensure!(
            self.head_dim > 0 && (self.arch == Arch::Gpt2 || self.head_dim.is_multiple_of(2)),
            "head dimension {} must be even for RoPE",
            self.head_dim
        );
        if self.arch == Arch::Gpt2 {
            super::gpt2::validate(self)?;
        }
        Ok(())
    }
}

/// The graph being written and where its weights come from (shared with `gpt2.rs`).
pub(super) struct Writer<'a> {
    pub(super) g: GraphBuilder,
    pub(super) p: &'a LlamaParams,
    pub(super) quant: Quant,
    src: &'a dyn WeightSource,
    progress: &'a mut dyn FnMut(),
}

/// Writes the whole decoder graph into `g`, reading weights (Hugging Face names) from `src`.
pub fn write_graph(
    mut g: GraphBuilder,
    p: &LlamaParams,
    quant: Quant,
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
        quant,
        src,
        progress,
    };
    match p.arch {
        Arch::Llama => w.body()?,
        Arch::Gpt2 => w.gpt2_body()?,
    }
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

impl Writer<'_> {
    pub(super) fn load(&mut self, name: &str, shape: &[usize]) -> Result<Weight> {
        let Some(w) = self.src.tensor(name)? else {
            bail!("checkpoint has no tensor \"{name}\"");
        };
        ensure!(
            w.shape == shape,
            "tensor \"{name}\" has shape {:?}, expected {shape:?}",
            w.shape
        );
        (self.progress)();
        Ok(w)
    }

    pub(super) fn ints(&mut self, hint: &str, v: &[i64]) -> String {
        self.g.const_i64(hint, &[v.len() as i64], v)
    }

    /// An (out, in) weight as the right-hand side of `MatMul`: (in, out) in value.
    pub(super) fn matmul_rhs(&mut self, name: &str, w: &Weight) -> Result<String> {
        let (n, k) = (w.shape[0], w.shape[1]);
        match self.quant {
            Quant::F32 => {
                let mut t = vec![0f32; n * k]; // (k, n)
                for r in 0..n {
                    for c in 0..k {
                        t[c * n + r] = w.data[r * k + c];
                    }
                }
                self.g.weight_f32(name, &[k as i64, n as i64], &t)
            }
            Quant::Int8 => {
                let deq = self.dequantized(name, w)?;
                Ok(self.g.node("Transpose", &[&deq], perm(&[1, 0])))
            }
        }
    }

    /// Stores an (n, k) weight as int8 blocks and returns its `DequantizeLinear` output.
    pub(super) fn dequantized(&mut self, name: &str, w: &Weight) -> Result<String> {
        let (n, k) = (w.shape[0], w.shape[1]);
        let (q, scales) = quantize_q8_fitted(&w.data, n, k);
        let q_bytes: Vec<u8> = q.iter().map(|v| *v as u8).collect();
        let q_name = self.g.weight(
            &format!("{name}.q8"),
            Elem::I8,
            &[n as i64, k as i64],
            &q_bytes,
        )?;
        let nb = k.div_ceil(BLOCK) as i64;
        let s_name = self
            .g
            .weight_f32(&format!("{name}.scale"), &[n as i64, nb], &scales)?;
        let attrs = vec![
            ("axis", Attr::Int(1)),
            ("block_size", Attr::Int(BLOCK as i64)),
        ];
        Ok(self.g.node("DequantizeLinear", &[&q_name, &s_name], attrs))
    }

    /// `x · prefix.weight^T (+ prefix.bias)` for a Hugging Face (out, in) `Linear`; the bias
    /// only for the Q/K/V projections of models with `attention_bias`.
    fn linear(&mut self, x: &str, prefix: &str, n: usize, k: usize) -> Result<String> {
        let name = format!("{prefix}.weight");
        let w = self.load(&name, &[n, k])?;
        let rhs = self.matmul_rhs(&name, &w)?;
        let y = self.g.node("MatMul", &[x, &rhs], vec![]);
        let is_qkv = ["q_proj", "k_proj", "v_proj"]
            .iter()
            .any(|p| prefix.ends_with(p));
        if !(self.p.attention_bias && is_qkv) {
            return Ok(y);
        }
        let b = self.load(&format!("{prefix}.bias"), &[n])?;
        Ok(self.add_bias(&y, &b))
    }

    /// `y + b` with `b` (n) broadcast over the rows.
    pub(super) fn add_bias(&mut self, y: &str, b: &Weight) -> String {
        let bias = self.g.const_f32("bias", &[b.data.len() as i64], &b.data);
        self.g.node("Add", &[y, &bias], vec![])
    }

    /// The attention mask (b, 1, 1, s, total): key j is visible to query i iff
    /// j <= past + i and `attention_mask[j] != 0`.
    pub(super) fn causal_mask(&mut self) -> String {
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

    /// Layer `l`'s attention: `q` (b, s, heads*hd), `k`/`v` (b, s, kv_heads*hd), RoPE'd with
    /// `rope` = (cos, sin) if given, appended to the layer's cache inputs (which become its
    /// `present` outputs); returns (b, s, heads*hd). This exact pattern is what
    /// `attention::fuse` replaces by the ring-buffer op.
    pub(super) fn attention(
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

    fn rms_norm(&mut self, x: &str, name: &str) -> Result<String> {
        let w = self.load(name, &[self.p.hidden])?;
        let weight = self.g.const_f32("norm_w", &[self.p.hidden as i64], &w.data);
        let eps = self.g.const_f32("eps", &[], &[self.p.rms_eps]);
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
        Ok(self.g.node("Mul", &[&weight, &normed], vec![]))
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

    fn body(&mut self) -> Result<()> {
        let p = self.p.clone();
        let hd = p.head_dim as i64;
        let (emb, table) = self.embedding("model.embed_tokens.weight")?;
        let mut x = self.g.node(
            "Gather",
            &[&table, "input_ids"],
            vec![("axis", Attr::Int(0))],
        );

        // RoPE tables from position_ids, computed in f32 as transformers does.
        let inv_freq: Vec<f32> = (0..p.head_dim / 2)
            .map(|i| 1.0 / p.rope_theta.powf((2 * i) as f32 / p.head_dim as f32))
            .collect();
        let inv_freq = self.g.const_f32("inv_freq", &[hd / 2], &inv_freq);
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
        let cos = self.g.node("Unsqueeze", &[&cos, &ax1], vec![]); // (b, 1, s, hd)
        let sin = self.g.node("Sin", &[&angles], vec![]);
        let sin = self.g.node("Unsqueeze", &[&sin, &ax1], vec![]);

        let mask = self.causal_mask();
        let scale = 1.0 / (p.head_dim as f32).sqrt();
        for l in 0..p.layers {
            let pre = format!("model.layers.{l}");
            let hn = self.rms_norm(&x, &format!("{pre}.input_layernorm.weight"))?;
            let (qn, kvn) = (p.heads * p.head_dim, p.kv_heads * p.head_dim);
            let q = self.linear(&hn, &format!("{pre}.self_attn.q_proj"), qn, p.hidden)?;
            let k = self.linear(&hn, &format!("{pre}.self_attn.k_proj"), kvn, p.hidden)?;
            let v = self.linear(&hn, &format!("{pre}.self_attn.v_proj"), kvn, p.hidden)?;
            let o = self.attention(l, [&q, &k, &v], Some((&cos, &sin)), &mask, scale);
            let o = self.linear(&o, &format!("{pre}.self_attn.o_proj"), p.hidden, qn)?;
            x = self.g.node("Add", &[&x, &o], vec![]);

            let hn = self.rms_norm(&x, &format!("{pre}.post_attention_layernorm.weight"))?;
            let gate = self.linear(&hn, &format!("{pre}.mlp.gate_proj"), p.ffn, p.hidden)?;
            let up = self.linear(&hn, &format!("{pre}.mlp.up_proj"), p.ffn, p.hidden)?;
            let sig = self.g.node("Sigmoid", &[&gate], vec![]);
            let silu = self.g.node("Mul", &[&gate, &sig], vec![]);
            let act = self.g.node("Mul", &[&silu, &up], vec![]);
            let down = self.linear(&act, &format!("{pre}.mlp.down_proj"), p.hidden, p.ffn)?;
            x = self.g.node("Add", &[&x, &down], vec![]);
        }
        let x = self.rms_norm(&x, "model.norm.weight")?;
        self.lm_head(&x, emb, &table)
    }

    /// The token embedding (vocab, hidden) and the graph value holding it (f32 or int8).
    pub(super) fn embedding(&mut self, name: &str) -> Result<(Weight, String)> {
        let p = self.p;
        let emb = self.load(name, &[p.vocab, p.hidden])?;
        let table = match self.quant {
            Quant::F32 => self
                .g
                .weight_f32(name, &[p.vocab as i64, p.hidden as i64], &emb.data)?,
            Quant::Int8 => self.dequantized(name, &emb)?,
        };
        Ok((emb, table))
    }

    /// The `logits` output from the final hidden state `x`: the embedding `emb` (graph value
    /// `table`) when tied, else `lm_head.weight`.
    pub(super) fn lm_head(&mut self, x: &str, emb: Weight, table: &str) -> Result<()> {
        let p = self.p;
        let head = if p.tied_embeddings {
            match self.quant {
                Quant::F32 => self.matmul_rhs("lm_head.weight", &emb)?,
                Quant::Int8 => self.g.node("Transpose", &[table], perm(&[1, 0])),
            }
        } else {
            drop(emb);
            let w = self.load("lm_head.weight", &[p.vocab, p.hidden])?;
            self.matmul_rhs("lm_head.weight", &w)?
        };
        self.g.node_named("MatMul", &[x, &head], vec![], "logits");
        Ok(())
    }
}

pub(super) fn perm(p: &[i64]) -> Vec<(&'static str, Attr)> {
    vec![("perm", Attr::Ints(p.to_vec()))]
}
