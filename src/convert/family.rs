//! What a model family file supplies to the converter: how its checkpoints' keys map onto
//! [`DecoderParams`], where its tensors are, and how its bundle config reads. Everything
//! else (reading containers, writing the graph) is shared.
//!
//! A new family is a file that fills in a [`Family`] and an entry in `convert::FAMILIES`;
//! a block feature it needs (RoPE scaling, q/k norms, sliding windows, extra norms) is a
//! field of [`DecoderParams`] and a step of the graph writer, so every family can use it.
//!
//! A family lists every configuration key it understands ([`Family::hf_keys`],
//! [`Family::gguf_keys`]); the readers refuse a checkpoint with any other, since a key
//! nobody reads may change the maths (a RoPE scaling, a sliding window, an activation).

use anyhow::Result;
use serde_json::Value;

use super::decoder::{DecoderParams, Layout};
use super::gguf::Gguf;

/// One model family (Llama, GPT-2, ...).
pub struct Family {
    /// `model_type` values of the Hugging Face `config.json` files it reads.
    pub hf_model_types: &'static [&'static str],
    /// `general.architecture` of the GGUF files it reads.
    pub gguf_architecture: &'static str,
    /// The `config.json` keys it understands, besides [`HF_BOOKKEEPING_KEYS`]: those
    /// `params_from_hf` reads, and those that do not change the maths (dropout rates).
    pub hf_keys: &'static [&'static str],
    /// The GGUF metadata keys under `{gguf_architecture}.` it understands, without that
    /// prefix (`embedding_length`): those `params_from_gguf` reads and those that do not
    /// change the maths.
    pub gguf_keys: &'static [&'static str],
    /// Name of the graph in `model.onnx`.
    pub graph_name: &'static str,
    /// Where its checkpoints keep the decoder's tensors (Hugging Face names and layout).
    pub layout: Layout,
    /// Parameters from a Hugging Face `config.json` with its `model_type`.
    pub params_from_hf: fn(config: &Value, model_type: &str) -> Result<DecoderParams>,
    /// Parameters from GGUF metadata.
    pub params_from_gguf: fn(&Gguf) -> Result<DecoderParams>,
    /// The GGUF tensor holding a Hugging Face tensor, `None` for a name it does not know.
    pub gguf_tensor: fn(hf_name: &str) -> Option<GgufTensor>,
    /// The bundle's `config.json`, in the family's Hugging Face form.
    pub config_json: fn(&DecoderParams, bos: Option<u32>, eos: &[u32], edgelm: Value) -> Value,
}

/// Where llama.cpp keeps a Hugging Face tensor, and how it changed its layout.
#[derive(Debug, PartialEq, Eq)]
pub struct GgufTensor {
    /// The GGUF tensor name (`blk.0.attn_q.weight`).
    pub name: String,
    /// What to undo to get the Hugging Face layout back.
    pub change: GgufChange,
}

/// A layout change llama.cpp's converter makes to a tensor.
#[derive(Debug, PartialEq, Eq)]
pub enum GgufChange {
    /// Stored as Hugging Face has it.
    None,
    /// Q/K rows interleaved for llama.cpp's RoPE, per head; the head count is under this
    /// metadata key.
    RopeRows { heads_key: &'static str },
    /// A 2-D weight stored transposed.
    Transposed,
}

/// `config.json` keys of every transformers model that describe training, generation
/// defaults, export or bookkeeping, never the forward pass.
pub const HF_BOOKKEEPING_KEYS: &[&str] = &[
    "_model_name_or_path",
    "_name_or_path",
    "_attn_implementation",
    "add_cross_attention",
    "architectures",
    "attention_dropout",
    "bad_words_ids",
    "begin_suppress_tokens",
    "bos_token_id",
    "chunk_size_feed_forward",
    "cross_attention_hidden_size",
    "decoder_start_token_id",
    "diversity_penalty",
    "do_sample",
    "dtype",
    "early_stopping",
    "encoder_no_repeat_ngram_size",
    "eos_token_id",
    "exponential_decay_length_penalty",
    "finetuning_task",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "id2label",
    "initializer_range",
    "is_decoder",
    "is_encoder_decoder",
    "label2id",
    "length_penalty",
    "max_length",
    "min_length",
    "model_type",
    "no_repeat_ngram_size",
    "num_beam_groups",
    "num_beams",
    "num_return_sequences",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "pad_token_id",
    "prefix",
    "problem_type",
    "pruned_heads",
    "remove_invalid_values",
    "repetition_penalty",
    "return_dict",
    "return_dict_in_generate",
    "sep_token_id",
    "suppress_tokens",
    "task_specific_params",
    "temperature",
    "tf_legacy_loss",
    "tie_encoder_decoder",
    "tokenizer_class",
    "transformers.js_config",
    "top_k",
    "top_p",
    "torch_dtype",
    "torchscript",
    "transformers_version",
    "typical_p",
    "unk_token_id",
    "use_bfloat16",
    "use_cache",
];

/// GGUF metadata namespaces that never describe the forward pass: the file's description,
/// the vocabulary (read by `vocab/`) and the quantizer's provenance.
pub const GGUF_OTHER_NAMESPACES: &[&str] = &["general.", "tokenizer.", "quantize."];

impl Family {
    /// The first `config.json` key neither this family nor transformers' bookkeeping knows.
    pub fn unknown_hf_key<'a>(&self, keys: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
        keys.into_iter()
            .find(|k| !self.hf_keys.contains(k) && !HF_BOOKKEEPING_KEYS.contains(k))
    }

    /// The first GGUF metadata key outside the other namespaces that this family does not
    /// list under its architecture.
    pub fn unknown_gguf_key<'a>(&self, keys: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
        keys.into_iter().find(|k| {
            if GGUF_OTHER_NAMESPACES.iter().any(|ns| k.starts_with(ns)) {
                return false;
            }
            let own = k
                .strip_prefix(self.gguf_architecture)
                .and_then(|rest| rest.strip_prefix('.'));
            !own.is_some_and(|rest| self.gguf_keys.contains(&rest))
        })
    }
}
