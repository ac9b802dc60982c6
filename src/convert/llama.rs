//! The Llama family (Llama 2 and 3.x, Mistral, TinyLlama; SmolLM2 is a Llama): RMSNorm,
//! RoPE, grouped-query attention, SwiGLU. This file maps its checkpoints' keys and tensor
//! names onto the shared decoder, and holds what the other Llama-shaped families (`qwen.rs`)
//! share with it: the Hugging Face config, the GGUF keys and the tensor names.
//!
//! Llama 3.x rescales RoPE's frequencies (`rope_scaling.rope_type: llama3`); llama.cpp's
//! converter stores that rescaling as per-pair divisors in a `rope_freqs.weight` tensor,
//! which is read as it is.

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use super::decoder::{Activation, Biases, DecoderParams, Layout, Mlp, Norm, Positions, Tensor};
use super::family::{Family, GgufChange, GgufTensor};
use super::from_gguf::{embedding_rows, get_usize};
use super::gguf::Gguf;
use super::rope::RopeScaling;

/// The Llama family.
pub const FAMILY: Family = Family {
    hf_model_types: &["llama", "mistral"],
    gguf_architecture: "llama",
    hf_keys: HF_KEYS,
    gguf_keys: GGUF_KEYS,
    graph_name: "edgelm-llama",
    layout: LAYOUT,
    params_from_hf,
    params_from_gguf,
    gguf_tensor,
    config_json,
};

/// Where every Llama-shaped checkpoint keeps its tensors.
pub const LAYOUT: Layout = Layout {
    prefix,
    conv1d: false,
    fused_qkv: false,
};

/// The `config.json` keys [`HfConfig`] reads, and those transformers' Llama never reads:
/// `pretraining_tp` (a training-time slicing of the projections that leaves their results
/// unchanged), and nanotron's `is_llama_config` and `rope_interleaved` (SmolLM2's configs).
pub const HF_KEYS: &[&str] = &[
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
    "mlp_bias",
    "sliding_window",
    "pretraining_tp",
    "is_llama_config",
    "rope_interleaved",
];

/// The `{arch}.` GGUF keys [`rope_params_from_gguf`] reads.
pub const GGUF_KEYS: &[&str] = &[
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
    "rope.freq_base",
    "rope.dimension_count",
    "rope.scaling.type",
];

/// The block every Llama-shaped model is made of, with its sizes left to fill.
pub fn block(positions: Positions, norm_eps: f32, bias: Biases) -> DecoderParams {
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
        rope_scaling: RopeScaling::None,
        qk_norm: false,
        norm_offset: 0.0,
        post_norms: false,
        embed_scale: None,
        attn_scale: None,
        window: None,
        norm: Norm::Rms,
        norm_eps,
        mlp: Mlp {
            activation: Activation::Silu,
            gated: true,
        },
        bias,
        tied_embeddings: false,
    }
}

fn prefix(t: Tensor) -> Option<String> {
    let layer = |l: usize, rest: &str| format!("model.layers.{l}.{rest}");
    Some(match t {
        Tensor::Embedding => "model.embed_tokens".into(),
        Tensor::FinalNorm => "model.norm".into(),
        Tensor::LmHead => "lm_head".into(),
        Tensor::RopeFreqs => "rope_freqs".into(),
        Tensor::AttnNorm(l) => layer(l, "input_layernorm"),
        Tensor::Q(l) => layer(l, "self_attn.q_proj"),
        Tensor::K(l) => layer(l, "self_attn.k_proj"),
        Tensor::V(l) => layer(l, "self_attn.v_proj"),
        Tensor::O(l) => layer(l, "self_attn.o_proj"),
        Tensor::QNorm(l) => layer(l, "self_attn.q_norm"),
        Tensor::KNorm(l) => layer(l, "self_attn.k_norm"),
        Tensor::MlpNorm(l) => layer(l, "post_attention_layernorm"),
        Tensor::Gate(l) => layer(l, "mlp.gate_proj"),
        Tensor::Up(l) => layer(l, "mlp.up_proj"),
        Tensor::Down(l) => layer(l, "mlp.down_proj"),
        Tensor::Positions | Tensor::Qkv(_) | Tensor::PostAttnNorm(_) | Tensor::PostMlpNorm(_) => {
            return None
        }
    })
}

/// The `config.json` keys of a Llama-shaped model.
#[derive(Deserialize)]
pub struct HfConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    /// The head width, when not hidden / heads.
    pub head_dim: Option<usize>,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "default_theta")]
    rope_theta: f32,
    rope_scaling: Option<Value>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f32,
    #[serde(default = "default_positions")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    /// Biases on Q, K, V and the output projection.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    sliding_window: Option<Value>,
}

fn default_act() -> String {
    "silu".into()
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

impl HfConfig {
    /// Reads `config`; the keys it does not name are checked by the reader.
    pub fn read(config: &Value) -> Result<HfConfig> {
        HfConfig::deserialize(config).context("not a Llama-shaped config")
    }

    /// The decoder these keys describe, with these biases.
    pub fn params(&self, bias: Biases) -> Result<DecoderParams> {
        if self.hidden_act != "silu" {
            bail!(
                "hidden_act \"{}\" is not supported (supported: silu)",
                self.hidden_act
            );
        }
        let positions = Positions::Rope {
            theta: self.rope_theta,
        };
        Ok(DecoderParams {
            vocab: self.vocab_size,
            hidden: self.hidden_size,
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            ffn: self.intermediate_size,
            max_positions: self.max_position_embeddings,
            rope_scaling: rope_scaling(self.rope_scaling.as_ref(), self.max_position_embeddings)?,
            tied_embeddings: self.tie_word_embeddings,
            ..block(
                positions,
                self.rms_norm_eps,
                Biases {
                    mlp: self.mlp_bias,
                    ..bias
                },
            )
        })
    }

    /// Refuses a sliding window shorter than the context: transformers would mask keys
    /// further back than it, which the full-attention graph does not.
    pub fn check_no_sliding_window(&self) -> Result<()> {
        match &self.sliding_window {
            None | Some(Value::Null) => Ok(()),
            Some(Value::Number(n))
                if n.as_u64()
                    .is_some_and(|w| w >= self.max_position_embeddings as u64) =>
            {
                Ok(())
            }
            Some(w) => bail!("sliding-window attention (sliding_window {w}) is not supported"),
        }
    }
}

/// `rope_scaling` of `config.json`: absent, null, `default`, `linear` or `llama3`.
pub fn rope_scaling(v: Option<&Value>, max_positions: usize) -> Result<RopeScaling> {
    let Some(obj) = v.filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let obj = obj.as_object().context("rope_scaling is not an object")?;
    const KEYS: [&str; 6] = [
        "rope_type",
        "type",
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    ];
    if let Some(k) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
        bail!("rope_scaling key \"{k}\" is not understood");
    }
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f32> {
        let v = obj.get(key).and_then(Value::as_f64);
        Ok(v.with_context(|| format!("rope_scaling \"{kind}\" needs a number \"{key}\""))? as f32)
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => {
            let original = match obj.get("original_max_position_embeddings") {
                Some(_) => num("original_max_position_embeddings")?,
                None => max_positions as f32,
            };
            let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
            ensure!(
                high > low,
                "rope_scaling: high_freq_factor {high} must exceed low_freq_factor {low}"
            );
            Ok(RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_positions: original,
            })
        }
        other => bail!("RoPE scaling \"{other}\" is not supported (supported: linear, llama3)"),
    }
}

fn params_from_hf(config: &Value, _model_type: &str) -> Result<DecoderParams> {
    let cfg = HfConfig::read(config)?;
    cfg.check_no_sliding_window()?;
    let b = cfg.attention_bias;
    cfg.params(Biases {
        qkv: b,
        output: b,
        mlp: false,
    })
}

fn params_from_gguf(g: &Gguf) -> Result<DecoderParams> {
    rope_params_from_gguf(g, "llama")
}

/// Checks the head keys under `arch.` a GGUF may carry (value heads as wide as key heads,
/// RoPE over the whole head, `vocab_size` equal to the embedding's rows) and returns the
/// vocabulary size.
pub(super) fn gguf_head_checks(
    g: &Gguf,
    arch: &str,
    hidden: usize,
    head_dim: usize,
) -> Result<usize> {
    let key = |k: &str| format!("{arch}.{k}");
    let opt_int = |k: &str| match g.get(&key(k)) {
        Some(_) => get_usize(g, &key(k)).map(Some),
        None => Ok(None),
    };
    if let Some(v) = opt_int("attention.value_length")? {
        ensure!(
            v == head_dim,
            "value heads of {v} differ from key heads of {head_dim}"
        );
    }
    if let Some(r) = opt_int("rope.dimension_count")? {
        ensure!(
            r == head_dim,
            "RoPE over {r} of the {head_dim} dimensions of a head is not supported"
        );
    }
    let vocab = embedding_rows(g, hidden)?;
    if let Some(v) = opt_int("vocab_size")? {
        ensure!(
            v == vocab,
            "{} is {v} but the embedding has {vocab} rows",
            key("vocab_size")
        );
    }
    Ok(vocab)
}

/// The parameters of a Llama-shaped model from its GGUF keys under `arch.`; biases and
/// q/k norms are there when layer 0 has them, llama3 RoPE scaling when `rope_freqs.weight`
/// is.
pub fn rope_params_from_gguf(g: &Gguf, arch: &str) -> Result<DecoderParams> {
    let key = |k: &str| format!("{arch}.{k}");
    let int = |k: &str| get_usize(g, &key(k));
    let opt_int = |k: &str| match g.get(&key(k)) {
        Some(_) => int(k).map(Some),
        None => Ok(None),
    };
    let hidden = int("embedding_length")?;
    let heads = int("attention.head_count")?;
    ensure!(heads > 0, "{} is 0", key("attention.head_count"));
    let kv_heads = opt_int("attention.head_count_kv")?.unwrap_or(heads);
    let head_dim = opt_int("attention.key_length")?.unwrap_or(hidden / heads);
    let vocab = gguf_head_checks(g, arch, hidden, head_dim)?;
    let theta = match g.get(&key("rope.freq_base")) {
        Some(_) => g.get_f32(&key("rope.freq_base"))?,
        None => 10_000.0,
    };
    if g.get(&key("rope.scaling.type")).is_some() {
        let kind = g.get_str(&key("rope.scaling.type"))?;
        if kind != "none" {
            bail!("RoPE scaling \"{kind}\" is not supported (supported: llama3, as rope_freqs.weight)");
        }
    }
    let eps = g.get_f32(&key("attention.layer_norm_rms_epsilon"))?;
    let has = |t: &str| g.tensor(&format!("blk.0.{t}")).is_some();
    let bias = Biases {
        qkv: has("attn_q.bias"),
        output: has("attn_output.bias"),
        mlp: has("ffn_up.bias"),
    };
    Ok(DecoderParams {
        vocab,
        hidden,
        layers: int("block_count")?,
        heads,
        kv_heads,
        head_dim,
        ffn: int("feed_forward_length")?,
        max_positions: int("context_length")?,
        rope_scaling: match g.tensor("rope_freqs.weight") {
            Some(_) => RopeScaling::FreqFactors,
            None => RopeScaling::None,
        },
        qk_norm: has("attn_q_norm.weight"),
        tied_embeddings: g.tensor("output.weight").is_none(),
        ..block(Positions::Rope { theta }, eps, bias)
    })
}

/// llama.cpp's name for a Hugging Face Llama tensor; its Q and K rows are permuted.
fn gguf_tensor(hf: &str) -> Option<GgufTensor> {
    gguf_tensor_of(hf, Some("llama"))
}

/// llama.cpp's name for a tensor of a Llama-shaped model; with `permuted_arch`, Q and K
/// rows (weights and biases) are interleaved for llama.cpp's RoPE, per head, with the head
/// counts under that architecture's keys.
pub fn gguf_tensor_of(hf: &str, permuted_arch: Option<&'static str>) -> Option<GgufTensor> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        "rope_freqs.weight" => Some("rope_freqs.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(GgufTensor {
            name: name.to_string(),
            change: GgufChange::None,
        });
    }
    let rope_rows = |kv: bool| match permuted_arch {
        Some("llama") if kv => GgufChange::RopeRows {
            heads_key: "llama.attention.head_count_kv",
        },
        Some("llama") => GgufChange::RopeRows {
            heads_key: "llama.attention.head_count",
        },
        _ => GgufChange::None,
    };
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (module, kind) = tail.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let (name, change) = match module {
        "input_layernorm" => ("attn_norm", GgufChange::None),
        "self_attn.q_proj" => ("attn_q", rope_rows(false)),
        "self_attn.k_proj" => ("attn_k", rope_rows(true)),
        "self_attn.v_proj" => ("attn_v", GgufChange::None),
        "self_attn.o_proj" => ("attn_output", GgufChange::None),
        "self_attn.q_norm" => ("attn_q_norm", GgufChange::None),
        "self_attn.k_norm" => ("attn_k_norm", GgufChange::None),
        "post_attention_layernorm" => ("ffn_norm", GgufChange::None),
        "mlp.gate_proj" => ("ffn_gate", GgufChange::None),
        "mlp.up_proj" => ("ffn_up", GgufChange::None),
        "mlp.down_proj" => ("ffn_down", GgufChange::None),
        _ => return None,
    };
    Some(GgufTensor {
        name: format!("blk.{layer}.{name}.{kind}"),
        change,
    })
}

fn config_json(p: &DecoderParams, bos: Option<u32>, eos: &[u32], edgelm: Value) -> Value {
    config_json_as(p, "llama", "LlamaForCausalLM", bos, eos, edgelm)
}

/// A Llama-shaped model's `config.json` in its Hugging Face form, as `model_type`.
pub fn config_json_as(
    p: &DecoderParams,
    model_type: &str,
    architecture: &str,
    bos: Option<u32>,
    eos: &[u32],
    edgelm: Value,
) -> Value {
    let rope_scaling = match p.rope_scaling {
        RopeScaling::None => None,
        RopeScaling::Linear { factor } => Some(json!({"rope_type": "linear", "factor": factor})),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_positions,
        } => Some(json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_positions,
        })),
        // The divisors are in the graph's frequencies; transformers has no name for them.
        RopeScaling::FreqFactors => Some(json!({"rope_type": "rope_freqs (llama.cpp)"})),
    };
    let mut config = json!({
        "architectures": [architecture],
        "model_type": model_type,
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
    });
    // Written only when present, as transformers' own configs of plain Llamas omit them.
    if let Some(scaling) = rope_scaling {
        config["rope_scaling"] = scaling;
    }
    if p.bias.mlp {
        config["mlp_bias"] = true.into();
    }
    config
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
            gguf_tensor("model.layers.0.self_attn.q_proj.bias"),
            Some(GgufTensor {
                name: "blk.0.attn_q.bias".into(),
                change: GgufChange::RopeRows {
                    heads_key: "llama.attention.head_count"
                },
            })
        );
        assert_eq!(
            gguf_tensor("model.embed_tokens.weight").map(|t| t.name),
            Some("token_embd.weight".into())
        );
        assert_eq!(gguf_tensor("model.layers.x"), None);
        assert_eq!(gguf_tensor("model.layers.0.mlp.up_proj.scale"), None);
    }

    #[test]
    fn every_tensor_the_graph_reads_has_a_gguf_name() {
        let tensors = [
            Tensor::Embedding,
            Tensor::FinalNorm,
            Tensor::LmHead,
            Tensor::RopeFreqs,
            Tensor::AttnNorm(3),
            Tensor::Q(3),
            Tensor::K(3),
            Tensor::V(3),
            Tensor::O(3),
            Tensor::QNorm(3),
            Tensor::KNorm(3),
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

    fn llama3_config(scaling: Value) -> Value {
        json!({
            "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 1024, "rope_scaling": scaling,
        })
    }

    #[test]
    fn llama3_rope_scaling_is_read_and_others_are_refused() {
        let p = params_from_hf(
            &llama3_config(json!({
                "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64
            })),
            "llama",
        )
        .unwrap();
        assert_eq!(
            p.rope_scaling,
            RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_positions: 64.0
            }
        );
        let err = |scaling| {
            format!(
                "{:#}",
                params_from_hf(&llama3_config(scaling), "llama").unwrap_err()
            )
        };
        assert_eq!(
            err(json!({"type": "yarn", "factor": 4.0})),
            "RoPE scaling \"yarn\" is not supported (supported: linear, llama3)"
        );
        assert_eq!(
            err(
                json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "beta_fast": 32})
            ),
            "rope_scaling key \"beta_fast\" is not understood"
        );
        assert_eq!(
            err(json!({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0})),
            "rope_scaling \"llama3\" needs a number \"low_freq_factor\""
        );
    }

    /// SmolLM2-135M-Instruct's `config.json` as published: every key is known.
    #[test]
    fn smollm2_config_keys_are_all_understood() {
        let keys = [
            "architectures",
            "attention_bias",
            "attention_dropout",
            "bos_token_id",
            "eos_token_id",
            "hidden_act",
            "hidden_size",
            "initializer_range",
            "intermediate_size",
            "is_llama_config",
            "max_position_embeddings",
            "mlp_bias",
            "model_type",
            "num_attention_heads",
            "num_hidden_layers",
            "num_key_value_heads",
            "pad_token_id",
            "pretraining_tp",
            "rms_norm_eps",
            "rope_interleaved",
            "rope_scaling",
            "rope_theta",
            "tie_word_embeddings",
            "torch_dtype",
            "transformers_version",
            "transformers.js_config",
            "use_cache",
            "vocab_size",
        ];
        assert_eq!(FAMILY.unknown_hf_key(keys), None);
        assert_eq!(
            FAMILY.unknown_hf_key(["hidden_size", "quantization_config"]),
            Some("quantization_config")
        );
    }

    #[test]
    fn gguf_keys_outside_the_family_are_named() {
        let keys = [
            "general.name",
            "tokenizer.ggml.model",
            "llama.rope.freq_base",
            "llama.expert_count",
        ];
        assert_eq!(FAMILY.unknown_gguf_key(keys), Some("llama.expert_count"));
        assert_eq!(
            FAMILY.unknown_gguf_key(["qwen2.block_count"]),
            Some("qwen2.block_count")
        );
    }

    #[test]
    fn activations_other_than_silu_are_refused() {
        let mut c = llama3_config(Value::Null);
        c["hidden_act"] = "gelu".into();
        assert_eq!(
            format!("{:#}", params_from_hf(&c, "llama").unwrap_err()),
            "hidden_act \"gelu\" is not supported (supported: silu)"
        );
    }
}
