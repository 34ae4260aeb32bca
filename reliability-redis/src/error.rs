//! Redis errors mapped once onto [`reliability_core::Error`].
//!
//! The one question every mapping answers: may another backend answer this
//! call instead? Connection, timeout, pool, `READONLY`, `MASTERDOWN`,
//! `LOADING`, `OOM` (out of memory under `noeviction`), `BUSY` (a long
//! script) and cluster-state errors are *unavailable*; `WRONGTYPE`, failed
//! authentication, an ACL refusal (`NOPERM`), script and command errors are
//! not. Every message goes
//! through [`redact`] so no credential ever reaches an error, a log line or
//! the status.

use std::time::Duration;

use deadpool_redis::redis::{ErrorKind, RedisError, ServerErrorKind};
use reliability_core::status::redact;
use reliability_core::{Error, UnavailableReason};

/// The backend name in every error.
pub(crate) const BACKEND: &str = "redis";

/// What the client should do with its pooled connections after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// Keep them: the server answered (a caller or script error).
    Keep,
    /// Drop idle connections: the connection broke, or the server is a
    /// replica now (`READONLY` after a failover), so new connections must
    /// find the current master.
    Reconnect,
}

/// Maps a redis-rs error; `context` names the operation (never a secret).
pub(crate) fn map(err: &RedisError, context: &str) -> (Error, Disposition) {
    let message = redact(&format!("{context}: {err}"));
    let code = err.code().map(str::to_ascii_uppercase);
    let unavailable = |reason, disposition| {
        (
            Error::Unavailable {
                backend: BACKEND,
                reason,
                message: message.clone(),
                source: None,
            },
            disposition,
        )
    };
    match code.as_deref() {
        Some("WRONGTYPE") => {
            return (
                Error::WrongType {
                    backend: BACKEND,
                    key: context.to_string(),
                },
                Disposition::Keep,
            )
        }
        Some("NOAUTH" | "WRONGPASS") => return (auth_failed(&message), Disposition::Reconnect),
        Some("NOPERM") => return (acl_refused(&message), Disposition::Keep),
        Some("READONLY") => {
            return unavailable(UnavailableReason::ReadOnly, Disposition::Reconnect)
        }
        // `min-replicas-to-write` not met: typically a demoted master that
        // lost its replicas to the new one.
        Some("NOREPLICAS") => {
            return unavailable(UnavailableReason::ReadOnly, Disposition::Reconnect)
        }
        Some("MASTERDOWN") => {
            return unavailable(UnavailableReason::MasterDown, Disposition::Reconnect)
        }
        Some("LOADING") => return unavailable(UnavailableReason::Loading, Disposition::Keep),
        // `maxmemory` reached under `noeviction`: the server refuses writes
        // until memory frees; the connection is fine.
        Some("OOM") => return unavailable(UnavailableReason::OutOfMemory, Disposition::Keep),
        // A script runs longer than `busy-reply-threshold`: every other
        // command waits for it (or for `SCRIPT KILL`).
        Some("BUSY") => return unavailable(UnavailableReason::Busy, Disposition::Keep),
        Some("CLUSTERDOWN" | "TRYAGAIN" | "MOVED" | "ASK") => {
            return unavailable(UnavailableReason::ClusterDown, Disposition::Keep)
        }
        _ => {}
    }
    if let Some(what) = tls_refusal(err) {
        return (
            Error::Backend {
                backend: BACKEND,
                message: format!(
                    "TLS handshake failed: {what} (check reliability.redis.tls.caFile, \
                     certFile / keyFile, and that the server's certificate names the host \
                     of the URL): {message}"
                ),
                source: None,
            },
            Disposition::Reconnect,
        );
    }
    // The cluster client keeps only the text of its nodes' errors (an
    // initial connection refused for a bad password comes back as an I/O
    // error): wrong credentials are a deployment error, not an outage.
    if err.kind() != ErrorKind::AuthenticationFailed
        && (message.contains("AuthenticationFailed")
            || message.contains("WRONGPASS")
            || message.contains("NOAUTH"))
    {
        return (auth_failed(&message), Disposition::Reconnect);
    }
    match err.kind() {
        ErrorKind::AuthenticationFailed => (auth_failed(&message), Disposition::Reconnect),
        ErrorKind::Server(ServerErrorKind::ReadOnly) => {
            unavailable(UnavailableReason::ReadOnly, Disposition::Reconnect)
        }
        ErrorKind::Server(ServerErrorKind::MasterDown) => {
            unavailable(UnavailableReason::MasterDown, Disposition::Reconnect)
        }
        ErrorKind::Server(ServerErrorKind::BusyLoading) => {
            unavailable(UnavailableReason::Loading, Disposition::Keep)
        }
        ErrorKind::Server(
            ServerErrorKind::ClusterDown
            | ServerErrorKind::TryAgain
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask,
        )
        | ErrorKind::ClusterConnectionNotFound => {
            unavailable(UnavailableReason::ClusterDown, Disposition::Reconnect)
        }
        ErrorKind::MasterNameNotFoundBySentinel | ErrorKind::NoValidReplicasFoundBySentinel => {
            unavailable(UnavailableReason::MasterDown, Disposition::Reconnect)
        }
        _ if err.is_timeout() => unavailable(UnavailableReason::Timeout, Disposition::Reconnect),
        _ if err.is_io_error()
            || err.is_connection_refusal()
            || err.is_connection_dropped()
            || err.is_unrecoverable_error() =>
        {
            unavailable(UnavailableReason::Connection, Disposition::Reconnect)
        }
        _ => (
            Error::Backend {
                backend: BACKEND,
                message,
                source: None,
            },
            Disposition::Keep,
        ),
    }
}

/// A TLS handshake that failed on a certificate — ours refusing the
/// server's (unknown issuer, expired, wrong name) or the server refusing
/// ours — is a deployment error, not an outage: a fallback must not hide
/// it. redis-rs hands rustls' error over inside an `io::Error`.
#[cfg(feature = "tls")]
fn tls_refusal(err: &RedisError) -> Option<&'static str> {
    use rustls::{AlertDescription as A, Error as T};
    type Dyn = dyn std::error::Error + 'static;
    // redis-rs keeps an `Arc<dyn Error>` holding an `io::Error` holding
    // rustls' error: look through each wrapper.
    fn unwrap(e: &Dyn) -> Option<&Dyn> {
        if let Some(arc) = e.downcast_ref::<std::sync::Arc<dyn std::error::Error + Send + Sync>>() {
            return Some(&**arc);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return io.get_ref().map(|i| i as &Dyn);
        }
        e.source()
    }
    let mut cur: Option<&Dyn> = std::error::Error::source(err);
    for _ in 0..8 {
        let Some(e) = cur else { break };
        match e.downcast_ref::<T>() {
            Some(T::InvalidCertificate(_)) => return Some("the server's certificate was refused"),
            Some(T::NoCertificatesPresented) => return Some("the server presented no certificate"),
            Some(T::AlertReceived(
                A::BadCertificate
                | A::UnknownCA
                | A::CertificateRequired
                | A::CertificateUnknown
                | A::CertificateExpired
                | A::CertificateRevoked
                | A::UnsupportedCertificate
                | A::AccessDenied,
            )) => return Some("the server refused our client certificate"),
            _ => {}
        }
        cur = unwrap(e);
    }
    // The cluster client keeps only the text of its nodes' errors: rustls'
    // own wording, then.
    let text = err.to_string();
    if text.contains("invalid peer certificate") {
        return Some("the server's certificate was refused");
    }
    let refused_ours = [
        "BadCertificate",
        "UnknownCA",
        "CertificateRequired",
        "CertificateUnknown",
        "CertificateExpired",
        "CertificateRevoked",
        "UnsupportedCertificate",
        "AccessDenied",
    ];
    if text.contains("received fatal alert: ")
        && refused_ours
            .iter()
            .any(|a| text.contains(&format!("alert: {a}")))
    {
        return Some("the server refused our client certificate");
    }
    None
}

#[cfg(not(feature = "tls"))]
fn tls_refusal(_: &RedisError) -> Option<&'static str> {
    None
}

fn auth_failed(message: &str) -> Error {
    Error::Backend {
        backend: BACKEND,
        message: format!(
            "authentication failed (check reliability.redis.username / password, and the \
             credentials in the URLs: behind Sentinel, those of reliability.redis.sentinel.urls \
             are the sentinels' own): {message}"
        ),
        source: None,
    }
}

/// The ACL user may not run a command or touch a key: a deployment error.
fn acl_refused(message: &str) -> Error {
    Error::Backend {
        backend: BACKEND,
        message: format!(
            "ACL refusal (check reliability.redis.username and the server's ACL rules for \
             that user): {message}"
        ),
        source: None,
    }
}

/// A pool error: waiting for, creating or recycling a connection.
pub(crate) fn pool(
    err: deadpool::managed::PoolError<RedisError>,
    context: &str,
) -> (Error, Disposition) {
    use deadpool::managed::{PoolError, TimeoutType};
    match err {
        PoolError::Backend(e) => map(&e, context),
        PoolError::Timeout(TimeoutType::Wait) => (
            Error::unavailable(
                BACKEND,
                UnavailableReason::PoolExhausted,
                format!("{context}: no pooled connection within the pool timeout"),
            ),
            Disposition::Keep,
        ),
        PoolError::Timeout(TimeoutType::Create) => (
            Error::unavailable(
                BACKEND,
                UnavailableReason::Timeout,
                format!("{context}: no connection within the connect timeout"),
            ),
            Disposition::Keep,
        ),
        PoolError::Timeout(TimeoutType::Recycle) => (
            Error::unavailable(
                BACKEND,
                UnavailableReason::Timeout,
                format!("{context}: a pooled connection did not answer PING in time"),
            ),
            Disposition::Reconnect,
        ),
        PoolError::Closed => (
            Error::unavailable(BACKEND, UnavailableReason::Closed, "the pool is closed"),
            Disposition::Keep,
        ),
        other => (
            Error::unavailable(
                BACKEND,
                UnavailableReason::Other,
                redact(&format!("{context}: {other}")),
            ),
            Disposition::Keep,
        ),
    }
}

/// The call's deadline passed.
pub(crate) fn timeout(after: Duration) -> Error {
    Error::Timeout {
        backend: BACKEND,
        after,
    }
}

/// A reply of an unexpected shape (a bug, or another program's data).
pub(crate) fn unexpected(context: &str, what: impl std::fmt::Debug) -> Error {
    Error::Backend {
        backend: BACKEND,
        message: redact(&format!("{context}: unexpected reply {what:?}")),
        source: None,
    }
}
