//! The GGUF reader against gguf-py: fixtures written and dequantized by gguf-py
//! (tests/fixtures/gguf/make_fixtures.py), the real SmolLM2 Q4_1 model, and malformed files.

use crate::common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use edgelm::convert::gguf::{dequantize_into, GgmlType, Gguf, GgufError, MetaValue};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    common::fixture("gguf").join(name)
}

fn read_json(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn f32_bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn json_u64(v: &Value) -> u64 {
    v.as_u64().unwrap()
}

#[test]
fn tiny_fixture_has_metadata_of_every_value_type_in_file_order() {
    let g = Gguf::open(&fixture("tiny.gguf")).unwrap();
    assert_eq!(g.version(), 3);
    use MetaValue::*;
    let expected: Vec<(&str, MetaValue)> = vec![
        ("general.architecture", String("tiny".into())),
        ("test.u8", U8(200)),
        ("test.i8", I8(-100)),
        ("test.u16", U16(60000)),
        ("test.i16", I16(-30000)),
        ("test.u32", U32(4_000_000_000)),
        ("test.i32", I32(-2_000_000_000)),
        ("test.f32", F32(0.15625)),
        ("test.bool_true", Bool(true)),
        ("test.bool_false", Bool(false)),
        ("test.string", String("héllo, ggüf ✓".into())),
        ("test.u64", U64(18_000_000_000_000_000_000)),
        ("test.i64", I64(-9_000_000_000_000_000_000)),
        ("test.f64", F64(-2.5e-300)),
        ("test.array_u8", Array(vec![U8(1), U8(2), U8(255)])),
        ("test.array_i16", Array(vec![I16(-1), I16(2), I16(-32768)])),
        ("test.array_u32", Array(vec![U32(7), U32(u32::MAX)])),
        ("test.array_i32", Array(vec![I32(-5), I32(0), I32(5)])),
        ("test.array_i64", Array(vec![I64(-(1 << 62)), I64(1 << 62)])),
        (
            "test.array_f32",
            Array(vec![F32(0.5), F32(-1.25), F32(3.0)]),
        ),
        ("test.array_f64", Array(vec![F64(0.1), F64(-0.2)])),
        (
            "test.array_bool",
            Array(vec![Bool(true), Bool(false), Bool(true)]),
        ),
        (
            "test.array_str",
            Array(vec![
                String("a".into()),
                String("".into()),
                String("ünï".into()),
            ]),
        ),
        (
            "test.array_nested",
            Array(vec![Array(vec![I32(1), I32(2)]), Array(vec![I32(3)])]),
        ),
    ];
    let got: Vec<(&str, MetaValue)> = g
        .metadata()
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    assert_eq!(got, expected);
    assert_eq!(read_json("tiny.json")["kv_count"], expected.len());
    for (key, value) in &expected {
        assert_eq!(g.get(key), Some(value), "{key}");
    }
}

#[test]
fn typed_getters_convert_what_they_promise() {
    let g = Gguf::open(&fixture("tiny.gguf")).unwrap();
    assert_eq!(g.get_str("general.architecture").unwrap(), "tiny");
    assert_eq!(g.get_str("test.string").unwrap(), "héllo, ggüf ✓");
    assert_eq!(g.get_u64("test.u8").unwrap(), 200);
    assert_eq!(g.get_u64("test.u16").unwrap(), 60000);
    assert_eq!(g.get_u64("test.u32").unwrap(), 4_000_000_000);
    assert_eq!(g.get_u64("test.u64").unwrap(), 18_000_000_000_000_000_000);
    assert_eq!(g.get_f32("test.f32").unwrap(), 0.15625);
    assert_eq!(g.get_f32("test.f64").unwrap(), -2.5e-300f64 as f32);
    assert!(g.get_bool("test.bool_true").unwrap());
    assert!(!g.get_bool("test.bool_false").unwrap());
    assert_eq!(g.get_str_array("test.array_str").unwrap(), ["a", "", "ünï"]);
    assert_eq!(g.get_i64_array("test.array_u8").unwrap(), [1, 2, 255]);
    assert_eq!(g.get_i64_array("test.array_i16").unwrap(), [-1, 2, -32768]);
    assert_eq!(g.get_i64_array("test.array_u32").unwrap(), [7, 4294967295]);
    assert_eq!(
        g.get_i64_array("test.array_i64").unwrap(),
        [-(1 << 62), 1 << 62]
    );
    assert_eq!(
        g.get_f32_array("test.array_f32").unwrap(),
        [0.5, -1.25, 3.0]
    );
    assert_eq!(
        g.get_f32_array("test.array_f64").unwrap(),
        [0.1f64 as f32, -0.2f64 as f32]
    );
}

#[test]
fn getter_errors_name_the_key_and_the_problem() {
    let g = Gguf::open(&fixture("tiny.gguf")).unwrap();
    let cases: Vec<(GgufError, &str)> = vec![
        (
            g.get_str("no.such.key").unwrap_err(),
            r#"metadata key "no.such.key" is missing"#,
        ),
        (
            g.get_str("test.u8").unwrap_err(),
            r#"metadata key "test.u8" is of type u8, expected a string"#,
        ),
        (
            g.get_u64("test.i8").unwrap_err(),
            r#"metadata key "test.i8" is a negative i8 (-100), expected a non-negative integer"#,
        ),
        (
            g.get_u64("test.f32").unwrap_err(),
            r#"metadata key "test.f32" is of type f32, expected a non-negative integer"#,
        ),
        (
            g.get_f32("test.i32").unwrap_err(),
            r#"metadata key "test.i32" is of type i32, expected a float"#,
        ),
        (
            g.get_bool("test.u8").unwrap_err(),
            r#"metadata key "test.u8" is of type u8, expected a bool"#,
        ),
        (
            g.get_str_array("test.array_u8").unwrap_err(),
            r#"metadata key "test.array_u8" is an array holding u8 1, expected an array of strings"#,
        ),
        (
            g.get_i64_array("test.string").unwrap_err(),
            r#"metadata key "test.string" is of type string, expected an array of integers"#,
        ),
        (
            g.get_i64_array("test.array_nested").unwrap_err(),
            r#"metadata key "test.array_nested" is an array of array, expected an array of integers"#,
        ),
        (
            g.get_f32_array("test.array_i32").unwrap_err(),
            r#"metadata key "test.array_i32" is an array holding i32 -5, expected an array of floats"#,
        ),
    ];
    for (err, want) in cases {
        assert_eq!(err.to_string(), want);
    }
}

/// Every tensor of the tiny fixture: the infos gguf-py's reader saw, and values bit-identical
/// to gguf-py's reference dequantization.
#[test]
fn tiny_fixture_tensors_match_gguf_py() {
    let g = Gguf::open(&fixture("tiny.gguf")).unwrap();
    let desc = read_json("tiny.json");
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.data_offset(), json_u64(&desc["data_offset"]));
    let want = desc["tensors"].as_array().unwrap();
    assert_eq!(g.tensors().len(), want.len());
    let mut types_seen = Vec::new();
    for (t, w) in g.tensors().iter().zip(want) {
        let name = w["name"].as_str().unwrap();
        assert_eq!(t.name, name);
        assert_eq!(t.ggml_type.name(), w["type"].as_str().unwrap(), "{name}");
        assert_eq!(
            u64::from(t.ggml_type.id()),
            json_u64(&w["type_id"]),
            "{name}"
        );
        let dims: Vec<u64> = w["dims"].as_array().unwrap().iter().map(json_u64).collect();
        assert_eq!(t.dims, dims, "{name}");
        assert_eq!(t.offset, json_u64(&w["offset"]), "{name}");
        assert_eq!(
            g.tensor_bytes(t).len() as u64,
            json_u64(&w["n_bytes"]),
            "{name}"
        );
        assert_eq!(t.n_bytes(), json_u64(&w["n_bytes"]), "{name}");
        assert_eq!(g.tensor(name), Some(t));

        let raw = std::fs::read(fixture(&format!("expected/{name}.f32"))).unwrap();
        let expected: Vec<u32> = raw
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(expected.len() as u64, t.n_elements(), "{name}");
        let got = g.dequantize(t).unwrap();
        assert_eq!(
            f32_bits(&got),
            expected,
            "{name}: dequantized values differ from gguf-py"
        );

        let mut into = vec![f32::NAN; got.len()];
        dequantize_into(t.ggml_type, g.tensor_bytes(t), &mut into).unwrap();
        assert_eq!(f32_bits(&into), expected, "{name}: dequantize_into");
        types_seen.push(t.ggml_type);
    }
    use GgmlType::*;
    let required = [
        F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K,
    ];
    assert_eq!(types_seen, required);
    assert_eq!(g.tensor("t_f32").unwrap().shape_row_major(), [2, 3, 4]);
    assert_eq!(g.tensor("t_q6_k").unwrap().shape_row_major(), [2, 256]);
    assert_eq!(g.tensor("missing"), None);
}

#[test]
fn from_bytes_reads_what_open_reads() {
    let bytes = std::fs::read(fixture("tiny.gguf")).unwrap();
    let a = Gguf::from_bytes(bytes).unwrap();
    let b = Gguf::open(&fixture("tiny.gguf")).unwrap();
    assert_eq!(a.metadata(), b.metadata());
    assert_eq!(a.tensors(), b.tensors());
    for t in a.tensors() {
        assert_eq!(a.tensor_bytes(t), b.tensor_bytes(t));
    }
}

#[test]
fn general_alignment_places_the_data_section() {
    let g = Gguf::open(&fixture("align64.gguf")).unwrap();
    let desc = read_json("align64.json");
    assert_eq!(g.alignment(), 64);
    assert_eq!(g.get_u64("general.alignment").unwrap(), 64);
    assert_eq!(g.data_offset(), json_u64(&desc["data_offset"]));
    assert_eq!(g.data_offset() % 64, 0);
    let a = g.tensor("a").unwrap();
    let b = g.tensor("b").unwrap();
    assert_eq!((a.offset, b.offset), (0, 64));
    assert_eq!(g.dequantize(a).unwrap(), [0.0, 1.0, 2.0]);
    assert_eq!(
        f32_bits(&g.dequantize(b).unwrap()),
        f32_bits(&[-0.0, -0.5, -1.0, -1.5, -2.0])
    );
}

#[test]
fn unsupported_type_error_names_the_tensor_and_type() {
    let desc = read_json("tiny.json");
    let mut bytes = std::fs::read(fixture("tiny.gguf")).unwrap();
    let t = &desc["tensors"][8];
    assert_eq!(t["name"], "t_q2_k");
    // IQ2_XXS blocks (66 bytes) are smaller than Q2_K's (84), so the file stays valid.
    put_u32(&mut bytes, json_u64(&t["type_at"]), 16);
    let g = Gguf::from_bytes(bytes).unwrap();
    let t = g.tensor("t_q2_k").unwrap();
    assert_eq!(t.ggml_type, GgmlType::IQ2_XXS);
    assert_eq!(
        g.dequantize(t).unwrap_err().to_string(),
        r#"tensor "t_q2_k": dequantizing IQ2_XXS is not supported"#
    );
}

#[test]
fn open_errors_name_the_path() {
    let missing = fixture("no-such-file.gguf");
    let msg = Gguf::open(&missing).unwrap_err().to_string();
    assert!(
        msg.starts_with(&format!("opening GGUF file {missing:?}: ")),
        "{msg}"
    );

    let dir = std::env::temp_dir().join(format!("edgelm-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let truncated = dir.join("truncated.gguf");
    let bytes = std::fs::read(fixture("tiny.gguf")).unwrap();
    std::fs::write(&truncated, &bytes[..100]).unwrap();
    let msg = Gguf::open(&truncated).unwrap_err().to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        msg.starts_with(&format!("GGUF file {truncated:?}: ")),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "{msg}");
}

// ---------------------------------------------------------------- the real model

/// The real model, fetched by `models/fetch-smollm2.sh` when missing.
fn open_real_model() -> Gguf {
    Gguf::open(&common::default_gguf()).unwrap()
}

/// sum over i of (i + 1) * bits(value[i]), wrapping modulo 2^64 (as make_fixtures.py).
fn weighted_checksum(values: &[f32]) -> u64 {
    values.iter().enumerate().fold(0u64, |sum, (i, v)| {
        sum.wrapping_add((i as u64 + 1).wrapping_mul(u64::from(v.to_bits())))
    })
}

#[test]
fn smollm2_header_and_metadata_match_gguf_py() {
    let g = open_real_model();
    let want = read_json("smollm2.json");
    assert_eq!(g.tensors().len() as u64, json_u64(&want["tensor_count"]));
    for (t, w) in g
        .tensors()
        .iter()
        .zip(want["first_tensors"].as_array().unwrap())
    {
        assert_eq!(t.name, w["name"].as_str().unwrap());
        assert_eq!(
            t.ggml_type.name(),
            w["type"].as_str().unwrap(),
            "{}",
            t.name
        );
        let dims: Vec<u64> = w["dims"].as_array().unwrap().iter().map(json_u64).collect();
        assert_eq!(t.dims, dims, "{}", t.name);
    }
    let m = &want["metadata"];
    assert_eq!(
        g.get_str("general.architecture").unwrap(),
        m["general.architecture"]
    );
    for key in [
        "llama.block_count",
        "llama.embedding_length",
        "llama.attention.head_count_kv",
        "tokenizer.ggml.bos_token_id",
    ] {
        assert_eq!(g.get_u64(key).unwrap(), json_u64(&m[key]), "{key}");
    }
    assert_eq!(
        u64::from(g.get_f32("llama.rope.freq_base").unwrap().to_bits()),
        json_u64(&m["llama.rope.freq_base_bits"])
    );
    assert_eq!(
        u64::from(
            g.get_f32("llama.attention.layer_norm_rms_epsilon")
                .unwrap()
                .to_bits()
        ),
        json_u64(&m["llama.attention.layer_norm_rms_epsilon_bits"])
    );
    assert_eq!(
        g.get_bool("tokenizer.ggml.add_bos_token").unwrap(),
        m["tokenizer.ggml.add_bos_token"].as_bool().unwrap()
    );
    let tokens = g.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(
        tokens.len() as u64,
        json_u64(&m["tokenizer.ggml.tokens.len"])
    );
    let first: Vec<&str> = m["tokenizer.ggml.tokens.first"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(tokens[..first.len()], first[..]);
    let types = g.get_i64_array("tokenizer.ggml.token_type").unwrap();
    let first: Vec<i64> = m["tokenizer.ggml.token_type.first"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(types[..first.len()], first[..]);
}

/// Every tensor of the real model dequantizes bit-identically to gguf-py: first and last 64
/// values of a few, and a position-weighted checksum of all values of every tensor.
#[test]
fn smollm2_every_tensor_dequantizes_like_gguf_py() {
    let g = open_real_model();
    let want = read_json("smollm2.json");
    let samples = want["samples"].as_object().unwrap();
    for name in [
        "blk.0.attn_q.weight",
        "token_embd.weight",
        "output_norm.weight",
    ] {
        assert!(samples.contains_key(name), "{name} has no recorded samples");
    }
    let checksums = want["checksums"].as_object().unwrap();
    assert_eq!(checksums.len(), g.tensors().len());
    for t in g.tensors() {
        let w = &checksums[t.name.as_str()];
        assert_eq!(
            t.ggml_type.name(),
            w["type"].as_str().unwrap(),
            "{}",
            t.name
        );
        let values = g.dequantize(t).unwrap();
        assert_eq!(values.len() as u64, json_u64(&w["n"]), "{}", t.name);
        if let Some(s) = samples.get(&t.name) {
            let first: Vec<u32> = s["first"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| json_u64(v) as u32)
                .collect();
            let last: Vec<u32> = s["last"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| json_u64(v) as u32)
                .collect();
            assert_eq!(
                f32_bits(&values[..64]),
                first,
                "{}: first 64 values",
                t.name
            );
            assert_eq!(
                f32_bits(&values[values.len() - 64..]),
                last,
                "{}: last 64 values",
                t.name
            );
        }
        let sum: u64 = w["sum"].as_str().unwrap().parse().unwrap();
        assert_eq!(
            weighted_checksum(&values),
            sum,
            "{}: checksum of all values",
            t.name
        );
    }
}

// ---------------------------------------------------------------- malformed input

fn put_u32(bytes: &mut [u8], at: u64, v: u32) {
    let at = at as usize;
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(bytes: &mut [u8], at: u64, v: u64) {
    let at = at as usize;
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Parses `bytes`, turning a panic into a test failure that names the variant.
fn parse_without_panic(case: &str, bytes: Vec<u8>) -> Result<Gguf, GgufError> {
    match catch_unwind(AssertUnwindSafe(|| Gguf::from_bytes(bytes))) {
        Ok(r) => r,
        Err(_) => panic!("{case}: the parser panicked"),
    }
}

fn assert_one_line_error(case: &str, r: Result<Gguf, GgufError>) -> String {
    match r {
        Ok(g) => panic!("{case}: accepted a malformed file: {g:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                !msg.contains('\n'),
                "{case}: error is not one line: {msg:?}"
            );
            assert!(!msg.is_empty(), "{case}: empty error message");
            msg
        }
    }
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = std::fs::read(fixture("tiny.gguf")).unwrap();
    let g = Gguf::from_bytes(bytes.clone()).unwrap();
    let needed = g
        .tensors()
        .iter()
        .map(|t| g.data_offset() + t.offset + t.n_bytes())
        .max()
        .unwrap();
    for len in 0..needed as usize {
        let case = format!("truncated to {len} bytes");
        let r = parse_without_panic(&case, bytes[..len].to_vec());
        assert_one_line_error(&case, r);
    }
    // Past the last tensor there is only padding, which a file may lack.
    for len in needed as usize..=bytes.len() {
        assert!(Gguf::from_bytes(bytes[..len].to_vec()).is_ok(), "{len}");
    }
}

type Patch<'a> = Box<dyn Fn(&mut Vec<u8>) + 'a>;

#[test]
fn malformed_variants_are_one_line_errors() {
    let desc = read_json("tiny.json");
    let value_at = |key: &str| json_u64(&desc["value_at"][key]);
    let tensor = |i: usize, field: &str| json_u64(&desc["tensors"][i][field]);
    let t_f16_dims = tensor(1, "dims_at");
    let t_q4_0_dims = tensor(3, "dims_at");
    let last = desc["tensors"].as_array().unwrap().len() - 1;
    let key_i8_at = value_at("test.i8") - 4 - 7;
    let t_q4_1_name_at = tensor(4, "info_at") + 8;

    let cases: Vec<(&str, Patch<'_>, &str)> = vec![
        (
            "wrong magic",
            Box::new(|b| b[..4].copy_from_slice(b"GGUG")),
            "not a GGUF file",
        ),
        ("version 1", Box::new(|b| put_u32(b, 4, 1)), "version 1"),
        ("version 99", Box::new(|b| put_u32(b, 4, 99)), "version 99"),
        (
            "big-endian",
            Box::new(|b| put_u32(b, 4, 3u32.swap_bytes())),
            "big-endian",
        ),
        (
            "tensor count 2^60",
            Box::new(|b| put_u64(b, 8, 1 << 60)),
            "tensor count",
        ),
        (
            "kv count 2^60",
            Box::new(|b| put_u64(b, 16, 1 << 60)),
            "key/value count",
        ),
        (
            "key length 2^62",
            Box::new(|b| put_u64(b, 24, 1 << 62)),
            "key",
        ),
        (
            "string length 2^62",
            Box::new(move |b| put_u64(b, value_at("test.string"), 1 << 62)),
            "test.string",
        ),
        (
            "string length one past the end",
            Box::new(|b| {
                let at = value_at("test.string");
                let rest = b.len() as u64 - at - 8 + 1;
                put_u64(b, at, rest)
            }),
            "test.string",
        ),
        (
            "array length 2^62",
            Box::new(move |b| put_u64(b, value_at("test.array_u8") + 4, 1 << 62)),
            "array length",
        ),
        (
            "string array length 2^62",
            Box::new(move |b| put_u64(b, value_at("test.array_str") + 4, 1 << 62)),
            "test.array_str",
        ),
        (
            "nested array inner length 2^62",
            Box::new(move |b| put_u64(b, value_at("test.array_nested") + 4 + 8 + 4, 1 << 62)),
            "test.array_nested",
        ),
        (
            "unknown value type",
            Box::new(move |b| put_u32(b, value_at("test.u32") - 4, 13)),
            "unknown metadata value type 13",
        ),
        (
            "unknown array element type",
            Box::new(move |b| put_u32(b, value_at("test.array_i32"), 99)),
            "unknown metadata value type 99",
        ),
        (
            "bool byte 2",
            Box::new(move |b| b[value_at("test.bool_true") as usize] = 2),
            "boolean",
        ),
        ("key not UTF-8", Box::new(|b| b[24 + 8] = 0xff), "UTF-8"),
        (
            "duplicate key",
            Box::new(move |b| {
                let at = key_i8_at as usize;
                b[at..at + 7].copy_from_slice(b"test.u8")
            }),
            "\"test.u8\" appears twice",
        ),
        (
            "duplicate tensor name",
            Box::new(move |b| {
                let at = t_q4_1_name_at as usize;
                b[at..at + 6].copy_from_slice(b"t_q4_0")
            }),
            "\"t_q4_0\" appears twice",
        ),
        (
            "5 dimensions",
            Box::new(move |b| put_u32(b, tensor(1, "n_dims_at"), 5)),
            "5 dimensions",
        ),
        (
            "2^32-1 dimensions",
            Box::new(move |b| put_u32(b, tensor(1, "n_dims_at"), u32::MAX)),
            "dimensions",
        ),
        (
            "dims product overflowing u64",
            Box::new(move |b| {
                put_u64(b, t_f16_dims, 1 << 40);
                put_u64(b, t_f16_dims + 8, 1 << 40)
            }),
            "too large",
        ),
        (
            "byte size overflowing u64",
            Box::new(move |b| {
                put_u64(b, t_f16_dims, 1 << 31);
                put_u64(b, t_f16_dims + 8, 1 << 31)
            }),
            "t_f16",
        ),
        (
            "a dimension above i64::MAX times zero",
            Box::new(move |b| {
                put_u64(b, t_f16_dims, 1 << 63);
                put_u64(b, t_f16_dims + 8, 0)
            }),
            "too large",
        ),
        (
            "huge dims within u64",
            Box::new(move |b| {
                put_u64(b, t_f16_dims, 1 << 20);
                put_u64(b, t_f16_dims + 8, 1 << 20)
            }),
            // 2^40 elements fit a 64-bit usize (then the data is missing), not a 32-bit one.
            if cfg!(target_pointer_width = "64") {
                "past the end of the file"
            } else {
                "dimensions [1048576, 1048576] are too large"
            },
        ),
        (
            "partial block",
            Box::new(move |b| put_u64(b, t_q4_0_dims, 48)),
            "not a multiple of the Q4_0 block length 32",
        ),
        (
            "last tensor one row too many",
            Box::new(move |b| put_u64(b, tensor(last, "dims_at") + 8, 3)),
            "t_q8_k",
        ),
        (
            "tensor offset past end",
            Box::new(move |b| put_u64(b, tensor(1, "offset_at"), 1 << 40)),
            "past the end of the file",
        ),
        (
            "tensor offset overflowing",
            Box::new(move |b| put_u64(b, tensor(1, "offset_at"), u64::MAX - 31)),
            "past the end of the file",
        ),
        (
            "misaligned offset",
            Box::new(move |b| put_u64(b, tensor(1, "offset_at"), 97)),
            "not a multiple of the alignment 32",
        ),
        (
            "unknown type id 99",
            Box::new(move |b| put_u32(b, tensor(1, "type_at"), 99)),
            "unknown ggml type id 99",
        ),
        (
            "removed type id 4 (Q4_2)",
            Box::new(move |b| put_u32(b, tensor(1, "type_at"), 4)),
            "unknown ggml type id 4",
        ),
        (
            "type id 2^32-1",
            Box::new(move |b| put_u32(b, tensor(1, "type_at"), u32::MAX)),
            "unknown ggml type id",
        ),
        (
            "tensor name length 2^62",
            Box::new(move |b| put_u64(b, tensor(0, "info_at"), 1 << 62)),
            "tensor name",
        ),
    ];
    let bytes = std::fs::read(fixture("tiny.gguf")).unwrap();
    for (case, patch, want) in &cases {
        let mut b = bytes.clone();
        patch(&mut b);
        let msg = assert_one_line_error(case, parse_without_panic(case, b));
        assert!(
            msg.contains(want),
            "{case}: {msg:?} does not mention {want:?}"
        );
    }
}

#[test]
fn bad_general_alignment_is_an_error() {
    let desc = read_json("align64.json");
    let at = json_u64(&desc["value_at"]["general.alignment"]);
    let bytes = std::fs::read(fixture("align64.gguf")).unwrap();
    let cases: [(u32, &str); 4] = [
        (0, "general.alignment is 0"),
        (48, "general.alignment is 48"),
        // The tensor at offset 64 is then misaligned.
        (128, "not a multiple of the alignment 128"),
        // The data section would start past the end of the file.
        (1 << 31, "past the end of the file"),
    ];
    for (alignment, want) in cases {
        let mut b = bytes.clone();
        put_u32(&mut b, at, alignment);
        let case = format!("general.alignment {alignment}");
        let msg = assert_one_line_error(&case, parse_without_panic(&case, b));
        assert!(
            msg.contains(want),
            "{case}: {msg:?} does not mention {want:?}"
        );
    }
}

/// Arrays nested deeper than the reader allows, built by hand: a bounded recursion depth.
#[test]
fn deeply_nested_arrays_are_an_error() {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // key/values
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'k');
    b.extend_from_slice(&9u32.to_le_bytes()); // array
    for _ in 0..10_000 {
        b.extend_from_slice(&9u32.to_le_bytes()); // of arrays
        b.extend_from_slice(&1u64.to_le_bytes()); // of one element
    }
    let msg = assert_one_line_error("nested", parse_without_panic("nested", b));
    assert!(msg.contains("nested deeper"), "{msg}");
}

#[test]
fn empty_arrays_and_a_file_without_tensors_are_valid() {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // key/values
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'e');
    b.extend_from_slice(&9u32.to_le_bytes()); // array
    b.extend_from_slice(&8u32.to_le_bytes()); // of strings
    b.extend_from_slice(&0u64.to_le_bytes()); // empty
    let g = Gguf::from_bytes(b).unwrap();
    assert_eq!(g.version(), 2);
    assert_eq!(g.get("e"), Some(&MetaValue::Array(vec![])));
    assert_eq!(g.get_str_array("e").unwrap(), Vec::<&str>::new());
    assert!(g.tensors().is_empty());
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Random byte overwrites anywhere in the fixture never panic; whatever parses also
        /// dequantizes without panicking.
        #[test]
        fn random_corruption_never_panics(
            edits in proptest::collection::vec((0usize..1700, any::<u8>()), 1..8),
            cut in 0usize..8000,
        ) {
            let mut b = std::fs::read(fixture("tiny.gguf")).unwrap();
            for (at, v) in edits {
                b[at] = v;
            }
            b.truncate(cut);
            match Gguf::from_bytes(b) {
                Ok(g) => {
                    for t in g.tensors() {
                        if let Err(e) = g.dequantize(t) {
                            prop_assert!(!e.to_string().contains('\n'));
                        }
                    }
                }
                Err(e) => prop_assert!(!e.to_string().contains('\n')),
            }
        }
    }
}
