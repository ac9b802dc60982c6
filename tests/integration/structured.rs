//! Constrained decoding on the default model (int8, one thread): with sampling on (temp
//! 0.8), every output of three JSON schemas and one grammar parses with `serde_json` and
//! passes a check of the format's constraints written here, independently of llguidance.
//! The same prompts without the constraint are measured for comparison (printed).
//!
//! CI runs a few seeds per format; the `full_*` tests are the full run (ignored: 200 seeds
//! per format, constrained and not, one engine thread each), run by hand with
//! `cargo test --test integration structured::full_ -- --ignored --nocapture --test-threads 4`.

use crate::common;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Instant;

use edgelm::constraint::{Compiler, Constraint, Format};
use edgelm::convert::Quant;
use edgelm::engine::Engine;
use edgelm::generate::{generate_constrained, Event, Flow, GenerateOptions, StopReason};
use edgelm::model::{CacheOptions, LoadOptions, State};
use edgelm::sampler::SamplerConfig;
use edgelm::template::Message;
use edgelm::tokenizer::{TokenBytes, Tokenizer};
use serde_json::Value;

/// Seeds per format in the CI test.
const CI_SEEDS: u64 = 8;

/// Seeds per format in the full run.
const FULL_SEEDS: u64 = 200;

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let opts = LoadOptions {
            threads: 1,
            ..Default::default()
        };
        Engine::load(&common::default_bundle(Quant::Int8), &opts).unwrap()
    })
}

fn compiler() -> &'static Compiler {
    static COMPILER: OnceLock<Compiler> = OnceLock::new();
    COMPILER.get_or_init(|| {
        let e = engine();
        Compiler::new(&e.tokenizer, e.model.config().vocab_size, &e.eos_ids()).unwrap()
    })
}

fn formats_dir() -> std::path::PathBuf {
    common::fixture("formats")
}

/// One format with the prompt that asks for it.
struct Case {
    name: &'static str,
    file: &'static str,
    prompt: &'static str,
    /// Above the longest output the format allows, so every constrained output completes.
    max_tokens: usize,
    check: fn(&Value) -> Result<(), String>,
}

const CASES: [Case; 4] = [
    Case {
        name: "flat object with enums",
        file: "lamp.json",
        prompt: "Turn the kitchen lamp on, medium brightness. Answer with a JSON object with \
                 the keys device, room, action and brightness.",
        max_tokens: 48,
        check: check_lamp,
    },
    Case {
        name: "nested object with an array",
        file: "shopping.json",
        prompt: "Make a shopping list called Breakfast with 2 loaves of bread and 6 eggs. \
                 Answer with a JSON object with the keys list (the list's name) and items \
                 (an array of objects with the keys name and quantity).",
        max_tokens: 160,
        check: check_shopping,
    },
    Case {
        name: "numbers with ranges",
        file: "thermostat.json",
        prompt: "Set the bedroom heating to 21.5 degrees for the next 3 hours with fan speed \
                 2. Answer with a JSON object with the keys room, temperature, hours and \
                 fan_speed.",
        max_tokens: 96,
        check: check_thermostat,
    },
    Case {
        name: "grammar (JSON array of commands)",
        file: "commands.lark",
        prompt: "Turn the lamp on at level 40 and switch the fan off. Answer with a JSON array \
                 of commands, each an object with the keys device, action and level (0 to \
                 100).",
        max_tokens: 96,
        check: check_commands,
    },
];

fn load_format(file: &str) -> Format {
    let path = formats_dir().join(file);
    if file.ends_with(".json") {
        Format::load_json_schema(&path).unwrap()
    } else {
        Format::load_grammar(&path).unwrap()
    }
}

// ---- Independent checks of each format's constraints ----

fn object<'a>(v: &'a Value, keys: &[&str]) -> Result<&'a serde_json::Map<String, Value>, String> {
    let obj = v.as_object().ok_or_else(|| format!("not an object: {v}"))?;
    let mut got: Vec<&str> = obj.keys().map(String::as_str).collect();
    let mut want = keys.to_vec();
    got.sort_unstable();
    want.sort_unstable();
    if got != want {
        return Err(format!("keys {got:?}, want {want:?}"));
    }
    Ok(obj)
}

fn one_of(v: &Value, key: &str, allowed: &[&str]) -> Result<(), String> {
    match v[key].as_str() {
        Some(s) if allowed.contains(&s) => Ok(()),
        _ => Err(format!("{key} = {} is not one of {allowed:?}", v[key])),
    }
}

fn integer_in(v: &Value, key: &str, lo: i64, hi: i64) -> Result<(), String> {
    match v[key].as_i64() {
        Some(n) if (lo..=hi).contains(&n) => Ok(()),
        _ => Err(format!(
            "{key} = {} is not an integer in {lo}..={hi}",
            v[key]
        )),
    }
}

fn name_like(v: &Value, key: &str) -> Result<(), String> {
    match v[key].as_str() {
        Some(s)
            if (1..=16).contains(&s.chars().count())
                && s.chars().all(|c| c.is_ascii_alphabetic() || c == ' ') =>
        {
            Ok(())
        }
        _ => Err(format!("{key} = {} is not 1-16 letters or spaces", v[key])),
    }
}

const ROOMS: [&str; 4] = ["kitchen", "bedroom", "living room", "hall"];

fn check_lamp(v: &Value) -> Result<(), String> {
    object(v, &["device", "room", "action", "brightness"])?;
    one_of(v, "device", &["lamp", "heater", "fan", "door"])?;
    one_of(v, "room", &ROOMS)?;
    one_of(v, "action", &["on", "off", "toggle"])?;
    one_of(v, "brightness", &["low", "medium", "high"])
}

fn check_shopping(v: &Value) -> Result<(), String> {
    object(v, &["list", "items"])?;
    name_like(v, "list")?;
    let items = v["items"]
        .as_array()
        .ok_or_else(|| format!("items = {} is not an array", v["items"]))?;
    if !(1..=3).contains(&items.len()) {
        return Err(format!("{} items, want 1 to 3", items.len()));
    }
    for item in items {
        object(item, &["name", "quantity"])?;
        name_like(item, "name")?;
        integer_in(item, "quantity", 1, 12)?;
    }
    Ok(())
}

fn check_thermostat(v: &Value) -> Result<(), String> {
    object(v, &["room", "temperature", "hours", "fan_speed"])?;
    one_of(v, "room", &ROOMS)?;
    match v["temperature"].as_f64() {
        Some(t) if (5.0..=30.0).contains(&t) => {}
        _ => {
            return Err(format!(
                "temperature = {} is not in 5..=30",
                v["temperature"]
            ))
        }
    }
    integer_in(v, "hours", 0, 23)?;
    integer_in(v, "fan_speed", 1, 5)
}

fn check_commands(v: &Value) -> Result<(), String> {
    let list = v.as_array().ok_or_else(|| format!("not an array: {v}"))?;
    if !(1..=3).contains(&list.len()) {
        return Err(format!("{} commands, want 1 to 3", list.len()));
    }
    for c in list {
        object(c, &["device", "action", "level"])?;
        one_of(c, "device", &["lamp", "fan", "heater"])?;
        one_of(c, "action", &["on", "off"])?;
        integer_in(c, "level", 0, 100)?;
    }
    Ok(())
}

/// Parses and checks one output; the text must be the JSON value alone (a Markdown fence
/// or a sentence around it fails, as it would for a script reading the line).
fn validate(case: &Case, text: &str) -> Result<(), String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
    (case.check)(&v)
}

#[test]
fn the_checks_reject_what_the_formats_forbid() {
    let lamp = &CASES[0];
    assert!(validate(
        lamp,
        r#"{"device": "lamp", "room": "kitchen", "action": "on", "brightness": "medium"}"#
    )
    .is_ok());
    for bad in [
        r#"```json {"device": "lamp"} ```"#,
        r#"{"device": "lamp", "room": "kitchen", "action": "on"}"#,
        r#"{"device": "sofa", "room": "kitchen", "action": "on", "brightness": "medium"}"#,
        r#"{"device": "lamp", "room": "kitchen", "action": "on", "brightness": "medium", "x": 1}"#,
    ] {
        assert!(validate(lamp, bad).is_err(), "{bad}");
    }
    let shopping = &CASES[1];
    assert!(validate(
        shopping,
        r#"{"list": "Breakfast", "items": [{"name": "bread", "quantity": 2}]}"#
    )
    .is_ok());
    for bad in [
        r#"{"list": "Breakfast", "items": []}"#,
        r#"{"list": "Breakfast", "items": [{"name": "bread", "quantity": 2.5}]}"#,
        r#"{"list": "Breakfast", "items": [{"name": "bread", "quantity": 13}]}"#,
        r#"{"list": "Breakfast!", "items": [{"name": "bread", "quantity": 2}]}"#,
    ] {
        assert!(validate(shopping, bad).is_err(), "{bad}");
    }
    let thermostat = &CASES[2];
    assert!(validate(
        thermostat,
        r#"{"room": "hall", "temperature": 21.5, "hours": 3, "fan_speed": 2}"#
    )
    .is_ok());
    for bad in [
        r#"{"room": "hall", "temperature": 31, "hours": 3, "fan_speed": 2}"#,
        r#"{"room": "hall", "temperature": 21.5, "hours": 24, "fan_speed": 2}"#,
        r#"{"room": "hall", "temperature": "21", "hours": 3, "fan_speed": 2}"#,
    ] {
        assert!(validate(thermostat, bad).is_err(), "{bad}");
    }
    let commands = &CASES[3];
    assert!(validate(
        commands,
        r#"[{"device": "lamp", "action": "on", "level": 40}]"#
    )
    .is_ok());
    for bad in [
        r#"[]"#,
        r#"[{"device": "lamp", "action": "dim", "level": 40}]"#,
        r#"[{"device": "lamp", "action": "on", "level": 101}]"#,
    ] {
        assert!(validate(commands, bad).is_err(), "{bad}");
    }
}

// ---- Generation ----

/// What a batch of seeded generations gave.
#[derive(Default)]
struct Tally {
    runs: usize,
    valid: usize,
    tokens: usize,
    reasons: BTreeMap<&'static str, usize>,
    failures: Vec<(u64, String, String)>, // (seed, text, why)
    first: String,                        // seed 0's output
    seconds: f64,
}

impl Tally {
    fn invalid_percent(&self) -> f64 {
        100.0 * (self.runs - self.valid) as f64 / self.runs.max(1) as f64
    }
}

/// One chat-templated generation of `case`'s prompt per seed, constrained or not.
fn run_seeds(case: &Case, constraint: Option<&Constraint>, seeds: std::ops::Range<u64>) -> Tally {
    let e = engine();
    let prompt = e
        .encode_chat(&[Message {
            role: "user".into(),
            content: case.prompt.into(),
        }])
        .unwrap();
    let mut state: State = e
        .model
        .new_state_with(CacheOptions {
            ctx: 512,
            ..Default::default()
        })
        .unwrap();
    let mut tally = Tally::default();
    let t0 = Instant::now();
    for seed in seeds {
        let opts = GenerateOptions {
            max_tokens: case.max_tokens,
            sampler: SamplerConfig {
                temperature: 0.8,
                seed,
                ..Default::default()
            },
            stop: vec![],
            eos_ids: e.eos_ids(),
            ignore_eos: false,
        };
        let mut matcher = constraint.map(Constraint::matcher);
        let mut text = String::new();
        state.reset();
        let gen = generate_constrained(
            &mut state,
            &e.tokenizer,
            &prompt,
            &opts,
            matcher.as_mut(),
            |event| {
                if let Event::Token(_, t) | Event::Tail(t) = event {
                    text.push_str(t);
                }
                Flow::Continue
            },
        )
        .unwrap();
        if tally.runs == 0 {
            tally.first = text.clone();
        }
        tally.runs += 1;
        tally.tokens += gen.generated_tokens;
        *tally.reasons.entry(gen.reason.as_str()).or_default() += 1;
        let checked = match (constraint.is_some(), gen.reason) {
            (true, StopReason::Grammar) => validate(case, &text),
            (true, r) => Err(format!("ended with {}", r.as_str())),
            (false, _) => validate(case, text.trim()),
        };
        match checked {
            Ok(()) => tally.valid += 1,
            Err(why) => tally.failures.push((seed, text, why)),
        }
    }
    tally.seconds = t0.elapsed().as_secs_f64();
    tally
}

fn report(case: &Case, label: &str, t: &Tally) {
    eprintln!(
        "{:<34} {label:<13} {:>3}/{} valid ({:5.1}% invalid), {:5.1} tokens/output, reasons {:?}, {:.1} s",
        case.name,
        t.valid,
        t.runs,
        t.invalid_percent(),
        t.tokens as f64 / t.runs.max(1) as f64,
        t.reasons,
        t.seconds
    );
    eprintln!("    first output: {:?}", t.first);
}

fn assert_all_valid(case: &Case, t: &Tally) {
    let shown: Vec<_> = t.failures.iter().take(3).collect();
    assert!(
        t.failures.is_empty(),
        "{}: {} of {} constrained outputs invalid, e.g. {shown:?}",
        case.name,
        t.failures.len(),
        t.runs
    );
}

#[test]
fn constrained_outputs_parse_and_validate() {
    for case in &CASES {
        let constraint = compiler().compile(&load_format(case.file)).unwrap();
        let t = run_seeds(case, Some(&constraint), 0..CI_SEEDS);
        report(case, "constrained", &t);
        assert_all_valid(case, &t);
    }
}

/// The full run for one format: all seeds valid under the constraint.
fn full_constrained(case: &Case) {
    let constraint = compiler().compile(&load_format(case.file)).unwrap();
    let t = run_seeds(case, Some(&constraint), 0..FULL_SEEDS);
    report(case, "constrained", &t);
    assert_all_valid(case, &t);
}

/// The same prompts without the constraint: the invalid rate is measured, not asserted.
fn full_unconstrained(case: &Case) {
    let t = run_seeds(case, None, 0..FULL_SEEDS);
    report(case, "unconstrained", &t);
    for (seed, text, why) in t.failures.iter().take(2) {
        eprintln!("    e.g. seed {seed}: {why}: {text:?}");
    }
}

#[test]
#[ignore = "the full 200-seed run"]
fn full_constrained_flat_object_with_enums() {
    full_constrained(&CASES[0]);
}

#[test]
#[ignore = "the full 200-seed run"]
fn full_constrained_nested_object_with_an_array() {
    full_constrained(&CASES[1]);
}

#[test]
#[ignore = "the full 200-seed run"]
fn full_constrained_numbers_with_ranges() {
    full_constrained(&CASES[2]);
}

#[test]
#[ignore = "the full 200-seed run"]
fn full_constrained_grammar() {
    full_constrained(&CASES[3]);
}

#[test]
#[ignore = "the full 200-seed run"]
fn full_unconstrained_flat_object_with_enums() {
    full_unconstrained(&CASES[0]);
}

#[test]
#[ignore = "the full 200-seed run"]
fn full_unconstrained_nested_object_with_an_array() {
    full_unconstrained(&CASES[1]);
}

#[test]
#[ignore = "the full 200-seed run"]
fn full_unconstrained_numbers_with_ranges() {
    full_unconstrained(&CASES[2]);
}

#[test]
#[ignore = "the full 200-seed run"]
fn full_unconstrained_grammar() {
    full_unconstrained(&CASES[3]);
}

#[test]
fn constrained_generation_stops_at_max_tokens() {
    let case = &CASES[1];
    let constraint = compiler().compile(&load_format(case.file)).unwrap();
    let short = Case {
        max_tokens: 5,
        ..*case
    };
    let t = run_seeds(&short, Some(&constraint), 0..2);
    assert_eq!(t.reasons, BTreeMap::from([("length", 2)]));
    assert_eq!(t.tokens, 10);
}

#[test]
fn end_of_sequence_only_where_the_format_is_complete() {
    // Any lowercase word: complete after each letter but open to more, so the model ends
    // it with its end-of-turn token; the text is one word, whatever the prompt asks.
    let e = engine();
    let constraint = compiler().compile(&Format::regex("[a-z]{1,12}")).unwrap();
    let prompt = e
        .encode_chat(&[Message {
            role: "user".into(),
            content: "What is the capital of France? Write a full sentence.".into(),
        }])
        .unwrap();
    let opts = GenerateOptions {
        max_tokens: 20,
        sampler: SamplerConfig::default(),
        stop: vec![],
        eos_ids: e.eos_ids(),
        ignore_eos: false,
    };
    let mut state = e.model.new_state();
    let mut matcher = constraint.matcher();
    let mut text = String::new();
    let gen = generate_constrained(
        &mut state,
        &e.tokenizer,
        &prompt,
        &opts,
        Some(&mut matcher),
        |event| {
            if let Event::Token(_, t) | Event::Tail(t) = event {
                text.push_str(t);
            }
            Flow::Continue
        },
    )
    .unwrap();
    assert!(
        (1..=12).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_lowercase()),
        "{text:?}"
    );
    assert!(
        matches!(gen.reason, StopReason::Eos | StopReason::Grammar),
        "{:?} after {text:?}",
        gen.reason
    );
    if gen.reason == StopReason::Eos {
        assert!(e.eos_ids().contains(gen.ids.last().unwrap()));
    } else {
        assert_eq!(text.len(), 12);
    }
}

// ---- The vocabulary as bytes ----

#[test]
fn token_bytes_match_llguidance_reading_of_tokenizer_json() {
    let path = common::default_bundle(Quant::Int8).join("tokenizer.json");
    let tok = Tokenizer::from_file(&path).unwrap();
    let ours = tok.token_bytes().unwrap();
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let theirs = llguidance::token_bytes_from_tokenizer_json(&json).unwrap();
    assert_eq!(ours.len(), theirs.len());
    let mut specials = 0;
    for (id, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        let a = match a {
            TokenBytes::Text(bytes) => bytes.clone(),
            TokenBytes::Special(name) => {
                specials += 1;
                [&[0xFF], name.as_bytes()].concat()
            }
            TokenBytes::Unused => vec![],
        };
        assert_eq!(&a, b, "token {id}");
    }
    assert_eq!(specials, 17);
}

#[test]
fn token_bytes_decode_to_the_tokenizer_text() {
    let tok = &engine().tokenizer;
    let bytes = tok.token_bytes().unwrap();
    let mut checked = 0;
    for (id, b) in bytes.iter().enumerate() {
        let TokenBytes::Text(b) = b else { continue };
        let text = tok.decode(&[id as u32], false).unwrap();
        if let Ok(s) = std::str::from_utf8(b) {
            assert_eq!(s, text, "token {id}");
            checked += 1;
        } else {
            // A piece of a multi-byte character decodes to U+FFFD.
            assert!(text.contains('\u{FFFD}'), "token {id}: {text:?}");
        }
    }
    assert!(checked > 45_000, "{checked}");
}

// ---- Bad input ----

fn scratch_file(name: &str, contents: &str) -> std::path::PathBuf {
    let dir = common::scratch("structured", name);
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn compile_err(format: &Format) -> String {
    let err = compiler().compile(format).unwrap_err();
    format!("{err:#}")
}

fn assert_one_line(msg: &str) {
    assert!(!msg.contains('\n'), "not one line: {msg:?}");
}

#[test]
fn a_schema_that_cannot_compile_is_one_line_naming_the_file() {
    let path = scratch_file(
        "bad_type.json",
        r#"{"type": "object", "properties": {"a": {"type": "strng"}}}"#,
    );
    let msg = compile_err(&Format::load_json_schema(&path).unwrap());
    assert_one_line(&msg);
    assert!(
        msg.starts_with(&format!("compiling JSON schema \"{}\": ", path.display())),
        "{msg}"
    );
    assert!(msg.contains("strng"), "{msg}");
}

#[test]
fn a_schema_that_is_not_json_names_line_and_column() {
    let path = scratch_file(
        "broken.json",
        "{\n  \"type\": \"object\",\n  \"properties\": {,}\n}\n",
    );
    let msg = format!("{:#}", Format::load_json_schema(&path).unwrap_err());
    assert_one_line(&msg);
    assert_eq!(
        msg,
        format!(
            "reading JSON schema \"{}\": key must be a string at line 3 column 18",
            path.display()
        )
    );
}

#[test]
fn a_grammar_that_cannot_compile_names_line_and_column() {
    let path = scratch_file(
        "undefined.lark",
        "// commands\nstart: verb \" \" noun\nverb: \"on\" | \"off\"\n",
    );
    let msg = compile_err(&Format::load_grammar(&path).unwrap());
    assert_one_line(&msg);
    assert!(
        msg.starts_with(&format!(
            "compiling grammar \"{}\": line 2, column ",
            path.display()
        )),
        "{msg}"
    );
    assert!(msg.contains("noun"), "{msg}");
}

#[test]
fn an_empty_grammar_is_refused() {
    for (name, text) in [
        ("empty.lark", ""),
        ("comments.lark", "// nothing\n\n# here\n"),
    ] {
        let path = scratch_file(name, text);
        let msg = format!("{:#}", Format::load_grammar(&path).unwrap_err());
        assert_eq!(msg, format!("grammar \"{}\" is empty", path.display()));
    }
}

#[test]
fn gbnf_is_refused_with_a_hint() {
    let path = scratch_file("answer.gbnf", "# yes or no\nroot ::= \"yes\" | \"no\"\n");
    let msg = format!("{:#}", Format::load_grammar(&path).unwrap_err());
    assert_one_line(&msg);
    assert!(
        msg.starts_with(&format!(
            "grammar \"{}\", line 2: \"::=\" is llama.cpp's GBNF",
            path.display()
        )),
        "{msg}"
    );
}

#[test]
fn a_grammar_that_allows_nothing_is_refused_at_compile_time() {
    // Letters that are both `a` and `b`: no text at all.
    let path = scratch_file("nothing.lark", "start: NOTHING\nNOTHING: /a/ & /b/\n");
    let msg = compile_err(&Format::load_grammar(&path).unwrap());
    assert_one_line(&msg);
    assert!(
        msg.contains(&format!("grammar \"{}\"", path.display())),
        "{msg}"
    );
}

#[test]
fn a_regex_that_cannot_compile_is_one_line() {
    let msg = compile_err(&Format::regex("[a-z"));
    assert_one_line(&msg);
    assert!(
        msg.starts_with("compiling regular expression /[a-z/: "),
        "{msg}"
    );
}

#[test]
fn the_compiler_refuses_a_model_vocabulary_smaller_than_the_tokenizer() {
    let tok = &engine().tokenizer;
    let err = Compiler::new(tok, 1000, &[2]).err().unwrap();
    assert_eq!(
        format!("{err:#}"),
        "the tokenizer has 49152 tokens but the model's vocabulary has 1000"
    );
}
