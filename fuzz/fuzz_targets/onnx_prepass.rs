//! `cargo fuzz run onnx_prepass`: see [`harness::onnx_prepass`].
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::onnx_prepass(data));
