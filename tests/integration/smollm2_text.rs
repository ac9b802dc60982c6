//! The text side of SmolLM2-135M-Instruct against recorded goldens: chat template renders
//! (transformers/jinja2), prompt ids (Python `tokenizers`), and streamed decoding
//! (`golden_hf.json`, transformers' decode).

use crate::common;

use common::{golden_hf, ids};
use std::path::{Path, PathBuf};

use edgelm::template::{ChatTemplate, Message};
use edgelm::tokenizer::{TokenOutputStream, Tokenizer};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    common::fixture("smollm2-135m-instruct").join(name)
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(&fixture("tokenizer.json")).unwrap()
}

fn template() -> ChatTemplate {
    ChatTemplate::from_tokenizer_config(&fixture("tokenizer_config.json"))
        .unwrap()
        .expect("fixture has a chat template")
}

fn golden_prompt(name: &str) -> Value {
    golden_hf()["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap()
        .clone()
}

fn scratch(name: &str) -> PathBuf {
    common::scratch("smollm2_text", name)
}

#[test]
fn chat_prompt_renders_and_encodes_to_the_golden_prompt() {
    let golden = golden_prompt("chat:What is the capital of France?");
    let messages = [Message::new("user", "What is the capital of France?")];
    let text = template().render(&messages, true).unwrap();
    assert_eq!(text, golden["prompt_text"].as_str().unwrap());

    let want = ids(&golden["prompt_ids"]);
    let tok = tokenizer();
    // transformers encodes rendered chats without special tokens; this tokenizer's
    // post-processor adds none, so both settings agree here.
    assert_eq!(tok.encode(&text, false).unwrap(), want);
    assert_eq!(tok.encode(&text, true).unwrap(), want);
}

#[test]
fn multi_turn_system_and_plain_renders_match_jinja2() {
    let template = template();
    let tok = tokenizer();
    let cases = json("chat_renders.json");
    for case in cases.as_array().unwrap() {
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let add = case["add_generation_prompt"].as_bool().unwrap();
        let text = template.render(&messages, add).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "{}", case["name"]);
        assert_eq!(
            tok.encode(&text, false).unwrap(),
            ids(&case["ids"]),
            "{}",
            case["name"]
        );
    }
}

#[test]
fn chat_template_in_the_config_string_or_named_list_form() {
    let source = std::fs::read_to_string(fixture("chat_template.jinja")).unwrap();
    let dir = scratch("forms");
    let messages = [Message::new("user", "What is the capital of France?")];
    let want = golden_prompt("chat:What is the capital of France?")["prompt_text"].clone();

    let inline = serde_json::json!({
        "chat_template": source,
        "bos_token": {"content": "<|im_start|>", "lstrip": false},
        "eos_token": "<|im_end|>",
    });
    let path = dir.join("tokenizer_config.json");
    std::fs::write(&path, inline.to_string()).unwrap();
    let t = ChatTemplate::from_tokenizer_config(&path).unwrap().unwrap();
    assert_eq!(t.render(&messages, true).unwrap(), want.as_str().unwrap());

    let named = serde_json::json!({
        "chat_template": [
            {"name": "tool_use", "template": "tools!"},
            {"name": "default", "template": source},
        ],
    });
    std::fs::write(&path, named.to_string()).unwrap();
    let t = ChatTemplate::from_tokenizer_config(&path).unwrap().unwrap();
    assert_eq!(t.render(&messages, true).unwrap(), want.as_str().unwrap());

    let no_default = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "x"}]});
    std::fs::write(&path, no_default.to_string()).unwrap();
    let err = format!(
        "{:#}",
        ChatTemplate::from_tokenizer_config(&path).unwrap_err()
    );
    assert!(err.contains("no template named \"default\""), "{err}");

    std::fs::write(&path, r#"{"eos_token": "</s>"}"#).unwrap();
    assert!(ChatTemplate::from_tokenizer_config(&path)
        .unwrap()
        .is_none());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bos_and_eos_tokens_are_template_variables() {
    let t = ChatTemplate::new(
        "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}",
        "<s>",
        "</s>",
    )
    .unwrap();
    let messages = [Message::new("user", "a"), Message::new("assistant", "b")];
    assert_eq!(t.render(&messages, false).unwrap(), "<s>a</s>b</s>");
}

#[test]
fn hf_compatible_environment() {
    let messages = [
        Message::new("system", "  Be brief.  "),
        Message::new("user", "hi"),
        Message::new("assistant", "hello"),
    ];
    // Expected outputs: jinja2 configured as transformers configures it (trim_blocks,
    // lstrip_blocks, loopcontrols, its tojson). Block tags on their own lines leave no
    // blank lines.
    let source = "{% for m in messages %}\n    {% if m.role == 'system' %}\n{{ m.content.strip() }}|\n    {% elif m.role.startswith('ass') %}\n{% break %}\n    {% else %}\n{{ m.role.upper() }}: {{ m.content }}\n    {% endif %}\n{% endfor %}\n";
    let t = ChatTemplate::new(source, "", "").unwrap();
    assert_eq!(
        t.render(&messages, false).unwrap(),
        "Be brief.|\nUSER: hi\n"
    );

    let t = ChatTemplate::new(
        "{% for m in messages %}{% if loop.index0 == 1 %}{% continue %}{% endif %}{{ m | tojson }}\n{% endfor %}",
        "",
        "",
    )
    .unwrap();
    assert_eq!(
        t.render(&messages, false).unwrap(),
        "{\"role\": \"system\", \"content\": \"  Be brief.  \"}\n{\"role\": \"assistant\", \"content\": \"hello\"}\n"
    );

    let t = ChatTemplate::new("{{ strftime_now('%Y') | length }}", "", "").unwrap();
    assert_eq!(t.render(&[], false).unwrap(), "4");
}

#[test]
fn raise_exception_is_a_render_error_with_its_message() {
    let t = ChatTemplate::new(
        "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with a user turn') }}{% endif %}ok",
        "",
        "",
    )
    .unwrap();
    assert_eq!(t.render(&[Message::new("user", "x")], false).unwrap(), "ok");
    let err = format!(
        "{:#}",
        t.render(&[Message::new("assistant", "x")], false)
            .unwrap_err()
    );
    assert!(
        err.contains("Conversation must start with a user turn"),
        "{err}"
    );
}

#[test]
fn invalid_template_is_a_clear_error_naming_the_file() {
    let dir = scratch("invalid");
    let path = dir.join("tokenizer_config.json");
    std::fs::write(
        &path,
        r#"{"chat_template": "{% for m in messages %}{{ m.content }}"}"#,
    )
    .unwrap();
    let err = format!(
        "{:#}",
        ChatTemplate::from_tokenizer_config(&path).unwrap_err()
    );
    assert!(err.contains("invalid chat template"), "{err}");
    assert!(err.contains("tokenizer_config.json"), "{err}");
    assert!(err.contains("syntax error"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();

    let missing = Path::new("/nonexistent/edgelm/tokenizer_config.json");
    let err = format!(
        "{:#}",
        ChatTemplate::from_tokenizer_config(missing).unwrap_err()
    );
    assert!(
        err.contains("/nonexistent/edgelm/tokenizer_config.json"),
        "{err}"
    );
    let err = format!("{:#}", Tokenizer::from_file(missing).err().unwrap());
    assert!(
        err.contains("/nonexistent/edgelm/tokenizer_config.json"),
        "{err}"
    );
}

/// Streams `ids` one at a time; returns the pieces (flush included).
fn stream(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    let mut s = TokenOutputStream::new();
    let mut pieces = Vec::new();
    for &id in ids {
        if let Some(p) = s.push(tok, id).unwrap() {
            pieces.push(p);
        }
    }
    if let Some(p) = s.flush(tok).unwrap() {
        pieces.push(p);
    }
    pieces
}

#[test]
fn streamed_golden_generations_match_transformers_decode() {
    let tok = tokenizer();
    for p in golden_hf()["prompts"].as_array().unwrap() {
        let pieces = stream(&tok, &ids(&p["generated_ids"]));
        assert_eq!(
            pieces.concat(),
            p["generated_text"].as_str().unwrap(),
            "{}",
            p["name"]
        );
    }
}

#[test]
fn streaming_never_splits_a_character() {
    let tok = tokenizer();
    let texts = [
        "Emoji: 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 and 🦀 crabs.",
        "中文：你好，世界！日本語のテキスト。한국어 텍스트.",
        "Accents: café, naïve, Ångström, señor, Zürich, Œuvre, ğ ş ı.",
        "Runs   of    spaces,\ttabs\t\tand\n\n\nnewlines     end.  ",
        "Mixed: 🙂中é  \u{301}e\u{301} ∑∫√ ‰ — “quotes” …",
    ];
    for text in texts {
        let ids = tok.encode(text, false).unwrap();
        let pieces = stream(&tok, &ids);
        assert_eq!(pieces.concat(), tok.decode(&ids, false).unwrap(), "{text}");
        assert_eq!(pieces.concat(), text);
        for p in &pieces {
            assert!(!p.contains('\u{FFFD}'), "{p:?} in {text:?}");
        }
        // Some of these tokens really do carry partial characters; otherwise the test
        // would not exercise the hold-back.
        if !text.is_ascii() {
            let partial = ids
                .iter()
                .any(|&id| tok.decode(&[id], false).unwrap().contains('\u{FFFD}'));
            assert!(partial, "{text}");
        }
    }
}

#[test]
fn stream_keeps_a_short_window_and_resets() {
    let tok = tokenizer();
    let text = "Once upon a time there was a very long story. ".repeat(40);
    let ids = tok.encode(&text, false).unwrap();
    assert_eq!(stream(&tok, &ids).concat(), text);

    let mut s = TokenOutputStream::new();
    let emoji = tok.encode("🙂", false).unwrap();
    assert!(emoji.len() > 1, "{emoji:?}");
    assert_eq!(s.push(&tok, emoji[0]).unwrap(), None);
    s.reset();
    assert_eq!(s.flush(&tok).unwrap(), None);
    // An unfinished character at the end of generation is flushed as U+FFFD.
    assert_eq!(s.push(&tok, emoji[0]).unwrap(), None);
    assert_eq!(s.flush(&tok).unwrap().as_deref(), Some("\u{FFFD}"));
}

#[test]
fn vocab_and_special_token_ids() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.token_to_id("no such token"), None);
    assert_eq!(tok.decode(&[1, 4093, 2], true).unwrap(), "user");
}
