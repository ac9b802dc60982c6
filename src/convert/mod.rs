//! `edgelm convert`: GGUF and Hugging Face safetensors checkpoints into an ONNX bundle.
//!
//! A bundle is a directory in the Hugging Face ONNX export layout: `model.onnx` +
//! `model.onnx_data` (weights, 64-byte aligned), `config.json`, `generation_config.json`,
//! `tokenizer.json`, `tokenizer_config.json`.

pub mod dequant;
pub mod from_gguf;
pub mod gguf;
pub mod gpt2;
pub mod llama;
pub mod onnx;
pub mod safetensors;
pub mod vocab;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;

use llama::{Arch, LlamaParams};
use onnx::{ExternalData, GraphBuilder};

/// How the bundle stores linear-layer and embedding weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Quant {
    /// int8 blocks of 32 with one f32 scale each (the Q8_0 scheme).
    Int8,
    /// Plain f32 (reference quality, 4x larger).
    F32,
}

impl Quant {
    /// The name recorded in the bundle's config.
    pub fn name(self) -> &'static str {
        match self {
            Quant::Int8 => "int8",
            Quant::F32 => "f32",
        }
    }
}

/// A dense f32 tensor in row-major order.
pub struct Weight {
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Values, `shape.iter().product()` of them.
    pub data: Vec<f32>,
}

/// A checkpoint's tensors by their Hugging Face name (`model.layers.0.self_attn.q_proj.weight`).
pub trait WeightSource {
    /// The tensor dequantized to f32, or `None` if the checkpoint has no such tensor.
    fn tensor(&self, name: &str) -> Result<Option<Weight>>;
}

/// Everything the bundle writer needs from a checkpoint.
pub struct Checkpoint {
    /// Architecture hyper-parameters.
    pub params: LlamaParams,
    /// `tokenizer.json` contents.
    pub tokenizer_json: serde_json::Value,
    /// `tokenizer_config.json` contents.
    pub tokenizer_config: serde_json::Value,
    /// Beginning-of-sequence id.
    pub bos_id: Option<u32>,
    /// End-of-sequence ids.
    pub eos_ids: Vec<u32>,
    /// Weights.
    pub weights: Box<dyn WeightSource>,
}

/// Options of `edgelm convert`.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Input: a `.gguf` file or a Hugging Face checkpoint directory.
    pub input: PathBuf,
    /// Output bundle directory (created).
    pub output: PathBuf,
    /// Weight storage.
    pub quant: Quant,
    /// Show a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
}

/// Summary of a finished conversion.
#[derive(Debug)]
pub struct ConvertReport {
    /// Number of decoder layers written.
    pub layers: usize,
    /// Bytes of the external-data file.
    pub data_bytes: u64,
}

/// Converts a checkpoint into a bundle directory.
pub fn convert(opts: &ConvertOptions) -> Result<ConvertReport> {
    let ckpt = open_checkpoint(&opts.input)?;
    let out = &opts.output;
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating output directory \"{}\"", out.display()))?;
    let data = ExternalData::create(out, "model.onnx_data")?;
    let p = ckpt.params.clone();
    // Tensors read per layer, plus embeddings, final norm and maybe the LM head.
    let total = match p.arch {
        Arch::Llama => p.layers * 9 + 3,
        Arch::Gpt2 => p.layers * gpt2::TENSORS_PER_LAYER + 4,
    };
    let mut bar = Progress::new(total, opts.progress && std::io::stderr().is_terminal());
    let g = llama::write_graph(
        GraphBuilder::new(data),
        &p,
        opts.quant,
        ckpt.weights.as_ref(),
        &mut || bar.tick(),
    )?;
    let graph_name = match p.arch {
        Arch::Llama => "edgelm-llama",
        Arch::Gpt2 => "edgelm-gpt2",
    };
    let data_bytes = g.finish(&out.join("model.onnx"), graph_name)?;
    bar.done();
    write_json(&out.join("config.json"), &config_json(&ckpt, opts.quant))?;
    let gen = json!({
        "bos_token_id": ckpt.bos_id,
        "eos_token_id": ckpt.eos_ids,
    });
    write_json(&out.join("generation_config.json"), &gen)?;
    write_json(&out.join("tokenizer.json"), &ckpt.tokenizer_json)?;
    write_json(&out.join("tokenizer_config.json"), &ckpt.tokenizer_config)?;
    log::info!(
        "wrote bundle \"{}\" ({} layers, {} MB of weights, {})",
        out.display(),
        p.layers,
        data_bytes / 1_000_000,
        opts.quant.name()
    );
    Ok(ConvertReport {
        layers: p.layers,
        data_bytes,
    })
}

/// Opens a `.gguf` file or a Hugging Face checkpoint directory.
pub fn open_checkpoint(input: &Path) -> Result<Checkpoint> {
    if input.is_dir() {
        return safetensors::open_hf_dir(input);
    }
    if !input.exists() {
        bail!("input \"{}\" does not exist", input.display());
    }
    from_gguf::open(input)
}

fn config_json(ckpt: &Checkpoint, quant: Quant) -> serde_json::Value {
    let p = &ckpt.params;
    let edgelm = json!({
        "quantization": quant.name(),
        "block_size": llama::BLOCK,
        "converter": format!("edgelm {}", env!("CARGO_PKG_VERSION")),
    });
    if p.arch == Arch::Gpt2 {
        return json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": p.vocab,
            "n_embd": p.hidden,
            "n_inner": p.ffn,
            "n_layer": p.layers,
            "n_head": p.heads,
            "n_positions": p.max_positions,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": p.rms_eps,
            "tie_word_embeddings": p.tied_embeddings,
            "bos_token_id": ckpt.bos_id,
            "eos_token_id": ckpt.eos_ids,
            "edgelm": edgelm,
        });
    }
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": p.vocab,
        "hidden_size": p.hidden,
        "intermediate_size": p.ffn,
        "num_hidden_layers": p.layers,
        "num_attention_heads": p.heads,
        "num_key_value_heads": p.kv_heads,
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": p.max_positions,
        "rms_norm_eps": p.rms_eps,
        "rope_theta": p.rope_theta,
        "attention_bias": p.attention_bias,
        "tie_word_embeddings": p.tied_embeddings,
        "bos_token_id": ckpt.bos_id,
        "eos_token_id": ckpt.eos_ids,
        "edgelm": edgelm,
    })
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    std::fs::write(path, text).with_context(|| format!("writing \"{}\"", path.display()))
}

/// A one-line progress bar on stderr.
struct Progress {
    done: usize,
    total: usize,
    enabled: bool,
}

impl Progress {
    fn new(total: usize, enabled: bool) -> Progress {
        Progress {
            done: 0,
            total: total.max(1),
            enabled,
        }
    }

    fn tick(&mut self) {
        self.done += 1;
        if self.enabled {
            let width = 40;
            let filled = (self.done.min(self.total) * width) / self.total;
            eprint!(
                "\rconverting [{}{}] {}/{}",
                "#".repeat(filled),
                " ".repeat(width - filled),
                self.done,
                self.total
            );
        }
    }

    fn done(&mut self) {
        if self.enabled {
            eprintln!();
        }
    }
}
