//! The official chat templates of Qwen2.5, Qwen3, Llama 3.2, Gemma 2, Phi-3.5, SmolLM3,
//! Mistral Nemo and LFM2.5 (as llama.cpp ships them) render exactly as transformers renders
//! them with jinja2 (`tests/fixtures/templates/render.py` made `expected.json`), and
//! `edgelm template` prints such a prompt as it is.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::common;

use edgelm::template::prompt::parse_time;
use edgelm::template::{ChatTemplate, Message, SpecialTokens};

#[derive(serde::Deserialize)]
struct Expected {
    date: String,
    special_tokens: BTreeMap<String, Specials>,
    cases: Vec<Case>,
    snippet_messages: Vec<Turn>,
    snippets: Vec<Snippet>,
}

#[derive(serde::Deserialize)]
struct Snippet {
    source: String,
    text: Option<String>,
    error: Option<String>,
}

#[derive(serde::Deserialize)]
struct Specials {
    bos_token: Option<String>,
    eos_token: Option<String>,
}

#[derive(serde::Deserialize)]
struct Case {
    template: String,
    name: String,
    messages: Vec<Turn>,
    add_generation_prompt: bool,
    text: Option<String>,
    error: Option<String>,
}

#[derive(serde::Deserialize)]
struct Turn {
    role: String,
    content: String,
}

fn dir() -> PathBuf {
    common::fixture("templates")
}

fn expected() -> Expected {
    let text = std::fs::read_to_string(dir().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn template(expected: &Expected, name: &str) -> ChatTemplate {
    let s = &expected.special_tokens[name];
    let specials = SpecialTokens::new(s.bos_token.as_deref(), s.eos_token.as_deref());
    ChatTemplate::from_file(&dir().join(name), specials)
        .unwrap()
        .with_fixed_time(parse_time(&expected.date).unwrap())
}

#[test]
fn every_template_renders_every_conversation_as_jinja2_does() {
    let expected = expected();
    assert_eq!(expected.cases.len(), 40);
    let mut failures = Vec::new();
    for case in &expected.cases {
        let t = template(&expected, &case.template);
        let messages: Vec<Message> = case
            .messages
            .iter()
            .map(|m| Message::new(m.role.as_str(), m.content.as_str()))
            .collect();
        let got = t.render(&messages, case.add_generation_prompt);
        let ok = match (&got, &case.text, &case.error) {
            (Ok(text), Some(want), None) => text == want,
            (Err(e), None, Some(want)) => {
                let e = format!("{e:#}");
                e.contains(want.as_str()) && !e.contains('\n')
            }
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "{} / {}:\n  want {:?}\n  got  {:?}",
                case.template,
                case.name,
                case.text.as_ref().or(case.error.as_ref()),
                got.map_err(|e| format!("{e:#}"))
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} renders differ:\n{}",
        failures.len(),
        expected.cases.len(),
        failures.join("\n")
    );
}

#[test]
fn jinja2_features_render_as_in_python() {
    let expected = expected();
    assert!(expected.snippets.len() > 50);
    let messages: Vec<Message> = expected
        .snippet_messages
        .iter()
        .map(|m| Message::new(m.role.as_str(), m.content.as_str()))
        .collect();
    let now = parse_time(&expected.date).unwrap();
    let mut failures = Vec::new();
    for s in &expected.snippets {
        let specials = SpecialTokens::new(Some("<s>"), Some("</s>"));
        let got = ChatTemplate::with_specials(&s.source, specials)
            .map(|t| t.with_fixed_time(now))
            .and_then(|t| t.render(&messages, true))
            .map_err(|e| format!("{e:#}"));
        let ok = match (&got, &s.text, &s.error) {
            (Ok(text), Some(want), None) => text == want,
            (Err(e), None, Some(want)) => e.contains(want.as_str()),
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "{:?}:\n  want {:?}\n  got  {got:?}",
                s.source,
                s.text.as_ref().or(s.error.as_ref())
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn edgelm_template(args: &[&str]) -> std::process::Output {
    common::edgelm_command()
        .arg("template")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn edgelm_template_prints_the_llama_prompt_with_a_fixed_date() {
    let expected = expected();
    let name = "meta-llama-Llama-3.2-3B-Instruct.jinja";
    let case = expected
        .cases
        .iter()
        .find(|c| c.template == name && c.name == "system and user")
        .unwrap();
    // The tiny Llama 3.2 fixture's vocabulary has Llama 3's special tokens.
    let model = common::fixture("vocab/tiny-llama32.gguf");
    let file = dir().join(name);
    let out = edgelm_template(&[
        "-m",
        model.to_str().unwrap(),
        "--chat-template-file",
        file.to_str().unwrap(),
        "--date",
        &expected.date,
        "--system",
        &case.messages[0].content,
        &case.messages[1].content,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        *case.text.as_ref().unwrap()
    );
}

#[test]
fn edgelm_template_renders_a_gguf_s_own_template_as_transformers_did() {
    #[derive(serde::Deserialize)]
    struct Recorded {
        text: String,
        special: bool,
    }
    for name in [
        "tiny-llama32",
        "tiny-qwen2",
        "tiny-qwen3",
        "tiny-gemma3",
        "tiny-spm-llama",
    ] {
        let cases: Vec<Recorded> = serde_json::from_str(
            &std::fs::read_to_string(common::fixture(&format!("vocab/{name}.cases.json"))).unwrap(),
        )
        .unwrap();
        // The chat prompt transformers rendered for one user turn.
        let chat = cases.iter().find(|c| c.special).unwrap();
        let model = common::fixture(&format!("vocab/{name}.gguf"));
        let out = edgelm_template(&[
            "-m",
            model.to_str().unwrap(),
            "Tell me a story about a robot.",
        ]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8(out.stdout).unwrap(), chat.text, "{name}");
    }
}

#[test]
fn a_template_that_raises_is_a_one_line_error_with_its_message() {
    let model = common::fixture("vocab/tiny-gemma3.gguf");
    let file = dir().join("google-gemma-2-2b-it.jinja");
    let out = edgelm_template(&[
        "-m",
        model.to_str().unwrap(),
        "--chat-template-file",
        file.to_str().unwrap(),
        "--system",
        "Be brief.",
        "Hi",
    ]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("edgelm: "), "{err}");
    assert!(err.contains("System role not supported"), "{err}");
}

#[test]
fn a_missing_or_broken_template_file_is_a_one_line_error_naming_it() {
    let model = common::fixture("vocab/tiny-qwen2.gguf");
    let scratch = common::scratch("chat_templates", "broken");
    let broken = scratch.join("broken.jinja");
    std::fs::write(&broken, "{% for m in messages %}{{ m.content }}").unwrap();
    let missing = scratch.join("missing.jinja");
    for (file, what) in [(&broken, "syntax error"), (&missing, "No such file")] {
        let out = edgelm_template(&[
            "-m",
            model.to_str().unwrap(),
            "--chat-template-file",
            file.to_str().unwrap(),
            "hi",
        ]);
        assert!(!out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(file.to_str().unwrap()), "{err}");
        assert!(err.contains(what), "{err}");
    }
    let out = edgelm_template(&["-m", model.to_str().unwrap(), "--date", "yesterday", "hi"]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("\"yesterday\" is not a date"), "{err}");
}
