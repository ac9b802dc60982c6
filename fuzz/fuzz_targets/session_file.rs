//! `cargo fuzz run session_file`: see [`harness::session_file`].
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::session_file(data));
