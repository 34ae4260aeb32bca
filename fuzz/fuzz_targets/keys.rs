//! Fuzzes key building: prefix, then two (namespace, id) pairs, separated
//! by NUL bytes. Distinct pairs never share a key in any backend's scheme.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/input_checks/mod.rs"]
mod inputs;

fuzz_target!(|data: &[u8]| {
    let f = inputs::fields(data, 5);
    inputs::keys(&f[0], (&f[1], &f[2]), (&f[3], &f[4]));
});
