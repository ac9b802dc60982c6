//! `edgelm chat`: an interactive [`Conversation`] in the terminal. Each line is a user turn;
//! the KV cache is kept between turns, so each turn prefills only its own tokens. With
//! `--save-session` the conversation is saved after every reply and `/reset`, so a later
//! `--load-session` (of `chat` or `run --chat`) goes on from the last one.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::constraint::FormatSource;
use crate::conversation::{Conversation, TooLong, Transcript, Turn};
use crate::engine::Engine;
use crate::generate::{Event, Flow, GenerateOptions};
use crate::model::{CacheOptions, LoadOptions};
use crate::sampler::SamplerConfig;
use crate::session;

/// What `edgelm chat` runs with.
#[derive(Clone, Debug)]
pub struct ChatOptions {
    /// The model bundle directory.
    pub model: PathBuf,
    /// Threads, int8 path and kernel.
    pub load: LoadOptions,
    /// The KV cache (`--ctx`, `--kv`, `--keep`); a loaded session brings its own.
    pub cache: CacheOptions,
    /// Sampling.
    pub sampler: SamplerConfig,
    /// Cap on new tokens per reply.
    pub max_tokens: usize,
    /// The chat template to use instead of the bundle's.
    pub chat_template_file: Option<PathBuf>,
    /// System prompt (`None`: the loaded conversation's, else the template's own).
    pub system: Option<String>,
    /// A reply stops before any of these strings.
    pub stop: Vec<String>,
    /// Continue the conversation saved in this file.
    pub load_session: Option<PathBuf>,
    /// Save the conversation to this file after every reply and `/reset`.
    pub save_session: Option<PathBuf>,
    /// The format every reply must follow, if any.
    pub format: Option<FormatSource>,
}

/// Runs the interactive `chat` command over `input` / `out`; notices go to stderr.
pub fn chat(opts: &ChatOptions, input: &mut dyn BufRead, out: &mut dyn Write) -> Result<()> {
    let format = opts.format.as_ref().map(FormatSource::load).transpose()?;
    let engine =
        Engine::load_with_template(&opts.model, &opts.load, opts.chat_template_file.as_deref())?;
    if engine.template.is_none() {
        bail!("this model has no chat template (tokenizer_config.json has no chat_template)");
    }
    let constraint = format.map(|f| engine.compile(&f)).transpose()?;
    let gen_opts = GenerateOptions {
        max_tokens: opts.max_tokens,
        sampler: opts.sampler.clone(),
        stop: opts.stop.clone(),
        eos_ids: engine.eos_ids(),
        ignore_eos: false,
    };
    let (state, transcript) = match &opts.load_session {
        Some(path) => session::load(&engine.model, path)?.into_conversation(path)?,
        None => (
            engine.model.new_state_with(opts.cache)?,
            Transcript::default(),
        ),
    };
    let mut conversation = Conversation::resume(&engine, state, transcript)?;
    if opts.system.is_some() {
        conversation.set_system(opts.system.clone());
    }
    let save = |conversation: &Conversation| match &opts.save_session {
        Some(path) => session::save(
            &engine.model,
            conversation.state(),
            Some(&conversation.transcript()),
            path,
        ),
        None => Ok(()),
    };
    let mut line = String::new();
    loop {
        write!(out, "> ")
            .and_then(|_| out.flush())
            .context("writing to stdout")?;
        line.clear();
        if input.read_line(&mut line).context("reading stdin")? == 0 {
            writeln!(out).context("writing to stdout")?;
            return Ok(());
        }
        let text = line.trim();
        match text {
            "" => continue,
            "/quit" | "/exit" => return Ok(()),
            "/reset" => {
                conversation.reset();
                save(&conversation)?;
                writeln!(out, "(conversation reset)").context("writing to stdout")?;
                continue;
            }
            _ => {}
        }
        let turn = match conversation.prepare(text, gen_opts.max_tokens) {
            Ok(turn) => turn,
            Err(e) if e.is::<TooLong>() => {
                // The conversation is unchanged; the user can say something shorter.
                eprintln!("edgelm: {e:#}");
                continue;
            }
            Err(e) => return Err(e),
        };
        note_dropped(&turn);
        let mut write_err = None;
        let mut matcher = constraint.as_ref().map(|c| c.matcher());
        let gen = conversation.reply_constrained(turn, &gen_opts, matcher.as_mut(), |event| {
            let r = match event {
                Event::Token(_, text) | Event::Tail(text) => {
                    out.write_all(text.as_bytes()).and_then(|_| out.flush())
                }
                Event::Shift(s) => {
                    eprintln!(
                        "[cache full: dropped {} tokens, keeping {}{}]",
                        s.dropped,
                        s.kept,
                        if s.repositioned {
                            ", re-prefilled at fresh positions"
                        } else {
                            ""
                        }
                    );
                    Ok(())
                }
            };
            match r {
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
        save(&conversation)?;
        writeln!(out).context("writing to stdout")?;
        log::info!(
            "turn: {} tokens prefilled, {} generated at {:.1} tok/s, {} in the cache",
            gen.prompt_tokens,
            gen.generated_tokens,
            gen.decode_tok_s(),
            conversation.state().len()
        );
    }
}

/// Tells the terminal (stderr) that `turn` drops the oldest exchanges to fit the cache.
pub(crate) fn note_dropped(turn: &Turn) {
    if turn.dropped_exchanges() > 0 {
        eprintln!(
            "[conversation too long: dropped the oldest {} exchange(s)]",
            turn.dropped_exchanges()
        );
    }
}
