//! The health status model and the hub that publishes it.
//!
//! A [`HealthStatus`] says which backend answers each primitive now, whether
//! Redis is available, the breaker's state, the spool's depth, and one
//! [`Overall`] verdict. Serialized (serde, camelCase) inside
//! [`HealthStatus::document`] it reads like this:
//!
//! ```yaml
//! status:
//!   reliability:
//!     profile: redis-enabled
//!     overall: degraded
//!     redis: { available: false, degraded: true, fallback: baseline }
//!     local: { available: true }
//!     components: { idempotencyStore: memory, rateLimiter: local, spool: disk }
//!     fallbackFrom: { idempotencyStore: redis, rateLimiter: redis, spool: redis }
//!     breaker: { state: open, since: 2025-01-01T00:00:00.000Z, lastError: "..." }
//!     pendingReconcile: 0
//!     spool: { depth: 0, ready: 0, delayed: 0, leased: 0, dead: 0, alert: false }
//! ```
//!
//! Rules: [`Overall::Degraded`] is still ready (a Redis outage costs shared
//! state, not service); [`Overall::Unhealthy`] only when the local side fails
//! too; liveness never depends on Redis ([`HealthStatus::is_live`]).
//!
//! Hosts watch the status through a [`StatusHub`]:
//!
//! ```
//! use reliability_core::config::ReliabilityConfig;
//! use reliability_core::status::{BreakerState, HealthStatus, Overall, StatusHub};
//!
//! let hub = StatusHub::new(HealthStatus::from_config(&ReliabilityConfig::baseline()));
//! let mut rx = hub.subscribe();
//! assert_eq!(hub.current().overall, Overall::Healthy);
//! assert!(!hub.update(|_| {}));                      // no change: nobody woken
//! assert!(hub.update(|s| s.local.available = false)); // the local side fails
//! assert!(rx.has_changed().unwrap());
//! assert_eq!(rx.borrow_and_update().overall, Overall::Unhealthy);
//! # let _ = BreakerState::Closed;
//! ```
//!
//! Error texts shown in status go through [`redact`] (the [`Redacted`] type
//! does it on construction), so no password reaches a dashboard.

use std::fmt;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::clock::Timestamp;
use crate::config::{
    IdempotencyBackend, Profile, RateLimiterBackend, ReliabilityConfig, SpoolBackend, REDACTED,
};
use crate::spool::SpoolStats;

// ---------------------------------------------------------------------------
// Redaction
// ---------------------------------------------------------------------------

/// Keys whose values [`redact`] hides in `key=value` / `key: value` text.
const SECRET_KEYS: [&str; 6] = [
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "requirepass",
];

/// Removes credentials from free text (an error message, a URL): the
/// password of every `scheme://user:password@host` (a lone `user@` is
/// hidden too, as some clients read it as a password) and the value of
/// every `password=`, `passwd=`, `pwd=`, `secret=`, `token=`,
/// `requirepass=` (also with `:`), case-insensitively.
///
/// A URL in free text ends at the first whitespace or control character,
/// and its credentials at the last `@` before that, so a password may hold
/// any other character, `@ / ? # ; , ( ) ' "` included ([`RedisUrl`]
/// refuses whitespace and control characters in a URL: they must be
/// percent-encoded). An unquoted `key=value` value ends at whitespace, a
/// control character or `&` (and before a `)` that closes a parenthesis
/// opened before the key); a quoted one at its closing quote (a quote
/// escaped with `\` does not close it). Redaction errs on the side of
/// hiding: text glued to a secret without a space is hidden with it.
///
/// [`RedisUrl`]: crate::config::RedisUrl
///
/// ```
/// use reliability_core::status::redact;
///
/// assert_eq!(
///     redact("connect redis://app:hunter2@10.0.0.5:6379 failed"),
///     "connect redis://app:***@10.0.0.5:6379 failed"
/// );
/// assert_eq!(redact("redis://app:p;ss@h:6379/0"), "redis://app:***@h:6379/0");
/// assert_eq!(redact("auth password=hunter2&db=0"), "auth password=***&db=0");
/// assert_eq!(redact("redis://10.0.0.5"), "redis://10.0.0.5");
/// ```
pub fn redact(text: &str) -> String {
    // One pass can make a new credential-like shape (a `password=` inside
    // a URL's user name takes the URL's `@host` with its value); passes
    // repeat until the text no longer changes, so redacting is idempotent
    // (a status read back keeps its errors as they were written).
    let mut out = redact_once(text);
    for _ in 0..MAX_PASSES {
        let next = redact_once(&out);
        if next == out {
            break;
        }
        out = next;
    }
    out
}

/// Passes after the first [`redact`] makes at most.
const MAX_PASSES: usize = 8;

fn redact_once(text: &str) -> String {
    redact_key_values(&redact_userinfo(text))
}

/// Where a URL or an unquoted value ends in free text.
fn is_text_break(c: char) -> bool {
    c.is_whitespace() || c.is_control()
}

fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let start = i + 3;
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        let token_end = after.find(is_text_break).unwrap_or(after.len());
        let token = &after[..token_end];
        // The credentials end at the last '@' of the token: a password may
        // hold '@', '/', '?', '#' and every delimiter but whitespace.
        match token.rfind('@') {
            // `scheme://@host`: no credentials to hide.
            Some(0) => out.push_str(token),
            Some(at) => {
                let userinfo = &token[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..=colon]);
                        out.push_str(REDACTED);
                    }
                    None => out.push_str(REDACTED),
                }
                out.push_str(&token[at..]);
            }
            None => out.push_str(token),
        }
        rest = &after[token_end..];
    }
    out.push_str(rest);
    out
}

/// The end of the quoted value opened by `quote` in `text` at `open`: the
/// index of the closing quote (one escaped by a backslash does not count), or
/// `text.len()`.
fn closing_quote(text: &str, open: usize, quote: u8) -> usize {
    let bytes = text.as_bytes();
    let mut k = open + 1;
    while k < bytes.len() {
        match bytes[k] {
            b'\\' => k += 2,
            b if b == quote => return k,
            _ => k += 1,
        }
    }
    bytes.len()
}

/// The byte index of a secret key's value in `lower` at `i`, if `key`
/// stands there followed by `=` or `:` (spaces allowed around them).
fn value_start(lower: &[u8], i: usize, key: &str) -> Option<usize> {
    if !lower.get(i..)?.starts_with(key.as_bytes()) {
        return None;
    }
    let skip_spaces = |mut j: usize| {
        while lower.get(j) == Some(&b' ') {
            j += 1;
        }
        j
    };
    let j = skip_spaces(i + key.len());
    matches!(lower.get(j), Some(b'=' | b':')).then(|| skip_spaces(j + 1))
}

/// The end of the unquoted value at `j`: the first whitespace, control
/// character or `&`, less one `)` that closes a `(` left open before the
/// key (`open_before`; `(password=x)`): never a character of the value
/// itself when the text's parentheses balance.
fn value_end(text: &str, j: usize, open_before: bool) -> usize {
    let end = text[j..]
        .find(|c: char| is_text_break(c) || c == '&')
        .map_or(text.len(), |k| j + k);
    let value = &text[j..end];
    let unbalanced = value.matches(')').count() > value.matches('(').count();
    if open_before && unbalanced && value.ends_with(')') {
        end - 1
    } else {
        end
    }
}

fn redact_key_values(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let lower = lower.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    // Parentheses opened and not closed before `scanned`, counted as `i`
    // moves (once per byte).
    let (mut scanned, mut depth) = (0, 0_i64);
    while i < lower.len() {
        let Some((key, j)) = SECRET_KEYS
            .iter()
            .find_map(|k| value_start(lower, i, k).map(|j| (k, j)))
        else {
            i += 1;
            continue;
        };
        if let Some(&q @ (b'"' | b'\'')) = lower.get(j) {
            // Keep the quotes, hide what is between them.
            let close = closing_quote(text, j, q);
            out.push_str(&text[copied..=j]);
            out.push_str(REDACTED);
            copied = close;
            i = close.max(j + 1);
            continue;
        }
        for b in &lower[scanned..i] {
            match b {
                b'(' => depth += 1,
                b')' => depth -= 1,
                _ => {}
            }
        }
        scanned = i;
        let end = value_end(text, j, depth > 0);
        if end > j {
            out.push_str(&text[copied..j]);
            out.push_str(REDACTED);
            copied = end;
        }
        i = end.max(i + key.len());
    }
    out.push_str(&text[copied..]);
    out
}

/// A string that went through [`redact`] when it was built: the only way
/// to put error text into a [`HealthStatus`].
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub struct Redacted(String);

impl Redacted {
    /// Redacts `text`.
    pub fn new(text: impl AsRef<str>) -> Self {
        Redacted(redact(text.as_ref()))
    }

    /// The redacted text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for Redacted {
    fn from(s: String) -> Self {
        Redacted::new(s)
    }
}

impl From<&str> for Redacted {
    fn from(s: &str) -> Self {
        Redacted::new(s)
    }
}

impl From<Redacted> for String {
    fn from(r: Redacted) -> String {
        r.0
    }
}

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// ---------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------

/// The one-glance verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub enum Overall {
    /// Every component answers from its configured backend.
    Healthy,
    /// Some component answers from its fallback (or the breaker is not
    /// closed): shared state is reduced, service is not. Still ready.
    Degraded,
    /// The local side fails too: calls fail. Not ready (still live).
    Unhealthy,
}

/// The state of the breaker in front of Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub enum BreakerState {
    /// Calls go to Redis.
    Closed,
    /// Calls go straight to the local side; a background probe watches Redis.
    Open,
    /// Probes succeed; the breaker closes after enough of them.
    HalfOpen,
    /// Forced local by the operator.
    Isolated,
}

/// What replaces Redis while it is unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub enum RedisFallback {
    /// Nothing is replaced: Redis answers, or is not used.
    #[default]
    None,
    /// The baseline backends answer (`fallback: baseline`).
    Baseline,
}

/// Redis as the reliability layer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct RedisStatus {
    /// Redis answers (`false` under profile `baseline`).
    pub available: bool,
    /// Shared features are off because Redis is down or isolated.
    pub degraded: bool,
    /// What answers instead.
    pub fallback: RedisFallback,
    /// A misconfiguration found on a Redis that is up (a refused password
    /// or ACL, an evicting `maxmemory-policy`, refused or accepted),
    /// redacted: an operator must act, waiting will not help. Shown only
    /// when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<Redacted>,
}

/// The local (baseline) side: memory, local limiter, disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct LocalStatus {
    /// The local backends answer. When `false` the status is unhealthy.
    pub available: bool,
    /// Their last error, redacted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<Redacted>,
}

impl Default for LocalStatus {
    fn default() -> Self {
        Self {
            available: true,
            last_error: None,
        }
    }
}

/// One primitive: the backend configured and the backend answering now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct ComponentStatus<B> {
    /// The backend the configuration asks for.
    pub configured: B,
    /// The backend answering now.
    pub active: B,
}

impl<B: Copy + PartialEq> ComponentStatus<B> {
    /// A component answering from its configured backend.
    pub fn new(configured: B) -> Self {
        Self {
            configured,
            active: configured,
        }
    }

    /// The configured backend when another one answers now.
    pub fn fallback_from(&self) -> Option<B> {
        (self.active != self.configured).then_some(self.configured)
    }

    /// `true` when another backend than the configured one answers.
    pub fn is_fallback(&self) -> bool {
        self.active != self.configured
    }
}

/// The three primitives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Components {
    /// The idempotency store.
    pub idempotency_store: ComponentStatus<IdempotencyBackend>,
    /// The rate limiter.
    pub rate_limiter: ComponentStatus<RateLimiterBackend>,
    /// The spool.
    pub spool: ComponentStatus<SpoolBackend>,
}

impl Components {
    /// Every component on its configured backend.
    pub fn new(
        idempotency_store: IdempotencyBackend,
        rate_limiter: RateLimiterBackend,
        spool: SpoolBackend,
    ) -> Self {
        Self {
            idempotency_store: ComponentStatus::new(idempotency_store),
            rate_limiter: ComponentStatus::new(rate_limiter),
            spool: ComponentStatus::new(spool),
        }
    }

    /// `true` when any component answers from a fallback.
    pub fn any_fallback(&self) -> bool {
        self.idempotency_store.is_fallback()
            || self.rate_limiter.is_fallback()
            || self.spool.is_fallback()
    }
}

/// The breaker in front of Redis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct BreakerStatus {
    /// Its state.
    pub state: BreakerState,
    /// When it entered that state (RFC 3339, UTC, milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rfc3339")]
    pub since: Option<Timestamp>,
    /// The last unavailable error, redacted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<Redacted>,
    /// When the primary was last found to have lost data (restarted empty,
    /// or replaced by a failover), RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rfc3339")]
    pub data_lost_at: Option<Timestamp>,
    /// Why it is thought to have lost data then (`restarted`, `failover`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_loss: Option<String>,
    /// How many times the primary was found to have lost data.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub data_losses: u64,
}

impl BreakerStatus {
    /// A closed breaker with no history.
    pub fn closed() -> Self {
        Self {
            state: BreakerState::Closed,
            since: None,
            last_error: None,
            data_lost_at: None,
            data_loss: None,
            data_losses: 0,
        }
    }

    /// A breaker in `state` since `since`.
    pub fn new(state: BreakerState, since: Timestamp) -> Self {
        Self {
            since: Some(since),
            ..Self::closed().with_state(state)
        }
    }

    fn with_state(mut self, state: BreakerState) -> Self {
        self.state = state;
        self
    }

    /// The same, with the primary's last data loss: when, why, how many so far.
    pub fn with_data_loss(mut self, at: Timestamp, cause: impl Into<String>, count: u64) -> Self {
        self.data_lost_at = Some(at);
        self.data_loss = Some(cause.into());
        self.data_losses = count;
        self
    }

    /// The same, with `error` (redacted) as the last error.
    pub fn with_last_error(mut self, error: impl AsRef<str>) -> Self {
        self.last_error = Some(Redacted::new(error));
        self
    }
}

/// The spool's depth and whether it needs attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct SpoolHealth {
    /// Live records: ready + delayed + leased.
    pub depth: u64,
    /// Due and not leased.
    pub ready: u64,
    /// Waiting for their time (delay or retry).
    pub delayed: u64,
    /// Being delivered.
    pub leased: u64,
    /// In the dead-letter queue.
    pub dead: u64,
    /// Corrupt items the spool found and moved to its quarantine since it
    /// was opened (durable backends); shown only when there are some.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub quarantined: u64,
    /// `depth` is above `spoolLimits.alertDepth`, or records are dead (they
    /// are never delivered without an operator), or corrupt data was
    /// quarantined (an operator should look at it: `examples/spool_fsck.rs`).
    pub alert: bool,
}

#[allow(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if signature"
)]
fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl SpoolHealth {
    /// Health of a spool with `stats`, alerting above `alert_depth`.
    pub fn from_stats(stats: &SpoolStats, alert_depth: u64) -> Self {
        let depth = stats.depth();
        Self {
            depth,
            ready: stats.ready,
            delayed: stats.delayed,
            leased: stats.leased,
            dead: stats.dead,
            quarantined: stats.quarantined_total,
            alert: depth > alert_depth || stats.dead > 0 || stats.quarantined_total > 0,
        }
    }
}

/// The reliability layer's health (`status.reliability` in the document).
///
/// Serialized camelCase with `components` holding the backend answering now
/// and `fallbackFrom` the configured one for each component in fallback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "wire::Status", from = "wire::Status")]
#[non_exhaustive]
pub struct HealthStatus {
    /// The configured profile.
    pub profile: Profile,
    /// The verdict; [`StatusHub::update`] keeps it equal to
    /// [`evaluate`](Self::evaluate).
    pub overall: Overall,
    /// Redis.
    pub redis: RedisStatus,
    /// The local side.
    pub local: LocalStatus,
    /// Which backend answers each primitive.
    pub components: Components,
    /// The breaker in front of Redis; `None` without Redis.
    pub breaker: Option<BreakerStatus>,
    /// Entries written locally during an outage and not yet replayed to Redis.
    pub pending_reconcile: u64,
    /// The spool; `None` with `spool: none`.
    pub spool: Option<SpoolHealth>,
    /// What the fallbacks in front of Redis keep locally; `None` without
    /// Redis.
    pub fallback: Option<FallbackHealth>,
}

/// What the fallbacks in front of Redis keep locally, within their bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct FallbackHealth {
    /// The journal of claims answered locally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal: Option<crate::fallback::JournalUsage>,
    /// The record of claims completed through Redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed: Option<crate::fallback::JournalUsage>,
    /// Spool records a timed-out Redis call may have left on both sides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub double_enqueues: Option<crate::fallback::DoubleEnqueues>,
}

impl HealthStatus {
    /// The status right after start: every component on its configured
    /// backend, Redis not yet seen available, breaker closed (with Redis),
    /// an empty spool.
    pub fn from_config(config: &ReliabilityConfig) -> Self {
        let redis = config.profile == Profile::RedisEnabled;
        let spool = config.spool_backend();
        let mut s = Self {
            profile: config.profile,
            overall: Overall::Healthy,
            redis: RedisStatus::default(),
            local: LocalStatus::default(),
            components: Components::new(
                config.idempotency_backend(),
                config.rate_limiter_backend(),
                spool,
            ),
            breaker: redis.then(BreakerStatus::closed),
            pending_reconcile: 0,
            spool: (spool != SpoolBackend::None).then(SpoolHealth::default),
            fallback: None,
        };
        s.overall = s.evaluate();
        s
    }

    /// The verdict the parts imply: [`Overall::Unhealthy`] when the local
    /// side is unavailable; else [`Overall::Degraded`] when Redis is
    /// degraded, a component answers from a fallback or the breaker is not
    /// closed; else [`Overall::Healthy`]. A spool alert does not change it
    /// (it reports the destination, not this layer): see
    /// [`SpoolHealth::alert`].
    pub fn evaluate(&self) -> Overall {
        if !self.local.available {
            Overall::Unhealthy
        } else if self.redis.degraded
            || self.components.any_fallback()
            || self
                .breaker
                .as_ref()
                .is_some_and(|b| b.state != BreakerState::Closed)
        {
            Overall::Degraded
        } else {
            Overall::Healthy
        }
    }

    /// Readiness: `true` unless [`Overall::Unhealthy`]. Degraded is ready.
    pub fn is_ready(&self) -> bool {
        self.overall != Overall::Unhealthy
    }

    /// Liveness: always `true`. Nothing this layer observes (a Redis outage,
    /// a full disk) is cured by restarting the process, so it never fails
    /// liveness; a host that knows its process is broken says so itself.
    pub fn is_live(&self) -> bool {
        true
    }

    /// Wraps the status as a document: `status: { reliability: .. }`.
    pub fn document(&self) -> StatusDocument<'_> {
        StatusDocument {
            status: StatusSection { reliability: self },
        }
    }
}

/// `status: { reliability: <HealthStatus> }`, for serialization.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StatusDocument<'a> {
    /// The `status` map.
    pub status: StatusSection<'a>,
}

/// The `status` map of a [`StatusDocument`].
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StatusSection<'a> {
    /// The reliability layer's health.
    pub reliability: &'a HealthStatus,
}

mod wire {
    //! The serialized shape of [`HealthStatus`](super::HealthStatus).

    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub(super) struct Status {
        profile: Profile,
        overall: Overall,
        redis: RedisStatus,
        #[serde(default)]
        local: LocalStatus,
        components: Active,
        #[serde(default, skip_serializing_if = "FallbackFrom::is_empty")]
        fallback_from: FallbackFrom,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        breaker: Option<BreakerStatus>,
        #[serde(default)]
        pending_reconcile: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        spool: Option<SpoolHealth>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fallback: Option<FallbackHealth>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Active {
        idempotency_store: IdempotencyBackend,
        rate_limiter: RateLimiterBackend,
        spool: SpoolBackend,
    }

    #[derive(Default, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct FallbackFrom {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_store: Option<IdempotencyBackend>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rate_limiter: Option<RateLimiterBackend>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        spool: Option<SpoolBackend>,
    }

    impl FallbackFrom {
        fn is_empty(&self) -> bool {
            self.idempotency_store.is_none() && self.rate_limiter.is_none() && self.spool.is_none()
        }
    }

    impl From<HealthStatus> for Status {
        fn from(s: HealthStatus) -> Self {
            let c = s.components;
            Status {
                profile: s.profile,
                overall: s.overall,
                redis: s.redis,
                local: s.local,
                components: Active {
                    idempotency_store: c.idempotency_store.active,
                    rate_limiter: c.rate_limiter.active,
                    spool: c.spool.active,
                },
                fallback_from: FallbackFrom {
                    idempotency_store: c.idempotency_store.fallback_from(),
                    rate_limiter: c.rate_limiter.fallback_from(),
                    spool: c.spool.fallback_from(),
                },
                breaker: s.breaker,
                pending_reconcile: s.pending_reconcile,
                spool: s.spool,
                fallback: s.fallback,
            }
        }
    }

    impl From<Status> for HealthStatus {
        fn from(w: Status) -> Self {
            let a = w.components;
            let f = w.fallback_from;
            HealthStatus {
                profile: w.profile,
                overall: w.overall,
                redis: w.redis,
                local: w.local,
                components: Components {
                    idempotency_store: ComponentStatus {
                        configured: f.idempotency_store.unwrap_or(a.idempotency_store),
                        active: a.idempotency_store,
                    },
                    rate_limiter: ComponentStatus {
                        configured: f.rate_limiter.unwrap_or(a.rate_limiter),
                        active: a.rate_limiter,
                    },
                    spool: ComponentStatus {
                        configured: f.spool.unwrap_or(a.spool),
                        active: a.spool,
                    },
                },
                breaker: w.breaker,
                pending_reconcile: w.pending_reconcile,
                spool: w.spool,
                fallback: w.fallback,
            }
        }
    }
}

mod rfc3339 {
    //! `Option<Timestamp>` as an RFC 3339 UTC string with milliseconds,
    //! e.g. `2025-01-01T00:00:00.000Z`.

    use serde::{Deserialize, Deserializer, Serializer};

    use crate::clock::Timestamp;

    const MICROS_PER_DAY: u64 = 86_400_000_000;
    /// Above any year a `u64` of microseconds since 1970 reaches (586,912),
    /// below any that overflows the day count.
    const MAX_YEAR: i64 = 1_000_000;

    pub(super) fn serialize<S: Serializer>(t: &Option<Timestamp>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&format(*t)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Timestamp>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| {
                parse(&s).ok_or_else(|| {
                    serde::de::Error::custom(format!("invalid RFC 3339 UTC time {s:?}"))
                })
            })
            .transpose()
    }

    pub(super) fn format(t: Timestamp) -> String {
        let us = t.as_micros();
        let days = us / MICROS_PER_DAY;
        let rem = us % MICROS_PER_DAY;
        let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(i64::MAX));
        let secs = rem / 1_000_000;
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
            secs / 3600,
            secs / 60 % 60,
            secs % 60,
            rem % 1_000_000 / 1000
        )
    }

    /// Reads `YYYY-MM-DDTHH:MM:SS[.fraction]Z`, to the millisecond.
    pub(super) fn parse(s: &str) -> Option<Timestamp> {
        let s = s.strip_suffix('Z').or_else(|| s.strip_suffix('z'))?;
        let (date, time) = s.split_once(['T', 't'])?;
        let mut dp = date.splitn(3, '-');
        let y: i64 = dp.next()?.parse().ok()?;
        let m: u32 = dp.next()?.parse().ok()?;
        let d: u32 = dp.next()?.parse().ok()?;
        let (hms, frac) = match time.split_once('.') {
            Some((a, b)) => (a, b),
            None => (time, ""),
        };
        let mut tp = hms.splitn(3, ':');
        let hh: u64 = tp.next()?.parse().ok()?;
        let mm: u64 = tp.next()?.parse().ok()?;
        let ss: u64 = tp.next()?.parse().ok()?;
        if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
            return None;
        }
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // Milliseconds, the precision `format` writes: a finer fraction is
        // dropped, so what is read writes back as it reads.
        let millis = frac
            .bytes()
            .chain(std::iter::repeat(b'0'))
            .take(3)
            .fold(0, |ms, b| ms * 10 + u64::from(b - b'0'));
        let micros = millis * 1000;
        // A year a timestamp cannot hold is refused, never wrapped: the
        // arithmetic below is checked from the year on.
        if !(0..=MAX_YEAR).contains(&y) || d > days_in_month(y, m) {
            return None;
        }
        let days = u64::try_from(days_from_civil(y, m, d)).ok()?;
        let micros = days
            .checked_mul(MICROS_PER_DAY)?
            .checked_add((hh * 3600 + mm * 60 + ss) * 1_000_000 + micros)?;
        Some(Timestamp::from_micros(micros))
    }

    fn days_in_month(y: i64, m: u32) -> u32 {
        match m {
            4 | 6 | 9 | 11 => 30,
            2 if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) => 29,
            2 => 28,
            _ => 31,
        }
    }

    // Howard Hinnant's algorithms (proleptic Gregorian calendar).
    fn civil_from_days(z: i64) -> (i64, u32, u32) {
        let z = z + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let y = yoe + era * 400 + i64::from(m <= 2);
        (y, m, d)
    }

    fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
        let y = y - i64::from(m <= 2);
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let m = i64::from(m);
        let mp = if m > 2 { m - 3 } else { m + 9 };
        let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn round_trips() {
            let t = Timestamp::from_micros(1_735_689_600_000_000);
            assert_eq!(format(t), "2025-01-01T00:00:00.000Z");
            assert_eq!(parse("2025-01-01T00:00:00.000Z"), Some(t));
            let t2 = Timestamp::from_micros(951_827_696_789_000); // leap day 2000
            assert_eq!(format(t2), "2000-02-29T12:34:56.789Z");
            assert_eq!(parse(&format(t2)), Some(t2));
            assert_eq!(format(Timestamp::ZERO), "1970-01-01T00:00:00.000Z");
            assert_eq!(parse("2025-13-01T00:00:00Z"), None);
            assert_eq!(parse("2025-02-29T00:00:00Z"), None);
            assert!(parse("2024-02-29T00:00:00Z").is_some());
            assert_eq!(parse("99999999999-01-01T00:00:00Z"), None);
        }
    }
}

// ---------------------------------------------------------------------------
// Hub
// ---------------------------------------------------------------------------

/// Publishes the current [`HealthStatus`] to any number of watchers. Clones
/// share one status.
#[derive(Debug, Clone)]
pub struct StatusHub {
    tx: watch::Sender<HealthStatus>,
}

impl StatusHub {
    /// A hub holding `initial` (with `overall` recomputed).
    pub fn new(mut initial: HealthStatus) -> Self {
        initial.overall = initial.evaluate();
        let (tx, _rx) = watch::channel(initial);
        Self { tx }
    }

    /// A receiver that sees the current status and is woken on each change.
    pub fn subscribe(&self) -> watch::Receiver<HealthStatus> {
        self.tx.subscribe()
    }

    /// A copy of the current status.
    pub fn current(&self) -> HealthStatus {
        self.tx.borrow().clone()
    }

    /// Changes the status with `f`, recomputes `overall`, and wakes the
    /// watchers only if the result differs from before. Returns whether it
    /// changed.
    pub fn update(&self, f: impl FnOnce(&mut HealthStatus)) -> bool {
        self.tx.send_if_modified(|s| {
            let before = s.clone();
            f(s);
            s.overall = s.evaluate();
            *s != before
        })
    }

    /// Replaces the status (with `overall` recomputed); wakes the watchers
    /// only if it differs. Returns whether it changed.
    pub fn set(&self, status: HealthStatus) -> bool {
        self.update(|s| *s = status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_urls_and_key_values() {
        let cases = [
            ("redis://u:p@h:1/0", "redis://u:***@h:1/0"),
            ("rediss://:p@h", "rediss://:***@h"),
            ("redis://token@h", "redis://***@h"),
            ("redis://@h", "redis://@h"),
            ("x redis://u:p@ss@h y", "x redis://u:***@h y"),
            (
                "a redis://h b redis://u:q@h2",
                "a redis://h b redis://u:***@h2",
            ),
            ("PASSWORD = abc def", "PASSWORD = *** def"),
            ("password: \"a b\" x", "password: \"***\" x"),
            ("?password=abc&db=1", "?password=***&db=1"),
            ("token=t1, secret=s2", "token=*** secret=***"),
            ("redis://app:p;ss@h:6379/0", "redis://app:***@h:6379/0"),
            ("password=p;ss,x y", "password=*** y"),
            ("password: \"a\\\"b\" x", "password: \"***\" x"),
            ("no secrets here", "no secrets here"),
            ("password", "password"),
            ("password=", "password="),
            ("ünïcödé password=x ü", "ünïcödé password=*** ü"),
        ];
        for (input, want) in cases {
            assert_eq!(redact(input), want, "{input}");
        }
        // Idempotent.
        for (input, _) in cases {
            assert_eq!(redact(&redact(input)), redact(input));
        }
    }

    #[test]
    fn overall_follows_parts() {
        let mut s = HealthStatus::from_config(&ReliabilityConfig::baseline());
        assert_eq!(s.evaluate(), Overall::Healthy);
        s.components.spool.active = SpoolBackend::Memory;
        assert_eq!(s.evaluate(), Overall::Degraded);
        assert!(s.is_live());
        s.local.available = false;
        assert_eq!(s.evaluate(), Overall::Unhealthy);
    }
}
