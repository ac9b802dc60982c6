//! `edgelm perplexity`: llama.cpp's method (chunks of `ctx` tokens from an empty cache, the
//! second half of each scored), checked against a direct recomputation on the default
//! model and against llama.cpp's own figure; the command's output and bad input.

use crate::common;

use std::process::Output;

use edgelm::convert::Quant;
use edgelm::engine::Engine;
use edgelm::perplexity::{added_bos, nll, perplexity, NllSums, Progress};

fn eval_text() -> String {
    std::fs::read_to_string(common::fixture("eval_text.txt")).unwrap()
}

#[test]
fn chunks_are_scored_as_llama_cpp_scores_them() {
    let e = Engine::load(&common::default_bundle(Quant::Int8), &Default::default()).unwrap();
    let text = eval_text();
    let ctx = 128;
    let mut progress = vec![];
    let got = perplexity(&e.model, &e.tokenizer, &text, ctx, |p| progress.push(p)).unwrap();

    // The same by hand: whole chunks, each from an empty cache in one pass, its first
    // token BOS when the tokenizer adds one, positions ctx/2 ..= ctx-2 scored.
    let tokens = e
        .tokenizer
        .encode(text.trim_end_matches('\n'), true)
        .unwrap();
    let bos = added_bos(&e.tokenizer).unwrap();
    let vocab = e.model.config().vocab_size;
    let chunks = tokens.len() / ctx;
    let mut sums = NllSums::default();
    for c in 0..chunks {
        let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
        if let Some(bos) = bos {
            chunk[0] = bos;
        }
        let logits = common::f32_state(&e.model).forward_all(&chunk).unwrap(); // (ctx, vocab)
        for p in ctx / 2..ctx - 1 {
            sums.push(nll(&logits[p * vocab..(p + 1) * vocab], chunk[p + 1]));
        }
    }
    assert_eq!(got.tokens, tokens.len());
    assert_eq!(got.chunks, chunks);
    assert_eq!(got.scored, chunks * (ctx - 1 - ctx / 2));
    assert!(chunks >= 6, "{} tokens", tokens.len());
    let rel = (got.ppl - sums.ppl()).abs() / sums.ppl();
    assert!(rel < 1e-4, "{} vs {} by hand", got.ppl, sums.ppl());
    assert!((got.ppl_stderr - sums.ppl_stderr()).abs() / sums.ppl_stderr() < 1e-3);
    assert_eq!(progress.len(), chunks);
    assert_eq!(progress.last().map(|p: &Progress| p.done), Some(chunks));
    assert_eq!(progress.last().unwrap().ppl, got.ppl);
    eprintln!(
        "int8, eval_text.txt, ctx {ctx}: PPL {:.4} +/- {:.4} over {} tokens",
        got.ppl, got.ppl_stderr, got.scored
    );
}

// ---- The command ----

fn edgelm(args: &[&str]) -> Output {
    common::edgelm_command().args(args).output().unwrap()
}

fn tiny_bundle() -> String {
    common::fixture("tiny-llama/onnx-f32").display().to_string()
}

#[test]
fn the_command_prints_the_estimate() {
    let file = common::fixture("eval_text.txt").display().to_string();
    let out = edgelm(&[
        "perplexity",
        "-m",
        &tiny_bundle(),
        "-f",
        &file,
        "--ctx",
        "64",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines[0].contains(" chunks of 64, "), "{stdout}");
    let ppl: Vec<f64> = lines[1]
        .strip_prefix("Final estimate: PPL = ")
        .unwrap_or_else(|| panic!("{stdout}"))
        .split(" +/- ")
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(ppl.len(), 2, "{stdout}");
    assert!(ppl[0] > 1.0 && ppl[1] > 0.0, "{stdout}");
    // Not a terminal: one progress line per chunk.
    let chunks: usize = lines[0]
        .split(", ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let progress: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("perplexity: chunk "))
        .collect();
    assert_eq!(progress.len(), chunks, "{stderr}");
    assert!(progress[chunks - 1].starts_with(&format!("perplexity: chunk {chunks}/{chunks}, PPL ")));
}

/// Asserts a failed run with exactly one stderr line that mentions `needle`.
fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(
        lines[0].starts_with("edgelm: ") && lines[0].contains(needle),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_input_is_one_line() {
    let dir = common::scratch("perplexity", "bad_input");
    let short = dir.join("short.txt");
    std::fs::write(&short, "Too short to score.\n").unwrap();
    let binary = dir.join("binary.txt");
    std::fs::write(&binary, b"ok\xff\xfe").unwrap();
    let m = tiny_bundle();
    let (short, binary) = (short.display().to_string(), binary.display().to_string());
    assert_one_line_error(
        &edgelm(&["perplexity", "-m", &m, "-f", &short, "--ctx", "64"]),
        "needs at least 128 (two chunks)",
    );
    assert_one_line_error(
        &edgelm(&["perplexity", "-m", &m, "-f", &binary]),
        "is not UTF-8 text (byte 2)",
    );
    assert_one_line_error(
        &edgelm(&["perplexity", "-m", &m, "-f", "/nonexistent/text.txt"]),
        "reading \"/nonexistent/text.txt\"",
    );
    let file = common::fixture("eval_text.txt").display().to_string();
    assert_one_line_error(
        &edgelm(&["perplexity", "-m", &m, "-f", &file, "--ctx", "2"]),
        "--ctx must be at least 4",
    );
}
