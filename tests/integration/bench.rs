//! `edgelm bench --json` on a tiny bundle: one JSON object with every figure the README's
//! tables are made from, and a clear error for an empty run.

use crate::common;

use common::fixture;
use serde_json::Value;

fn bench(args: &[&str]) -> std::process::Output {
    common::edgelm_command()
        .args(["bench", "-t", "1", "-m"])
        .arg(fixture("tiny-llama/onnx-int8"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn bench_json_reports_every_figure() {
    let out = bench(&["--prompt-tokens", "8", "--gen-tokens", "3", "--json"]);
    common::assert_success(&out);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "load_ms",
        "ttft_ms",
        "prefill_tok_s",
        "first_prefill_tok_s",
        "decode_tok_s",
        "peak_rss_kb",
        "anon_rss_kb",
        "model_bytes",
    ] {
        assert!(
            v[key].as_f64().is_some_and(|x| x > 0.0),
            "{key} = {} in {v}",
            v[key]
        );
    }
    // Null when the model's context is shorter than 1024 + 32 tokens.
    for key in ["decode_tok_s_at_1024", "decode_ratio_at_1024"] {
        assert!(v.get(key).is_some(), "{key} in {v}");
    }
    assert_eq!(v["threads"], 1);
    assert_eq!(v["prompt_tokens"], 8);
    assert_eq!(v["gen_tokens"], 3);
    assert!(
        v["peak_rss_kb"].as_u64() >= v["anon_rss_kb"].as_u64(),
        "{v}"
    );
}

#[test]
fn bench_rejects_an_empty_run_in_one_line() {
    let out = bench(&["--gen-tokens", "0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--gen-tokens must be at least 1"), "{err}");
}

/// Under a format every decoded token is one the format allows (a complete output starts
/// the next), and the mask's own time is reported.
#[test]
fn bench_decodes_under_a_format() {
    let yn = common::scratch("bench_format", "yn").join("yn.lark");
    std::fs::write(&yn, "start: \"yes\" | \"no\"\n").unwrap();
    let out = bench(&[
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "5",
        "--grammar",
        yn.to_str().unwrap(),
        "--json",
    ]);
    common::assert_success(&out);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["format"], format!("grammar \"{}\"", yn.display()), "{v}");
    assert!(v["mask_us"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    assert!(v["decode_tok_s"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    assert_eq!(v["gen_tokens"], 5);

    let plain = bench(&["--prompt-tokens", "8", "--gen-tokens", "3", "--json"]);
    let v: Value = serde_json::from_slice(&plain.stdout).unwrap();
    assert!(v["format"].is_null() && v["mask_us"].is_null(), "{v}");
}
