//! Fuzzes the YAML configuration loader, its validation and the build of
//! the baseline backends (no I/O): an error names a field, a valid
//! configuration builds, is used without panicking and reads back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/input_checks/mod.rs"]
mod inputs;

fuzz_target!(|data: &[u8]| {
    inputs::config(&String::from_utf8_lossy(data));
});
