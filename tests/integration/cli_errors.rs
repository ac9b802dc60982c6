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

// ---- Output formats: a file that cannot be used is one line naming it ----

/// Writes `contents` to a scratch file of this group and returns its path.
fn format_file(name: &str, contents: &str) -> String {
    let path = common::scratch("cli_errors_formats", name).join(name);
    std::fs::write(&path, contents).unwrap();
    path.to_str().unwrap().to_string()
}

/// `edgelm run` on the tiny fixture with the format flags `flags`.
fn run_with(flags: &[&str]) -> Output {
    let tiny = common::fixture("tiny-llama/onnx-int8");
    let mut args = vec!["run", "-t", "1", "-n", "4", "-m", tiny.to_str().unwrap()];
    args.extend_from_slice(flags);
    args.push("hello");
    edgelm(&args)
}

#[test]
fn run_with_a_schema_that_cannot_compile() {
    let path = format_file(
        "bad_type.json",
        r#"{"type": "object", "properties": {"a": {"type": "strng"}}}"#,
    );
    let out = run_with(&["--json-schema", &path]);
    assert_one_line_error(&out, &format!("compiling JSON schema \"{path}\": "));
    assert_one_line_error(&out, "strng");
}

#[test]
fn run_with_a_schema_that_is_not_json_names_line_and_column() {
    let path = format_file("broken.json", "{\n  \"type\": \"object\",\n  \"x\": ,\n}\n");
    let out = run_with(&["--json-schema", &path]);
    assert_one_line_error(
        &out,
        &format!("reading JSON schema \"{path}\": expected value at line 3 column 8"),
    );
}

#[test]
fn run_with_a_missing_schema_file() {
    let out = run_with(&["--json-schema", "/nonexistent/lamp.json"]);
    assert_one_line_error(&out, "/nonexistent/lamp.json");
}

#[test]
fn run_with_an_empty_grammar() {
    let path = format_file("empty.lark", "// nothing here\n");
    let out = run_with(&["--grammar", &path]);
    assert_one_line_error(&out, &format!("grammar \"{path}\" is empty"));
}

#[test]
fn run_with_a_grammar_naming_an_undefined_rule_gives_line_and_column() {
    let path = format_file("undefined.lark", "// commands\nstart: verb \" \" noun\n");
    let out = run_with(&["--grammar", &path]);
    assert_one_line_error(
        &out,
        &format!("compiling grammar \"{path}\": line 2, column "),
    );
}

#[test]
fn run_with_a_grammar_that_allows_nothing() {
    // Letters that are both `a` and `b`: no text at all.
    let path = format_file("nothing.lark", "start: NOTHING\nNOTHING: /a/ & /b/\n");
    let out = run_with(&["--grammar", &path]);
    assert_one_line_error(&out, &format!("grammar \"{path}\""));
}

#[test]
fn run_with_gbnf_gets_the_hint() {
    let path = format_file("answer.gbnf", "root ::= \"yes\" | \"no\"\n");
    let out = run_with(&["--grammar", &path]);
    assert_one_line_error(&out, "llama.cpp's GBNF");
}

#[test]
fn run_takes_one_format_only() {
    let out = run_with(&["--format", "json", "--grammar", "x.lark"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}

/// `edgelm serve` on the tiny fixture with `flags`, its input closed at once.
fn serve_with(flags: &[&str]) -> Output {
    let tiny = common::fixture("tiny-llama/onnx-int8");
    let mut args = vec!["serve", "-t", "1", "-m", tiny.to_str().unwrap()];
    args.extend_from_slice(flags);
    common::edgelm_command()
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn serve_refuses_a_grammar_that_cannot_compile_at_start() {
    let path = format_file("serve_nothing.lark", "start: NOTHING\nNOTHING: /a/ & /b/\n");
    let out = serve_with(&["--grammar", &format!("cmd={path}")]);
    assert_one_line_error(&out, &format!("grammar \"{path}\""));
}

#[test]
fn serve_refuses_a_bad_format_argument_at_start() {
    let lamp = common::fixture("formats/lamp.json");
    let lamp = lamp.to_str().unwrap();
    for (flag, arg, needle) in [
        ("--json-schema", lamp.to_string(), "expected NAME=FILE"),
        (
            "--grammar",
            "=x.lark".to_string(),
            "a name is 1 to 32 letters",
        ),
        (
            "--json-schema",
            format!("json={lamp}"),
            "\"json\" is a built-in",
        ),
        ("--json-schema", "lamp=".to_string(), "no file after '='"),
        (
            "--format",
            "lamp".to_string(),
            "--format lamp: no such format",
        ),
    ] {
        let out = serve_with(&[flag, &arg]);
        assert_one_line_error(&out, needle);
    }
    let out = serve_with(&[
        "--json-schema",
        &format!("lamp={lamp}"),
        "--json-schema",
        &format!("LAMP={lamp}"),
    ]);
    assert_one_line_error(&out, "two formats are named \"LAMP\"");
}
