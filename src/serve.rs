//! `edgelm serve`: the session loop, transport → protocol → generate → protocol → transport.
//!
//! One thread reads the transport and frames lines ([`LineParser`]); the session thread runs
//! requests one at a time. During a generation the session drains the reader's queue after
//! every token, so `STOP` or a lone 0x03 ends it within one token, and any other request is
//! answered `ERR busy`.
//!
//! `CHAT` turns go to the session's [`Conversation`] (history, trimming, cache reuse; `EVT
//! context_shift` when it drops exchanges); `GEN` is a raw completion on the conversation's
//! cache, outside its history. The session itself keeps only transport and protocol
//! concerns: settings, framing, streaming, cancellation.

use std::io::Read;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::conversation::{Conversation, TooLong};
use crate::engine::Engine;
use crate::generate::{generate_events, Event, Flow, GenerateOptions, Generation};
use crate::model::ForwardError;
use crate::model::{CacheOptions, LoadOptions};
use crate::protocol::{
    self, End, EndReason, ErrorCode, Frame, LineParser, ProtocolError, Request, Setting, StreamMode,
};
use crate::sampler::SamplerConfig;
use crate::signal;
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

    fn set(&mut self, setting: Setting) -> &'static str {
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
                s.stop = list;
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
            "stop" => {
                let mut out = String::new();
                let _ = protocol::write_stop_list(&mut out, &s.stop);
                out
            }
            "stream" => s.stream.as_str().to_string(),
            "coalesce_ms" => s.coalesce_ms.to_string(),
            "ignore_eos" => if s.ignore_eos { "on" } else { "off" }.to_string(),
            _ => "?".to_string(),
        };
        format!("{key}={value}")
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
        let ended = live.end(result, ids.len(), started);
        self.finish(ended)
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
        let ended = live.end(result, prefill, started);
        self.finish(ended)
    }

    /// After a generation's `END`: acts on an output failure and on what arrived meanwhile.
    fn finish(
        &mut self,
        (write_error, deferred): (Option<TransportError>, Deferred),
    ) -> Result<Next> {
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

/// A running generation: its output, and the requests that arrive meanwhile.
struct Live<'a> {
    stream: Streamer<'a>,
    rx: &'a Receiver<Incoming>,
    deferred: Deferred,
    /// Requests answered `ERR` once the current token is written.
    busy: Vec<(ErrorCode, String)>,
}

impl<'a> Live<'a> {
    fn new(
        writer: &'a Writer,
        eol: &'static str,
        settings: &Settings,
        rx: &'a Receiver<Incoming>,
    ) -> Live<'a> {
        Live {
            stream: Streamer {
                writer,
                eol,
                mode: settings.stream,
                coalesce_ms: settings.coalesce_ms,
                pending: String::new(),
                line: String::new(),
                last_flush: Instant::now(),
                streamed: 0,
                write_error: None,
            },
            rx,
            deferred: Deferred::default(),
            busy: vec![],
        }
    }

    /// Writes `END` (or `ERR` if the generation failed before streaming anything);
    /// `prefill` is the prompt tokens it was given. Returns the output's failure, if any, and
    /// what arrived during the generation.
    fn end(
        mut self,
        result: Result<Generation>,
        prefill: usize,
        started: Instant,
    ) -> (Option<TransportError>, Deferred) {
        let stream = &mut self.stream;
        stream.flush();
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let end = match result {
            Ok(gen) => {
                let mut reason = EndReason::from(gen.reason);
                if gen.generated_tokens == 0 {
                    reason = EndReason::Length;
                }
                Some(End {
                    reason,
                    prompt: gen.prompt_tokens,
                    gen: gen.generated_tokens,
                    ms: elapsed_ms,
                    tps: gen.decode_tok_s(),
                })
            }
            Err(e) => {
                log::warn!("generation failed: {e:#}");
                if stream.streamed == 0 {
                    let code = if e
                        .downcast_ref::<ForwardError>()
                        .is_some_and(|f| matches!(f, ForwardError::ContextFull { .. }))
                    {
                        ErrorCode::ContextFull
                    } else {
                        ErrorCode::Model
                    };
                    stream.error(code, &format!("{e:#}"));
                    None
                } else {
                    Some(End {
                        reason: EndReason::Error,
                        prompt: prefill,
                        gen: stream.streamed,
                        ms: elapsed_ms,
                        tps: 0.0,
                    })
                }
            }
        };
        if let Some(end) = end {
            if stream.mode == StreamMode::Raw {
                stream.raw_line_end();
            }
            stream.line.clear();
            let _ = protocol::write_end(&mut stream.line, &end);
            stream.send_line();
        }
        (stream.write_error.take(), self.deferred)
    }

    /// Streams one event, then reads what arrived meanwhile; `Flow::Stop` cancels.
    fn on_event(&mut self, event: Event) -> Flow {
        let text = match event {
            Event::Token(_, text) | Event::Tail(text) => text,
            Event::Shift(shift) => {
                let detail = format!("dropped={} kept={}", shift.dropped, shift.kept);
                self.stream.event("shift", &detail);
                return Flow::Continue;
            }
        };
        let mut flow = self.stream.push(text);
        if poll_input(self.rx, &mut self.deferred, &mut self.busy) {
            flow = Flow::Stop;
        }
        for (code, msg) in self.busy.drain(..) {
            self.stream.error(code, &msg);
        }
        let d = &self.deferred;
        if d.quit || d.reconnected || d.failed.is_some() {
            flow = Flow::Stop;
        }
        flow
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
    write_error: Option<TransportError>,
}

impl Streamer<'_> {
    /// Takes one token's text; `Flow::Stop` if the output is gone.
    fn push(&mut self, text: &str) -> Flow {
        self.streamed += 1;
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
            // Raw text has no line end of its own; the event gets a line of its own.
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
