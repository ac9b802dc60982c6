//! What a model family file supplies to the converter: how its checkpoints' keys map onto
//! [`DecoderParams`], where its tensors are, and how its bundle config reads. Everything
//! else (reading containers, writing the graph) is shared.
//!
//! A new family is a file that fills in a [`Family`] and an entry in `convert::FAMILIES`;
//! a block feature it needs (RoPE scaling, q/k norms, sliding windows, extra norms) is a
//! field of [`DecoderParams`] and a step of the graph writer, so every family can use it.

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
