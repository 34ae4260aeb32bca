//! `IdempotencyStore`: process each event once, across all replicas.
//!
//! A worker [`claim`](IdempotencyStore::claim)s an event's key with a
//! fingerprint of its payload and a lease. Exactly one concurrent claimer gets
//! [`Claim::Acquired`]; it must then [`complete`](IdempotencyStore::complete)
//! (storing an optional result that later claimers replay) or
//! [`release`](IdempotencyStore::release) (so others may retry). A crashed
//! worker's claim expires with its lease. Every owner operation is checked
//! against the lease token: a stale lease gets [`Error::LeaseLost`] and
//! changes nothing.
//!
//! ```
//! # #[allow(dead_code)]
//! # async fn demo(store: &dyn reliability_core::IdempotencyStore) -> reliability_core::Result<()> {
//! use reliability_core::{Claim, Fingerprint};
//! use std::time::Duration;
//!
//! let body = br#"{"event":"push"}"#;
//! match store.claim("evt_42", &Fingerprint::of(body), Duration::from_secs(30)).await? {
//!     Claim::Acquired(lease) => {
//!         // ... process the event ...
//!         store.complete(&lease, Some("200 OK".into()), Duration::from_secs(86_400)).await?;
//!     }
//!     Claim::InProgress { retry_after } => println!("409, retry after {retry_after:?}"),
//!     Claim::Completed(result) => println!("replay {result:?}"),
//!     Claim::Mismatch => { /* same key, different payload: reject */ }
//! }
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::capability::Capabilities;
use crate::error::{Error, Result};

/// Default limit on a stored result, in bytes.
pub const DEFAULT_MAX_RESULT_BYTES: usize = 1024 * 1024;

/// A digest of an event's payload; a claim with the same key and another
/// fingerprint is a [`Claim::Mismatch`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The SHA-256 of `payload`.
    pub fn of(payload: impl AsRef<[u8]>) -> Self {
        Fingerprint(Sha256::digest(payload.as_ref()).into())
    }

    /// A fingerprint from 32 raw bytes (e.g. a digest the caller already has).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Fingerprint(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 15)]));
        }
        s
    }

    /// Parses [`to_hex`](Self::to_hex) output.
    pub fn from_hex(s: &str) -> Option<Self> {
        let s = s.as_bytes();
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in s.chunks_exact(2).enumerate() {
            let hi = hex_val(pair[0])?;
            let lo = hex_val(pair[1])?;
            out[i] = (hi << 4) | lo;
        }
        Some(Fingerprint(out))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &self.to_hex()[..12])
    }
}

/// A random token that identifies one acquisition of a key or one lease of a
/// spool record.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseToken(u128);

impl LeaseToken {
    /// A fresh random token (a ULID: time-ordered, 80 random bits).
    pub fn generate() -> Self {
        LeaseToken(ulid::Ulid::new().0)
    }

    /// The token's raw value.
    pub const fn as_u128(self) -> u128 {
        self.0
    }

    /// A token from its raw value (backends that store tokens).
    pub const fn from_u128(v: u128) -> Self {
        LeaseToken(v)
    }
}

impl fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseToken({self})")
    }
}

impl std::str::FromStr for LeaseToken {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        u128::from_str_radix(s, 16)
            .map(LeaseToken)
            .map_err(|_| Error::invalid_argument("lease token", "not 32 hex digits"))
    }
}

/// Proof of ownership of a claimed key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lease {
    key: String,
    token: LeaseToken,
}

impl Lease {
    /// A lease of `key` with `token` (backends build these).
    pub fn new(key: impl Into<String>, token: LeaseToken) -> Self {
        Self {
            key: key.into(),
            token,
        }
    }

    /// The key as the caller gave it to `claim`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The owner token.
    pub fn token(&self) -> LeaseToken {
        self.token
    }
}

/// The answer to [`IdempotencyStore::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Claim {
    /// This caller owns the key now and must `complete` or `release` it.
    Acquired(Lease),
    /// Another caller holds the key; its lease ends in `retry_after`.
    InProgress {
        /// Time left on the holder's lease.
        retry_after: Duration,
    },
    /// The key was completed before; the stored result, if any.
    Completed(Option<bytes::Bytes>),
    /// The key is held or completed with another payload fingerprint.
    Mismatch,
}

impl Claim {
    /// The lease if [`Claim::Acquired`].
    pub fn into_lease(self) -> Option<Lease> {
        match self {
            Claim::Acquired(l) => Some(l),
            _ => None,
        }
    }
}

/// Deduplicates event processing across replicas.
///
/// Implementations must be object safe and cheap to share
/// (`Arc<dyn IdempotencyStore>`).
#[async_trait]
pub trait IdempotencyStore: Send + Sync + fmt::Debug + 'static {
    /// What this backend guarantees.
    fn capabilities(&self) -> Capabilities;

    /// Claims `key` for processing.
    ///
    /// # Behavior
    /// - No entry (or an expired one): stores a pending entry that expires
    ///   after `lease` and returns [`Claim::Acquired`]. Among any number of
    ///   concurrent claimers exactly one gets `Acquired`.
    /// - A pending entry with the same fingerprint: [`Claim::InProgress`] with
    ///   the time left on its lease.
    /// - A completed entry with the same fingerprint: [`Claim::Completed`]
    ///   with the stored result.
    /// - Any entry with another fingerprint: [`Claim::Mismatch`].
    ///
    /// # Errors
    /// [`Error::InvalidKey`] / [`Error::TooLarge`] for a bad key,
    /// [`Error::InvalidArgument`] for a zero lease, unavailable errors when
    /// the backend cannot answer.
    async fn claim(&self, key: &str, fingerprint: &Fingerprint, lease: Duration) -> Result<Claim>;

    /// Marks the claim done and stores `result` for replay.
    ///
    /// # Behavior
    /// Owner-checked: only the current holder of the lease may complete. The
    /// entry then lives for `retention` from now, whatever was left of the
    /// lease.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] if the lease expired and was re-acquired, or the
    /// entry is gone or completed (nothing is changed);
    /// [`Error::TooLarge`] for a result above the backend's limit;
    /// [`Error::InvalidArgument`] for a zero retention.
    async fn complete(
        &self,
        lease: &Lease,
        result: Option<Bytes>,
        retention: Duration,
    ) -> Result<()>;

    /// Gives the claim up so another caller may acquire the key at once.
    ///
    /// # Behavior
    /// Owner-checked delete of the pending entry.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] if this lease no longer holds the key (nothing is
    /// changed).
    async fn release(&self, lease: &Lease) -> Result<()>;

    /// Heartbeat: the pending claim now expires `by` from now.
    ///
    /// # Behavior
    /// Owner-checked; only a pending entry held by this lease is extended.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] if this lease no longer holds the key;
    /// [`Error::InvalidArgument`] for a zero duration.
    async fn extend(&self, lease: &Lease, by: Duration) -> Result<()>;
}

/// Helpers on top of [`IdempotencyStore`], for every implementation.
#[async_trait]
pub trait IdempotencyStoreExt: IdempotencyStore {
    /// Plain deduplication for gateways that only drop duplicates: `true` the
    /// first time `key` is seen within `ttl`, `false` after.
    ///
    /// # Errors
    /// As [`IdempotencyStore::claim`] and [`IdempotencyStore::complete`].
    async fn first_seen(&self, key: &str, ttl: Duration) -> Result<bool> {
        const SEEN: Fingerprint = Fingerprint([0u8; 32]);
        match self.claim(key, &SEEN, ttl).await? {
            Claim::Acquired(lease) => {
                self.complete(&lease, None, ttl).await?;
                Ok(true)
            }
            Claim::InProgress { .. } | Claim::Completed(_) | Claim::Mismatch => Ok(false),
        }
    }
}

impl<T: IdempotencyStore + ?Sized> IdempotencyStoreExt for T {}

macro_rules! forward_idempotency {
    ($ty:ty) => {
        #[deny(clippy::missing_trait_methods)]
        #[async_trait]
        impl<T: IdempotencyStore + ?Sized> IdempotencyStore for $ty {
            fn capabilities(&self) -> Capabilities {
                (**self).capabilities()
            }
            async fn claim(
                &self,
                key: &str,
                fingerprint: &Fingerprint,
                lease: Duration,
            ) -> Result<Claim> {
                (**self).claim(key, fingerprint, lease).await
            }
            async fn complete(
                &self,
                lease: &Lease,
                result: Option<Bytes>,
                retention: Duration,
            ) -> Result<()> {
                (**self).complete(lease, result, retention).await
            }
            async fn release(&self, lease: &Lease) -> Result<()> {
                (**self).release(lease).await
            }
            async fn extend(&self, lease: &Lease, by: Duration) -> Result<()> {
                (**self).extend(lease, by).await
            }
        }
    };
}

forward_idempotency!(Arc<T>);
forward_idempotency!(Box<T>);

/// Checks the arguments every backend's `claim` must refuse.
///
/// # Errors
/// [`Error::InvalidArgument`] for a zero lease.
pub fn check_lease_duration(name: &'static str, d: Duration) -> Result<()> {
    if d.is_zero() {
        return Err(Error::invalid_argument(name, "must be greater than zero"));
    }
    Ok(())
}

/// Checks a result against `limit`.
///
/// # Errors
/// [`Error::TooLarge`] with `what = "result"`.
pub fn check_result_size(result: Option<&Bytes>, limit: usize) -> Result<()> {
    match result {
        Some(r) if r.len() > limit => Err(Error::TooLarge {
            what: "result",
            size: r.len(),
            limit,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_hex_round_trip() {
        let f = Fingerprint::of(b"payload");
        assert_eq!(Fingerprint::from_hex(&f.to_hex()), Some(f));
        assert_eq!(Fingerprint::from_hex("zz"), None);
    }

    #[test]
    fn tokens_parse_back() {
        let t = LeaseToken::generate();
        assert_eq!(t.to_string().parse::<LeaseToken>().unwrap(), t);
        assert_ne!(LeaseToken::generate(), t);
    }

    fn _object_safe(_: &dyn IdempotencyStore) {}
}
