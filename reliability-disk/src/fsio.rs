//! The file-system calls of the spool behind one small trait, so that tests
//! can fail any one of them.
//!
//! [`Fs`] covers what the spool does to its files: open, positioned read
//! and write, `fdatasync`/`fsync`, rename, unlink, directory creation and
//! directory sync. [`RealFs`] is the only implementation the spool uses in
//! production; [`faults::Faults`] wraps it for tests and fails the Nth call
//! of a kind with EIO, EMFILE or ENOSPC, or fails an `fdatasync` the way
//! Linux reports a lost writeback: once, with the next call reporting
//! success. It also cuts the power: what was written and not synced since
//! (and what a lost sync dropped) is zeroed.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Arc;

/// How a file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Open {
    /// For reading.
    Read,
    /// For reading and writing (an existing file).
    ReadWrite,
    /// For writing (an existing file).
    Write,
    /// For writing, created or truncated.
    Create,
}

/// The file-system calls of the spool.
pub(crate) trait Fs: Send + Sync + fmt::Debug {
    /// Opens `path`.
    fn open(&self, path: &Path, how: Open) -> io::Result<File>;
    /// Fills `buf` from `off`.
    fn read_at(&self, file: &File, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Writes all of `buf` at `off`.
    fn write_at(&self, file: &File, buf: &[u8], off: u64) -> io::Result<()>;
    /// `fdatasync`: the file's data (and the metadata needed to read it).
    fn sync_data(&self, file: &File) -> io::Result<()>;
    /// `fsync`: the file's data and metadata.
    fn sync_all(&self, file: &File) -> io::Result<()>;
    /// Renames `from` to `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Deletes the file at `path`.
    fn unlink(&self, path: &Path) -> io::Result<()>;
    /// Creates `dir` and any missing parents.
    fn create_dir(&self, dir: &Path) -> io::Result<()>;
    /// Syncs the directory `dir` (after creating, renaming or deleting in
    /// it).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The file system the spool shares between its threads.
pub(crate) type SharedFs = Arc<dyn Fs>;

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RealFs;

/// The real file system, shared.
pub(crate) fn real() -> SharedFs {
    Arc::new(RealFs)
}

impl Fs for RealFs {
    fn open(&self, path: &Path, how: Open) -> io::Result<File> {
        let mut o = OpenOptions::new();
        match how {
            Open::Read => o.read(true),
            Open::ReadWrite => o.read(true).write(true),
            Open::Write => o.write(true),
            Open::Create => o.write(true).create(true).truncate(true),
        };
        o.open(path)
    }

    fn read_at(&self, file: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
        file.read_exact_at(buf, off)
    }

    fn write_at(&self, file: &File, buf: &[u8], off: u64) -> io::Result<()> {
        file.write_all_at(buf, off)
    }

    fn sync_data(&self, file: &File) -> io::Result<()> {
        file.sync_data()
    }

    fn sync_all(&self, file: &File) -> io::Result<()> {
        file.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn unlink(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn create_dir(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// Creates `dir` (and missing parents) and syncs the parent of each
/// directory it created, so that a power loss right after cannot drop it.
pub(crate) fn create_dir_durably(fs: &dyn Fs, dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at {
        if d.as_os_str().is_empty() || d.is_dir() {
            break;
        }
        missing.push(d);
        at = d.parent();
    }
    if missing.is_empty() {
        return Ok(());
    }
    fs.create_dir(dir)?;
    for d in missing.iter().rev() {
        match d.parent() {
            Some(parent) if parent.as_os_str().is_empty() => fs.sync_dir(Path::new("."))?,
            Some(parent) => fs.sync_dir(parent)?,
            None => {}
        }
    }
    Ok(())
}

pub mod faults {
    //! Fault injection for tests: a [`Faults`] plan handed to
    //! `DiskSpoolBuilder::faults` makes the spool's file-system calls fail
    //! as a production disk does. Not for production use.

    use std::collections::HashMap;
    use std::fs::File;
    use std::io;
    use std::os::unix::fs::MetadataExt as _;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Condvar, Mutex, PoisonError};
    use std::thread::ThreadId;

    use super::{Fs, Open, RealFs};

    const EIO: i32 = 5;
    const EMFILE: i32 = 24;
    const ENOSPC: i32 = 28;
    /// The unit of write-back the power cut works with: a disk sector, not
    /// the kernel's 4 KiB page, so that it keeps less of a lost sync's
    /// bytes than a real cut could (a stricter test; the test segments are
    /// smaller than a page).
    const PAGE: u64 = 512;
    /// Calls traced at most (the first ones).
    const TRACE_MAX: usize = 100_000;

    /// A kind of file-system call.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum Op {
        /// Opening a file.
        Open,
        /// A positioned read.
        Read,
        /// A positioned write.
        Write,
        /// `fdatasync` or `fsync` of a file.
        Sync,
        /// A rename.
        Rename,
        /// A file deletion.
        Unlink,
        /// Creating a directory.
        CreateDir,
        /// Syncing a directory.
        DirSync,
    }

    impl Op {
        /// Every kind.
        pub const ALL: [Op; 8] = [
            Op::Open,
            Op::Read,
            Op::Write,
            Op::Sync,
            Op::Rename,
            Op::Unlink,
            Op::CreateDir,
            Op::DirSync,
        ];

        fn slot(self) -> usize {
            self as usize
        }
    }

    /// What an injected fault does.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum Fault {
        /// The call fails with EIO and does nothing.
        Eio,
        /// The call fails with EMFILE (descriptor limit) and does nothing.
        Emfile,
        /// The call fails with ENOSPC and does nothing.
        Enospc,
        /// A sync fails with EIO after the data was dropped: the call does
        /// nothing and fails, and the next sync of the file succeeds (Linux
        /// reports a writeback error once). Other kinds fail with EIO.
        LostSync,
    }

    impl Fault {
        fn error(self) -> io::Error {
            let code = match self {
                Fault::Eio | Fault::LostSync => EIO,
                Fault::Emfile => EMFILE,
                Fault::Enospc => ENOSPC,
            };
            io::Error::from_raw_os_error(code)
        }
    }

    /// One call the spool made.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Event {
        /// Its kind.
        pub op: Op,
        /// The path, for calls on a path (open, rename, unlink, directory
        /// calls).
        pub path: Option<PathBuf>,
        /// Bytes read or written.
        pub len: usize,
        /// The thread that made it.
        pub thread: ThreadId,
        /// The fault injected into it, if any.
        pub fault: Option<Fault>,
    }

    #[derive(Debug)]
    struct Rule {
        op: Op,
        /// The call number (1-based, counting calls of `op`) it fires at.
        nth: u64,
        /// Fires at every call from `nth` on.
        sticky: bool,
        fault: Fault,
    }

    /// A fault plan and a trace of the calls; see the module docs.
    #[derive(Debug, Default)]
    pub struct Faults {
        rules: Mutex<Vec<Rule>>,
        calls: [AtomicU64; 8],
        fired: AtomicU64,
        fired_on: [AtomicU64; 8],
        trace: Mutex<Vec<Event>>,
        held: Mutex<Option<Op>>,
        released: Condvar,
        /// Per file (device, inode): its path and the byte ranges written
        /// since its last successful sync, and those a lost sync dropped.
        unsynced: Mutex<HashMap<(u64, u64), Unsynced>>,
        /// The power is cut: every call fails.
        off: AtomicBool,
    }

    #[derive(Debug, Default)]
    struct Unsynced {
        path: PathBuf,
        written: Vec<(u64, u64)>,
        lost: Vec<(u64, u64)>,
    }

    /// What a power cut drops: per file, the byte ranges that never reached
    /// the disk. See [`Faults::power_cut`].
    #[derive(Debug, Default)]
    pub struct PowerCut(Vec<(PathBuf, Vec<(u64, u64)>)>);

    impl PowerCut {
        /// Bytes it drops.
        pub fn bytes(&self) -> u64 {
            self.0
                .iter()
                .flat_map(|(_, r)| r.iter().map(|&(_, len)| len))
                .sum()
        }

        /// Overwrites the dropped ranges with zeros (as far as each file
        /// still reaches), as the disk holds them after the cut. Call once
        /// nothing writes the files any more.
        ///
        /// # Errors
        /// A file that exists cannot be written.
        pub fn apply(&self) -> io::Result<()> {
            use std::os::unix::fs::FileExt as _;
            for (path, ranges) in &self.0 {
                let file = match std::fs::OpenOptions::new().write(true).open(path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                let len = file.metadata()?.len();
                for &(off, n) in ranges {
                    let end = (off + n).min(len);
                    if end > off {
                        let zeros = vec![0u8; (end - off) as usize];
                        file.write_all_at(&zeros, off)?;
                    }
                }
            }
            Ok(())
        }
    }

    /// `ranges` (offset, length) without the bytes of `cut`.
    fn subtract(ranges: &[(u64, u64)], cut: (u64, u64)) -> Vec<(u64, u64)> {
        let (c0, c1) = (cut.0, cut.0 + cut.1);
        let mut out = Vec::with_capacity(ranges.len() + 1);
        for &(off, len) in ranges {
            let (r0, r1) = (off, off + len);
            if r1 <= c0 || c1 <= r0 {
                out.push((off, len));
                continue;
            }
            if r0 < c0 {
                out.push((r0, c0 - r0));
            }
            if c1 < r1 {
                out.push((c1, r1 - c1));
            }
        }
        out
    }

    fn key(file: &File) -> Option<(u64, u64)> {
        file.metadata().ok().map(|m| (m.dev(), m.ino()))
    }

    impl Faults {
        /// A plan that injects nothing (yet).
        pub fn new() -> Arc<Self> {
            Arc::new(Self::default())
        }

        /// The `nth` call of `op` from now (1: the next) fails with `fault`.
        pub fn fail_nth(&self, op: Op, nth: u64, fault: Fault) {
            self.rule(op, nth, false, fault);
        }

        /// Every call of `op` from the `nth` from now on fails with `fault`.
        pub fn fail_from(&self, op: Op, nth: u64, fault: Fault) {
            self.rule(op, nth, true, fault);
        }

        fn rule(&self, op: Op, nth: u64, sticky: bool, fault: Fault) {
            let base = self.calls(op);
            lock(&self.rules).push(Rule {
                op,
                nth: base + nth.max(1),
                sticky,
                fault,
            });
        }

        /// Removes every rule (calls succeed again).
        pub fn clear(&self) {
            lock(&self.rules).clear();
        }

        /// Calls of `op` so far.
        pub fn calls(&self, op: Op) -> u64 {
            self.calls[op.slot()].load(Ordering::Acquire)
        }

        /// Faults injected so far.
        pub fn fired(&self) -> u64 {
            self.fired.load(Ordering::Acquire)
        }

        /// Faults injected so far into calls of `op`.
        pub fn fired_on(&self, op: Op) -> u64 {
            self.fired_on[op.slot()].load(Ordering::Acquire)
        }

        /// Every call so far, in order (the first 100,000).
        pub fn trace(&self) -> Vec<Event> {
            lock(&self.trace).clone()
        }

        /// Calls of `op` block (before doing anything) until
        /// [`release`](Self::release).
        pub fn hold(&self, op: Op) {
            *lock(&self.held) = Some(op);
        }

        /// Lets held calls go on.
        pub fn release(&self) {
            *lock(&self.held) = None;
            self.released.notify_all();
        }

        /// Cuts the power: from now on every call fails (EIO, not counted
        /// as a fault); returns what the cut drops: every byte range
        /// written since its file's last successful sync, and those a lost
        /// sync dropped. [`PowerCut::apply`] writes that to the files once
        /// the spool is gone; [`power_on`](Self::power_on) lets calls work
        /// again.
        pub fn power_cut(&self) -> PowerCut {
            self.off.store(true, Ordering::Release);
            let mut all = lock(&self.unsynced);
            PowerCut(
                all.drain()
                    .map(|(_, mut u)| {
                        u.lost.append(&mut u.written);
                        (u.path, u.lost)
                    })
                    .filter(|(_, r)| !r.is_empty())
                    .collect(),
            )
        }

        /// Calls work again after a [`power_cut`](Self::power_cut).
        pub fn power_on(&self) {
            self.off.store(false, Ordering::Release);
        }

        fn enter(&self, op: Op, path: Option<&Path>, len: usize) -> io::Result<()> {
            match self.fault_for(op, path, len) {
                Some(f) => Err(f.error()),
                None => Ok(()),
            }
        }

        /// A sync of `file`: a lost one drops what was written since the
        /// last good one, a good one makes it durable.
        fn sync(&self, file: &File, real: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
            let fault = self.fault_for(Op::Sync, None, 0);
            let mut all = lock(&self.unsynced);
            let u = key(file).and_then(|k| all.get_mut(&k));
            match (fault, u) {
                (Some(Fault::LostSync), Some(u)) => {
                    let mut w = std::mem::take(&mut u.written);
                    u.lost.append(&mut w);
                }
                (None, Some(u)) => {
                    // Durable now. Write-back is by whole pages: a page
                    // written again is written back whole, with the bytes a
                    // lost sync had dropped (still cached: eviction is not
                    // modelled).
                    for (off, len) in std::mem::take(&mut u.written) {
                        let start = off - off % PAGE;
                        let end = (off + len).next_multiple_of(PAGE);
                        u.lost = subtract(&u.lost, (start, end - start));
                    }
                }
                _ => {}
            }
            drop(all);
            match fault {
                Some(f) => Err(f.error()),
                None => real(),
            }
        }

        /// Counts and traces a call; returns the fault to inject.
        fn fault_for(&self, op: Op, path: Option<&Path>, len: usize) -> Option<Fault> {
            if self.off.load(Ordering::Acquire) {
                return Some(Fault::Eio);
            }
            {
                let mut held = lock(&self.held);
                while *held == Some(op) {
                    held = self
                        .released
                        .wait(held)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
            let n = self.calls[op.slot()].fetch_add(1, Ordering::AcqRel) + 1;
            let fault = lock(&self.rules)
                .iter()
                .find(|r| r.op == op && (n == r.nth || (r.sticky && n > r.nth)))
                .map(|r| r.fault);
            if fault.is_some() {
                self.fired.fetch_add(1, Ordering::AcqRel);
                self.fired_on[op.slot()].fetch_add(1, Ordering::AcqRel);
            }
            let mut trace = lock(&self.trace);
            if trace.len() < TRACE_MAX {
                trace.push(Event {
                    op,
                    path: path.map(Path::to_path_buf),
                    len,
                    thread: std::thread::current().id(),
                    fault,
                });
            }
            drop(trace);
            fault
        }
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(PoisonError::into_inner)
    }

    impl Fs for Faults {
        fn open(&self, path: &Path, how: Open) -> io::Result<File> {
            self.enter(Op::Open, Some(path), 0)?;
            let file = RealFs.open(path, how)?;
            if how != Open::Read {
                if let Some(k) = key(&file) {
                    lock(&self.unsynced).entry(k).or_default().path = path.to_path_buf();
                }
            }
            Ok(file)
        }

        fn read_at(&self, file: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
            self.enter(Op::Read, None, buf.len())?;
            RealFs.read_at(file, buf, off)
        }

        fn write_at(&self, file: &File, buf: &[u8], off: u64) -> io::Result<()> {
            self.enter(Op::Write, None, buf.len())?;
            RealFs.write_at(file, buf, off)?;
            if let Some(k) = key(file) {
                if let Some(u) = lock(&self.unsynced).get_mut(&k) {
                    u.written.push((off, buf.len() as u64));
                }
            }
            Ok(())
        }

        fn sync_data(&self, file: &File) -> io::Result<()> {
            self.sync(file, || RealFs.sync_data(file))
        }

        fn sync_all(&self, file: &File) -> io::Result<()> {
            self.sync(file, || RealFs.sync_all(file))
        }

        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            self.enter(Op::Rename, Some(from), 0)?;
            RealFs.rename(from, to)
        }

        fn unlink(&self, path: &Path) -> io::Result<()> {
            self.enter(Op::Unlink, Some(path), 0)?;
            RealFs.unlink(path)
        }

        fn create_dir(&self, dir: &Path) -> io::Result<()> {
            self.enter(Op::CreateDir, Some(dir), 0)?;
            RealFs.create_dir(dir)
        }

        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            self.enter(Op::DirSync, Some(dir), 0)?;
            RealFs.sync_dir(dir)
        }
    }
}
