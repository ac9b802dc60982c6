//! `edgelm run`: one prompt in, streamed text (or JSON lines) out.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::engine::Engine;
use crate::generate::{generate_events, Event, Flow, GenerateOptions};
use crate::model::{CacheOptions, LoadOptions};
use crate::sampler::SamplerConfig;
use crate::session;
use crate::signal;
use crate::template::Message;

/// What `edgelm run` runs with.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The model bundle directory.
    pub model: PathBuf,
    /// Threads, int8 path and kernel.
    pub load: LoadOptions,
    /// The KV cache (`--ctx`, `--kv`, `--keep`); a loaded session brings its own.
    pub cache: CacheOptions,
    /// Sampling.
    pub sampler: SamplerConfig,
    /// Cap on new tokens.
    pub max_tokens: usize,
    /// Render the prompt as one user turn with the chat template.
    pub chat: bool,
    /// System prompt for `chat` (`None`: the template's own).
    pub system: Option<String>,
    /// Generation stops before any of these strings.
    pub stop: Vec<String>,
    /// Generate through end-of-sequence tokens.
    pub ignore_eos: bool,
    /// One JSON object per token and a summary line instead of text.
    pub json: bool,
    /// Continue the session saved in this file.
    pub load_session: Option<PathBuf>,
    /// Save the session to this file at the end.
    pub save_session: Option<PathBuf>,
    /// The prompt.
    pub prompt: String,
}

/// Runs the `run` command, writing to `out`.
pub fn run(args: &RunOptions, out: &mut dyn Write) -> Result<()> {
    if args.prompt.trim().is_empty() {
        bail!("the prompt is empty");
    }
    let engine = Engine::load(&args.model, &args.load)?;
    let prompt = if args.chat {
        let mut messages = vec![];
        if let Some(system) = &args.system {
            messages.push(Message {
                role: "system".into(),
                content: system.clone(),
            });
        }
        messages.push(Message {
            role: "user".into(),
            content: args.prompt.clone(),
        });
        engine.encode_chat(&messages)?
    } else {
        engine.encode_raw(&args.prompt)?
    };
    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        sampler: args.sampler.clone(),
        stop: args.stop.clone(),
        eos_ids: engine.eos_ids(),
        ignore_eos: args.ignore_eos,
    };
    let mut state = match &args.load_session {
        Some(path) => session::load(&engine.model, path)?,
        None => engine.model.new_state_with(args.cache)?,
    };
    let mut write_err = None;
    let gen = generate_events(&mut state, &engine.tokenizer, &prompt, &opts, |event| {
        let r = match (event, args.json) {
            (Event::Token(id, text), true) => {
                writeln!(out, "{}", json!({ "id": id, "text": text }))
            }
            (Event::Tail(text), true) => writeln!(out, "{}", json!({ "text": text })),
            (Event::Token(_, text) | Event::Tail(text), false) => out.write_all(text.as_bytes()),
            (Event::Shift(s), true) if s.repositioned => writeln!(
                out,
                "{}",
                json!({ "event": "shift", "dropped": s.dropped, "kept": s.kept, "repositioned": true })
            ),
            (Event::Shift(s), true) => writeln!(
                out,
                "{}",
                json!({ "event": "shift", "dropped": s.dropped, "kept": s.kept })
            ),
            // Logged by the model state; plain text output stays the model's text only.
            (Event::Shift(_), false) => Ok(()),
        };
        match r.and_then(|_| out.flush()) {
            // SIGTERM/SIGINT: stop at this token; the session below is still saved.
            Ok(()) if signal::received().is_some() => Flow::Stop,
            Ok(()) => Flow::Continue,
            Err(e) => {
                write_err = Some(e);
                Flow::Stop
            }
        }
    })?;
    if let Some(e) = write_err {
        return Err(e).context("writing to stdout");
    }
    if let Some(path) = &args.save_session {
        session::save(&engine.model, &state, path)?;
    }
    if args.json {
        let summary = json!({
            "done": true,
            "reason": gen.reason.as_str(),
            "prompt_tokens": gen.prompt_tokens,
            "generated_tokens": gen.generated_tokens,
            "load_ms": engine.load_time.as_millis() as u64,
            "prefill_ms": gen.prefill.as_secs_f64() * 1e3,
            "prefill_tok_s": gen.prefill_tok_s(),
            "decode_tok_s": gen.decode_tok_s(),
        });
        writeln!(out, "{summary}").context("writing to stdout")?;
    } else {
        writeln!(out).context("writing to stdout")?;
    }
    log::info!(
        "{} prompt tokens in {:.0} ms ({:.1} tok/s), {} generated at {:.1} tok/s, stop: {}",
        gen.prompt_tokens,
        gen.prefill.as_secs_f64() * 1e3,
        gen.prefill_tok_s(),
        gen.generated_tokens,
        gen.decode_tok_s(),
        gen.reason.as_str()
    );
    Ok(())
}
