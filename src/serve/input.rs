//! The reader thread: bytes from the transport, framed into lines and queued for the
//! session; and the session's look at that queue between two tokens of a generation.

use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};

use crate::protocol::{self, ErrorCode, Frame, LineParser, ProtocolError, Request};
use crate::transport::{self, Received, TransportError, Writer};

/// What the reader thread passes on.
pub(super) enum Incoming {
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

/// Reads bytes, frames them, and queues what it finds; echoes for terminals.
pub(super) fn read_loop(
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

/// Messages that arrived during a generation and must be acted on after it.
#[derive(Default)]
pub(super) struct Deferred {
    /// `QUIT`, Ctrl-D, or the reader gone.
    pub quit: bool,
    /// End of input: no more requests, but the current reply is still wanted.
    pub eof: bool,
    /// A stop signal: cancel and exit.
    pub terminate: bool,
    /// The serial device was lost and is back.
    pub reconnected: bool,
    /// The transport failed for good.
    pub failed: Option<TransportError>,
}

/// Drains the reader's queue during a generation; true if it asks to cancel. Requests
/// other than `STOP`/`QUIT` are answered `ERR busy` (collected into `busy`).
pub(super) fn poll_input(
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
