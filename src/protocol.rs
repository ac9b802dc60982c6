//! The serve line protocol: a bounded, allocation-free request parser on `heapless`, and the
//! response formatting (`OK`, `ERR`, `TOK`, `END`, `EVT`). See `PROTOCOL.md`.
//!
//! Framing: a request is one line ended by LF, CR or CRLF. Bytes are collected up to a limit;
//! a longer line is dropped byte by byte until its end and reported once as
//! [`ErrorCode::LineTooLong`], so the stream resynchronises at the next line end whatever
//! arrives. A lone 0x03 (Ctrl-C) drops the partial line and is reported as
//! [`Frame::Interrupt`]; 0x04 (Ctrl-D) on an empty line is [`Frame::Hangup`]; backspace and
//! DEL erase one character (people type into `picocom`); NUL bytes (line noise when a cable
//! is plugged in) are ignored.

use core::fmt;

/// Largest line limit [`LineParser::new`] accepts: the size of its buffer.
pub const MAX_LINE_LIMIT: usize = 16 * 1024;

/// Line limit used when none is configured.
pub const DEFAULT_LINE_LIMIT: usize = 4096;

/// Smallest line limit accepted (room for `SET coalesce_ms 1000`).
pub const MIN_LINE_LIMIT: usize = 64;

/// The `ERR` codes: what went wrong with a request, for callers that branch on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The first word is not a verb.
    UnknownVerb,
    /// The verb's arguments are missing or extra.
    BadRequest,
    /// `SET`/`GET` of a key that does not exist.
    BadKey,
    /// `SET` with a value the key does not accept.
    BadValue,
    /// The line exceeded the limit; it was dropped.
    LineTooLong,
    /// The line is not valid UTF-8; it was dropped.
    InvalidUtf8,
    /// A request other than `STOP` arrived during a generation.
    Busy,
    /// `STOP` with nothing to stop.
    Idle,
    /// The prompt plus the reply cannot fit in the model's context.
    ContextFull,
    /// The model (or tokenizer, or chat template) failed.
    Model,
}

impl ErrorCode {
    /// Every code, in documentation order.
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::UnknownVerb,
        ErrorCode::BadRequest,
        ErrorCode::BadKey,
        ErrorCode::BadValue,
        ErrorCode::LineTooLong,
        ErrorCode::InvalidUtf8,
        ErrorCode::Busy,
        ErrorCode::Idle,
        ErrorCode::ContextFull,
        ErrorCode::Model,
    ];

    /// The code as written after `ERR`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::UnknownVerb => "unknown_verb",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::BadKey => "bad_key",
            ErrorCode::BadValue => "bad_value",
            ErrorCode::LineTooLong => "line_too_long",
            ErrorCode::InvalidUtf8 => "invalid_utf8",
            ErrorCode::Busy => "busy",
            ErrorCode::Idle => "idle",
            ErrorCode::ContextFull => "context_full",
            ErrorCode::Model => "model",
        }
    }
}

/// A request that could not be framed or parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// See [`ErrorCode::UnknownVerb`].
    #[error("unknown verb (try HELP)")]
    UnknownVerb,
    /// See [`ErrorCode::BadRequest`]; the text says what the verb expects.
    #[error("usage: {0}")]
    BadRequest(&'static str),
    /// See [`ErrorCode::BadKey`].
    #[error("unknown key (GET lists them)")]
    BadKey,
    /// See [`ErrorCode::BadValue`]; the text says what the key accepts.
    #[error("{key} expects {expected}")]
    BadValue {
        /// The key's name.
        key: &'static str,
        /// What it accepts.
        expected: &'static str,
    },
    /// See [`ErrorCode::LineTooLong`].
    #[error("line of {len} bytes exceeds the limit of {limit}")]
    LineTooLong {
        /// Bytes in the dropped line (without its terminator).
        len: usize,
        /// The configured limit.
        limit: usize,
    },
    /// See [`ErrorCode::InvalidUtf8`].
    #[error("line is not valid UTF-8 (byte {at})")]
    InvalidUtf8 {
        /// Offset of the first invalid byte.
        at: usize,
    },
}

impl ProtocolError {
    /// The `ERR` code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::UnknownVerb => ErrorCode::UnknownVerb,
            ProtocolError::BadRequest(_) => ErrorCode::BadRequest,
            ProtocolError::BadKey => ErrorCode::BadKey,
            ProtocolError::BadValue { .. } => ErrorCode::BadValue,
            ProtocolError::LineTooLong { .. } => ErrorCode::LineTooLong,
            ProtocolError::InvalidUtf8 { .. } => ErrorCode::InvalidUtf8,
        }
    }
}

/// How generated text is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamMode {
    /// `TOK <escaped text>` lines (for programs).
    Escaped,
    /// The text itself, then a newline and the `END` line (for people).
    Raw,
}

impl StreamMode {
    /// The value as written by `GET stream`.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamMode::Escaped => "escaped",
            StreamMode::Raw => "raw",
        }
    }
}

/// A settable key and its parsed value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Setting<'a> {
    /// Sampling temperature, 0 = greedy.
    Temp(f32),
    /// Top-k, 0 = off.
    TopK(usize),
    /// Top-p in (0, 1].
    TopP(f32),
    /// Min-p in [0, 1].
    MinP(f32),
    /// Repetition penalty, 1 = off.
    RepeatPenalty(f32),
    /// Sampler seed.
    Seed(u64),
    /// Cap on generated tokens.
    MaxTokens(usize),
    /// Stop strings, space-separated, each escaped like `TOK` text; `None` clears them.
    Stop(Option<&'a str>),
    /// Output mode.
    Stream(StreamMode),
    /// Gather `TOK` text for this many milliseconds per line (0 = one line per token).
    CoalesceMs(u64),
    /// Generate through end-of-sequence tokens.
    IgnoreEos(bool),
}

/// The keys of `SET`/`GET`, in the order `GET` lists them.
pub const KEYS: [&str; 11] = [
    "temp",
    "top_k",
    "top_p",
    "min_p",
    "repeat_penalty",
    "seed",
    "max_tokens",
    "stop",
    "stream",
    "coalesce_ms",
    "ignore_eos",
];

/// One parsed request line; text arguments borrow the line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Request<'a> {
    /// A blank line: no response (a new prompt when echoing).
    Empty,
    /// `PING` → `OK PONG`.
    Ping,
    /// `INFO` → `OK model=… context=… quant=… version=…`.
    Info,
    /// `HELP` → one `OK` line listing verbs and keys.
    Help,
    /// `SET <key> <value>`.
    Set(Setting<'a>),
    /// `GET [<key>]`; `None` lists every key.
    Get(Option<&'static str>),
    /// `GEN <text>`: raw completion.
    Gen(&'a str),
    /// `CHAT <text>`: one user turn.
    Chat(&'a str),
    /// `SYSTEM [<text>]`: set (or with no text, clear) the system prompt.
    System(&'a str),
    /// `RESET`: forget the conversation.
    Reset,
    /// `STOP`: cancel the running generation.
    Stop,
    /// `QUIT`: end the session.
    Quit,
}

/// What the parser made of the bytes so far.
#[derive(Debug, PartialEq)]
pub enum Frame<'a> {
    /// A complete line (its text, without terminator; may be empty).
    Line(&'a str),
    /// A line that had to be dropped.
    Error(ProtocolError),
    /// A lone 0x03: cancel.
    Interrupt,
    /// 0x04 on an empty line: end of session.
    Hangup,
}

/// Splits a byte stream into lines, within a fixed buffer. Never allocates, never panics.
#[derive(Debug)]
pub struct LineParser {
    buf: heapless::Vec<u8, MAX_LINE_LIMIT>, // (bytes of the current line,)
    limit: usize,
    /// Bytes seen in a line that went over the limit, counted until its end.
    overflow: Option<usize>,
    /// The previous byte was CR: a following LF belongs to it.
    after_cr: bool,
    /// `buf` holds a line already handed out; the next byte starts a new one.
    done: bool,
}

impl Default for LineParser {
    fn default() -> Self {
        Self::new(DEFAULT_LINE_LIMIT)
    }
}

impl LineParser {
    /// A parser for lines of at most `limit` bytes, clamped to
    /// [`MIN_LINE_LIMIT`]..=[`MAX_LINE_LIMIT`].
    pub fn new(limit: usize) -> LineParser {
        LineParser {
            buf: heapless::Vec::new(),
            limit: limit.clamp(MIN_LINE_LIMIT, MAX_LINE_LIMIT),
            overflow: None,
            after_cr: false,
            done: false,
        }
    }

    /// The line limit in force.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Feeds one byte; returns a frame when this byte completes one.
    pub fn push(&mut self, byte: u8) -> Option<Frame<'_>> {
        if core::mem::take(&mut self.done) {
            self.buf.clear();
        }
        let after_cr = core::mem::take(&mut self.after_cr);
        match byte {
            b'\n' if after_cr => None,
            b'\n' | b'\r' => {
                self.after_cr = byte == b'\r';
                Some(self.end_line())
            }
            0x03 => {
                self.clear();
                Some(Frame::Interrupt)
            }
            0x04 if self.buf.is_empty() && self.overflow.is_none() => Some(Frame::Hangup),
            0x00 => None,
            0x08 | 0x7f => {
                self.erase_char();
                None
            }
            _ => {
                if let Some(n) = &mut self.overflow {
                    *n = n.saturating_add(1);
                } else if self.buf.len() >= self.limit || self.buf.push(byte).is_err() {
                    self.overflow = Some(self.buf.len() + 1);
                    self.buf.clear();
                }
                None
            }
        }
    }

    /// Drops the partial line.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.overflow = None;
    }

    fn end_line(&mut self) -> Frame<'_> {
        self.done = true;
        if let Some(len) = self.overflow.take() {
            return Frame::Error(ProtocolError::LineTooLong {
                len,
                limit: self.limit,
            });
        }
        match core::str::from_utf8(&self.buf) {
            Ok(line) => Frame::Line(line),
            Err(e) => Frame::Error(ProtocolError::InvalidUtf8 {
                at: e.valid_up_to(),
            }),
        }
    }

    /// Backspace: removes the last character (a whole UTF-8 sequence).
    fn erase_char(&mut self) {
        if self.overflow.is_some() {
            return;
        }
        while let Some(b) = self.buf.pop() {
            if b & 0xC0 != 0x80 {
                break;
            }
        }
    }
}

/// Parses one line (as framed by [`LineParser`]) into a request.
pub fn parse(line: &str) -> Result<Request<'_>, ProtocolError> {
    let line = line.trim_start_matches([' ', '\t']);
    let (verb, rest) = match line.find([' ', '\t']) {
        Some(at) => (&line[..at], line[at..].trim_start_matches([' ', '\t'])),
        None => (line, ""),
    };
    if verb.is_empty() {
        return Ok(Request::Empty);
    }
    let no_args = |req: Request<'static>, usage: &'static str| {
        if rest.trim_end().is_empty() {
            Ok(req)
        } else {
            Err(ProtocolError::BadRequest(usage))
        }
    };
    let text = |usage: &'static str| {
        if rest.trim_end().is_empty() {
            Err(ProtocolError::BadRequest(usage))
        } else {
            Ok(rest)
        }
    };
    let is = |name: &str| verb.eq_ignore_ascii_case(name);
    if is("PING") {
        no_args(Request::Ping, "PING")
    } else if is("INFO") {
        no_args(Request::Info, "INFO")
    } else if is("HELP") {
        no_args(Request::Help, "HELP")
    } else if is("RESET") {
        no_args(Request::Reset, "RESET")
    } else if is("STOP") {
        no_args(Request::Stop, "STOP")
    } else if is("QUIT") {
        no_args(Request::Quit, "QUIT")
    } else if is("GEN") {
        text("GEN <text>").map(Request::Gen)
    } else if is("CHAT") {
        text("CHAT <text>").map(Request::Chat)
    } else if is("SYSTEM") {
        Ok(Request::System(rest))
    } else if is("GET") {
        let key = rest.trim_end();
        if key.is_empty() {
            return Ok(Request::Get(None));
        }
        if key.contains([' ', '\t']) {
            return Err(ProtocolError::BadRequest("GET [<key>]"));
        }
        key_name(key).map(|k| Request::Get(Some(k)))
    } else if is("SET") {
        let (key, value) = match rest.find([' ', '\t']) {
            Some(at) => (&rest[..at], rest[at..].trim_matches([' ', '\t'])),
            None => (rest.trim_end(), ""),
        };
        if key.is_empty() || value.is_empty() {
            return Err(ProtocolError::BadRequest("SET <key> <value>"));
        }
        parse_setting(key_name(key)?, value).map(Request::Set)
    } else {
        Err(ProtocolError::UnknownVerb)
    }
}

/// The canonical name of a key, matched case-insensitively.
fn key_name(key: &str) -> Result<&'static str, ProtocolError> {
    KEYS.iter()
        .find(|k| k.eq_ignore_ascii_case(key))
        .copied()
        .ok_or(ProtocolError::BadKey)
}

fn parse_setting<'a>(key: &'static str, value: &'a str) -> Result<Setting<'a>, ProtocolError> {
    let bad = |expected: &'static str| ProtocolError::BadValue { key, expected };
    let float = |lo: f32, hi: f32, expected: &'static str| {
        value
            .parse::<f32>()
            .ok()
            .filter(|v| v.is_finite() && *v >= lo && *v <= hi)
            .ok_or(bad(expected))
    };
    let int = |expected: &'static str| value.parse::<u64>().map_err(|_| bad(expected));
    Ok(match key {
        "temp" => Setting::Temp(float(0.0, 100.0, "a number in [0, 100]")?),
        "top_k" => Setting::TopK(int("a whole number (0 = off)")? as usize),
        "top_p" => Setting::TopP(float(0.0, 1.0, "a number in (0, 1]").and_then(|p| {
            if p > 0.0 {
                Ok(p)
            } else {
                Err(bad("a number in (0, 1]"))
            }
        })?),
        "min_p" => Setting::MinP(float(0.0, 1.0, "a number in [0, 1]")?),
        "repeat_penalty" => Setting::RepeatPenalty(float(0.01, 100.0, "a number in [0.01, 100]")?),
        "seed" => Setting::Seed(int("a whole number")?),
        "max_tokens" => {
            let n = int("a whole number from 1")?;
            if n == 0 {
                return Err(bad("a whole number from 1"));
            }
            Setting::MaxTokens(usize::try_from(n).unwrap_or(usize::MAX))
        }
        "stop" => {
            if value.eq_ignore_ascii_case("off") {
                Setting::Stop(None)
            } else {
                let expected = "off, or space-separated strings escaped like TOK text";
                for s in value.split([' ', '\t']).filter(|s| !s.is_empty()) {
                    unescape_into(s, &mut Discard).map_err(|_| bad(expected))?;
                }
                Setting::Stop(Some(value))
            }
        }
        "stream" => Setting::Stream(if value.eq_ignore_ascii_case("raw") {
            StreamMode::Raw
        } else if value.eq_ignore_ascii_case("escaped") {
            StreamMode::Escaped
        } else {
            return Err(bad("raw or escaped"));
        }),
        "coalesce_ms" => {
            let ms = int("a whole number of milliseconds up to 10000")?;
            if ms > 10_000 {
                return Err(bad("a whole number of milliseconds up to 10000"));
            }
            Setting::CoalesceMs(ms)
        }
        "ignore_eos" => Setting::IgnoreEos(parse_bool(value).ok_or(bad("on or off"))?),
        _ => return Err(ProtocolError::BadKey),
    })
}

fn parse_bool(value: &str) -> Option<bool> {
    ["on", "true", "1"]
        .iter()
        .any(|t| value.eq_ignore_ascii_case(t))
        .then_some(true)
        .or_else(|| {
            ["off", "false", "0"]
                .iter()
                .any(|f| value.eq_ignore_ascii_case(f))
                .then_some(false)
        })
}

/// A `fmt::Write` that keeps nothing (validation without allocating).
struct Discard;

impl fmt::Write for Discard {
    fn write_str(&mut self, _: &str) -> fmt::Result {
        Ok(())
    }
}

/// Writes `text` so it fits on one line: `\` → `\\`, LF → `\n`, CR → `\r`, other control
/// bytes (C0 and DEL) → `\xHH`; everything else, non-ASCII included, as is.
pub fn escape_into(text: &str, out: &mut impl fmt::Write) -> fmt::Result {
    let mut start = 0;
    for (at, c) in text.char_indices() {
        let esc: Option<&str> = match c {
            '\\' => Some("\\\\"),
            '\n' => Some("\\n"),
            '\r' => Some("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => None,
            _ => continue,
        };
        out.write_str(&text[start..at])?;
        match esc {
            Some(e) => out.write_str(e)?,
            None => write!(out, "\\x{:02X}", c as u32)?,
        }
        start = at + c.len_utf8();
    }
    out.write_str(&text[start..])
}

/// The inverse of [`escape_into`]; `\xHH` is limited to ASCII so the result stays UTF-8.
pub fn unescape_into(text: &str, out: &mut impl fmt::Write) -> Result<(), UnescapeError> {
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.write_char(c).map_err(|_| UnescapeError)?;
            continue;
        }
        let c = match chars.next() {
            Some('\\') => '\\',
            Some('n') => '\n',
            Some('r') => '\r',
            Some('t') => '\t',
            Some('x') => {
                let hi = chars.next().and_then(|c| c.to_digit(16));
                let lo = chars.next().and_then(|c| c.to_digit(16));
                match (hi, lo) {
                    (Some(hi), Some(lo)) if hi < 8 => char::from((hi * 16 + lo) as u8),
                    _ => return Err(UnescapeError),
                }
            }
            _ => return Err(UnescapeError),
        };
        out.write_char(c).map_err(|_| UnescapeError)?;
    }
    Ok(())
}

/// An escape sequence that [`unescape_into`] does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad escape sequence (use \\\\, \\n, \\r, \\t or \\xHH below \\x80)")]
pub struct UnescapeError;

/// Why a generation ended, as written after `END`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// End-of-sequence token.
    Eos,
    /// `max_tokens` (or the context) reached.
    Length,
    /// A stop string matched.
    Stop,
    /// `STOP` or 0x03.
    Cancelled,
    /// The output completes its format (grammar, JSON schema).
    Grammar,
    /// The model failed after streaming began.
    Error,
}

impl EndReason {
    /// The word written after `END`.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Eos => "eos",
            EndReason::Length => "length",
            EndReason::Stop => "stop",
            EndReason::Cancelled => "cancelled",
            EndReason::Grammar => "grammar",
            EndReason::Error => "error",
        }
    }
}

impl From<crate::generate::StopReason> for EndReason {
    fn from(r: crate::generate::StopReason) -> EndReason {
        use crate::generate::StopReason as S;
        match r {
            S::Eos => EndReason::Eos,
            S::Length => EndReason::Length,
            S::Stop => EndReason::Stop,
            S::Cancelled => EndReason::Cancelled,
            S::Grammar => EndReason::Grammar,
        }
    }
}

/// The summary line closing a generation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct End {
    /// Why it ended.
    pub reason: EndReason,
    /// Prompt tokens fed to the model for this request.
    pub prompt: usize,
    /// Tokens generated.
    pub gen: usize,
    /// Wall time of the request in milliseconds.
    pub ms: u64,
    /// Decode speed in tokens per second.
    pub tps: f64,
}

/// `TOK <escaped text>`, without line terminator.
pub fn write_tok(out: &mut impl fmt::Write, text: &str) -> fmt::Result {
    out.write_str("TOK ")?;
    escape_into(text, out)
}

/// `END <reason> prompt=<n> gen=<n> ms=<n> tps=<x.y>`, without line terminator.
pub fn write_end(out: &mut impl fmt::Write, end: &End) -> fmt::Result {
    let tps = if end.tps.is_finite() { end.tps } else { 0.0 };
    write!(
        out,
        "END {} prompt={} gen={} ms={} tps={:.1}",
        end.reason.as_str(),
        end.prompt,
        end.gen,
        end.ms,
        tps
    )
}

/// `ERR <code> <message>`, the message escaped onto one line, without line terminator.
pub fn write_err(out: &mut impl fmt::Write, code: ErrorCode, message: &str) -> fmt::Result {
    write!(out, "ERR {} ", code.as_str())?;
    escape_into(message, out)
}

/// `EVT <name>[ <detail>]`, the detail escaped, without line terminator.
pub fn write_evt(out: &mut impl fmt::Write, name: &str, detail: &str) -> fmt::Result {
    write!(out, "EVT {name}")?;
    if !detail.is_empty() {
        out.write_char(' ')?;
        escape_into(detail, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What a frame looks like once owned, for comparing sequences.
    #[derive(Debug, PartialEq)]
    enum F {
        Line(String),
        Err(ProtocolError),
        Interrupt,
        Hangup,
    }

    fn frames_with(parser: &mut LineParser, bytes: &[u8]) -> Vec<F> {
        let mut out = vec![];
        for &b in bytes {
            match parser.push(b) {
                None => {}
                Some(Frame::Line(s)) => out.push(F::Line(s.to_string())),
                Some(Frame::Error(e)) => out.push(F::Err(e)),
                Some(Frame::Interrupt) => out.push(F::Interrupt),
                Some(Frame::Hangup) => out.push(F::Hangup),
            }
        }
        out
    }

    fn frames(bytes: &[u8]) -> Vec<F> {
        frames_with(&mut LineParser::default(), bytes)
    }

    fn line(s: &str) -> F {
        F::Line(s.to_string())
    }

    fn err(line: &str) -> ErrorCode {
        parse(line).unwrap_err().code()
    }

    #[test]
    fn lf_cr_and_crlf_each_end_one_line() {
        assert_eq!(
            frames(b"PING\nINFO\rHELP\r\nGET\n\rRESET\r\r\n"),
            [
                line("PING"),
                line("INFO"),
                line("HELP"),
                line("GET"),
                line(""),
                line("RESET"),
                line(""),
            ]
        );
    }

    #[test]
    fn empty_and_blank_lines_parse_as_empty() {
        assert_eq!(frames(b"\n\n"), [line(""), line("")]);
        assert_eq!(parse(""), Ok(Request::Empty));
        assert_eq!(parse("  \t "), Ok(Request::Empty));
    }

    #[test]
    fn every_verb_case_insensitive() {
        assert_eq!(parse("PING"), Ok(Request::Ping));
        assert_eq!(parse("ping"), Ok(Request::Ping));
        assert_eq!(parse("  Info "), Ok(Request::Info));
        assert_eq!(parse("help"), Ok(Request::Help));
        assert_eq!(parse("reset"), Ok(Request::Reset));
        assert_eq!(parse("Stop"), Ok(Request::Stop));
        assert_eq!(parse("quit"), Ok(Request::Quit));
        assert_eq!(parse("gen Once upon"), Ok(Request::Gen("Once upon")));
        assert_eq!(parse("GEN  two  spaces "), Ok(Request::Gen("two  spaces ")));
        assert_eq!(parse("Chat hi there"), Ok(Request::Chat("hi there")));
        assert_eq!(parse("SYSTEM Be brief."), Ok(Request::System("Be brief.")));
        assert_eq!(parse("system"), Ok(Request::System("")));
        assert_eq!(parse("GET"), Ok(Request::Get(None)));
        assert_eq!(parse("get TEMP"), Ok(Request::Get(Some("temp"))));
        assert_eq!(parse("SET temp 0.7"), Ok(Request::Set(Setting::Temp(0.7))));
        assert_eq!(parse("gen\tx"), Ok(Request::Gen("x")));
    }

    #[test]
    fn every_setting_parses() {
        fn set(s: &str) -> Setting<'_> {
            match parse(s) {
                Ok(Request::Set(v)) => v,
                other => panic!("{s:?} gave {other:?}"),
            }
        }
        assert_eq!(set("SET temp 0"), Setting::Temp(0.0));
        assert_eq!(set("SET top_k 40"), Setting::TopK(40));
        assert_eq!(set("SET top_p 0.9"), Setting::TopP(0.9));
        assert_eq!(set("SET min_p 0.05"), Setting::MinP(0.05));
        assert_eq!(set("SET repeat_penalty 1.1"), Setting::RepeatPenalty(1.1));
        assert_eq!(set("SET seed 7"), Setting::Seed(7));
        assert_eq!(set("SET max_tokens 32"), Setting::MaxTokens(32));
        assert_eq!(set("SET stop off"), Setting::Stop(None));
        assert_eq!(
            set("SET stop \\n\\n User:"),
            Setting::Stop(Some("\\n\\n User:"))
        );
        assert_eq!(set("SET stream raw"), Setting::Stream(StreamMode::Raw));
        assert_eq!(
            set("set STREAM Escaped"),
            Setting::Stream(StreamMode::Escaped)
        );
        assert_eq!(set("SET coalesce_ms 50"), Setting::CoalesceMs(50));
        assert_eq!(set("SET ignore_eos on"), Setting::IgnoreEos(true));
        assert_eq!(set("SET ignore_eos 0"), Setting::IgnoreEos(false));
        for key in KEYS {
            assert_eq!(parse(&format!("GET {key}")), Ok(Request::Get(Some(key))));
        }
    }

    #[test]
    fn every_parse_error_code() {
        assert_eq!(err("FROB"), ErrorCode::UnknownVerb);
        assert_eq!(err("PINGx"), ErrorCode::UnknownVerb);
        assert_eq!(err("PING now"), ErrorCode::BadRequest);
        assert_eq!(err("GEN"), ErrorCode::BadRequest);
        assert_eq!(err("CHAT   "), ErrorCode::BadRequest);
        assert_eq!(err("SET temp"), ErrorCode::BadRequest);
        assert_eq!(err("SET"), ErrorCode::BadRequest);
        assert_eq!(err("GET temp seed"), ErrorCode::BadRequest);
        assert_eq!(err("SET colour red"), ErrorCode::BadKey);
        assert_eq!(err("GET colour"), ErrorCode::BadKey);
        assert_eq!(err("SET temp hot"), ErrorCode::BadValue);
        assert_eq!(err("SET temp -1"), ErrorCode::BadValue);
        assert_eq!(err("SET temp NaN"), ErrorCode::BadValue);
        assert_eq!(err("SET top_p 0"), ErrorCode::BadValue);
        assert_eq!(err("SET top_p 1.5"), ErrorCode::BadValue);
        assert_eq!(err("SET top_k -3"), ErrorCode::BadValue);
        assert_eq!(err("SET max_tokens 0"), ErrorCode::BadValue);
        assert_eq!(err("SET stream loud"), ErrorCode::BadValue);
        assert_eq!(err("SET stop a\\q"), ErrorCode::BadValue);
        assert_eq!(err("SET stop \\xC3"), ErrorCode::BadValue);
        assert_eq!(err("SET coalesce_ms 20000"), ErrorCode::BadValue);
        assert_eq!(err("SET ignore_eos maybe"), ErrorCode::BadValue);
        assert_eq!(
            parse("SET temp hot").unwrap_err().to_string(),
            "temp expects a number in [0, 100]"
        );
        // The framing codes come from the line parser.
        let mut p = LineParser::new(64);
        let long = [b'a'; 65];
        assert_eq!(
            frames_with(&mut p, &[&long[..], b"\n"].concat()),
            [F::Err(ProtocolError::LineTooLong { len: 65, limit: 64 })]
        );
        assert_eq!(
            frames(b"GEN \xff\n"),
            [F::Err(ProtocolError::InvalidUtf8 { at: 4 })]
        );
        let codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            codes,
            [
                "unknown_verb",
                "bad_request",
                "bad_key",
                "bad_value",
                "line_too_long",
                "invalid_utf8",
                "busy",
                "idle",
                "context_full",
                "model"
            ]
        );
    }

    #[test]
    fn over_long_line_is_one_error_then_the_next_line_works() {
        let mut bytes = vec![b'x'; 10_000];
        bytes.extend_from_slice(b"\r\nPING\r\n");
        assert_eq!(
            frames(&bytes),
            [
                F::Err(ProtocolError::LineTooLong {
                    len: 10_000,
                    limit: 4096
                }),
                line("PING")
            ]
        );
        // Exactly at the limit is fine.
        let mut p = LineParser::new(64);
        let at_limit = [b'a'; 64];
        assert_eq!(
            frames_with(&mut p, &[&at_limit[..], b"\n"].concat()),
            [line(&"a".repeat(64))]
        );
    }

    #[test]
    fn invalid_utf8_is_reported_then_the_next_line_works() {
        assert_eq!(
            frames(b"\xff\xfe\nPING\n"),
            [F::Err(ProtocolError::InvalidUtf8 { at: 0 }), line("PING")]
        );
        // A truncated sequence at the end of a line is invalid too; valid UTF-8 passes.
        assert_eq!(
            frames(&["é".as_bytes(), b"\xc3\n", "CHAT héllo 🙂\n".as_bytes()].concat()),
            [
                F::Err(ProtocolError::InvalidUtf8 { at: 2 }),
                line("CHAT héllo 🙂")
            ]
        );
    }

    #[test]
    fn interrupt_hangup_backspace_and_nul() {
        assert_eq!(frames(b"GEN abc\x03PING\n"), [F::Interrupt, line("PING")]);
        assert_eq!(frames(b"\x04"), [F::Hangup]);
        // Ctrl-D inside a line is ignored as a hangup (it is just a byte).
        assert_eq!(frames(b"a\x04\n"), [line("a\u{4}")]);
        assert_eq!(frames(b"PINX\x08G\n"), [line("PING")]);
        assert_eq!(frames("é\x7fe\n".as_bytes()), [line("e")]);
        assert_eq!(frames(b"\x00PI\x00NG\n"), [line("PING")]);
        assert_eq!(frames(b"\x7f\x7fPING\n"), [line("PING")]);
    }

    #[test]
    fn escaping_round_trips_and_stays_on_one_line() {
        let mut s = String::new();
        escape_into("a\\b\nc\rd\te\x1b[0m\x7fé🙂", &mut s).unwrap();
        assert_eq!(s, "a\\\\b\\nc\\rd\\x09e\\x1B[0m\\x7Fé🙂");
        let mut back = String::new();
        unescape_into(&s, &mut back).unwrap();
        assert_eq!(back, "a\\b\nc\rd\te\x1b[0m\x7fé🙂");
        assert_eq!(unescape_into("\\", &mut String::new()), Err(UnescapeError));
        assert_eq!(
            unescape_into("\\x4", &mut String::new()),
            Err(UnescapeError)
        );
    }

    #[test]
    fn response_lines() {
        let mut s = String::new();
        write_tok(&mut s, " Paris\n").unwrap();
        assert_eq!(s, "TOK  Paris\\n");
        s.clear();
        let end = End {
            reason: EndReason::Cancelled,
            prompt: 5,
            gen: 12,
            ms: 340,
            tps: 38.25,
        };
        write_end(&mut s, &end).unwrap();
        assert_eq!(s, "END cancelled prompt=5 gen=12 ms=340 tps=38.2");
        s.clear();
        write_err(&mut s, ErrorCode::Model, "bad\nthing").unwrap();
        assert_eq!(s, "ERR model bad\\nthing");
        s.clear();
        write_evt(&mut s, "reconnect", "").unwrap();
        assert_eq!(s, "EVT reconnect");
        s.clear();
        write_evt(&mut s, "context_shift", "dropped=2").unwrap();
        assert_eq!(s, "EVT context_shift dropped=2");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever comes before, a line end then `PING` is read as `PING`, no frame is
        /// longer than the limit, and nothing panics.
        #[test]
        fn arbitrary_bytes_never_panic_and_resynchronise(
            noise in proptest::collection::vec(any::<u8>(), 0..3000),
            limit in MIN_LINE_LIMIT..300usize,
        ) {
            let mut p = LineParser::new(limit);
            for &b in &noise {
                if let Some(Frame::Line(l)) = p.push(b) {
                    prop_assert!(l.len() <= limit);
                    let _ = parse(l);
                }
            }
            let tail = frames_with(&mut p, b"\nPING\n");
            prop_assert_eq!(tail.last(), Some(&line("PING")));
            prop_assert!(tail.len() <= 2);
        }

        /// Escaped text never contains a line end or control byte and unescapes to itself.
        #[test]
        fn escape_round_trip(text in any::<String>()) {
            let mut s = String::new();
            escape_into(&text, &mut s).unwrap();
            prop_assert!(!s.bytes().any(|b| b < 0x20 || b == 0x7f));
            let mut back = String::new();
            unescape_into(&s, &mut back).unwrap();
            prop_assert_eq!(back, text);
        }
    }
}
