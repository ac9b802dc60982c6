//! llama.cpp's tokenizer test vectors (`models/ggml-vocab-*.gguf` with `.inp`/`.out`, made
//! with each model's own Hugging Face tokenizer): the GGUF's vocabulary, converted to a
//! `tokenizer.json`, gives every case's ids exactly, with nothing added and special-token
//! text not parsed, as llama.cpp's `test-tokenizer-0` runs them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common;

use edgelm::tokenizer::Tokenizer;

/// The vocabularies of the families edgelm runs (SentencePiece: `llama-spm`, `phi-3`).
const VOCABS: [&str; 8] = [
    "llama-spm",
    "llama-bpe",
    "qwen2",
    "qwen35",
    "gpt-2",
    "phi-3",
    "starcoder",
    "deepseek-llm",
];

fn vocab_path(name: &str) -> PathBuf {
    common::llama_cpp_tree()
        .join("models")
        .join(format!("ggml-vocab-{name}.gguf"))
}

/// The cases of `<gguf>.inp` / `<gguf>.out` as `test-tokenizer-0.cpp` reads them: inputs split
/// on the separator, one line of ids per input, and a repeated input kept once.
fn cases(gguf: &Path) -> BTreeMap<String, Vec<u32>> {
    let read = |ext: &str| {
        let path = PathBuf::from(format!("{}.{ext}", gguf.display()));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path:?}: {e}"))
    };
    let inp = read("inp");
    let out = read("out");
    let sep = "\n__ggml_vocab_test__\n";
    let mut inputs: Vec<&str> = Vec::new();
    let mut rest = inp.as_str();
    while !rest.is_empty() {
        match rest.split_once(sep) {
            Some((case, tail)) => {
                inputs.push(case);
                rest = tail;
            }
            None => {
                inputs.push(rest);
                break;
            }
        }
    }
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(inputs.len(), lines.len(), "{gguf:?}: inputs and outputs");
    inputs
        .into_iter()
        .zip(lines)
        .map(|(text, line)| {
            let ids = line
                .split_whitespace()
                .map(|id| id.parse().unwrap())
                .collect();
            (text.to_owned(), ids)
        })
        .collect()
}

#[test]
fn every_case_of_the_llama_cpp_vocab_tests_through_the_library() {
    let mut failures = Vec::new();
    let mut total = 0;
    for name in VOCABS {
        let path = vocab_path(name);
        let mut tok = Tokenizer::from_gguf(&path).unwrap();
        tok.set_parse_special(false);
        let cases = cases(&path);
        assert!(cases.len() > 30, "{name}: {} cases", cases.len());
        for (text, want) in &cases {
            total += 1;
            let got = tok.encode(text, false).unwrap();
            if &got != want {
                failures.push(format!("{name} {text:?}:\n  want {want:?}\n  got  {got:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {total} cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_case_of_the_llama_spm_vocab_test_through_edgelm_tokenize() {
    let path = vocab_path("llama-spm");
    let dir = common::scratch("llama_vocab", "binary");
    let input = dir.join("case.txt");
    for (text, want) in cases(&path) {
        std::fs::write(&input, &text).unwrap();
        let out = common::edgelm_command()
            .arg("tokenize")
            .arg("-m")
            .arg(&path)
            .arg("-f")
            .arg(&input)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{text:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want: Vec<String> = want.iter().map(u32::to_string).collect();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            format!("{}\n", want.join(" ")),
            "{text:?}"
        );
    }
}
