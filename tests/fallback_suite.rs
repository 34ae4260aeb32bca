//! The rate limiter suite on `Fallback` pairings: the functional contract is
//! the same whichever side answers. Closed: the primary answers; isolated:
//! the secondary answers under the default policy (local share of one
//! replica = the full quota). The Redis pairings (primary killed, breaker
//! open) run in the Redis crate's tests.

use std::sync::Arc;

use reliability::fallback::{Breaker, BreakerConfig, Fallback};
use reliability::memory::LocalRateLimiter;
use reliability::{rate_limiter_suite, ManualClock};

fn pair(clock: ManualClock, isolate: bool) -> Fallback<LocalRateLimiter, LocalRateLimiter> {
    let shared = Arc::new(clock);
    let breaker = Arc::new(Breaker::new(BreakerConfig::default(), shared.clone()));
    if isolate {
        breaker.isolate();
    }
    let primary = LocalRateLimiter::builder().clock(shared.clone()).build();
    let secondary = LocalRateLimiter::builder().clock(shared).build();
    Fallback::new(primary, secondary, breaker)
}

mod closed {
    use super::*;
    rate_limiter_suite!(|clock: ManualClock| async move { pair(clock, false) });
}

mod isolated {
    use super::*;
    rate_limiter_suite!(|clock: ManualClock| async move { pair(clock, true) });
}
