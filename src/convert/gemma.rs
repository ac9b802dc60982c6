//! The Gemma 3 family (text: `Gemma3ForCausalLM`, `model_type` `gemma3_text`; GGUF
//! architecture `gemma3`). Its block, in transformers' order:
//!
//! - token embeddings times `sqrt(hidden)` (an f32 constant, as transformers computes it
//!   for an f32 model);
//! - four RMSNorms per block (before and after attention, before and after the MLP), each
//!   scaling by `1 + w`: Hugging Face stores `w`, llama.cpp's converter stores `1 + w`;
//! - per-head q/k RMSNorms before RoPE, queries scaled by `query_pre_attn_scalar^-0.5`;
//! - local (sliding-window) layers, where a query sees its own position and the
//!   `sliding_window - 1` before it, with their own RoPE base (`rope_local_base_freq`,
//!   never rescaled); global layers use `rope_theta` and `rope_scaling` (linear on the
//!   larger sizes);
//! - a GeGLU MLP with the tanh approximation of GELU; a tied LM head.
//!
//! A GGUF file carries only `gemma3.attention.sliding_window`: like llama.cpp, every 6th
//! layer is then global and the others local, and queries are scaled by `1/sqrt(head_dim)`
//! (`1/sqrt(hidden/heads)` for the 62-layer 27B), since llama.cpp's graph does exactly that.

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use super::decoder::{
    Activation, Biases, DecoderParams, Layout, Mlp, Norm, Positions, SlidingWindow, Tensor,
};
use super::family::{Family, GgufChange, GgufTensor};
use super::from_gguf::get_usize;
use super::gguf::Gguf;
use super::llama;
use super::llama::gguf_head_checks;
use super::rope::RopeScaling;

/// Gemma 3 (text).
pub const GEMMA3: Family = Family {
    hf_model_types: &["gemma3_text"],
    gguf_architecture: "gemma3",
    hf_keys: HF_KEYS,
    gguf_keys: GGUF_KEYS,
    graph_name: "edgelm-gemma3",
    layout: LAYOUT,
    params_from_hf,
    params_from_gguf,
    gguf_tensor,
    config_json,
};

/// Where Gemma 3 checkpoints keep their tensors.
const LAYOUT: Layout = Layout {
    prefix,
    conv1d: false,
    fused_qkv: false,
};

/// Every GGUF file's pattern, as llama.cpp assumes it: layers `5, 11, 17, …` are global.
const GGUF_PATTERN: usize = 6;

/// The `config.json` keys [`HfConfig`] reads; `sliding_window_pattern` (and its private
/// copy) only derive `layer_types`, which transformers always writes out.
const HF_KEYS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_activation",
    "rope_theta",
    "rope_scaling",
    "rope_local_base_freq",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "query_pre_attn_scalar",
    "sliding_window",
    "sliding_window_pattern",
    "_sliding_window_pattern",
    "layer_types",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "use_bidirectional_attention",
];

/// The `gemma3.` GGUF keys [`params_from_gguf`] reads.
const GGUF_KEYS: &[&str] = &[
    "vocab_size",
    "context_length",
    "embedding_length",
    "feed_forward_length",
    "block_count",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "attention.layer_norm_rms_epsilon",
    "attention.sliding_window",
    "rope.freq_base",
    "rope.freq_base_swa",
    "rope.dimension_count",
    "rope.scaling.type",
    "rope.scaling.factor",
    "final_logit_softcapping",
];

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
        Tensor::QNorm(l) => layer(l, "self_attn.q_norm"),
        Tensor::KNorm(l) => layer(l, "self_attn.k_norm"),
        Tensor::PostAttnNorm(l) => layer(l, "post_attention_layernorm"),
        Tensor::MlpNorm(l) => layer(l, "pre_feedforward_layernorm"),
        Tensor::PostMlpNorm(l) => layer(l, "post_feedforward_layernorm"),
        Tensor::Gate(l) => layer(l, "mlp.gate_proj"),
        Tensor::Up(l) => layer(l, "mlp.up_proj"),
        Tensor::Down(l) => layer(l, "mlp.down_proj"),
        Tensor::Positions | Tensor::Qkv(_) | Tensor::RopeFreqs => return None,
    })
}

/// Gemma 3's `config.json`, with transformers' `Gemma3TextConfig` defaults.
#[derive(Deserialize)]
struct HfConfig {
    #[serde(default = "default_vocab")]
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    #[serde(default = "default_head_dim")]
    head_dim: usize,
    #[serde(default = "default_act")]
    hidden_activation: String,
    #[serde(default = "default_theta")]
    rope_theta: f32,
    rope_scaling: Option<Value>,
    #[serde(default = "default_local_theta")]
    rope_local_base_freq: f32,
    #[serde(default = "default_eps")]
    rms_norm_eps: f32,
    #[serde(default = "default_positions")]
    max_position_embeddings: usize,
    #[serde(default = "default_true")]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default = "default_head_dim")]
    query_pre_attn_scalar: usize,
    #[serde(default = "default_window")]
    sliding_window: usize,
    #[serde(default = "default_pattern")]
    sliding_window_pattern: usize,
    layer_types: Option<Vec<String>>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    #[serde(default)]
    use_bidirectional_attention: bool,
}

fn default_vocab() -> usize {
    262_208
}
fn default_head_dim() -> usize {
    256
}
fn default_act() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_theta() -> f32 {
    1_000_000.0
}
fn default_local_theta() -> f32 {
    10_000.0
}
fn default_eps() -> f32 {
    1e-6
}
fn default_positions() -> usize {
    131_072
}
fn default_true() -> bool {
    true
}
fn default_window() -> usize {
    4096
}
fn default_pattern() -> usize {
    6
}

/// The block every Gemma 3 model is made of, with its sizes and windows left to fill.
fn block(theta: f32, norm_eps: f32, bias: Biases) -> DecoderParams {
    DecoderParams {
        qk_norm: true,
        norm_offset: 0.0,
        post_norms: true,
        tied_embeddings: true,
        mlp: Mlp {
            activation: Activation::GeluTanh,
            gated: true,
        },
        norm: Norm::Rms,
        ..llama::block(Positions::Rope { theta }, norm_eps, bias)
    }
}

/// `sqrt(hidden)` rounded once to f32, as Python's `hidden ** 0.5` becomes a float32 tensor.
fn embed_scale(hidden: usize) -> f32 {
    (hidden as f64).sqrt() as f32
}

fn params_from_hf(config: &Value, _model_type: &str) -> Result<DecoderParams> {
    let cfg = HfConfig::deserialize(config).context("not a Gemma 3 config")?;
    if cfg.hidden_activation != "gelu_pytorch_tanh" {
        bail!(
            "hidden_activation \"{}\" is not supported (supported: gelu_pytorch_tanh)",
            cfg.hidden_activation
        );
    }
    if let Some(c) = cfg.attn_logit_softcapping {
        bail!("attn_logit_softcapping {c} is not supported");
    }
    if let Some(c) = cfg.final_logit_softcapping {
        bail!("final_logit_softcapping {c} is not supported");
    }
    ensure!(
        !cfg.use_bidirectional_attention,
        "use_bidirectional_attention (an encoder) is not supported"
    );
    ensure!(cfg.query_pre_attn_scalar > 0, "query_pre_attn_scalar is 0");
    let local: Vec<bool> = match &cfg.layer_types {
        Some(types) => types
            .iter()
            .map(|t| match t.as_str() {
                "sliding_attention" => Ok(true),
                "full_attention" => Ok(false),
                other => bail!(
                    "layer type \"{other}\" is not supported \
                     (supported: sliding_attention, full_attention)"
                ),
            })
            .collect::<Result<_>>()?,
        None => {
            ensure!(
                cfg.sliding_window_pattern > 0,
                "sliding_window_pattern is 0"
            );
            (0..cfg.num_hidden_layers)
                .map(|i| (i + 1) % cfg.sliding_window_pattern != 0)
                .collect()
        }
    };
    let b = cfg.attention_bias;
    let mut p = DecoderParams {
        vocab: cfg.vocab_size,
        hidden: cfg.hidden_size,
        layers: cfg.num_hidden_layers,
        heads: cfg.num_attention_heads,
        kv_heads: cfg.num_key_value_heads.unwrap_or(cfg.num_attention_heads),
        head_dim: cfg.head_dim,
        ffn: cfg.intermediate_size,
        max_positions: cfg.max_position_embeddings,
        rope_scaling: llama::rope_scaling(cfg.rope_scaling.as_ref(), cfg.max_position_embeddings)?,
        tied_embeddings: cfg.tie_word_embeddings,
        norm_offset: 1.0,
        embed_scale: Some(embed_scale(cfg.hidden_size)),
        attn_scale: Some(1.0 / (cfg.query_pre_attn_scalar as f32).sqrt()),
        ..block(
            cfg.rope_theta,
            cfg.rms_norm_eps,
            Biases {
                qkv: b,
                output: b,
                mlp: false,
            },
        )
    };
    if local.iter().any(|&l| l) {
        p.window = Some(SlidingWindow {
            size: cfg.sliding_window,
            local,
            rope_theta: cfg.rope_local_base_freq,
        });
    }
    p.validate()?;
    Ok(p)
}

fn params_from_gguf(g: &Gguf) -> Result<DecoderParams> {
    let key = |k: &str| format!("gemma3.{k}");
    let int = |k: &str| get_usize(g, &key(k));
    let opt_int = |k: &str| match g.get(&key(k)) {
        Some(_) => int(k).map(Some),
        None => Ok(None),
    };
    let opt_f32 = |k: &str| match g.get(&key(k)) {
        Some(_) => g.get_f32(&key(k)).map(Some),
        None => Ok(None),
    };
    let hidden = int("embedding_length")?;
    let heads = int("attention.head_count")?;
    ensure!(heads > 0, "{} is 0", key("attention.head_count"));
    let layers = int("block_count")?;
    let head_dim = opt_int("attention.key_length")?.unwrap_or(256);
    let vocab = gguf_head_checks(g, "gemma3", hidden, head_dim)?;
    if let Some(c) = opt_f32("final_logit_softcapping")?.filter(|&c| c != 0.0) {
        bail!("final_logit_softcapping {c} is not supported");
    }
    let rope_scaling = match g.get(&key("rope.scaling.type")) {
        None => RopeScaling::None,
        Some(_) => match g.get_str(&key("rope.scaling.type"))? {
            "none" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: g.get_f32(&key("rope.scaling.factor"))?,
            },
            other => bail!("RoPE scaling \"{other}\" is not supported (supported: linear)"),
        },
    };
    if g.get(&key("rope.scaling.factor")).is_some() && rope_scaling == RopeScaling::None {
        bail!(
            "{} without a linear scaling type",
            key("rope.scaling.factor")
        );
    }
    let theta = opt_f32("rope.freq_base")?.unwrap_or(1_000_000.0);
    let eps = g.get_f32(&key("attention.layer_norm_rms_epsilon"))?;
    // llama.cpp's query scale (its `f_attention_scale`).
    let attn_scale = match layers {
        62 => 1.0 / ((hidden / heads) as f32).sqrt(),
        _ => 1.0 / (head_dim as f32).sqrt(),
    };
    let has = |t: &str| g.tensor(&format!("blk.0.{t}")).is_some();
    let window = match opt_int("attention.sliding_window")?.filter(|&w| w > 0) {
        Some(size) => Some(SlidingWindow {
            size,
            local: (0..layers)
                .map(|i| i % GGUF_PATTERN < GGUF_PATTERN - 1)
                .collect(),
            rope_theta: opt_f32("rope.freq_base_swa")?.unwrap_or(10_000.0),
        }),
        None => None,
    };
    let p = DecoderParams {
        vocab,
        hidden,
        layers,
        heads,
        kv_heads: opt_int("attention.head_count_kv")?.unwrap_or(heads),
        head_dim,
        ffn: int("feed_forward_length")?,
        max_positions: int("context_length")?,
        rope_scaling,
        tied_embeddings: g.tensor("output.weight").is_none(),
        // Stored as `1 + w` already.
        norm_offset: 0.0,
        embed_scale: Some(embed_scale(hidden)),
        attn_scale: Some(attn_scale),
        window,
        ..block(
            theta,
            eps,
            Biases {
                qkv: has("attn_q.bias"),
                output: has("attn_output.bias"),
                mlp: false,
            },
        )
    };
    p.validate()?;
    Ok(p)
}

/// llama.cpp's name for a Hugging Face Gemma 3 tensor (stored unpermuted).
fn gguf_tensor(hf: &str) -> Option<GgufTensor> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    let change = GgufChange::None;
    if let Some(name) = fixed {
        let name = name.to_string();
        return Some(GgufTensor { name, change });
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (module, kind) = tail.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let name = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "post_attention_layernorm" => "post_attention_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    let name = format!("blk.{layer}.{name}.{kind}");
    Some(GgufTensor { name, change })
}

/// The bundle's `config.json` in transformers' Gemma 3 form. The norm weights in the bundle
/// are `1 + w` whatever the source, which transformers' `(1 + w)` would count twice: the
/// graph, not this config, is the model; `edgelm.norm_weights` says so.
fn config_json(p: &DecoderParams, bos: Option<u32>, eos: &[u32], mut edgelm: Value) -> Value {
    let layer_types: Vec<&str> = (0..p.layers)
        .map(|l| match p.layer_window(l) {
            Some(_) => "sliding_attention",
            None => "full_attention",
        })
        .collect();
    let window = p.window.as_ref();
    edgelm["norm_weights"] = "1 + w (stored)".into();
    let mut config = json!({
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": p.vocab,
        "hidden_size": p.hidden,
        "intermediate_size": p.ffn,
        "num_hidden_layers": p.layers,
        "num_attention_heads": p.heads,
        "num_key_value_heads": p.kv_heads,
        "head_dim": p.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": p.max_positions,
        "rms_norm_eps": p.norm_eps,
        "rope_theta": p.rope_theta(),
        "rope_local_base_freq": window.map(|w| w.rope_theta),
        "sliding_window": window.map(|w| w.size),
        "layer_types": layer_types,
        "query_pre_attn_scalar": p.attn_scale.map(|s| (1.0 / (s * s)).round()),
        "attention_bias": p.bias.qkv,
        "tie_word_embeddings": p.tied_embeddings,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "edgelm": edgelm,
    });
    if let RopeScaling::Linear { factor } = p.rope_scaling {
        config["rope_scaling"] = json!({"rope_type": "linear", "factor": factor});
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Value {
        json!({
            "vocab_size": 8, "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 7,
            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
            "query_pre_attn_scalar": 16, "sliding_window": 16, "rope_local_base_freq": 10.0,
            "rope_theta": 100.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        })
    }

    #[test]
    fn hf_pattern_scales_and_rope_bases() {
        let p = params_from_hf(&config(), "gemma3_text").unwrap();
        let w = p.window.as_ref().unwrap();
        let global: Vec<usize> = (0..7).filter(|&l| p.layer_window(l).is_none()).collect();
        assert_eq!(global, [5]);
        assert_eq!((w.size, w.rope_theta), (16, 10.0));
        assert_eq!(p.rope_scaling, RopeScaling::Linear { factor: 8.0 });
        assert_eq!(p.attn_scale, Some(0.25));
        assert_eq!(p.embed_scale, Some(8.0));
        assert_eq!(p.norm_offset, 1.0);
        assert!(p.qk_norm && p.post_norms && p.tied_embeddings);
    }

    #[test]
    fn hf_refuses_what_changes_the_maths() {
        for (k, v) in [
            ("final_logit_softcapping", json!(30.0)),
            ("attn_logit_softcapping", json!(50.0)),
            ("hidden_activation", json!("gelu")),
            ("use_bidirectional_attention", json!(true)),
            ("layer_types", json!(vec!["chunked_attention"; 7])),
        ] {
            let mut c = config();
            c[k] = v;
            let err = params_from_hf(&c, "gemma3_text").unwrap_err().to_string();
            assert!(err.contains("not supported"), "{k}: {err}");
        }
    }

    #[test]
    fn gguf_names_of_the_four_norms() {
        let name = |hf: &str| gguf_tensor(hf).map(|t| t.name);
        let l = "model.layers.3";
        let pairs = [
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "post_attention_norm"),
            ("pre_feedforward_layernorm", "ffn_norm"),
            ("post_feedforward_layernorm", "post_ffw_norm"),
        ];
        for (hf, gguf) in pairs {
            assert_eq!(
                name(&format!("{l}.{hf}.weight")),
                Some(format!("blk.3.{gguf}.weight"))
            );
        }
        assert_eq!(name("model.layers.3.mlp.up_proj.scale"), None);
    }
}
