//! The Llama family (Llama, Mistral, Qwen2; SmolLM2 is a Llama): RMSNorm, RoPE,
//! grouped-query attention, SwiGLU. This file only maps its checkpoints' keys and tensor
//! names onto the shared decoder.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use super::decoder::{Activation, Biases, DecoderParams, Layout, Mlp, Norm, Positions, Tensor};
use super::family::{Family, GgufChange, GgufTensor};
use super::from_gguf::{embedding_rows, get_usize};
use super::gguf::Gguf;

/// The Llama family.
pub const FAMILY: Family = Family {
    hf_model_types: &["llama", "mistral", "qwen2"],
    gguf_architecture: "llama",
    graph_name: "edgelm-llama",
    layout: Layout {
        prefix,
        conv1d: false,
        fused_qkv: false,
    },
    params_from_hf,
    params_from_gguf,
    gguf_tensor,
    config_json,
};

/// The block every Llama-family model is made of, with its sizes left to fill.
fn block(positions: Positions, norm_eps: f32, qkv_bias: bool) -> DecoderParams {
    DecoderParams {
        vocab: 0,
        hidden: 0,
        layers: 0,
        heads: 0,
        kv_heads: 0,
        head_dim: 0,
        ffn: 0,
        max_positions: 0,
        positions,
        norm: Norm::Rms,
        norm_eps,
        mlp: Mlp {
            activation: Activation::Silu,
            gated: true,
        },
        bias: Biases {
            qkv: qkv_bias,
            output: false,
            mlp: false,
        },
        tied_embeddings: false,
    }
}

fn prefix(t: Tensor) -> Option<String> {
    let layer = |l: usize, rest: &str| format!("model.layers.{l}.{rest}");
    Some(match t {
        Tensor::Embedding => "model.embed_tokens".into(),
        Tensor::FinalNorm => "model.norm".into(),
        Tensor::LmHead => "lm_head".into(),
        Tensor::AttnNorm(l) => layer(l, "input_layernorm"),
        Tensor::Q(l) => layer(l, "self_attn.q_proj"),
        Tensor::K(l) => layer(l, "self_attn.k_proj"),
        Tensor::V(l) => layer(l, "self_attn.v_proj"),
        Tensor::O(l) => layer(l, "self_attn.o_proj"),
        Tensor::MlpNorm(l) => layer(l, "post_attention_layernorm"),
        Tensor::Gate(l) => layer(l, "mlp.gate_proj"),
        Tensor::Up(l) => layer(l, "mlp.up_proj"),
        Tensor::Down(l) => layer(l, "mlp.down_proj"),
        Tensor::Positions | Tensor::Qkv(_) => return None,
    })
}

/// The `config.json` keys read.
#[derive(Deserialize)]
struct HfConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_theta")]
    rope_theta: f32,
    #[serde(default = "default_eps")]
    rms_norm_eps: f32,
    #[serde(default = "default_positions")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    rope_scaling: Option<Value>,
    attention_bias: Option<bool>,
}

fn default_theta() -> f32 {
    10_000.0
}
fn default_eps() -> f32 {
    1e-6
}
fn default_positions() -> usize {
    2048
}

fn params_from_hf(config: &Value, model_type: &str) -> Result<DecoderParams> {
    let cfg = HfConfig::deserialize(config).context("not a Llama config")?;
    if cfg.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
        bail!("RoPE scaling is not supported");
    }
    // Qwen2 always has Q/K/V biases (transformers ignores its `attention_bias`); Llama only
    // when `attention_bias` says so.
    let qkv_bias = model_type == "qwen2" || cfg.attention_bias.unwrap_or(false);
    let positions = Positions::Rope {
        theta: cfg.rope_theta,
    };
    Ok(DecoderParams {
        vocab: cfg.vocab_size,
        hidden: cfg.hidden_size,
        layers: cfg.num_hidden_layers,
        heads: cfg.num_attention_heads,
        kv_heads: cfg.num_key_value_heads.unwrap_or(cfg.num_attention_heads),
        head_dim: cfg
            .head_dim
            .unwrap_or(cfg.hidden_size / cfg.num_attention_heads.max(1)),
        ffn: cfg.intermediate_size,
        max_positions: cfg.max_position_embeddings,
        tied_embeddings: cfg.tie_word_embeddings,
        ..block(positions, cfg.rms_norm_eps, qkv_bias)
    })
}

fn params_from_gguf(g: &Gguf) -> Result<DecoderParams> {
    let int = |key: &str| get_usize(g, key);
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
    let vocab = embedding_rows(g, hidden)?;
    let theta = match g.get("llama.rope.freq_base") {
        Some(_) => g.get_f32("llama.rope.freq_base")?,
        None => 10_000.0,
    };
    if g.get("llama.rope.scaling.type").is_some() {
        let kind = g.get_str("llama.rope.scaling.type")?;
        if kind != "none" {
            bail!("RoPE scaling \"{kind}\" is not supported");
        }
    }
    let eps = g.get_f32("llama.attention.layer_norm_rms_epsilon")?;
    Ok(DecoderParams {
        vocab,
        hidden,
        layers: int("llama.block_count")?,
        heads,
        kv_heads,
        head_dim,
        ffn: int("llama.feed_forward_length")?,
        max_positions: int("llama.context_length")?,
        tied_embeddings: g.tensor("output.weight").is_none(),
        ..block(Positions::Rope { theta }, eps, false)
    })
}

/// llama.cpp's name for a Hugging Face Llama tensor; its Q and K rows are permuted.
fn gguf_tensor(hf: &str) -> Option<GgufTensor> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(GgufTensor {
            name: name.to_string(),
            change: GgufChange::None,
        });
    }
    let rope_rows = |heads_key| GgufChange::RopeRows { heads_key };
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (name, change) = match tail {
        "input_layernorm.weight" => ("attn_norm.weight", GgufChange::None),
        "self_attn.q_proj.weight" => ("attn_q.weight", rope_rows("llama.attention.head_count")),
        "self_attn.k_proj.weight" => ("attn_k.weight", rope_rows("llama.attention.head_count_kv")),
        "self_attn.v_proj.weight" => ("attn_v.weight", GgufChange::None),
        "self_attn.o_proj.weight" => ("attn_output.weight", GgufChange::None),
        "post_attention_layernorm.weight" => ("ffn_norm.weight", GgufChange::None),
        "mlp.gate_proj.weight" => ("ffn_gate.weight", GgufChange::None),
        "mlp.up_proj.weight" => ("ffn_up.weight", GgufChange::None),
        "mlp.down_proj.weight" => ("ffn_down.weight", GgufChange::None),
        _ => return None,
    };
    Some(GgufTensor {
        name: format!("blk.{layer}.{name}"),
        change,
    })
}

fn config_json(p: &DecoderParams, bos: Option<u32>, eos: &[u32], edgelm: Value) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": p.vocab,
        "hidden_size": p.hidden,
        "intermediate_size": p.ffn,
        "num_hidden_layers": p.layers,
        "num_attention_heads": p.heads,
        "num_key_value_heads": p.kv_heads,
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": p.max_positions,
        "rms_norm_eps": p.norm_eps,
        "rope_theta": p.rope_theta(),
        "attention_bias": p.bias.qkv,
        "tie_word_embeddings": p.tied_embeddings,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "edgelm": edgelm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_of_hf_tensors() {
        assert_eq!(
            gguf_tensor("model.layers.12.self_attn.k_proj.weight"),
            Some(GgufTensor {
                name: "blk.12.attn_k.weight".into(),
                change: GgufChange::RopeRows {
                    heads_key: "llama.attention.head_count_kv"
                },
            })
        );
        assert_eq!(
            gguf_tensor("model.embed_tokens.weight").map(|t| t.name),
            Some("token_embd.weight".into())
        );
        assert_eq!(gguf_tensor("model.layers.x"), None);
    }

    #[test]
    fn every_tensor_the_graph_reads_has_a_gguf_name() {
        let tensors = [
            Tensor::Embedding,
            Tensor::FinalNorm,
            Tensor::LmHead,
            Tensor::AttnNorm(3),
            Tensor::Q(3),
            Tensor::K(3),
            Tensor::V(3),
            Tensor::O(3),
            Tensor::MlpNorm(3),
            Tensor::Gate(3),
            Tensor::Up(3),
            Tensor::Down(3),
        ];
        for t in tensors {
            let hf = format!("{}.weight", prefix(t).unwrap());
            assert!(gguf_tensor(&hf).is_some(), "{hf}");
        }
    }
}
