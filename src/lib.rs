//! edgelm: a small language model on a Raspberry Pi-class board, over a serial line.
//!
//! Data flows one way: bytes → tokens → graph → logits → sampler → tokens → text.

pub mod attention;
pub mod bench;
pub mod chat;
pub mod cli;
pub mod config;
pub mod constraint;
pub mod conversation;
pub mod convert;
pub mod engine;
pub mod generate;
pub mod info;
pub mod kv_cache;
pub mod logger;
pub mod model;
pub mod perplexity;
pub mod prepass;
pub mod protocol;
pub mod quant;
pub mod run;
pub mod sampler;
pub mod serve;
pub mod session;
pub mod signal;
pub mod state;
pub mod stop;
pub mod template;
pub mod tokenize;
pub mod tokenizer;
pub mod transport;
