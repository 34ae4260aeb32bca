//! Claims of new keys: each backend's `claim` against raw moka
//! `entry().or_insert_with` on the same kind of cache.
//!
//! `benches/ratios.sh` turns the results into the ratios of issue 2.

// criterion_group!/criterion_main! expand to undocumented functions.
#![allow(missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, measurement::WallTime, BenchmarkGroup, Criterion,
};
use reliability::memory::MemoryIdempotencyStore;
use reliability::{Claim, Fingerprint, IdempotencyStore};

mod common;

const CAPACITY: u64 = 1_000_000;

/// One generic body for every backend: claim a key never seen before.
fn bench_claim_new_key<S: IdempotencyStore>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    label: &str,
    store: S,
) {
    let next = AtomicU64::new(0);
    let fp = Fingerprint::of(b"payload");
    g.bench_function(label, |b| {
        b.iter(|| {
            let key = format!("evt-{}", next.fetch_add(1, Ordering::Relaxed));
            let c = common::ready(store.claim(&key, &fp, Duration::from_secs(30)));
            assert!(matches!(c, Ok(Claim::Acquired(_))));
        })
    });
}

fn claim_new_key(c: &mut Criterion) {
    let mut g = c.benchmark_group("claim_new_key");
    bench_claim_new_key(
        &mut g,
        "memory",
        MemoryIdempotencyStore::builder()
            .max_entries(CAPACITY)
            .build(),
    );

    // The anchor: raw moka, same cache flavour and capacity, new key each time.
    let raw: moka::sync::Cache<String, (u128, [u8; 32])> = moka::sync::Cache::new(CAPACITY);
    let next = AtomicU64::new(0);
    g.bench_function("moka_raw", |b| {
        b.iter(|| {
            let key = format!("evt-{}", next.fetch_add(1, Ordering::Relaxed));
            let e = raw.entry(key).or_insert_with(|| (1, [0u8; 32]));
            assert!(e.is_fresh());
        })
    });
    g.finish();
}

criterion_group!(benches, claim_new_key);
criterion_main!(benches);
