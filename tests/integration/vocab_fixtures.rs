//! The tokenizers of the tiny current-family fixtures (Llama 3.2, Qwen2, Qwen3, Gemma 3 and a
//! SentencePiece Llama): converted from their GGUF (llama.cpp's converter, tensors left out),
//! every recorded text encodes to llama.cpp's ids; through their Hugging Face
//! `tokenizer.json`, to transformers' ids. The two differ only where llama.cpp's
//! SentencePiece tokenizer puts a `▁` before text that starts with a space or follows a
//! special token (`tests/fixtures/vocab/make_vocab_fixtures.py` says where the data is from).

use std::path::PathBuf;

use crate::common;

use edgelm::tokenizer::Tokenizer;

const FIXTURES: [&str; 5] = [
    "tiny-llama32",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-gemma3",
    "tiny-spm-llama",
];

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    bos: bool,
    special: bool,
    hf: Vec<u32>,
    llamacpp: Vec<u32>,
}

fn path(name: &str, ext: &str) -> PathBuf {
    common::fixture("vocab").join(format!("{name}.{ext}"))
}

fn cases(name: &str) -> Vec<Case> {
    let text = std::fs::read_to_string(path(name, "cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Encodes every case with `tok`; returns the cases whose ids differ from `want`'s.
fn failures(
    name: &str,
    tok: &mut Tokenizer,
    want: impl Fn(&Case) -> &[u32],
) -> (usize, Vec<String>) {
    let cases = cases(name);
    let mut failed = Vec::new();
    for case in &cases {
        tok.set_parse_special(case.special);
        let got = tok.encode(&case.text, case.bos).unwrap();
        if got != want(case) {
            failed.push(format!(
                "{name} {:?} (bos {}, special {}):\n  want {:?}\n  got  {got:?}",
                case.text,
                case.bos,
                case.special,
                want(case)
            ));
        }
    }
    (cases.len(), failed)
}

#[test]
fn converted_from_gguf_every_text_gives_llama_cpp_ids() {
    let mut all = Vec::new();
    for name in FIXTURES {
        let mut tok = Tokenizer::from_gguf(&path(name, "gguf")).unwrap();
        let (n, failed) = failures(name, &mut tok, |c| &c.llamacpp);
        assert!(n >= 18, "{name}: {n} cases");
        all.extend(failed);
    }
    assert!(all.is_empty(), "{}", all.join("\n"));
}

#[test]
fn hugging_face_tokenizer_json_gives_transformers_ids() {
    let mut all = Vec::new();
    for name in FIXTURES {
        let mut tok = Tokenizer::from_file(&path(name, "tokenizer.json")).unwrap();
        all.extend(failures(name, &mut tok, |c| &c.hf).1);
    }
    assert!(all.is_empty(), "{}", all.join("\n"));
}

#[test]
fn sentencepiece_gguf_and_transformers_differ_only_on_the_space_mark() {
    let differ: Vec<(String, bool)> = cases("tiny-spm-llama")
        .into_iter()
        .filter(|c| c.hf != c.llamacpp)
        .map(|c| (c.text, c.bos))
        .collect();
    let leading = " leading space, double  space and trailing space ".to_owned();
    let chat = "<s>[INST] Tell me a story about a robot. [/INST]".to_owned();
    assert_eq!(
        differ,
        [(leading.clone(), false), (leading, true), (chat, false)]
    );
}

#[test]
fn edgelm_tokenize_adds_bos_and_parses_special_text_only_when_asked() {
    let gguf = path("tiny-spm-llama", "gguf");
    let run = |args: &[&str]| {
        let out = common::edgelm_command()
            .arg("tokenize")
            .arg("-m")
            .arg(&gguf)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let ids = |c: &Case| {
        let ids: Vec<String> = c.llamacpp.iter().map(u32::to_string).collect();
        format!("{}\n", ids.join(" "))
    };
    let cases = cases("tiny-spm-llama");
    let hello = |bos| {
        cases
            .iter()
            .find(|c| c.text == "Hello world" && c.bos == bos)
            .unwrap()
    };
    assert_eq!(run(&["Hello world"]), ids(hello(false)));
    assert_eq!(run(&["--bos", "Hello world"]), ids(hello(true)));
    let chat = cases.iter().find(|c| c.special).unwrap();
    assert_eq!(run(&["--special", &chat.text]), ids(chat));
    // Without --special, "<s>" is three characters of text.
    let plain = run(&[&chat.text]);
    assert_ne!(plain, ids(chat));
    assert!(!plain.split_whitespace().any(|id| id == "1"), "{plain}");
}

#[test]
fn edgelm_tokenize_bad_input_is_a_one_line_error() {
    let dir = common::scratch("vocab_fixtures", "bad_input");
    let not_utf8 = dir.join("latin1.txt");
    std::fs::write(&not_utf8, b"caf\xe9").unwrap();
    let not_gguf = dir.join("notes.txt");
    std::fs::write(&not_gguf, "hello").unwrap();
    let gguf = path("tiny-qwen2", "gguf");
    let cases: [(Vec<&std::ffi::OsStr>, &str); 3] = [
        (
            vec!["-m".as_ref(), "/nonexistent/model".as_ref(), "hi".as_ref()],
            "model \"/nonexistent/model\" does not exist",
        ),
        (
            vec![
                "-m".as_ref(),
                gguf.as_os_str(),
                "-f".as_ref(),
                not_utf8.as_os_str(),
            ],
            "latin1.txt\" is not UTF-8 text",
        ),
        (
            vec!["-m".as_ref(), not_gguf.as_os_str(), "hi".as_ref()],
            "not a GGUF file",
        ),
    ];
    for (args, want) in cases {
        let out = common::edgelm_command()
            .arg("tokenize")
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("edgelm: ") && err.contains(want), "{err}");
    }
}
