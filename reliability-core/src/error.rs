//! The one error type of the reliability crates.
//!
//! Every variant answers one question for the [`Fallback`](crate) combinator and
//! for callers: may another backend answer this call instead? That is
//! [`Error::is_unavailable`]. Caller and data errors (a bad key, a record too
//! large, a lost lease, a key holding the wrong type) are never masked by a
//! fallback: the secondary would give the same answer, or a wrong one.

use std::time::Duration;

/// A boxed error source, kept for context in [`Error`] variants.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Shorthand for `Result<T, reliability_core::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a backend is unavailable; the fallback may take over for all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum UnavailableReason {
    /// Connection refused, reset or closed.
    Connection,
    /// The call did not finish within its deadline.
    Timeout,
    /// No pooled connection could be had in time.
    PoolExhausted,
    /// The server is a replica (`READONLY`), e.g. during a Sentinel failover.
    ReadOnly,
    /// Sentinel reports the master down (`MASTERDOWN`).
    MasterDown,
    /// The server is loading its dataset (`LOADING`).
    Loading,
    /// The cluster cannot serve the slot (`CLUSTERDOWN`, `TRYAGAIN`).
    ClusterDown,
    /// The server is out of memory and refuses writes (Redis `OOM` under
    /// `maxmemory` with `noeviction`).
    OutOfMemory,
    /// The server is busy with a long script and answers nothing else
    /// (Redis `BUSY`).
    Busy,
    /// The server answers but its configuration makes it unsafe to use
    /// (e.g. a Redis `maxmemory-policy` that evicts keys): not an outage,
    /// an operator must act. Status shows the cause as an alert.
    Misconfigured,
    /// The local store cannot take writes now (I/O error, disk full).
    Io,
    /// The backend was closed by its owner.
    Closed,
    /// Any other transient condition the backend reports.
    Other,
}

/// The error every reliability operation returns.
///
/// Answers such as a denied rate-limit check, a duplicate claim or a lost
/// lease race are `Ok` values of the operations, except [`Error::LeaseLost`]
/// and [`Error::Full`], which the contract makes typed errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backend cannot answer now; another backend may. See
    /// [`UnavailableReason`].
    #[error("{backend} unavailable ({reason:?}): {message}")]
    Unavailable {
        /// The backend that failed, e.g. `"redis"`.
        backend: &'static str,
        /// The class of failure.
        reason: UnavailableReason,
        /// What happened, with secrets already removed.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// The call did not finish within `after`.
    #[error("{backend} call timed out after {after:?}")]
    Timeout {
        /// The backend that was called.
        backend: &'static str,
        /// The deadline that passed.
        after: Duration,
    },
    /// A key, namespace or record id is malformed (empty, bad characters).
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The offending key, truncated to 64 bytes.
        key: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A key, payload or result is larger than its documented limit.
    #[error("{what} too large: {size} bytes, limit {limit}")]
    TooLarge {
        /// What was too large (`"key"`, `"payload"`, `"result"`, `"batch"`).
        what: &'static str,
        /// Its size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// An argument is out of range (zero lease, zero burst, ...).
    #[error("invalid argument {name}: {reason}")]
    InvalidArgument {
        /// The argument's name.
        name: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// The lease or spool token is stale: another owner holds the entry now,
    /// or the entry is gone. Nothing was changed.
    #[error("lease lost: {key}")]
    LeaseLost {
        /// The key or record id whose lease was lost.
        key: String,
    },
    /// The spool is at a configured limit; nothing of the batch was stored.
    #[error("spool full: {limit} limit {max} reached")]
    Full {
        /// Which limit: `"records"` or `"bytes"`.
        limit: &'static str,
        /// The configured maximum.
        max: u64,
    },
    /// A backend key holds data of another type or shape (e.g. a Redis key
    /// written by another program). A caller/data error, never masked.
    #[error("{backend}: key {key} holds data of the wrong type")]
    WrongType {
        /// The backend that found it.
        backend: &'static str,
        /// The key.
        key: String,
    },
    /// Stored data failed validation (checksum, decoding).
    #[error("{backend}: corrupt data: {message}")]
    Corrupt {
        /// The backend that found it.
        backend: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Invalid configuration; `field` is the dotted path of the bad field.
    #[error("invalid configuration: {field}: {message}")]
    Config {
        /// Dotted path of the offending field, e.g. `reliability.redis.url`.
        field: String,
        /// Why it was refused.
        message: String,
    },
    /// The configuration asks for a backend whose cargo feature is off.
    #[error("{field} = {backend} needs the cargo feature `{feature}` of crate `reliability`")]
    FeatureDisabled {
        /// The configuration field that asked for it.
        field: String,
        /// The backend asked for.
        backend: String,
        /// The cargo feature that provides it.
        feature: &'static str,
    },
    /// A permanent backend error that is neither of the above (e.g. a script
    /// error, a refused command, a failed AUTH).
    #[error("{backend}: {message}")]
    Backend {
        /// The backend that failed.
        backend: &'static str,
        /// What happened, with secrets already removed.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
}

impl Error {
    /// `true` when another backend may answer instead: the backend is down,
    /// timed out, out of connections, read-only, loading, or its cluster is
    /// down. `false` for caller and data errors.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::Timeout { .. })
    }

    /// The [`UnavailableReason`] when [`is_unavailable`](Self::is_unavailable).
    pub fn unavailable_reason(&self) -> Option<UnavailableReason> {
        match self {
            Error::Unavailable { reason, .. } => Some(*reason),
            Error::Timeout { .. } => Some(UnavailableReason::Timeout),
            _ => None,
        }
    }

    /// Builds an [`Error::Unavailable`] without a source.
    pub fn unavailable(
        backend: &'static str,
        reason: UnavailableReason,
        message: impl Into<String>,
    ) -> Self {
        Error::Unavailable {
            backend,
            reason,
            message: message.into(),
            source: None,
        }
    }

    /// Builds an [`Error::InvalidArgument`].
    pub fn invalid_argument(name: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name,
            reason: reason.into(),
        }
    }

    /// Builds an [`Error::Config`] naming `field`.
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Builds an [`Error::LeaseLost`].
    pub fn lease_lost(key: impl Into<String>) -> Self {
        Error::LeaseLost { key: key.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unavailable_and_timeout_fall_back() {
        assert!(Error::unavailable("x", UnavailableReason::ReadOnly, "m").is_unavailable());
        assert!(Error::Timeout {
            backend: "x",
            after: Duration::from_millis(1)
        }
        .is_unavailable());
        assert!(!Error::lease_lost("k").is_unavailable());
        assert!(!Error::Full {
            limit: "records",
            max: 1
        }
        .is_unavailable());
        assert!(!Error::WrongType {
            backend: "x",
            key: "k".into()
        }
        .is_unavailable());
    }
}
