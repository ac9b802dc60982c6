//! Framing: a request is one line ended by LF, CR or CRLF. Bytes are collected up to a limit;
//! a longer line is dropped byte by byte until its end and reported once as
//! [`ProtocolError::LineTooLong`], so the stream resynchronises at the next line end whatever
//! arrives. A lone 0x03 (Ctrl-C) drops the partial line and is reported as
//! [`Frame::Interrupt`]; 0x04 (Ctrl-D) on an empty line is [`Frame::Hangup`]; backspace and
//! DEL erase one character (people type into `picocom`); NUL bytes (line noise when a cable
//! is plugged in) are ignored.

use super::ProtocolError;

/// Largest line limit [`LineParser::new`] accepts: the size of its buffer.
pub const MAX_LINE_LIMIT: usize = 16 * 1024;

/// Line limit used when none is configured.
pub const DEFAULT_LINE_LIMIT: usize = 4096;

/// Smallest line limit accepted (room for `SET coalesce_ms 1000`).
pub const MIN_LINE_LIMIT: usize = 64;

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
