//! `edgelm convert`: GGUF (and later safetensors) checkpoints into an ONNX bundle.

pub mod dequant;
pub mod gguf;
pub mod tokenizer_json;
