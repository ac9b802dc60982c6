//! Every architecture generates the same greedy tokens as x86_64 for the default int8 bundle:
//! `tests/fixtures/smollm2-135m-instruct/golden_int8_x86_64.json` holds the first 16 ids
//! recorded on x86_64 (AVX2 kernels, `--int8 q8f32`) and each step's top-1 margin (logit of
//! the best id minus the runner-up). The smallest margin is 0.14 logits, two orders of
//! magnitude above the float differences between kernels, so a mismatch means a kernel or
//! graph difference, not a near tie. cross/test.sh runs this under qemu.
//!
//! `EDGELM_RECORD_GOLDEN=1` rewrites the fixture from this machine (only ever on x86_64).

use crate::common;

use edgelm::convert::Quant;
use edgelm::engine::Engine;
use serde_json::{json, Value};

const FIXTURE: &str = "tests/fixtures/smollm2-135m-instruct/golden_int8_x86_64.json";
const PROMPT: &str = "The capital of France is";
const NEW_TOKENS: usize = 16;

fn fixture() -> (Vec<u32>, Vec<f32>) {
    let text = std::fs::read_to_string(common::root().join(FIXTURE)).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["prompt"], PROMPT);
    let ids = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let margins = v["margins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    (ids, margins)
}

/// Greedy ids and the top-1 margin of each step, from the library.
fn greedy_with_margins(e: &Engine, prompt: &[u32]) -> (Vec<u32>, Vec<f32>) {
    let mut state = e.model.new_state();
    let mut logits = state.forward(prompt).unwrap(); // (vocab)
    let (mut ids, mut margins) = (vec![], vec![]);
    for _ in 0..NEW_TOKENS {
        let (mut best, mut second) = (0usize, f32::NEG_INFINITY);
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                second = logits[best];
                best = i;
            } else if i != best && x > second {
                second = x;
            }
        }
        ids.push(best as u32);
        margins.push(logits[best] - second);
        logits = state.forward(&[best as u32]).unwrap();
    }
    (ids, margins)
}

#[test]
fn library_greedy_tokens_and_margins_match_the_x86_64_recording() {
    let bundle = common::default_bundle(Quant::Int8);
    let e = Engine::load(&bundle, &Default::default()).unwrap();
    let prompt = e.encode_raw(PROMPT).unwrap();
    let (ids, margins) = greedy_with_margins(&e, &prompt);
    if std::env::var_os("EDGELM_RECORD_GOLDEN").is_some() {
        assert_eq!(
            std::env::consts::ARCH,
            "x86_64",
            "record the golden on x86_64"
        );
        let margins: Vec<f64> = margins
            .iter()
            .map(|m| (*m as f64 * 1e4).round() / 1e4)
            .collect();
        let v = json!({
            "prompt": PROMPT,
            "recorded_on": "x86_64, avx2 kernels, --int8 q8f32",
            "prompt_ids": prompt,
            "ids": ids,
            "margins": margins,
        });
        let text = serde_json::to_string_pretty(&v).unwrap() + "\n";
        std::fs::write(common::root().join(FIXTURE), text).unwrap();
    }
    let (want_ids, want_margins) = fixture();
    assert_eq!(
        ids, want_ids,
        "greedy ids differ (margins here: {margins:?})"
    );
    // The same ids with margins within 0.05 logits: the logits agree, not just their argmax.
    for (step, (got, want)) in margins.iter().zip(&want_margins).enumerate() {
        assert!(
            (got - want).abs() < 0.05,
            "step {step}: top-1 margin {got} here, {want} on x86_64"
        );
    }
}

/// The shipped binary, as users run it: `edgelm run --json -n 16 --ignore-eos PROMPT`.
#[test]
fn binary_greedy_tokens_match_the_x86_64_recording() {
    let bundle = common::default_bundle(Quant::Int8);
    let out = common::edgelm_command()
        .args(["run", "--json", "--ignore-eos", "-n"])
        .arg(NEW_TOKENS.to_string())
        .arg("-m")
        .arg(&bundle)
        .arg(PROMPT)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "edgelm run failed: {stderr}");
    let ids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| v.get("id").and_then(Value::as_u64))
        .map(|id| id as u32)
        .collect();
    assert_eq!(ids, fixture().0);
}
