//! Every input under tests/fixtures/fuzz/<target>/ once made a fuzz target (fuzz/) panic,
//! hang or over-allocate; each is replayed here through the same harness, in the normal
//! `cargo test`. The file names say what broke.

use std::fs;
use std::path::Path;

#[path = "../../fuzz/harness.rs"]
mod harness;

/// Runs `harness` on every file in tests/fixtures/fuzz/`target` (the inputs that found
/// bugs) and fuzz/seeds/`target` (the starting seeds), naming the ones that panic.
fn replay(target: &str, harness: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut failed = vec![];
    let mut count = 0;
    for dir in [root.join("tests/fixtures/fuzz"), root.join("fuzz/seeds")] {
        let Ok(entries) = fs::read_dir(dir.join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let bytes = fs::read(&path).unwrap();
            count += 1;
            if std::panic::catch_unwind(|| harness(&bytes)).is_err() {
                failed.push(path.display().to_string());
            }
        }
    }
    assert!(failed.is_empty(), "{target}: {failed:#?} panicked");
    assert!(count > 0, "{target}: no inputs");
}

#[test]
fn gguf_inputs() {
    replay("gguf", harness::gguf);
}

#[test]
fn onnx_prepass_inputs() {
    replay("onnx_prepass", harness::onnx_prepass);
}

#[test]
fn protocol_line_inputs() {
    replay("protocol_line", harness::protocol_line);
}

#[test]
fn session_file_inputs() {
    replay("session_file", harness::session_file);
}
