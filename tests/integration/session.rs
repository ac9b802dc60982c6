//! Session files: a saved and restored conversation continues exactly like an uninterrupted
//! one; damaged files are clear errors.

use crate::common;

use common::{argmax, load_fixture as load};
use std::fs;
use std::path::{Path, PathBuf};

use edgelm::kv_cache::KvType;
use edgelm::model::{CacheOptions, Model, State};
use edgelm::session;

/// A session file path under this module's scratch directory.
fn scratch(name: &str) -> PathBuf {
    common::scratch("session", name).join("session.bin")
}

/// Greedy-decodes `n` tokens from `logits`, returning the ids and every step's logits.
fn greedy(state: &mut State, mut logits: Vec<f32>, n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let (mut ids, mut all) = (vec![], vec![]);
    for _ in 0..n {
        let id = argmax(&logits);
        ids.push(id);
        logits = state.forward(&[id]).unwrap();
        all.push(logits.clone());
    }
    (ids, all)
}

fn round_trip(opts: CacheOptions, name: &str) {
    let model = load("tiny-llama/onnx-f32");
    let mut a = model.new_state_with(opts).unwrap();
    let prompt: Vec<u32> = (0..20).map(|i| (i * 29 + 5) % 384).collect();
    let logits = a.forward(&prompt).unwrap();
    let (_, history) = greedy(&mut a, logits, 30);
    let path = scratch(name);
    session::save(&model, &a, &path).unwrap();

    let mut b = session::load(&model, &path).unwrap();
    assert_eq!(b.len(), a.len());
    assert_eq!(b.position(), a.position());
    assert_eq!(
        b.ring().unwrap().kept_tokens(),
        a.ring().unwrap().kept_tokens()
    );
    let last = history.last().unwrap().clone();
    let (ids_a, logits_a) = greedy(&mut a, last.clone(), 20);
    let (ids_b, logits_b) = greedy(&mut b, last, 20);
    assert_eq!(ids_a, ids_b);
    assert_eq!(logits_a, logits_b, "bit-identical continuation");
}

#[test]
fn restored_session_continues_like_an_uninterrupted_run() {
    round_trip(
        CacheOptions {
            ctx: 256,
            kv: KvType::F32,
            keep: 4,
        },
        "plain.session",
    );
}

#[test]
fn restored_wrapped_f16_ring_continues_like_an_uninterrupted_run() {
    round_trip(
        CacheOptions {
            ctx: 24,
            kv: KvType::F16,
            keep: 3,
        },
        "wrapped.session",
    );
}

fn saved(name: &str) -> (Model, PathBuf, Vec<u8>) {
    let model = load("tiny-llama/onnx-f32");
    let mut state = model.new_state();
    state.forward(&[1, 2, 3, 4, 5]).unwrap();
    let path = scratch(name);
    session::save(&model, &state, &path).unwrap();
    let bytes = fs::read(&path).unwrap();
    (model, path, bytes)
}

fn load_error(model: &Model, path: &Path) -> String {
    format!("{:#}", session::load(model, path).unwrap_err())
}

#[test]
fn a_corrupted_session_is_a_clear_error() {
    let (model, path, mut bytes) = saved("corrupt.session");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::write(&path, &bytes).unwrap();
    let err = load_error(&model, &path);
    assert!(
        err.ends_with("checksum mismatch (corrupted or truncated)"),
        "{err}"
    );
    assert!(err.contains("corrupt.session"), "{err}");
}

#[test]
fn a_truncated_session_is_a_clear_error() {
    let (model, path, bytes) = saved("truncated.session");
    for len in [bytes.len() - 1, bytes.len() / 3, 10, 0] {
        fs::write(&path, &bytes[..len]).unwrap();
        let err = load_error(&model, &path);
        assert!(
            err.ends_with("checksum mismatch (corrupted or truncated)")
                || err.ends_with("not an edgelm session file")
                || err.ends_with("truncated"),
            "{len}: {err}"
        );
    }
}

#[test]
fn wrong_magic_version_or_model_are_named() {
    let (model, path, bytes) = saved("header.session");
    let mut other = bytes.clone();
    other[0] = b'X';
    fs::write(&path, &other).unwrap();
    assert!(load_error(&model, &path).ends_with("not an edgelm session file"));

    let mut other = bytes.clone();
    other[8] = 9;
    fs::write(&path, &other).unwrap();
    assert!(load_error(&model, &path).ends_with("format version 9; this edgelm reads version 1"));

    fs::write(&path, &bytes).unwrap();
    let gpt2 = load("tiny-gpt2/onnx-f32");
    let err = load_error(&gpt2, &path);
    assert!(err.contains("saved with a different model"), "{err}");
}
