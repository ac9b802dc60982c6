//! A running generation: its text written as `TOK` lines or raw text (coalesced if asked,
//! with `EVT` and `ERR` lines between), the requests read meanwhile, and its `END`.

use std::sync::mpsc::Receiver;
use std::time::Instant;

use anyhow::Result;

use crate::generate::{Event, Flow, Generation};
use crate::model::ForwardError;
use crate::protocol::{self, End, EndReason, ErrorCode, StreamMode};
use crate::transport::{TransportError, Writer};

use super::input::{poll_input, Deferred, Incoming};
use super::settings::Settings;

/// A running generation: its output, and the requests that arrive meanwhile.
pub(super) struct Live<'a> {
    stream: Streamer<'a>,
    rx: &'a Receiver<Incoming>,
    deferred: Deferred,
    /// Requests answered `ERR` once the current token is written.
    busy: Vec<(ErrorCode, String)>,
}

impl<'a> Live<'a> {
    pub(super) fn new(
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
    pub(super) fn end(
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
    pub(super) fn on_event(&mut self, event: Event) -> Flow {
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
