//! The memory idempotency store is bounded by bytes, not only by entries:
//! stored results of 1 MiB each never hold more than the byte cap, whatever
//! the entry cap allows.
//!
//! A counting global allocator (the `cap` crate, as in `memory_cap.rs`)
//! measures the live heap.
#![allow(clippy::print_stdout)] // the test reports its figures

use std::alloc::System;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cap::Cap;
use reliability_core::{Fingerprint, IdempotencyStore, ManualClock};
use reliability_memory::MemoryIdempotencyStore;

#[global_allocator]
static ALLOC: Cap<System> = Cap::new(System, usize::MAX);

const MIB: usize = 1 << 20;
/// Results stored: far more bytes than the default cap.
const RESULTS: usize = 320;
/// The default byte cap of the store (`memory.maxBytes`).
const CAP_BYTES: usize = 128 * MIB;
/// Keys, leases, the cache's tables, the runtime, the harness.
const SLACK_BYTES: usize = 8 * MIB;

#[tokio::test]
async fn results_stay_under_the_byte_cap() {
    let baseline = ALLOC.allocated();
    let store = MemoryIdempotencyStore::builder()
        .clock(Arc::new(ManualClock::new()))
        .build();
    let fp = Fingerprint::of(b"p");
    let mut peak = 0;
    for i in 0..RESULTS {
        let key = format!("big-{i}");
        let lease = store
            .claim(&key, &fp, Duration::from_secs(60))
            .await
            .expect("claim")
            .into_lease()
            .expect("acquired");
        let result = Bytes::from(vec![u8::try_from(i % 251).expect("small"); MIB]);
        store
            .complete(&lease, Some(result), Duration::from_secs(3600))
            .await
            .expect("complete");
        peak = peak.max(ALLOC.allocated().saturating_sub(baseline));
    }
    // Small claims afterwards: writes that let the cache apply its
    // eviction to the batch of large ones still pending.
    for i in 0..1_000 {
        let _ = store
            .claim(&format!("small-{i}"), &fp, Duration::from_secs(60))
            .await
            .expect("claim");
    }
    let held = ALLOC.allocated().saturating_sub(baseline);
    println!(
        "{RESULTS} results of 1 MiB: {} MiB held at the end, {} MiB at the peak, {} entries",
        held / MIB,
        peak / MIB,
        store.entry_count()
    );
    assert!(
        held <= CAP_BYTES + SLACK_BYTES,
        "{} MiB held, cap {} MiB",
        held / MIB,
        CAP_BYTES / MIB
    );
}
