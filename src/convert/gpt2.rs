//! The GPT-2 decoder (LayerNorm, learned absolute positions, fused QKV, gelu_new MLP) written
//! as an ONNX graph with the same interface and attention pattern as [`super::llama`].
//!
//! Hugging Face stores GPT-2's linear layers as `Conv1D`, weight (in, out); they are turned
//! into the (out, in) layout of `nn.Linear` here so the int8 blocks run along the input
//! dimension as for Llama. The fused `c_attn` (in, 3*hidden) is split into Q, K and V.

use anyhow::{ensure, Result};

use super::llama::Writer;
use super::onnx::Attr;
use super::Weight;

/// Tensors read per decoder block (for the progress bar).
pub const TENSORS_PER_LAYER: usize = 12;

impl Writer<'_> {
    /// The whole GPT-2 body, from `input_ids`/`position_ids` to `logits`.
    pub(super) fn gpt2_body(&mut self) -> Result<()> {
        let p = self.p;
        let (emb, table) = self.embedding("transformer.wte.weight")?;
        let tokens = self.g.node(
            "Gather",
            &[&table, "input_ids"],
            vec![("axis", Attr::Int(0))],
        );
        // Positions stay f32 in every bundle: (n_positions, hidden) is small.
        let wpe = self.load("transformer.wpe.weight", &[p.max_positions, p.hidden])?;
        let wpe = self.g.weight_f32(
            "transformer.wpe.weight",
            &[p.max_positions as i64, p.hidden as i64],
            &wpe.data,
        )?;
        let positions = self.g.node(
            "Gather",
            &[&wpe, "position_ids"],
            vec![("axis", Attr::Int(0))],
        );
        let mut x = self.g.node("Add", &[&tokens, &positions], vec![]);

        let mask = self.causal_mask();
        let scale = 1.0 / (p.head_dim as f32).sqrt();
        let width = p.heads * p.head_dim;
        for l in 0..p.layers {
            let pre = format!("transformer.h.{l}");
            let hn = self.layer_norm(&x, &format!("{pre}.ln_1"))?;
            let qkv = self.load(&format!("{pre}.attn.c_attn.weight"), &[p.hidden, 3 * width])?;
            let qkv_bias = self.load(&format!("{pre}.attn.c_attn.bias"), &[3 * width])?;
            let qkv = conv1d_to_linear(&qkv); // (3 * width, hidden)
            let mut qkv_out = Vec::with_capacity(3);
            for (i, part) in ["q", "k", "v"].iter().enumerate() {
                let rows = i * width..(i + 1) * width;
                let w = Weight {
                    shape: vec![width, p.hidden],
                    data: qkv.data[rows.start * p.hidden..rows.end * p.hidden].to_vec(),
                };
                let b = Weight {
                    shape: vec![width],
                    data: qkv_bias.data[rows].to_vec(),
                };
                let name = format!("{pre}.attn.c_attn.{part}.weight");
                qkv_out.push(self.affine(&hn, &name, &w, &b)?);
            }
            let o = self.attention(
                l,
                [&qkv_out[0], &qkv_out[1], &qkv_out[2]],
                None,
                &mask,
                scale,
            );
            let o = self.conv1d(&o, &format!("{pre}.attn.c_proj"), width, p.hidden)?;
            x = self.g.node("Add", &[&x, &o], vec![]);

            let hn = self.layer_norm(&x, &format!("{pre}.ln_2"))?;
            let h = self.conv1d(&hn, &format!("{pre}.mlp.c_fc"), p.hidden, p.ffn)?;
            let h = self.gelu_new(&h);
            let o = self.conv1d(&h, &format!("{pre}.mlp.c_proj"), p.ffn, p.hidden)?;
            x = self.g.node("Add", &[&x, &o], vec![]);
        }
        let x = self.layer_norm(&x, "transformer.ln_f")?;
        self.lm_head(&x, emb, &table)
    }

    /// `x · W + b` for a `Conv1D` `prefix` with weight (k, n).
    fn conv1d(&mut self, x: &str, prefix: &str, k: usize, n: usize) -> Result<String> {
        let w = self.load(&format!("{prefix}.weight"), &[k, n])?;
        let b = self.load(&format!("{prefix}.bias"), &[n])?;
        self.affine(x, &format!("{prefix}.weight"), &conv1d_to_linear(&w), &b)
    }

    /// `x · w^T + b` for an (out, in) weight `w` stored under `name`.
    fn affine(&mut self, x: &str, name: &str, w: &Weight, b: &Weight) -> Result<String> {
        let rhs = self.matmul_rhs(name, w)?;
        let y = self.g.node("MatMul", &[x, &rhs], vec![]);
        Ok(self.add_bias(&y, b))
    }

    /// `LayerNormalization` over the last axis with `prefix.weight` and `prefix.bias`.
    fn layer_norm(&mut self, x: &str, prefix: &str) -> Result<String> {
        let n = self.p.hidden;
        let w = self.load(&format!("{prefix}.weight"), &[n])?;
        let b = self.load(&format!("{prefix}.bias"), &[n])?;
        let w = self.g.const_f32("ln_w", &[n as i64], &w.data);
        let b = self.g.const_f32("ln_b", &[n as i64], &b.data);
        let attrs = vec![
            ("axis", Attr::Int(-1)),
            ("epsilon", Attr::Float(self.p.rms_eps)),
        ];
        Ok(self.g.node("LayerNormalization", &[x, &w, &b], attrs))
    }

    /// GPT-2's `gelu_new`: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
    fn gelu_new(&mut self, x: &str) -> String {
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
}

/// A `Conv1D` weight (in, out) as an `nn.Linear` weight (out, in).
fn conv1d_to_linear(w: &Weight) -> Weight {
    let (k, n) = (w.shape[0], w.shape[1]);
    let mut data = vec![0f32; k * n]; // (n, k)
    for r in 0..k {
        for c in 0..n {
            data[c * k + r] = w.data[r * n + c];
        }
    }
    Weight {
        shape: vec![n, k],
        data,
    }
}

/// Checks the GPT-2 specific parts of `p` (no grouped heads).
pub fn validate(p: &super::llama::LlamaParams) -> Result<()> {
    ensure!(
        p.kv_heads == p.heads && p.heads * p.head_dim == p.hidden,
        "GPT-2 needs hidden size {} = heads {} x head dim {}, with no grouped heads",
        p.hidden,
        p.heads,
        p.head_dim
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv1d_weight_becomes_out_by_in() {
        // (in 2, out 3) → (out 3, in 2).
        let w = Weight {
            shape: vec![2, 3],
            data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        };
        let t = conv1d_to_linear(&w);
        assert_eq!(t.shape, vec![3, 2]);
        assert_eq!(t.data, vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }
}
