//! The loader and KV-cache forward against the tiny models' Hugging Face references
//! (`tests/fixtures/*/reference.json`, recorded with transformers in f32).

use crate::common;

use common::{argmax, fixture, greedy, load_fixture as load, max_abs_diff, reference};
use std::fs;
use std::path::{Path, PathBuf};

use edgelm::model::{ForwardError, LoadOptions, Model};
use edgelm::quant::Scheme;
use prost::Message;
use tract_onnx::pb;

fn scratch(name: &str) -> PathBuf {
    common::scratch("model_tiny", name)
}

fn copy_bundle(from: &str, to: &Path, files: &[&str]) {
    for f in files {
        fs::copy(fixture(from).join(f), to.join(f)).unwrap();
    }
}

fn check_one_pass_logits(model_name: &str) {
    let model = load(&format!("{model_name}/onnx-f32"));
    let reference = reference(model_name);
    let vocab = model.config().vocab_size;
    let mut state = common::f32_state(&model);
    let logits = state.forward_all(&reference.ids).unwrap(); // (ids, vocab)
    assert_eq!(state.len(), reference.ids.len());
    let want: Vec<f32> = reference.logits.concat();
    assert_eq!(logits.len(), reference.ids.len() * vocab);
    let diff = max_abs_diff(&logits, &want);
    eprintln!("{model_name} f32: max |logits - reference| = {diff:e}");
    assert!(diff <= 1e-4, "{model_name}: max abs diff {diff}");
}

fn check_incremental_equals_one_pass(model_name: &str) {
    let model = load(&format!("{model_name}/onnx-f32"));
    let ids = reference(model_name).ids;
    let vocab = model.config().vocab_size;
    let one_pass = common::f32_state(&model).forward_all(&ids).unwrap(); // (ids, vocab)

    let half = ids.len() / 2;
    let mut state = common::f32_state(&model);
    let prefill = state.forward_all(&ids[..half]).unwrap(); // (half, vocab)
    let mut diff = max_abs_diff(&prefill, &one_pass[..half * vocab]);
    for (pos, &id) in ids.iter().enumerate().skip(half) {
        let row = state.forward(&[id]).unwrap(); // (vocab)
        assert_eq!(state.len(), pos + 1);
        diff = diff.max(max_abs_diff(
            &row,
            &one_pass[pos * vocab..(pos + 1) * vocab],
        ));
    }
    eprintln!("{model_name} f32: max |incremental - one pass| = {diff:e}");
    assert!(diff <= 1e-4, "{model_name}: max abs diff {diff}");
}

fn check_greedy(model_name: &str) {
    let model = load(&format!("{model_name}/onnx-f32"));
    let mut state = common::f32_state(&model);
    for g in reference(model_name).greedy {
        let got = greedy(&mut state, &g.prompt_ids, g.generated_ids.len());
        assert_eq!(got, g.generated_ids, "{model_name}: prompt {:?}", g.prompt);
    }
}

#[test]
fn llama_f32_one_pass_logits_match_reference() {
    check_one_pass_logits("tiny-llama");
}

#[test]
fn gpt2_f32_one_pass_logits_match_reference() {
    check_one_pass_logits("tiny-gpt2");
}

#[test]
fn llama_f32_incremental_logits_equal_one_pass() {
    check_incremental_equals_one_pass("tiny-llama");
}

#[test]
fn gpt2_f32_incremental_logits_equal_one_pass() {
    check_incremental_equals_one_pass("tiny-gpt2");
}

#[test]
fn llama_f32_greedy_matches_reference() {
    check_greedy("tiny-llama");
}

#[test]
fn gpt2_f32_greedy_matches_reference() {
    check_greedy("tiny-gpt2");
}

/// Top-1 agreement of the int8 (`MatMulInteger`) bundle with the f32 one, teacher-forced on
/// the reference ids and on every greedy prompt + continuation, run by `int8` (our operator
/// after the rewrite, or tract's integer path with `Fold`); also reports the largest logit
/// difference and the greedy tokens. Returns (positions that agree, positions).
fn int8_top1_agreement_with(model_name: &str, int8: Scheme) -> (usize, usize) {
    let f32_model = load(&format!("{model_name}/onnx-f32"));
    let int8_model = Model::load(
        &fixture(&format!("{model_name}/onnx-int8")),
        &LoadOptions {
            threads: 1,
            int8,
            ..Default::default()
        },
    )
    .unwrap();
    let vocab = f32_model.config().vocab_size;
    let reference = reference(model_name);
    let mut sequences = vec![reference.ids.clone()];
    sequences.extend(
        reference
            .greedy
            .iter()
            .map(|g| [&g.prompt_ids[..], &g.generated_ids[..]].concat()),
    );

    let (mut agree, mut total, mut diff) = (0, 0, 0f32);
    for ids in &sequences {
        let want = common::f32_state(&f32_model).forward_all(ids).unwrap(); // (ids, vocab)
        let got = common::f32_state(&int8_model).forward_all(ids).unwrap(); // (ids, vocab)
        diff = diff.max(max_abs_diff(&want, &got));
        for (w, g) in want.chunks(vocab).zip(got.chunks(vocab)) {
            agree += usize::from(argmax(w) == argmax(g));
            total += 1;
        }
    }
    let mut state = common::f32_state(&int8_model);
    for g in &reference.greedy {
        let tokens = greedy(&mut state, &g.prompt_ids, g.generated_ids.len());
        eprintln!(
            "{model_name} int8 ({int8:?}) greedy {:?}: {tokens:?} (f32: {:?})",
            g.prompt, g.generated_ids
        );
    }
    let rate = agree as f64 / total as f64;
    eprintln!(
        "{model_name} int8 ({int8:?}): top-1 agreement with f32 {agree}/{total} = {rate:.3}, \
         max |logits - f32| = {diff:.4}"
    );
    (agree, total)
}

/// Asserts each int8 path agrees with f32 on at least `least` of the 83 positions.
fn assert_int8_top1_agreement(model_name: &str, least: [(Scheme, usize); 3]) {
    for (int8, least) in least {
        let (agree, total) = int8_top1_agreement_with(model_name, int8);
        assert_eq!(total, 83);
        assert!(
            agree >= least,
            "{model_name} {int8:?}: top-1 agreement {agree}/{total} < {least}"
        );
    }
}

// The thresholds are one position under what every x86_64 kernel measures (scalar, AVX2 and
// AVX-512 alike), so that a near-tie flipping on another architecture is no failure.

#[test]
fn llama_int8_agrees_with_f32_on_78_of_83_positions() {
    // Measured 79/83 (0.952) with f32 and int16 activations, 77/83 with tract's integers.
    assert_int8_top1_agreement(
        "tiny-llama",
        [(Scheme::Q8F32, 78), (Scheme::Q8Q16, 78), (Scheme::Fold, 76)],
    );
}

#[test]
fn gpt2_int8_agrees_with_f32_on_81_of_83_positions() {
    // Measured 82/83 (0.988) on every path.
    assert_int8_top1_agreement(
        "tiny-gpt2",
        [(Scheme::Q8F32, 81), (Scheme::Q8Q16, 81), (Scheme::Fold, 81)],
    );
}

/// ONNX Runtime `quantize_dynamic` bundles: every `MatMulInteger` layer is rewritten onto our
/// int8 operator, so none of tract's integer-matmul path (its `DynamicQuantizeLinearU8` /
/// `OffsetU8asI8` ops, present with `--int8 fold`) is left in the optimized graph.
#[test]
fn ort_matmul_integer_runs_on_the_q8_operator() {
    // Llama's query/key/value and gate/up projections read one input each: 4 nodes for the
    // 7 matrices of each of its 2 layers. GPT-2's 4 matrices per layer read 4 inputs.
    for (bundle, layers, nodes) in [
        ("tiny-llama/onnx-int8", 14, 8),
        ("tiny-gpt2/onnx-int8", 8, 8),
    ] {
        let model = load(bundle);
        let s = model.summary();
        assert_eq!(s.source_ops.get("MatMulInteger"), Some(&layers), "{bundle}");
        assert_eq!(s.matmul_integer_rewritten, layers, "{bundle}");
        assert_eq!(s.q8_matmuls, layers, "{bundle}");
        assert_eq!(s.optimized_ops.get("Q8MatMul"), Some(&nodes), "{bundle}");
        for op in ["DynamicQuantizeLinearU8", "OffsetU8asI8", "MatMulInteger"] {
            assert!(
                !s.optimized_ops.contains_key(op),
                "{bundle}: {op} left in {:?}",
                s.optimized_ops
            );
        }
        assert!(s.ring_cache, "{bundle}");

        let folded = Model::load(
            &fixture(bundle),
            &LoadOptions {
                threads: 1,
                int8: Scheme::Fold,
                ..Default::default()
            },
        )
        .unwrap();
        let s = folded.summary();
        assert_eq!(s.matmul_integer_rewritten, 0);
        assert!(s.optimized_ops.contains_key("DynamicQuantizeLinearU8"));
    }
}

#[test]
fn reset_forgets_the_conversation() {
    let model = load("tiny-llama/onnx-f32");
    let ids = reference("tiny-llama").ids;
    let mut state = common::f32_state(&model);
    let first = state.forward(&ids[..5]).unwrap();
    state.forward(&ids[5..8]).unwrap();
    state.reset();
    assert_eq!(state.len(), 0);
    assert_eq!(state.forward(&ids[..5]).unwrap(), first);
}

#[test]
fn forward_errors_are_typed_and_leave_the_cache_alone() {
    let model = load("tiny-gpt2/onnx-f32");
    let config = model.config().clone();
    let mut state = common::f32_state(&model);
    let err = state.forward(&[]).unwrap_err();
    assert_eq!(
        err.downcast_ref::<ForwardError>(),
        Some(&ForwardError::Empty)
    );

    state.forward(&[1, 2, 3]).unwrap();
    let bad = config.vocab_size as u32;
    let err = state.forward(&[4, bad]).unwrap_err();
    assert_eq!(
        err.downcast_ref::<ForwardError>(),
        Some(&ForwardError::TokenOutOfRange {
            token: bad,
            vocab_size: config.vocab_size
        })
    );
    assert_eq!(state.len(), 3);
}

#[test]
fn every_tiny_export_gets_the_ring_cache() {
    for bundle in [
        "tiny-llama/onnx-f32",
        "tiny-llama/onnx-int8",
        "tiny-gpt2/onnx-f32",
        "tiny-gpt2/onnx-int8",
    ] {
        assert!(load(bundle).has_ring_cache(), "{bundle}");
    }
}

#[test]
fn fills_the_whole_context() {
    let model = load("tiny-gpt2/onnx-f32");
    let max = model.config().max_position_embeddings;
    let mut state = common::f32_state(&model);
    state.forward(&vec![7; max - 1]).unwrap();
    state.forward(&[8]).unwrap();
    assert_eq!(state.len(), max);
}

// ---- load errors: one line, naming the path ----

fn load_error(dir: &Path) -> String {
    let err = Model::load(dir, &LoadOptions::default()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(!msg.contains('\n'), "one line: {msg:?}");
    msg
}

const CONFIGS: &[&str] = &["config.json", "generation_config.json"];

#[test]
fn missing_directory() {
    let msg = load_error(Path::new("/nonexistent/edgelm-bundle"));
    assert!(msg.contains("\"/nonexistent/edgelm-bundle\""), "{msg}");
}

#[test]
fn missing_model_onnx() {
    let dir = scratch("missing-model");
    copy_bundle("tiny-llama/onnx-f32", &dir, CONFIGS);
    let msg = load_error(&dir);
    let want = format!(
        "opening {:?}: No such file or directory",
        dir.join("model.onnx")
    );
    assert!(msg.starts_with(&want), "{msg}");
}

#[test]
fn missing_config_json() {
    let dir = scratch("missing-config");
    copy_bundle("tiny-llama/onnx-f32", &dir, &["model.onnx"]);
    let msg = load_error(&dir);
    let want = format!(
        "reading {:?}: No such file or directory",
        dir.join("config.json")
    );
    assert!(msg.starts_with(&want), "{msg}");
}

#[test]
fn not_an_onnx_file() {
    for (name, bytes) in [
        ("text", b"this is not a protobuf, just some text\n".to_vec()),
        ("json", b"{\"hello\": [1, 2, 3]}".to_vec()),
        ("empty", Vec::new()),
    ] {
        let dir = scratch(&format!("not-onnx-{name}"));
        copy_bundle("tiny-llama/onnx-f32", &dir, CONFIGS);
        fs::write(dir.join("model.onnx"), bytes).unwrap();
        let msg = load_error(&dir);
        assert!(
            msg.contains("model.onnx") && msg.contains("not a valid ONNX model"),
            "{msg}"
        );
    }
}

#[test]
fn truncated_model_onnx() {
    let bytes = fs::read(fixture("tiny-llama/onnx-f32/model.onnx")).unwrap();
    for (cut, field) in [
        (bytes.len() / 3, "graph"),
        (bytes.len() - 1, "opset_import"),
    ] {
        let dir = scratch(&format!("truncated-{cut}"));
        copy_bundle("tiny-llama/onnx-f32", &dir, CONFIGS);
        fs::write(dir.join("model.onnx"), &bytes[..cut]).unwrap();
        let msg = load_error(&dir);
        let want = format!(
            "{:?} is not a valid ONNX model: failed to decode Protobuf message: \
             ModelProto.{field}: buffer underflow",
            dir.join("model.onnx")
        );
        assert_eq!(msg, want);
    }
}

// ---- external data ----

/// Rewrites the tiny Llama bundle with every initializer of 1 KiB or more moved to
/// `weights.bin`; `edit` may then tamper with the external references.
fn external_bundle(name: &str, edit: impl Fn(usize, &mut pb::TensorProto)) -> PathBuf {
    let dir = scratch(name);
    copy_bundle("tiny-llama/onnx-f32", &dir, CONFIGS);
    let bytes = fs::read(fixture("tiny-llama/onnx-f32/model.onnx")).unwrap();
    let mut proto = pb::ModelProto::decode(&*bytes).unwrap();
    let mut weights = Vec::new();
    let mut moved = 0;
    for t in &mut proto.graph.as_mut().unwrap().initializer {
        if t.raw_data.len() < 1024 {
            continue;
        }
        let entry = |key: &str, value: String| pb::StringStringEntryProto {
            key: key.into(),
            value,
        };
        t.external_data = vec![
            entry("location", "weights.bin".into()),
            entry("offset", weights.len().to_string()),
            entry("length", t.raw_data.len().to_string()),
        ];
        t.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
        weights.append(&mut t.raw_data);
        edit(moved, t);
        moved += 1;
    }
    assert!(moved > 10);
    fs::write(dir.join("weights.bin"), weights).unwrap();
    fs::write(dir.join("model.onnx"), proto.encode_to_vec()).unwrap();
    dir
}

fn set_entry(t: &mut pb::TensorProto, key: &str, value: &str) {
    t.external_data
        .iter_mut()
        .find(|e| e.key == key)
        .unwrap()
        .value = value.into();
}

#[test]
fn external_data_loads_and_matches_reference() {
    let dir = external_bundle("external-ok", |_, _| {});
    let model = common::load(&dir);
    let reference = reference("tiny-llama");
    let logits = common::f32_state(&model)
        .forward_all(&reference.ids)
        .unwrap(); // (ids, vocab)
    assert!(max_abs_diff(&logits, &reference.logits.concat()) <= 1e-4);
}

#[test]
fn external_data_absolute_path_is_rejected() {
    let dir = external_bundle("external-absolute", |i, t| {
        if i == 3 {
            set_entry(t, "location", "/etc/passwd");
        }
    });
    let msg = load_error(&dir);
    assert!(
        msg.contains("\"/etc/passwd\" must be a relative path inside the bundle"),
        "{msg}"
    );
}

#[test]
fn external_data_escaping_the_bundle_is_rejected() {
    let dir = external_bundle("external-escape", |i, t| {
        if i == 3 {
            set_entry(t, "location", "../external-escape/weights.bin");
        }
    });
    let msg = load_error(&dir);
    assert!(
        msg.contains("must be a relative path inside the bundle"),
        "{msg}"
    );
}

#[test]
fn external_data_past_the_end_is_rejected() {
    let dir = external_bundle("external-past-end", |i, t| {
        if i == 5 {
            set_entry(t, "offset", "100000000");
        }
    });
    let msg = load_error(&dir);
    assert!(msg.contains("is past the end of \"weights.bin\""), "{msg}");
}

#[test]
fn external_data_length_must_match_the_tensor() {
    let dir = external_bundle("external-length", |i, t| {
        if i == 5 {
            set_entry(t, "length", "12");
        }
    });
    let msg = load_error(&dir);
    assert!(
        msg.contains("external length 12 but the tensor needs"),
        "{msg}"
    );
}

#[test]
fn external_data_missing_file_is_named() {
    let dir = external_bundle("external-missing", |i, t| {
        if i == 2 {
            set_entry(t, "location", "other.bin");
        }
    });
    let msg = load_error(&dir);
    assert!(msg.contains("opening external data \"other.bin\""), "{msg}");
}

#[test]
fn external_data_symlink_out_of_the_bundle_is_rejected() {
    let dir = external_bundle("external-symlink", |i, t| {
        if i == 2 {
            set_entry(t, "location", "link.bin");
        }
    });
    let outside = scratch("external-symlink-target").join("weights.bin");
    fs::copy(dir.join("weights.bin"), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("link.bin")).unwrap();
    let msg = load_error(&dir);
    assert!(
        msg.contains("\"link.bin\" resolves outside the bundle"),
        "{msg}"
    );
}

#[test]
fn two_threads_give_the_same_logits() {
    let ids = reference("tiny-llama").ids;
    let one = load("tiny-llama/onnx-f32")
        .new_state()
        .forward_all(&ids)
        .unwrap();
    let two = Model::load(
        &fixture("tiny-llama/onnx-f32"),
        &LoadOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(two.new_state().forward_all(&ids).unwrap(), one);
}
