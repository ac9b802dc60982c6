//! `edgelm bench`: load time, time to first token, prefill and decode speed, memory.
//!
//! Prompts are token ids cut from a fixed English text (repeated as needed), so every run
//! feeds the same ids; decoding is greedy with EOS ignored. Decode speed is the median of the
//! per-token times, which shrugs off a stray scheduler hiccup.
//!
//! With a format (`--format json`, `--json-schema FILE`, `--grammar FILE`) every decoded
//! token is the greedy choice among those the format allows: each step's time then includes
//! the mask and the masked pick, also reported alone (`mask_us`). When an output completes
//! the format, the next one starts, so any number of tokens can be decoded.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::json;

use crate::constraint::{Constraint, FormatSource, Matcher};
use crate::engine::Engine;
use crate::model::{CacheOptions, LoadOptions, State};
use crate::sampler::{argmax, Sampler, SamplerConfig};

/// What `edgelm bench` measures.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// The model bundle directory.
    pub model: PathBuf,
    /// Threads, int8 path and kernel.
    pub load: LoadOptions,
    /// The KV cache of every measured conversation.
    pub cache: CacheOptions,
    /// Prompt length for the prefill and first-token figures.
    pub prompt_tokens: usize,
    /// Tokens decoded for the decode figure.
    pub gen_tokens: usize,
    /// Decode under this format.
    pub format: Option<FormatSource>,
    /// One JSON object instead of a table.
    pub json: bool,
}

/// The text prompts are cut from.
const TEXT: &str = "The history of the Raspberry Pi begins in 2006, when a group at the \
University of Cambridge noticed that fewer students arrived with hands-on experience of \
programming. They set out to build a computer cheap enough to give away, small enough to \
carry in a pocket, and open enough to be taken apart. Early prototypes ran on a \
microcontroller; the final board used a mobile phone processor, a handful of connectors and a \
row of general-purpose pins that anyone could wire to a sensor, a motor or a light. ";

/// Cached tokens for the long-context decode figure.
const LONG_CONTEXT: usize = 1024;
/// Tokens decoded (and timed) at the long context, and as many at the prompt's length.
const LONG_DECODE: usize = 32;
/// Tokens per turn when decode at the long context and decode at the prompt's length take
/// turns: both then see the same machine (its other load, its clock), so their ratio holds
/// on a noisy one.
const BURST: usize = 4;
/// Timed prefills of the prompt after the first one (whose time is the time to first token).
const PREFILL_RUNS: usize = 3;

/// Runs `edgelm bench`, writing a table (or one JSON object) to `out`.
pub fn run(args: &BenchOptions, out: &mut dyn Write) -> Result<()> {
    ensure!(args.prompt_tokens > 0, "--prompt-tokens must be at least 1");
    ensure!(args.gen_tokens > 0, "--gen-tokens must be at least 1");
    let mut rss = RssWatch::default();
    let opts = &args.load;
    let format = args.format.as_ref().map(FormatSource::load).transpose()?;
    let t0 = Instant::now();
    let engine = Engine::load(&args.model, opts)?;
    let load = t0.elapsed();
    rss.sample();
    let constraint = format.map(|f| engine.compile(&f)).transpose()?;
    let mut picker = Picker::new(constraint.as_ref());

    let prompt = prompt_ids(&engine, args.prompt_tokens)?;
    let mut state = engine.model.new_state_with(args.cache)?;
    let t0 = Instant::now();
    let logits = state.forward(&prompt).context("prefill")?;
    let mut next = picker.pick(&logits)?;
    let ttft = t0.elapsed();
    rss.sample();

    let decode = decode_times(&mut state, &mut picker, &mut next, args.gen_tokens)?;
    let mask = picker.take_mask_times();
    rss.sample();
    let kv_cache_bytes = state.cache_bytes();
    drop(state);

    // Prefill speed warm, as llama-bench measures it (a warm-up run, then repetitions): the
    // first prefill above also pays for the first touch of the mapped weights and the plan's
    // first allocations, which the time to first token reports.
    let mut prefill = Vec::with_capacity(PREFILL_RUNS);
    for _ in 0..PREFILL_RUNS {
        let mut state = engine.model.new_state_with(args.cache)?;
        let t0 = Instant::now();
        state.forward(&prompt).context("prefill")?;
        prefill.push(t0.elapsed());
    }

    // Decode with a long history, when the model's context allows it, taking turns with
    // decode from the prompt alone (a second conversation).
    let long = if engine.model.config().max_position_embeddings >= LONG_CONTEXT + LONG_DECODE {
        let ids = prompt_ids(&engine, LONG_CONTEXT)?;
        let mut state = engine.model.new_state_with(args.cache)?;
        let mut picker = Picker::new(constraint.as_ref());
        for chunk in ids.chunks(256) {
            let logits = state.forward(chunk).context("filling the cache")?;
            next = picker.pick(&logits)?;
        }
        let mut short = engine.model.new_state_with(args.cache)?;
        let mut short_picker = Picker::new(constraint.as_ref());
        let logits = short.forward(&prompt).context("prefill")?;
        let mut short_next = short_picker.pick(&logits)?;
        rss.sample();
        let (mut at_long, mut at_short) = (Vec::new(), Vec::new());
        while at_long.len() < LONG_DECODE {
            let turn = BURST.min(LONG_DECODE - at_long.len());
            at_short.extend(decode_times(
                &mut short,
                &mut short_picker,
                &mut short_next,
                turn,
            )?);
            at_long.extend(decode_times(&mut state, &mut picker, &mut next, turn)?);
        }
        Some((at_long, at_short))
    } else {
        None
    };
    rss.sample();

    let config = engine.model.config();
    let kv_bytes_per_token = 2
        * config.num_hidden_layers
        * config.num_key_value_heads
        * config.head_dim
        * args.cache.kv.bytes();
    let report = json!({
        "model": args.model.display().to_string(),
        "threads": engine.model.threads(),
        "int8": format!("{:?}", opts.int8),
        "format": constraint.as_ref().map(|c| c.origin().to_string()),
        "load_ms": ms(load),
        "prompt_tokens": prompt.len(),
        "ttft_ms": ms(ttft),
        "prefill_tok_s": prompt.len() as f64 / median(&prefill).as_secs_f64(),
        "first_prefill_tok_s": prompt.len() as f64 / ttft.as_secs_f64(),
        "gen_tokens": decode.len(),
        "decode_tok_s": per_second(median(&decode)),
        "mask_us": constraint.as_ref().map(|_| median(&mask).as_secs_f64() * 1e6),
        "decode_tok_s_at_1024": long.as_ref().map(|(t, _)| per_second(median(t))),
        // Decode at 1024 cached over decode at the prompt's length, the two taking turns.
        "decode_ratio_at_1024": long
            .as_ref()
            .map(|(t, short)| median(short).as_secs_f64() / median(t).as_secs_f64()),
        "peak_rss_kb": rss.peak_kb,
        "anon_rss_kb": rss.peak_anon_kb,
        "model_bytes": model_bytes(&args.model)?,
        "kv_bytes_per_token": kv_bytes_per_token,
        "kv_cache_bytes": kv_cache_bytes,
        "ctx": args.cache.ctx,
        "kv": args.cache.kv.name(),
    });
    if args.json {
        writeln!(out, "{report}")?;
    } else if let Some(map) = report.as_object() {
        for (key, value) in map {
            writeln!(out, "{key:>22}  {value}")?;
        }
    }
    Ok(())
}

/// `n` token ids of the fixed text (no BOS: the prompt is cut at an arbitrary point).
fn prompt_ids(engine: &Engine, n: usize) -> Result<Vec<u32>> {
    let once = engine.encode_raw(TEXT)?;
    ensure!(!once.is_empty(), "the tokenizer produced no tokens");
    Ok(once.iter().copied().cycle().take(n).collect())
}

/// Decodes `n` tokens from `next`, returning each step's time (forward and pick).
fn decode_times(
    state: &mut State,
    picker: &mut Picker,
    next: &mut u32,
    n: usize,
) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let logits = state.forward(&[*next]).context("decode")?;
        *next = picker.pick(&logits)?;
        times.push(t0.elapsed());
    }
    Ok(times)
}

/// The greedy choice of the next token, among those a format allows when there is one.
struct Picker<'c> {
    constraint: Option<&'c Constraint>,
    matcher: Option<Matcher>,
    sampler: Sampler,
    mask_times: Vec<Duration>, // (picks,) mask, masked pick and advance
}

impl<'c> Picker<'c> {
    fn new(constraint: Option<&'c Constraint>) -> Picker<'c> {
        Picker {
            constraint,
            matcher: constraint.map(Constraint::matcher),
            sampler: Sampler::new(SamplerConfig::default()),
            mask_times: vec![],
        }
    }

    fn pick(&mut self, logits: &[f32]) -> Result<u32> {
        let (Some(constraint), Some(matcher)) = (self.constraint, self.matcher.as_mut()) else {
            return Ok(argmax(logits));
        };
        let t0 = Instant::now();
        if matcher.is_complete() {
            *matcher = constraint.matcher();
        }
        let id = match matcher.allowed()? {
            Some(allowed) => self.sampler.sample_masked(logits, &[], allowed),
            None => None,
        };
        let Some(id) = id else {
            anyhow::bail!("{} allows no token here", constraint.origin());
        };
        matcher.accept(id)?;
        self.mask_times.push(t0.elapsed());
        Ok(id)
    }

    fn take_mask_times(&mut self) -> Vec<Duration> {
        std::mem::take(&mut self.mask_times)
    }
}

fn median(times: &[Duration]) -> Duration {
    let mut t = times.to_vec();
    t.sort();
    t.get(t.len() / 2).copied().unwrap_or_default()
}

fn per_second(d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        1.0 / d.as_secs_f64()
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// Bytes of the bundle's graph and weight files (everything but JSON metadata).
fn model_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("listing {dir:?}"))? {
        let entry = entry.with_context(|| format!("listing {dir:?}"))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".onnx") || name.ends_with(".onnx_data") || name.ends_with(".data") {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

/// Peak resident and anonymous memory, from `/proc/self/status` (Linux; zeros elsewhere).
#[derive(Default)]
struct RssWatch {
    peak_kb: u64,
    peak_anon_kb: u64,
}

impl RssWatch {
    fn sample(&mut self) {
        let Ok(status) = fs::read_to_string("/proc/self/status") else {
            return;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        };
        // VmHWM is the kernel's own high-water mark; RssAnon has none, so it is sampled.
        if let Some(hwm) = field("VmHWM:") {
            self.peak_kb = self.peak_kb.max(hwm);
        }
        if let Some(anon) = field("RssAnon:") {
            self.peak_anon_kb = self.peak_anon_kb.max(anon);
        }
    }
}
