//! `LocalRateLimiter` keyed state stays under a fixed memory cap however many
//! distinct keys pass through it (governor's keyed map
//! grows until `retain_recent`; ours must not).
//!
//! A counting global allocator (the `cap` crate: the workspace forbids unsafe
//! code, and a `GlobalAlloc` impl needs it) tracks live heap bytes. 5,000,000
//! distinct keys go through a limiter with `max_keys = 100_000`, every key
//! still active when the next arrives (quota 1/s, the clock moves 1 µs per
//! check), so the limiter must evict active keys, not just idle ones.
//!
//! # The cap
//!
//! Per remembered key:
//! - the key's own allocation, `Box<str>`: at most [`KEY_BYTES`] (`"k4999999"`);
//! - its hash-table slot, `(Box<str>, u64)` = 24 bytes plus one control byte.
//!   hashbrown keeps at most 7/8 of its buckets full and rounds the bucket
//!   count up to a power of two, so a shard holding up to `n` keys has at
//!   most `2 * n * 8/7` buckets: at most `25 * 16/7 < 58` bytes per key.
//!
//! That gives `max_keys * (KEY_BYTES + 58)` plus [`SLACK_BYTES`] for
//! everything fixed: the shard array and each table's trailing control
//! group, one eviction pass's scratch vector (`8 * max_keys / shards`), the
//! boxed future of the check in flight, the runtime and the test harness.
//! Malloc's own per-chunk headers are outside what a `GlobalAlloc` sees.
#![allow(clippy::print_stdout)] // the test reports its figures

use std::alloc::System;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cap::Cap;
use reliability_core::{ManualClock, Outcome, Quota, RateLimiter};
use reliability_memory::LocalRateLimiter;

#[global_allocator]
static ALLOC: Cap<System> = Cap::new(System, usize::MAX);

const KEYS: u64 = 5_000_000;
const MAX_KEYS: usize = 100_000;
const SAMPLE_EVERY: u64 = 100_000;
/// Length of the longest key, `"k4999999"`.
const KEY_BYTES: usize = 8;
/// Upper bound of the table cost per remembered key (see the module docs).
const SLOT_BYTES: usize = 58;
/// Fixed allowance, independent of the number of keys.
const SLACK_BYTES: usize = 1 << 20;

#[tokio::test]
async fn five_million_keys_stay_under_the_cap() {
    let clock = ManualClock::new();
    let quota = Quota::from_micros(1_000_000, 10).unwrap(); // 1/s, burst 10
    let mut key = String::with_capacity(16);

    let baseline = ALLOC.allocated();
    let limiter = LocalRateLimiter::builder()
        .max_keys(MAX_KEYS)
        .clock(Arc::new(clock.clone()))
        .build();
    let max_keys = limiter.max_keys();
    assert!(max_keys <= MAX_KEYS);
    let cap_bytes = max_keys * (KEY_BYTES + SLOT_BYTES) + SLACK_BYTES;

    let started = Instant::now();
    let mut sampled_peak = 0usize;
    for i in 0..KEYS {
        key.clear();
        write!(key, "k{i}").unwrap();
        // `check_sync` is the body of `RateLimiter::check` minus the boxed
        // future: same state, less per-call overhead in this unoptimized test.
        let d = limiter.check_sync(&key, quota, 1).unwrap();
        assert_eq!(
            (d.outcome, d.remaining),
            (Outcome::Allowed, 9),
            "a fresh key gets its burst"
        );
        clock.advance(Duration::from_micros(1));
        if (i + 1) % SAMPLE_EVERY == 0 {
            let live = ALLOC.allocated().saturating_sub(baseline);
            sampled_peak = sampled_peak.max(live);
            assert!(
                live <= cap_bytes,
                "after {} keys: {live} live bytes > cap {cap_bytes}",
                i + 1
            );
            assert!(limiter.len() <= max_keys);
        }
    }
    let elapsed = started.elapsed();
    // The true high-water mark of the whole run, not only the samples.
    let true_peak = ALLOC.max_allocated().saturating_sub(baseline);

    // Recent keys kept their state: the last one has used 1 of its 10.
    key.clear();
    write!(key, "k{}", KEYS - 1).unwrap();
    assert_eq!(limiter.check(&key, quota, 1).await.unwrap().remaining, 8);

    let remembered = limiter.len();
    println!(
        "memory_cap: {KEYS} keys in {elapsed:.2?} ({:.0} ns/check); max_keys {max_keys}, \
         {remembered} remembered, {} active keys evicted; \
         peak live heap {sampled_peak} B sampled every {SAMPLE_EVERY} keys, {true_peak} B true peak \
         ({:.1} B per max key); cap {cap_bytes} B",
        elapsed.as_nanos() as f64 / KEYS as f64,
        limiter.evicted_active(),
        true_peak as f64 / max_keys as f64,
    );
    assert!(remembered <= max_keys && remembered >= max_keys * 7 / 8 - 1);
    assert!(limiter.evicted_active() >= KEYS - max_keys as u64);
    assert!(
        true_peak <= cap_bytes,
        "true peak {true_peak} B > cap {cap_bytes} B"
    );
}
