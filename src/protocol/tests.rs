//! The protocol's framing, parsing, escaping and formatting, as specified in `PROTOCOL.md`.

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
    fn set(s: &str) -> Setting {
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
    assert_eq!(set("SET stop off"), Setting::Stop(vec![]));
    assert_eq!(
        set("SET stop \\n\\n User:\\x20"),
        Setting::Stop(vec!["\n\n".into(), "User: ".into()])
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

/// `GET stop` writes each stop string so that `SET stop` reads it back unchanged: spaces
/// and backslashes escaped, and a literal `\x20` (four characters) kept as text.
#[test]
fn stop_list_round_trips_through_set_and_get() {
    fn shown(stops: &[&str]) -> String {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut out = String::new();
        write_stop_list(&mut out, &stops).unwrap();
        out
    }
    assert_eq!(shown(&[]), "off");
    assert_eq!(shown(&["\\x20"]), "\\\\x20");
    assert_eq!(shown(&["User: ", "\n\n"]), "User:\\x20 \\n\\n");
    assert_eq!(shown(&["a\tb"]), "a\\x09b");
    assert_eq!(shown(&["off"]), "\\x6Fff");
    assert_eq!(shown(&["OFF", "off"]), "OFF off");
    for stops in [
        &["\\x20"][..],
        &["User: ", "\n\n"],
        &["a\tb", "\\", "\\\\x20 "],
        &["off"],
        &["Off", "x"],
    ] {
        let wire = format!("SET stop {}", shown(stops));
        let back: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            parse(&wire),
            Ok(Request::Set(Setting::Stop(back))),
            "{wire}"
        );
    }
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

    /// Any list of stop strings reads back from what `GET stop` shows.
    #[test]
    fn stop_list_round_trip(stops in proptest::collection::vec(".+", 1..4)) {
        let mut wire = String::from("SET stop ");
        write_stop_list(&mut wire, &stops).unwrap();
        prop_assert_eq!(parse(&wire), Ok(Request::Set(Setting::Stop(stops))));
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
