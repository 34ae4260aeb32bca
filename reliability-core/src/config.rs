//! The configuration model: which backend each primitive uses, how to reach
//! Redis, where the disk spool lives, the spool limits, the retry schedule and
//! the fallback policy.
//!
//! The keys are in camelCase, under a top-level `reliability:`
//! map (the facade's `reliability::config::from_yaml_str` reads that map):
//!
//! ```yaml
//! reliability:
//!   profile: redis-enabled          # baseline | redis-enabled (default baseline)
//!   idempotencyStore: redis         # memory | redis
//!   rateLimiter: redis              # local | redis
//!   spool: disk                     # none | redis | disk | memory
//!   keyPrefix: gateway
//!   namespace: webhooks
//!   redis:
//!     url: rediss://app:secret@redis.internal:6380
//!     responseTimeout: 200ms
//!   disk: { dir: /var/lib/gateway/spool, fsync: always }
//!   spoolLimits: { maxRecords: 10000, retention: 7d, alertDepth: 100 }
//!   retry: { schedule: [1m, 5m, 15m, 1h, 4h, 24h], jitter: 0.1 }
//!   fallback: { deadline: 250ms, rateLimitPolicy: localShare, replicas: 3 }
//! ```
//!
//! # Defaults follow the profile
//!
//! A component key that is absent takes the profile's choice: `baseline`
//! means `memory` / `local` / `none`, `redis-enabled` means `redis` for all
//! three (enabling the profile means using Redis).
//! The effective choice is [`ReliabilityConfig::idempotency_backend`],
//! [`rate_limiter_backend`](ReliabilityConfig::rate_limiter_backend) and
//! [`spool_backend`](ReliabilityConfig::spool_backend).
//!
//! # Durations
//!
//! Durations are written as human strings: an integer and a unit, repeated:
//! `250ms`, `1m`, `7d`, `1h30m`. Units: `ns`, `us` (or `µs`), `ms`, `s`, `m`,
//! `h`, `d`. See [`duration`].
//!
//! Every duration is at most [`MAX_DURATION`] (36,500 days): a longer one
//! would overflow a deadline computed from it.
//!
//! # Secrets
//!
//! The Redis password is a [`Secret`] and URLs are [`RedisUrl`]s: neither
//! shows a credential in `Debug`, `Display` or serialized output (they print
//! `***`). Serializing a configuration is therefore lossy for secrets, and
//! [`ReliabilityConfig::validate`] refuses the `***` placeholder, so a dumped
//! configuration is never loaded back with a wrong password.
//!
//! # Validation
//!
//! [`ReliabilityConfig::validate`] returns [`Error::Config`] whose `field` is
//! the dotted path of the offending key, e.g. `reliability.redis.url`.
//!
//! ```
//! use reliability_core::config::{ReliabilityConfig, SpoolBackend};
//! use reliability_core::Error;
//!
//! let mut cfg = ReliabilityConfig::baseline();
//! assert!(cfg.validate().is_ok());
//! cfg.spool = Some(SpoolBackend::Disk); // but no disk.dir
//! match cfg.validate() {
//!     Err(Error::Config { field, .. }) => assert_eq!(field, "reliability.disk.dir"),
//!     other => panic!("unexpected {other:?}"),
//! }
//! ```

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rate_limit::Quota;
use crate::retry::RetryPolicy;
use crate::spool::{
    SpoolLimits, DEFAULT_ALERT_DEPTH, DEFAULT_MAX_BYTES, DEFAULT_MAX_RECORDS,
    DEFAULT_MAX_RECORD_BYTES, DEFAULT_RETENTION,
};

/// What a redacted secret prints as.
pub const REDACTED: &str = "***";

// ---------------------------------------------------------------------------
// Choices
// ---------------------------------------------------------------------------

/// The runtime profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Profile {
    /// No external dependency: memory, local limiter, no spool. The default.
    #[default]
    Baseline,
    /// Redis accelerates the primitives; the baseline answers while it is down.
    RedisEnabled,
}

/// The idempotency store backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum IdempotencyBackend {
    /// In-process, per replica.
    Memory,
    /// Shared across replicas through Redis.
    Redis,
}

/// The rate limiter backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum RateLimiterBackend {
    /// In-process GCRA, per replica.
    Local,
    /// GCRA shared across replicas through Redis.
    Redis,
}

/// The spool backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum SpoolBackend {
    /// No spool: direct delivery.
    None,
    /// A spool in Redis.
    Redis,
    /// A spool in local files.
    Disk,
    /// An in-process spool: volatile, lost when the process stops. For
    /// tests and development, or where losing the backlog on restart is
    /// acceptable. Also what status reports when a spool answers from memory.
    Memory,
}

macro_rules! names {
    ($t:ty { $($v:ident => $s:literal),* $(,)? }) => {
        impl $t {
            /// The name used in configuration and status.
            pub const fn as_str(self) -> &'static str {
                match self { $(<$t>::$v => $s),* }
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

names!(Profile { Baseline => "baseline", RedisEnabled => "redis-enabled" });
names!(IdempotencyBackend { Memory => "memory", Redis => "redis" });
names!(RateLimiterBackend { Local => "local", Redis => "redis" });
names!(SpoolBackend { None => "none", Redis => "redis", Disk => "disk", Memory => "memory" });

impl IdempotencyBackend {
    /// `true` for the Redis backend.
    pub const fn is_redis(self) -> bool {
        matches!(self, IdempotencyBackend::Redis)
    }
}

impl RateLimiterBackend {
    /// `true` for the Redis backend.
    pub const fn is_redis(self) -> bool {
        matches!(self, RateLimiterBackend::Redis)
    }
}

impl SpoolBackend {
    /// `true` for the Redis backend.
    pub const fn is_redis(self) -> bool {
        matches!(self, SpoolBackend::Redis)
    }
}

// ---------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------

/// A secret string (a password). `Debug`, `Display` and `Serialize` show
/// `***`; only [`expose`](Self::expose) gives the value.
///
/// ```
/// use reliability_core::config::Secret;
///
/// let s = Secret::new("hunter2");
/// assert_eq!(format!("{s:?} {s}"), "\"***\" ***");
/// assert_eq!(s.expose(), "hunter2");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `true` if the value is the redaction placeholder `***`, i.e. it was
    /// read back from serialized (redacted) output.
    pub fn is_placeholder(&self) -> bool {
        self.0 == REDACTED
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{REDACTED}\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Accepts any scalar (a YAML `password: 12345` is a number) and never
/// echoes the value in an error.
impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a password string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> std::result::Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

/// A Redis URL: `redis://[user[:password]@]host[:port][/db][?query]` or
/// `rediss://` (TLS). Checked when built; `Debug`, `Display` and `Serialize`
/// hide the credentials (`redis://user:***@host`).
///
/// ```
/// use reliability_core::config::RedisUrl;
///
/// let u = RedisUrl::new("redis://app:hunter2@10.0.0.5:6379/2").unwrap();
/// assert_eq!(u.to_string(), "redis://app:***@10.0.0.5:6379/2");
/// assert!(!format!("{u:?}").contains("hunter2"));
/// assert_eq!(u.expose(), "redis://app:hunter2@10.0.0.5:6379/2");
/// assert!(RedisUrl::new("http://10.0.0.5").is_err());
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// Checks `url`: scheme `redis://` or `rediss://`, a host, an optional
    /// numeric port, an optional database path (0 to [`MAX_REDIS_DB`]), no
    /// whitespace or control character anywhere (percent-encode them in
    /// credentials): a URL ends at whitespace in free text, so what follows
    /// would escape redaction.
    ///
    /// # Errors
    /// [`Error::Config`] with field `url`; callers that know the full path
    /// report it themselves.
    pub fn new(url: impl Into<String>) -> Result<Self> {
        let url = url.into();
        check_redis_url(&url).map_err(|m| Error::config("url", m))?;
        Ok(RedisUrl(url))
    }

    /// The URL with its credentials. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `true` for `rediss://`.
    pub fn is_tls(&self) -> bool {
        self.0.starts_with("rediss://")
    }

    /// The URL with credentials replaced by `***`.
    pub fn redacted(&self) -> String {
        crate::status::redact(&self.0)
    }

    /// The database number of the URL's path (`redis://h:6379/3` is 3),
    /// `None` without one.
    pub fn database(&self) -> Option<u32> {
        url_database(&self.0).ok().flatten()
    }

    /// `true` if the password part is the `***` placeholder (read back from
    /// redacted output).
    pub fn has_placeholder(&self) -> bool {
        self.0.contains(&format!(":{REDACTED}@")) || self.0.contains(&format!("/{REDACTED}@"))
    }
}

impl TryFrom<String> for RedisUrl {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        check_redis_url(&s)?;
        Ok(RedisUrl(s))
    }
}

/// Checks the URL inside the string visitor, so a YAML error names the
/// field (serde_norway attaches the path to errors raised there).
impl<'de> Deserialize<'de> for RedisUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RedisUrl;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a redis:// or rediss:// URL")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<RedisUrl, E> {
                RedisUrl::try_from(v.to_string()).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({:?})", self.redacted())
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

fn check_redis_url(url: &str) -> std::result::Result<(), String> {
    let rest = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))
        .ok_or_else(|| "must start with redis:// or rediss://".to_string())?;
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(
            "must not contain whitespace or control characters (percent-encode them)".into(),
        );
    }
    // The credentials end at the last '@' (a password may hold '/', '?' or
    // '#' unencoded); the host ends at the next '/', '?' or '#'. Messages
    // below never quote anything before that '@'.
    let after_userinfo = match rest.rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    let end = after_userinfo
        .find(['/', '?', '#'])
        .unwrap_or(after_userinfo.len());
    let host_port = &after_userinfo[..end];
    let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
        let close = v6
            .find(']')
            .ok_or_else(|| "unclosed [ in IPv6 host".to_string())?;
        let after = &v6[close + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err("unexpected text after IPv6 host".into()),
        };
        (&v6[..close], port)
    } else {
        match host_port.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return Err("missing host".into());
    }
    if let Some(p) = port {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => {}
            _ => return Err(format!("port {p:?} is not a number in 1..=65535")),
        }
    }
    url_database(url)?;
    Ok(())
}

/// The database number in the path of a `redis://` URL (checked by
/// [`check_redis_url`] otherwise), `None` without one.
fn url_database(url: &str) -> std::result::Result<Option<u32>, String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let after_userinfo = rest.rfind('@').map_or(rest, |at| &rest[at + 1..]);
    let tail = after_userinfo
        .find(['/', '?', '#'])
        .map_or("", |i| &after_userinfo[i..]);
    let path = tail.split(['?', '#']).next().unwrap_or("");
    let db = path.strip_prefix('/').unwrap_or(path);
    if db.is_empty() {
        return Ok(None);
    }
    if !db.bytes().all(|b| b.is_ascii_digit()) {
        return Err("the path must be empty or a database number".into());
    }
    match db.parse::<u32>() {
        Ok(n) if n <= MAX_REDIS_DB => Ok(Some(n)),
        _ => Err(format!("database {db} is outside 0..={MAX_REDIS_DB}")),
    }
}

// ---------------------------------------------------------------------------
// Durations
// ---------------------------------------------------------------------------

pub mod duration {
    //! Human-readable durations for configuration files: an integer and a
    //! unit, repeated, largest unit first by convention: `250ms`, `1m`, `7d`,
    //! `1h30m`, `1s500ms`. Units: `ns`, `us` (or `µs`), `ms`, `s`, `m`, `h`,
    //! `d` (24 h). Spaces between parts are allowed (`1h 30m`); fractions
    //! are not (write `1500ms`, not `1.5s`); a bare number is refused so
    //! `250` never silently means seconds.
    //!
    //! Use with serde as `#[serde(with = "reliability_core::config::duration")]`.
    //!
    //! ```
    //! use reliability_core::config::duration::{format, parse};
    //! use std::time::Duration;
    //!
    //! assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
    //! assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
    //! assert_eq!(format(Duration::from_secs(7 * 86_400)), "7d");
    //! assert_eq!(format(Duration::from_millis(1500)), "1s500ms");
    //! assert!(parse("250").is_err());
    //! ```

    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    const UNITS: [(&str, u128); 8] = [
        ("ns", 1),
        ("us", 1_000),
        ("µs", 1_000),
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
        ("m", 60_000_000_000),
        ("h", 3_600_000_000_000),
        ("d", 86_400_000_000_000),
    ];

    /// Parses a duration such as `250ms` or `1h30m`.
    ///
    /// # Errors
    /// A message saying what is wrong: empty input, a missing or unknown
    /// unit, a fraction, or an overflow.
    pub fn parse(s: &str) -> Result<Duration, String> {
        let text = s.trim();
        if text.is_empty() {
            return Err("empty duration; write e.g. 250ms, 30s, 1h30m".into());
        }
        let mut rest = text;
        let mut total: u128 = 0;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(format!(
                    "invalid duration {s:?}: expected a number at {rest:?}"
                ));
            }
            let n: u128 = rest[..digits]
                .parse()
                .map_err(|_| format!("invalid duration {s:?}: number too large"))?;
            rest = &rest[digits..];
            if rest.starts_with('.') {
                return Err(format!(
                    "invalid duration {s:?}: fractions are not supported, use a smaller unit"
                ));
            }
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit() || c.is_whitespace())
                .unwrap_or(rest.len());
            let unit = &rest[..unit_len];
            if unit.is_empty() {
                return Err(format!(
                    "invalid duration {s:?}: missing unit after {n} (ns, us, ms, s, m, h, d)"
                ));
            }
            let nanos = UNITS
                .iter()
                .find(|(u, _)| *u == unit)
                .map(|(_, f)| *f)
                .ok_or_else(|| {
                    format!(
                        "invalid duration {s:?}: unknown unit {unit:?} (ns, us, ms, s, m, h, d)"
                    )
                })?;
            total = n
                .checked_mul(nanos)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(|| format!("invalid duration {s:?}: too large"))?;
            rest = rest[unit_len..].trim_start();
        }
        let secs = u64::try_from(total / 1_000_000_000)
            .map_err(|_| format!("invalid duration {s:?}: too large"))?;
        // The remainder is below 10^9 and fits.
        let nanos = u32::try_from(total % 1_000_000_000).unwrap_or(0);
        Ok(Duration::new(secs, nanos))
    }

    /// Formats `d` in the form [`parse`] reads, largest units first: `7d`,
    /// `1h30m`, `250ms`, `0s`.
    pub fn format(d: Duration) -> String {
        let mut nanos = d.as_nanos();
        if nanos == 0 {
            return "0s".into();
        }
        let mut out = String::new();
        for (unit, f) in UNITS.iter().rev().filter(|(u, _)| *u != "µs") {
            let n = nanos / f;
            if n > 0 {
                out.push_str(&n.to_string());
                out.push_str(unit);
                nanos %= f;
            }
        }
        out
    }

    /// Serializes with [`format()`].
    ///
    /// # Errors
    /// Only those of the serializer.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    /// Deserializes with [`parse`].
    ///
    /// # Errors
    /// A custom serde error with [`parse`]'s message.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        // Parsing inside the visitor (not after) lets serde_norway attach
        // the field's path and location to the error.
        d.deserialize_str(Visitor)
    }

    struct Visitor;

    impl serde::de::Visitor<'_> for Visitor {
        type Value = Duration;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a duration such as 250ms, 30s or 1h30m")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
            parse(v).map_err(E::custom)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Duration, E> {
            Err(E::custom(format!(
                "invalid duration {v}: missing unit (ns, us, ms, s, m, h, d)"
            )))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Duration, E> {
            Err(E::custom(format!(
                "invalid duration {v}: missing unit (ns, us, ms, s, m, h, d)"
            )))
        }
    }

    /// One element of a list, deserialized with [`parse`].
    struct Element(Duration);

    impl<'de> Deserialize<'de> for Element {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            deserialize(d).map(Element)
        }
    }

    /// The same for a list of durations (`[1m, 5m, 15m]`).
    pub mod list {
        use std::time::Duration;

        use serde::ser::SerializeSeq;
        use serde::{Deserializer, Serializer};

        /// Serializes each element with [`format()`](super::format()).
        ///
        /// # Errors
        /// Only those of the serializer.
        pub fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(v.len()))?;
            for d in v {
                seq.serialize_element(&super::format(*d))?;
            }
            seq.end()
        }

        /// Deserializes each element with [`parse()`](super::parse()).
        ///
        /// # Errors
        /// A custom serde error at the bad element.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
            d.deserialize_seq(SeqVisitor)
        }

        struct SeqVisitor;

        impl<'de> serde::de::Visitor<'de> for SeqVisitor {
            type Value = Vec<Duration>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of durations such as [1m, 5m, 1h]")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Vec<Duration>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(super::Element(d)) = seq.next_element()? {
                    out.push(d);
                }
                Ok(out)
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Sections
// ---------------------------------------------------------------------------

/// Default Redis connect timeout: 1 s (redis-rs' default).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default Redis response timeout: 500 ms (redis-rs' default).
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);
/// Default wait for a pooled connection: 200 ms, inside the fallback deadline.
pub const DEFAULT_POOL_TIMEOUT: Duration = Duration::from_millis(200);
/// Default connection pool size.
pub const DEFAULT_POOL_SIZE: u32 = 16;
/// Default wait for replicas after a spool enqueue (when asked for):
/// 100 ms, inside the default fallback deadline with room for the script.
pub const DEFAULT_SPOOL_WAIT_TIMEOUT: Duration = Duration::from_millis(100);
/// Default idempotency entries held in memory.
pub const DEFAULT_MAX_ENTRIES: u64 = 100_000;
/// Default rate-limiter keys held in memory.
pub const DEFAULT_MAX_KEYS: u64 = 100_000;
/// Default fsync interval of the disk spool with `fsync: interval`.
pub const DEFAULT_FSYNC_INTERVAL: Duration = Duration::from_secs(1);
/// Default deadline of one primary call under the fallback: 250 ms.
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(250);
/// Default consecutive unavailable errors that open the breaker: 3.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
/// Default interval of the background probe while open: 250 ms.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// Default successful probes that close the breaker again: 2.
pub const DEFAULT_SUCCESS_THRESHOLD: u32 = 2;
/// Default key prefix.
pub const DEFAULT_KEY_PREFIX: &str = "reliability";
/// Default namespace.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Highest database number of a standalone or Sentinel Redis.
pub const MAX_REDIS_DB: u32 = 15;
/// The longest duration a setting takes: 36,500 days (100 years). Longer
/// ones would overflow the deadlines computed from them.
pub const MAX_DURATION: Duration = Duration::from_secs(36_500 * 86_400);
/// The largest `spoolLimits.maxRecordBytes`: 512 MiB, the largest string
/// Redis stores by default (`proto-max-bulk-len`).
pub const MAX_RECORD_BYTES: u64 = 512 * 1024 * 1024;
/// Default bytes of stored results the memory idempotency store holds:
/// 128 MiB.
pub const DEFAULT_MEMORY_MAX_BYTES: u64 = 128 * 1024 * 1024;

/// The whole `reliability:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
#[non_exhaustive]
pub struct ReliabilityConfig {
    /// The runtime profile. Default `baseline`.
    pub profile: Profile,
    /// Idempotency store backend; `None` takes the profile's choice (see
    /// [`idempotency_backend`](Self::idempotency_backend)).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_store: Option<IdempotencyBackend>,
    /// Rate limiter backend; `None` takes the profile's choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterBackend>,
    /// Spool backend; `None` takes the profile's choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spool: Option<SpoolBackend>,
    /// First segment of every key (the service). `[A-Za-z0-9_.-]`, 1 to 64
    /// bytes. Default `reliability`.
    pub key_prefix: String,
    /// Third segment of every key (the use within the service). Default
    /// `default`.
    pub namespace: String,
    /// How to reach Redis; required by profile `redis-enabled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisConfig>,
    /// The disk spool; required by `spool: disk`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskConfig>,
    /// Bounds of the in-process backends.
    pub memory: MemoryConfig,
    /// Limits every spool enforces.
    pub spool_limits: SpoolLimitsConfig,
    /// The delivery worker's retry schedule.
    pub retry: RetryConfig,
    /// How the Redis backends fall back to the local ones.
    pub fallback: FallbackConfig,
}

impl Default for ReliabilityConfig {
    fn default() -> Self {
        Self::baseline()
    }
}

/// Redis connection settings. Exactly one of `url`, `sentinel`, `cluster`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
#[non_exhaustive]
pub struct RedisConfig {
    /// A standalone server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<RedisUrl>,
    /// A Sentinel-managed master.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sentinel: Option<SentinelConfig>,
    /// A Redis Cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    /// Database number, 0 to 15; must be 0 for a cluster. Unset, the
    /// number in the URL's path applies (`redis://h:6379/3`), else 0; when
    /// both are given they must agree. See
    /// [`database`](RedisConfig::database).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db: Option<u32>,
    /// ACL user name (overrides one in the URL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password (overrides one in the URL). Never printed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// TLS settings; use with `rediss://` URLs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Time to establish a connection. Default 1 s.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Time to wait for one reply. Default 500 ms.
    #[serde(with = "duration")]
    pub response_timeout: Duration,
    /// Time to wait for a pooled connection. Default 200 ms.
    #[serde(with = "duration")]
    pub pool_timeout: Duration,
    /// Connections in the pool. Default 16.
    pub pool_size: u32,
    /// Replicas that must acknowledge each spool enqueue (`WAIT`) before it
    /// returns, so an acknowledged record survives the loss of the master
    /// (Sentinel failover after a crash). 0, the default, does not wait.
    /// Not offered on a cluster.
    pub spool_wait_replicas: u32,
    /// How long a spool enqueue waits for
    /// [`spool_wait_replicas`](Self::spool_wait_replicas). Default 100 ms.
    /// The `WAIT` runs within the enqueue's `fallback.deadline`, so it must
    /// be shorter than that deadline (validated); a replica that does not
    /// acknowledge in time leaves the batch on the master with its own
    /// durability.
    #[serde(with = "duration")]
    pub spool_wait_timeout: Duration,
    /// What the idempotency store and the rate limiter do on a server
    /// whose `maxmemory-policy` may evict their keys. Default `refuse`.
    pub on_evicting_policy: OnEvictingPolicy,
}

/// What the Redis idempotency store and rate limiter do on a server whose
/// `maxmemory-policy` may evict keys (anything but `noeviction`): an
/// evicted pending claim is acquired again (the event is processed twice),
/// an evicted limit starts afresh. The spool refuses such a server either
/// way (an evicted record is lost).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub enum OnEvictingPolicy {
    /// Do not use the server: calls answer unavailable (misconfigured),
    /// so the local side answers, and status shows an alert naming the
    /// policy. The default.
    #[default]
    Refuse,
    /// Use it anyway, knowingly; status shows the accepted policy as an
    /// alert.
    Accept,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            sentinel: None,
            cluster: None,
            db: None,
            username: None,
            password: None,
            tls: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            pool_timeout: DEFAULT_POOL_TIMEOUT,
            pool_size: DEFAULT_POOL_SIZE,
            spool_wait_replicas: 0,
            spool_wait_timeout: DEFAULT_SPOOL_WAIT_TIMEOUT,
            on_evicting_policy: OnEvictingPolicy::Refuse,
        }
    }
}

impl RedisConfig {
    /// A standalone server at `url`, other settings default.
    pub fn standalone(url: RedisUrl) -> Self {
        Self {
            url: Some(url),
            ..Self::default()
        }
    }

    /// A Sentinel-managed master, other settings default.
    pub fn sentinel(master_name: impl Into<String>, urls: Vec<RedisUrl>) -> Self {
        Self {
            sentinel: Some(SentinelConfig {
                master_name: master_name.into(),
                urls,
            }),
            ..Self::default()
        }
    }

    /// A cluster reached through `urls`, other settings default.
    pub fn cluster(urls: Vec<RedisUrl>) -> Self {
        Self {
            cluster: Some(ClusterConfig { urls }),
            ..Self::default()
        }
    }

    /// The database the backends use: [`db`](Self::db) if set, else the
    /// database of the standalone `url`'s path, else 0.
    ///
    /// # Errors
    /// [`Error::Config`] naming `reliability.redis.db` when `db` and the
    /// URL's database differ, or the database is above [`MAX_REDIS_DB`].
    pub fn database(&self) -> Result<u32> {
        let field = "reliability.redis.db";
        let path = self.url.as_ref().and_then(RedisUrl::database);
        let db = match (self.db, path) {
            (Some(db), Some(p)) if db != p => {
                return Err(Error::config(
                    field,
                    format!("{db} disagrees with the database {p} of url; set one"),
                ))
            }
            (Some(db), _) => db,
            (None, p) => p.unwrap_or(0),
        };
        if db > MAX_REDIS_DB {
            return Err(Error::config(
                field,
                format!("{db} is outside 0..={MAX_REDIS_DB}"),
            ));
        }
        Ok(db)
    }
}

/// A Sentinel deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct SentinelConfig {
    /// The master's name as the sentinels know it.
    pub master_name: String,
    /// The sentinels' URLs (`redis://host:26379`).
    pub urls: Vec<RedisUrl>,
}

/// A Redis Cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct ClusterConfig {
    /// Seed nodes.
    pub urls: Vec<RedisUrl>,
}

/// TLS settings for Redis connections.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
#[non_exhaustive]
pub struct TlsConfig {
    /// PEM file of the CA to trust (default: the system roots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (mutual TLS); needs `keyFile`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM client key (mutual TLS); needs `certFile`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Accept any server certificate. For tests only. Default false.
    pub insecure_skip_verify: bool,
}

/// When the disk spool syncs to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum FsyncPolicy {
    /// Before `enqueue` returns (group commit). The default.
    #[default]
    Always,
    /// Every `fsyncInterval`; a power loss may lose that much.
    Interval,
    /// Never explicitly; the OS decides. Survives a process crash only.
    None,
}

/// The disk spool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct DiskConfig {
    /// Directory of the spool's files (created if missing).
    pub dir: PathBuf,
    /// Bytes of payload the disk spool holds; default `spoolLimits.maxBytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// Records the disk spool holds; default `spoolLimits.maxRecords`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_records: Option<u64>,
    /// When to sync. Default `always`.
    #[serde(default)]
    pub fsync: FsyncPolicy,
    /// Sync interval with `fsync: interval`. Default 1 s.
    #[serde(default = "default_fsync_interval", with = "duration")]
    pub fsync_interval: Duration,
}

fn default_fsync_interval() -> Duration {
    DEFAULT_FSYNC_INTERVAL
}

impl DiskConfig {
    /// A disk spool in `dir`, other settings default.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_bytes: None,
            max_records: None,
            fsync: FsyncPolicy::default(),
            fsync_interval: DEFAULT_FSYNC_INTERVAL,
        }
    }

    /// The limits of the disk spool: `spool_limits` with this section's
    /// overrides.
    pub fn limits(&self, spool_limits: &SpoolLimitsConfig) -> SpoolLimits {
        let mut l = spool_limits.limits();
        if let Some(b) = self.max_bytes {
            l.max_bytes = b;
        }
        if let Some(r) = self.max_records {
            l.max_records = r;
        }
        l
    }
}

/// Bounds of the in-process backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
#[non_exhaustive]
pub struct MemoryConfig {
    /// Idempotency entries held at most. Default 100,000.
    pub max_entries: u64,
    /// Rate-limiter keys held at most. Default 100,000.
    pub max_keys: u64,
    /// Bytes the idempotency entries hold at most, stored results and keys
    /// included. Default 128 MiB. With both bounds an entry counts for at
    /// least `maxBytes / maxEntries` bytes, so neither is exceeded.
    pub max_bytes: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_keys: DEFAULT_MAX_KEYS,
            max_bytes: DEFAULT_MEMORY_MAX_BYTES,
        }
    }
}

/// Limits every spool enforces, with their defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
#[non_exhaustive]
pub struct SpoolLimitsConfig {
    /// Records held at most, dead ones included. Default 10,000.
    pub max_records: u64,
    /// Payload bytes held at most. Default 256 MiB.
    pub max_bytes: u64,
    /// Largest payload of one record. Default 1 MiB.
    pub max_record_bytes: u64,
    /// Age after which a record is dead-lettered as expired. Default 7 days.
    #[serde(with = "duration")]
    pub retention: Duration,
    /// Depth (ready + delayed + leased) above which status raises an alert.
    /// Default 100.
    pub alert_depth: u64,
}

impl Default for SpoolLimitsConfig {
    fn default() -> Self {
        Self {
            max_records: DEFAULT_MAX_RECORDS,
            max_bytes: DEFAULT_MAX_BYTES,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES as u64,
            retention: DEFAULT_RETENTION,
            alert_depth: DEFAULT_ALERT_DEPTH,
        }
    }
}

impl SpoolLimitsConfig {
    /// The [`SpoolLimits`] backends take.
    pub fn limits(&self) -> SpoolLimits {
        SpoolLimits::default()
            .with_max_records(self.max_records)
            .with_max_bytes(self.max_bytes)
            .with_max_record_bytes(usize::try_from(self.max_record_bytes).unwrap_or(usize::MAX))
            .with_retention(self.retention)
    }
}

/// The delivery worker's retry schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
#[non_exhaustive]
pub struct RetryConfig {
    /// Delays between tries. Default `[1m, 5m, 15m, 1h, 4h, 24h]`.
    #[serde(with = "duration::list")]
    pub schedule: Vec<Duration>,
    /// Jitter fraction in `[0, 1)`. Default 0.1 (±10 %).
    pub jitter: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        let p = RetryPolicy::default();
        Self {
            schedule: p.schedule().to_vec(),
            jitter: p.jitter(),
        }
    }
}

impl RetryConfig {
    /// The [`RetryPolicy`] of this schedule.
    ///
    /// # Errors
    /// [`Error::Config`] naming `reliability.retry.*` if invalid.
    pub fn policy(&self) -> Result<RetryPolicy> {
        let mut problems = Vec::new();
        self.check(&mut problems);
        if let Some(e) = problems.into_iter().next() {
            return Err(e);
        }
        RetryPolicy::new(self.schedule.clone(), self.jitter)
            .map_err(|e| Error::config("reliability.retry", e.to_string()))
    }

    fn check(&self, p: &mut Vec<Error>) {
        if self.schedule.is_empty() {
            p.push(Error::config(
                "reliability.retry.schedule",
                "must hold at least one delay",
            ));
        }
        for (i, d) in self.schedule.iter().enumerate() {
            if let Some(why) = duration_problem(*d) {
                p.push(Error::config(
                    format!("reliability.retry.schedule[{i}]"),
                    why,
                ));
            }
        }
        if !(0.0..1.0).contains(&self.jitter) {
            p.push(Error::config(
                "reliability.retry.jitter",
                format!("{} is outside [0, 1)", self.jitter),
            ));
        }
    }
}

/// What a rate limiter does while Redis is unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub enum RateLimitFallback {
    /// Allow every request.
    FailOpen,
    /// Deny every request.
    FailClosed,
    /// Each replica enforces the full quota locally.
    LocalFull,
    /// Each replica enforces `quota / replicas` locally. The default.
    #[default]
    LocalShare,
}

/// How the Redis backends fall back to the local ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
#[non_exhaustive]
pub struct FallbackConfig {
    /// Deadline of one primary call, pool checkout included. Default 250 ms.
    #[serde(with = "duration")]
    pub deadline: Duration,
    /// Consecutive unavailable errors that open the breaker. Default 3.
    pub failure_threshold: u32,
    /// Probe interval while open. Default 250 ms.
    #[serde(with = "duration")]
    pub probe_interval: Duration,
    /// Successful probes that close the breaker. Default 2.
    pub success_threshold: u32,
    /// Rate limiting while Redis is down. Default `localShare`.
    pub rate_limit_policy: RateLimitFallback,
    /// Replicas sharing one quota (for `localShare`). Default 1.
    pub replicas: u32,
}

impl Default for FallbackConfig {
    fn default() -> Self {
        Self {
            deadline: DEFAULT_DEADLINE,
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            probe_interval: DEFAULT_PROBE_INTERVAL,
            success_threshold: DEFAULT_SUCCESS_THRESHOLD,
            rate_limit_policy: RateLimitFallback::default(),
            replicas: 1,
        }
    }
}

impl FallbackConfig {
    /// The quota a local limiter enforces for `quota` while Redis is down:
    /// the whole quota (`localFull`), its share (`localShare`), or `None`
    /// when the policy answers without a limiter (`failOpen`, `failClosed`).
    pub fn local_quota(&self, quota: Quota) -> Option<Quota> {
        match self.rate_limit_policy {
            RateLimitFallback::LocalFull => Some(quota),
            RateLimitFallback::LocalShare => Some(quota.share(self.replicas)),
            RateLimitFallback::FailOpen | RateLimitFallback::FailClosed => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

impl ReliabilityConfig {
    /// The baseline profile with every default: memory idempotency store,
    /// local rate limiter, no spool.
    pub fn baseline() -> Self {
        Self {
            profile: Profile::Baseline,
            idempotency_store: None,
            rate_limiter: None,
            spool: None,
            key_prefix: DEFAULT_KEY_PREFIX.into(),
            namespace: DEFAULT_NAMESPACE.into(),
            redis: None,
            disk: None,
            memory: MemoryConfig::default(),
            spool_limits: SpoolLimitsConfig::default(),
            retry: RetryConfig::default(),
            fallback: FallbackConfig::default(),
        }
    }

    /// The `redis-enabled` profile with `redis`: all three primitives on
    /// Redis (the spool too), other settings default.
    pub fn redis_enabled(redis: RedisConfig) -> Self {
        Self {
            profile: Profile::RedisEnabled,
            redis: Some(redis),
            ..Self::baseline()
        }
    }

    /// The effective idempotency store: the configured one, else `redis`
    /// under profile `redis-enabled` and `memory` under `baseline`.
    pub fn idempotency_backend(&self) -> IdempotencyBackend {
        self.idempotency_store.unwrap_or(match self.profile {
            Profile::RedisEnabled => IdempotencyBackend::Redis,
            Profile::Baseline => IdempotencyBackend::Memory,
        })
    }

    /// The effective rate limiter: the configured one, else by profile
    /// (`redis` / `local`).
    pub fn rate_limiter_backend(&self) -> RateLimiterBackend {
        self.rate_limiter.unwrap_or(match self.profile {
            Profile::RedisEnabled => RateLimiterBackend::Redis,
            Profile::Baseline => RateLimiterBackend::Local,
        })
    }

    /// The effective spool: the configured one, else by profile (`redis` /
    /// `none`).
    pub fn spool_backend(&self) -> SpoolBackend {
        self.spool.unwrap_or(match self.profile {
            Profile::RedisEnabled => SpoolBackend::Redis,
            Profile::Baseline => SpoolBackend::None,
        })
    }

    /// The retry policy of the delivery worker.
    ///
    /// # Errors
    /// [`Error::Config`] if `retry` is invalid.
    pub fn retry_policy(&self) -> Result<RetryPolicy> {
        self.retry.policy()
    }

    /// Checks the whole configuration and returns the first problem.
    ///
    /// # Errors
    /// [`Error::Config`] whose `field` is the dotted path of the offending
    /// key (`reliability.redis.url`, `reliability.retry.schedule[2]`, ...).
    pub fn validate(&self) -> Result<()> {
        match self.problems().into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Every problem of the configuration, in the order of the keys; empty
    /// when valid. Each is an [`Error::Config`].
    pub fn problems(&self) -> Vec<Error> {
        let mut p = Vec::new();
        self.check_keys_and_backends(&mut p);
        match &self.redis {
            None if self.profile != Profile::Baseline => p.push(config_error(
                "redis",
                "profile redis-enabled needs a redis section (url, sentinel or cluster)",
            )),
            None => {}
            Some(r) => r.check(&mut p),
        }
        self.check_disk(&mut p);
        self.check_memory_and_limits(&mut p);
        self.retry.check(&mut p);
        self.fallback.check(&mut p);
        self.check_spool_wait(&mut p);
        p
    }

    /// A spool enqueue runs its script and then `WAIT`, all under the
    /// fallback deadline: a `WAIT` as long as the deadline would make every
    /// enqueue behind one lagging replica time out, land on both sides and
    /// open the breaker shared with the other components.
    fn check_spool_wait(&self, p: &mut Vec<Error>) {
        let deadline = self.fallback.deadline;
        if let Some(r) = self.redis.as_ref().filter(|r| r.spool_wait_replicas > 0) {
            if r.spool_wait_timeout >= deadline {
                p.push(config_error(
                    "redis.spoolWaitTimeout",
                    format!(
                        "{:?} is not shorter than fallback.deadline {:?}: the WAIT of every \
                         spool enqueue runs within that deadline; lower spoolWaitTimeout (leave \
                         the script time) or raise fallback.deadline",
                        r.spool_wait_timeout, deadline
                    ),
                ));
            }
        }
    }

    fn check_keys_and_backends(&self, p: &mut Vec<Error>) {
        for (field, value) in [
            ("keyPrefix", &self.key_prefix),
            ("namespace", &self.namespace),
        ] {
            if let Err(e) = crate::key::validate_segment(value) {
                let msg = match e {
                    Error::InvalidKey { reason, .. } => format!("{value:?}: {reason}"),
                    other => other.to_string(),
                };
                p.push(config_error(field, msg));
            }
        }
        if self.profile != Profile::Baseline {
            return;
        }
        let needs_redis = |what: &str| {
            config_error(
                what,
                format!("{what} = redis needs profile: redis-enabled (the profile is baseline)"),
            )
        };
        if self.idempotency_backend().is_redis() {
            p.push(needs_redis("idempotencyStore"));
        }
        if self.rate_limiter_backend().is_redis() {
            p.push(needs_redis("rateLimiter"));
        }
        if self.spool_backend().is_redis() {
            p.push(needs_redis("spool"));
        }
    }

    fn check_disk(&self, p: &mut Vec<Error>) {
        if self.spool_backend() == SpoolBackend::Disk && self.disk.is_none() {
            p.push(config_error("disk.dir", "spool: disk needs disk.dir"));
        }
        let Some(d) = &self.disk else { return };
        if d.dir.as_os_str().is_empty() {
            p.push(config_error("disk.dir", "must not be empty"));
        }
        match d.max_bytes {
            Some(0) => p.push(config_error("disk.maxBytes", "must be greater than zero")),
            Some(b) if b < self.spool_limits.max_record_bytes => p.push(config_error(
                "disk.maxBytes",
                format!(
                    "{b} is below spoolLimits.maxRecordBytes {}: a record of that size could never be stored",
                    self.spool_limits.max_record_bytes
                ),
            )),
            _ => {}
        }
        if d.max_records == Some(0) {
            p.push(config_error("disk.maxRecords", "must be greater than zero"));
        }
        if d.fsync == FsyncPolicy::Interval {
            if let Some(why) = duration_problem(d.fsync_interval) {
                p.push(config_error("disk.fsyncInterval", why));
            }
        }
    }

    fn check_memory_and_limits(&self, p: &mut Vec<Error>) {
        let m = &self.memory;
        let l = &self.spool_limits;
        for (field, n) in [
            ("memory.maxEntries", m.max_entries),
            ("memory.maxKeys", m.max_keys),
            ("memory.maxBytes", m.max_bytes),
            ("spoolLimits.maxRecords", l.max_records),
            ("spoolLimits.maxBytes", l.max_bytes),
            ("spoolLimits.maxRecordBytes", l.max_record_bytes),
        ] {
            if n == 0 {
                p.push(config_error(field, "must be greater than zero"));
            }
        }
        if l.max_record_bytes > MAX_RECORD_BYTES {
            p.push(config_error(
                "spoolLimits.maxRecordBytes",
                format!(
                    "{} exceeds {MAX_RECORD_BYTES} (512 MiB)",
                    l.max_record_bytes
                ),
            ));
        } else if l.max_record_bytes > l.max_bytes {
            p.push(config_error(
                "spoolLimits.maxRecordBytes",
                format!("{} exceeds maxBytes {}", l.max_record_bytes, l.max_bytes),
            ));
        }
        if let Some(why) = duration_problem(l.retention) {
            p.push(config_error("spoolLimits.retention", why));
        }
    }
}

/// An [`Error::Config`] for `reliability.{field}`.
fn config_error(field: &str, msg: impl Into<String>) -> Error {
    Error::config(format!("reliability.{field}"), msg)
}

/// What is wrong with a duration setting: zero, or above [`MAX_DURATION`].
fn duration_problem(d: Duration) -> Option<&'static str> {
    if d.is_zero() {
        Some("must be greater than zero")
    } else if d > MAX_DURATION {
        Some("must be at most 36500d")
    } else {
        None
    }
}

impl FallbackConfig {
    fn check(&self, p: &mut Vec<Error>) {
        for (field, d) in [
            ("fallback.deadline", self.deadline),
            ("fallback.probeInterval", self.probe_interval),
        ] {
            if let Some(why) = duration_problem(d) {
                p.push(config_error(field, why));
            }
        }
        if self.failure_threshold == 0 {
            p.push(config_error(
                "fallback.failureThreshold",
                "must be at least 1",
            ));
        }
        if self.success_threshold == 0 {
            p.push(config_error(
                "fallback.successThreshold",
                "must be at least 1",
            ));
        }
        if self.replicas == 0 {
            let why = if self.rate_limit_policy == RateLimitFallback::LocalShare {
                "must be at least 1 with rateLimitPolicy: localShare"
            } else {
                "must be at least 1"
            };
            p.push(config_error("fallback.replicas", why));
        }
    }
}

impl RedisConfig {
    fn check(&self, p: &mut Vec<Error>) {
        let c = |field: &str, msg: &str| Error::config(format!("reliability.redis.{field}"), msg);
        let set: Vec<&str> = [
            ("url", self.url.is_some()),
            ("sentinel", self.sentinel.is_some()),
            ("cluster", self.cluster.is_some()),
        ]
        .into_iter()
        .filter_map(|(n, on)| on.then_some(n))
        .collect();
        match set.as_slice() {
            [] => p.push(Error::config(
                "reliability.redis",
                "set one of url, sentinel, cluster",
            )),
            [_] => {}
            [first, second, ..] => p.push(c(
                second,
                &format!("url, sentinel and cluster are exclusive; {first} is already set"),
            )),
        }
        if let Some(u) = &self.url {
            if u.has_placeholder() {
                p.push(c("url", "holds the redaction placeholder *** as password"));
            }
            if self.tls.is_some() && !u.is_tls() {
                p.push(c("tls", "is set but url uses redis://; use rediss://"));
            }
        }
        if let Some(s) = &self.sentinel {
            if s.master_name.trim().is_empty() {
                p.push(c("sentinel.masterName", "must not be empty"));
            }
            if s.urls.is_empty() {
                p.push(c("sentinel.urls", "must hold at least one sentinel"));
            }
            for (i, u) in s.urls.iter().enumerate() {
                if u.has_placeholder() {
                    p.push(c(
                        &format!("sentinel.urls[{i}]"),
                        "holds the redaction placeholder *** as password",
                    ));
                }
                if u.database().is_some_and(|db| db != 0) {
                    p.push(c(
                        &format!("sentinel.urls[{i}]"),
                        "a sentinel URL's database is not the master's; set reliability.redis.db",
                    ));
                }
            }
        }
        if let Some(cl) = &self.cluster {
            if cl.urls.is_empty() {
                p.push(c("cluster.urls", "must hold at least one node"));
            }
            for (i, u) in cl.urls.iter().enumerate() {
                if u.has_placeholder() {
                    p.push(c(
                        &format!("cluster.urls[{i}]"),
                        "holds the redaction placeholder *** as password",
                    ));
                }
                if u.database().is_some_and(|db| db != 0) {
                    p.push(c(
                        &format!("cluster.urls[{i}]"),
                        "a cluster has only database 0",
                    ));
                }
            }
            if self.db.is_some_and(|db| db != 0) {
                p.push(c("db", "must be 0 for a cluster"));
            }
            if self.spool_wait_replicas > 0 {
                p.push(c(
                    "spoolWaitReplicas",
                    "must be 0 for a cluster (WAIT is not offered there)",
                ));
            }
        }
        if let Err(e) = self.database() {
            p.push(e);
        }
        if self.username.as_deref() == Some("") {
            p.push(c("username", "must not be empty"));
        }
        if self.password.as_ref().is_some_and(Secret::is_placeholder) {
            p.push(c(
                "password",
                "is the redaction placeholder ***; set the real password",
            ));
        }
        if let Some(t) = &self.tls {
            match (&t.cert_file, &t.key_file) {
                (Some(_), None) => p.push(c("tls.keyFile", "certFile needs keyFile")),
                (None, Some(_)) => p.push(c("tls.certFile", "keyFile needs certFile")),
                _ => {}
            }
        }
        for (field, d) in [
            ("connectTimeout", self.connect_timeout),
            ("responseTimeout", self.response_timeout),
            ("poolTimeout", self.pool_timeout),
            ("spoolWaitTimeout", self.spool_wait_timeout),
        ] {
            if let Some(why) = duration_problem(d) {
                p.push(c(field, why));
            }
        }
        if self.pool_size == 0 {
            p.push(c("poolSize", "must be at least 1"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip() {
        for s in [
            "250ms",
            "1m",
            "7d",
            "1h30m",
            "1s500ms",
            "0s",
            "3us",
            "1d1h1m1s1ms1us1ns",
        ] {
            let d = duration::parse(s).unwrap();
            assert_eq!(duration::format(d), s);
        }
        assert_eq!(
            duration::parse("1h 30m").unwrap(),
            Duration::from_secs(5400)
        );
        assert_eq!(duration::parse("5µs").unwrap(), Duration::from_micros(5));
        for bad in [
            "",
            "250",
            "1.5s",
            "5x",
            "ms",
            "h1",
            "99999999999999999999999999999999999999999d",
        ] {
            assert!(duration::parse(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn urls_are_checked_and_redacted() {
        for ok in [
            "redis://localhost",
            "redis://127.0.0.1:6379/0",
            "rediss://u:p@h:6380",
            "redis://:p@h",
            "redis://[::1]:6379",
            "redis://h/3?protocol=resp3",
            "redis://u:p/a?s#s@h:1/2",
        ] {
            assert!(RedisUrl::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://h",
            "redis://",
            "redis://h:port",
            "redis://h:0",
            "redis://h/x",
            "redis://[::1",
            "REDIS://h",
        ] {
            assert!(RedisUrl::new(bad).is_err(), "{bad}");
        }
        let u = RedisUrl::new("redis://u:s3cr3t@h").unwrap();
        assert_eq!(u.to_string(), "redis://u:***@h");
        assert!(!format!("{u:?}").contains("s3cr3t"));
        assert!(RedisUrl::new("redis://u:***@h").unwrap().has_placeholder());
    }

    #[test]
    fn baseline_is_valid_and_defaults_follow_profile() {
        let b = ReliabilityConfig::baseline();
        assert_eq!(b.validate().ok(), Some(()));
        assert_eq!(b.idempotency_backend(), IdempotencyBackend::Memory);
        assert_eq!(b.rate_limiter_backend(), RateLimiterBackend::Local);
        assert_eq!(b.spool_backend(), SpoolBackend::None);
        let r = ReliabilityConfig::redis_enabled(RedisConfig::standalone(
            RedisUrl::new("redis://h").unwrap(),
        ));
        assert!(r.validate().is_ok());
        assert_eq!(r.spool_backend(), SpoolBackend::Redis);
    }

    #[test]
    fn local_quota_follows_policy() {
        let q = Quota::per_second(30).unwrap();
        let mut f = FallbackConfig {
            replicas: 3,
            ..FallbackConfig::default()
        };
        assert_eq!(f.local_quota(q), Some(q.share(3)));
        f.rate_limit_policy = RateLimitFallback::LocalFull;
        assert_eq!(f.local_quota(q), Some(q));
        f.rate_limit_policy = RateLimitFallback::FailOpen;
        assert_eq!(f.local_quota(q), None);
    }
}
