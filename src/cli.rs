//! Command-line types (clap) and their translation into library options.

use std::path::PathBuf;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};

use crate::bench::BenchOptions;
use crate::chat::ChatOptions;
use crate::constraint::FormatSource;
use crate::convert::{ConvertOptions, Int8Layout, Quant};
use crate::info::InfoOptions;
use crate::kv_cache::KvType;
use crate::model::{CacheOptions, LoadOptions, DEFAULT_KEEP};
use crate::protocol::{StreamMode, DEFAULT_LINE_LIMIT, MAX_LINE_LIMIT, MIN_LINE_LIMIT};
use crate::quant::{Kernel, Scheme};
use crate::run::RunOptions;
use crate::sampler::SamplerConfig;
use crate::serve::{NamedFormat, ServeOptions, Settings};
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
    /// Print the token ids of a text, space-separated, on one line.
    Tokenize(TokenizeArgs),
    /// Print the prompt the chat template makes of one user turn, exactly.
    Template(TemplateArgs),
    /// Perplexity of a text file, computed as llama.cpp's llama-perplexity does.
    Perplexity(PerplexityArgs),
}

/// `edgelm info` flags.
#[derive(Args, Debug, Clone)]
pub struct InfoArgs {
    /// Model and threads.
    #[command(flatten)]
    pub model: ModelArgs,
}

impl InfoArgs {
    /// The info options these flags describe.
    pub fn to_options(&self) -> anyhow::Result<InfoOptions> {
        Ok(InfoOptions {
            model: self.model.model.clone(),
            load: self.model.load_options()?,
        })
    }
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
    /// Decode under a format (the mask is computed and applied at every token).
    #[command(flatten)]
    pub format: FormatArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl BenchArgs {
    /// The bench options these flags describe.
    pub fn to_options(&self) -> anyhow::Result<BenchOptions> {
        Ok(BenchOptions {
            model: self.model.model.clone(),
            load: self.model.load_options()?,
            cache: self.cache.to_options(),
            prompt_tokens: self.prompt_tokens,
            gen_tokens: self.gen_tokens,
            format: self.format.to_source(),
            json: self.json,
        })
    }
}

/// Where the model bundle is and how to run it.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model bundle directory.
    #[arg(short, long, env = "EDGELM_MODEL", default_value = DEFAULT_MODEL_DIR)]
    pub model: PathBuf,
    /// Compute threads, the main one included (0 = one per core).
    #[arg(short, long, default_value_t = 0)]
    pub threads: usize,
    /// How int8 weights run: by their layout (auto: q8q15 on a tiled bundle, q8f32 on a
    /// row-major one), f32 activations (q8f32), int16 activations (q8q16, row-major bundles
    /// only), int8 activations as llama.cpp (q8q8), prompts on the tiled GEMM with 15-bit
    /// activations (q8q15; a row-major bundle's weights copied to the heap), or dequantized
    /// to f32 by tract at load (fold).
    #[arg(long, value_name = "auto|q8f32|q8q16|q8q8|q8q15|fold", default_value_t = Scheme::Auto,
          value_parser = clap::value_parser!(Scheme))]
    pub int8: Scheme,
    /// Force a kernel variant for the int8 products and the attention (scalar, avx2, avx512,
    /// neon, dotprod); default: $EDGELM_KERNEL, else the best this CPU has.
    #[arg(long, value_name = "scalar|avx2|avx512|neon|dotprod",
          value_parser = clap::value_parser!(Kernel))]
    pub kernel: Option<Kernel>,
}

impl ModelArgs {
    /// The library's load options for these flags.
    pub fn load_options(&self) -> anyhow::Result<LoadOptions> {
        Ok(LoadOptions {
            threads: self.threads,
            int8: self.int8,
            kernel: self.kernel,
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
    /// KV cache storage: f16 (the default) takes half the memory of f32.
    #[arg(long, value_parser = kv_type(), default_value_t = KvType::default())]
    pub kv: KvType,
    /// First tokens never dropped when the cache is full.
    #[arg(long, default_value_t = DEFAULT_KEEP)]
    pub keep: usize,
}

/// `--kv` values, listed in `--help` and checked by clap.
fn kv_type() -> impl TypedValueParser<Value = KvType> {
    PossibleValuesParser::new(KvType::ALL.map(|t| {
        PossibleValue::new(t.name()).help(match t {
            KvType::F32 => "4 bytes per value (exact)",
            KvType::F16 => {
                "2 bytes per value (the default): half the memory, values rounded to half precision"
            }
        })
    }))
    .try_map(|name| name.parse::<KvType>())
}

/// `--flow` values, listed in `--help` and checked by clap.
fn flow_control() -> impl TypedValueParser<Value = FlowControl> {
    PossibleValuesParser::new(FlowControl::ALL.map(|f| {
        PossibleValue::new(f.name()).help(match f {
            FlowControl::None => "None (the default: three-wire TX/RX/GND)",
            FlowControl::XonXoff => "Software flow control: XON/XOFF bytes, handled by the kernel",
            FlowControl::RtsCts => "Hardware flow control on the RTS/CTS lines",
        })
    }))
    .try_map(|name| name.parse::<FlowControl>())
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

/// Output format flags of `run`, `chat` and `bench`: at most one.
#[derive(Args, Debug, Clone)]
#[group(multiple = false)]
pub struct FormatArgs {
    /// Constrain the output to a JSON object (any keys; `-n` still caps its length).
    #[arg(long, value_name = "json", value_parser = ["json"])]
    pub format: Option<String>,
    /// Constrain the output to the JSON schema in FILE.
    #[arg(long, value_name = "FILE")]
    pub json_schema: Option<PathBuf>,
    /// Constrain the output to the grammar in FILE (llguidance's Lark-like syntax, with a
    /// `start` rule; llama.cpp's GBNF is not accepted).
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<PathBuf>,
}

impl FormatArgs {
    /// The format these flags name, if any.
    pub fn to_source(&self) -> Option<FormatSource> {
        if let Some(path) = &self.json_schema {
            Some(FormatSource::JsonSchema(path.clone()))
        } else if let Some(path) = &self.grammar {
            Some(FormatSource::Grammar(path.clone()))
        } else {
            self.format.as_ref().map(|_| FormatSource::Json)
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
    /// The prompt is a user turn: rendered with the chat template after the conversation of
    /// --load-session, if given.
    #[arg(long)]
    pub chat: bool,
    /// Use the Jinja chat template in FILE instead of the model's.
    #[arg(long, value_name = "FILE", requires = "chat")]
    pub chat_template_file: Option<PathBuf>,
    /// System prompt for --chat (default: the loaded conversation's, else the template's own).
    #[arg(long)]
    pub system: Option<String>,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating through end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Constrain the output to a format.
    #[command(flatten)]
    pub format: FormatArgs,
    /// Print one JSON object per token and a final summary line instead of text.
    #[arg(long)]
    pub json: bool,
    /// Continue the session saved in FILE: a conversation with --chat, else a raw completion
    /// (its cache settings replace --ctx/--kv/--keep).
    #[arg(long, value_name = "FILE")]
    pub load_session: Option<PathBuf>,
    /// Save the session (the conversation with --chat, the KV cache and its tokens) to FILE
    /// at the end.
    #[arg(long, value_name = "FILE")]
    pub save_session: Option<PathBuf>,
    /// The prompt.
    pub prompt: String,
}

impl RunArgs {
    /// The run options these flags describe.
    pub fn to_options(&self) -> anyhow::Result<RunOptions> {
        Ok(RunOptions {
            model: self.model.model.clone(),
            load: self.model.load_options()?,
            cache: self.cache.to_options(),
            sampler: self.sampling.to_config(),
            max_tokens: self.max_tokens,
            chat: self.chat,
            chat_template_file: self.chat_template_file.clone(),
            system: self.system.clone(),
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            format: self.format.to_source(),
            json: self.json,
            load_session: self.load_session.clone(),
            save_session: self.save_session.clone(),
            prompt: self.prompt.clone(),
        })
    }
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
    /// Use the Jinja chat template in FILE instead of the model's.
    #[arg(long, value_name = "FILE")]
    pub chat_template_file: Option<PathBuf>,
    /// System prompt (default: the loaded conversation's, else the template's own).
    #[arg(long)]
    pub system: Option<String>,
    /// Stop a reply before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Continue the conversation saved in FILE (its cache settings replace --ctx/--kv/--keep).
    #[arg(long, value_name = "FILE")]
    pub load_session: Option<PathBuf>,
    /// Save the conversation to FILE after every reply and /reset.
    #[arg(long, value_name = "FILE")]
    pub save_session: Option<PathBuf>,
    /// Constrain every reply to a format.
    #[command(flatten)]
    pub format: FormatArgs,
}

impl ChatArgs {
    /// The chat options these flags describe.
    pub fn to_options(&self) -> anyhow::Result<ChatOptions> {
        Ok(ChatOptions {
            model: self.model.model.clone(),
            load: self.model.load_options()?,
            cache: self.cache.to_options(),
            sampler: self.sampling.to_config(),
            max_tokens: self.max_tokens,
            chat_template_file: self.chat_template_file.clone(),
            system: self.system.clone(),
            stop: self.stop.clone(),
            load_session: self.load_session.clone(),
            save_session: self.save_session.clone(),
            format: self.format.to_source(),
        })
    }
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
    #[arg(long, default_value_t = Quant::Int8)]
    pub quant: Quant,
    /// Layout of int8 matrices: `tiled` (the int8 GEMM's, read in place by prompts and
    /// decode) or `rows` (row-major; the only one `--int8 q8q16` runs on).
    #[arg(long, default_value_t = Int8Layout::Tiled)]
    pub int8_layout: Int8Layout,
    /// Threads converting tensors, the main one included (0 = one per core).
    #[arg(short, long, default_value_t = 0)]
    pub threads: usize,
}

impl ConvertArgs {
    /// The converter options these flags describe.
    pub fn to_options(&self) -> ConvertOptions {
        ConvertOptions {
            input: self.input.clone(),
            output: self.output.clone(),
            quant: self.quant,
            int8_layout: self.int8_layout,
            threads: self.threads,
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
    /// Use the Jinja chat template in FILE for CHAT instead of the model's.
    #[arg(long, value_name = "FILE")]
    pub chat_template_file: Option<PathBuf>,
    /// Serial device to serve on (default: stdin/stdout).
    #[arg(long, value_name = "DEV")]
    pub serial: Option<PathBuf>,
    /// Serial speed in bits per second.
    #[arg(long, default_value_t = 115200)]
    pub baud: u32,
    /// Serial flow control.
    #[arg(long, value_parser = flow_control(), default_value_t = FlowControl::None)]
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
    /// A grammar clients can select with `SET format NAME` (repeatable; llguidance's
    /// Lark-like syntax). Compiled at start.
    #[arg(long, value_name = "NAME=FILE")]
    pub grammar: Vec<String>,
    /// A JSON schema clients can select with `SET format NAME` (repeatable). Compiled at
    /// start.
    #[arg(long, value_name = "NAME=FILE")]
    pub json_schema: Vec<String>,
    /// The format every session starts with: off, json (any JSON object) or a NAME above.
    #[arg(long, value_name = "off|json|NAME", default_value = "off")]
    pub format: String,
}

impl ServeArgs {
    /// The serve options these flags describe.
    pub fn to_options(&self) -> anyhow::Result<ServeOptions> {
        let mut formats = vec![];
        for arg in &self.json_schema {
            formats.push(NamedFormat::parse(
                "--json-schema",
                arg,
                FormatSource::JsonSchema,
            )?);
        }
        for arg in &self.grammar {
            formats.push(NamedFormat::parse("--grammar", arg, FormatSource::Grammar)?);
        }
        let format = (!self.format.eq_ignore_ascii_case("off")).then(|| self.format.clone());
        Ok(ServeOptions {
            model: self.model.model.clone(),
            load: self.model.load_options()?,
            chat_template_file: self.chat_template_file.clone(),
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
                format,
            },
            cache: self.cache.to_options(),
            formats,
        })
    }
}

/// `edgelm tokenize`.
#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("input").required(true).args(["file", "text"]))]
pub struct TokenizeArgs {
    /// A model bundle directory or a `.gguf` file (a vocabulary-only GGUF is enough).
    #[arg(short, long, env = "EDGELM_MODEL", default_value = DEFAULT_MODEL_DIR)]
    pub model: PathBuf,
    /// Read the text from FILE (UTF-8, taken as it is).
    #[arg(short, long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Add what the model adds around a raw prompt (its BOS token, if it uses one), as `run`
    /// does.
    #[arg(long)]
    pub bos: bool,
    /// Turn special-token text such as `<|im_start|>` into its token (default: plain text).
    #[arg(long)]
    pub special: bool,
    /// The text.
    pub text: Option<String>,
}

impl TokenizeArgs {
    /// The tokenize options these flags describe.
    pub fn to_options(&self) -> crate::tokenize::TokenizeOptions {
        use crate::tokenize::{TokenizeInput, TokenizeOptions};
        let input = match (&self.file, &self.text) {
            (Some(file), _) => TokenizeInput::File(file.clone()),
            (None, text) => TokenizeInput::Text(text.clone().unwrap_or_default()),
        };
        TokenizeOptions {
            model: self.model.clone(),
            input,
            bos: self.bos,
            special: self.special,
        }
    }
}

/// `edgelm template`.
#[derive(Args, Debug)]
pub struct TemplateArgs {
    /// A model bundle directory or a `.gguf` file: its chat template and special tokens.
    #[arg(short, long, env = "EDGELM_MODEL", default_value = DEFAULT_MODEL_DIR)]
    pub model: PathBuf,
    /// Use the Jinja chat template in FILE instead of the model's.
    #[arg(long, value_name = "FILE")]
    pub chat_template_file: Option<PathBuf>,
    /// A system turn before the user's.
    #[arg(long)]
    pub system: Option<String>,
    /// The date (and time, UTC) that `strftime_now` gives the template: YYYY-MM-DD or
    /// YYYY-MM-DDTHH:MM:SS (default: now).
    #[arg(long, value_name = "DATE")]
    pub date: Option<String>,
    /// The user's turn.
    pub text: String,
}

impl TemplateArgs {
    /// The template options these flags describe.
    pub fn to_options(&self) -> anyhow::Result<crate::template::prompt::TemplateOptions> {
        use crate::template::prompt::{parse_time, TemplateOptions};
        Ok(TemplateOptions {
            model: self.model.clone(),
            template_file: self.chat_template_file.clone(),
            system: self.system.clone(),
            text: self.text.clone(),
            now: self.date.as_deref().map(parse_time).transpose()?,
        })
    }
}

/// `edgelm perplexity`.
#[derive(Args, Debug)]
pub struct PerplexityArgs {
    /// The bundle.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text file (UTF-8).
    #[arg(short, long, value_name = "FILE")]
    pub file: PathBuf,
    /// Tokens per chunk; the second half of each chunk is scored.
    #[arg(long, default_value_t = crate::perplexity::DEFAULT_CTX)]
    pub ctx: usize,
}

impl PerplexityArgs {
    /// The perplexity options these flags describe.
    pub fn to_options(&self) -> anyhow::Result<crate::perplexity::PerplexityOptions> {
        Ok(crate::perplexity::PerplexityOptions {
            model: self.model.model.clone(),
            load: self.model.load_options()?,
            file: self.file.clone(),
            ctx: self.ctx,
        })
    }
}
