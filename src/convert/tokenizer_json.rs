//! `tokenizer.json` built from a GGUF's `tokenizer.ggml.*` metadata.
