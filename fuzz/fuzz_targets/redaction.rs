//! Fuzzes redaction: text before, user, password, host and text after,
//! separated by NUL bytes. The redacted text never depends on the password
//! (so never shows it), and redacting again changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/input_checks/mod.rs"]
mod inputs;

fuzz_target!(|data: &[u8]| {
    let f = inputs::fields(data, 5);
    inputs::redaction(&f[0], &f[1], &f[2], &f[3], &f[4]);
    reliability::status::redact(&String::from_utf8_lossy(data));
});
