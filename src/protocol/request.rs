//! Requests: a framed line parsed into a verb and its arguments, `SET` values checked and
//! decoded here so the session only applies them.

use super::escape::unescape_into;
use super::ProtocolError;

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
#[derive(Clone, Debug, PartialEq)]
pub enum Setting {
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
    /// Stop strings, decoded (on the wire: space-separated, each escaped like `TOK` text);
    /// empty clears them.
    Stop(Vec<String>),
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
#[derive(Clone, Debug, PartialEq)]
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
    Set(Setting),
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

fn parse_setting(key: &'static str, value: &str) -> Result<Setting, ProtocolError> {
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
        "stop" if value.eq_ignore_ascii_case("off") => Setting::Stop(vec![]),
        "stop" => {
            let expected = "off, or space-separated strings escaped like TOK text";
            let mut stops = vec![];
            for word in value.split([' ', '\t']).filter(|w| !w.is_empty()) {
                let mut stop = String::new();
                unescape_into(word, &mut stop).map_err(|_| bad(expected))?;
                stops.push(stop);
            }
            Setting::Stop(stops)
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
