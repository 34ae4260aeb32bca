//! The writer thread: group commit, segment rolls and compaction.
//!
//! Callers queue [`WriteReq`]s on a channel (under the spool's state mutex,
//! so log order is state-change order). The thread takes everything queued,
//! writes it in one `write`, syncs once if any request needs it, then runs
//! the completions of the batch under one lock of the state mutex and, with
//! the lock released, wakes each caller (one oneshot send each). When only
//! some of the callers the last sync answered have queued again, it waits a
//! fraction of a sync (at most [`MAX_STRAGGLER_WAIT`]) for the others, so
//! concurrent producers share one sync instead of splitting into groups that
//! take turns; a lone caller never waits. On a failed write the segment is
//! truncated back to where the batch began and every request of the batch
//! fails: the log never holds a partial batch followed by more.
//!
//! After each batch the writer may take one bounded step of relocation
//! (see [`crate::relocate`]): it queues the step's frames behind whatever
//! was already queued, so they are written in the next batch.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::codec;
use crate::fsio::{Open, SharedFs};
use crate::index::Loc;
use crate::recover::{segment_header, segment_path, segments_dir, PAD_GRID, SEG_HEADER_LEN};
use crate::relocate::{Move, Relocator};
use crate::spool::{DirLock, DiskSpoolConfig, FsyncMode, ReadFiles, State};

/// Largest batch the writer gathers before writing.
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// Largest stretch preallocated at once.
const MAX_PREALLOCATE: u64 = 64 * 1024 * 1024;

/// Longest wait for the callers of the last sync to queue again.
const MAX_STRAGGLER_WAIT: Duration = Duration::from_micros(200);

/// Where a request's bytes landed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Written {
    pub(crate) seg: u32,
    pub(crate) off: u64,
}

/// Runs on the writer thread, under the spool's state lock, once the request
/// is written (and synced if it asked), or failed; before its caller wakes.
pub(crate) type Completion = Box<dyn FnOnce(&mut State, &io::Result<Written>) + Send>;

/// What pins a segment: the records (live or dead) whose enqueue frame is
/// in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Pin {
    /// How many.
    pub(crate) records: u64,
    /// Bytes of their enqueue frames.
    pub(crate) bytes: u64,
    /// Bytes of the segment file once sealed (the active segment's data
    /// ends at [`Writer::len`]).
    pub(crate) size: u64,
}

pub(crate) struct WriteReq {
    pub(crate) bytes: Vec<u8>,
    /// Reply only after a sync covers these bytes.
    pub(crate) sync: bool,
    /// Records enqueued by these bytes (they now pin the segment; the
    /// bytes of such a request are enqueue frames only).
    pub(crate) enqueued: u64,
    /// Enqueue frames of records gone (acked or purged): each unpins its
    /// segment.
    pub(crate) released: Vec<Loc>,
    /// Records these bytes relocate (a relocation step's request).
    pub(crate) moves: Vec<Move>,
    pub(crate) done: Option<Completion>,
    pub(crate) reply: Option<oneshot::Sender<io::Result<Written>>>,
}

/// Why the writer stopped writing: a sync failed. Set once; see
/// [`Writer::sync_failed`].
pub(crate) type Stopped = Arc<OnceLock<String>>;

/// The error every request gets once the writer stopped.
pub(crate) fn stopped_error(why: &str) -> io::Error {
    io::Error::other(format!(
        "writes stopped after a failed sync ({why}); reopen the spool to recover from what is on disk"
    ))
}

pub(crate) enum Cmd {
    Write(WriteReq),
    /// Sync everything and stop.
    Close(oneshot::Sender<io::Result<()>>),
}

pub(crate) struct Writer {
    pub(crate) dir: PathBuf,
    /// The file system (the real one, or a fault-injecting one in tests).
    pub(crate) fs: SharedFs,
    pub(crate) mode: FsyncMode,
    pub(crate) segment_max: u64,
    pub(crate) seg: u32,
    pub(crate) file: File,
    /// Where the data ends: the next batch is written here.
    pub(crate) len: u64,
    /// The file's length: from `len` to here it holds preallocated padding.
    alloc_end: u64,
    /// How far past a batch the active segment is preallocated when it must
    /// grow (0: never).
    prealloc: u64,
    /// Preallocation failed (full disk?): the active segment grows write by
    /// write until the next roll.
    prealloc_failed: bool,
    /// What pins each segment, every segment listed.
    pub(crate) counts: BTreeMap<u32, Pin>,
    pub(crate) files: Arc<ReadFiles>,
    /// The spool's state, locked once per batch to run its completions.
    pub(crate) state: Arc<Mutex<State>>,
    pub(crate) fault: Option<Arc<AtomicU64>>,
    /// Set when a sync failed: nothing is written, synced or deleted after.
    pub(crate) stopped: Stopped,
    /// The directory's lock, released when the writer ends.
    _lock: DirLock,
    dirty: bool,
    last_sync: Instant,
    /// Requests the last sync of a batch answered.
    last_synced: usize,
    /// How long that sync took.
    last_sync_took: Duration,
    buf: Vec<u8>,
    /// Relocation of sparse old segments.
    pub(crate) reloc: Relocator,
}

impl Writer {
    /// A writer of the spool `config` describes, resuming in `active`
    /// (segment, end of its data, length of the file it may keep).
    pub(crate) fn new(
        config: &DiskSpoolConfig,
        active: (u32, u64, u64),
        counts: BTreeMap<u32, Pin>,
        shared: (Arc<ReadFiles>, Arc<Mutex<State>>, Stopped),
        lock: DirLock,
    ) -> io::Result<Self> {
        let (files, state, stopped) = shared;
        let (seg, len, keep) = active;
        let dir = config.dir.clone();
        let fs = files.fs.clone();
        let file = fs.open(&segment_path(&dir, seg), Open::Write)?;
        // After the data there is only padding (recovery truncated or
        // padded over the rest); what is not laid out on the grid goes.
        let alloc_end = keep.max(len);
        if file.metadata()?.len() > alloc_end {
            file.set_len(alloc_end)?;
        }
        let mut counts = counts;
        counts.entry(seg).or_default();
        Ok(Self {
            dir,
            fs,
            mode: config.fsync,
            segment_max: config.segment_max_bytes.max(SEG_HEADER_LEN + 1),
            seg,
            file,
            len,
            alloc_end,
            prealloc: config
                .preallocate_bytes
                .min(MAX_PREALLOCATE)
                .next_multiple_of(PAD_GRID),
            prealloc_failed: false,
            counts,
            files,
            state,
            fault: None,
            stopped,
            _lock: lock,
            dirty: false,
            last_sync: Instant::now(),
            last_synced: 0,
            last_sync_took: Duration::ZERO,
            buf: Vec::new(),
            reloc: Relocator::new(config.relocate_below_percent),
        })
    }

    pub(crate) fn run(mut self, rx: Receiver<Cmd>) {
        let mut batch: Vec<WriteReq> = Vec::new();
        // Commands taken off the channel ahead of a relocation step's
        // request, in order: they go first.
        let mut carry: VecDeque<Cmd> = VecDeque::new();
        loop {
            let first = match (carry.pop_front(), self.interval_deadline()) {
                (Some(c), _) => c,
                (None, Some(deadline)) => {
                    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                        Ok(c) => c,
                        Err(RecvTimeoutError::Timeout) => {
                            self.sync_quietly();
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                (None, None) => match rx.recv() {
                    Ok(c) => c,
                    Err(_) => break,
                },
            };
            let mut close = None;
            let mut bytes = 0;
            let mut syncing = 0;
            let mut waited = false;
            let mut next = Some(first);
            loop {
                while let Some(cmd) = next.take() {
                    match cmd {
                        Cmd::Write(req) => {
                            bytes += req.bytes.len();
                            syncing += usize::from(req.sync);
                            batch.push(req);
                        }
                        Cmd::Close(tx) => {
                            close = Some(tx);
                            break;
                        }
                    }
                    if bytes >= MAX_BATCH_BYTES {
                        break;
                    }
                    next = carry.pop_front().or_else(|| rx.try_recv().ok());
                }
                // The callers the last sync woke are coming back: when only
                // some of them are queued, give the rest a moment (a fraction
                // of a sync) to join this sync instead of waiting a whole
                // extra one. One caller alone never waits.
                if waited
                    || close.is_some()
                    || bytes >= MAX_BATCH_BYTES
                    || syncing == 0
                    || syncing >= self.last_synced
                {
                    break;
                }
                waited = true;
                std::thread::sleep(self.straggler_wait());
                next = carry.pop_front().or_else(|| rx.try_recv().ok());
            }
            if !batch.is_empty() {
                self.commit(&mut batch);
            }
            if let Some(tx) = close {
                let r = self.finish();
                let _ = tx.send(r);
                return;
            }
            self.relocate_step(&rx, &mut carry);
        }
        let _ = self.finish();
    }

    /// How long the writer waits for callers of the last sync to come back
    /// before writing a batch holding only some of them.
    fn straggler_wait(&self) -> Duration {
        (self.last_sync_took / 4).min(MAX_STRAGGLER_WAIT)
    }

    fn interval_deadline(&self) -> Option<Instant> {
        match self.mode {
            FsyncMode::Interval(d) if self.dirty && self.stopped.get().is_none() => {
                Some(self.last_sync + d)
            }
            _ => None,
        }
    }

    /// The error of every request once a sync failed.
    fn stopped(&self) -> Option<io::Error> {
        self.stopped.get().map(|why| stopped_error(why))
    }

    /// Passes on the result of a sync (of a file or a directory); a failure
    /// stops the writer for good.
    ///
    /// After a failed `fsync` the kernel may have dropped the dirty pages
    /// and reports the error once: a retry on the same descriptor would
    /// succeed without the data being on disk. So the writer never syncs
    /// again, never compacts (a deletion could drop the only synced copy of
    /// relocated records), and fails every request; a reopen replays what
    /// is really on disk.
    fn checked(&self, r: io::Result<()>) -> io::Result<()> {
        if let Err(e) = &r {
            if self.stopped.set(e.to_string()).is_ok() {
                tracing::error!(error = %e, "disk spool: sync failed, writes stopped until the spool is reopened");
            }
        }
        r
    }

    fn sync(&mut self) -> io::Result<()> {
        if let Some(e) = self.stopped() {
            return Err(e);
        }
        if self.dirty {
            self.checked(self.fs.sync_data(&self.file))?;
            self.dirty = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    fn sync_quietly(&mut self) {
        if let Err(e) = self.sync() {
            tracing::error!(error = %e, "disk spool: periodic sync failed");
        }
    }

    fn finish(&mut self) -> io::Result<()> {
        self.dirty = true;
        self.sync()?;
        self.checked(self.fs.sync_dir(&segments_dir(&self.dir)))
    }

    /// Appends to the batch in `buf` (to be written at `start`) the padding
    /// that keeps the preallocated frames after it whole, and, when the
    /// batch runs past the preallocated part, the next stretch of
    /// preallocation. Returns whether it added preallocation.
    ///
    /// Preallocated padding frames are written (not `fallocate`d holes or
    /// unwritten extents) so that the `fdatasync` of a batch written over
    /// them changes no metadata: no journal commit (nor, on ext4 without a
    /// journal, an inode write), only the data and a cache flush.
    fn pad_and_preallocate(&mut self, start: u64) -> bool {
        let end = start + self.buf.len() as u64;
        let preallocating = self.prealloc > 0 && !self.prealloc_failed;
        if !(preallocating || end < self.alloc_end) {
            return false;
        }
        let mut gap = end.next_multiple_of(PAD_GRID) - end;
        if gap > 0 && gap < codec::MIN_FRAME as u64 {
            gap += PAD_GRID;
        }
        if gap > 0 {
            self.buf.extend_from_slice(&codec::pad_frame(gap as usize));
        }
        let padded = end + gap;
        if !preallocating || padded <= self.alloc_end {
            return false;
        }
        // Not past the size at which the segment is sealed.
        let sealed_at = self
            .segment_max
            .checked_next_multiple_of(PAD_GRID)
            .unwrap_or(u64::MAX);
        let until = (padded + self.prealloc).min(sealed_at);
        if until <= padded {
            return false;
        }
        let cell = codec::pad_frame(PAD_GRID as usize);
        for _ in 0..(until - padded) / PAD_GRID {
            self.buf.extend_from_slice(&cell);
        }
        true
    }

    fn write_all(&mut self) -> io::Result<()> {
        if let Some(f) = &self.fault {
            let left = f.load(Ordering::Acquire);
            let n = self.buf.len() as u64;
            if n > left {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "no space left on device (injected)",
                ));
            }
            f.fetch_sub(n, Ordering::AcqRel);
        }
        self.fs.write_at(&self.file, &self.buf, self.len)
    }

    fn commit(&mut self, batch: &mut Vec<WriteReq>) {
        if let Some(e) = self.stopped() {
            self.fail(batch, &e);
            return;
        }
        if self.len >= self.segment_max {
            if let Err(e) = self.roll() {
                tracing::error!(error = %e, "disk spool: cannot start a new segment");
                self.fail(batch, &e);
                return;
            }
        }
        self.buf.clear();
        let start = self.len;
        let mut offs = Vec::with_capacity(batch.len());
        for req in batch.iter() {
            offs.push(start + self.buf.len() as u64);
            self.buf.extend_from_slice(&req.bytes);
        }
        let data = self.buf.len();
        let grows = self.pad_and_preallocate(start);
        let mut written = self.write_all();
        if written.is_err() && grows {
            // The preallocation did not fit (a full disk?): write the batch
            // alone; the segment grows write by write until the next roll.
            tracing::warn!(
                segment = self.seg,
                "disk spool: cannot preallocate, growing the segment instead"
            );
            self.prealloc_failed = true;
            if self.file.set_len(start).is_ok() {
                self.alloc_end = start;
                self.buf.truncate(data);
                written = self.write_all();
            }
        }
        if let Err(e) = written {
            tracing::error!(error = %e, segment = self.seg, "disk spool: write failed");
            // Put the segment back as it was before the batch (its
            // preallocated padding included: the next batch grows it).
            let undo = self.file.set_len(start);
            if let Err(u) = undo {
                tracing::error!(error = %u, "disk spool: cannot truncate a failed write");
            }
            self.alloc_end = start;
            self.fail(batch, &e);
            return;
        }
        self.len = start + data as u64;
        self.alloc_end = self.alloc_end.max(start + self.buf.len() as u64);
        self.dirty = true;
        let needs_sync = batch.iter().any(|r| r.sync);
        if batch.iter().any(|r| r.moves.is_empty()) {
            self.reloc.wrote_for_callers();
        }
        // Requests that need no sync are answered before it.
        let mut synced_later = Vec::new();
        let mut now = Vec::new();
        for (req, off) in batch.drain(..).zip(offs) {
            let w = Written { seg: self.seg, off };
            if req.sync {
                synced_later.push((req, Ok(w)));
            } else {
                now.push((req, Ok(w)));
            }
        }
        self.finish_all(now);
        if needs_sync {
            self.sync_batch(synced_later);
        } else if let FsyncMode::Interval(d) = self.mode {
            if self.last_sync.elapsed() >= d {
                self.sync_quietly();
            }
        }
        self.compact();
    }

    /// Syncs for the requests of a batch that asked for it, then answers
    /// them: each fails if the sync did.
    fn sync_batch(&mut self, mut synced_later: Vec<(WriteReq, io::Result<Written>)>) {
        let t = Instant::now();
        let synced = self.sync();
        self.last_sync_took = t.elapsed();
        self.last_synced = synced_later.len();
        if let Err(e) = synced {
            tracing::error!(error = %e, "disk spool: sync failed");
            for (_, r) in &mut synced_later {
                *r = Err(io::Error::new(e.kind(), format!("sync failed: {e}")));
            }
        }
        self.finish_all(synced_later);
    }

    fn fail(&mut self, batch: &mut Vec<WriteReq>, e: &io::Error) {
        let failed = batch
            .drain(..)
            .map(|req| (req, Err(io::Error::new(e.kind(), e.to_string()))))
            .collect();
        self.finish_all(failed);
        self.compact();
    }

    /// Settles requests with their results: segment counts, then every
    /// completion under one lock of the state, then (lock released) one
    /// wake-up per caller, so woken callers do not queue on the lock.
    fn finish_all(&mut self, reqs: Vec<(WriteReq, io::Result<Written>)>) {
        if reqs.is_empty() {
            return;
        }
        let state = self.state.clone();
        let mut st = None;
        let mut replies = Vec::with_capacity(reqs.len());
        for (mut req, r) in reqs {
            if let (Ok(w), 1..) = (&r, req.enqueued) {
                let pin = self.counts.entry(w.seg).or_default();
                pin.records += req.enqueued;
                pin.bytes += req.bytes.len() as u64;
            }
            for loc in std::mem::take(&mut req.released) {
                self.unpin(loc);
            }
            if req.done.is_some() || !req.moves.is_empty() {
                let st = st.get_or_insert_with(|| {
                    // Completions keep the state consistent step by step; a
                    // poisoned lock is safe (as in `Shared::state`).
                    state.lock().unwrap_or_else(PoisonError::into_inner)
                });
                if let Some(done) = req.done.take() {
                    done(st, &r);
                }
                let moves = std::mem::take(&mut req.moves);
                if !moves.is_empty() {
                    for (from, to) in self.reloc.settle(&mut st.index, moves, &r) {
                        self.pin(to);
                        self.unpin(from);
                    }
                }
            }
            if let Some(tx) = req.reply.take() {
                replies.push((tx, r));
            }
        }
        drop(st);
        for (tx, r) in replies {
            let _ = tx.send(r);
        }
    }

    /// `loc`'s record now pins its segment.
    fn pin(&mut self, loc: Loc) {
        let pin = self.counts.entry(loc.seg).or_default();
        pin.records += 1;
        pin.bytes += u64::from(loc.len);
    }

    /// `loc`'s record no longer pins its segment.
    fn unpin(&mut self, loc: Loc) {
        if let Some(pin) = self.counts.get_mut(&loc.seg) {
            pin.records = pin.records.saturating_sub(1);
            pin.bytes = pin.bytes.saturating_sub(u64::from(loc.len));
        }
    }

    /// Seals the active segment (synced) and starts the next one.
    fn roll(&mut self) -> io::Result<()> {
        if self.alloc_end > self.len {
            // The sealed segment keeps no preallocated tail.
            self.file.set_len(self.len)?;
            self.alloc_end = self.len;
        }
        self.checked(self.fs.sync_data(&self.file))?;
        self.dirty = false;
        self.counts.entry(self.seg).or_default().size = self.len;
        let next = self.seg + 1;
        let path = segment_path(&self.dir, next);
        let f = self.fs.open(&path, Open::Create)?;
        self.fs.write_at(&f, &segment_header(next), 0)?;
        self.checked(self.fs.sync_all(&f))?;
        self.checked(self.fs.sync_dir(&segments_dir(&self.dir)))?;
        self.file = f;
        self.seg = next;
        self.len = SEG_HEADER_LEN;
        self.alloc_end = SEG_HEADER_LEN;
        self.prealloc_failed = false;
        self.counts.entry(next).or_default();
        tracing::debug!(segment = next, "disk spool: new segment");
        Ok(())
    }

    /// Deletes the oldest sealed segments that no record pins, after the
    /// frames that unpinned them are synced; syncs the directory after.
    fn compact(&mut self) {
        while self.stopped.get().is_none() {
            let Some((&oldest, pin)) = self.counts.first_key_value() else {
                return;
            };
            if pin.records > 0 || oldest >= self.seg {
                return;
            }
            if let Err(e) = self.sync() {
                tracing::error!(error = %e, "disk spool: sync before compaction failed");
                return;
            }
            let path = segment_path(&self.dir, oldest);
            match self.fs.unlink(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(error = %e, segment = oldest, "disk spool: cannot delete segment");
                    return;
                }
            }
            if let Err(e) = self.checked(self.fs.sync_dir(&segments_dir(&self.dir))) {
                tracing::error!(error = %e, "disk spool: directory sync after compaction failed");
                return;
            }
            self.counts.remove(&oldest);
            self.files.forget(oldest);
            tracing::debug!(segment = oldest, "disk spool: segment compacted");
        }
    }
}
