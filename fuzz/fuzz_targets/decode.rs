//! Fuzzes the disk spool's frame decoder, `reliability_disk::codec::decode`.
//!
//! The first input byte picks how the rest is read:
//! - even: as a segment's bytes, scanned the way recovery does (decode a
//!   frame, step over it; on an error step one byte; stop on `Ok(None)`);
//! - odd: as the kind and body of one frame, to which the target adds a
//!   correct length and CRC32C, so the fuzzer reaches the body parsers
//!   instead of stopping at the checksum.
//!
//! It asserts that decoding never panics, that a decoded frame's length is
//! within the input, and that every decoded entry survives
//! `decode(encode(entry)) == entry` with the encoded length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reliability_disk::codec::{decode, encode, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        scan(rest);
    } else {
        let mut frame = Vec::with_capacity(HEADER_LEN + rest.len());
        frame.extend_from_slice(&(rest.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32c::crc32c(rest).to_le_bytes());
        frame.extend_from_slice(rest);
        scan(&frame);
    }
});

fn scan(mut buf: &[u8]) {
    while !buf.is_empty() {
        match decode(buf) {
            Ok(Some((entry, used))) => {
                assert!(
                    used > HEADER_LEN && used <= buf.len(),
                    "used {used} of {}",
                    buf.len()
                );
                let mut out = Vec::new();
                encode(&entry, &mut out);
                let (again, len) = decode(&out)
                    .expect("a re-encoded entry decodes")
                    .expect("a re-encoded entry is one whole frame");
                assert_eq!(again, entry, "decode(encode(entry)) != entry");
                assert_eq!(len, out.len(), "re-encoded frame length");
                buf = &buf[used..];
            }
            Ok(None) => break,
            Err(_) => buf = &buf[1..],
        }
    }
}
