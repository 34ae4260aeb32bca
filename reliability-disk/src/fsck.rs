//! [`inspect`] and [`repair`]: what a spool directory holds, and moving what
//! is corrupt to quarantine.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use reliability_core::Result;

use crate::recover::{quarantine_dir, recover};
use crate::spool::{io_error, lock_dir};

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

impl Finding {
    pub(crate) fn new(kind: FindingKind, file: PathBuf, offset: u64, len: u64) -> Self {
        Self {
            kind,
            file,
            offset,
            len,
            detail: String::new(),
        }
    }

    pub(crate) fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} in {} at {} ({} bytes): {}",
            self.kind.code(),
            self.file.display(),
            self.offset,
            self.len,
            self.detail
        )
    }
}

/// One segment as [`inspect`] saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SegmentReport {
    /// The segment's number.
    pub number: u32,
    /// File size in bytes.
    pub bytes: u64,
    /// Valid frames in it, padding not counted.
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

/// Lists `quarantine/`: one item per `.reason` file.
fn quarantined(dir: &Path) -> io::Result<Vec<QuarantinedItem>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(quarantine_dir(dir)) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".reason") {
            out.push(QuarantinedItem {
                name: stem.to_string(),
                reason: fs::read_to_string(entry.path()).unwrap_or_default(),
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Reports what the spool directory `dir` holds, without changing anything
/// (it may run beside an open spool; what it reads then is a moving target,
/// e.g. a frame being written looks like a torn tail).
///
/// # Errors
/// [`Error::Unavailable`](reliability_core::Error::Unavailable) with [`UnavailableReason::Io`](reliability_core::UnavailableReason::Io) if the directory
/// cannot be read.
pub fn inspect(dir: &Path) -> Result<InspectReport> {
    if !dir.is_dir() {
        return Err(io_error(
            "not a spool directory",
            dir,
            io::Error::from(io::ErrorKind::NotFound),
        ));
    }
    let rec = recover(&crate::fsio::real(), dir, false)
        .map_err(|e| io_error("cannot read the spool", dir, e))?;
    let per_seg = rec.index.pins_per_segment();
    let segments = rec
        .segments
        .iter()
        .map(|&(number, bytes, entries)| SegmentReport {
            number,
            bytes,
            entries,
            records: per_seg.get(&number).map_or(0, |p| p.0),
        })
        .collect();
    let leased = rec
        .index
        .live
        .values()
        .filter(|l| l.lease.is_some())
        .count() as u64;
    Ok(InspectReport {
        dir: dir.to_path_buf(),
        segments,
        waiting: rec.index.live.len() as u64 - leased,
        leased,
        dead: rec.index.dead_ids.len() as u64,
        bytes: rec.index.bytes,
        quarantined: quarantined(dir).map_err(|e| io_error("cannot list quarantine", dir, e))?,
        corruption: rec.findings,
    })
}

/// Moves every corrupt part of the spool directory `dir` to `quarantine/`
/// (as opening a spool does), rewriting nothing good: torn tails are
/// truncated, bad frames padded over in place, garbage files moved, gaps
/// recorded. Takes the directory's lock for the time it runs.
///
/// # Errors
/// [`Error::Unavailable`](reliability_core::Error::Unavailable) with [`UnavailableReason::Io`](reliability_core::UnavailableReason::Io) if the directory
/// cannot be read or written, or is locked by an open spool.
pub fn repair(dir: &Path) -> Result<RepairReport> {
    if !dir.is_dir() {
        return Err(io_error(
            "not a spool directory",
            dir,
            io::Error::from(io::ErrorKind::NotFound),
        ));
    }
    crate::spool::join_finishing(&dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()));
    let lock = lock_dir(dir)?;
    let rec = recover(&crate::fsio::real(), dir, true)
        .map_err(|e| io_error("cannot repair the spool", dir, e))?;
    let _ = fs4::FileExt::unlock(&lock);
    Ok(RepairReport {
        quarantined: rec.findings,
        records: rec.index.held(),
    })
}
