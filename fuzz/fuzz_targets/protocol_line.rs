//! `cargo fuzz run protocol_line`: see [`harness::protocol_line`].
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::protocol_line(data));
