//! A GGUF file as a [`Checkpoint`]: Llama hyper-parameters, tokenizer and weights under
//! their Hugging Face names.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use super::gguf::Gguf;
use super::llama::{Arch, LlamaParams};
use super::vocab::{build_tokenizer_config, build_tokenizer_json, GgufVocab};
use super::{Checkpoint, Weight, WeightSource};

/// Opens `path` as a GGUF Llama checkpoint.
pub fn open(path: &Path) -> Result<Checkpoint> {
    let gguf = Gguf::open(path)?;
    let arch = gguf
        .get_str("general.architecture")
        .with_context(|| format!("reading \"{}\"", path.display()))?
        .to_string();
    let params = match arch.as_str() {
        "llama" => llama_params(&gguf),
        "gpt2" => gpt2_params(&gguf),
        _ => bail!(
            "\"{}\": unsupported architecture \"{arch}\" (supported: llama, gpt2)",
            path.display()
        ),
    }
    .with_context(|| format!("reading \"{}\"", path.display()))?;
    let vocab = GgufVocab::from_gguf(&gguf)
        .with_context(|| format!("reading tokenizer of \"{}\"", path.display()))?;
    if vocab.tokens.len() != params.vocab {
        bail!(
            "\"{}\": tokenizer has {} tokens but the embedding has {} rows",
            path.display(),
            vocab.tokens.len(),
            params.vocab
        );
    }
    let tokenizer_json = build_tokenizer_json(&vocab)?;
    let tokenizer_config = build_tokenizer_config(&vocab, Some(params.max_positions as u64));
    let arch = params.arch;
    Ok(Checkpoint {
        params,
        tokenizer_json,
        tokenizer_config,
        bos_id: vocab.bos_id,
        eos_ids: vocab.eos_id.into_iter().collect(),
        weights: Box::new(GgufWeights { gguf, arch }),
    })
}

fn llama_params(g: &Gguf) -> Result<LlamaParams> {
    let int = |k: &str| -> Result<usize> { Ok(usize::try_from(g.get_u64(k)?)?) };
    let hidden = int("llama.embedding_length")?;
    let heads = int("llama.attention.head_count")?;
    let kv_heads = match g.get("llama.attention.head_count_kv") {
        Some(_) => int("llama.attention.head_count_kv")?,
        None => heads,
    };
    let head_dim = match g.get("llama.rope.dimension_count") {
        Some(_) => int("llama.rope.dimension_count")?,
        None => hidden / heads.max(1),
    };
    let embd = g
        .tensor("token_embd.weight")
        .context("GGUF has no tensor \"token_embd.weight\"")?;
    let vocab = match embd.dims.as_slice() {
        [d, v] if *d as usize == hidden => usize::try_from(*v)?,
        dims => bail!("token_embd.weight has dims {dims:?}, expected [{hidden}, vocab]"),
    };
    let rope_theta = match g.get("llama.rope.freq_base") {
        Some(_) => g.get_f32("llama.rope.freq_base")?,
        None => 10_000.0,
    };
    if g.get("llama.rope.scaling.type").is_some() {
        let kind = g.get_str("llama.rope.scaling.type")?;
        if kind != "none" {
            bail!("RoPE scaling \"{kind}\" is not supported");
        }
    }
    Ok(LlamaParams {
        arch: Arch::Llama,
        vocab,
        hidden,
        layers: int("llama.block_count")?,
        heads,
        kv_heads,
        head_dim,
        ffn: int("llama.feed_forward_length")?,
        rope_theta,
        rms_eps: g.get_f32("llama.attention.layer_norm_rms_epsilon")?,
        max_positions: int("llama.context_length")?,
        tied_embeddings: g.tensor("output.weight").is_none(),
        attention_bias: false,
    })
}

/// GPT-2 hyper-parameters from llama.cpp's `gpt2.*` keys.
fn gpt2_params(g: &Gguf) -> Result<LlamaParams> {
    let int = |k: &str| -> Result<usize> { Ok(usize::try_from(g.get_u64(k)?)?) };
    let hidden = int("gpt2.embedding_length")?;
    let heads = int("gpt2.attention.head_count")?;
    let embd = g
        .tensor("token_embd.weight")
        .context("GGUF has no tensor \"token_embd.weight\"")?;
    let vocab = match embd.dims.as_slice() {
        [d, v] if *d as usize == hidden => usize::try_from(*v)?,
        dims => bail!("token_embd.weight has dims {dims:?}, expected [{hidden}, vocab]"),
    };
    ensure!(
        heads > 0 && hidden.is_multiple_of(heads),
        "embedding length {hidden} is not a multiple of {heads} heads"
    );
    Ok(LlamaParams {
        arch: Arch::Gpt2,
        vocab,
        hidden,
        layers: int("gpt2.block_count")?,
        heads,
        kv_heads: heads,
        head_dim: hidden / heads,
        ffn: int("gpt2.feed_forward_length")?,
        rope_theta: 0.0,
        rms_eps: g.get_f32("gpt2.attention.layer_norm_epsilon")?,
        max_positions: int("gpt2.context_length")?,
        // llama.cpp writes GPT-2's tied head out as `output.weight`, a copy of the embedding.
        tied_embeddings: g.tensor("output.weight").is_none(),
        attention_bias: true,
    })
}

/// GGUF tensors served under Hugging Face names.
struct GgufWeights {
    gguf: Gguf,
    arch: Arch,
}

impl WeightSource for GgufWeights {
    fn tensor(&self, hf_name: &str) -> Result<Option<Weight>> {
        if self.arch == Arch::Gpt2 {
            return self.gpt2_tensor(hf_name);
        }
        let Some((name, unpermute)) = gguf_name(hf_name) else {
            bail!("no GGUF name for tensor \"{hf_name}\"");
        };
        let Some(info) = self.gguf.tensor(&name) else {
            return Ok(None);
        };
        let shape = info.shape_row_major();
        let data = self.gguf.dequantize(info)?;
        let mut w = Weight { shape, data };
        if let Some(heads_key) = unpermute {
            let heads = usize::try_from(self.gguf.get_u64(heads_key)?)?;
            w = unpermute_rope_rows(&w, heads)?;
        }
        Ok(Some(w))
    }
}

impl GgufWeights {
    /// A GPT-2 tensor in the Hugging Face layout: llama.cpp stores the `Conv1D` weights
    /// (in, out) transposed, as (out, in), so they are transposed back here.
    fn gpt2_tensor(&self, hf_name: &str) -> Result<Option<Weight>> {
        let Some((name, conv1d)) = gpt2_gguf_name(hf_name) else {
            bail!("no GGUF name for tensor \"{hf_name}\"");
        };
        let Some(info) = self.gguf.tensor(&name) else {
            return Ok(None);
        };
        let w = Weight {
            shape: info.shape_row_major(),
            data: self.gguf.dequantize(info)?,
        };
        if !conv1d {
            return Ok(Some(w));
        }
        let (rows, cols) = match w.shape.as_slice() {
            [r, c] => (*r, *c),
            s => bail!("GGUF tensor \"{name}\" has shape {s:?}, expected 2-D"),
        };
        let mut data = vec![0f32; w.data.len()]; // (cols, rows)
        for r in 0..rows {
            for c in 0..cols {
                data[c * rows + r] = w.data[r * cols + c];
            }
        }
        Ok(Some(Weight {
            shape: vec![cols, rows],
            data,
        }))
    }
}

/// The GGUF name of a Hugging Face GPT-2 tensor, and whether it is a `Conv1D` weight.
fn gpt2_gguf_name(hf: &str) -> Option<(String, bool)> {
    let fixed = match hf {
        "transformer.wte.weight" => Some("token_embd.weight"),
        "transformer.wpe.weight" => Some("position_embd.weight"),
        "transformer.ln_f.weight" => Some("output_norm.weight"),
        "transformer.ln_f.bias" => Some("output_norm.bias"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some((f.to_string(), false));
    }
    let rest = hf.strip_prefix("transformer.h.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (g, conv1d) = match tail {
        "ln_1.weight" => ("attn_norm.weight", false),
        "ln_1.bias" => ("attn_norm.bias", false),
        "attn.c_attn.weight" => ("attn_qkv.weight", true),
        "attn.c_attn.bias" => ("attn_qkv.bias", false),
        "attn.c_proj.weight" => ("attn_output.weight", true),
        "attn.c_proj.bias" => ("attn_output.bias", false),
        "ln_2.weight" => ("ffn_norm.weight", false),
        "ln_2.bias" => ("ffn_norm.bias", false),
        "mlp.c_fc.weight" => ("ffn_up.weight", true),
        "mlp.c_fc.bias" => ("ffn_up.bias", false),
        "mlp.c_proj.weight" => ("ffn_down.weight", true),
        "mlp.c_proj.bias" => ("ffn_down.bias", false),
        _ => return None,
    };
    Some((format!("blk.{layer}.{g}"), conv1d))
}

/// The GGUF name of a Hugging Face Llama tensor, and for Q/K the metadata key of the head
/// count their rows were permuted with.
fn gguf_name(hf: &str) -> Option<(String, Option<&'static str>)> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some((f.to_string(), None));
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (g, perm) = match tail {
        "input_layernorm.weight" => ("attn_norm.weight", None),
        "self_attn.q_proj.weight" => ("attn_q.weight", Some("llama.attention.head_count")),
        "self_attn.k_proj.weight" => ("attn_k.weight", Some("llama.attention.head_count_kv")),
        "self_attn.v_proj.weight" => ("attn_v.weight", None),
        "self_attn.o_proj.weight" => ("attn_output.weight", None),
        "post_attention_layernorm.weight" => ("ffn_norm.weight", None),
        "mlp.gate_proj.weight" => ("ffn_gate.weight", None),
        "mlp.up_proj.weight" => ("ffn_up.weight", None),
        "mlp.down_proj.weight" => ("ffn_down.weight", None),
        _ => return None,
    };
    Some((format!("blk.{layer}.{g}"), perm))
}

/// Undoes llama.cpp's interleaving of Q/K rows so RoPE is the Hugging Face rotate-half form.
///
/// llama.cpp stores row `h*hd + 2*j + i` what Hugging Face has at row `h*hd + i*hd/2 + j`.
fn unpermute_rope_rows(w: &Weight, heads: usize) -> Result<Weight> {
    let (rows, cols) = match w.shape.as_slice() {
        [r, c] => (*r, *c),
        s => bail!("expected a 2-D Q/K weight, got shape {s:?}"),
    };
    if heads == 0 || rows % (2 * heads) != 0 {
        bail!("Q/K weight with {rows} rows cannot be split into {heads} heads");
    }
    let hd = rows / heads;
    let mut data = vec![0f32; w.data.len()]; // (rows, cols)
    for h in 0..heads {
        for j in 0..hd / 2 {
            for i in 0..2 {
                let src = (h * hd + 2 * j + i) * cols;
                let dst = (h * hd + i * (hd / 2) + j) * cols;
                data[dst..dst + cols].copy_from_slice(&w.data[src..src + cols]);
            }
        }
    }
    Ok(Weight {
        shape: w.shape.clone(),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_maps_interleaved_rows_to_halves() {
        // One head of dim 4, one column: llama.cpp rows [a0, b0, a1, b1] are HF [a0, a1, b0, b1].
        let w = Weight {
            shape: vec![4, 1],
            data: vec![0.0, 10.0, 1.0, 11.0],
        };
        let u = unpermute_rope_rows(&w, 1).unwrap();
        assert_eq!(u.data, vec![0.0, 1.0, 10.0, 11.0]);
    }

    #[test]
    fn names_map_both_ways_we_need() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.k_proj.weight"),
            Some((
                "blk.12.attn_k.weight".into(),
                Some("llama.attention.head_count_kv")
            ))
        );
        assert_eq!(
            gguf_name("model.embed_tokens.weight").map(|x| x.0),
            Some("token_embd.weight".into())
        );
        assert_eq!(gguf_name("model.layers.x"), None);
    }
}
