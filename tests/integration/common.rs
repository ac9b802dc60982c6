//! Shared by the integration tests: the default model, fetched and converted on demand.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use edgelm::convert::{convert, ConvertOptions, Quant};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A file or directory under `tests/fixtures`.
pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

/// An empty directory `group/name` under cargo's per-test scratch dir (emptied first).
pub fn scratch(group: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(group)
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tiny fixture model's `reference.json` (transformers' outputs).
#[derive(serde::Deserialize)]
pub struct Reference {
    /// Token ids the logits are for.
    pub ids: Vec<u32>,
    /// Logits, (ids, vocab).
    pub logits: Vec<Vec<f32>>,
    /// Greedy generations.
    pub greedy: Vec<Greedy>,
}

/// One greedy generation of a reference.
#[derive(serde::Deserialize)]
pub struct Greedy {
    /// The prompt text.
    pub prompt: String,
    /// Its ids.
    pub prompt_ids: Vec<u32>,
    /// The greedy continuation's ids.
    pub generated_ids: Vec<u32>,
}

/// `tests/fixtures/<model>/reference.json`.
pub fn reference(model: &str) -> Reference {
    let text = std::fs::read_to_string(fixture(model).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The `edgelm` binary as a command. Under qemu-user a test cannot exec a foreign binary
/// (no binfmt_misc on build machines), so cross/test.sh names the emulator in
/// `EDGELM_TEST_RUNNER` (e.g. `qemu-aarch64 -L /usr/aarch64-linux-gnu`) and it is run through it.
/// `EDGELM_TEST_BIN` replaces the test build's binary with another one, so that
/// `cross/test.sh TARGET --board` tests the board binary (`[profile.pi]`) users copy over.
pub fn edgelm_command() -> Command {
    let bin = std::env::var_os("EDGELM_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_edgelm")));
    let runner = std::env::var("EDGELM_TEST_RUNNER").unwrap_or_default();
    let mut parts = runner.split_whitespace();
    match parts.next() {
        Some(emulator) => {
            let mut cmd = Command::new(emulator);
            cmd.args(parts).arg(bin);
            cmd
        }
        None => Command::new(bin),
    }
}

/// The SmolLM2-135M-Instruct GGUF, fetched by `models/fetch-smollm2.sh` when missing.
pub fn default_gguf() -> PathBuf {
    if let Ok(p) = std::env::var("EDGELM_GGUF") {
        return PathBuf::from(p);
    }
    static FETCH: Mutex<()> = Mutex::new(());
    let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(root().join("models/fetch-smollm2.sh"))
        .arg("--gguf-only")
        .output()
        .expect("running models/fetch-smollm2.sh");
    assert!(
        out.status.success(),
        "models/fetch-smollm2.sh --gguf-only failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        path.is_file(),
        "fetch script printed {path:?}, which is not a file"
    );
    path
}

/// A bundle converted from the default GGUF, cached under `target/test-bundles/`.
pub fn default_bundle(quant: Quant) -> PathBuf {
    let gguf = default_gguf();
    let dir = root()
        .join("target/test-bundles")
        .join(format!("smollm2-{}", quant.name()));
    convert_once(&gguf, &dir, quant);
    dir
}

/// Converts `input` into `dir` unless a previous run finished it (marker file written last).
pub fn convert_once(input: &Path, dir: &Path, quant: Quant) {
    static CONVERT: Mutex<()> = Mutex::new(());
    let _guard = CONVERT.lock().unwrap_or_else(|e| e.into_inner());
    let marker = dir.join(".converted");
    let stamp = format!(
        "{}:{:016x}",
        std::fs::metadata(input).map(|m| m.len()).unwrap_or(0),
        converter_source_hash()
    );
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(stamp.as_str()) {
        return;
    }
    let _ = std::fs::remove_dir_all(dir);
    convert(&ConvertOptions {
        input: input.to_path_buf(),
        output: dir.to_path_buf(),
        quant,
        progress: false,
    })
    .unwrap_or_else(|e| panic!("converting {input:?}: {e:#}"));
    std::fs::write(&marker, stamp).unwrap();
}

/// A hash of the converter's sources, so a changed converter invalidates cached bundles.
fn converter_source_hash() -> u64 {
    use std::hash::{Hash, Hasher};
    let mut files = vec![];
    for dir in ["src/convert", "src/quant"] {
        if let Ok(rd) = std::fs::read_dir(root().join(dir)) {
            files.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
        }
    }
    files.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        std::fs::read(&f).unwrap_or_default().hash(&mut h);
    }
    h.finish()
}

/// llama.cpp's source tree from the llama-cpp-python sdist (tokenizer test vectors in
/// `models/`, chat templates in `models/templates/`), fetched by
/// `models/fetch-llama-cpp.sh` when missing.
pub fn llama_cpp_tree() -> PathBuf {
    static FETCH: Mutex<()> = Mutex::new(());
    let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(root().join("models/fetch-llama-cpp.sh"))
        .output()
        .expect("running models/fetch-llama-cpp.sh");
    assert!(
        out.status.success(),
        "models/fetch-llama-cpp.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        path.join("models").is_dir(),
        "fetch script printed {path:?}, which has no models/"
    );
    path
}
