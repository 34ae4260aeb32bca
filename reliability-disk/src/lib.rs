//! Durable disk spool of the `reliability` crates: a segmented,
//! CRC32C-checked, group-committed log.
//!
//! [`DiskSpool`] implements [`reliability_core::Spool`] on a directory:
//!
//! ```text
//! dir/
//!   LOCK                 held with an OS file lock (flock) while a spool is open
//!   segments/00000001.log
//!   segments/00000002.log  append-only segments, the last one is active
//!   quarantine/          bad bytes and files moved aside, each with a .reason file
//! ```
//!
//! # On-disk format
//!
//! A segment starts with a 16-byte header: the magic `RSPOOL01` (8 bytes),
//! the format version (`u32` LE, 1) and the segment's number (`u32` LE, the
//! same as its file name). Then frames follow back to back, each one state
//! change: `[len u32][crc32c u32][kind u8][body]`, see [`codec`] for the
//! kinds and their bodies. Opening the spool replays every segment in order
//! to rebuild an index that holds, per record, its id, where its enqueue
//! frame is (segment, offset, length), its state, due and lease times and
//! attempts — never the payload. `lease` and `list_dead` read payloads back
//! with positioned reads and check the frame's CRC again.
//!
//! # Durability
//!
//! One writer thread appends: concurrent calls queue their frames, the
//! writer writes everything queued in one `write` and, in
//! [`FsyncMode::Always`] (the default), one `fdatasync` (group commit).
//!
//! The active segment is preallocated ahead of its data
//! ([`DiskSpoolConfig::preallocate_bytes`], default 1 MiB) with padding
//! frames (kind 9) laid out every 512 bytes, written and synced once. A
//! batch is written over them and padded up to the next multiple of 512
//! bytes, so the segment is a valid sequence of frames at every moment, and
//! the `fdatasync` of a batch changes no metadata (the file's size and
//! blocks are already on disk): it flushes the data without a journal
//! commit or an inode write. A replay skips padding; opening resumes after
//! the last frame that is not padding; a sealed segment is cut to its data.
//!
//! - `enqueue` returns once its frames are written and, per the mode, synced:
//!   [`Durability::Synced`](reliability_core::Durability::Synced) (`Always`),
//!   [`Durability::Periodic`](reliability_core::Durability::Periodic)
//!   (`Interval`), [`Durability::Flushed`](reliability_core::Durability::Flushed)
//!   (`Never`: survives a crash of the process, not of the machine).
//!   [`Capabilities::durable`](reliability_core::Capabilities::durable) is
//!   `true` in every mode: acknowledged records survive a restart of the
//!   process (and, except with `Never`, of the machine within the interval).
//! - `lease`, `ack`, `nack`, `extend`, `dead_letter`, `redrive_dead` and
//!   `purge_dead` return once their frames are written (handed to the OS),
//!   without waiting for a sync: a process crash keeps them, a power loss may
//!   undo the last ones, which at worst delivers a record again
//!   (at-least-once).
//!
//! # Compaction
//!
//! A sealed segment is deleted once it is the oldest one and every record
//! enqueued in it is acked or purged — and only after the active segment
//! (holding those acks) is synced; the directory is synced after the unlink.
//! Later state changes only ever refer back to older segments, so deleting
//! the oldest obsolete segment never changes what a replay rebuilds.
//! Deletion stays oldest first on purpose: a younger segment may hold the
//! ack or the dead-letter frame of a record whose enqueue frame sits in an
//! older one, and deleting it alone would bring the record back or undo its
//! state (and a gap in the numbering remains what it was: damage).
//!
//! # Relocation
//!
//! One long-lived record (delayed for hours, dead-lettered and never
//! redriven, leased by a stuck consumer) would keep its segment, and so
//! every segment after it. So the writer rewrites the records still in the
//! oldest sealed segment at the head of the log, with their current state
//! (an enqueue frame with the same id, seq, times, attempts and payload,
//! then a lease or dead-letter frame as the record needs), when their
//! enqueue frames take less than
//! [`DiskSpoolConfig::relocate_below_percent`] of its bytes (default 25 %),
//! or when the segments hold more than twice the bytes of all records'
//! enqueue frames plus two segments (so the files stay within about twice
//! the records' bytes plus two segments, and cleaning writes no more than
//! it frees). Relocation runs on the writer thread in steps of at most
//! 1 MiB of records, queued behind the calls already waiting (so a state
//! change made after a step is logged after it);
//! [`DiskSpool::relocated_total`] counts the records moved.
//!
//! Durability order: the relocated frames are written; the records point
//! at them; the old segment, now unpinned, is deleted as above — after the
//! active segment holding the relocated frames is synced, then the
//! directory. A crash before the deletion leaves both copies: a replay
//! reads a second enqueue frame for an id as a move, the newest copy and
//! the frames after it win (no duplicate, and an ack after the copy still
//! deletes the record); a torn copy is quarantined and the old one stays.
//!
//! # Corruption
//!
//! A bad checksum, a torn or zero-filled tail, a garbage file in `segments/`
//! or a missing segment never stop `open`: the good records are kept, what
//! is bad is copied to `quarantine/` with a reason file, counted in
//! [`SpoolStats::quarantined_total`](reliability_core::SpoolStats::quarantined_total)
//! and logged. A bad frame inside a segment is overwritten in place by a
//! padding frame of the same size (after its bytes are in quarantine); a
//! torn tail is truncated. A second open finds nothing left to quarantine.
//! [`inspect`] reports what a directory holds without changing it;
//! [`repair`] does the quarantining without opening a spool.
//!
//! # I/O faults
//!
//! Only bytes that were read and fail their checksum or decoding (or that
//! are gone: a missing segment, a file cut short) are corruption. A read
//! that fails (EIO, EMFILE when the process is out of descriptors) is an
//! [`UnavailableReason::Io`](reliability_core::UnavailableReason::Io)
//! error to the caller and the records stay: `lease` gives the records it
//! took back (ready again, the attempt counted), `list_dead` lists nothing.
//! A failed write (ENOSPC, EIO) fails its batch, and the segment is cut
//! back to where the batch began.
//!
//! A failed `fsync`/`fdatasync` (of a segment or a directory, in any
//! [`FsyncMode`]) stops the spool for good. The kernel may have dropped
//! the dirty pages and reports the error once: a retry on the same
//! descriptor would succeed without the data being on disk, and a
//! compaction after it could delete the only synced copy of relocated
//! records. So the writer never syncs, compacts or relocates again; the
//! requests the sync covered fail (an `enqueue` is never acknowledged), and
//! so does every later one; [`DiskSpool::health`] and `stats` fail with
//! the reason (a status built from them turns unhealthy). Reopening the
//! spool, which replays what is really on disk, is the only way back (as
//! PostgreSQL recovers from its log).
//!
//! Payload reads, quarantine copies and their syncs run on blocking
//! threads, never on the async runtime's workers. Dropping a spool inside
//! a runtime does not wait there for the writer's final sync;
//! [`DiskSpool::close`] does, and so does the next open of the directory.
#![doc(test(attr(deny(warnings))))]

pub mod codec;
mod fsck;
mod fsio;
mod index;
mod recover;
mod relocate;
mod spool;
mod writer;

pub use fsck::{
    inspect, repair, Finding, FindingKind, InspectReport, QuarantinedItem, RepairReport,
    SegmentReport,
};
#[doc(hidden)]
pub use fsio::faults;
pub use spool::{
    DiskSpool, DiskSpoolBuilder, DiskSpoolConfig, FsyncMode, DEFAULT_PREALLOCATE_BYTES,
    DEFAULT_RELOCATE_BELOW_PERCENT, DEFAULT_SEGMENT_MAX_BYTES,
};
