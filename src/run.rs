//! `edgelm run`: one prompt in, streamed text (or JSON lines) out.
//!
//! A raw prompt continues whatever a loaded session's cache holds; with `--chat` the prompt
//! is the next user turn of the [`Conversation`] a loaded session holds (or of a new one), so
//! `run --chat --load-session F --save-session F` carries a conversation across processes.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::chat::note_dropped;
use crate::constraint::FormatSource;
use crate::conversation::{Conversation, Transcript};
use crate::engine::Engine;
use crate::generate::{generate_constrained, Event, Flow, GenerateOptions, Generation};
use crate::model::{CacheOptions, LoadOptions};
use crate::sampler::SamplerConfig;
use crate::session;
use crate::signal;

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
    /// The prompt is a user turn of a conversation, rendered with the chat template.
    pub chat: bool,
    /// The chat template to use instead of the bundle's.
    pub chat_template_file: Option<PathBuf>,
    /// System prompt for `chat` (`None`: the loaded conversation's, else the template's own).
    pub system: Option<String>,
    /// Generation stops before any of these strings.
    pub stop: Vec<String>,
    /// Generate through end-of-sequence tokens.
    pub ignore_eos: bool,
    /// The format the output must follow, if any.
    pub format: Option<FormatSource>,
    /// One JSON object per token and a summary line instead of text.
    pub json: bool,
    /// Continue the session saved in this file (a conversation with `chat`, else a raw
    /// completion).
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
    // The file is read before the model loads, so a mistake in it shows at once.
    let format = args.format.as_ref().map(FormatSource::load).transpose()?;
    let engine =
        Engine::load_with_template(&args.model, &args.load, args.chat_template_file.as_deref())?;
    let constraint = format.map(|f| engine.compile(&f)).transpose()?;
    let mut matcher = constraint.as_ref().map(|c| c.matcher());
    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        sampler: args.sampler.clone(),
        stop: args.stop.clone(),
        eos_ids: engine.eos_ids(),
        ignore_eos: args.ignore_eos,
    };
    let mut printer = Printer {
        out,
        json: args.json,
        write_err: None,
    };
    let gen = if args.chat {
        let (state, transcript) = match &args.load_session {
            Some(path) => session::load(&engine.model, path)?.into_conversation(path)?,
            None => (
                engine.model.new_state_with(args.cache)?,
                Transcript::default(),
            ),
        };
        let mut conversation = Conversation::resume(&engine, state, transcript)?;
        if args.system.is_some() {
            conversation.set_system(args.system.clone());
        }
        let turn = conversation.prepare(&args.prompt, args.max_tokens)?;
        note_dropped(&turn);
        let gen = conversation.reply_constrained(turn, &opts, matcher.as_mut(), |event| {
            printer.on_event(event)
        })?;
        printer.check()?;
        if let Some(path) = &args.save_session {
            let transcript = conversation.transcript();
            session::save(&engine.model, conversation.state(), Some(&transcript), path)?;
        }
        gen
    } else {
        let mut state = match &args.load_session {
            Some(path) => session::load(&engine.model, path)?.into_raw(path)?,
            None => engine.model.new_state_with(args.cache)?,
        };
        let prompt = engine.encode_raw(&args.prompt)?;
        let gen = generate_constrained(
            &mut state,
            &engine.tokenizer,
            &prompt,
            &opts,
            matcher.as_mut(),
            |event| printer.on_event(event),
        )?;
        printer.check()?;
        if let Some(path) = &args.save_session {
            session::save(&engine.model, &state, None, path)?;
        }
        gen
    };
    finish(&engine, &gen, args.json, printer.out)
}

/// Writes each event as text or a JSON line, stopping the generation at a signal or a
/// failed write.
struct Printer<'o> {
    out: &'o mut dyn Write,
    json: bool,
    write_err: Option<std::io::Error>,
}

impl Printer<'_> {
    fn on_event(&mut self, event: Event) -> Flow {
        let out = &mut *self.out;
        let r = match (event, self.json) {
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
            // SIGTERM/SIGINT: stop at this token; the session is still saved.
            Ok(()) if signal::received().is_some() => Flow::Stop,
            Ok(()) => Flow::Continue,
            Err(e) => {
                self.write_err = Some(e);
                Flow::Stop
            }
        }
    }

    /// The write error that stopped the generation, if one did.
    fn check(&mut self) -> Result<()> {
        match self.write_err.take() {
            Some(e) => Err(e).context("writing to stdout"),
            None => Ok(()),
        }
    }
}

/// The last line (a line end, or the JSON summary) and the log line.
fn finish(engine: &Engine, gen: &Generation, json: bool, out: &mut dyn Write) -> Result<()> {
    if json {
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
