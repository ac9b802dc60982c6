//! `edgelm serve`: the session loop, transport → protocol → generate → protocol → transport.
//!
//! One thread reads the transport and frames lines ([`LineParser`]); the session thread runs
//! requests one at a time. During a generation the session drains the reader's queue after
//! every token, so `STOP` or a lone 0x03 ends it within one token, and any other request is
//! answered `ERR busy`.
//!
//! The chat conversation is kept as messages; each `CHAT` renders the whole conversation
//! and feeds the model only what the KV cache does not already hold (the cache is reused
//! when its tokens are an exact prefix of the new prompt, otherwise it is re-prefilled).
//! When the conversation outgrows the context, the oldest turns are dropped (`EVT
//! context_shift`).

use std::io::Read;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::engine::Engine;
use crate::generate::{generate_events, Event, Flow, GenerateOptions};
use crate::model::{CacheOptions, LoadOptions};
use crate::model::{ForwardError, State};
use crate::protocol::{
    self, End, EndReason, ErrorCode, Frame, LineParser, ProtocolError, Request, Setting, StreamMode,
};
use crate::sampler::SamplerConfig;
use crate::signal;
use crate::template::Message;
use crate::transport::{self, Received, SerialConfig, TransportError, Writer};

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

/// Per-session generation settings (`SET`/`GET`).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Sampling.
    pub sampler: SamplerConfig,
    /// Cap on generated tokens per request.
    pub max_tokens: usize,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Output mode.
    pub stream: StreamMode,
    /// Gather streamed text for this long per `TOK` line (0 = a line per token).
    pub coalesce_ms: u64,
    /// Generate through end-of-sequence tokens.
    pub ignore_eos: bool,
}

/// What the reader thread passes on.
enum Incoming {
    Line(String),
    Bad(ProtocolError),
    Interrupt,
    Hangup,
    Eof,
    Reconnected,
    Failed(TransportError),
    /// SIGTERM/SIGINT ([`crate::signal`]): finish the current token and exit.
    Terminate,
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
    let mut session = Session {
        state: engine.model.new_state_with(opts.cache)?,
        engine: &engine,
        model_name,
        writer,
        eol: if opts.echo { "\r\n" } else { "\n" },
        echo: opts.echo,
        defaults: opts.settings.clone(),
        settings: opts.settings.clone(),
        system: None,
        messages: vec![],
        cached: vec![],
        line: String::new(),
    };
    session.run(&rx)
}

/// Reads bytes, frames them, and queues what it finds; echoes for terminals.
fn read_loop(
    mut reader: transport::Reader,
    echo: Option<Writer>,
    limit: usize,
    tx: SyncSender<Incoming>,
) {
    let mut parser = LineParser::new(limit);
    let mut buf = [0u8; 512]; // (bytes read at once,)
    let mut echoed: Vec<u8> = Vec::with_capacity(1024); // (echo bytes of one read,)
    let mut last_cr = false;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(Received::Data(n)) => n,
            Ok(Received::Eof) => {
                let _ = tx.send(Incoming::Eof);
                return;
            }
            Ok(Received::Reconnected) => {
                parser.clear();
                if tx.send(Incoming::Reconnected).is_err() {
                    return;
                }
                continue;
            }
            Err(e) => {
                let _ = tx.send(Incoming::Failed(e));
                return;
            }
        };
        echoed.clear();
        for &b in &buf[..n] {
            if echo.is_some() {
                match b {
                    b'\n' if last_cr => {}
                    b'\r' | b'\n' => echoed.extend_from_slice(b"\r\n"),
                    0x08 | 0x7f => echoed.extend_from_slice(b"\x08 \x08"),
                    0x03 => echoed.extend_from_slice(b"^C\r\n"),
                    0x20.. | b'\t' => echoed.push(b),
                    _ => {}
                }
                last_cr = b == b'\r';
            }
            let msg = match parser.push(b) {
                None => continue,
                Some(Frame::Line(l)) => Incoming::Line(l.to_string()),
                Some(Frame::Error(e)) => Incoming::Bad(e),
                Some(Frame::Interrupt) => Incoming::Interrupt,
                Some(Frame::Hangup) => Incoming::Hangup,
            };
            if tx.send(msg).is_err() {
                return;
            }
        }
        if let Some(w) = &echo {
            if !echoed.is_empty() {
                // Echo is a courtesy; a lost device is reported by the reader itself.
                let _ = w.send(&echoed);
            }
        }
    }
}

/// What the session loop does after a message.
#[derive(PartialEq, Eq)]
enum Next {
    Continue,
    Quit,
}

/// Messages that arrived during a generation and must be acted on after it.
#[derive(Default)]
struct Deferred {
    quit: bool,
    /// End of input: no more requests, but the current reply is still wanted.
    eof: bool,
    /// A stop signal: cancel and exit.
    terminate: bool,
    reconnected: bool,
    failed: Option<TransportError>,
}

/// One session's state: settings, the conversation and its KV cache.
struct Session<'e> {
    engine: &'e Engine,
    model_name: String,
    writer: Writer,
    eol: &'static str,
    echo: bool,
    defaults: Settings,
    settings: Settings,
    /// `SYSTEM` text; `None` leaves the template's default.
    system: Option<String>,
    /// The conversation so far, user and assistant turns alternating.
    messages: Vec<Message>,
    /// The KV cache of the conversation.
    state: State,
    /// Token ids the cache holds, (state.len(),).
    cached: Vec<u32>,
    /// Output line being built.
    line: String,
}

impl Session<'_> {
    fn run(&mut self, rx: &Receiver<Incoming>) -> Result<()> {
        let ctx = self.state.capacity();
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
                    self.state.capacity(),
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
                let key = self.set(setting);
                let shown = self.get(key);
                self.ok(&shown)?;
            }
            Request::Get(Some(key)) => {
                let shown = self.get(key);
                self.ok(&shown)?;
            }
            Request::Get(None) => {
                let all: Vec<String> = protocol::KEYS.iter().map(|k| self.get(k)).collect();
                self.ok(&all.join(" "))?;
            }
            Request::Reset => {
                self.messages.clear();
                self.forget_cache();
                self.ok("")?;
            }
            Request::System(text) => {
                self.system = (!text.trim().is_empty()).then(|| text.to_string());
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
            self.messages.clear();
            self.system = None;
            self.settings = self.defaults.clone();
            self.forget_cache();
            Ok(Next::Continue)
        } else {
            Ok(Next::Quit)
        }
    }

    fn set(&mut self, setting: Setting<'_>) -> &'static str {
        let s = &mut self.settings;
        match setting {
            Setting::Temp(v) => {
                s.sampler.temperature = v;
                "temp"
            }
            Setting::TopK(v) => {
                s.sampler.top_k = v;
                "top_k"
            }
            Setting::TopP(v) => {
                s.sampler.top_p = v;
                "top_p"
            }
            Setting::MinP(v) => {
                s.sampler.min_p = v;
                "min_p"
            }
            Setting::RepeatPenalty(v) => {
                s.sampler.repeat_penalty = v;
                "repeat_penalty"
            }
            Setting::Seed(v) => {
                s.sampler.seed = v;
                "seed"
            }
            Setting::MaxTokens(v) => {
                s.max_tokens = v;
                "max_tokens"
            }
            Setting::Stop(list) => {
                s.stop = list
                    .map(|l| {
                        l.split([' ', '\t'])
                            .filter(|w| !w.is_empty())
                            .map(|w| {
                                let mut out = String::new();
                                // Validated by the parser; an error cannot occur here.
                                let _ = protocol::unescape_into(w, &mut out);
                                out
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                "stop"
            }
            Setting::Stream(m) => {
                s.stream = m;
                "stream"
            }
            Setting::CoalesceMs(ms) => {
                s.coalesce_ms = ms;
                "coalesce_ms"
            }
            Setting::IgnoreEos(b) => {
                s.ignore_eos = b;
                "ignore_eos"
            }
        }
    }

    /// `key=value` as `GET` shows it.
    fn get(&self, key: &str) -> String {
        let s = &self.settings;
        let value = match key {
            "temp" => s.sampler.temperature.to_string(),
            "top_k" => s.sampler.top_k.to_string(),
            "top_p" => s.sampler.top_p.to_string(),
            "min_p" => s.sampler.min_p.to_string(),
            "repeat_penalty" => s.sampler.repeat_penalty.to_string(),
            "seed" => s.sampler.seed.to_string(),
            "max_tokens" => s.max_tokens.to_string(),
            "stop" if s.stop.is_empty() => "off".to_string(),
            "stop" => {
                let mut out = String::new();
                for (i, stop) in s.stop.iter().enumerate() {
                    if i > 0 {
                        out.push(' ');
                    }
                    let _ = protocol::escape_into(&stop.replace(' ', "\\x20"), &mut out);
                }
                // `escape_into` doubled the backslash of `\x20`; undo just that.
                out.replace("\\\\x20", "\\x20")
            }
            "stream" => s.stream.as_str().to_string(),
            "coalesce_ms" => s.coalesce_ms.to_string(),
            "ignore_eos" => if s.ignore_eos { "on" } else { "off" }.to_string(),
            _ => "?".to_string(),
        };
        format!("{key}={value}")
    }

    fn forget_cache(&mut self) {
        self.state.reset();
        self.cached.clear();
    }

    /// `GEN`: a raw completion, independent of the conversation.
    fn gen(&mut self, text: &str, rx: &Receiver<Incoming>) -> Result<Next> {
        let started = Instant::now();
        let ids = match self.engine.encode_raw(text) {
            Ok(ids) => ids,
            Err(e) => {
                self.error(ErrorCode::Model, &format!("{e:#}"))?;
                return Ok(Next::Continue);
            }
        };
        // A completion shares nothing with the conversation's cache.
        self.forget_cache();
        let out = self.run_generation(&ids, started, rx)?;
        Ok(out.next)
    }

    /// `CHAT`: one user turn; the reply becomes part of the conversation.
    fn chat(&mut self, text: &str, rx: &Receiver<Incoming>) -> Result<Next> {
        let started = Instant::now();
        self.messages.push(Message::new("user", text));
        // The ring holds `ctx` tokens; a longer history would be cut by ring shifts
        // instead of whole exchanges.
        let ctx = self.state.capacity();
        let reserve = self.settings.max_tokens.min(ctx / 4).max(1);
        let mut dropped = 0;
        let ids = loop {
            let mut all = vec![];
            if let Some(system) = &self.system {
                all.push(Message::new("system", system.clone()));
            }
            all.extend(self.messages.iter().cloned());
            let ids = match self.engine.encode_chat(&all) {
                Ok(ids) => ids,
                Err(e) => {
                    self.messages.pop();
                    self.error(ErrorCode::Model, &format!("{e:#}"))?;
                    return Ok(Next::Continue);
                }
            };
            if ids.len() + reserve <= ctx {
                break ids;
            }
            if self.messages.len() <= 1 {
                self.messages.pop();
                let msg = format!(
                    "the message needs {} tokens; the context holds {ctx} with {reserve} kept for the reply",
                    ids.len()
                );
                self.error(ErrorCode::ContextFull, &msg)?;
                return Ok(Next::Continue);
            }
            // Drop the oldest exchange (user + assistant).
            let n = self.messages.len().min(2).min(self.messages.len() - 1);
            self.messages.drain(..n);
            dropped += 1;
        };
        if dropped > 0 {
            self.forget_cache();
            self.emit(|l| protocol::write_evt(l, "context_shift", &format!("dropped={dropped}")))?;
        }
        let out = self.run_generation(&ids, started, rx)?;
        match out.reply {
            Some(reply) => self.messages.push(Message::new("assistant", reply)),
            None => {
                self.messages.pop();
            }
        }
        Ok(out.next)
    }

    /// Feeds `ids` (a whole prompt; only the part the cache lacks is prefilled), streams
    /// the reply and writes `END` (or `ERR` if nothing was streamed).
    fn run_generation(
        &mut self,
        ids: &[u32],
        started: Instant,
        rx: &Receiver<Incoming>,
    ) -> Result<Outcome> {
        let reuse = !self.cached.is_empty()
            && self.cached.len() < ids.len()
            && ids.starts_with(&self.cached);
        if !reuse {
            self.forget_cache();
        }
        let feed = &ids[self.cached.len()..];
        let ctx = self.state.capacity();
        if self.state.len() + feed.len() >= ctx {
            self.error(
                ErrorCode::ContextFull,
                &format!(
                    "the prompt has {} tokens; the context holds {ctx}",
                    ids.len()
                ),
            )?;
            return Ok(Outcome {
                next: Next::Continue,
                reply: None,
            });
        }
        // A reply longer than the room left wraps the ring (reported as `EVT shift`).
        let opts = GenerateOptions {
            max_tokens: self.settings.max_tokens,
            sampler: self.settings.sampler.clone(),
            stop: self.settings.stop.clone(),
            eos_ids: self.engine.eos_ids(),
            ignore_eos: self.settings.ignore_eos,
        };
        log::debug!(
            "prompt of {} tokens, {} cached, {} to prefill",
            ids.len(),
            self.cached.len(),
            feed.len()
        );

        let mut stream = Streamer {
            writer: &self.writer,
            eol: self.eol,
            mode: self.settings.stream,
            coalesce_ms: self.settings.coalesce_ms,
            pending: String::new(),
            line: String::new(),
            last_flush: Instant::now(),
            streamed: 0,
            reply: String::new(),
            write_error: None,
        };
        let mut deferred = Deferred::default();
        let mut busy = vec![];
        let mut shifted = false;
        let result = generate_events(
            &mut self.state,
            &self.engine.tokenizer,
            feed,
            &opts,
            |event| {
                let text = match event {
                    Event::Token(_, text) | Event::Tail(text) => text,
                    Event::Shift(shift) => {
                        shifted = true;
                        stream.event(
                            "shift",
                            &format!("dropped={} kept={}", shift.dropped, shift.kept),
                        );
                        return Flow::Continue;
                    }
                };
                let mut flow = stream.push(text);
                if poll_input(rx, &mut deferred, &mut busy) {
                    flow = Flow::Stop;
                }
                for (code, msg) in busy.drain(..) {
                    stream.error(code, &msg);
                }
                if deferred.quit || deferred.reconnected || deferred.failed.is_some() {
                    flow = Flow::Stop;
                }
                flow
            },
        );
        stream.flush();
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let (end, reply) = match result {
            Ok(gen) => {
                // The cache now holds the whole prompt and every sampled id but the last
                // (`generate` never feeds the token it stops on).
                self.cached = [ids, &gen.ids[..gen.ids.len().saturating_sub(1)]].concat();
                if shifted {
                    // The ring dropped tokens from the middle: it no longer holds a prefix
                    // of the conversation, so the next turn is prefilled afresh.
                    self.state.reset();
                    self.cached.clear();
                }
                debug_assert_eq!(self.cached.len(), self.state.len());
                let mut reason = EndReason::from(gen.reason);
                if gen.generated_tokens == 0 {
                    reason = EndReason::Length;
                }
                (
                    Some(End {
                        reason,
                        prompt: gen.prompt_tokens,
                        gen: gen.generated_tokens,
                        ms: elapsed_ms,
                        tps: gen.decode_tok_s(),
                    }),
                    Some(std::mem::take(&mut stream.reply)),
                )
            }
            Err(e) => {
                log::warn!("generation failed: {e:#}");
                let streamed = stream.streamed;
                self.state.reset();
                self.cached.clear();
                if streamed == 0 {
                    let code = if e
                        .downcast_ref::<ForwardError>()
                        .is_some_and(|f| matches!(f, ForwardError::ContextFull { .. }))
                    {
                        ErrorCode::ContextFull
                    } else {
                        ErrorCode::Model
                    };
                    stream.error(code, &format!("{e:#}"));
                    (None, None)
                } else {
                    (
                        Some(End {
                            reason: EndReason::Error,
                            prompt: feed.len(),
                            gen: streamed,
                            ms: elapsed_ms,
                            tps: 0.0,
                        }),
                        Some(std::mem::take(&mut stream.reply)),
                    )
                }
            }
        };
        if let Some(end) = end {
            if self.settings.stream == StreamMode::Raw {
                stream.raw_line_end();
            }
            stream.line.clear();
            let _ = protocol::write_end(&mut stream.line, &end);
            stream.send_line();
        }
        let write_error = stream.write_error.take();
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
            return Ok(Outcome {
                next: Next::Quit,
                reply,
            });
        }
        if deferred.reconnected {
            self.writer.resume();
            self.emit(|l| protocol::write_evt(l, "reconnect", ""))?;
        }
        let next = if deferred.eof {
            Next::Quit
        } else if deferred.quit {
            self.quit()?
        } else {
            Next::Continue
        };
        Ok(Outcome { next, reply })
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

/// What a generation left behind.
struct Outcome {
    next: Next,
    /// The streamed text (`None` if the request failed before streaming).
    reply: Option<String>,
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

/// Drains the reader's queue during a generation; true if it asks to cancel. Requests
/// other than `STOP`/`QUIT` are answered `ERR busy` (collected into `busy`).
fn poll_input(
    rx: &Receiver<Incoming>,
    deferred: &mut Deferred,
    busy: &mut Vec<(ErrorCode, String)>,
) -> bool {
    let mut cancel = false;
    loop {
        match rx.try_recv() {
            Ok(Incoming::Line(line)) => match protocol::parse(&line) {
                Ok(Request::Stop) => cancel = true,
                Ok(Request::Quit) => deferred.quit = true,
                Ok(Request::Empty) => {}
                Ok(_) => busy.push((
                    ErrorCode::Busy,
                    "a generation is running (STOP or Ctrl-C cancels it)".into(),
                )),
                Err(e) => busy.push((e.code(), e.to_string())),
            },
            Ok(Incoming::Bad(e)) => busy.push((e.code(), e.to_string())),
            Ok(Incoming::Interrupt) => cancel = true,
            Ok(Incoming::Hangup) => deferred.quit = true,
            Ok(Incoming::Eof) => deferred.eof = true,
            Ok(Incoming::Terminate) => {
                deferred.terminate = true;
                cancel = true;
            }
            Ok(Incoming::Reconnected) => deferred.reconnected = true,
            Ok(Incoming::Failed(e)) => deferred.failed = Some(e),
            Err(TryRecvError::Empty) => return cancel,
            Err(TryRecvError::Disconnected) => {
                deferred.quit = true;
                return cancel;
            }
        }
    }
}

/// Writes generated text as `TOK` lines or raw text, coalescing if asked.
struct Streamer<'w> {
    writer: &'w Writer,
    eol: &'static str,
    mode: StreamMode,
    coalesce_ms: u64,
    /// Text not yet written (coalescing).
    pending: String,
    /// Output line being built.
    line: String,
    last_flush: Instant,
    /// Tokens that produced output so far.
    streamed: usize,
    /// Everything streamed, for the conversation.
    reply: String,
    write_error: Option<TransportError>,
}

impl Streamer<'_> {
    /// Takes one token's text; `Flow::Stop` if the output is gone.
    fn push(&mut self, text: &str) -> Flow {
        self.streamed += 1;
        self.reply.push_str(text);
        self.pending.push_str(text);
        if self.coalesce_ms == 0
            || self.last_flush.elapsed().as_millis() >= u128::from(self.coalesce_ms)
        {
            self.flush();
        }
        if self.write_error.is_some() {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }

    fn flush(&mut self) {
        self.last_flush = Instant::now();
        if self.pending.is_empty() {
            return;
        }
        self.line.clear();
        match self.mode {
            StreamMode::Escaped => {
                let _ = protocol::write_tok(&mut self.line, &self.pending);
                self.line.push_str(self.eol);
            }
            StreamMode::Raw => {
                if self.eol == "\n" {
                    self.line.push_str(&self.pending);
                } else {
                    self.line.push_str(&self.pending.replace('\n', self.eol));
                }
            }
        }
        self.pending.clear();
        self.write_line();
    }

    /// Ends raw text with a line end so `END` starts a line.
    fn raw_line_end(&mut self) {
        self.line.clear();
        self.line.push_str(self.eol);
        self.write_line();
    }

    /// Writes an `EVT` line between streamed tokens.
    fn event(&mut self, name: &str, text: &str) {
        self.flush();
        if self.mode == StreamMode::Raw {
            self.raw_line_end();
        }
        self.line.clear();
        let _ = protocol::write_evt(&mut self.line, name, text);
        self.send_line();
    }

    fn error(&mut self, code: ErrorCode, msg: &str) {
        self.flush();
        self.line.clear();
        let _ = protocol::write_err(&mut self.line, code, msg);
        self.send_line();
    }

    /// Writes `line` plus the line end.
    fn send_line(&mut self) {
        self.line.push_str(self.eol);
        self.write_line();
    }

    fn write_line(&mut self) {
        if self.write_error.is_some() {
            return;
        }
        if let Err(e) = self.writer.send(self.line.as_bytes()) {
            log::debug!("output failed: {e}");
            self.write_error = Some(e);
        }
    }
}
