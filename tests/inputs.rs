//! Every public input, by property (1,000 cases each) and by the seeds of
//! the fuzz targets: configuration, health status, keys, quotas, retry
//! policies and redaction. The checks themselves live in
//! `tests/input_checks/mod.rs`, shared with the cargo-fuzz targets.
//!
//! A failure prints the minimal failing input; `PROPTEST_RNG_SEED=<n>`
//! reruns with a given seed (proptest also records failures in
//! `tests/inputs.proptest-regressions`).

mod input_checks;
use input_checks as inputs;

use proptest::prelude::*;
use reliability::config::RedisUrl;
use reliability::gcra::decide;
use reliability::status::{redact, Redacted};
use reliability::{Error, Quota, RetryPolicy};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 1_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Every byte of `s` percent-encoded.
fn percent_encoded(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

/// Text around a secret: anything, whitespace and quotes included.
fn context() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,24}",
        "[ a-z:/@=&?#;,()'\"%]{0,16}",
        Just(String::new()),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Any password, in a URL's credentials (raw or percent-encoded), after
    /// `password=`, in an error chain: the redacted output never depends on
    /// it.
    #[test]
    fn passwords_never_show(
        password in prop_oneof![".{1,24}", "[!-~]{1,24}", "[@:/?#;,%=*]{1,8}"],
        user in "[a-z@:]{0,8}",
        host in "[a-z0-9.:@\\[\\]]{1,12}",
        before in context(),
        after in context(),
    ) {
        inputs::redaction(&before, &user, &password, &host, &after);

        // A URL a configuration carries: percent-encoded, any bytes.
        let enc = percent_encoded(&password);
        let url = RedisUrl::new(format!("redis://app:{enc}@h:6379/0")).expect("a valid URL");
        let shown = [url.to_string(), format!("{url:?}"), url.redacted(),
            serde_norway::to_string(&url).expect("serializes")];
        for s in &shown {
            prop_assert!(!s.contains(&enc), "{s}");
        }
        prop_assert_eq!(url.to_string(), "redis://app:***@h:6379/0");

        // Raw, as far as a URL takes it unencoded.
        let raw: String = password.chars().filter(|c| !c.is_whitespace() && !c.is_control()).collect();
        if !raw.is_empty() {
            let url = RedisUrl::new(format!("redis://app:{raw}@h:6379/0")).expect("a valid URL");
            prop_assert_eq!(url.to_string(), "redis://app:***@h:6379/0");
        }

        // An error chain: the message and its source, as a status shows it.
        let chain = |pw: &str| {
            let source = std::io::Error::other(format!("AUTH failed: password={pw} for redis://u:{pw}@h"));
            let e = Error::Backend {
                backend: "redis",
                message: format!("connect redis://app:{pw}@h:6379 {before}"),
                source: Some(Box::new(source)),
            };
            let mut text = e.to_string();
            let mut next = std::error::Error::source(&e);
            while let Some(s) = next {
                text.push_str(": ");
                text.push_str(&s.to_string());
                next = s.source();
            }
            Redacted::new(text).to_string()
        };
        let pw: String = password.chars().filter(|c| inputs::password_char(*c)).collect();
        if !pw.is_empty() {
            prop_assert_eq!(chain(&pw), chain("Z"));
        }
    }

    /// Any two (namespace, id) pairs: their keys differ in every backend's
    /// scheme unless the pairs are equal.
    #[test]
    fn distinct_pairs_have_distinct_keys(
        ns in prop::collection::vec(prop_oneof!["[a-c]{1,2}", "[A-Za-z0-9_.-]{1,64}", ".{0,3}"], 2),
        ids in prop::collection::vec(prop_oneof![
            "[a-c#]{1,3}",
            "#[0-9a-f]{64}",
            "[a-z]{199,202}",
            ".{1,12}",
        ], 2),
        hashed_twin in any::<bool>(),
    ) {
        let mut b_id = ids[1].clone();
        if hashed_twin {
            // The other caller passes the first one's hashed form verbatim.
            if let Ok(h) = reliability::key::normalize_id(&ids[0]) {
                b_id = h.into_owned();
            }
        }
        inputs::keys("svc", (&ns[0], &ids[0]), (&ns[1], &b_id));
        inputs::keys("svc", (&ns[0], &ids[0]), (&ns[0], &b_id));
    }

    /// Any deserialized quota: an error naming the field, or a value that
    /// decides without panicking.
    #[test]
    fn deserialized_quotas_never_panic(
        t in prop_oneof![Just(0u64), 1u64..10, any::<u64>(), (1u64 << 40)..(1u64 << 52)],
        burst in prop_oneof![Just(0u32), 1u32..10, any::<u32>()],
        tat in any::<Option<u64>>(),
        now in any::<u64>(),
        cost in any::<u32>(),
        replicas in any::<u32>(),
    ) {
        let yaml = format!("{{emissionIntervalUs: {t}, burst: {burst}}}");
        match serde_norway::from_str::<Quota>(&yaml) {
            Err(e) => {
                let m = e.to_string();
                prop_assert!(m.contains("emissionIntervalUs") || m.contains("burst") || m.contains("quota"), "{m}");
            }
            Ok(q) => {
                let _ = decide(tat, now, q, cost);
                let _ = decide(tat, now, q, cost % (q.burst() + 1));
                let s = q.share(replicas);
                let _ = decide(tat, now, s, 1);
                prop_assert!(u128::from(s.emission_interval_us()) * u128::from(s.burst())
                    <= u128::from(reliability::rate_limit::MAX_WINDOW_US));
            }
        }
    }

    /// Any deserialized retry policy: an error naming the field, or a value
    /// whose delays never panic.
    #[test]
    fn deserialized_retry_policies_never_panic(
        steps in prop::collection::vec((any::<u64>(), 0u32..1_000_000_000), 0..4),
        small in prop::collection::vec(1u64..1_000_000, 0..4),
        jitter in prop_oneof![any::<f64>(), 0.0f64..1.0, Just(f64::NAN), Just(1.0)],
    ) {
        let schedule: Vec<String> = steps.iter().map(|(s, n)| format!("{{secs: {s}, nanos: {n}}}"))
            .chain(small.iter().map(|s| format!("{{secs: {s}, nanos: 0}}")))
            .collect();
        let jitter = if jitter.is_nan() { ".nan".to_string() } else { format!("{jitter:?}") };
        let yaml = format!("{{schedule: [{}], jitter: {jitter}}}", schedule.join(", "));
        match serde_norway::from_str::<RetryPolicy>(&yaml) {
            Err(e) => {
                let m = e.to_string();
                prop_assert!(m.contains("schedule") || m.contains("jitter"), "{yaml}: {m}");
            }
            Ok(p) => {
                for attempt in 0..=p.max_attempts() {
                    let _ = p.delay_after(attempt);
                    let _ = p.bounds_after(attempt);
                }
            }
        }
    }

    /// Any configuration built from random values: an error naming the
    /// field, or a configuration that builds, is used and reads back.
    #[test]
    fn configurations_name_the_field_or_work(
        entries in prop::collection::vec((0usize..14, any::<u64>(), 0usize..8), 0..6),
        jitter in prop_oneof![any::<f64>(), 0.0f64..1.0],
    ) {
        const UNITS: [&str; 8] = ["ns", "us", "ms", "s", "m", "h", "d", ""];
        let mut yaml = String::from("reliability:\n");
        for (key, n, unit) in entries {
            let d = format!("{}{}", n % 100_000_000_000_000, UNITS[unit]);
            let line = match key {
                0 => format!("  fallback: {{ deadline: {d} }}"),
                1 => format!("  fallback: {{ probeInterval: {d}, replicas: {} }}", n % 5),
                2 => format!("  spoolLimits: {{ retention: {d} }}"),
                3 => format!("  spoolLimits: {{ maxBytes: {n}, maxRecordBytes: {} }}", n / 3),
                4 => format!("  retry: {{ schedule: [{d}, 1m], jitter: {jitter:?} }}"),
                5 => format!("  memory: {{ maxEntries: {}, maxBytes: {n} }}", n % 1_000_000),
                6 => format!("  spool: disk\n  disk: {{ dir: /nonexistent/x, maxBytes: {n}, fsync: interval, fsyncInterval: {d} }}"),
                7 => format!("  profile: redis-enabled\n  redis: {{ url: 'redis://h:1/{}', db: {} }}", n % 20, n % 17),
                8 => format!("  profile: redis-enabled\n  redis: {{ url: redis://h, responseTimeout: {d} }}"),
                9 => format!("  keyPrefix: 'k{}'", char::from_u32(u32::try_from(n % 0x11_0000).unwrap_or(0)).unwrap_or('x')),
                10 => format!("  fallback: {{ failureThreshold: {}, rateLimitPolicy: localFull }}", n % 3),
                11 => "  spool: memory".into(),
                12 => format!("  memory: {{ maxKeys: {} }}", n % 1_000),
                _ => format!("  retry: {{ jitter: {jitter:?} }}"),
            };
            yaml.push_str(&line);
            yaml.push('\n');
        }
        inputs::config(&yaml);
    }

    /// Any `since` written into a status: refused or read back as written.
    #[test]
    fn status_since_reads_back_or_is_refused(
        y in prop_oneof![0i64..3000, any::<i64>(), 500_000i64..700_000],
        m in 0u32..14, d in 0u32..33, hh in 0u32..26, mm in 0u32..62, ss in 0u32..62,
        frac in "[0-9]{0,9}",
    ) {
        let since = format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{frac}Z");
        let yaml = format!(
            "profile: redis-enabled\noverall: degraded\nredis: {{ available: false, degraded: true, fallback: baseline }}\ncomponents: {{ idempotencyStore: memory, rateLimiter: local, spool: none }}\nfallbackFrom: {{ idempotencyStore: redis, rateLimiter: redis }}\nbreaker: {{ state: open, since: '{since}', lastError: 'redis://u:pw@h failed' }}\n"
        );
        inputs::status(&yaml);
    }
}

/// The fuzz targets' seeds (`fuzz/seeds/<target>/`), replayed through the
/// same checks: cheap regression runs of what the fuzzers found
/// interesting.
#[test]
fn fuzz_seeds_replay() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let mut replayed = 0;
    for target in ["config", "status", "keys", "redaction"] {
        let Ok(dir) = std::fs::read_dir(root.join(target)) else {
            continue;
        };
        for entry in dir {
            let data = std::fs::read(entry.expect("a seed").path()).expect("readable seed");
            match target {
                "config" => inputs::config(&String::from_utf8_lossy(&data)),
                "status" => inputs::status(&String::from_utf8_lossy(&data)),
                "keys" => {
                    let f = inputs::fields(&data, 5);
                    inputs::keys(&f[0], (&f[1], &f[2]), (&f[3], &f[4]));
                }
                _ => {
                    let f = inputs::fields(&data, 5);
                    inputs::redaction(&f[0], &f[1], &f[2], &f[3], &f[4]);
                    let _ = redact(&String::from_utf8_lossy(&data));
                }
            }
            replayed += 1;
        }
    }
    assert!(
        replayed > 0 || !root.exists(),
        "no seed under {}",
        root.display()
    );
}
