//! `-t N` bounds every compute thread: a model loaded with N threads runs N - 1 threads
//! beside the caller through load, prefill (long enough to split the attention) and decode
//! (past the history length that splits it too), and with `-t 1` it starts none.
//!
//! A test binary of its own, with this one test, so that `/proc/self/task` counts only its
//! threads.

#![cfg(target_os = "linux")]

use std::path::Path;

use edgelm::model::{LoadOptions, Model};
use edgelm::quant::Scheme;

fn threads_now() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn threads_flag_bounds_every_compute_thread() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let before = threads_now();
    for (bundle, int8) in [
        ("tiny-llama/onnx-int8", Scheme::Q8F32),
        ("tiny-llama/onnx-int8", Scheme::Fold),
        ("tiny-llama/onnx-f32", Scheme::Q8F32),
        ("tiny-gpt2/onnx-int8", Scheme::Q8Q8),
    ] {
        for threads in [1, 2, 3] {
            let opts = LoadOptions {
                threads,
                int8,
                kernel: None,
            };
            let model = Model::load(&fixtures.join(bundle), &opts).unwrap();
            assert_eq!(model.threads(), threads);
            let mut state = model.new_state();
            let vocab = model.config().vocab_size as u32;
            let prompt: Vec<u32> = (0..state.capacity() as u32 - 8)
                .map(|i| i * 7 % vocab)
                .collect();
            let mut next = state.forward(&prompt).unwrap();
            for _ in 0..16 {
                let id = next
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(i, _)| i as u32);
                next = state.forward(&[id]).unwrap();
            }
            assert_eq!(
                threads_now(),
                before + threads - 1,
                "{bundle} --int8 {int8} -t {threads}"
            );
            drop(state);
            drop(model);
            assert_eq!(threads_now(), before, "{bundle} -t {threads}: threads left");
        }
    }
}
