//! Session files: a saved and restored cache continues exactly like an uninterrupted run, a
//! chat continued across processes replies as one process would, a version 1 file is read as
//! the raw completion it holds; damaged files are clear errors.

use crate::common;

use common::{argmax, load_fixture as load};
use std::fs;
use std::path::{Path, PathBuf};

use edgelm::kv_cache::KvType;
use edgelm::model::{CacheOptions, Model, State};
use edgelm::session;

use crate::chat::{chat_command, tiny_replies, QUESTIONS, SYSTEM};

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
    session::save(&model, &a, None, &path).unwrap();

    let saved = session::load(&model, &path).unwrap();
    assert_eq!(saved.chat, None);
    let mut b = saved.state;
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
    session::save(&model, &state, None, &path).unwrap();
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
    assert!(
        load_error(&model, &path).ends_with("format version 9; this edgelm reads versions 1 to 3")
    );

    fs::write(&path, &bytes).unwrap();
    let gpt2 = load("tiny-gpt2/onnx-f32");
    let err = load_error(&gpt2, &path);
    assert!(err.contains("saved with a different model"), "{err}");
}

/// A version 1 file (the format without a contents section; the tiny Llama, `--ctx 32`) is
/// read as the raw completion it holds: its cache continues as the same tokens prefilled
/// afresh.
#[test]
fn a_version_1_session_is_read_as_a_raw_completion() {
    let model = load("tiny-llama/onnx-f32");
    let path = common::fixture("sessions/v1-tiny-llama-f32.session");
    assert_eq!(
        fs::read(&path).unwrap()[8],
        1,
        "the fixture is a version 1 file"
    );
    let saved = session::load(&model, &path).unwrap();
    assert_eq!(saved.chat, None);
    let mut restored = saved.state;
    let held = restored.ring().unwrap().kept_tokens();
    assert_eq!(
        held,
        [40, 69, 76, 76, 79, 12, 221, 77, 89, 272, 65, 268, 221, 73, 83, 62, 190, 190, 190, 190]
    );
    assert_eq!(restored.position(), 20);
    assert_eq!(restored.capacity(), 32);

    let mut fresh = model
        .new_state_with(CacheOptions {
            ctx: 32,
            kv: KvType::F32,
            keep: 4,
        })
        .unwrap();
    let next = argmax(&fresh.forward(&held).unwrap());
    let logits_fresh = fresh.forward(&[next]).unwrap();
    let logits_restored = restored.forward(&[next]).unwrap();
    let diff = common::max_abs_diff(&logits_fresh, &logits_restored);
    assert!(diff < 1e-5, "logits differ by {diff}");
    let (ids_fresh, _) = greedy(&mut fresh, logits_fresh, 8);
    let (ids_restored, _) = greedy(&mut restored, logits_restored, 8);
    assert_eq!(ids_fresh, ids_restored);
}

/// A conversation saved by `edgelm chat`, continued by another `edgelm chat` and then by
/// `edgelm run --chat`, each loading and saving the same file, replies word for word as one
/// conversation in one process (greedy), trimming included: the third turn drops the first
/// exchange there as here.
#[test]
fn a_chat_continued_across_processes_replies_as_one_process() {
    let expected = tiny_replies(&QUESTIONS, 8);
    let path = scratch("chat.session");
    let file = path.to_str().unwrap();

    let first = chat_command(
        &[
            "--ctx",
            "256",
            "--keep",
            "4",
            "--system",
            SYSTEM,
            "--save-session",
            file,
        ],
        &[QUESTIONS[0]],
    );
    common::assert_success(&first);
    assert_eq!(
        String::from_utf8_lossy(&first.stdout),
        format!("> {}\n> \n", expected[0])
    );

    let second = chat_command(
        &["--load-session", file, "--save-session", file],
        &[QUESTIONS[1]],
    );
    common::assert_success(&second);
    assert_eq!(
        String::from_utf8_lossy(&second.stdout),
        format!("> {}\n> \n", expected[1])
    );

    let third = common::edgelm_command()
        .args(["run", "--chat", "-m"])
        .arg(crate::serve::chat_bundle())
        .args(["-t", "1", "-n", "8", "--load-session", file])
        .args(["--save-session", file, QUESTIONS[2]])
        .output()
        .unwrap();
    common::assert_success(&third);
    assert_eq!(
        String::from_utf8_lossy(&third.stdout),
        format!("{}\n", expected[2])
    );
    assert_eq!(
        String::from_utf8_lossy(&third.stderr)
            .lines()
            .collect::<Vec<_>>(),
        ["[conversation too long: dropped the oldest 1 exchange(s)]"]
    );

    // What the file holds now: the system prompt and the two exchanges kept.
    let model = load("tiny-llama/onnx-int8");
    let chat = session::load(&model, &path).unwrap().chat.unwrap();
    assert_eq!(chat.system.as_deref(), Some(SYSTEM));
    let said: Vec<(&str, &str)> = chat
        .messages
        .iter()
        .map(|m| (m.role.as_str(), m.content.as_str()))
        .collect();
    assert_eq!(
        said,
        [
            ("user", QUESTIONS[1]),
            ("assistant", expected[1].as_str()),
            ("user", QUESTIONS[2]),
            ("assistant", expected[2].as_str()),
        ]
    );
}

/// A raw completion's session and a conversation's are not mixed up: each refuses the other
/// command with a one-line error that says which to use.
#[test]
fn a_raw_session_and_a_chat_session_each_name_the_command_that_continues_them() {
    let raw = scratch("raw-vs-chat.session");
    let out = common::edgelm_command()
        .args(["run", "-m"])
        .arg(crate::serve::chat_bundle())
        .args(["-t", "1", "-n", "4", "--save-session"])
        .arg(&raw)
        .arg("Once upon a time")
        .output()
        .unwrap();
    common::assert_success(&out);
    let out = chat_command(&["--load-session", raw.to_str().unwrap()], &["Hi!"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("holds a raw completion, not a conversation"),
        "{err}"
    );

    let chat = scratch("chat-vs-raw.session");
    let out = chat_command(&["--save-session", chat.to_str().unwrap()], &["Hi!"]);
    common::assert_success(&out);
    let out = common::edgelm_command()
        .args(["run", "-m"])
        .arg(crate::serve::chat_bundle())
        .args(["-t", "1", "-n", "4", "--load-session"])
        .arg(&chat)
        .arg("and then")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("holds a conversation: continue it with edgelm chat or run --chat"),
        "{err}"
    );
}
