//! `edgelm convert`: GGUF and Hugging Face safetensors checkpoints into an ONNX bundle.
//!
//! A bundle is a directory in the Hugging Face ONNX export layout: `model.onnx` +
//! `model.onnx_data` (weights, 64-byte aligned), `config.json`, `generation_config.json`,
//! `tokenizer.json`, `tokenizer_config.json`.

//!
//! Reading a checkpoint (`from_gguf.rs` over `gguf/`, `safetensors.rs`) and writing the graph
//! (`decoder.rs` over `onnx.rs`, `rope.rs`) are shared; a model family (`llama.rs`,
//! `qwen.rs`, `gpt2.rs`) only maps its checkpoints' keys and tensor names onto the decoder's
//! parameters ([`family::Family`]).
//!
//! Nothing that changes the model's maths is skipped: a configuration key or GGUF metadata
//! key its family does not list, or a tensor the graph does not read, is a one-line error
//! naming it.

pub mod decoder;
pub mod family;
pub mod from_gguf;
pub mod gemma;
pub mod gguf;
pub mod gpt2;
pub mod llama;
pub mod onnx;
pub mod params;
mod progress;
pub mod qwen;
pub mod rope;
pub mod safetensors;
mod split;
pub mod vocab;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::quant::BLOCK;
use decoder::DecoderParams;
use family::Family;
use onnx::{ExternalData, GraphBuilder};
use progress::Progress;

/// The model families `edgelm convert` reads, in the order error messages list them.
pub const FAMILIES: [&Family; 5] = [
    &llama::FAMILY,
    &qwen::QWEN2,
    &qwen::QWEN3,
    &gemma::GEMMA3,
    &gpt2::FAMILY,
];

/// How the bundle stores linear-layer and embedding weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

impl FromStr for Quant {
    type Err = String;

    fn from_str(s: &str) -> Result<Quant, String> {
        match s {
            "int8" => Ok(Quant::Int8),
            "f32" => Ok(Quant::F32),
            _ => Err(format!(
                "unknown weight storage \"{s}\" (expected int8 or f32)"
            )),
        }
    }
}

impl fmt::Display for Quant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How an int8 bundle lays out each matrix's blocks (the graph reads the same (n, k) values
/// from either; see [`onnx::GraphBuilder::dequantized_q8`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Int8Layout {
    /// The int8 GEMM's interleaved groups of 16 rows (`quant::gemm`), read in place by both
    /// prompts and decode.
    #[default]
    Tiled,
    /// Row-major (n, k) blocks.
    Rows,
}

impl Int8Layout {
    /// The name recorded in the bundle's config and taken by `--int8-layout`.
    pub fn name(self) -> &'static str {
        match self {
            Int8Layout::Tiled => "tiled",
            Int8Layout::Rows => "rows",
        }
    }
}

impl FromStr for Int8Layout {
    type Err = String;

    fn from_str(s: &str) -> Result<Int8Layout, String> {
        match s {
            "tiled" => Ok(Int8Layout::Tiled),
            "rows" => Ok(Int8Layout::Rows),
            _ => Err(format!(
                "unknown int8 layout \"{s}\" (expected tiled or rows)"
            )),
        }
    }
}

impl fmt::Display for Int8Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A dense f32 tensor in row-major order.
pub struct Weight {
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Values, `shape.iter().product()` of them.
    pub data: Vec<f32>,
}

impl Weight {
    /// This 2-D (r, c) weight as (c, r).
    pub fn transposed(&self) -> Weight {
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut data = vec![0f32; r * c]; // (c, r)
        for i in 0..r {
            for j in 0..c {
                data[j * r + i] = self.data[i * c + j];
            }
        }
        Weight {
            shape: vec![c, r],
            data,
        }
    }
}

/// An (n, k) weight as int8 blocks of 32 along k, each with an f32 scale (the Q8_0 scheme).
#[derive(Clone, Debug, PartialEq)]
pub struct Q8Blocks {
    /// (n, k).
    pub shape: [usize; 2],
    /// The int8 values as two's-complement bytes, (n, k).
    pub q: Vec<u8>,
    /// One scale per block, (n, k / 32).
    pub scales: Vec<f32>,
}

/// A checkpoint's tensors by their Hugging Face name (`model.layers.0.self_attn.q_proj.weight`).
pub trait WeightSource {
    /// The tensor dequantized to f32, or `None` if the checkpoint has no such tensor.
    fn tensor(&self, name: &str) -> Result<Option<Weight>>;

    /// The 2-D tensor as the checkpoint's own Q8_0 blocks, bit for bit (rows may be
    /// reordered, values never), copied on `threads` threads, or `None` when it is not
    /// stored as Q8_0 or cannot be carried over so.
    fn q8_0(&self, name: &str, threads: usize) -> Result<Option<Q8Blocks>> {
        let _ = (name, threads);
        Ok(None)
    }

    /// The checkpoint's tensors never read so far, by their names in the checkpoint, except
    /// those known not to change the model.
    fn unread(&self) -> Vec<String>;
}

/// Everything the bundle writer needs from a checkpoint.
pub struct Checkpoint {
    /// Architecture hyper-parameters.
    pub params: DecoderParams,
    /// The family it belongs to.
    pub family: &'static Family,
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
    /// Layout of int8 matrices (int8 bundles only).
    pub int8_layout: Int8Layout,
    /// Threads converting tensors, the caller's included; 0 = one per core.
    pub threads: usize,
    /// Report progress on stderr: a bar on a terminal, plain lines otherwise.
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
    let p = &ckpt.params;
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut progress = Progress::new(p.layers + 2, opts.progress);
    let mut g = GraphBuilder::new(data);
    g.set_int8_layout(opts.int8_layout);
    let g = decoder::write_graph(
        g,
        p,
        &ckpt.family.layout,
        opts.quant,
        threads,
        ckpt.weights.as_ref(),
        &mut || progress.tick(),
    )?;
    let unread = ckpt.weights.unread();
    if let Some(name) = unread.first() {
        let more = match unread.len() {
            1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        bail!(
            "\"{}\": tensor \"{name}\"{more} is not understood (leaving it out would change the model)",
            opts.input.display()
        );
    }
    let graph_name = ckpt.family.graph_name;
    let data_bytes = g.finish(&out.join("model.onnx"), graph_name)?;
    write_json(&out.join("config.json"), &config_json(&ckpt, opts))?;
    let gen = json!({
        "bos_token_id": ckpt.bos_id,
        "eos_token_id": ckpt.eos_ids,
    });
    write_json(&out.join("generation_config.json"), &gen)?;
    write_json(&out.join("tokenizer.json"), &ckpt.tokenizer_json)?;
    write_json(&out.join("tokenizer_config.json"), &ckpt.tokenizer_config)?;
    progress.finish(&format!(
        "wrote \"{}\": {} layers, {} MB of {} weights",
        out.display(),
        p.layers,
        data_bytes / 1_000_000,
        opts.quant.name()
    ));
    Ok(ConvertReport {
        layers: p.layers,
        data_bytes,
    })
}

/// Opens a `.gguf` file or a Hugging Face checkpoint directory.
pub fn open_checkpoint(input: &Path) -> Result<Checkpoint> {
    if input.is_dir() {
        return safetensors::open_hf_dir(input, &FAMILIES);
    }
    if !input.exists() {
        bail!("input \"{}\" does not exist", input.display());
    }
    from_gguf::open(input, &FAMILIES)
}

fn config_json(ckpt: &Checkpoint, opts: &ConvertOptions) -> serde_json::Value {
    let mut edgelm = json!({
        "quantization": opts.quant.name(),
        "block_size": BLOCK,
        "converter": format!("edgelm {}", env!("CARGO_PKG_VERSION")),
    });
    if opts.quant == Quant::Int8 {
        edgelm["int8_layout"] = json!(opts.int8_layout.name());
    }
    (ckpt.family.config_json)(&ckpt.params, ckpt.bos_id, &ckpt.eos_ids, edgelm)
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    std::fs::write(path, text).with_context(|| format!("writing \"{}\"", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposed_swaps_rows_and_columns() {
        // (2, 3) → (3, 2).
        let w = Weight {
            shape: vec![2, 3],
            data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        };
        let t = w.transposed();
        assert_eq!(t.shape, vec![3, 2]);
        assert_eq!(t.data, vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }

    #[test]
    fn quant_parses_what_it_prints() {
        for q in [Quant::Int8, Quant::F32] {
            assert_eq!(q.to_string().parse::<Quant>(), Ok(q));
        }
        assert_eq!(
            "q4".parse::<Quant>(),
            Err("unknown weight storage \"q4\" (expected int8 or f32)".to_string())
        );
    }
}
