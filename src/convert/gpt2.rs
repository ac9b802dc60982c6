//! The GPT-2 family: LayerNorm, learned absolute positions, fused QKV, gelu_new MLP, biases
//! on every linear layer. This file only maps its checkpoints' keys and tensor names onto
//! the shared decoder.
//!
//! Hugging Face stores GPT-2's linear layers as `Conv1D`, weight (in, out), and Q, K and V
//! as one `c_attn`; the decoder turns them into `nn.Linear`'s (out, in) and splits them.

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use super::decoder::{Activation, Biases, DecoderParams, Layout, Mlp, Norm, Positions, Tensor};
use super::family::{Family, GgufChange, GgufTensor};
use super::from_gguf::{embedding_rows, get_usize};
use super::gguf::Gguf;
use super::rope::RopeScaling;

/// The GPT-2 family.
pub const FAMILY: Family = Family {
    hf_model_types: &["gpt2"],
    gguf_architecture: "gpt2",
    hf_keys: &[
        "vocab_size",
        "n_embd",
        "n_layer",
        "n_head",
        "n_inner",
        "n_positions",
        "layer_norm_epsilon",
        "activation_function",
        "scale_attn_weights",
        "scale_attn_by_inverse_layer_idx",
        "tie_word_embeddings",
        // The same as n_positions in every GPT-2 config.
        "n_ctx",
        // Upcasts the attention to f32 under mixed precision: the graph is f32 throughout.
        "reorder_and_upcast_attn",
        // Dropout, off at inference.
        "attn_pdrop",
        "embd_pdrop",
        "resid_pdrop",
        // The sequence-summary head of GPT2DoubleHeadsModel, not part of the LM.
        "summary_activation",
        "summary_first_dropout",
        "summary_proj_to_labels",
        "summary_type",
        "summary_use_proj",
    ],
    gguf_keys: &[
        "block_count",
        "context_length",
        "embedding_length",
        "feed_forward_length",
        "attention.head_count",
        "attention.layer_norm_epsilon",
    ],
    graph_name: "edgelm-gpt2",
    layout: Layout {
        prefix,
        conv1d: true,
        fused_qkv: true,
    },
    params_from_hf,
    params_from_gguf,
    gguf_tensor,
    config_json,
};

/// GPT-2's block for `hidden` split into `heads`, with the other sizes to fill.
fn block(hidden: usize, heads: usize, norm_eps: f32) -> Result<DecoderParams> {
    ensure!(
        heads > 0 && hidden.is_multiple_of(heads),
        "embedding size {hidden} is not a multiple of {heads} heads"
    );
    Ok(DecoderParams {
        vocab: 0,
        hidden,
        layers: 0,
        heads,
        kv_heads: heads,
        head_dim: hidden / heads,
        ffn: 0,
        max_positions: 0,
        positions: Positions::Learned,
        rope_scaling: RopeScaling::None,
        qk_norm: false,
        norm_offset: 0.0,
        post_norms: false,
        embed_scale: None,
        attn_scale: None,
        window: None,
        norm: Norm::Layer,
        norm_eps,
        mlp: Mlp {
            activation: Activation::GeluTanh,
            gated: false,
        },
        bias: Biases {
            qkv: true,
            output: true,
            mlp: true,
        },
        tied_embeddings: false,
    })
}

fn prefix(t: Tensor) -> Option<String> {
    let layer = |l: usize, rest: &str| format!("transformer.h.{l}.{rest}");
    Some(match t {
        Tensor::Embedding => "transformer.wte".into(),
        Tensor::Positions => "transformer.wpe".into(),
        Tensor::FinalNorm => "transformer.ln_f".into(),
        Tensor::LmHead => "lm_head".into(),
        Tensor::AttnNorm(l) => layer(l, "ln_1"),
        Tensor::Qkv(l) => layer(l, "attn.c_attn"),
        Tensor::O(l) => layer(l, "attn.c_proj"),
        Tensor::MlpNorm(l) => layer(l, "ln_2"),
        Tensor::Up(l) => layer(l, "mlp.c_fc"),
        Tensor::Down(l) => layer(l, "mlp.c_proj"),
        Tensor::Q(_)
        | Tensor::K(_)
        | Tensor::V(_)
        | Tensor::Gate(_)
        | Tensor::QNorm(_)
        | Tensor::KNorm(_)
        | Tensor::RopeFreqs
        | Tensor::PostAttnNorm(_)
        | Tensor::PostMlpNorm(_) => return None,
    })
}

/// The `config.json` keys read.
#[derive(Deserialize)]
struct HfConfig {
    vocab_size: usize,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    n_inner: Option<usize>,
    n_positions: usize,
    #[serde(default = "default_ln_eps")]
    layer_norm_epsilon: f32,
    #[serde(default = "default_gelu")]
    activation_function: String,
    #[serde(default = "default_true")]
    scale_attn_weights: bool,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "default_true")]
    tie_word_embeddings: bool,
}

fn default_ln_eps() -> f32 {
    1e-5
}
fn default_gelu() -> String {
    "gelu_new".into()
}
fn default_true() -> bool {
    true
}

fn params_from_hf(config: &Value, _model_type: &str) -> Result<DecoderParams> {
    let cfg = HfConfig::deserialize(config).context("not a GPT-2 config")?;
    if !matches!(
        cfg.activation_function.as_str(),
        "gelu_new" | "gelu_pytorch_tanh"
    ) {
        bail!(
            "GPT-2 activation \"{}\" is not supported (supported: gelu_new)",
            cfg.activation_function
        );
    }
    if !cfg.scale_attn_weights || cfg.scale_attn_by_inverse_layer_idx {
        bail!("only the standard 1/sqrt(head_dim) attention scaling is supported");
    }
    Ok(DecoderParams {
        vocab: cfg.vocab_size,
        layers: cfg.n_layer,
        ffn: cfg.n_inner.unwrap_or(4 * cfg.n_embd),
        max_positions: cfg.n_positions,
        tied_embeddings: cfg.tie_word_embeddings,
        ..block(cfg.n_embd, cfg.n_head, cfg.layer_norm_epsilon)?
    })
}

/// GPT-2 hyper-parameters from llama.cpp's `gpt2.*` keys.
fn params_from_gguf(g: &Gguf) -> Result<DecoderParams> {
    let int = |key: &str| get_usize(g, key);
    let hidden = int("gpt2.embedding_length")?;
    let heads = int("gpt2.attention.head_count")?;
    let vocab = embedding_rows(g, hidden)?;
    let eps = g.get_f32("gpt2.attention.layer_norm_epsilon")?;
    Ok(DecoderParams {
        vocab,
        layers: int("gpt2.block_count")?,
        ffn: int("gpt2.feed_forward_length")?,
        max_positions: int("gpt2.context_length")?,
        // llama.cpp writes GPT-2's tied head out as `output.weight`, a copy of the embedding.
        tied_embeddings: g.tensor("output.weight").is_none(),
        ..block(hidden, heads, eps)?
    })
}

/// llama.cpp's name for a Hugging Face GPT-2 tensor; it stores the `Conv1D` weights
/// (in, out) transposed, as (out, in).
fn gguf_tensor(hf: &str) -> Option<GgufTensor> {
    let fixed = match hf {
        "transformer.wte.weight" => Some("token_embd.weight"),
        "transformer.wpe.weight" => Some("position_embd.weight"),
        "transformer.ln_f.weight" => Some("output_norm.weight"),
        "transformer.ln_f.bias" => Some("output_norm.bias"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(GgufTensor {
            name: name.to_string(),
            change: GgufChange::None,
        });
    }
    let rest = hf.strip_prefix("transformer.h.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (name, conv1d) = match tail {
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
    Some(GgufTensor {
        name: format!("blk.{layer}.{name}"),
        change: if conv1d {
            GgufChange::Transposed
        } else {
            GgufChange::None
        },
    })
}

fn config_json(p: &DecoderParams, bos: Option<u32>, eos: &[u32], edgelm: Value) -> Value {
    json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": p.vocab,
        "n_embd": p.hidden,
        "n_inner": p.ffn,
        "n_layer": p.layers,
        "n_head": p.heads,
        "n_positions": p.max_positions,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": p.norm_eps,
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
    fn every_tensor_the_graph_reads_has_a_gguf_name() {
        let tensors = [
            Tensor::Embedding,
            Tensor::Positions,
            Tensor::FinalNorm,
            Tensor::LmHead,
            Tensor::AttnNorm(3),
            Tensor::Qkv(3),
            Tensor::O(3),
            Tensor::MlpNorm(3),
            Tensor::Up(3),
            Tensor::Down(3),
        ];
        for t in tensors {
            let p = prefix(t).unwrap();
            // Every GPT-2 tensor has a bias but the embeddings and the LM head.
            let with_bias = !matches!(t, Tensor::Embedding | Tensor::Positions | Tensor::LmHead);
            for suffix in ["weight", "bias"].iter().take(1 + usize::from(with_bias)) {
                let hf = format!("{p}.{suffix}");
                assert!(gguf_tensor(&hf).is_some(), "{hf}");
            }
        }
        assert_eq!(
            gguf_tensor("transformer.h.2.mlp.c_fc.weight"),
            Some(GgufTensor {
                name: "blk.2.ffn_up.weight".into(),
                change: GgufChange::Transposed
            })
        );
    }
}
