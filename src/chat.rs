//! `edgelm chat`: a multi-turn conversation that keeps its KV cache between turns, so each
//! turn prefills only its own tokens.

use std::io::{BufRead, Write};

use anyhow::{bail, Context, Result};

use crate::cli::ChatArgs;
use crate::engine::Engine;
use crate::generate::{generate_events, Event, Flow, GenerateOptions, Generation};
use crate::model::{CacheOptions, State};
use crate::template::Message;

/// One conversation: the messages so far and the model state holding them.
pub struct Conversation<'e> {
    engine: &'e Engine,
    state: State,
    system: Option<String>,
    messages: Vec<Message>,
    /// The rendered text the state holds: the template up to the last generation prompt,
    /// then the reply tokens fed back so far.
    fed: String,
}

impl<'e> Conversation<'e> {
    /// A fresh conversation (with `system` as its system prompt, else the template's own).
    pub fn new(
        engine: &'e Engine,
        cache: CacheOptions,
        system: Option<String>,
    ) -> Result<Conversation<'e>> {
        if engine.template.is_none() {
            bail!("this model has no chat template (tokenizer_config.json has no chat_template)");
        }
        let mut conversation = Conversation {
            engine,
            state: engine.model.new_state_with(cache)?,
            system,
            messages: vec![],
            fed: String::new(),
        };
        conversation.reset();
        Ok(conversation)
    }

    /// Forgets every turn (the cache storage is kept).
    pub fn reset(&mut self) {
        self.state.reset();
        self.messages.clear();
        if let Some(system) = &self.system {
            self.messages.push(Message::new("system", system.clone()));
        }
        self.fed.clear();
    }

    /// The model state (cache, positions).
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The messages so far.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Adds the user's turn and generates the reply; `Generation::prompt_tokens` counts the
    /// tokens prefilled for this turn only (unless the history had to be re-prefilled).
    pub fn turn(
        &mut self,
        user: &str,
        opts: &GenerateOptions,
        mut on_event: impl FnMut(Event) -> Flow,
    ) -> Result<Generation> {
        let (engine, tokenizer) = (self.engine, &self.engine.tokenizer);
        let template = engine.template.as_ref().context("no chat template")?;
        self.messages.push(Message::new("user", user));
        let full = template.render(&self.messages, true)?;
        let prompt = match full.strip_prefix(self.fed.as_str()) {
            Some(delta) if !self.fed.is_empty() => tokenizer.encode(delta, false)?,
            _ => {
                if !self.fed.is_empty() {
                    log::info!("the history no longer renders as fed; re-prefilling it");
                }
                self.state.reset();
                tokenizer.encode(&full, false)?
            }
        };
        let mut reply = String::new();
        let result = generate_events(&mut self.state, tokenizer, &prompt, opts, |event| {
            if let Event::Token(_, text) | Event::Tail(text) = event {
                reply.push_str(text);
            }
            on_event(event)
        });
        let gen = match result {
            Ok(gen) => gen,
            Err(e) => {
                // The state may hold part of this turn: start the next one from scratch.
                self.messages.pop();
                self.fed.clear();
                return Err(e);
            }
        };
        // Every sampled token but the last was fed back.
        let fed_ids = &gen.ids[..gen.ids.len().saturating_sub(1)];
        let fed_reply = tokenizer.decode(fed_ids, false)?;
        self.fed = full + &fed_reply;
        self.messages.push(Message::new("assistant", reply));
        Ok(gen)
    }
}

/// Runs the interactive `chat` command over `input` / `out`.
pub fn chat(args: &ChatArgs, input: &mut dyn BufRead, out: &mut dyn Write) -> Result<()> {
    let engine = Engine::load(&args.model.model, &args.model.load_options()?)?;
    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        sampler: args.sampling.to_config(),
        stop: args.stop.clone(),
        eos_ids: engine.eos_ids(),
        ignore_eos: false,
    };
    let mut conversation =
        Conversation::new(&engine, args.cache.to_options(), args.system.clone())?;
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
        let mut write_err = None;
        let gen = conversation.turn(text, &opts, |event| {
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
