//! [`inspect`] and [`repair`]: what a spool directory holds, and moving what
//! is corrupt to quarantine.

use std::path::{Path, PathBuf};

use reliability_core::{Error, Result, UnavailableReason};

use crate::spool::BACKEND;

/// What kind of damage was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FindingKind {
    /// A frame whose checksum (or length, kind, body) is wrong, inside a segment.
    BadFrame,
    /// The segment ends in a partial frame (a torn write).
    TornTail,
    /// The segment ends in zero bytes (preallocated or lost blocks).
    ZeroTail,
    /// A file in `segments/` that is not a segment (bad name or header).
    GarbageFile,
    /// A segment number missing between the first and the last.
    MissingSegment,
}

impl FindingKind {
    /// A short stable code: `bad_frame`, `torn_tail`, `zero_tail`,
    /// `garbage_file`, `missing_segment`.
    pub fn code(self) -> &'static str {
        match self {
            FindingKind::BadFrame => "bad_frame",
            FindingKind::TornTail => "torn_tail",
            FindingKind::ZeroTail => "zero_tail",
            FindingKind::GarbageFile => "garbage_file",
            FindingKind::MissingSegment => "missing_segment",
        }
    }
}

/// One piece of damage.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Finding {
    /// What kind.
    pub kind: FindingKind,
    /// The file concerned (relative to the spool directory).
    pub file: PathBuf,
    /// Byte offset in the file (0 for whole files).
    pub offset: u64,
    /// Bytes concerned.
    pub len: u64,
    /// Details (the decode error, ...).
    pub detail: String,
}

/// One segment as [`inspect`] saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SegmentReport {
    /// The segment's number.
    pub number: u32,
    /// File size in bytes.
    pub bytes: u64,
    /// Valid frames in it.
    pub entries: u64,
    /// Records whose enqueue frame is in it and that are not deleted.
    pub records: u64,
}

/// An item in `quarantine/`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QuarantinedItem {
    /// File name inside `quarantine/` (the `.reason` file's name without the
    /// extension).
    pub name: String,
    /// The reason file's text.
    pub reason: String,
}

/// What a spool directory holds; see [`inspect`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InspectReport {
    /// The directory.
    pub dir: PathBuf,
    /// Segments, oldest first.
    pub segments: Vec<SegmentReport>,
    /// Live records not leased (ready or delayed).
    pub waiting: u64,
    /// Live records with a lease on record (it may have expired).
    pub leased: u64,
    /// Dead records.
    pub dead: u64,
    /// Payload bytes held, dead records included.
    pub bytes: u64,
    /// Items already in `quarantine/`.
    pub quarantined: Vec<QuarantinedItem>,
    /// Damage found now, not yet quarantined.
    pub corruption: Vec<Finding>,
}

/// What [`repair`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RepairReport {
    /// Damage found and moved to `quarantine/`.
    pub quarantined: Vec<Finding>,
    /// Live and dead records left intact.
    pub records: u64,
}

/// Reports what the spool directory `dir` holds, without changing anything.
///
/// # Errors
/// [`Error::Unavailable`] with [`UnavailableReason::Io`] if the directory
/// cannot be read.
pub fn inspect(dir: &Path) -> Result<InspectReport> {
    let _ = dir;
    Err(Error::unavailable(
        BACKEND,
        UnavailableReason::Io,
        "not implemented yet",
    ))
}

/// Moves every corrupt part of the spool directory `dir` to `quarantine/`
/// (as opening a spool does), rewriting nothing good.
///
/// # Errors
/// [`Error::Unavailable`] with [`UnavailableReason::Io`] if the directory
/// cannot be read or written, or is locked by an open spool.
pub fn repair(dir: &Path) -> Result<RepairReport> {
    let _ = dir;
    Err(Error::unavailable(
        BACKEND,
        UnavailableReason::Io,
        "not implemented yet",
    ))
}
