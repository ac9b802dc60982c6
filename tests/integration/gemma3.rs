//! Gemma 3's sliding-window layers on the tiny fixture (`tests/fixtures/tiny-gemma3/`: 6
//! layers, layers 0-4 local with a window of 16, layer 5 global; KV: 1 head of 32): each
//! local layer's ring holds exactly its window, a conversation running far past the window
//! gives transformers' logits, `edgelm info` shows the rings, and session files keep rings
//! of different sizes. Greedy tokens and logits of the four conversions are in `families`.

use crate::common;

use common::{fixture, max_abs_diff, reference, scratch};
use edgelm::convert::{convert, ConvertOptions, Quant};
use edgelm::kv_cache::KvType;
use edgelm::model::{CacheOptions, Model};
use edgelm::session;

const MODEL: &str = "tiny-gemma3";
const WINDOW: usize = 16;
/// Key and value bytes of one token on one layer: 2 × 1 head × 32 × f32.
const SLOT_BYTES: usize = 2 * 32 * 4;

/// The f32 bundle converted from the Hugging Face checkpoint, and its directory.
fn bundle(name: &str) -> (std::path::PathBuf, Model) {
    let out = scratch("gemma3", name);
    convert(&ConvertOptions {
        input: fixture(MODEL).join("hf"),
        output: out.clone(),
        quant: Quant::F32,
        int8_layout: Default::default(),
        threads: 2,
        progress: false,
    })
    .unwrap();
    let m = common::load(&out);
    assert!(m.has_ring_cache());
    (out, m)
}

fn cache(ctx: usize) -> CacheOptions {
    CacheOptions {
        ctx,
        kv: KvType::F32,
        keep: 4,
    }
}

/// With `--ctx 128` (room for all 122 fixed ids), the local layers get 16 slots and the
/// global one 128; a 40-token prefill (longer than the window) then 82 single-token steps
/// give every position's logits within 1e-4 of transformers', the local rings stay full at
/// 16 tokens, and nothing is reported as evicted.
#[test]
fn local_rings_hold_exactly_the_window_and_match_transformers_past_it() {
    let (_, m) = bundle("window");
    let r = reference(MODEL);
    let mut state = m.new_state_with(cache(128)).unwrap();
    assert_eq!(state.layer_capacities(), [16, 16, 16, 16, 16, 128]);
    let prefill = 40;
    let mut got = state.forward_all(&r.ids[..prefill]).unwrap(); // (ids, vocab)
    let kv = state.layer_kv().unwrap();
    let bytes: Vec<usize> = kv.iter().map(|kv| kv.bytes()).collect();
    let local = WINDOW * SLOT_BYTES;
    assert_eq!(bytes, [local, local, local, local, local, 128 * SLOT_BYTES]);
    let rings = state.local_rings();
    assert_eq!(rings.len(), 1);
    assert_eq!(rings[0].layers, [0, 1, 2, 3, 4]);
    assert_eq!(
        (rings[0].layout.capacity(), rings[0].layout.len()),
        (16, 16)
    );
    assert_eq!(rings[0].layout.n_keep(), 0);
    for &id in &r.ids[prefill..] {
        got.extend(state.forward(&[id]).unwrap());
    }
    assert_eq!(state.len(), r.ids.len());
    assert_eq!(state.local_rings()[0].layout.len(), WINDOW);
    assert!(
        state.take_shifts().is_empty(),
        "a window is not an eviction"
    );
    let diff = max_abs_diff(&got, &r.logits.concat());
    eprintln!("prefill {prefill} then decode: max |logits - transformers| = {diff:e}");
    assert!(diff <= 1e-4, "max abs diff {diff}");
}

/// `edgelm info` lists each layer's ring at the default context (the model's 1024) and the
/// KV bytes a token adds with the default f16 storage: 128 on the one global layer; the five
/// local rings are 16 × 128 bytes each.
#[test]
fn info_shows_ring_sizes_and_kv_bytes_per_token() {
    let (dir, _) = bundle("info");
    let out = common::edgelm_command()
        .args(["info", "-t", "1", "-m"])
        .arg(&dir)
        .output()
        .unwrap();
    common::assert_success(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("\nKV ring slots per layer (--ctx 1024): 16 16 16 16 16 1024\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "\nKV bytes per token: 128 (f16; 1 of 6 layers keep every token), plus 10240 \
             bytes for the 5 sliding-window layers' rings\n"
        ),
        "{text}"
    );
    assert!(text.contains("architecture: gemma3_text (Gemma3ForCausalLM)"));
}

/// A session saved after 40 tokens (local rings wrapped, global ring not) and loaded again
/// continues with the same logits, bit for bit, as the conversation that was never saved.
#[test]
fn session_keeps_rings_of_different_sizes() {
    let (_, m) = bundle("session");
    let r = reference(MODEL);
    let mut a = m.new_state_with(cache(64)).unwrap();
    a.forward(&r.ids[..40]).unwrap();
    let path = scratch("gemma3", "session-file").join("s.edgelm");
    session::save(&m, &a, None, &path).unwrap();
    let mut b = session::load(&m, &path).unwrap().into_raw(&path).unwrap();
    assert_eq!(b.layer_capacities(), [16, 16, 16, 16, 16, 64]);
    assert_eq!(b.local_rings()[0].layout, a.local_rings()[0].layout);
    assert_eq!(b.ring(), a.ring());
    for &id in &r.ids[40..60] {
        assert_eq!(b.forward(&[id]).unwrap(), a.forward(&[id]).unwrap());
    }
}

/// The converted graph alone, run by tract without the ring rewrite (as another ONNX runtime
/// would run it: all 122 ids at once, empty pasts), gives transformers' logits: the window
/// is in the local layers' attention mask, not only in edgelm's rings.
#[test]
fn the_graph_alone_masks_local_layers_to_the_window() {
    use tract_onnx::prelude::*;
    let (dir, m) = bundle("graph");
    let r = reference(MODEL);
    let n = r.ids.len();
    let ids: Vec<i64> = r.ids.iter().map(|&t| i64::from(t)).collect();
    let positions: Vec<i64> = (0..n as i64).collect();
    let mut inputs: TVec<TValue> = tvec![
        tensor1(&ids).into_shape(&[1, n]).unwrap().into(),
        tensor1(&vec![1i64; n]).into_shape(&[1, n]).unwrap().into(),
        tensor1(&positions).into_shape(&[1, n]).unwrap().into(),
    ];
    for _ in 0..2 * m.config().num_hidden_layers {
        inputs.push(Tensor::zero::<f32>(&[1, 1, 0, 32]).unwrap().into());
    }
    let mut model = tract_onnx::onnx()
        .model_for_path(dir.join("model.onnx"))
        .unwrap();
    for (i, t) in inputs.iter().enumerate() {
        let fact = InferenceFact::dt_shape(t.datum_type(), t.shape());
        model.set_input_fact(i, fact).unwrap();
    }
    let plan = model.into_typed().unwrap().into_runnable().unwrap();
    let out = plan.run(inputs).unwrap();
    let logits = out[0].try_as_plain_ram().unwrap();
    let logits = logits.as_slice::<f32>().unwrap();
    let diff = max_abs_diff(logits, &r.logits.concat());
    eprintln!("graph without the ring: max |logits - transformers| = {diff:e}");
    assert!(diff <= 1e-4, "max abs diff {diff}");
}

/// When the positions reach the model's 1024, the kept tokens are re-prefilled at fresh
/// positions: the local rings start over with them as the global ring does, so the next
/// chunk's logits equal, bit for bit, those of a fresh conversation fed the kept tokens.
#[test]
fn re_positioning_starts_the_local_rings_over() {
    let (_, m) = bundle("reposition");
    let r = reference(MODEL);
    let text: Vec<u32> = r.ids.iter().cycle().take(1100).copied().collect();
    let mut a = m.new_state_with(cache(64)).unwrap();
    let chunk = 60; // the ring's longest chunk: 64 slots - 4 sinks
    let mut at = 0;
    while at + chunk <= 1024 {
        a.forward(&text[at..at + chunk]).unwrap();
        at += chunk;
    }
    let kept = a.ring().unwrap().kept_tokens();
    a.take_shifts();
    let next = &text[at..at + chunk];
    let got = a.forward_all(next).unwrap();
    let shifts = a.take_shifts();
    assert!(shifts.first().is_some_and(|s| s.repositioned), "{shifts:?}");
    let mut b = m.new_state_with(cache(64)).unwrap();
    b.forward(&kept).unwrap();
    assert_eq!(got, b.forward_all(next).unwrap());
    assert_eq!(a.local_rings()[0].layout, b.local_rings()[0].layout);
}
