//! Values read with serde go through the same checks as their
//! constructors: a deserialized `Quota` or `RetryPolicy` is either an error
//! naming the field or a value that never panics in use.

use std::panic::{catch_unwind, AssertUnwindSafe};

use reliability_core::gcra::decide;
use reliability_core::{Quota, RetryPolicy};

/// What using a value that should never have been built does.
fn use_quota(q: Quota) -> String {
    match catch_unwind(AssertUnwindSafe(|| decide(None, 1_000_000, q, 1))) {
        Ok(d) => format!("decide gave {d:?}"),
        Err(_) => "decide panicked".into(),
    }
}

fn use_policy(p: &RetryPolicy) -> String {
    match catch_unwind(AssertUnwindSafe(|| p.delay_after(1))) {
        Ok(d) => format!("delay_after gave {d:?}"),
        Err(_) => "delay_after panicked".into(),
    }
}

#[test]
fn quota_deserializes_through_its_constructor() {
    for (yaml, field) in [
        ("{emissionIntervalUs: 0, burst: 5}", "emissionIntervalUs"),
        ("{emissionIntervalUs: 1000, burst: 0}", "burst"),
    ] {
        match serde_norway::from_str::<Quota>(yaml) {
            Ok(q) => panic!("{yaml} accepted as {q:?}; {}", use_quota(q)),
            Err(e) => assert!(e.to_string().contains(field), "{yaml}: {e}"),
        }
    }
    let q: Quota = serde_norway::from_str("{emissionIntervalUs: 1000, burst: 5}").expect("valid");
    assert_eq!(q, Quota::from_micros(1000, 5).expect("valid"));
    assert_eq!(
        serde_norway::from_str::<Quota>(&serde_norway::to_string(&q).expect("ser")).expect("de"),
        q
    );
}

#[test]
fn retry_policy_deserializes_through_its_constructor() {
    for (yaml, field) in [
        ("{schedule: [{secs: 60, nanos: 0}], jitter: 5.0}", "jitter"),
        ("{schedule: [{secs: 60, nanos: 0}], jitter: -0.5}", "jitter"),
        ("{schedule: [{secs: 60, nanos: 0}], jitter: .nan}", "jitter"),
        ("{schedule: [{secs: 0, nanos: 0}], jitter: 0.1}", "schedule"),
        (
            "{schedule: [{secs: 18446744073709551615, nanos: 0}], jitter: 0.5}",
            "schedule",
        ),
    ] {
        match serde_norway::from_str::<RetryPolicy>(yaml) {
            Ok(p) => panic!("{yaml} accepted as {p:?}; {}", use_policy(&p)),
            Err(e) => assert!(e.to_string().contains(field), "{yaml}: {e}"),
        }
    }
    let p = RetryPolicy::default();
    let back: RetryPolicy =
        serde_norway::from_str(&serde_norway::to_string(&p).expect("ser")).expect("de");
    assert_eq!(back, p);
}
