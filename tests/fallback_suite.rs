//! The conformance suites on `Fallback` pairings: the functional contract is
//! the same whichever side answers. Closed: the primary answers; isolated:
//! the secondary answers (for the limiter under the default policy, a local
//! share of one replica = the full quota). The Redis pairings (primary
//! killed, breaker open) run with the Redis backends.

use std::sync::Arc;

use async_trait::async_trait;
use reliability::fallback::{Breaker, BreakerConfig, Fallback};
use reliability::memory::{LocalRateLimiter, MemoryIdempotencyStore, MemorySpool};
use reliability::testkit::SpoolFactory;
use reliability::{idempotency_suite, rate_limiter_suite, spool_suite, ManualClock, SpoolLimits};

fn breaker(clock: &Arc<ManualClock>, isolate: bool) -> Arc<Breaker> {
    let b = Arc::new(Breaker::new(BreakerConfig::default(), clock.clone()));
    if isolate {
        b.isolate();
    }
    b
}

fn limiters(clock: ManualClock, isolate: bool) -> Fallback<LocalRateLimiter, LocalRateLimiter> {
    let clock = Arc::new(clock);
    let primary = LocalRateLimiter::builder().clock(clock.clone()).build();
    let secondary = LocalRateLimiter::builder().clock(clock.clone()).build();
    Fallback::new(primary, secondary, breaker(&clock, isolate))
}

fn stores(
    clock: ManualClock,
    isolate: bool,
) -> Fallback<MemoryIdempotencyStore, MemoryIdempotencyStore> {
    let clock = Arc::new(clock);
    let primary = MemoryIdempotencyStore::builder()
        .clock(clock.clone())
        .build();
    let secondary = MemoryIdempotencyStore::builder()
        .clock(clock.clone())
        .build();
    Fallback::new(primary, secondary, breaker(&clock, isolate))
}

/// Fallback(memory spool, memory spool); not reopenable, so the suite's
/// reopen cases are no-ops.
struct Spools {
    isolate: bool,
}

#[async_trait]
impl SpoolFactory for Spools {
    type Spool = Fallback<MemorySpool, MemorySpool>;

    async fn create(&self, clock: ManualClock, limits: SpoolLimits) -> Self::Spool {
        let clock = Arc::new(clock);
        let side = || {
            MemorySpool::builder()
                .limits(limits)
                .clock(clock.clone())
                .build()
        };
        Fallback::new(side(), side(), breaker(&clock, self.isolate))
    }

    async fn reopen(&self, _: Self::Spool, _: ManualClock, _: SpoolLimits) -> Self::Spool {
        unreachable!("a fallback over memory spools is not reopenable")
    }
}

mod closed {
    use super::*;
    rate_limiter_suite!(|clock: ManualClock| async move { limiters(clock, false) });
    mod idempotency {
        use super::*;
        idempotency_suite!(|clock: ManualClock| async move { stores(clock, false) });
    }
    mod spool {
        use super::*;
        spool_suite!(Spools { isolate: false });
    }
}

mod isolated {
    use super::*;
    rate_limiter_suite!(|clock: ManualClock| async move { limiters(clock, true) });
    mod idempotency {
        use super::*;
        idempotency_suite!(|clock: ManualClock| async move { stores(clock, true) });
    }
    mod spool {
        use super::*;
        spool_suite!(Spools { isolate: true });
    }
}
