//! What can go wrong with a request: the `ERR` codes, and the framing and parsing errors
//! that carry them.

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
