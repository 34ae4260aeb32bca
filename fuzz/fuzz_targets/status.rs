//! Fuzzes reading a health status back from YAML: what reads writes back
//! and reads back equal (the `since` timestamp, redacted errors, fallbacks).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/input_checks/mod.rs"]
mod inputs;

fuzz_target!(|data: &[u8]| {
    inputs::status(&String::from_utf8_lossy(data));
});
