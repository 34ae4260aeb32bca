//! Key validation and namespacing.
//!
//! Every stored key has the shape `{prefix}:{primitive}:{namespace}:{id}`, so
//! several services (prefix) and several uses within a service (namespace) can
//! share one Redis without collisions.
//!
//! Ids are validated: empty ids are refused; ids up to [`MAX_VERBATIM_ID_BYTES`]
//! are used as given; longer ids up to [`MAX_ID_BYTES`] are replaced by a
//! SHA-256 digest (`#` + 64 hex digits) so backend keys stay short; longer
//! ones are refused with [`Error::TooLarge`]. An id that starts with `#` is
//! hashed whatever its length, so no id used as given looks like a hashed
//! one: two distinct ids never share a key (one caller cannot pass another's
//! digest to reach its entry).
//!
//! ```
//! use reliability_core::{KeySpace, Primitive};
//!
//! let ks = KeySpace::new("gateway", "webhooks").unwrap();
//! assert_eq!(ks.key(Primitive::Idempotency, "evt_1").unwrap(), "gateway:idem:webhooks:evt_1");
//! assert!(ks.key(Primitive::Idempotency, "").is_err());
//! ```

use std::borrow::Cow;
use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Ids longer than this many bytes are hashed.
pub const MAX_VERBATIM_ID_BYTES: usize = 200;
/// Ids longer than this many bytes are refused.
pub const MAX_ID_BYTES: usize = 8 * 1024;
/// Maximum length of a prefix or namespace.
pub const MAX_SEGMENT_BYTES: usize = 64;
/// Maximum length of a spool record id (ids are never hashed: they travel
/// with the record to the consumer).
pub const MAX_RECORD_ID_BYTES: usize = 128;

/// The first character of a hashed id, and of no id used as given.
const HASHED_MARK: char = '#';

/// Which primitive a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Primitive {
    /// Idempotency store entries.
    Idempotency,
    /// Rate limiter state.
    RateLimit,
    /// Spool records and indexes.
    Spool,
}

impl Primitive {
    /// The key segment of this primitive.
    pub const fn segment(self) -> &'static str {
        match self {
            Primitive::Idempotency => "idem",
            Primitive::RateLimit => "rl",
            Primitive::Spool => "spool",
        }
    }
}

/// A validated `(prefix, namespace)` pair that builds backend keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeySpace {
    prefix: String,
    namespace: String,
}

impl KeySpace {
    /// Validates `prefix` and `namespace`: 1 to [`MAX_SEGMENT_BYTES`] bytes of
    /// ASCII letters, digits, `_`, `-` and `.`.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] naming the bad segment.
    pub fn new(prefix: impl Into<String>, namespace: impl Into<String>) -> Result<Self> {
        let prefix = prefix.into();
        let namespace = namespace.into();
        validate_segment(&prefix)?;
        validate_segment(&namespace)?;
        Ok(Self { prefix, namespace })
    }

    /// The service prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// `{prefix}:{primitive}:{namespace}`, the common part of all keys of
    /// `primitive`.
    pub fn base(&self, primitive: Primitive) -> String {
        format!("{}:{}:{}", self.prefix, primitive.segment(), self.namespace)
    }

    /// The full key of `id`: `{prefix}:{primitive}:{namespace}:{id}`, with
    /// long ids hashed.
    ///
    /// # Errors
    /// See [`normalize_id`].
    pub fn key(&self, primitive: Primitive, id: &str) -> Result<String> {
        let id = normalize_id(id)?;
        let mut out = self.base(primitive);
        out.push(':');
        out.push_str(&id);
        Ok(out)
    }
}

/// Checks one prefix or namespace segment.
///
/// # Errors
/// [`Error::InvalidKey`] if empty, too long or with a character outside
/// `[A-Za-z0-9_.-]`.
pub fn validate_segment(s: &str) -> Result<()> {
    let bad = |reason| Error::InvalidKey {
        key: truncate(s),
        reason,
    };
    if s.is_empty() {
        return Err(bad("empty prefix or namespace"));
    }
    if s.len() > MAX_SEGMENT_BYTES {
        return Err(bad("prefix or namespace longer than 64 bytes"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(bad("prefix or namespace may hold only [A-Za-z0-9_.-]"));
    }
    Ok(())
}

/// Validates an id and returns the form stored in keys: the id itself when
/// at most [`MAX_VERBATIM_ID_BYTES`] and not starting with `#`, else `#` +
/// hex SHA-256 of it. The two forms are disjoint: distinct ids give
/// distinct forms.
///
/// # Errors
/// [`Error::InvalidKey`] for an empty id; [`Error::TooLarge`] above
/// [`MAX_ID_BYTES`].
pub fn normalize_id(id: &str) -> Result<Cow<'_, str>> {
    if id.is_empty() {
        return Err(Error::InvalidKey {
            key: String::new(),
            reason: "empty id",
        });
    }
    if id.len() > MAX_ID_BYTES {
        return Err(Error::TooLarge {
            what: "key",
            size: id.len(),
            limit: MAX_ID_BYTES,
        });
    }
    if id.len() <= MAX_VERBATIM_ID_BYTES && !id.starts_with(HASHED_MARK) {
        return Ok(Cow::Borrowed(id));
    }
    let digest = Sha256::digest(id.as_bytes());
    let mut out = String::with_capacity(65);
    out.push(HASHED_MARK);
    for b in digest {
        let _ = write!(out, "{b:02x}");
    }
    Ok(Cow::Owned(out))
}

/// Validates a spool record id: 1 to [`MAX_RECORD_ID_BYTES`] bytes, no
/// control characters.
///
/// # Errors
/// [`Error::InvalidKey`] or [`Error::TooLarge`].
pub fn validate_record_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::InvalidKey {
            key: String::new(),
            reason: "empty record id",
        });
    }
    if id.len() > MAX_RECORD_ID_BYTES {
        return Err(Error::TooLarge {
            what: "record id",
            size: id.len(),
            limit: MAX_RECORD_ID_BYTES,
        });
    }
    if id.chars().any(char::is_control) {
        return Err(Error::InvalidKey {
            key: truncate(id),
            reason: "record id holds a control character",
        });
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_ids_are_hashed_and_huge_ones_refused() {
        let long = "x".repeat(MAX_VERBATIM_ID_BYTES + 1);
        let n = normalize_id(&long).unwrap();
        assert!(n.starts_with('#') && n.len() == 65);
        assert_eq!(normalize_id(&long).unwrap(), n, "hashing is stable");
        assert_eq!(
            normalize_id(&"y".repeat(MAX_VERBATIM_ID_BYTES))
                .unwrap()
                .len(),
            MAX_VERBATIM_ID_BYTES
        );
        assert_eq!(normalize_id("#1").unwrap().len(), 65, "# ids are hashed");
        assert!(matches!(
            normalize_id(&"z".repeat(MAX_ID_BYTES + 1)),
            Err(Error::TooLarge { what: "key", .. })
        ));
    }

    #[test]
    fn segments_are_checked() {
        assert!(KeySpace::new("a:b", "n").is_err());
        assert!(KeySpace::new("a", "").is_err());
        assert!(KeySpace::new("a", "x".repeat(65)).is_err());
        let ks = KeySpace::new("svc-1", "ns_2.x").unwrap();
        assert_eq!(
            ks.key(Primitive::Spool, "id").unwrap(),
            "svc-1:spool:ns_2.x:id"
        );
    }

    #[test]
    fn record_ids() {
        assert!(validate_record_id("01J0000000").is_ok());
        assert!(validate_record_id("").is_err());
        assert!(validate_record_id("a\nb").is_err());
        assert!(validate_record_id(&"r".repeat(129)).is_err());
    }
}
