//! The network and memory phases of the `chaos` example (same module),
//! each on a real redis-server that stays up while the path to it or its
//! memory fails, under load from several tasks:
//!
//! - a black-holed connection (the harness's fault proxy: no FIN, no RST):
//!   degraded within 1 s, healthy within 1 s of the link healing, no call
//!   over the deadline + 50 ms;
//! - 80 ms of added latency each way under the 250 ms deadline: the breaker
//!   stays closed and Redis answers;
//! - `maxmemory` reached under `noeviction`: callers answered locally, the
//!   status degraded, the local records drained back once memory frees.
//!
//! Each: 0 errors reached callers, 0 acknowledged spool records lost.
#![cfg(all(feature = "redis", feature = "disk"))]

#[path = "../examples/chaos/network.rs"]
#[allow(dead_code)]
mod network;

use std::time::Duration;

use network::NetFault;

async fn phase(fault: NetFault, lasts: Duration) {
    let report = network::run(fault, 3, lasts).await.expect("phase runs");
    // Printed on failure, or with --nocapture.
    eprintln!("{report}");
    let violations = report.violations();
    assert!(violations.is_empty(), "{violations:#?}\n{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_connection() {
    phase(NetFault::BlackHole, Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eighty_ms_each_way() {
    phase(NetFault::Latency, Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maxmemory_reached_under_noeviction() {
    phase(NetFault::OutOfMemory, Duration::from_secs(1)).await;
}
