//! The integration tests, one module per concern, in one test binary: each binary links the
//! whole of tract, and CI builds them for three targets (x86_64, aarch64, armv7), so one
//! binary instead of seventeen saves minutes of linking.
//!
//! Select a module with a filter: `cargo test --test integration serve::`.

mod common;

mod bench;
mod chat;
mod chat_templates;
mod cli_errors;
mod convert_hf;
mod families;
mod faults;
mod fuzz_regressions;
mod gemma3;
mod gguf;
mod golden_cross_arch;
mod golden_smollm2;
mod info;
mod kv_ring;
mod llama_vocab;
mod malformed_model;
mod model_tiny;
mod perplexity;
mod serve;
mod session;
mod smollm2_text;
mod structured;
mod tokenizer_gguf;
mod vocab_fixtures;
