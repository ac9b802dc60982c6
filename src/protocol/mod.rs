//! The serve line protocol (see `PROTOCOL.md`): line framing within a fixed buffer
//! (`frame.rs`), request parsing (`request.rs`), the escaping of text onto one line
//! (`escape.rs`), and response formatting (`OK`, `ERR`, `TOK`, `END`, `EVT`; `response.rs`),
//! with typed error codes (`error.rs`). Framing never allocates and parsing borrows the line;
//! only stop strings, which are decoded, are allocated.

mod error;
mod escape;
mod frame;
mod request;
mod response;
#[cfg(test)]
mod tests;

pub use error::{ErrorCode, ProtocolError};
pub use escape::{escape_into, unescape_into, write_stop_list, UnescapeError};
pub use frame::{Frame, LineParser, DEFAULT_LINE_LIMIT, MAX_LINE_LIMIT, MIN_LINE_LIMIT};
pub use request::{parse, Request, Setting, StreamMode, KEYS};
pub use response::{write_end, write_err, write_evt, write_tok, End, EndReason};
