//! `edgelm serve`: the session loop, transport → protocol → generate → protocol → transport.
//!
//! One thread reads the transport and frames lines (`input.rs`); the session thread runs
//! requests one at a time. During a generation (`stream.rs`) the session drains the reader's
//! queue after every token, so `STOP` or a lone 0x03 ends it within one token, and any other
//! request is answered `ERR busy`.
//!
//! `CHAT` turns go to the session's [`Conversation`] (history, trimming, cache reuse; `EVT
//! context_shift` when it drops exchanges); `GEN` is a raw completion on the conversation's
//! cache, outside its history. The session itself keeps only transport and protocol
//! concerns: settings, framing, streaming, cancellation.

mod input;
mod settings;
mod stream;

use std::io::Read;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::conversation::{Conversation, TooLong};
use crate::engine::Engine;
use crate::generate::{generate_events, GenerateOptions};
use crate::model::{CacheOptions, LoadOptions};
use crate::protocol::{self, ErrorCode, Request};
use crate::signal;
use crate::transport::{self, SerialConfig, TransportError, Writer};

use input::{read_loop, Deferred, Incoming};
pub use settings::Settings;
use stream::Live;

/// Everything `serve` needs, from the command line.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The model bundle directory.
    pub model: PathBuf,
    /// Threads, int8 path and kernel.
    pub load: LoadOptions,
    /// The serial device, or `None` for stdin/stdout.
    pub serial: Option<SerialConfig>,
    /// Echo input and show a `> ` prompt; lines end in CRLF (for terminals).
    pub echo: bool,
    /// Longest request line in bytes.
    pub line_limit: usize,
    /// Settings a session starts with (and `QUIT` on a serial line returns to).
    pub settings: Settings,
    /// The KV cache every session gets (`--ctx`, `--kv`, `--keep`).
    pub cache: CacheOptions,
}

/// Serves the protocol until `QUIT`/Ctrl-D/end of input (stdio) or forever (serial).
pub fn serve(opts: &ServeOptions) -> Result<()> {
    let engine = Engine::load(&opts.model, &opts.load)?;
    let (reader, writer) = transport::open(opts.serial.as_ref())?;
    let (tx, rx) = sync_channel(64);
    let echo = opts.echo.then(|| writer.clone());
    let limit = opts.line_limit;
    let mut wake = signal::wake_pipe().context("setting up signal handling")?;
    let term_tx = tx.clone();
    std::thread::Builder::new()
        .name("serve-signal".into())
        .spawn(move || {
            let mut byte = [0u8; 1];
            if matches!(wake.read(&mut byte), Ok(1)) {
                let _ = term_tx.send(Incoming::Terminate);
            }
        })
        .context("starting the signal thread")?;
    std::thread::Builder::new()
        .name("serve-input".into())
        .spawn(move || read_loop(reader, echo, limit, tx))
        .context("starting the input thread")?;
    log::info!(
        "serving on {}",
        opts.serial
            .as_ref()
            .map_or("stdin/stdout".to_string(), |s| s.path.display().to_string())
    );
    let model_name = opts.model.file_name().map_or_else(
        || opts.model.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let state = engine.model.new_state_with(opts.cache)?;
    let mut session = Session {
        conversation: Conversation::new(&engine, state, None),
        engine: &engine,
        model_name,
        writer,
        eol: if opts.echo { "\r\n" } else { "\n" },
        echo: opts.echo,
        defaults: opts.settings.clone(),
        settings: opts.settings.clone(),
        line: String::new(),
    };
    session.run(&rx)
}

/// What the session loop does after a message.
#[derive(PartialEq, Eq)]
enum Next {
    Continue,
    Quit,
}

/// One session: its settings and conversation, and where its lines go.
struct Session<'e> {
    engine: &'e Engine,
    model_name: String,
    writer: Writer,
    eol: &'static str,
    echo: bool,
    defaults: Settings,
    settings: Settings,
    /// The `CHAT` history and the KV cache (`GEN` borrows the cache).
    conversation: Conversation<'e>,
    /// Output line being built.
    line: String,
}

impl Session<'_> {
    fn run(&mut self, rx: &Receiver<Incoming>) -> Result<()> {
        let ctx = self.conversation.state().capacity();
        self.emit(|l| protocol::write_evt(l, "ready", &format!("context={ctx}")))?;
        self.prompt()?;
        loop {
            let Ok(msg) = rx.recv() else {
                return Ok(());
            };
            let next = match msg {
                Incoming::Line(line) => match protocol::parse(&line) {
                    Ok(req) => self.handle(req, rx)?,
                    Err(e) => self
                        .error(e.code(), &e.to_string())
                        .map(|()| Next::Continue)?,
                },
                Incoming::Bad(e) => self
                    .error(e.code(), &e.to_string())
                    .map(|()| Next::Continue)?,
                Incoming::Interrupt => Next::Continue,
                Incoming::Hangup => self.quit()?,
                Incoming::Eof => return Ok(()),
                Incoming::Reconnected => {
                    self.writer.resume();
                    self.emit(|l| protocol::write_evt(l, "reconnect", ""))?;
                    Next::Continue
                }
                Incoming::Failed(e) => return Err(e.into()),
                Incoming::Terminate => {
                    log::info!("stopping on signal {}", signal::received().unwrap_or(0));
                    return Ok(());
                }
            };
            if next == Next::Quit {
                return Ok(());
            }
            self.prompt()?;
        }
    }

    fn handle(&mut self, req: Request<'_>, rx: &Receiver<Incoming>) -> Result<Next> {
        match req {
            Request::Empty => {}
            Request::Ping => self.ok("PONG")?,
            Request::Info => {
                let cfg = self.engine.model.config();
                let quant = cfg
                    .edgelm
                    .as_ref()
                    .and_then(|e| e.get("quantization"))
                    .and_then(|q| q.as_str())
                    .unwrap_or("unknown")
                    .to_string();
                let info = format!(
                    "model={} context={} quant={} vocab={} layers={} chat={} version={}",
                    self.model_name.replace(' ', "_"),
                    self.conversation.state().capacity(),
                    quant,
                    cfg.vocab_size,
                    cfg.num_hidden_layers,
                    if self.engine.template.is_some() {
                        "yes"
                    } else {
                        "no"
                    },
                    env!("CARGO_PKG_VERSION"),
                );
                self.ok(&info)?;
            }
            Request::Help => {
                let help = format!(
                    "verbs: PING INFO HELP GEN <text> CHAT <text> SYSTEM [<text>] RESET \
                     SET <key> <value> GET [<key>] STOP QUIT; keys: {}; cancel: STOP or Ctrl-C",
                    protocol::KEYS.join(" ")
                );
                self.ok(&help)?;
            }
            Request::Set(setting) => {
                let key = self.settings.apply(setting);
                let shown = self.settings.show(key);
                self.ok(&shown)?;
            }
            Request::Get(Some(key)) => {
                let shown = self.settings.show(key);
                self.ok(&shown)?;
            }
            Request::Get(None) => {
                let all: Vec<String> = protocol::KEYS
                    .iter()
                    .map(|k| self.settings.show(k))
                    .collect();
                self.ok(&all.join(" "))?;
            }
            Request::Reset => {
                self.conversation.reset();
                self.ok("")?;
            }
            Request::System(text) => {
                let system = (!text.trim().is_empty()).then(|| text.to_string());
                self.conversation.set_system(system);
                self.ok("")?;
            }
            Request::Stop => self.error(ErrorCode::Idle, "nothing is being generated")?,
            Request::Quit => return self.quit(),
            Request::Gen(text) => return self.gen(text, rx),
            Request::Chat(text) => return self.chat(text, rx),
        }
        Ok(Next::Continue)
    }

    /// `QUIT`/Ctrl-D: on stdio the session ends; a serial line stays up for the next
    /// person, with the conversation and settings reset.
    fn quit(&mut self) -> Result<Next> {
        self.ok("bye")?;
        if self.writer.is_serial() {
            self.conversation.set_system(None);
            self.conversation.reset();
            self.settings = self.defaults.clone();
            Ok(Next::Continue)
        } else {
            Ok(Next::Quit)
        }
    }

    /// The generation settings of this session.
    fn generate_options(&self) -> GenerateOptions {
        GenerateOptions {
            max_tokens: self.settings.max_tokens,
            sampler: self.settings.sampler.clone(),
            stop: self.settings.stop.clone(),
            eos_ids: self.engine.eos_ids(),
            ignore_eos: self.settings.ignore_eos,
        }
    }

    /// `GEN`: a raw completion on the conversation's cache, outside its history.
    fn gen(&mut self, text: &str, rx: &Receiver<Incoming>) -> Result<Next> {
        let started = Instant::now();
        let ids = match self.engine.encode_raw(text) {
            Ok(ids) => ids,
            Err(e) => {
                self.error(ErrorCode::Model, &format!("{e:#}"))?;
                return Ok(Next::Continue);
            }
        };
        let ctx = self.conversation.state().capacity();
        if ids.len() >= ctx {
            let msg = format!(
                "the prompt has {} tokens; the context holds {ctx}",
                ids.len()
            );
            self.error(ErrorCode::ContextFull, &msg)?;
            return Ok(Next::Continue);
        }
        let opts = self.generate_options();
        let mut live = Live::new(&self.writer, self.eol, &self.settings, rx);
        let result = generate_events(
            self.conversation.lend_cache(),
            &self.engine.tokenizer,
            &ids,
            &opts,
            |event| live.on_event(event),
        );
        let (write_error, deferred) = live.end(result, ids.len(), started);
        self.finish(write_error, deferred)
    }

    /// `CHAT`: one user turn of the conversation.
    fn chat(&mut self, text: &str, rx: &Receiver<Incoming>) -> Result<Next> {
        let started = Instant::now();
        let turn = match self.conversation.prepare(text, self.settings.max_tokens) {
            Ok(turn) => turn,
            Err(e) => {
                let code = if e.is::<TooLong>() {
                    ErrorCode::ContextFull
                } else {
                    ErrorCode::Model
                };
                self.error(code, &format!("{e:#}"))?;
                return Ok(Next::Continue);
            }
        };
        let dropped = turn.dropped_exchanges();
        if dropped > 0 {
            self.emit(|l| protocol::write_evt(l, "context_shift", &format!("dropped={dropped}")))?;
        }
        let prefill = turn.prefill_tokens();
        log::debug!(
            "turn of {prefill} tokens to prefill, {} cached",
            self.conversation.state().len()
        );
        let opts = self.generate_options();
        let mut live = Live::new(&self.writer, self.eol, &self.settings, rx);
        let result = self
            .conversation
            .reply(turn, &opts, |event| live.on_event(event));
        let (write_error, deferred) = live.end(result, prefill, started);
        self.finish(write_error, deferred)
    }

    /// After a generation's `END`: acts on an output failure and on what arrived meanwhile.
    fn finish(&mut self, write_error: Option<TransportError>, deferred: Deferred) -> Result<Next> {
        if let Some(e) = write_error {
            if !self.writer.is_serial() {
                return Err(e.into());
            }
        }
        if let Some(e) = deferred.failed {
            return Err(e.into());
        }
        if deferred.terminate {
            log::info!("stopping on signal {}", signal::received().unwrap_or(0));
            return Ok(Next::Quit);
        }
        if deferred.reconnected {
            self.writer.resume();
            self.emit(|l| protocol::write_evt(l, "reconnect", ""))?;
        }
        if deferred.eof {
            Ok(Next::Quit)
        } else if deferred.quit {
            self.quit()
        } else {
            Ok(Next::Continue)
        }
    }

    /// Writes one line built by `f`, plus the line end.
    fn emit(&mut self, f: impl FnOnce(&mut String) -> std::fmt::Result) -> Result<()> {
        self.line.clear();
        let _ = f(&mut self.line);
        self.line.push_str(self.eol);
        send(&self.writer, &self.line)
    }

    fn ok(&mut self, text: &str) -> Result<()> {
        self.emit(|l| {
            l.push_str("OK");
            if !text.is_empty() {
                l.push(' ');
                l.push_str(text);
            }
            Ok(())
        })
    }

    fn error(&mut self, code: ErrorCode, msg: &str) -> Result<()> {
        self.emit(|l| protocol::write_err(l, code, msg))
    }

    fn prompt(&mut self) -> Result<()> {
        if self.echo {
            send(&self.writer, "> ")?;
        }
        Ok(())
    }
}

/// Sends `text`; a lost serial device is not an error of the session (the reader will
/// reconnect), a failed stdout is.
fn send(writer: &Writer, text: &str) -> Result<()> {
    match writer.send(text.as_bytes()) {
        Ok(()) => Ok(()),
        Err(e @ TransportError::Lost { .. }) => {
            log::debug!("dropping output: {e}");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
