//! The Qwen2 (Qwen2, Qwen2.5) and Qwen3 families: Llama-shaped blocks with Q/K/V biases
//! (Qwen2) or an RMSNorm over each head's query and key before RoPE and a head width of its
//! own (Qwen3). llama.cpp stores their Q and K rows as Hugging Face has them (NeoX-style
//! RoPE), so nothing is permuted back.

use anyhow::{bail, Result};
use serde::Deserialize;
use serde_json::Value;

use super::decoder::{Biases, DecoderParams};
use super::family::{Family, GgufTensor};
use super::gguf::Gguf;
use super::llama::{self, HfConfig};

/// Qwen2 and Qwen2.5.
pub const QWEN2: Family = Family {
    hf_model_types: &["qwen2"],
    gguf_architecture: "qwen2",
    hf_keys: HF_KEYS,
    gguf_keys: llama::GGUF_KEYS,
    graph_name: "edgelm-qwen2",
    layout: llama::LAYOUT,
    params_from_hf: qwen2_from_hf,
    params_from_gguf: qwen2_from_gguf,
    gguf_tensor,
    config_json: qwen2_config_json,
};

/// Qwen3 (dense).
pub const QWEN3: Family = Family {
    hf_model_types: &["qwen3"],
    gguf_architecture: "qwen3",
    hf_keys: HF_KEYS,
    gguf_keys: llama::GGUF_KEYS,
    graph_name: "edgelm-qwen3",
    layout: llama::LAYOUT,
    params_from_hf: qwen3_from_hf,
    params_from_gguf: qwen3_from_gguf,
    gguf_tensor,
    config_json: qwen3_config_json,
};

/// Llama's keys and the sliding-window switches Qwen configs carry (read by [`Window`]).
const HF_KEYS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rope_theta",
    "rope_scaling",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
];

/// Qwen's sliding-window settings: `sliding_window` and `max_window_layers` only matter
/// when `use_sliding_window` is on, which is refused, as is any layer type but full
/// attention.
#[derive(Deserialize)]
struct Window {
    #[serde(default)]
    use_sliding_window: bool,
    layer_types: Option<Vec<String>>,
}

fn read(config: &Value) -> Result<HfConfig> {
    let w = Window::deserialize(config)?;
    if w.use_sliding_window {
        bail!("sliding-window attention (use_sliding_window) is not supported");
    }
    if let Some(t) = w
        .layer_types
        .iter()
        .flatten()
        .find(|t| *t != "full_attention")
    {
        bail!("layer type \"{t}\" is not supported (supported: full_attention)");
    }
    HfConfig::read(config)
}

fn qwen2_from_hf(config: &Value, _model_type: &str) -> Result<DecoderParams> {
    // Qwen2 always has Q/K/V biases and none on the output (transformers ignores
    // `attention_bias` for it).
    read(config)?.params(Biases {
        qkv: true,
        output: false,
        mlp: false,
    })
}

fn qwen3_from_hf(config: &Value, _model_type: &str) -> Result<DecoderParams> {
    let cfg = read(config)?;
    let b = cfg.attention_bias;
    let mut p = cfg.params(Biases {
        qkv: b,
        output: b,
        mlp: false,
    })?;
    // transformers' Qwen3Config default, not hidden / heads.
    p.head_dim = cfg.head_dim.unwrap_or(128);
    p.qk_norm = true;
    Ok(p)
}

fn qwen2_from_gguf(g: &Gguf) -> Result<DecoderParams> {
    llama::rope_params_from_gguf(g, "qwen2")
}

fn qwen3_from_gguf(g: &Gguf) -> Result<DecoderParams> {
    let p = llama::rope_params_from_gguf(g, "qwen3")?;
    if !p.qk_norm {
        bail!("Qwen3 GGUF has no \"blk.0.attn_q_norm.weight\"");
    }
    Ok(p)
}

fn gguf_tensor(hf: &str) -> Option<GgufTensor> {
    llama::gguf_tensor_of(hf, None)
}

fn qwen2_config_json(p: &DecoderParams, bos: Option<u32>, eos: &[u32], edgelm: Value) -> Value {
    llama::config_json_as(p, "qwen2", "Qwen2ForCausalLM", bos, eos, edgelm)
}

fn qwen3_config_json(p: &DecoderParams, bos: Option<u32>, eos: &[u32], edgelm: Value) -> Value {
    llama::config_json_as(p, "qwen3", "Qwen3ForCausalLM", bos, eos, edgelm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::family::GgufChange;
    use serde_json::json;

    fn config() -> Value {
        json!({
            "vocab_size": 8, "hidden_size": 96, "intermediate_size": 8, "num_hidden_layers": 2,
            "num_attention_heads": 4, "head_dim": 32, "use_sliding_window": false,
            "sliding_window": 4096, "layer_types": ["full_attention", "full_attention"],
        })
    }

    #[test]
    fn qwen3_has_qk_norms_and_its_own_head_width() {
        let p = qwen3_from_hf(&config(), "qwen3").unwrap();
        assert!(p.qk_norm);
        assert_eq!((p.hidden, p.heads, p.head_dim), (96, 4, 32));
        assert!(!p.bias.qkv);
        let p = qwen2_from_hf(&config(), "qwen2").unwrap();
        assert!(!p.qk_norm);
        assert!(p.bias.qkv && !p.bias.output);
    }

    #[test]
    fn sliding_windows_are_refused() {
        let mut c = config();
        c["use_sliding_window"] = true.into();
        assert_eq!(
            format!("{:#}", qwen2_from_hf(&c, "qwen2").unwrap_err()),
            "sliding-window attention (use_sliding_window) is not supported"
        );
        let mut c = config();
        c["layer_types"] = json!(["full_attention", "sliding_attention"]);
        assert_eq!(
            format!("{:#}", qwen3_from_hf(&c, "qwen3").unwrap_err()),
            "layer type \"sliding_attention\" is not supported (supported: full_attention)"
        );
    }

    #[test]
    fn qwen_rows_are_not_permuted() {
        assert_eq!(
            gguf_tensor("model.layers.1.self_attn.k_proj.bias"),
            Some(GgufTensor {
                name: "blk.1.attn_k.bias".into(),
                change: GgufChange::None
            })
        );
        assert_eq!(
            gguf_tensor("model.layers.1.self_attn.q_norm.weight").map(|t| t.name),
            Some("blk.1.attn_q_norm.weight".into())
        );
    }
}
