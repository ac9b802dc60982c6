//! Every input under tests/fixtures/fuzz/<target>/ once made a fuzz target (fuzz/) panic,
//! hang or over-allocate; each is replayed here through the same harness, in the normal
//! `cargo test`, and must give the result written next to its name. The file names say what
//! broke.

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

/// What the pre-pass makes of each ONNX regression input, by file name. Three are graphs
/// the pre-pass has no reason to refuse (it rewrites what it recognizes and leaves the rest
/// to tract): they once hung or panicked it, and must now pass through.
const ONNX_PREPASS_RESULTS: [(&str, Result<(), &str>); 4] = [
    ("blocked-dequantize-empty-rows-hang", Ok(())),
    (
        "fold-transpose-dims-overflow",
        Err("tensor \"big\" is too large"),
    ),
    ("logits-matmul-without-inputs", Ok(())),
    ("q8-transpose-without-outputs", Ok(())),
];

#[test]
fn onnx_prepass_regressions_give_their_results() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz/onnx_prepass");
    let mut files: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let named: Vec<&str> = ONNX_PREPASS_RESULTS.iter().map(|(name, _)| *name).collect();
    assert_eq!(files, named, "every regression input has its result here");
    for (name, want) in ONNX_PREPASS_RESULTS {
        let bytes = fs::read(dir.join(name)).unwrap();
        let got = harness::onnx_prepass_result(&bytes);
        assert_eq!(got, Some(want.map_err(String::from)), "{name}");
    }
}

#[test]
fn protocol_line_inputs() {
    replay("protocol_line", harness::protocol_line);
}

#[test]
fn session_file_inputs() {
    replay("session_file", harness::session_file);
}
