//! [`DiskSpool`] and its configuration.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use reliability_core::{
    system_clock, Capabilities, DeadReason, DeadRecord, Durability, Enqueued, Error, Leased,
    NackOutcome, NewRecord, Result, SharedClock, Spool, SpoolLimits, SpoolStats, SpoolToken,
    UnavailableReason,
};

pub(crate) const BACKEND: &str = "disk";

/// Default size at which the active segment is sealed and a new one begun.
pub const DEFAULT_SEGMENT_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// When the spool syncs its log to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FsyncMode {
    /// `enqueue` returns after the `fdatasync` covering its records (group
    /// commit). The default.
    #[default]
    Always,
    /// The writer syncs at most this long after a write; a power loss may
    /// lose that much.
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
}

impl DiskSpoolConfig {
    /// A spool in `dir` with every other setting at its default.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            limits: SpoolLimits::default(),
            fsync: FsyncMode::default(),
            segment_max_bytes: DEFAULT_SEGMENT_MAX_BYTES,
        }
    }
}

/// Builder of a [`DiskSpool`]; see [`DiskSpool::builder`].
#[derive(Debug)]
#[must_use]
pub struct DiskSpoolBuilder {
    config: DiskSpoolConfig,
    clock: Option<SharedClock>,
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
        let _ = (self.config, self.clock.unwrap_or_else(system_clock));
        Err(Error::unavailable(
            BACKEND,
            UnavailableReason::Io,
            "not implemented yet",
        ))
    }
}

/// A durable [`Spool`] on a local directory. See the [crate docs](crate).
pub struct DiskSpool {
    _private: (),
}

impl fmt::Debug for DiskSpool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskSpool").finish_non_exhaustive()
    }
}

impl DiskSpool {
    /// A builder for a spool in `dir`.
    pub fn builder(dir: impl Into<PathBuf>) -> DiskSpoolBuilder {
        DiskSpoolBuilder {
            config: DiskSpoolConfig::new(dir),
            clock: None,
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
        }
        .open()
        .await
    }

    /// Writes and syncs everything queued, stops the writer and releases the
    /// directory lock.
    ///
    /// # Errors
    /// [`Error::Unavailable`] with [`UnavailableReason::Io`] if the final
    /// sync fails.
    pub async fn close(self) -> Result<()> {
        Ok(())
    }
}

fn todo_err() -> Error {
    Error::unavailable(BACKEND, UnavailableReason::Io, "not implemented yet")
}

#[async_trait]
impl Spool for DiskSpool {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(BACKEND)
            .with_durable(true)
            .with_reopenable(true)
            .with_bounded(true)
    }
    async fn enqueue(&self, _batch: Vec<NewRecord>) -> Result<Enqueued> {
        Err(todo_err())
    }
    async fn lease(&self, _max: usize, _ttl: Duration) -> Result<Vec<Leased>> {
        Err(todo_err())
    }
    async fn ack(&self, _token: &SpoolToken) -> Result<()> {
        Err(todo_err())
    }
    async fn nack(&self, _token: &SpoolToken, _retry_in: Duration) -> Result<NackOutcome> {
        Err(todo_err())
    }
    async fn extend(&self, _token: &SpoolToken, _by: Duration) -> Result<()> {
        Err(todo_err())
    }
    async fn dead_letter(&self, _token: &SpoolToken, _reason: DeadReason) -> Result<()> {
        Err(todo_err())
    }
    async fn list_dead(&self, _max: usize) -> Result<Vec<DeadRecord>> {
        Err(todo_err())
    }
    async fn redrive_dead(&self, _max: usize) -> Result<usize> {
        Err(todo_err())
    }
    async fn purge_dead(&self, _max: usize) -> Result<usize> {
        Err(todo_err())
    }
    async fn stats(&self) -> Result<SpoolStats> {
        Err(todo_err())
    }
}
