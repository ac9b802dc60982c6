//! The ring-buffer KV cache end to end: overflow in constant memory with every shift reported,
//! re-positioning past the trained context, f16 storage, and the `run --json` shift lines.

use crate::common;

use common::{argmax, fixture};

use edgelm::kv_cache::{KvType, Shift};
use edgelm::model::{CacheOptions, Model};

fn tiny_llama() -> Model {
    common::load_fixture("tiny-llama/onnx-f32")
}

/// 4x the ring's capacity (and past the model's 256 trained positions): the storage never
/// grows, the ring never holds more than its capacity, and the reported drops account for
/// every token that is gone.
#[test]
fn generating_four_times_the_ring_is_constant_memory_and_reports_every_shift() {
    let model = tiny_llama();
    assert_eq!(model.config().max_position_embeddings, 256);
    let opts = CacheOptions {
        ctx: 64,
        kv: KvType::F32,
        keep: 4,
    };
    let mut state = model.new_state_with(opts).unwrap();
    let prompt = [1u32, 17, 42, 99, 5, 250, 3];
    let mut logits = state.forward(&prompt).unwrap();
    let bytes = state.cache_bytes();
    // 2 layers × (K + V) × 2 kv heads × 64 slots × 16 wide × 4 bytes.
    assert_eq!(bytes, 2 * 2 * 2 * 64 * 16 * 4);
    let mut shifts: Vec<Shift> = state.take_shifts();
    let mut fed = prompt.len();
    while fed < 4 * 64 + prompt.len() + 20 {
        let id = argmax(&logits);
        logits = state.forward(&[id]).unwrap();
        fed += 1;
        shifts.extend(state.take_shifts());
        assert!(state.len() <= 64);
        assert!(state.position() <= 256);
        assert_eq!(state.cache_bytes(), bytes, "after {fed} tokens");
    }
    assert_eq!(state.len(), 64);
    let repositions: Vec<&Shift> = shifts.iter().filter(|s| s.repositioned).collect();
    assert_eq!(
        repositions,
        [&Shift {
            dropped: 0,
            kept: 64,
            repositioned: true
        }],
        "one re-prefill at fresh positions once 256 positions are used"
    );
    let dropped: usize = shifts.iter().map(|s| s.dropped).sum();
    assert_eq!(dropped, fed - 64, "every evicted token is reported");
    assert!(shifts
        .iter()
        .filter(|s| !s.repositioned)
        .all(|s| s.dropped == 1 && s.kept == 64));
    // Sinks survive every wrap.
    assert_eq!(state.ring().unwrap().kept_tokens()[..4], prompt[..4]);
}

/// A ring that never wraps is the plain KV cache: token-by-token logits equal one pass.
#[test]
fn small_ring_without_wrapping_matches_one_pass() {
    let model = tiny_llama();
    let ids: Vec<u32> = (0..30).map(|i| (i * 37 + 11) % 384).collect();
    let mut one = common::f32_state(&model);
    let all = one.forward_all(&ids).unwrap();
    let mut state = model
        .new_state_with(CacheOptions {
            ctx: 32,
            kv: KvType::F32,
            keep: 4,
        })
        .unwrap();
    let vocab = model.config().vocab_size;
    for (i, &id) in ids.iter().enumerate() {
        let row = state.forward(&[id]).unwrap();
        let want = &all[i * vocab..(i + 1) * vocab];
        let diff = row
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "token {i}: max diff {diff}");
    }
    assert!(state.take_shifts().is_empty());
}

/// A prompt longer than the ring is fed in chunks and wraps without error.
#[test]
fn a_prompt_longer_than_the_ring_wraps_in_chunks() {
    let model = tiny_llama();
    let mut state = model
        .new_state_with(CacheOptions {
            ctx: 16,
            kv: KvType::F32,
            keep: 2,
        })
        .unwrap();
    let ids: Vec<u32> = (0..50).map(|i| (i * 13 + 1) % 384).collect();
    let all = state.forward_all(&ids).unwrap();
    assert_eq!(all.len(), 50 * model.config().vocab_size);
    let dropped: usize = state.take_shifts().iter().map(|s| s.dropped).sum();
    assert_eq!(dropped, 50 - 16);
    let mut want = vec![ids[0], ids[1]];
    want.extend_from_slice(&ids[36..]);
    assert_eq!(state.ring().unwrap().kept_tokens(), want);
}

#[test]
fn f16_cache_halves_the_memory_and_stays_close() {
    let model = tiny_llama();
    let ids: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 384).collect();
    let mut f32_state = common::f32_state(&model);
    let opts = CacheOptions {
        ctx: 256,
        kv: KvType::F16,
        keep: 4,
    };
    let mut f16_state = model.new_state_with(opts).unwrap();
    let a = f32_state.forward_all(&ids).unwrap();
    let b = f16_state.forward_all(&ids).unwrap();
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-2, "max diff {diff}");
    assert_eq!(f16_state.cache_bytes() * 2, f32_state.cache_bytes());
}

#[test]
fn bad_cache_options_are_clear_errors() {
    let model = tiny_llama();
    let err = |ctx, keep| {
        let opts = CacheOptions {
            ctx,
            kv: KvType::F32,
            keep,
        };
        format!("{:#}", model.new_state_with(opts).unwrap_err())
    };
    assert_eq!(
        err(512, 4),
        "--ctx 512 exceeds the model's context of 256 positions"
    );
    assert_eq!(
        err(8, 8),
        "--keep 8 must be smaller than the cache size --ctx 8"
    );
}

/// `run --json` prints one `{"event":"shift",…}` line per eviction.
#[test]
fn run_json_reports_every_shift() {
    let out = common::edgelm_command()
        .args(["run", "-m"])
        .arg(fixture("tiny-llama/onnx-f32"))
        .args([
            "--ctx",
            "16",
            "--keep",
            "2",
            "-n",
            "40",
            "--ignore-eos",
            "--json",
            "hello world",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    common::assert_success(&out);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary = lines.last().unwrap();
    let prompt = summary["prompt_tokens"].as_u64().unwrap() as usize;
    assert_eq!(summary["generated_tokens"], 40);
    let shifts: Vec<&serde_json::Value> = lines.iter().filter(|l| l["event"] == "shift").collect();
    // Fed: the prompt and every generated token but the last.
    let fed = prompt + 39;
    assert_eq!(shifts.len(), fed - 16);
    for s in shifts {
        assert_eq!(
            s,
            &serde_json::json!({"event": "shift", "dropped": 1, "kept": 16})
        );
    }
}

/// GPT-2's learned positions end at `n_positions` (128 in the tiny model): generating well past
/// it re-prefills the kept window at fresh positions instead of indexing past `wpe`, and says so.
#[test]
fn gpt2_generates_past_n_positions_with_a_reported_reposition() {
    let model = common::load_fixture("tiny-gpt2/onnx-f32");
    assert!(model.has_ring_cache());
    let n_positions = model.config().max_position_embeddings;
    assert_eq!(n_positions, 128);
    let mut state = model.new_state();
    let mut logits = state.forward(&[5, 17, 42]).unwrap();
    let mut shifts = Vec::new();
    for _ in 0..3 * n_positions {
        logits = state.forward(&[argmax(&logits)]).unwrap();
        shifts.extend(state.take_shifts());
        assert!(state.position() <= n_positions);
    }
    let repositions = shifts.iter().filter(|s| s.repositioned).count();
    assert!(repositions >= 2, "{shifts:?}");

    let out = common::edgelm_command()
        .args(["run", "-m"])
        .arg(fixture("tiny-gpt2/onnx-f32"))
        .args(["-n", "300", "--ignore-eos", "--json", "Once upon a time"])
        .output()
        .unwrap();
    common::assert_success(&out);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.last().unwrap()["generated_tokens"], 300);
    assert!(
        lines
            .iter()
            .any(|l| l["event"] == "shift" && l["repositioned"] == true),
        "no repositioned shift reported"
    );
}
