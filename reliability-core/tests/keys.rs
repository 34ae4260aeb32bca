//! Keys: two distinct ids never share a stored key.

use reliability_core::key::{normalize_id, MAX_VERBATIM_ID_BYTES};
use reliability_core::{KeySpace, Primitive};

/// A caller who passes `#` + 64 hex digits verbatim must not reach the key
/// another caller's long (hashed) id maps to.
#[test]
fn verbatim_hash_lookalike_differs_from_hashed_id() {
    let long = "tenant-a/".repeat(MAX_VERBATIM_ID_BYTES / 9 + 1);
    assert!(long.len() > MAX_VERBATIM_ID_BYTES);
    let hashed = normalize_id(&long).expect("long id").into_owned();
    assert!(hashed.starts_with('#') && hashed.len() == 65, "{hashed}");
    // Another tenant sends exactly that text as its id.
    let lookalike = normalize_id(&hashed).expect("short id").into_owned();
    assert_ne!(lookalike, hashed, "{long:?} and {hashed:?} share a key");
    let ks = KeySpace::new("svc", "ns").expect("key space");
    for p in [
        Primitive::Idempotency,
        Primitive::RateLimit,
        Primitive::Spool,
    ] {
        assert_ne!(
            ks.key(p, &long).expect("key"),
            ks.key(p, &hashed).expect("key")
        );
    }
}
