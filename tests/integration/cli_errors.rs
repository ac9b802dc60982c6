//! Bad input gets a one-line `edgelm: …` error and exit status 1, never a panic.

use crate::common;

use std::path::Path;
use std::process::Output;

use edgelm::convert::Quant;

fn edgelm(args: &[&str]) -> Output {
    common::edgelm_command().args(args).output().unwrap()
}

/// Asserts a failed run with exactly one stderr line that mentions `needle`.
fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("edgelm: "), "{stderr}");
    assert!(
        lines[0].contains(needle),
        "{:?} does not mention {needle:?}",
        lines[0]
    );
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A GGUF v3 file with only string metadata and no tensors.
fn tiny_gguf(path: &Path, kvs: &[(&str, &str)]) {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend((kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        b.extend((k.len() as u64).to_le_bytes());
        b.extend(k.as_bytes());
        b.extend(8u32.to_le_bytes()); // string
        b.extend((v.len() as u64).to_le_bytes());
        b.extend(v.as_bytes());
    }
    std::fs::write(path, b).unwrap();
}

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = common::root().join("target/test-tmp");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn missing_bundle() {
    let out = edgelm(&["run", "-m", "/nonexistent/bundle", "hello"]);
    assert_one_line_error(&out, "\"/nonexistent/bundle\" not found");
}

#[test]
fn empty_prompt() {
    let bundle = common::default_bundle(Quant::Int8);
    let out = edgelm(&["run", "-m", bundle.to_str().unwrap(), ""]);
    assert_one_line_error(&out, "prompt is empty");
}

#[test]
fn convert_missing_input() {
    let out = edgelm(&[
        "convert",
        "/nonexistent/model.gguf",
        "-o",
        tmp("never").to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "/nonexistent/model.gguf");
}

#[test]
fn convert_non_gguf_file() {
    let p = tmp("not-a-model.gguf");
    std::fs::write(&p, b"hello, this is plain text and not a model\n").unwrap();
    let out = edgelm(&[
        "convert",
        p.to_str().unwrap(),
        "-o",
        tmp("out-text").to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "not-a-model.gguf");
}

#[test]
fn convert_truncated_gguf() {
    let full = std::fs::read(common::default_gguf()).unwrap();
    for cut in [3usize, 20, 4096, full.len() / 2, full.len() - 1] {
        let p = tmp(&format!("truncated-{cut}.gguf"));
        std::fs::write(&p, &full[..cut]).unwrap();
        let out = edgelm(&[
            "convert",
            p.to_str().unwrap(),
            "-o",
            tmp("out-trunc").to_str().unwrap(),
        ]);
        assert_one_line_error(&out, &format!("truncated-{cut}.gguf"));
    }
}

#[test]
fn convert_unsupported_architecture() {
    let p = tmp("neox.gguf");
    tiny_gguf(&p, &[("general.architecture", "gptneox")]);
    let out = edgelm(&[
        "convert",
        p.to_str().unwrap(),
        "-o",
        tmp("out-neox").to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "unsupported architecture \"gptneox\"");
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let out = edgelm(&["run", "--no-such-flag", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}
