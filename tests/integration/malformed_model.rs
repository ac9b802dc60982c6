//! Corrupted model bundles and GGUF files, run through the real binary under a memory cap:
//! each must end with one `edgelm: …` line naming the problem, exit status 1, no panic, no
//! abort, and no allocation beyond what the (tiny) files justify.
//!
//! The cap is `RLIMIT_DATA` (heap and other private writable memory), set in the child
//! before exec. Loading the intact tiny bundle needs well under it; a reader that trusts a
//! size field and allocates for it hits the cap and aborts, which fails the test.
//!
//! Under qemu-user (cross/test.sh) the cap falls on the emulator, which holds the guest's
//! memory as its own: the intact bundle still loads under it (qemu 7.2), but a guest going
//! over it makes qemu spin instead of abort, so each run has a time limit.

use crate::common;

use common::fixture;
use std::fs;
use std::io::Read;
use std::os::unix::fs::symlink;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use prost::Message;
use tract_onnx::pb;

/// The child's data limit. The intact tiny bundle loads and generates in a fraction of it.
const DATA_LIMIT: libc::rlim_t = 512 << 20;

fn scratch(name: &str) -> PathBuf {
    common::scratch("malformed", name)
}

/// How long one capped run may take; each takes well under a second natively and a few
/// under qemu.
fn run_limit() -> Duration {
    common::patience(Duration::from_secs(120))
}

/// `edgelm` with `args`, its data segment capped at `DATA_LIMIT`, killed (and the test
/// failed) if still running after `run_limit()`.
fn edgelm_capped(args: &[&std::ffi::OsStr]) -> Output {
    let mut cmd = common::edgelm_command();
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe and touches no state shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: DATA_LIMIT,
                rlim_max: DATA_LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_DATA, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    // Drained on threads, so a child writing more than a pipe holds cannot block.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut bytes = vec![];
            if let Some(mut pipe) = pipe {
                pipe.read_to_end(&mut bytes).unwrap();
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + run_limit();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("edgelm {args:?} still running after {:?}", run_limit());
        }
        thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// `edgelm run` on the bundle in `dir`: one token from a short prompt.
fn run_bundle(dir: &Path) -> Output {
    edgelm_capped(&[
        "run".as_ref(),
        "-m".as_ref(),
        dir.as_os_str(),
        "-t".as_ref(),
        "1".as_ref(),
        "-n".as_ref(),
        "1".as_ref(),
        "Once upon".as_ref(),
    ])
}

/// Asserts `out` is a clean failure whose one `edgelm:` line says `expected`, once.
fn assert_clean_failure(case: &str, out: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        None,
        "{case}: killed by a signal (abort = allocation over the cap or a panic); stderr:\n{stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "{case}: stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{case}: panicked:\n{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("edgelm: "))
        .collect();
    assert_eq!(errors.len(), 1, "{case}: want one error line:\n{stderr}");
    assert_eq!(
        errors[0].matches(expected).count(),
        1,
        "{case}: error {:?} does not say {expected:?} once",
        errors[0]
    );
    assert!(
        out.stdout.is_empty(),
        "{case}: wrote output before failing: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A copy of the tiny Llama int8 bundle.
fn copy_bundle(name: &str) -> PathBuf {
    let dir = scratch(name);
    for entry in fs::read_dir(fixture("tiny-llama/onnx-int8")).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

fn read_proto(dir: &Path) -> pb::ModelProto {
    pb::ModelProto::decode(&*fs::read(dir.join("model.onnx")).unwrap()).unwrap()
}

fn write_proto(dir: &Path, proto: &pb::ModelProto) {
    fs::write(dir.join("model.onnx"), proto.encode_to_vec()).unwrap();
}

fn entry(key: &str, value: &str) -> pb::StringStringEntryProto {
    pb::StringStringEntryProto {
        key: key.into(),
        value: value.into(),
    }
}

/// Moves every initializer of 64 bytes or more into `model.onnx_data` (64-byte aligned), the
/// layout `edgelm convert` writes. Returns the names of the moved tensors, in file order.
fn externalize(dir: &Path) -> Vec<String> {
    let mut proto = read_proto(dir);
    let graph = proto.graph.as_mut().unwrap();
    let mut data = Vec::new();
    let mut moved = vec![];
    for t in &mut graph.initializer {
        if t.raw_data.len() < 64 {
            continue;
        }
        data.resize(data.len().next_multiple_of(64), 0);
        let raw = std::mem::take(&mut t.raw_data);
        t.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
        t.external_data = vec![
            entry("location", "model.onnx_data"),
            entry("offset", &data.len().to_string()),
            entry("length", &raw.len().to_string()),
        ];
        data.extend_from_slice(&raw);
        moved.push(t.name.clone());
    }
    fs::write(dir.join("model.onnx_data"), &data).unwrap();
    write_proto(dir, &proto);
    moved
}

/// The first external initializer's entry `key` set to `value`.
fn set_external(dir: &Path, key: &str, value: &str) {
    let mut proto = read_proto(dir);
    let graph = proto.graph.as_mut().unwrap();
    let t = graph
        .initializer
        .iter_mut()
        .find(|t| !t.external_data.is_empty())
        .unwrap();
    t.external_data.retain(|e| e.key != key);
    t.external_data.push(entry(key, value));
    write_proto(dir, &proto);
}

/// The largest initializer (the int8 embedding), modified by `f`.
fn edit_largest_initializer(dir: &Path, f: impl FnOnce(&mut pb::TensorProto)) {
    let mut proto = read_proto(dir);
    let graph = proto.graph.as_mut().unwrap();
    f(graph
        .initializer
        .iter_mut()
        .max_by_key(|t| t.raw_data.len())
        .unwrap());
    write_proto(dir, &proto);
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
    f(&mut v);
    fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// A LEB128 varint.
fn varint(mut v: u64) -> Vec<u8> {
    let mut out = vec![];
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

#[test]
fn intact_bundles_load_under_the_cap() {
    let inline = copy_bundle("intact-inline");
    let out = run_bundle(&inline);
    common::assert_success(&out);
    let external = copy_bundle("intact-external");
    assert!(externalize(&external).len() > 10);
    let out = run_bundle(&external);
    common::assert_success(&out);
}

type Corrupt = fn(&Path);

#[test]
fn malformed_bundles_are_one_line_errors() {
    let cases: Vec<(&str, Corrupt, &str)> = vec![
        (
            "model.onnx empty",
            |d| fs::write(d.join("model.onnx"), b"").unwrap(),
            "model.onnx\" is not a valid ONNX model: no graph",
        ),
        (
            "model.onnx truncated to 100 bytes",
            |d| truncate(&d.join("model.onnx"), 100),
            "is not a valid ONNX model",
        ),
        (
            "model.onnx truncated to half",
            |d| truncate_by(&d.join("model.onnx"), |l| l / 2),
            "is not a valid ONNX model",
        ),
        (
            "model.onnx missing its last byte",
            |d| truncate_by(&d.join("model.onnx"), |l| l - 1),
            "is not a valid ONNX model",
        ),
        (
            "a field length of 2^40 bytes",
            |d| {
                let mut bytes = fs::read(d.join("model.onnx")).unwrap();
                bytes.push(0x3a); // field 7 (graph), length-delimited
                bytes.extend(varint(1 << 40));
                bytes.extend([0u8; 16]);
                fs::write(d.join("model.onnx"), bytes).unwrap();
            },
            "is not a valid ONNX model",
        ),
        (
            "no opset",
            |d| {
                let mut p = read_proto(d);
                p.opset_import.clear();
                write_proto(d, &p);
            },
            "no nodes or no opset",
        ),
        (
            "no graph",
            |d| {
                let mut p = read_proto(d);
                p.graph = None;
                write_proto(d, &p);
            },
            "no graph",
        ),
        (
            "the embedding claiming 2^40 x 2^40 elements",
            |d| edit_largest_initializer(d, |t| t.dims = vec![1 << 40, 1 << 40]),
            // The int8 pre-pass (MatMulInteger rewrite) checks the size before tract does.
            "tensor \"model.embed_tokens.weight_quantized\" is too large",
        ),
        (
            "the embedding with a negative dimension",
            |d| edit_largest_initializer(d, |t| t.dims[0] = -3),
            "tensor \"model.embed_tokens.weight_quantized\" has dim -3",
        ),
        (
            "the embedding shorter than its shape",
            |d| edit_largest_initializer(d, |t| t.raw_data.truncate(t.raw_data.len() / 2)),
            "Raw tensor data length (12288) does not match shape [384, 64]",
        ),
        (
            "external data: location with ..",
            |d| {
                externalize(d);
                set_external(d, "location", "../model.onnx_data");
            },
            "must be a relative path inside the bundle",
        ),
        (
            "external data: absolute location",
            |d| {
                externalize(d);
                set_external(d, "location", "/etc/passwd");
            },
            "must be a relative path inside the bundle",
        ),
        (
            "external data: symlink out of the bundle",
            |d| {
                externalize(d);
                let outside = d.parent().unwrap().join("outside.bin");
                fs::write(&outside, vec![0u8; 1 << 20]).unwrap();
                symlink(&outside, d.join("evil.bin")).unwrap();
                set_external(d, "location", "evil.bin");
            },
            "resolves outside the bundle",
        ),
        (
            "external data: missing file",
            |d| {
                externalize(d);
                fs::remove_file(d.join("model.onnx_data")).unwrap();
            },
            "opening external data",
        ),
        (
            "external data: file truncated",
            |d| {
                externalize(d);
                truncate_by(&d.join("model.onnx_data"), |l| l / 2);
            },
            "is past the end",
        ),
        (
            "external data: offset past the end",
            |d| {
                externalize(d);
                set_external(d, "offset", "1000000000");
            },
            "is past the end",
        ),
        (
            "external data: offset near 2^64",
            |d| {
                externalize(d);
                set_external(d, "offset", "18446744073709551615");
            },
            "is past the end",
        ),
        (
            "external data: offset not a number",
            |d| {
                externalize(d);
                set_external(d, "offset", "12abc");
            },
            "offset \"12abc\": invalid digit",
        ),
        (
            "external data: length disagrees with the shape",
            |d| {
                externalize(d);
                set_external(d, "length", "7");
            },
            "external length 7",
        ),
        (
            "external data: misaligned offset past the end",
            |d| {
                externalize(d);
                let len = fs::metadata(d.join("model.onnx_data")).unwrap().len();
                set_external(d, "offset", &(len - 3).to_string());
            },
            "is past the end",
        ),
        (
            "tokenizer.json missing",
            |d| fs::remove_file(d.join("tokenizer.json")).unwrap(),
            "tokenizer.json\": No such file or directory",
        ),
        (
            "tokenizer.json truncated",
            |d| truncate_by(&d.join("tokenizer.json"), |l| l / 2),
            "tokenizer.json\": EOF while parsing a value",
        ),
        (
            "tokenizer with more tokens than the model",
            |d| {
                edit_json(&d.join("tokenizer.json"), |t| {
                    let vocab = t["model"]["vocab"].as_object_mut().unwrap();
                    for i in 0..16 {
                        vocab.insert(format!("extra{i}"), (384 + i).into());
                    }
                })
            },
            "tokenizer.json has 400 tokens but the model's vocabulary has 384",
        ),
        (
            "config.json missing",
            |d| fs::remove_file(d.join("config.json")).unwrap(),
            "config.json\": No such file or directory",
        ),
        (
            "config.json with 2^40 layers",
            |d| {
                edit_json(&d.join("config.json"), |c| {
                    c["num_hidden_layers"] = (1u64 << 40).into()
                })
            },
            // 2^40 does not fit a 32-bit usize: serde refuses it while parsing.
            if cfg!(target_pointer_width = "64") {
                "config.json says 1099511627776 layers but the graph has a KV cache for 2"
            } else {
                "invalid value: integer `1099511627776`, expected usize"
            },
        ),
        (
            "config.json vocabulary smaller than the tokenizer",
            |d| edit_json(&d.join("config.json"), |c| c["vocab_size"] = 100.into()),
            "tokenizer.json has 384 tokens but the model's vocabulary has 100",
        ),
    ];
    let mut failures = vec![];
    for (i, (case, corrupt, expected)) in cases.iter().enumerate() {
        let dir = copy_bundle(&format!("case{i}"));
        corrupt(&dir);
        let out = run_bundle(&dir);
        if let Err(e) = std::panic::catch_unwind(|| assert_clean_failure(case, &out, expected)) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "?".into());
            failures.push(msg);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n---\n")
    );
}

fn truncate(path: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Truncates `path` to `to(length)` bytes.
fn truncate_by(path: &Path, to: fn(u64) -> u64) {
    let len = fs::metadata(path).unwrap().len();
    truncate(path, to(len));
}

#[test]
fn malformed_gguf_files_fail_to_convert_cleanly() {
    let tiny = fs::read(fixture("gguf/tiny.gguf")).unwrap();
    let put_u64 =
        |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "empty",
            vec![],
            "header: magic at byte 0 needs 4 bytes, only 0 remain",
        ),
        (
            "truncated header",
            tiny[..20].to_vec(),
            "header: key/value count at byte 16 needs 8 bytes, only 4 remain",
        ),
        (
            "truncated metadata",
            tiny[..200].to_vec(),
            "header: key/value count 24 at byte 16 cannot fit in the 176 bytes left",
        ),
        (
            "bad magic",
            [b"GGUX", &tiny[4..]].concat(),
            "not a GGUF file: starts with \"GGUX\", expected \"GGUF\"",
        ),
        (
            "version 99",
            [&tiny[..4], &99u32.to_le_bytes()[..], &tiny[8..]].concat(),
            "unsupported GGUF version 99 (supported: 2, 3)",
        ),
        (
            "2^60 tensors",
            {
                let mut b = tiny.clone();
                put_u64(&mut b, 8, 1 << 60);
                b
            },
            "header: tensor count 1152921504606846976 at byte 8 cannot fit in the 4424 bytes left",
        ),
        (
            "2^60 metadata keys",
            {
                let mut b = tiny.clone();
                put_u64(&mut b, 16, 1 << 60);
                b
            },
            "header: key/value count 1152921504606846976 at byte 16 cannot fit in the 4424 bytes \
             left",
        ),
        (
            "first key 2^60 bytes long",
            {
                let mut b = tiny.clone();
                put_u64(&mut b, 24, 1 << 60);
                b
            },
            "metadata key/value #0: key at byte 32 needs 1152921504606846976 bytes, only 4416 \
             remain",
        ),
    ];
    let mut failures = vec![];
    for (i, (case, bytes, expected)) in cases.iter().enumerate() {
        let dir = scratch(&format!("gguf{i}"));
        let input = dir.join("in.gguf");
        fs::write(&input, bytes).unwrap();
        let out = edgelm_capped(&[
            "convert".as_ref(),
            input.as_os_str(),
            "-o".as_ref(),
            dir.join("out").as_os_str(),
        ]);
        if let Err(e) = std::panic::catch_unwind(|| assert_clean_failure(case, &out, expected)) {
            failures.push(
                e.downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| "?".into()),
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n---\n")
    );
}
