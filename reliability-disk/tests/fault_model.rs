//! Random sequences of enqueue / lease / ack / nack / relocation /
//! reopen, in every fsync mode, with faults injected anywhere in the spool's file-system calls
//! (EIO, EMFILE, ENOSPC, a lost fdatasync; on any call kind, once or from
//! a call on). Invariants:
//! - every record whose enqueue answered `Ok` is present after the final
//!   reopen (leased, ready, delayed or dead) unless the test acked it;
//! - the spool acks nothing itself: nothing is quarantined (no fault here
//!   damages bytes);
//! - no panic;
//! - a failed sync never goes unnoticed: the spool's health fails from
//!   then on (it refuses writes until reopened).
//!
//! `FAULT_CASES` sets the number of cases (default 1,000), `FAULT_SEED` the
//! seed (printed at the start; a failing run prints it too).

// The test prints its seed.
#![allow(clippy::print_stdout)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use reliability_core::{NewRecord, RecordId, Spool, SpoolToken};
use reliability_disk::faults::{Fault, Faults, Op};
use reliability_disk::{DiskSpool, FsyncMode};

mod common;

const TTL: Duration = Duration::from_secs(60);

/// Over the run: faults injected, sync faults, records checked.
static FIRED: AtomicU64 = AtomicU64::new(0);
static SYNC_FIRED: AtomicU64 = AtomicU64::new(0);
static CHECKED: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone)]
enum Step {
    Enqueue(usize),
    Lease(usize),
    Ack(usize),
    Nack(usize),
    /// Enough records to roll segments (relocation and compaction follow).
    Fill,
    /// Drop (`crash`) or close, then open with the faults armed so far.
    Reopen {
        crash: bool,
    },
    /// A power cut (`FsyncMode::Always` only; a crash in the other modes):
    /// every byte written since its file's last good sync, and every byte
    /// a lost sync dropped, is zeroed before the reopen.
    PowerLoss,
    Inject {
        op: Op,
        nth: u64,
        fault: Fault,
        from: bool,
    },
    /// Calls succeed again.
    Heal,
}

fn op_kind() -> impl Strategy<Value = Op> {
    prop::sample::select(Op::ALL.to_vec())
}

fn fault_kind() -> impl Strategy<Value = Fault> {
    prop::sample::select(vec![
        Fault::Eio,
        Fault::Emfile,
        Fault::Enospc,
        Fault::LostSync,
    ])
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1usize..4).prop_map(Step::Enqueue),
        2 => (1usize..6).prop_map(Step::Lease),
        2 => any::<prop::sample::Index>().prop_map(|i| Step::Ack(i.index(1 << 16))),
        1 => any::<prop::sample::Index>().prop_map(|i| Step::Nack(i.index(1 << 16))),
        1 => Just(Step::Fill),
        1 => any::<bool>().prop_map(|crash| Step::Reopen { crash }),
        1 => Just(Step::PowerLoss),
        5 => (op_kind(), 1u64..4, fault_kind(), prop::bool::weighted(0.2))
            .prop_map(|(op, nth, fault, from)| Step::Inject { op, nth, fault, from }),
        1 => Just(Step::Heal),
    ]
}

fn record(id: &str) -> NewRecord {
    NewRecord::new(RecordId::new(id).expect("id"), id.repeat(12))
}

struct Run<'a> {
    dir: &'a Path,
    relocate_below: u8,
    fsync: FsyncMode,
    faults: Arc<Faults>,
    spool: Option<DiskSpool>,
    /// Enqueued with `Ok` and not acked by the test.
    must: BTreeSet<String>,
    tokens: Vec<SpoolToken>,
    next: usize,
    /// Sync faults fired before the spool open now was opened.
    syncs_failed_before: u64,
    /// A power cut dropped bytes (whatever they held is quarantined then).
    power_lost: bool,
}

impl Run<'_> {
    async fn open(&self, faults: Option<&Arc<Faults>>) -> reliability_core::Result<DiskSpool> {
        let mut b = DiskSpool::builder(self.dir)
            .fsync(self.fsync)
            .segment_max_bytes(2048)
            .preallocate_bytes(1024)
            .relocate_below_percent(self.relocate_below);
        if let Some(f) = faults {
            b = b.faults(f.clone());
        }
        b.open().await
    }

    async fn enqueue(&mut self, n: usize) {
        let Some(spool) = &self.spool else { return };
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            self.next += 1;
            ids.push(format!("r{:05}", self.next));
        }
        let batch = ids.iter().map(|id| record(id)).collect();
        if spool.enqueue(batch).await.is_ok() {
            self.must.extend(ids);
        }
    }

    async fn step(&mut self, s: &Step) -> Result<(), String> {
        if self.spool.is_none() && !matches!(s, Step::Reopen { .. } | Step::PowerLoss | Step::Heal)
        {
            return Ok(());
        }
        match s {
            Step::Enqueue(n) => self.enqueue(*n).await,
            Step::Fill => {
                self.enqueue(12).await;
            }
            Step::Lease(max) => {
                if let Some(spool) = &self.spool {
                    if let Ok(got) = spool.lease(*max, TTL).await {
                        self.tokens.extend(got.into_iter().map(|l| l.token));
                    }
                }
            }
            Step::Ack(i) | Step::Nack(i) => {
                if self.tokens.is_empty() {
                    return Ok(());
                }
                let token = self.tokens.swap_remove(i % self.tokens.len());
                let Some(spool) = &self.spool else {
                    return Ok(());
                };
                if matches!(s, Step::Ack(_)) {
                    // Acked as far as the invariant goes, whatever it answers.
                    self.must.remove(token.id().as_str());
                    let _ = spool.ack(&token).await;
                } else {
                    let _ = spool.nack(&token, Duration::ZERO).await;
                }
            }
            Step::Reopen { crash } => self.reopen(*crash).await?,
            Step::PowerLoss => self.power_loss().await?,
            Step::Inject {
                op,
                nth,
                fault,
                from,
            } => {
                if *from {
                    self.faults.fail_from(*op, *nth, *fault);
                } else {
                    self.faults.fail_nth(*op, *nth, *fault);
                }
            }
            Step::Heal => self.faults.clear(),
        }
        self.check_sync_failures_show().await
    }

    /// Closes (or drops) the spool and opens it again through the faults;
    /// if that open fails, the faults are cleared and the open must work.
    async fn reopen(&mut self, crash: bool) -> Result<(), String> {
        if let Some(spool) = self.spool.take() {
            if crash {
                drop(spool);
                DiskSpool::wait_dropped(self.dir).await;
            } else {
                let _ = spool.close().await;
            }
        }
        self.tokens.clear();
        // A fresh plan: the old one's counts start over with the new spool.
        self.count_faults();
        let armed = std::mem::replace(&mut self.faults, Faults::new());
        self.syncs_failed_before = sync_faults(&armed);
        match self.open(Some(&armed)).await {
            Ok(s) => {
                self.faults = armed;
                self.spool = Some(s);
            }
            Err(_) => {
                self.syncs_failed_before = 0;
                let s = self
                    .open(Some(&self.faults))
                    .await
                    .map_err(|e| format!("open with no faults after a failed one: {e}"))?;
                self.spool = Some(s);
            }
        }
        Ok(())
    }

    /// Cuts the power under the spool (in `FsyncMode::Always`; the other
    /// modes promise nothing across one), then reopens.
    async fn power_loss(&mut self) -> Result<(), String> {
        if self.fsync != FsyncMode::Always {
            return self.reopen(true).await;
        }
        let cut = self.faults.power_cut();
        if let Some(spool) = self.spool.take() {
            drop(spool);
            DiskSpool::wait_dropped(self.dir).await;
        }
        cut.apply().map_err(|e| format!("power cut: {e}"))?;
        self.faults.power_on();
        self.power_lost |= cut.bytes() > 0;
        self.reopen(true).await
    }

    /// Adds the faults of the current plan to the run's counts.
    fn count_faults(&self) {
        FIRED.fetch_add(self.faults.fired(), Ordering::Relaxed);
        SYNC_FIRED.fetch_add(sync_faults(&self.faults), Ordering::Relaxed);
    }

    /// A sync that failed has stopped the spool. The writer may hit it
    /// after answering the call (compaction runs after the replies): the
    /// stop is awaited, with a deadline.
    async fn check_sync_failures_show(&self) -> Result<(), String> {
        let Some(spool) = &self.spool else {
            return Ok(());
        };
        if sync_faults(&self.faults) == self.syncs_failed_before {
            return Ok(());
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while spool.health().is_ok() {
            if std::time::Instant::now() >= deadline {
                return Err("a sync failed and the spool's health says nothing".into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// Every record the directory holds, after a clean reopen with a clock
    /// past every lease; fails if anything was quarantined.
    async fn finish(mut self) -> Result<BTreeSet<String>, String> {
        self.count_faults();
        if let Some(spool) = self.spool.take() {
            drop(spool);
            DiskSpool::wait_dropped(self.dir).await;
        }
        let (ids, stats) = common::ids_after_reopen(self.dir, TTL)
            .await
            .map_err(|e| format!("final reopen: {e}"))?;
        if stats.quarantined_total > 0 && !self.power_lost {
            return Err(format!(
                "{} items quarantined: a fault was taken for corruption",
                stats.quarantined_total
            ));
        }
        Ok(ids)
    }
}

/// Faults injected into syncs (of files or directories) so far.
fn sync_faults(f: &Faults) -> u64 {
    f.fired_on(Op::Sync) + f.fired_on(Op::DirSync)
}

/// Where the cases' directories go: memory when there is a tmpfs (the
/// faults are injected, the disk's speed only slows the cases down),
/// `FAULT_DIR` to choose.
fn scratch() -> std::io::Result<tempfile::TempDir> {
    let base = std::env::var_os("FAULT_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let shm = Path::new("/dev/shm");
            shm.is_dir().then(|| shm.to_path_buf())
        })
        .unwrap_or_else(std::env::temp_dir);
    tempfile::tempdir_in(base)
}

fn run_case(steps: &[Step], relocate_below: u8, fsync: FsyncMode) -> Result<(), String> {
    let tmp = scratch().map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut run = Run {
            dir: tmp.path(),
            relocate_below,
            fsync,
            faults: Faults::new(),
            spool: None,
            must: BTreeSet::new(),
            tokens: Vec::new(),
            next: 0,
            syncs_failed_before: 0,
            power_lost: false,
        };
        run.spool = Some(run.open(None).await.map_err(|e| e.to_string())?);
        for (i, s) in steps.iter().enumerate() {
            run.step(s)
                .await
                .map_err(|e| format!("step {i} {s:?}: {e}"))?;
        }
        let must = run.must.clone();
        let ids = run.finish().await?;
        CHECKED.fetch_add(must.len() as u64, Ordering::Relaxed);
        let lost: Vec<_> = must.difference(&ids).collect();
        if lost.is_empty() {
            Ok(())
        } else {
            Err(format!("acknowledged records lost: {lost:?}"))
        }
    })
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn no_fault_loses_an_acknowledged_record() {
    let cases = env_u64("FAULT_CASES").unwrap_or(1000) as u32;
    let seed = env_u64("FAULT_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    println!("fault model: {cases} cases, FAULT_SEED={seed}");
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
    let modes = prop::sample::select(vec![
        FsyncMode::Always,
        FsyncMode::Always,
        FsyncMode::Interval(Duration::from_millis(2)),
        FsyncMode::Never,
    ]);
    let strategy = (prop::collection::vec(step(), 1..30), prop::bool::ANY, modes);
    let result = runner.run(&strategy, |(steps, eager, fsync)| {
        run_case(&steps, if eager { 100 } else { 0 }, fsync).map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("fault model failed (reproduce with FAULT_SEED={seed}): {e}");
    }
    println!(
        "fault model: {} faults injected ({} into syncs), {} acknowledged records checked",
        FIRED.load(Ordering::Relaxed),
        SYNC_FIRED.load(Ordering::Relaxed),
        CHECKED.load(Ordering::Relaxed)
    );
}
