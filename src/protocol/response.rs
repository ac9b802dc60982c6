//! Response lines, without their line end: `TOK`, `END`, `ERR`, `EVT`.

use core::fmt;

use super::escape::escape_into;
use super::ErrorCode;

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
