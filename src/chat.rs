//! `edgelm chat`: an interactive [`Conversation`] in the terminal. Each line is a user turn;
//! the KV cache is kept between turns, so each turn prefills only its own tokens.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::conversation::{Conversation, TooLong};
use crate::engine::Engine;
use crate::generate::{Event, Flow, GenerateOptions};
use crate::model::{CacheOptions, LoadOptions};
use crate::sampler::SamplerConfig;

/// What `edgelm chat` runs with.
#[derive(Clone, Debug)]
pub struct ChatOptions {
    /// The model bundle directory.
    pub model: PathBuf,
    /// Threads, int8 path and kernel.
    pub load: LoadOptions,
    /// The KV cache (`--ctx`, `--kv`, `--keep`).
    pub cache: CacheOptions,
    /// Sampling.
    pub sampler: SamplerConfig,
    /// Cap on new tokens per reply.
    pub max_tokens: usize,
    /// System prompt (`None`: the template's own).
    pub system: Option<String>,
    /// A reply stops before any of these strings.
    pub stop: Vec<String>,
}

/// Runs the interactive `chat` command over `input` / `out`; notices go to stderr.
pub fn chat(opts: &ChatOptions, input: &mut dyn BufRead, out: &mut dyn Write) -> Result<()> {
    let engine = Engine::load(&opts.model, &opts.load)?;
    if engine.template.is_none() {
        bail!("this model has no chat template (tokenizer_config.json has no chat_template)");
    }
    let gen_opts = GenerateOptions {
        max_tokens: opts.max_tokens,
        sampler: opts.sampler.clone(),
        stop: opts.stop.clone(),
        eos_ids: engine.eos_ids(),
        ignore_eos: false,
    };
    let state = engine.model.new_state_with(opts.cache)?;
    let mut conversation = Conversation::new(&engine, state, opts.system.clone());
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
        if turn.dropped_exchanges() > 0 {
            eprintln!(
                "[conversation too long: dropped the oldest {} exchange(s)]",
                turn.dropped_exchanges()
            );
        }
        let mut write_err = None;
        let gen = conversation.reply(turn, &gen_opts, |event| {
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
