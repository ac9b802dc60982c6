//! The fuzz harnesses, shared by the `cargo fuzz` targets (fuzz_targets/*.rs) and the
//! regression test that replays every input that once found a bug (tests/integration/fuzz_regressions.rs).
//! Each takes arbitrary bytes and must return without panicking.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use edgelm::convert::gguf::Gguf;
use edgelm::convert::open_checkpoint;
use edgelm::model::{LoadOptions, Model};
use edgelm::prepass::check_protobuf;
use edgelm::protocol::{self, Frame, LineParser, Request};
use edgelm::quant::Scheme;
use edgelm::session;

/// A per-process scratch path under the temp dir.
fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("edgelm-fuzz-{}-{name}", std::process::id()))
}

/// The GGUF reader: header, metadata, tensor table, every accessor, the dequantizers, and
/// the GGUF → checkpoint path the converter takes (params, vocabulary, tokenizer.json).
pub fn gguf(data: &[u8]) {
    if let Ok(g) = Gguf::from_bytes(data.to_vec()) {
        for (key, value) in g.metadata() {
            let _ = value.type_name();
            let _ = g.get_str(key);
            let _ = g.get_u64(key);
            let _ = g.get_f32(key);
            let _ = g.get_bool(key);
            let _ = g.get_str_array(key);
            let _ = g.get_i64_array(key);
            let _ = g.get_f32_array(key);
        }
        for t in g.tensors() {
            let bytes = g.tensor_bytes(t);
            assert_eq!(bytes.len() as u64, t.n_bytes(), "tensor {:?} bytes", t.name);
            let _ = t.shape_row_major();
            let _ = g.dequantize(t);
        }
    }
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    let path = PATH.get_or_init(|| scratch("in.gguf"));
    std::fs::write(path, data).unwrap();
    if let Ok(ckpt) = open_checkpoint(path) {
        let _ = ckpt.weights.tensor("model.embed_tokens.weight");
        let _ = ckpt
            .weights
            .tensor("model.layers.0.self_attn.q_proj.weight");
    }
}

/// A bundle directory holding `model.onnx_data` (4 KiB) and `sub/w.bin` (256 bytes), with
/// `outside.bin` next to it so an escaping reference finds a real file.
fn onnx_bundle() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = scratch("onnx");
        let dir = root.join("bundle");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect(); // (4096,)
        std::fs::write(dir.join("model.onnx_data"), &data).unwrap();
        std::fs::write(dir.join("sub/w.bin"), &data[..256]).unwrap();
        std::fs::write(root.join("outside.bin"), &data).unwrap();
        dir
    })
}

/// The bundle loader's protobuf pre-pass (everything before tract). The first byte picks
/// the int8 path (bit 0: routed to our ops, or folded); the rest is `model.onnx`.
pub fn onnx_prepass(data: &[u8]) {
    let _ = onnx_prepass_result(data);
}

/// What [`onnx_prepass`] gets from the pre-pass: `None` for an empty input, else its result
/// with the error as `edgelm` prints it.
pub fn onnx_prepass_result(data: &[u8]) -> Option<Result<(), String>> {
    let (&mode, bytes) = data.split_first()?;
    let int8 = if mode & 1 == 0 {
        Scheme::Q8F32
    } else {
        Scheme::Fold
    };
    Some(check_protobuf(bytes, onnx_bundle(), int8).map_err(|e| format!("{e:#}")))
}

/// The serve line framer and request parser. The first byte picks the line limit; every
/// framed line must respect it, and escaping must round-trip.
pub fn protocol_line(data: &[u8]) {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let mut parser = LineParser::new(usize::from(first) * 64);
    let limit = parser.limit();
    for &byte in stream {
        match parser.push(byte) {
            Some(Frame::Line(line)) => {
                assert!(
                    line.len() <= limit,
                    "{}-byte line, limit {limit}",
                    line.len()
                );
                parse_line(line);
            }
            Some(Frame::Error(e)) => {
                let _ = e.code().as_str();
            }
            Some(Frame::Interrupt | Frame::Hangup) | None => {}
        }
    }
    if let Ok(text) = std::str::from_utf8(stream) {
        parse_line(text);
        let mut escaped = String::new();
        protocol::escape_into(text, &mut escaped).unwrap();
        assert!(!escaped.contains(['\n', '\r']), "escaped text spans lines");
        let mut back = String::new();
        protocol::unescape_into(&escaped, &mut back).unwrap();
        assert_eq!(back, text, "escape then unescape changed the text");
    }
}

fn parse_line(line: &str) {
    match protocol::parse(line) {
        Ok(Request::Gen(text) | Request::Chat(text) | Request::System(text)) => {
            let mut out = String::new();
            let _ = protocol::unescape_into(text, &mut out);
        }
        Ok(_) => {}
        Err(e) => {
            let _ = e.code().as_str();
            let _ = e.to_string();
        }
    }
}

/// FNV-1a 64, the session format's trailer.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The tiny Llama f32 fixture, loaded once.
fn tiny_model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama/onnx-f32");
        let dir = if dir.is_dir() {
            dir
        } else {
            // Built from fuzz/: the manifest dir is fuzz/.
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama/onnx-f32")
        };
        Model::load(
            &dir,
            &LoadOptions {
                threads: 1,
                ..Default::default()
            },
        )
        .unwrap()
    })
}

/// A session file read against the tiny Llama. The input is the file without its checksum,
/// appended here so mutations reach the fields behind it; a restored state must take a step.
pub fn session_file(data: &[u8]) {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    let path = PATH.get_or_init(|| scratch("session"));
    let mut file = data.to_vec();
    file.extend(fnv1a(data).to_le_bytes());
    std::fs::write(path, &file).unwrap();
    if let Ok(mut state) = session::load(tiny_model(), path) {
        let _ = state.forward(&[1]);
    }
}
