//! Keyed checks on existing keys: each backend's `check` against a raw
//! governor keyed limiter.
//!
//! `benches/ratios.sh` turns the results into the ratios of issue 2.

// criterion_group!/criterion_main! expand to undocumented functions.
#![allow(missing_docs)]

use std::num::NonZeroU32;
use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, measurement::WallTime, BenchmarkGroup, Criterion,
};
use reliability::memory::LocalRateLimiter;
use reliability::{Quota, RateLimiter};

mod common;

const KEYS: usize = 1_000;

fn keys() -> Vec<String> {
    (0..KEYS).map(|i| format!("tenant-{i}")).collect()
}

/// One generic body for every backend: a cost-1 check of an existing key.
fn bench_check<L: RateLimiter>(g: &mut BenchmarkGroup<'_, WallTime>, label: &str, limiter: L) {
    let keys = keys();
    // A quota generous enough that the bench measures allowed checks.
    let quota = Quota::from_micros(1, 1_000_000).expect("quota");
    let mut i = 0usize;
    g.bench_function(label, |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            let d = common::ready(limiter.check(&keys[i], quota, 1)).expect("check");
            let _ = std::hint::black_box(d);
        })
    });
}

fn check_existing_key(c: &mut Criterion) {
    let mut g = c.benchmark_group("rate_limit_check");
    bench_check(&mut g, "local", LocalRateLimiter::new());

    // The same limiter without the trait's boxed future: what the trait
    // object costs on top.
    let local = LocalRateLimiter::new();
    let quota = Quota::from_micros(1, 1_000_000).expect("quota");
    let ks = keys();
    let mut j = 0usize;
    g.bench_function("local_check_sync", |b| {
        b.iter(|| {
            j = (j + 1) % KEYS;
            let _ = std::hint::black_box(local.check_sync(&ks[j], quota, 1));
        })
    });

    // The anchor: governor's keyed limiter (DashMap state, quanta clock).
    let quota = governor::Quota::with_period(Duration::from_micros(1))
        .expect("quota")
        .allow_burst(NonZeroU32::new(1_000_000).expect("burst"));
    let raw = governor::RateLimiter::keyed(quota);
    let keys = keys();
    let mut i = 0usize;
    g.bench_function("governor_keyed", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            std::hint::black_box(raw.check_key(&keys[i]).is_ok());
        })
    });
    g.finish();
}

criterion_group!(benches, check_existing_key);
criterion_main!(benches);
