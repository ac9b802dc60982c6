//! Command-line types (clap) and their translation into library options.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::convert::{ConvertOptions, Quant};
use crate::kv_cache::KvType;
use crate::model::{CacheOptions, DEFAULT_KEEP};
use crate::model::{Int8Path, LoadOptions};
use crate::protocol::{StreamMode, DEFAULT_LINE_LIMIT, MAX_LINE_LIMIT, MIN_LINE_LIMIT};
use crate::quant::Kernel;
use crate::sampler::SamplerConfig;
use crate::serve::{ServeOptions, Settings};
use crate::transport::{FlowControl, SerialConfig};

/// Default bundle directory, relative to the working directory.
pub const DEFAULT_MODEL_DIR: &str = "models/smollm2-135m-instruct";

/// edgelm: a small language model on a Raspberry Pi-class board, over a serial line.
#[derive(Parser, Debug)]
#[command(name = "edgelm", version, about)]
pub struct Cli {
    /// More log output on stderr (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate text from one prompt, streamed to stdout.
    Run(RunArgs),
    /// Talk with the model in the terminal; the KV cache is kept between turns.
    Chat(ChatArgs),
    /// Convert a GGUF file or Hugging Face checkpoint directory into an ONNX bundle.
    Convert(ConvertArgs),
    /// Measure load time, first-token latency, prefill and decode speed, and memory.
    Bench(BenchArgs),
    /// Serve the line protocol (PROTOCOL.md) on stdin/stdout or a serial port.
    Serve(ServeArgs),
    /// Describe a bundle: architecture, sizes, quantization, context, special tokens, and
    /// which fast paths (int8 operators, ring-buffer KV cache) it gets.
    Info(InfoArgs),
}

/// `edgelm info` flags.
#[derive(Args, Debug, Clone)]
pub struct InfoArgs {
    /// Model and threads.
    #[command(flatten)]
    pub model: ModelArgs,
}

/// `edgelm bench` flags.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Model and threads.
    #[command(flatten)]
    pub model: ModelArgs,
    /// KV cache.
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Prompt length for the prefill and first-token figures.
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    /// Tokens decoded for the decode figure.
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Where the model bundle is and how to run it.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model bundle directory.
    #[arg(short, long, env = "EDGELM_MODEL", default_value = DEFAULT_MODEL_DIR)]
    pub model: PathBuf,
    /// Worker threads for the matrix kernels (0 = one per core).
    #[arg(short, long, default_value_t = 0)]
    pub threads: usize,
    /// How int8 weights run: f32 activations (q8f32), int8 activations as llama.cpp (q8q8),
    /// int16 activations (q8q16), or dequantized to f32 by tract at load (fold).
    #[arg(long, value_enum, default_value_t = Int8Arg::Q8f32)]
    pub int8: Int8Arg,
    /// Force a kernel variant (scalar, avx2, avx512, neon, dotprod); default: the best this CPU
    /// has.
    #[arg(long, env = "EDGELM_KERNEL")]
    pub kernel: Option<String>,
}

/// `--int8` values.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Arg {
    /// int8 weights in place, f32 activations.
    Q8f32,
    /// int8 weights and per-block int8 activations (llama.cpp's Q8_0 path).
    Q8q8,
    /// int8 weights and per-block int16 activations.
    Q8q16,
    /// The tiled GEMM, 15-bit activations (experiment: weights re-laid on the heap).
    Q8q15,
    /// The tiled GEMM, int8 activations (experiment: weights re-laid on the heap).
    Q8q8t,
    /// Dequantize to f32 at load and let tract run them.
    Fold,
}

impl ModelArgs {
    /// The library's load options for these flags.
    pub fn load_options(&self) -> anyhow::Result<LoadOptions> {
        let kernel = match self.kernel.as_deref() {
            None | Some("") => None,
            Some(name) => Some(name.parse::<Kernel>()?.checked()?),
        };
        Ok(LoadOptions {
            threads: self.threads,
            int8: match self.int8 {
                Int8Arg::Q8f32 => Int8Path::Q8F32,
                Int8Arg::Q8q8 => Int8Path::Q8Q8,
                Int8Arg::Q8q16 => Int8Path::Q8Q16,
                Int8Arg::Q8q15 => Int8Path::Q8Q15Tiled,
                Int8Arg::Q8q8t => Int8Path::Q8Q8Tiled,
                Int8Arg::Fold => Int8Path::Fold,
            },
            kernel,
        })
    }
}

/// KV cache flags, shared by the commands that generate.
#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    /// KV cache slots (0 = the smaller of the model's context and 2048); when full, the
    /// oldest tokens after the first --keep are dropped (and reported).
    #[arg(long, default_value_t = 0)]
    pub ctx: usize,
    /// KV cache storage: f16 halves its memory.
    #[arg(long, value_enum, default_value_t = KvType::F32)]
    pub kv: KvType,
    /// First tokens never dropped when the cache is full.
    #[arg(long, default_value_t = DEFAULT_KEEP)]
    pub keep: usize,
}

impl CacheArgs {
    /// The cache these flags describe.
    pub fn to_options(&self) -> CacheOptions {
        CacheOptions {
            ctx: self.ctx,
            kv: self.kv,
            keep: self.keep,
        }
    }
}

/// Sampling flags, shared by the commands that generate.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches P (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Drop tokens less likely than P times the most likely one (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Penalise tokens seen in the last `--penalty-window` tokens (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Subtract this from the logits of tokens already seen (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// How many recent tokens the penalties look at.
    #[arg(long, default_value_t = 64)]
    pub penalty_window: usize,
    /// Random seed: the same seed gives the same text.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl SamplingArgs {
    /// The sampler these flags describe.
    pub fn to_config(&self) -> SamplerConfig {
        SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            presence_penalty: self.presence_penalty,
            penalty_window: self.penalty_window,
            seed: self.seed,
        }
    }
}

/// `edgelm run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The bundle.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sampling.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// KV cache.
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Maximum number of new tokens.
    #[arg(short = 'n', long = "max-tokens", default_value_t = 256)]
    pub max_tokens: usize,
    /// Wrap the prompt in the model's chat template as one user turn.
    #[arg(long)]
    pub chat: bool,
    /// System prompt for --chat (default: the template's own).
    #[arg(long)]
    pub system: Option<String>,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating through end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object per token and a final summary line instead of text.
    #[arg(long)]
    pub json: bool,
    /// Continue the conversation saved in FILE (its cache settings replace --ctx/--kv/--keep).
    #[arg(long, value_name = "FILE")]
    pub load_session: Option<PathBuf>,
    /// Save the conversation (tokens and KV cache) to FILE at the end.
    #[arg(long, value_name = "FILE")]
    pub save_session: Option<PathBuf>,
    /// The prompt.
    pub prompt: String,
}

/// `edgelm chat`.
#[derive(Args, Debug)]
pub struct ChatArgs {
    /// The bundle.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sampling.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// KV cache.
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Maximum number of new tokens per reply.
    #[arg(short = 'n', long = "max-tokens", default_value_t = 512)]
    pub max_tokens: usize,
    /// System prompt (default: the template's own).
    #[arg(long)]
    pub system: Option<String>,
    /// Stop a reply before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

/// `edgelm convert`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// A `.gguf` file or a Hugging Face checkpoint directory.
    pub input: PathBuf,
    /// Output bundle directory.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Weight storage in the bundle.
    #[arg(long, value_enum, default_value_t = Quant::Int8)]
    pub quant: Quant,
}

impl ConvertArgs {
    /// The converter options these flags describe.
    pub fn to_options(&self) -> ConvertOptions {
        ConvertOptions {
            input: self.input.clone(),
            output: self.output.clone(),
            quant: self.quant,
            progress: true,
        }
    }
}

/// `edgelm serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The bundle.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sampling defaults (changeable per session with SET).
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// The KV cache.
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Default cap on new tokens per request.
    #[arg(short = 'n', long = "max-tokens", default_value_t = 256)]
    pub max_tokens: usize,
    /// Serial device to serve on (default: stdin/stdout).
    #[arg(long, value_name = "DEV")]
    pub serial: Option<PathBuf>,
    /// Serial speed in bits per second.
    #[arg(long, default_value_t = 115200)]
    pub baud: u32,
    /// Serial flow control.
    #[arg(long, value_enum, default_value_t = FlowControl::None)]
    pub flow: FlowControl,
    /// Echo input and show a `> ` prompt, with CRLF line ends (for terminals that do not echo).
    #[arg(long)]
    pub echo: bool,
    /// Longest request line in bytes.
    #[arg(long, default_value_t = DEFAULT_LINE_LIMIT as u64,
          value_parser = clap::value_parser!(u64).range(MIN_LINE_LIMIT as u64..=MAX_LINE_LIMIT as u64))]
    pub max_line: u64,
    /// First wait before reopening a lost serial device, in ms (doubles up to 5 s).
    #[arg(long, default_value_t = 250)]
    pub reconnect_ms: u64,
}

impl ServeArgs {
    /// The serve options these flags describe.
    pub fn to_options(&self) -> anyhow::Result<ServeOptions> {
        Ok(ServeOptions {
            model: self.model.model.clone(),
            load: self.model.load_options()?,
            serial: self.serial.as_ref().map(|path| SerialConfig {
                path: path.clone(),
                baud: self.baud,
                flow: self.flow,
                backoff: std::time::Duration::from_millis(self.reconnect_ms.max(1)),
            }),
            echo: self.echo,
            line_limit: self.max_line as usize,
            settings: Settings {
                sampler: self.sampling.to_config(),
                max_tokens: self.max_tokens.max(1),
                stop: vec![],
                stream: StreamMode::Escaped,
                coalesce_ms: 0,
                ignore_eos: false,
            },
            cache: self.cache.to_options(),
        })
    }
}
