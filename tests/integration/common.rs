//! Shared by the integration tests: fixtures and scratch directories, loading and greedy
//! decoding, the binary as a command, and the default model, fetched and converted on demand.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Duration;

use edgelm::convert::{convert, ConvertOptions, Int8Layout, Quant};
use edgelm::kv_cache::KvType;
use edgelm::model::{CacheOptions, LoadOptions, Model, State};

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

/// Loads the bundle in `dir` on one thread (the tests compare exact values).
pub fn load(dir: &Path) -> Model {
    let opts = LoadOptions {
        threads: 1,
        ..Default::default()
    };
    Model::load(dir, &opts).unwrap_or_else(|e| panic!("loading {dir:?}: {e:#}"))
}

/// Loads `tests/fixtures/<bundle>` on one thread.
pub fn load_fixture(bundle: &str) -> Model {
    load(&fixture(bundle))
}

/// A fresh conversation at the default size with f32 keys and values: the exact arithmetic
/// that comparisons with reference logits (transformers, one pass) hold to tight bounds.
pub fn f32_state(model: &Model) -> State {
    let opts = CacheOptions {
        kv: KvType::F32,
        ..Default::default()
    };
    model.new_state_with(opts).unwrap()
}

/// First index of the maximum, like `torch.argmax`.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// The largest `|a[i] - b[i]|`.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `steps` greedy tokens after `prompt`, from a reset `state`.
pub fn greedy(state: &mut State, prompt: &[u32], steps: usize) -> Vec<u32> {
    state.reset();
    let mut logits = state.forward(prompt).unwrap();
    let mut out = Vec::new();
    for _ in 0..steps {
        let next = argmax(&logits);
        out.push(next);
        logits = state.forward(&[next]).unwrap();
    }
    out
}

/// A JSON array of token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    let ids = v
        .as_array()
        .unwrap_or_else(|| panic!("{v} is not an array"));
    ids.iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// `tests/fixtures/smollm2-135m-instruct/golden_hf.json`: transformers' greedy generations.
pub fn golden_hf() -> serde_json::Value {
    let path = fixture("smollm2-135m-instruct/golden_hf.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Asserts the command succeeded, showing its stderr when it did not.
pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
/// A time limit for waiting on a child process: `native` times `EDGELM_TEST_SLOWDOWN`
/// (default 1; `cross/test.sh` sets it for emulated runs, which are ten or more times slower).
pub fn patience(native: Duration) -> Duration {
    let factor = std::env::var("EDGELM_TEST_SLOWDOWN")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1);
    native * factor.max(1)
}

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

/// The int8 bundle of the default GGUF with row-major int8 matrices (`--int8-layout rows`),
/// cached under `target/test-bundles/`.
pub fn default_bundle_rows() -> PathBuf {
    let gguf = default_gguf();
    let dir = root().join("target/test-bundles/smollm2-int8-rows");
    convert_once_with(&gguf, &dir, Quant::Int8, Int8Layout::Rows);
    dir
}

/// Converts `input` into `dir` unless a previous run finished it (marker file written last).
pub fn convert_once(input: &Path, dir: &Path, quant: Quant) {
    convert_once_with(input, dir, quant, Int8Layout::default());
}

/// [`convert_once`] with a chosen int8 layout.
pub fn convert_once_with(input: &Path, dir: &Path, quant: Quant, int8_layout: Int8Layout) {
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
        int8_layout,
        threads: 0,
        progress: false,
    })
    .unwrap_or_else(|e| panic!("converting {input:?}: {e:#}"));
    std::fs::write(&marker, stamp).unwrap();
}

/// A hash of the converter's sources, so a changed converter invalidates cached bundles.
fn converter_source_hash() -> u64 {
    use std::hash::{Hash, Hasher};
    let mut files = vec![];
    let mut dirs = vec![root().join("src/convert"), root().join("src/quant")];
    while let Some(dir) = dirs.pop() {
        for path in std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
        {
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
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
