//! What constrained decoding adds per token, without the model: llguidance's mask for the
//! next token plus the masked draw, over SmolLM2's 49 152-token vocabulary, replaying a
//! fixed answer to each test format token by token. Compare with `sample` alone (the
//! unconstrained sampler's cost) and with a decode step (tens of ms on a board).
//!
//! `cargo bench --bench constraint_mask`

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use edgelm::constraint::{Compiler, Constraint, Format};
use edgelm::sampler::{Sampler, SamplerConfig};
use edgelm::tokenizer::Tokenizer;

const VOCAB: usize = 49152;

/// (format file under tests/fixtures/formats, an answer it accepts)
const ANSWERS: [(&str, &str); 4] = [
    (
        "lamp.json",
        r#"{"device": "lamp", "room": "kitchen", "action": "on", "brightness": "medium"}"#,
    ),
    (
        "shopping.json",
        r#"{"list": "Breakfast", "items": [{"name": "bread", "quantity": 2}, {"name": "eggs", "quantity": 6}]}"#,
    ),
    (
        "thermostat.json",
        r#"{"room": "bedroom", "temperature": 21.5, "hours": 3, "fan_speed": 2}"#,
    ),
    (
        "commands.lark",
        r#"[{"device": "lamp", "action": "on", "level": 40}, {"device": "fan", "action": "off", "level": 0}]"#,
    ),
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Logits that favour the answer's own token at each step, so the masked draw (temperature
/// 0.8) has real work: a spread of values over the whole vocabulary.
fn logits(step: usize) -> Vec<f32> {
    (0..VOCAB)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(step * 40503) % 1000) as f32 / 100.0)
        .collect()
}

fn bench(c: &mut Criterion) {
    let tok =
        Tokenizer::from_file(&root().join("tests/fixtures/smollm2-135m-instruct/tokenizer.json"))
            .expect("the fixture tokenizer");
    let eos = tok.token_to_id("<|im_end|>").expect("<|im_end|>");
    let t0 = std::time::Instant::now();
    let compiler = Compiler::new(&tok, VOCAB, &[eos]).expect("the compiler");
    eprintln!("Compiler::new: {:.0} ms", t0.elapsed().as_secs_f64() * 1e3);
    let mut group = c.benchmark_group("constraint");
    for (file, answer) in ANSWERS {
        let path = root().join("tests/fixtures/formats").join(file);
        let format = if file.ends_with(".json") {
            Format::load_json_schema(&path)
        } else {
            Format::load_grammar(&path)
        }
        .expect("the format");
        let t0 = std::time::Instant::now();
        let constraint: Constraint = compiler.compile(&format).expect("compiles");
        eprintln!("compile {file}: {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
        let ids = tok.encode(answer, false).expect("encodes");
        let steps: Vec<Vec<f32>> = (0..ids.len()).map(logits).collect();
        group.throughput(Throughput::Elements(ids.len() as u64));
        // Mask, masked draw and advance, per token of the answer.
        group.bench_function(format!("mask+sample/{file}"), |b| {
            b.iter(|| {
                let mut m = constraint.matcher();
                let mut s = Sampler::new(SamplerConfig {
                    temperature: 0.8,
                    ..SamplerConfig::default()
                });
                for (&id, l) in ids.iter().zip(&steps) {
                    let allowed = m.allowed().expect("mask").expect("not complete");
                    black_box(s.sample_masked(l, &[], allowed));
                    m.accept(id).expect("the answer is valid");
                }
                assert!(m.is_complete());
            })
        });
        // The unconstrained sampler alone, for scale.
        group.bench_function(format!("sample/{file}"), |b| {
            b.iter(|| {
                let mut s = Sampler::new(SamplerConfig {
                    temperature: 0.8,
                    ..SamplerConfig::default()
                });
                for l in &steps {
                    black_box(s.sample(l, &[]));
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
