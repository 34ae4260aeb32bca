//! The whole conformance suite on the memory backends.

use std::sync::Arc;

use async_trait::async_trait;
use reliability_core::testkit::SpoolFactory;
use reliability_core::{
    idempotency_suite, rate_limiter_suite, spool_suite, ManualClock, SpoolLimits,
};
use reliability_memory::{LocalRateLimiter, MemoryIdempotencyStore, MemorySpool};

mod idempotency {
    use super::*;
    idempotency_suite!(|clock: ManualClock| async move {
        MemoryIdempotencyStore::builder()
            .clock(Arc::new(clock))
            .build()
    });
}

mod rate_limit {
    use super::*;
    rate_limiter_suite!(|clock: ManualClock| async move {
        LocalRateLimiter::builder().clock(Arc::new(clock)).build()
    });
}

/// Builds memory spools; they are not reopenable, so the reopen cases are
/// no-ops for them (gated on `Capabilities::reopenable`).
struct MemorySpools;

#[async_trait]
impl SpoolFactory for MemorySpools {
    type Spool = MemorySpool;

    async fn create(&self, clock: ManualClock, limits: SpoolLimits) -> MemorySpool {
        MemorySpool::builder()
            .limits(limits)
            .clock(Arc::new(clock))
            .build()
    }

    async fn reopen(&self, _: MemorySpool, _: ManualClock, _: SpoolLimits) -> MemorySpool {
        unreachable!("the memory spool does not report reopenable")
    }
}

mod spool {
    use super::*;
    spool_suite!(MemorySpools);
}
