//! Checks of the library's public inputs, shared by the property tests
//! (`tests/inputs.rs`) and the cargo-fuzz targets (`fuzz/fuzz_targets/`):
//! each takes arbitrary text, uses it the way a caller or an operator
//! would, and panics only when the library breaks a promise:
//!
//! - [`config`]: a YAML configuration either fails with an error naming a
//!   field under `reliability`, or loads, validates, builds (baseline
//!   backends, no I/O), is used (retry delays, local quotas) and reads back
//!   equal from its own serialized form;
//! - [`status`]: a health status read from YAML writes back and reads back
//!   equal;
//! - [`keys`]: two distinct (namespace, id) pairs never share a key in any
//!   backend's key scheme;
//! - [`redaction`]: what [`redact`] returns for a text with a password does
//!   not depend on the password, wherever it stands (URL credentials,
//!   `password=` text): it is nowhere in the output.
#![allow(dead_code, unreachable_pub)]

use std::sync::LazyLock;

use reliability::config::{from_yaml_str, Profile, ReliabilityConfig, SpoolBackend};
use reliability::status::{redact, HealthStatus};
use reliability::{Error, KeySpace, Primitive, Quota, Reliability};

/// Splits `data` into `n` texts (lossy UTF-8, separated by NUL), the last
/// one taking the rest; missing ones are empty.
pub fn fields(data: &[u8], n: usize) -> Vec<String> {
    let text = String::from_utf8_lossy(data);
    let mut out: Vec<String> = text.splitn(n, '\0').map(str::to_string).collect();
    out.resize(n, String::new());
    out
}

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
});

/// `reliability: <cfg>` as YAML.
fn to_yaml(cfg: &ReliabilityConfig) -> String {
    #[derive(serde::Serialize)]
    struct Doc<'a> {
        reliability: &'a ReliabilityConfig,
    }
    serde_norway::to_string(&Doc { reliability: cfg }).expect("a config serializes")
}

/// A configuration text: an error naming a field, or a configuration that
/// builds, is used without panicking and reads back equal.
pub fn config(text: &str) {
    let cfg = match from_yaml_str(text) {
        Ok(cfg) => cfg,
        Err(Error::Config { field, .. }) => {
            assert!(field.starts_with("reliability"), "field {field:?}");
            return;
        }
        Err(other) => panic!("not a configuration error: {other:?}"),
    };
    assert!(cfg.validate().is_ok());
    let policy = cfg
        .retry_policy()
        .expect("a valid config has a retry policy");
    for attempt in 1..=policy.max_attempts() {
        let _ = policy.delay_after(attempt);
    }
    if let Ok(q) = Quota::per_second(1000) {
        let _ = cfg.fallback.local_quota(q);
    }
    let secrets = cfg.redis.as_ref().is_some_and(|r| {
        r.password.is_some()
            || r.url.as_ref().is_some_and(|u| u.expose() != u.redacted())
            || r.sentinel
                .as_ref()
                .is_some_and(|s| s.urls.iter().any(|u| u.expose() != u.redacted()))
            || r.cluster
                .as_ref()
                .is_some_and(|c| c.urls.iter().any(|u| u.expose() != u.redacted()))
    });
    if !secrets {
        let yaml = to_yaml(&cfg);
        let back = from_yaml_str(&yaml).unwrap_or_else(|e| panic!("{yaml}\nreads back: {e}"));
        assert_eq!(back, cfg, "{yaml}");
    }
    if cfg.profile == Profile::Baseline && cfg.spool_backend() != SpoolBackend::Disk {
        RUNTIME
            .block_on(Reliability::from_config(&cfg))
            .expect("a valid baseline configuration builds");
    }
}

/// A status text: if it reads, it writes back and reads back equal, and
/// its verdicts can be asked.
pub fn status(text: &str) {
    let Ok(s) = serde_norway::from_str::<HealthStatus>(text) else {
        return;
    };
    let yaml = serde_norway::to_string(&s).expect("a status serializes");
    let back: HealthStatus =
        serde_norway::from_str(&yaml).unwrap_or_else(|e| panic!("{yaml}\nreads back: {e}"));
    assert_eq!(back, s, "{yaml}");
    assert_eq!(serde_norway::to_string(&back).expect("serializes"), yaml);
    let _ = (s.evaluate(), s.is_ready(), s.is_live());
}

/// Every key a backend builds for (`namespace`, `id`) with `prefix`.
fn backend_keys(prefix: &str, namespace: &str, id: &str) -> Option<Vec<String>> {
    let ks = KeySpace::new(prefix, namespace).ok()?;
    let mut keys = Vec::new();
    for p in [Primitive::Idempotency, Primitive::RateLimit] {
        keys.push(ks.key(p, id).ok()?);
    }
    // The Redis spool's record key: record ids are used as given.
    if reliability::RecordId::new(id).is_ok() {
        keys.push(format!("{{{}}}:r:{id}", ks.base(Primitive::Spool)));
    }
    // The memory backends key their maps by the normalized id, one map
    // per namespace.
    keys.push(format!(
        "{namespace}\0{}",
        reliability::key::normalize_id(id).ok()?
    ));
    Some(keys)
}

/// Two (namespace, id) pairs under one prefix: equal keys in a backend's
/// scheme only for equal pairs.
pub fn keys(prefix: &str, a: (&str, &str), b: (&str, &str)) {
    let (Some(ka), Some(kb)) = (
        backend_keys(prefix, a.0, a.1),
        backend_keys(prefix, b.0, b.1),
    ) else {
        return;
    };
    for (x, y) in ka.iter().zip(&kb) {
        assert_eq!(x == y, a == b, "{a:?} {b:?}: {x:?} / {y:?}");
    }
}

/// May `c` stand in a password put in free text? Whitespace and control
/// characters end a URL or a value (a URL carries them percent-encoded),
/// `&` ends a `password=` value, quotes and parentheses delimit it.
pub fn password_char(c: char) -> bool {
    !(c.is_whitespace() || c.is_control() || matches!(c, '&' | '"' | '\'' | '(' | ')'))
}

/// A password in a URL's credentials and after `password=`, inside free
/// text: the redacted text is the same as with another password, so the
/// password is nowhere in it. `password` is filtered to
/// [`password_char`]s; `user` and `host` to characters a URL carries
/// unencoded.
pub fn redaction(before: &str, user: &str, password: &str, host: &str, after: &str) {
    let password: String = password.chars().filter(|c| password_char(*c)).collect();
    if password.is_empty() {
        return;
    }
    let url_char = |c: &char| !(c.is_whitespace() || c.is_control());
    let user: String = user.chars().filter(url_char).collect();
    let host: String = host.chars().filter(url_char).collect();
    let host = if host.is_empty() { "h".into() } else { host };
    let text =
        |pw: &str| format!("{before} redis://{user}:{pw}@{host} {after} password={pw} {before}");
    let shown = redact(&text(&password));
    let other = redact(&text("Z"));
    assert_eq!(
        shown, other,
        "the output depends on the password {password:?}"
    );
    // Redacting again changes nothing.
    assert_eq!(redact(&shown), shown);
}
