//! [`DiskSpool`] and its configuration.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use reliability_core::{
    system_clock, Capabilities, DeadReason, DeadRecord, Durability, Enqueued, Error, LeaseToken,
    Leased, NackOutcome, NewRecord, Record, RecordId, Result, SharedClock, Spool, SpoolLimits,
    SpoolStats, SpoolToken, Timestamp, UnavailableReason,
};
use tokio::sync::oneshot;

use crate::codec::{self, Entry};
use crate::fsio::{self, create_dir_durably, faults::Faults, Open, SharedFs};
use crate::index::{Index, Live, Loc, NotOwner};
use crate::recover::{
    quarantine_dir, recover, segment_header, segment_path, segments_dir, Quarantine, SEG_HEADER_LEN,
};
use crate::writer::{stopped_error, Cmd, Completion, Pin, Stopped, WriteReq, Writer, Written};

pub(crate) const BACKEND: &str = "disk";

/// Default size at which the active segment is sealed and a new one begun.
pub const DEFAULT_SEGMENT_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// Default stretch by which the active segment is preallocated ahead of its
/// data.
pub const DEFAULT_PREALLOCATE_BYTES: u64 = 1024 * 1024;

/// Default share (in percent of its bytes) under which the records of the
/// oldest sealed segment are relocated.
pub const DEFAULT_RELOCATE_BELOW_PERCENT: u8 = 25;

/// When the spool syncs its log to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FsyncMode {
    /// `enqueue` returns after the `fdatasync` covering its records (group
    /// commit). The default.
    #[default]
    Always,
    /// The writer syncs at most this long after a write; a power loss may
    /// lose that much. A failed periodic sync stops the spool (see the
    /// crate docs, I/O faults): it no longer claims this durability.
    Interval(Duration),
    /// Never explicitly (except when sealing a segment, before compaction
    /// and on close); survives a process crash, not a power loss.
    Never,
}

impl FsyncMode {
    /// The durability `enqueue` reports in this mode.
    pub fn durability(self) -> Durability {
        match self {
            FsyncMode::Always => Durability::Synced,
            FsyncMode::Interval(interval) => Durability::Periodic { interval },
            FsyncMode::Never => Durability::Flushed,
        }
    }
}

/// Configuration of a [`DiskSpool`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiskSpoolConfig {
    /// Directory of the spool (created if missing).
    pub dir: PathBuf,
    /// Limits; default [`SpoolLimits::default`].
    pub limits: SpoolLimits,
    /// When to sync; default [`FsyncMode::Always`].
    pub fsync: FsyncMode,
    /// Size at which a segment is sealed; default 64 MiB.
    pub segment_max_bytes: u64,
    /// How far ahead of its data the active segment is preallocated, with
    /// padding frames written (and synced) once, so that the sync of each
    /// batch written over them changes no file metadata; default 1 MiB, at
    /// most 64 MiB, 0 turns preallocation off (the segment grows with every
    /// write).
    pub preallocate_bytes: u64,
    /// When the enqueue frames of the records still in the oldest sealed
    /// segment take less than this share (percent) of its bytes, they are
    /// rewritten at the head of the log so that the segment can be deleted
    /// (see the crate docs, Relocation); default 25, at most 100. 0 leaves
    /// only the rule that relocates when the log holds more than twice its
    /// records' bytes; 100 relocates the oldest sealed segment whenever it
    /// holds records, which rewrites a backlog again and again (tests use
    /// it to relocate often).
    pub relocate_below_percent: u8,
}

impl DiskSpoolConfig {
    /// A spool in `dir` with every other setting at its default.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            limits: SpoolLimits::default(),
            fsync: FsyncMode::default(),
            segment_max_bytes: DEFAULT_SEGMENT_MAX_BYTES,
            preallocate_bytes: DEFAULT_PREALLOCATE_BYTES,
            relocate_below_percent: DEFAULT_RELOCATE_BELOW_PERCENT,
        }
    }
}

/// Builder of a [`DiskSpool`]; see [`DiskSpool::builder`].
#[derive(Debug)]
#[must_use]
pub struct DiskSpoolBuilder {
    config: DiskSpoolConfig,
    clock: Option<SharedClock>,
    fault: Option<Arc<AtomicU64>>,
    fs: Option<SharedFs>,
}

impl DiskSpoolBuilder {
    /// The limits to enforce. Default: [`SpoolLimits::default`].
    pub fn limits(mut self, limits: SpoolLimits) -> Self {
        self.config.limits = limits;
        self
    }

    /// When to sync. Default: [`FsyncMode::Always`].
    pub fn fsync(mut self, mode: FsyncMode) -> Self {
        self.config.fsync = mode;
        self
    }

    /// Size at which a segment is sealed. Default 64 MiB.
    pub fn segment_max_bytes(mut self, bytes: u64) -> Self {
        self.config.segment_max_bytes = bytes;
        self
    }

    /// How far ahead of its data the active segment is preallocated (0: not
    /// at all). Default 1 MiB; see [`DiskSpoolConfig::preallocate_bytes`].
    pub fn preallocate_bytes(mut self, bytes: u64) -> Self {
        self.config.preallocate_bytes = bytes;
        self
    }

    /// The share of its bytes under which the records of the oldest sealed
    /// segment are relocated. Default 25; see
    /// [`DiskSpoolConfig::relocate_below_percent`].
    pub fn relocate_below_percent(mut self, percent: u8) -> Self {
        self.config.relocate_below_percent = percent;
        self
    }

    /// The clock to read time from. Default: the system clock.
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Opens the spool: locks the directory, replays the log, quarantines
    /// what is corrupt and starts the writer.
    ///
    /// # Errors
    /// [`Error::Unavailable`] with [`UnavailableReason::Io`] when the
    /// directory cannot be created or read, or is locked by another open
    /// spool; [`Error::Config`] for an invalid setting.
    pub async fn open(self) -> Result<DiskSpool> {
        let DiskSpoolBuilder {
            config,
            clock,
            fault,
            fs,
        } = self;
        let fs = fs.unwrap_or_else(fsio::real);
        let clock = clock.unwrap_or_else(system_clock);
        if config.segment_max_bytes == 0 {
            return Err(Error::config(
                "segment_max_bytes",
                "must be greater than zero",
            ));
        }
        if config.limits.max_record_bytes > MAX_PAYLOAD {
            return Err(Error::config(
                "limits.max_record_bytes",
                format!("the disk spool stores payloads of at most {MAX_PAYLOAD} bytes"),
            ));
        }
        if config.relocate_below_percent > 100 {
            return Err(Error::config(
                "relocate_below_percent",
                "must be at most 100",
            ));
        }
        if let FsyncMode::Interval(d) = config.fsync {
            if d.is_zero() {
                return Err(Error::config(
                    "fsync",
                    "the interval must be greater than zero",
                ));
            }
        }
        let dir = config.dir.clone();
        tokio::task::spawn_blocking(move || open_blocking(config, clock, fault, fs))
            .await
            .map_err(|e| {
                Error::unavailable(
                    BACKEND,
                    UnavailableReason::Io,
                    format!("opening {}: {e}", dir.display()),
                )
            })?
    }

    /// Test hook: writes fail with "no space left on device" once `budget`
    /// bytes were written (the counter goes down as the spool writes; raise
    /// it to let writes succeed again). For full-disk tests where a small
    /// filesystem cannot be mounted.
    #[doc(hidden)]
    pub fn fail_writes_after(mut self, budget: Arc<AtomicU64>) -> Self {
        self.fault = Some(budget);
        self
    }

    /// Test hook: the spool's file-system calls go through `faults`, which
    /// fails the ones it is told to (see [`crate::faults`]).
    #[doc(hidden)]
    pub fn faults(mut self, faults: Arc<Faults>) -> Self {
        self.fs = Some(faults);
        self
    }
}

/// Largest payload the format stores (a frame is at most
/// [`codec::MAX_FRAME_LEN`] bytes, ids and times included).
const MAX_PAYLOAD: usize = codec::MAX_FRAME_LEN as usize - 1024;

/// Open read handles of segments, for positioned reads of payloads.
#[derive(Debug)]
pub(crate) struct ReadFiles {
    dir: PathBuf,
    pub(crate) fs: SharedFs,
    files: Mutex<HashMap<u32, Arc<File>>>,
}

impl ReadFiles {
    fn get(&self, seg: u32) -> io::Result<Arc<File>> {
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = files.get(&seg) {
            return Ok(f.clone());
        }
        let f = Arc::new(self.fs.open(&segment_path(&self.dir, seg), Open::Read)?);
        files.insert(seg, f.clone());
        Ok(f)
    }

    /// Reads back the payload of the enqueue frame of `id` at `loc`
    /// (checking the frame's CRC and id).
    ///
    /// # Errors
    /// [`ReadError::Io`] when the read itself fails (nothing is known about
    /// the bytes: retry later); [`ReadError::Corrupt`] when the bytes read
    /// are not the frame, or are gone (the segment is missing or shorter).
    pub(crate) fn read_enqueue(
        &self,
        id: &RecordId,
        loc: Loc,
    ) -> std::result::Result<Bytes, ReadError> {
        let mut buf = vec![0u8; loc.len as usize];
        let read = self
            .get(loc.seg)
            .and_then(|file| self.fs.read_at(&file, &mut buf, loc.off));
        if let Err(e) = read {
            return Err(ReadError::from_io(e));
        }
        let why = match codec::decode(&buf) {
            Ok(Some((
                Entry::Enqueue {
                    id: got, payload, ..
                },
                _,
            ))) if &got == id => return Ok(payload),
            Ok(Some((other, _))) => format!(
                "expected the enqueue frame of {id}, found a {} frame",
                other.kind_name()
            ),
            Ok(None) => "frame cut short".into(),
            Err(e) => e.to_string(),
        };
        Err(ReadError::Corrupt { why, bytes: buf })
    }

    /// Drops the handle of a deleted segment (readers holding it finish).
    pub(crate) fn forget(&self, seg: u32) {
        self.files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&seg);
    }
}

/// Why a record's enqueue frame did not read back.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The read failed (EIO, EMFILE, ...): the bytes may well be fine, the
    /// record stays; the caller gets an unavailable error.
    Io(io::Error),
    /// The bytes read are not the frame (checksum, decoding, another
    /// record), or are gone: corruption, the record goes to quarantine.
    Corrupt {
        /// What is wrong.
        why: String,
        /// The bytes read (empty when they are gone).
        bytes: Vec<u8>,
    },
}

impl ReadError {
    /// A failed read: a missing segment or one cut short is corruption,
    /// anything else is the disk or the process failing for now.
    fn from_io(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::UnexpectedEof => ReadError::Corrupt {
                why: e.to_string(),
                bytes: Vec::new(),
            },
            _ => ReadError::Io(e),
        }
    }
}

/// What a payload read gave: the payload, or where it read last and why
/// it failed.
type PayloadRead = std::result::Result<Bytes, (Loc, ReadError)>;

/// Writers of spools dropped inside an async runtime that may still be
/// finishing (final sync), by spool directory: an open of the same
/// directory joins them first, so that it never finds the lock still held
/// by its own process.
static FINISHING: Mutex<Vec<(PathBuf, JoinHandle<()>)>> = Mutex::new(Vec::new());

/// Joins the writers of `dir` still finishing (and forgets finished ones).
pub(crate) fn join_finishing(dir: &Path) {
    let mine: Vec<JoinHandle<()>> = {
        let mut all = FINISHING.lock().unwrap_or_else(PoisonError::into_inner);
        let (mine, rest): (Vec<_>, Vec<_>) = all
            .drain(..)
            .filter(|(_, h)| !h.is_finished())
            .partition(|(d, _)| d == dir);
        *all = rest;
        mine.into_iter().map(|(_, h)| h).collect()
    };
    for h in mine {
        let _ = h.join();
    }
}

/// Everything under the state mutex.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) index: Index,
    /// Ids whose enqueue frames are being written: duplicates, and they take
    /// room, but are not leasable yet.
    pending: HashSet<RecordId>,
    pending_bytes: u64,
    expired_total: u64,
    quarantined_total: u64,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    /// `dir`, canonical: the key of [`FINISHING`].
    key: PathBuf,
    /// Set by the writer when a sync failed (see [`DiskSpool::health`]).
    stopped: Stopped,
    /// Shared with the writer thread, which runs the completions of a
    /// committed batch under one lock.
    state: Arc<Mutex<State>>,
    files: Arc<ReadFiles>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock, and every mutation
        // keeps the state consistent step by step; a poisoned lock is safe.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A durable [`Spool`] on a local directory: a segmented, CRC32C-checked,
/// group-committed log. See the [crate docs](crate) for the format and the
/// guarantees.
///
/// ```
/// use std::time::Duration;
/// use reliability_core::{NewRecord, RecordId, Spool};
/// use reliability_disk::DiskSpool;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> reliability_core::Result<()> {
/// let dir = std::env::temp_dir().join(format!("disk-spool-doc-{}", std::process::id()));
/// let spool = DiskSpool::builder(&dir).open().await?;
/// spool.enqueue(vec![NewRecord::new(RecordId::new("order-42")?, "payload")]).await?;
/// spool.close().await?;
///
/// // The record survives a restart.
/// let spool = DiskSpool::builder(&dir).open().await?;
/// let leased = spool.lease(10, Duration::from_secs(30)).await?;
/// assert_eq!(leased[0].record.payload, "payload");
/// spool.ack(&leased[0].token).await?;
/// spool.close().await?;
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok(())
/// # }
/// ```
pub struct DiskSpool {
    shared: Arc<Shared>,
    limits: SpoolLimits,
    mode: FsyncMode,
    clock: SharedClock,
    tx: Option<mpsc::Sender<Cmd>>,
    writer: Option<JoinHandle<()>>,
    /// Records relocated since open (the writer counts).
    relocated: Arc<AtomicU64>,
}

impl fmt::Debug for DiskSpool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.shared.state();
        f.debug_struct("DiskSpool")
            .field("dir", &self.shared.dir)
            .field("fsync", &self.mode)
            .field("limits", &self.limits)
            .field("live", &st.index.live.len())
            .field("dead", &st.index.dead_ids.len())
            .field("bytes", &st.index.bytes)
            .finish()
    }
}

/// A held directory lock: released explicitly when dropped (closing the
/// file alone would leave it held while a process forked meanwhile still
/// has the descriptor, until that process execs).
#[derive(Debug)]
pub(crate) struct DirLock(pub(crate) File);

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = fs4::FileExt::unlock(&self.0);
    }
}

/// Takes the exclusive OS lock of `dir/LOCK` (released by the OS when the
/// process dies: no stale lock file after kill -9).
///
/// # Errors
/// Unavailable (Io) naming the directory when another owner holds it or the
/// file cannot be opened.
pub(crate) fn lock_dir(dir: &Path) -> Result<File> {
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("LOCK"))
        .map_err(|e| io_error("cannot open the lock file", dir, e))?;
    match fs4::FileExt::try_lock(&lock) {
        Ok(()) => Ok(lock),
        Err(fs4::TryLockError::WouldBlock) => Err(Error::unavailable(
            BACKEND,
            UnavailableReason::Io,
            format!(
                "spool directory {} is in use: another open DiskSpool holds its lock",
                dir.display()
            ),
        )),
        Err(fs4::TryLockError::Error(e)) => {
            Err(io_error("cannot lock the spool directory", dir, e))
        }
    }
}

pub(crate) fn io_error(what: &str, dir: &Path, e: io::Error) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        reason: UnavailableReason::Io,
        message: format!("{what} ({}): {e}", dir.display()),
        source: Some(Box::new(e)),
    }
}

fn closed() -> Error {
    Error::unavailable(
        BACKEND,
        UnavailableReason::Closed,
        "the disk spool's writer stopped",
    )
}

fn lost(token: &SpoolToken) -> Error {
    Error::lease_lost(token.id().as_str())
}

fn open_blocking(
    config: DiskSpoolConfig,
    clock: SharedClock,
    fault: Option<Arc<AtomicU64>>,
    vfs: SharedFs,
) -> Result<DiskSpool> {
    let dir = config.dir.clone();
    create_dir_durably(&*vfs, &dir)
        .map_err(|e| io_error("cannot create the spool directory", &dir, e))?;
    let key = dir.canonicalize().unwrap_or_else(|_| dir.clone());
    join_finishing(&key);
    let lock = lock_dir(&dir)?;
    let rec = recover(&vfs, &dir, true).map_err(|e| io_error("cannot read the spool", &dir, e))?;
    let active = match rec.active() {
        Some(a) => a,
        None => {
            let path = segment_path(&dir, 1);
            let create = || -> io::Result<()> {
                let f = vfs.open(&path, Open::Create)?;
                vfs.write_at(&f, &segment_header(1), 0)?;
                vfs.sync_all(&f)?;
                vfs.sync_dir(&segments_dir(&dir))
            };
            create().map_err(|e| io_error("cannot create the first segment", &dir, e))?;
            (1, SEG_HEADER_LEN, SEG_HEADER_LEN)
        }
    };
    let pins = rec.index.pins_per_segment();
    let counts: BTreeMap<u32, Pin> = rec
        .segments
        .iter()
        .map(|&(n, size, _)| {
            let (records, bytes) = pins.get(&n).copied().unwrap_or_default();
            (
                n,
                Pin {
                    records,
                    bytes,
                    size,
                },
            )
        })
        .collect();
    let files = Arc::new(ReadFiles {
        dir: dir.clone(),
        fs: vfs.clone(),
        files: Mutex::new(HashMap::new()),
    });
    let quarantined = rec.findings.len() as u64;
    let state = Arc::new(Mutex::new(State {
        index: rec.index,
        quarantined_total: quarantined,
        ..State::default()
    }));
    let stopped: Stopped = Arc::new(OnceLock::new());
    let mut writer = Writer::new(
        &config,
        active,
        counts,
        (files.clone(), state.clone(), stopped.clone()),
        DirLock(lock),
    )
    .map_err(|e| io_error("cannot open the active segment", &dir, e))?;
    writer.fault = fault;
    let relocated = writer.reloc.moved.clone();
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("reliability-disk-writer".into())
        .spawn(move || writer.run(rx))
        .map_err(|e| io_error("cannot start the writer thread", &dir, e))?;
    if quarantined > 0 {
        tracing::warn!(
            dir = %dir.display(),
            quarantined,
            "disk spool: opened with corrupt parts moved to quarantine"
        );
    }
    Ok(DiskSpool {
        shared: Arc::new(Shared {
            dir,
            key,
            stopped,
            state,
            files,
        }),
        limits: config.limits,
        mode: config.fsync,
        clock,
        tx: Some(tx),
        writer: Some(handle),
        relocated,
    })
}

/// A batch of frames to queue, built under the state lock.
#[derive(Default)]
struct Frames {
    bytes: Vec<u8>,
    released: Vec<Loc>,
}

impl Frames {
    fn push(&mut self, e: &Entry) {
        codec::encode(e, &mut self.bytes);
    }
}

/// Moves a record past retention to the dead-letter queue as `Expired`:
/// logs the frame, counts it, and updates the index.
fn expire(st: &mut State, frames: &mut Frames, id: RecordId, live: Live, now: Timestamp) {
    let seq = st.index.seq();
    frames.push(&Entry::DeadLetter {
        id: id.clone(),
        seq,
        dead_at: now,
        attempts: live.attempts,
        reason: DeadReason::Expired,
    });
    st.expired_total += 1;
    st.index.bury(id, live, DeadReason::Expired, now, seq);
}

/// What `lease` hands out, payload still on disk.
struct Picked {
    id: RecordId,
    token: LeaseToken,
    loc: Loc,
    attempts: u32,
    enqueued_at: Timestamp,
}

impl DiskSpool {
    /// A builder for a spool in `dir`.
    pub fn builder(dir: impl Into<PathBuf>) -> DiskSpoolBuilder {
        DiskSpoolBuilder {
            config: DiskSpoolConfig::new(dir),
            clock: None,
            fault: None,
            fs: None,
        }
    }

    /// Opens a spool with `config` and the system clock.
    ///
    /// # Errors
    /// As [`DiskSpoolBuilder::open`].
    pub async fn open(config: DiskSpoolConfig) -> Result<DiskSpool> {
        DiskSpoolBuilder {
            config,
            clock: None,
            fault: None,
            fs: None,
        }
        .open()
        .await
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The limits this spool enforces.
    pub fn limits(&self) -> SpoolLimits {
        self.limits
    }

    /// Records rewritten at the head of the log since the spool opened, so
    /// that the sparse old segments holding them could be deleted (see the
    /// crate docs, Compaction).
    pub fn relocated_total(&self) -> u64 {
        self.relocated.load(Ordering::Relaxed)
    }

    /// Writes and syncs everything queued, stops the writer and releases the
    /// directory lock.
    ///
    /// # Errors
    /// [`Error::Unavailable`] with [`UnavailableReason::Io`] if the final
    /// sync fails (the lock is released all the same).
    pub async fn close(mut self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let sent = self
            .tx
            .take()
            .is_some_and(|s| s.send(Cmd::Close(tx)).is_ok());
        let r = if sent {
            match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(io_error("final sync failed", &self.shared.dir, e)),
                Err(_) => Err(closed()),
            }
        } else {
            Err(closed())
        };
        if let Some(h) = self.writer.take() {
            // The writer has answered and is returning (its end releases
            // the directory's lock): joining is immediate.
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        r
    }

    /// Waits (on a blocking thread) until the writers of spools in `dir`
    /// dropped inside an async runtime have finished: their final sync is
    /// done and the directory is unlocked. Dropping a spool inside a
    /// runtime does not wait for that (it would block a worker thread);
    /// [`close`](Self::close) does, and so does the next open of `dir`.
    pub async fn wait_dropped(dir: impl AsRef<Path>) {
        let dir = dir.as_ref();
        let key = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        let _ = tokio::task::spawn_blocking(move || join_finishing(&key)).await;
    }

    /// `Ok` while the spool accepts writes.
    ///
    /// # Errors
    /// [`Error::Unavailable`] with [`UnavailableReason::Io`] once a sync
    /// failed: after a failed `fsync` the data it covered may be gone while
    /// a retry would report success, so the spool fails the writes that
    /// sync covered, refuses every write after it and never deletes a
    /// segment again. Only reopening it (a replay of what is on disk)
    /// recovers. [`Spool::stats`] fails the same way, so a status built
    /// from it turns unhealthy.
    pub fn health(&self) -> Result<()> {
        match self.shared.stopped.get() {
            Some(why) => Err(io_error(
                "the disk spool stopped",
                &self.shared.dir,
                stopped_error(why),
            )),
            None => Ok(()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state()
    }

    fn expired(&self, enqueued_at: Timestamp, now: Timestamp) -> bool {
        enqueued_at.saturating_add(self.limits.retention) <= now
    }

    /// Queues `frames` (call under the state lock, `st`, so log order is
    /// state-change order). If the writer has stopped, `done` runs at once
    /// on `st` with an error.
    fn send(
        &self,
        st: &mut State,
        frames: Frames,
        sync: bool,
        enqueued: u64,
        done: Option<Completion>,
    ) -> Result<oneshot::Receiver<io::Result<Written>>> {
        let (tx, rx) = oneshot::channel();
        let mut req = WriteReq {
            bytes: frames.bytes,
            sync,
            enqueued,
            released: frames.released,
            moves: Vec::new(),
            done,
            reply: Some(tx),
        };
        if let Some(why) = self.shared.stopped.get() {
            if let Some(done) = req.done.take() {
                done(st, &Err(stopped_error(why)));
            }
            return Err(io_error(
                "the disk spool stopped",
                &self.shared.dir,
                stopped_error(why),
            ));
        }
        match &self.tx {
            Some(s) => match s.send(Cmd::Write(req)) {
                Ok(()) => Ok(rx),
                Err(mpsc::SendError(Cmd::Write(mut req))) => {
                    if let Some(done) = req.done.take() {
                        done(st, &Err(io::Error::other("writer stopped")));
                    }
                    Err(closed())
                }
                Err(_) => Err(closed()),
            },
            None => Err(closed()),
        }
    }

    async fn wait(&self, rx: oneshot::Receiver<io::Result<Written>>, what: &str) -> Result<()> {
        match rx.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(io_error(what, &self.shared.dir, e)),
            Err(_) => Err(closed()),
        }
    }

    /// Reads the payloads of the records `lease` picked (and logged as
    /// leased) and hands them out. Corrupt ones go to quarantine and leave
    /// the spool; if a read fails (EIO, EMFILE, ...), every picked record
    /// is given back and the call fails.
    async fn hand_out(&self, picked: Vec<Picked>) -> Result<Vec<Leased>> {
        let wanted = picked.iter().map(|p| (p.id.clone(), p.loc)).collect();
        let read = self.read_payloads(wanted).await;
        let mut out = Vec::with_capacity(picked.len());
        let mut lost = Vec::new();
        let mut taken = Vec::with_capacity(picked.len());
        let mut failed = None;
        for (p, r) in picked.into_iter().zip(read) {
            match r {
                Ok(payload) => {
                    taken.push((p.id.clone(), p.token));
                    out.push(Leased::new(
                        Record::new(p.id.clone(), payload, p.attempts, p.enqueued_at),
                        SpoolToken::new(p.id, p.token),
                    ));
                }
                Err((at, ReadError::Corrupt { .. })) => lost.push((p.id, at)),
                Err((_, ReadError::Io(e))) => {
                    taken.push((p.id, p.token));
                    failed.get_or_insert(e);
                }
            }
        }
        self.forget_corrupt(lost);
        if let Some(e) = failed {
            // Nothing is known about the bytes: the records stay, ready
            // again, and the caller tries later.
            self.release(&taken).await;
            return Err(io_error(
                "cannot read leased records back (they stay in the spool)",
                &self.shared.dir,
                e,
            ));
        }
        Ok(out)
    }

    /// Reads the payloads of `wanted` (id, where its enqueue frame was)
    /// on a blocking thread, never on the runtime's; copies the bytes of
    /// those that are corrupt to quarantine there too. Results in order.
    async fn read_payloads(&self, wanted: Vec<(RecordId, Loc)>) -> Vec<PayloadRead> {
        let locs: Vec<Loc> = wanted.iter().map(|(_, loc)| *loc).collect();
        let shared = self.shared.clone();
        let read = tokio::task::spawn_blocking(move || {
            wanted
                .iter()
                .map(|(id, loc)| match shared.read_payload(id, *loc) {
                    // A record leaves the spool only once its bytes are
                    // safe in quarantine; if they cannot be put there, it
                    // stays and the call fails.
                    Err((at, ReadError::Corrupt { why, bytes })) => {
                        match shared.quarantine_copy(id, at, &why, &bytes) {
                            Ok(()) => Err((at, ReadError::Corrupt { why, bytes })),
                            Err(e) => Err((at, ReadError::Io(e))),
                        }
                    }
                    r => r,
                })
                .collect()
        })
        .await;
        read.unwrap_or_else(|e| {
            locs.into_iter()
                .map(|loc| Err((loc, ReadError::Io(io::Error::other(e.to_string())))))
                .collect()
        })
    }

    /// Records whose frames are corrupt (their bytes already copied to
    /// quarantine) leave the index, an ack frame records it; each stays if
    /// it is no longer at the place read (acked, or relocated, meanwhile).
    fn forget_corrupt(&self, lost: Vec<(RecordId, Loc)>) {
        if lost.is_empty() {
            return;
        }
        let mut st = self.state();
        let mut f = Frames::default();
        for (id, loc) in lost {
            st.quarantined_total += 1;
            if st.index.loc_of(&id) != Some(loc) {
                // The ack below would unpin the wrong segment.
                continue;
            }
            let removed = match st.index.take_live(&id) {
                Some(l) => Some(l.payload_len),
                None => st.index.remove_dead(&id).map(|d| d.payload_len),
            };
            if let Some(len) = removed {
                st.index.bytes -= u64::from(len);
                f.push(&Entry::Ack { id });
                f.released.push(loc);
            }
        }
        if !f.bytes.is_empty() {
            let _ = self.send(&mut st, f, false, 0, None);
        }
    }

    /// Gives records `lease` took back (their payloads did not read): each
    /// still leased with its token is ready again (a nack frame due now
    /// records it; the attempt it took counts).
    async fn release(&self, taken: &[(RecordId, LeaseToken)]) {
        let now = self.clock.now();
        let rx = {
            let mut st = self.state();
            let mut f = Frames::default();
            for (id, token) in taken {
                let Ok(mut live) = st.index.take_owned(id, *token) else {
                    continue;
                };
                live.lease = None;
                live.due_at = live.due_at.min(now);
                f.push(&Entry::Nack {
                    id: id.clone(),
                    due_at: live.due_at,
                });
                st.index.insert_live(id.clone(), live);
            }
            if f.bytes.is_empty() {
                return;
            }
            self.send(&mut st, f, false, 0, None)
        };
        if let Ok(rx) = rx {
            if let Err(e) = self.wait(rx, "release").await {
                tracing::warn!(error = %e, "disk spool: records not released stay leased until their lease ends");
            }
        }
    }
}

impl Shared {
    /// Reads the payload of `id`, whose enqueue frame was at `loc` when the
    /// caller looked. If that read fails because the record was relocated
    /// meanwhile (its old segment may be gone), reads it at its current
    /// place. On failure, returns where it read last.
    fn read_payload(&self, id: &RecordId, loc: Loc) -> PayloadRead {
        let mut at = loc;
        loop {
            let err = match self.files.read_enqueue(id, at) {
                Ok(payload) => return Ok(payload),
                Err(e) => e,
            };
            match self.state().index.loc_of(id) {
                // Relocations only move forward: this ends.
                Some(now) if now.seg > at.seg => at = now,
                _ => return Err((at, err)),
            }
        }
    }

    /// Copies the bytes read of a corrupt frame to quarantine with a reason
    /// file (unless the record left `loc` meanwhile).
    ///
    /// # Errors
    /// The copy failed (it is logged).
    fn quarantine_copy(&self, id: &RecordId, loc: Loc, why: &str, bytes: &[u8]) -> io::Result<()> {
        if self.state().index.loc_of(id) != Some(loc) {
            return Ok(());
        }
        tracing::error!(id = %id, segment = loc.seg, offset = loc.off, why, "disk spool: record unreadable, quarantined");
        let q = Quarantine {
            dir: quarantine_dir(&self.dir),
            fix: true,
            fs: self.files.fs.clone(),
        };
        let finding = crate::fsck::Finding::new(
            crate::fsck::FindingKind::BadFrame,
            PathBuf::from("segments").join(crate::recover::segment_name(loc.seg)),
            loc.off,
            u64::from(loc.len),
        )
        .detail(format!("record {id} unreadable at runtime: {why}"));
        let copied = q.bytes(&mut Vec::new(), finding, bytes);
        if let Err(e) = &copied {
            tracing::error!(error = %e, id = %id, "disk spool: cannot copy an unreadable record to quarantine, it stays");
        }
        copied
    }
}

impl Drop for DiskSpool {
    fn drop(&mut self) {
        // Dropping the sender stops the writer after a final sync (its end
        // releases the directory's lock). Inside an async runtime it is not
        // waited for here, which would block a worker thread: the next open
        // of the directory joins it.
        drop(self.tx.take());
        if let Some(h) = self.writer.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                FINISHING
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((self.shared.key.clone(), h));
            } else {
                let _ = h.join();
            }
        }
    }
}

#[async_trait]
impl Spool for DiskSpool {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(BACKEND)
            .with_durable(true)
            .with_reopenable(true)
            .with_bounded(true)
    }

    async fn enqueue(&self, batch: Vec<NewRecord>) -> Result<Enqueued> {
        self.limits.check_batch(&batch)?;
        let now = self.clock.now();
        let durability = self.mode.durability();
        let (rx, accepted, duplicates) = {
            let mut st = self.state();
            let offered = batch.len();
            let fresh: Vec<NewRecord> = batch
                .into_iter()
                .filter(|r| !st.index.contains(&r.id) && !st.pending.contains(&r.id))
                .collect();
            let duplicates = offered - fresh.len();
            let add_bytes: u64 = fresh.iter().map(|r| r.payload.len() as u64).sum();
            self.limits.check_room(
                st.index.held() + st.pending.len() as u64,
                st.index.bytes + st.pending_bytes,
                fresh.len() as u64,
                add_bytes,
            )?;
            if fresh.is_empty() {
                return Ok(Enqueued::new(durability, 0, duplicates));
            }
            let accepted = fresh.len();
            let mut frames = Frames {
                bytes: Vec::with_capacity(fresh.iter().map(|r| r.payload.len() + 192).sum()),
                released: Vec::new(),
            };
            let mut placed = Vec::with_capacity(accepted);
            for r in fresh {
                let seq = st.index.seq();
                let start = frames.bytes.len();
                let payload_len = r.payload.len() as u32;
                let enqueued_at = r.enqueued_at.unwrap_or(now);
                let due_at = now.saturating_add(r.delay);
                frames.push(&Entry::Enqueue {
                    id: r.id.clone(),
                    seq,
                    enqueued_at,
                    due_at,
                    attempts: r.attempts,
                    payload: r.payload,
                });
                let len = (frames.bytes.len() - start) as u32;
                st.pending.insert(r.id.clone());
                st.pending_bytes += u64::from(payload_len);
                placed.push((
                    r.id,
                    start as u64,
                    Live {
                        loc: Loc {
                            seg: 0,
                            off: 0,
                            len,
                        },
                        payload_len,
                        attempts: r.attempts,
                        enqueued_at,
                        due_at,
                        lease: None,
                        seq,
                        ready: false,
                    },
                ));
            }
            let done: Completion = Box::new(move |st: &mut State, r: &io::Result<Written>| {
                for (id, rel, mut live) in placed {
                    st.pending.remove(&id);
                    st.pending_bytes -= u64::from(live.payload_len);
                    if let Ok(w) = r {
                        live.loc.seg = w.seg;
                        live.loc.off = w.off + rel;
                        st.index.bytes += u64::from(live.payload_len);
                        st.index.insert_live(id, live);
                    }
                }
            });
            let sync = self.mode == FsyncMode::Always;
            let rx = self.send(&mut st, frames, sync, accepted as u64, Some(done))?;
            (rx, accepted, duplicates)
        };
        self.wait(rx, "enqueue failed").await?;
        Ok(Enqueued::new(durability, accepted, duplicates))
    }

    async fn lease(&self, max: usize, ttl: Duration) -> Result<Vec<Leased>> {
        if ttl.is_zero() {
            return Err(Error::invalid_argument("ttl", "must be greater than zero"));
        }
        let now = self.clock.now();
        let until = now.saturating_add(ttl);
        let (rx, picked) = {
            let mut st = self.state();
            st.index.promote(now);
            let mut frames = Frames::default();
            let mut picked = Vec::new();
            while picked.len() < max {
                let Some((id, mut live)) = st.index.pop_ready() else {
                    break;
                };
                if self.expired(live.enqueued_at, now) {
                    expire(&mut st, &mut frames, id, live, now);
                    continue;
                }
                let token = LeaseToken::generate();
                live.attempts = live.attempts.saturating_add(1);
                live.lease = Some(Box::new((token, until)));
                frames.push(&Entry::Lease {
                    id: id.clone(),
                    token,
                    lease_until: until,
                    attempts: live.attempts,
                });
                picked.push(Picked {
                    id: id.clone(),
                    token,
                    loc: live.loc,
                    attempts: live.attempts,
                    enqueued_at: live.enqueued_at,
                });
                st.index.insert_live(id, live);
            }
            if frames.bytes.is_empty() {
                return Ok(Vec::new());
            }
            (self.send(&mut st, frames, false, 0, None)?, picked)
        };
        self.wait(rx, "lease failed").await?;
        self.hand_out(picked).await
    }

    async fn ack(&self, token: &SpoolToken) -> Result<()> {
        let rx = {
            let mut st = self.state();
            match st.index.take_owned(token.id(), token.lease()) {
                Ok(live) => {
                    st.index.bytes -= u64::from(live.payload_len);
                    let mut f = Frames::default();
                    f.push(&Entry::Ack {
                        id: token.id().clone(),
                    });
                    f.released.push(live.loc);
                    self.send(&mut st, f, false, 0, None)?
                }
                Err(NotOwner::Gone) => return Ok(()),
                Err(NotOwner::Lost) => return Err(lost(token)),
            }
        };
        self.wait(
            rx,
            "ack not persisted (the record may be delivered again after a restart)",
        )
        .await
    }

    async fn nack(&self, token: &SpoolToken, retry_in: Duration) -> Result<NackOutcome> {
        let now = self.clock.now();
        let (rx, out) = {
            let mut st = self.state();
            let mut live = st
                .index
                .take_owned(token.id(), token.lease())
                .map_err(|_| lost(token))?;
            let id = token.id().clone();
            let mut f = Frames::default();
            if self.expired(live.enqueued_at, now) {
                expire(&mut st, &mut f, id, live, now);
                (
                    self.send(&mut st, f, false, 0, None)?,
                    NackOutcome::DeadLettered(DeadReason::Expired),
                )
            } else {
                live.lease = None;
                live.due_at = now.saturating_add(retry_in);
                f.push(&Entry::Nack {
                    id: id.clone(),
                    due_at: live.due_at,
                });
                st.index.insert_live(id, live);
                (
                    self.send(&mut st, f, false, 0, None)?,
                    NackOutcome::Scheduled { retry_in },
                )
            }
        };
        self.wait(rx, "nack not persisted").await?;
        Ok(out)
    }

    async fn extend(&self, token: &SpoolToken, by: Duration) -> Result<()> {
        if by.is_zero() {
            return Err(Error::invalid_argument("by", "must be greater than zero"));
        }
        let now = self.clock.now();
        let rx = {
            let mut st = self.state();
            let mut live = st
                .index
                .take_owned(token.id(), token.lease())
                .map_err(|_| lost(token))?;
            let until = now.saturating_add(by);
            live.lease = Some(Box::new((token.lease(), until)));
            let mut f = Frames::default();
            f.push(&Entry::Extend {
                id: token.id().clone(),
                token: token.lease(),
                lease_until: until,
            });
            st.index.insert_live(token.id().clone(), live);
            self.send(&mut st, f, false, 0, None)?
        };
        self.wait(rx, "extend not persisted").await
    }

    async fn dead_letter(&self, token: &SpoolToken, reason: DeadReason) -> Result<()> {
        let now = self.clock.now();
        let rx = {
            let mut st = self.state();
            let live = st
                .index
                .take_owned(token.id(), token.lease())
                .map_err(|_| lost(token))?;
            let seq = st.index.seq();
            let mut f = Frames::default();
            f.push(&Entry::DeadLetter {
                id: token.id().clone(),
                seq,
                dead_at: now,
                attempts: live.attempts,
                reason: reason.clone(),
            });
            if reason == DeadReason::Expired {
                st.expired_total += 1;
            }
            st.index.bury(token.id().clone(), live, reason, now, seq);
            self.send(&mut st, f, false, 0, None)?
        };
        self.wait(rx, "dead-letter not persisted").await
    }

    async fn list_dead(&self, max: usize) -> Result<Vec<DeadRecord>> {
        let picked: Vec<(RecordId, crate::index::Dead)> = {
            let st = self.state();
            st.index
                .dead
                .values()
                .take(max)
                .filter_map(|id| st.index.dead_ids.get(id).map(|d| (id.clone(), d.clone())))
                .collect()
        };
        let wanted = picked.iter().map(|(id, d)| (id.clone(), d.loc)).collect();
        let read = self.read_payloads(wanted).await;
        let mut out = Vec::with_capacity(picked.len());
        let mut lost = Vec::new();
        let mut failed = None;
        for ((id, d), r) in picked.into_iter().zip(read) {
            match r {
                Ok(payload) => out.push(DeadRecord::new(
                    Record::new(id, payload, d.attempts, d.enqueued_at),
                    d.reason,
                    d.dead_at,
                )),
                Err((at, ReadError::Corrupt { .. })) => lost.push((id, at)),
                Err((_, ReadError::Io(e))) => {
                    failed.get_or_insert(e);
                }
            }
        }
        self.forget_corrupt(lost);
        match failed {
            Some(e) => Err(io_error(
                "cannot read dead records back (they stay in the spool)",
                &self.shared.dir,
                e,
            )),
            None => Ok(out),
        }
    }

    async fn redrive_dead(&self, max: usize) -> Result<usize> {
        let now = self.clock.now();
        let (rx, n) = {
            let mut st = self.state();
            let ids: Vec<RecordId> = st.index.dead.values().take(max).cloned().collect();
            if ids.is_empty() {
                return Ok(0);
            }
            let mut f = Frames::default();
            for id in &ids {
                let Some(d) = st.index.remove_dead(id) else {
                    continue;
                };
                let seq = st.index.seq();
                f.push(&Entry::Redrive {
                    id: id.clone(),
                    seq,
                    due_at: now,
                });
                st.index.insert_live(
                    id.clone(),
                    Live {
                        loc: d.loc,
                        payload_len: d.payload_len,
                        attempts: 0,
                        enqueued_at: d.enqueued_at,
                        due_at: now,
                        lease: None,
                        seq,
                        ready: false,
                    },
                );
            }
            (self.send(&mut st, f, false, 0, None)?, ids.len())
        };
        self.wait(rx, "redrive not persisted").await?;
        Ok(n)
    }

    async fn purge_dead(&self, max: usize) -> Result<usize> {
        let (rx, n) = {
            let mut st = self.state();
            let ids: Vec<RecordId> = st.index.dead.values().take(max).cloned().collect();
            if ids.is_empty() {
                return Ok(0);
            }
            let mut f = Frames::default();
            for id in &ids {
                if let Some(d) = st.index.remove_dead(id) {
                    st.index.bytes -= u64::from(d.payload_len);
                    f.push(&Entry::Purge { id: id.clone() });
                    f.released.push(d.loc);
                }
            }
            (self.send(&mut st, f, false, 0, None)?, ids.len())
        };
        self.wait(rx, "purge not persisted").await?;
        Ok(n)
    }

    async fn stats(&self) -> Result<SpoolStats> {
        self.health()?;
        let now = self.clock.now();
        let mut st = self.state();
        let mut stats = SpoolStats::default();
        let (ready, delayed, leased, oldest) = st.index.counts(now);
        stats.ready = ready;
        stats.delayed = delayed;
        stats.leased = leased;
        stats.dead = st.index.dead_ids.len() as u64;
        stats.oldest_age = oldest.map(|o| now.saturating_since(o));
        stats.bytes = st.index.bytes;
        stats.expired_total = st.expired_total;
        stats.quarantined_total = st.quarantined_total;
        Ok(stats)
    }
}
