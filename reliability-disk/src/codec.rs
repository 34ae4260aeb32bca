//! The on-disk record format: one framed, CRC32C-checked entry per state
//! change.
//!
//! # Frame
//!
//! ```text
//! offset  size  field
//! 0       4     len    u32 LE: bytes after the crc (kind + body), 1..=MAX_FRAME_LEN
//! 4       4     crc    u32 LE: CRC32C (Castagnoli) of kind + body
//! 8       1     kind   u8, see below
//! 9       len-1 body   kind-specific, little-endian integers
//! ```
//!
//! Strings inside a body: record ids are `u8 length + UTF-8 bytes` (ids are
//! at most 128 bytes), dead-letter reasons `u16 length + UTF-8 bytes`.
//! Timestamps are `u64` microseconds since the Unix epoch, lease tokens `u128`.
//!
//! | kind | entry | body |
//! |---|---|---|
//! | 1 | [`Entry::Enqueue`] | id, seq u64, enqueued_at u64, due_at u64, attempts u32, payload (rest of the frame) |
//! | 2 | [`Entry::Lease`] | id, token u128, lease_until u64, attempts u32 |
//! | 3 | [`Entry::Ack`] | id |
//! | 4 | [`Entry::Nack`] | id, due_at u64 |
//! | 5 | [`Entry::Extend`] | id, token u128, lease_until u64 |
//! | 6 | [`Entry::DeadLetter`] | id, seq u64, dead_at u64, attempts u32, reason code u8 (0 expired, 1 retries exhausted, 2 rejected), reason text (u16 length + bytes, rejected only) |
//! | 7 | [`Entry::Redrive`] | id, seq u64, due_at u64 |
//! | 8 | [`Entry::Purge`] | id |
//! | 9 | [`Entry::Pad`] | any bytes: a quarantined range overwritten in place |
//!
//! Every entry carries absolute values (attempts, due and lease times), so a
//! replay that misses an entry (a write that failed) still ends in a
//! consistent state. [`decode`] never panics and never allocates more than the
//! frame it was given: it is fuzzed.

use std::fmt;

use bytes::Bytes;
use reliability_core::{DeadReason, LeaseToken, RecordId, Timestamp};

/// Bytes of the frame header (`len` + `crc`).
pub const HEADER_LEN: usize = 8;

/// Largest `len` a frame may declare (64 MiB): larger ones are corrupt.
pub const MAX_FRAME_LEN: u32 = 64 * 1024 * 1024;

/// Smallest whole frame: header plus the kind byte.
pub const MIN_FRAME: usize = HEADER_LEN + 1;

const K_ENQUEUE: u8 = 1;
const K_LEASE: u8 = 2;
const K_ACK: u8 = 3;
const K_NACK: u8 = 4;
const K_EXTEND: u8 = 5;
const K_DEAD: u8 = 6;
const K_REDRIVE: u8 = 7;
const K_PURGE: u8 = 8;
const K_PAD: u8 = 9;

/// One state change as stored in a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Entry {
    /// A new record (or a record moved in from another spool).
    Enqueue {
        /// The producer-assigned id.
        id: RecordId,
        /// Enqueue order, the tie-breaker among records of the same age.
        seq: u64,
        /// When the record first entered any spool.
        enqueued_at: Timestamp,
        /// When it is due.
        due_at: Timestamp,
        /// Delivery attempts already made.
        attempts: u32,
        /// The payload.
        payload: Bytes,
    },
    /// The record was leased.
    Lease {
        /// The record.
        id: RecordId,
        /// The lease's token.
        token: LeaseToken,
        /// When the lease ends.
        lease_until: Timestamp,
        /// Attempts including this lease.
        attempts: u32,
    },
    /// The record was delivered and deleted.
    Ack {
        /// The record.
        id: RecordId,
    },
    /// The record was given back, due at `due_at`.
    Nack {
        /// The record.
        id: RecordId,
        /// When it is due again.
        due_at: Timestamp,
    },
    /// The lease `token` now ends at `lease_until`.
    Extend {
        /// The record.
        id: RecordId,
        /// The lease's token.
        token: LeaseToken,
        /// The new end of the lease.
        lease_until: Timestamp,
    },
    /// The record moved to the dead-letter queue.
    DeadLetter {
        /// The record.
        id: RecordId,
        /// Order in the dead-letter queue.
        seq: u64,
        /// When it died.
        dead_at: Timestamp,
        /// Attempts made.
        attempts: u32,
        /// Why.
        reason: DeadReason,
    },
    /// A dead record is live again, attempts reset.
    Redrive {
        /// The record.
        id: RecordId,
        /// Its new enqueue order.
        seq: u64,
        /// When it is due.
        due_at: Timestamp,
    },
    /// A dead record was deleted.
    Purge {
        /// The record.
        id: RecordId,
    },
    /// Filler over a quarantined range; `len` bytes of body.
    Pad {
        /// Body length.
        len: u32,
    },
}

impl Entry {
    /// The record id the entry is about (`None` for padding).
    pub fn id(&self) -> Option<&RecordId> {
        match self {
            Entry::Enqueue { id, .. }
            | Entry::Lease { id, .. }
            | Entry::Ack { id }
            | Entry::Nack { id, .. }
            | Entry::Extend { id, .. }
            | Entry::DeadLetter { id, .. }
            | Entry::Redrive { id, .. }
            | Entry::Purge { id } => Some(id),
            Entry::Pad { .. } => None,
        }
    }

    /// A short name of the kind (`"enqueue"`, `"ack"`, ...).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Entry::Enqueue { .. } => "enqueue",
            Entry::Lease { .. } => "lease",
            Entry::Ack { .. } => "ack",
            Entry::Nack { .. } => "nack",
            Entry::Extend { .. } => "extend",
            Entry::DeadLetter { .. } => "dead_letter",
            Entry::Redrive { .. } => "redrive",
            Entry::Purge { .. } => "purge",
            Entry::Pad { .. } => "pad",
        }
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// `len` is zero or above [`MAX_FRAME_LEN`].
    BadLength(u32),
    /// The checksum does not match the bytes.
    BadChecksum {
        /// The checksum stored in the frame.
        stored: u32,
        /// The checksum of the bytes.
        actual: u32,
    },
    /// An unknown entry kind.
    BadKind(u8),
    /// The body does not parse as its kind (checksum was right).
    Malformed(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::BadLength(l) => write!(f, "bad frame length {l}"),
            DecodeError::BadChecksum { stored, actual } => {
                write!(
                    f,
                    "checksum mismatch: stored {stored:08x}, actual {actual:08x}"
                )
            }
            DecodeError::BadKind(k) => write!(f, "unknown entry kind {k}"),
            DecodeError::Malformed(what) => write!(f, "malformed entry: {what}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Appends `entry`, framed, to `out`.
///
/// Entries the format cannot hold are clamped, never panicking: a reason
/// text longer than 65,535 bytes is cut (at a character boundary).
pub fn encode(entry: &Entry, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    match entry {
        Entry::Enqueue {
            id,
            seq,
            enqueued_at,
            due_at,
            attempts,
            payload,
        } => {
            out.push(K_ENQUEUE);
            put_id(out, id);
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&enqueued_at.as_micros().to_le_bytes());
            out.extend_from_slice(&due_at.as_micros().to_le_bytes());
            out.extend_from_slice(&attempts.to_le_bytes());
            out.extend_from_slice(payload);
        }
        Entry::Lease {
            id,
            token,
            lease_until,
            attempts,
        } => {
            out.push(K_LEASE);
            put_id(out, id);
            out.extend_from_slice(&token.as_u128().to_le_bytes());
            out.extend_from_slice(&lease_until.as_micros().to_le_bytes());
            out.extend_from_slice(&attempts.to_le_bytes());
        }
        Entry::Ack { id } => {
            out.push(K_ACK);
            put_id(out, id);
        }
        Entry::Nack { id, due_at } => {
            out.push(K_NACK);
            put_id(out, id);
            out.extend_from_slice(&due_at.as_micros().to_le_bytes());
        }
        Entry::Extend {
            id,
            token,
            lease_until,
        } => {
            out.push(K_EXTEND);
            put_id(out, id);
            out.extend_from_slice(&token.as_u128().to_le_bytes());
            out.extend_from_slice(&lease_until.as_micros().to_le_bytes());
        }
        Entry::DeadLetter {
            id,
            seq,
            dead_at,
            attempts,
            reason,
        } => {
            out.push(K_DEAD);
            put_id(out, id);
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&dead_at.as_micros().to_le_bytes());
            out.extend_from_slice(&attempts.to_le_bytes());
            match reason {
                DeadReason::Expired => out.push(0),
                DeadReason::RetriesExhausted => out.push(1),
                DeadReason::Rejected(text) => {
                    out.push(2);
                    let mut cut = text.len().min(usize::from(u16::MAX));
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    out.extend_from_slice(&(cut as u16).to_le_bytes());
                    out.extend_from_slice(&text.as_bytes()[..cut]);
                }
                // DeadReason is non_exhaustive: a future reason is stored as
                // a rejection carrying its code.
                #[allow(unreachable_patterns)]
                other => {
                    out.push(2);
                    let code = other.code().as_bytes();
                    out.extend_from_slice(&(code.len() as u16).to_le_bytes());
                    out.extend_from_slice(code);
                }
            }
        }
        Entry::Redrive { id, seq, due_at } => {
            out.push(K_REDRIVE);
            put_id(out, id);
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&due_at.as_micros().to_le_bytes());
        }
        Entry::Purge { id } => {
            out.push(K_PURGE);
            put_id(out, id);
        }
        Entry::Pad { len } => {
            out.push(K_PAD);
            out.resize(out.len() + *len as usize, 0);
        }
    }
    let body = &out[start + HEADER_LEN..];
    let len = body.len() as u32;
    let crc = crc32c::crc32c(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The frame of a padding entry exactly `total` bytes long (`total >=`
/// [`MIN_FRAME`]).
pub(crate) fn pad_frame(total: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(total);
    encode(
        &Entry::Pad {
            len: u32::try_from(total.saturating_sub(MIN_FRAME)).unwrap_or(u32::MAX),
        },
        &mut out,
    );
    out
}

fn put_id(out: &mut Vec<u8>, id: &RecordId) {
    let b = id.as_str().as_bytes();
    // Record ids are at most 128 bytes (RecordId validates).
    let n = b.len().min(255);
    out.push(n as u8);
    out.extend_from_slice(&b[..n]);
}

/// Decodes the frame at the start of `buf`.
///
/// Returns `Ok(None)` when `buf` holds less than one whole frame (more bytes
/// are needed, or the log ends in a torn write), `Ok(Some((entry, used)))`
/// with the number of bytes the frame takes, or the reason the bytes are not
/// a valid frame.
///
/// # Errors
/// [`DecodeError`] for a bad length, checksum, kind or body.
pub fn decode(buf: &[u8]) -> Result<Option<(Entry, usize)>, DecodeError> {
    Ok(decode_frame(buf, true)?.map(|(e, used, _)| (e, used)))
}

/// Where an enqueue entry's payload sits inside its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PayloadSpan {
    pub(crate) start: usize,
    pub(crate) len: usize,
}

/// [`decode`], optionally without copying an enqueue's payload (the entry
/// then carries an empty payload and the span says where it is).
pub(crate) fn decode_frame(
    buf: &[u8],
    with_payload: bool,
) -> Result<Option<(Entry, usize, Option<PayloadSpan>)>, DecodeError> {
    let Some(len) = frame_len(buf)? else {
        return Ok(None);
    };
    let total = HEADER_LEN + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let stored = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let body = &buf[HEADER_LEN..total];
    let actual = crc32c::crc32c(body);
    if stored != actual {
        return Err(DecodeError::BadChecksum { stored, actual });
    }
    let (entry, span) = parse(body, with_payload)?;
    let span = span.map(|s| PayloadSpan {
        start: s.start + HEADER_LEN,
        len: s.len,
    });
    Ok(Some((entry, total, span)))
}

/// The declared `len` of the frame at the start of `buf`, checked for range;
/// `None` if fewer than 4 bytes.
pub(crate) fn frame_len(buf: &[u8]) -> Result<Option<u32>, DecodeError> {
    let Some(b) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if len == 0 || len > MAX_FRAME_LEN {
        return Err(DecodeError::BadLength(len));
    }
    Ok(Some(len))
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(DecodeError::Malformed("length overflow"))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(DecodeError::Malformed("truncated body"))?;
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn u128(&mut self) -> Result<u128, DecodeError> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.take(16)?);
        Ok(u128::from_le_bytes(a))
    }

    fn ts(&mut self) -> Result<Timestamp, DecodeError> {
        Ok(Timestamp::from_micros(self.u64()?))
    }

    fn id(&mut self) -> Result<RecordId, DecodeError> {
        let n = self.u8()? as usize;
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| DecodeError::Malformed("id is not UTF-8"))?;
        RecordId::new(s).map_err(|_| DecodeError::Malformed("invalid record id"))
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = self.buf.get(self.pos..).unwrap_or(&[]);
        self.pos = self.buf.len();
        s
    }

    fn end(&self) -> Result<(), DecodeError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(DecodeError::Malformed("trailing bytes"))
        }
    }
}

/// Parses `kind + body`.
fn parse(body: &[u8], with_payload: bool) -> Result<(Entry, Option<PayloadSpan>), DecodeError> {
    let mut c = Cursor { buf: body, pos: 0 };
    let kind = c.u8()?;
    let entry = match kind {
        K_ENQUEUE => {
            let id = c.id()?;
            let seq = c.u64()?;
            let enqueued_at = c.ts()?;
            let due_at = c.ts()?;
            let attempts = c.u32()?;
            let start = c.pos;
            let rest = c.rest();
            let span = PayloadSpan {
                start,
                len: rest.len(),
            };
            let payload = if with_payload {
                Bytes::copy_from_slice(rest)
            } else {
                Bytes::new()
            };
            return Ok((
                Entry::Enqueue {
                    id,
                    seq,
                    enqueued_at,
                    due_at,
                    attempts,
                    payload,
                },
                Some(span),
            ));
        }
        K_LEASE => Entry::Lease {
            id: c.id()?,
            token: LeaseToken::from_u128(c.u128()?),
            lease_until: c.ts()?,
            attempts: c.u32()?,
        },
        K_ACK => Entry::Ack { id: c.id()? },
        K_NACK => Entry::Nack {
            id: c.id()?,
            due_at: c.ts()?,
        },
        K_EXTEND => Entry::Extend {
            id: c.id()?,
            token: LeaseToken::from_u128(c.u128()?),
            lease_until: c.ts()?,
        },
        K_DEAD => {
            let id = c.id()?;
            let seq = c.u64()?;
            let dead_at = c.ts()?;
            let attempts = c.u32()?;
            let reason = match c.u8()? {
                0 => DeadReason::Expired,
                1 => DeadReason::RetriesExhausted,
                2 => {
                    let n = usize::from(c.u16()?);
                    let text = std::str::from_utf8(c.take(n)?)
                        .map_err(|_| DecodeError::Malformed("reason is not UTF-8"))?;
                    DeadReason::Rejected(text.to_owned())
                }
                _ => return Err(DecodeError::Malformed("unknown dead reason")),
            };
            Entry::DeadLetter {
                id,
                seq,
                dead_at,
                attempts,
                reason,
            }
        }
        K_REDRIVE => Entry::Redrive {
            id: c.id()?,
            seq: c.u64()?,
            due_at: c.ts()?,
        },
        K_PURGE => Entry::Purge { id: c.id()? },
        K_PAD => Entry::Pad {
            len: u32::try_from(c.rest().len()).unwrap_or(u32::MAX),
        },
        other => return Err(DecodeError::BadKind(other)),
    };
    c.end()?;
    Ok((entry, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> RecordId {
        RecordId::new(s).unwrap()
    }

    fn samples() -> Vec<Entry> {
        let t = Timestamp::from_micros(1_735_689_600_000_000);
        vec![
            Entry::Enqueue {
                id: id("a"),
                seq: 7,
                enqueued_at: t,
                due_at: t,
                attempts: 2,
                payload: Bytes::from_static(b"hello"),
            },
            Entry::Enqueue {
                id: id("empty"),
                seq: 8,
                enqueued_at: t,
                due_at: t,
                attempts: 0,
                payload: Bytes::new(),
            },
            Entry::Lease {
                id: id("a"),
                token: LeaseToken::from_u128(u128::MAX - 5),
                lease_until: t,
                attempts: 3,
            },
            Entry::Ack { id: id("a") },
            Entry::Nack {
                id: id("a"),
                due_at: t,
            },
            Entry::Extend {
                id: id("a"),
                token: LeaseToken::from_u128(9),
                lease_until: t,
            },
            Entry::DeadLetter {
                id: id("a"),
                seq: 1,
                dead_at: t,
                attempts: 4,
                reason: DeadReason::Rejected("HTTP 410 ü".into()),
            },
            Entry::DeadLetter {
                id: id("b"),
                seq: 2,
                dead_at: t,
                attempts: 4,
                reason: DeadReason::Expired,
            },
            Entry::DeadLetter {
                id: id("c"),
                seq: 3,
                dead_at: t,
                attempts: 4,
                reason: DeadReason::RetriesExhausted,
            },
            Entry::Redrive {
                id: id("a"),
                seq: 9,
                due_at: t,
            },
            Entry::Purge { id: id("a") },
            Entry::Pad { len: 3 },
        ]
    }

    #[test]
    fn round_trips_every_kind() {
        let mut buf = Vec::new();
        for e in samples() {
            encode(&e, &mut buf);
        }
        let mut pos = 0;
        for e in samples() {
            let (got, used) = decode(&buf[pos..]).unwrap().unwrap();
            assert_eq!(got, e);
            pos += used;
        }
        assert_eq!(pos, buf.len());
        assert_eq!(decode(&buf[pos..]), Ok(None));
    }

    #[test]
    fn every_prefix_and_every_bit_flip_is_safe() {
        let mut buf = Vec::new();
        encode(&samples()[0], &mut buf);
        for n in 0..buf.len() {
            assert!(matches!(decode(&buf[..n]), Ok(None) | Err(_)), "prefix {n}");
        }
        for i in 0..buf.len() * 8 {
            let mut b = buf.clone();
            b[i / 8] ^= 1 << (i % 8);
            // A flipped length may ask for more bytes; anything else fails
            // the checksum.
            assert!(!matches!(decode(&b), Ok(Some(_))), "bit {i}");
        }
    }

    #[test]
    fn zeros_and_huge_lengths_are_errors() {
        assert_eq!(decode(&[0u8; 32]), Err(DecodeError::BadLength(0)));
        assert!(matches!(
            decode(&[0xff; 32]),
            Err(DecodeError::BadLength(_))
        ));
    }

    #[test]
    fn pad_frames_have_the_asked_size() {
        for total in [MIN_FRAME, 10, 100] {
            let f = pad_frame(total);
            assert_eq!(f.len(), total);
            assert_eq!(decode(&f).unwrap().unwrap().1, total);
        }
    }
}
