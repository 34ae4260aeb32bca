//! The faults a production disk brings (EIO, EMFILE, a failed fsync), each
//! injected into the spool's file-system calls by
//! [`reliability_disk::faults::Faults`]: none loses an acknowledged record,
//! each surfaces as an error to the call it hit or in the spool's health.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reliability_core::{DeadReason, Error, NewRecord, RecordId, Spool, UnavailableReason};
mod common;

use reliability_disk::faults::{Fault, Faults, Op};
use reliability_disk::{DiskSpool, FsyncMode};

const TTL: Duration = Duration::from_secs(60);

fn record(i: usize) -> NewRecord {
    let id = RecordId::new(format!("r{i:04}")).expect("id");
    NewRecord::new(id, format!("payload {i}").repeat(8))
}

async fn open(dir: &Path, faults: &Arc<Faults>) -> DiskSpool {
    DiskSpool::builder(dir)
        .faults(faults.clone())
        .open()
        .await
        .expect("open")
}

/// Ids of every record `dir` holds (see [`common::ids_after_reopen`]).
async fn ids_after_reopen(dir: &Path) -> BTreeSet<String> {
    let (ids, stats) = common::ids_after_reopen(dir, TTL).await.expect("reopen");
    assert_eq!(stats.ready + stats.delayed, 0, "records left unleased");
    ids
}

fn assert_io(e: &Error) {
    assert!(
        matches!(
            e,
            Error::Unavailable {
                reason: UnavailableReason::Io,
                ..
            }
        ),
        "expected an Io unavailability, got {e:?}"
    );
}

/// Fills a spool in `dir` with `n` records and closes it.
async fn fill(dir: &Path, n: usize) {
    let spool = DiskSpool::builder(dir).open().await.expect("open");
    let batch = (0..n).map(record).collect();
    spool.enqueue(batch).await.expect("enqueue");
    spool.close().await.expect("close");
}

/// `lease` hitting the descriptor limit when it opens the segment to read
/// payloads fails (retried later) and acks nothing away.
#[tokio::test]
async fn descriptor_limit_in_lease_keeps_the_records() {
    let tmp = tempfile::tempdir().expect("tempdir");
    fill(tmp.path(), 5).await;
    let faults = Faults::new();
    let spool = open(tmp.path(), &faults).await;
    faults.fail_from(Op::Open, 1, Fault::Emfile);
    let first = spool.lease(10, TTL).await;
    match &first {
        Err(e) => assert_io(e),
        Ok(got) => panic!(
            "lease with no descriptor left answered Ok with {} records",
            got.len()
        ),
    }
    faults.clear();
    let stats = spool.stats().await.expect("stats");
    assert_eq!(stats.ready, 5, "records gone after EMFILE: {stats:?}");
    assert_eq!(stats.quarantined_total, 0, "an EMFILE is not corruption");
    let leased = spool
        .lease(10, TTL)
        .await
        .expect("lease once descriptors free");
    assert_eq!(leased.len(), 5);
    for l in &leased {
        let i: usize = l.record.id.as_str()[1..].parse().expect("index");
        assert_eq!(l.record.payload, record(i).payload);
    }
    drop(leased);
    spool.close().await.expect("close");
    assert_eq!(ids_after_reopen(tmp.path()).await.len(), 5);
}

/// An EIO on the payload read of `lease` (and of `list_dead`) is an error
/// to the caller; the records stay, nothing is quarantined.
#[tokio::test]
async fn read_error_in_lease_and_list_dead_keeps_the_records() {
    let tmp = tempfile::tempdir().expect("tempdir");
    fill(tmp.path(), 4).await;
    let faults = Faults::new();
    let spool = open(tmp.path(), &faults).await;
    faults.fail_nth(Op::Read, 1, Fault::Eio);
    let first = spool.lease(10, TTL).await;
    assert!(
        first.is_err(),
        "lease after EIO answered {:?}",
        first.map(|v| v.len())
    );
    let leased = spool.lease(10, TTL).await.expect("lease");
    assert_eq!(leased.len(), 4, "records gone after one EIO");
    for l in &leased {
        spool
            .dead_letter(&l.token, DeadReason::RetriesExhausted)
            .await
            .expect("dead_letter");
    }
    faults.fail_nth(Op::Read, 1, Fault::Eio);
    let dead = spool.list_dead(10).await;
    assert!(dead.is_err(), "list_dead after EIO answered Ok");
    let dead = spool.list_dead(10).await.expect("list_dead");
    assert_eq!(dead.len(), 4, "dead records gone after one EIO");
    let stats = spool.stats().await.expect("stats");
    assert_eq!(stats.quarantined_total, 0, "an EIO is not corruption");
    spool.close().await.expect("close");
    assert_eq!(ids_after_reopen(tmp.path()).await.len(), 4);
}

/// After a failed `fdatasync` the spool never syncs that descriptor again:
/// the enqueue it covered fails, every later write is refused, the health
/// says why, and a reopen recovers what is on disk.
#[tokio::test]
async fn failed_fsync_fails_the_enqueue_and_stops_writes_until_reopen() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let faults = Faults::new();
    let spool = open(tmp.path(), &faults).await;
    spool.enqueue(vec![record(0)]).await.expect("enqueue 0");
    faults.fail_nth(Op::Sync, 1, Fault::LostSync);
    let covered = spool.enqueue(vec![record(1)]).await;
    assert!(covered.is_err(), "the enqueue the failed sync covered: Ok");
    let syncs = faults.calls(Op::Sync);
    let after = spool.enqueue(vec![record(2)]).await;
    match &after {
        Err(e) => assert_io(e),
        Ok(_) => panic!("an enqueue after a failed fsync answered Ok"),
    }
    assert_eq!(
        faults.calls(Op::Sync),
        syncs,
        "the failed descriptor was synced again"
    );
    let health = spool.stats().await;
    match &health {
        Err(e) => assert!(e.to_string().contains("sync"), "{e}"),
        Ok(s) => panic!("stats after a failed fsync look healthy: {s:?}"),
    }
    assert!(
        spool.close().await.is_err(),
        "close after a failed fsync: Ok"
    );
    let ids = ids_after_reopen(tmp.path()).await;
    assert!(ids.contains("r0000"), "acknowledged record lost: {ids:?}");
    assert!(
        !ids.contains("r0002"),
        "a refused enqueue came back: {ids:?}"
    );
}

/// A failed sync is never followed by compaction: the segments holding the
/// only synced copy of relocated records stay, and a power cut after it
/// loses no acknowledged record.
#[tokio::test]
async fn failed_fsync_is_never_followed_by_compaction() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let faults = Faults::new();
    let spool = DiskSpool::builder(tmp.path())
        .faults(faults.clone())
        .segment_max_bytes(2048)
        .preallocate_bytes(0)
        .relocate_below_percent(100)
        .open()
        .await
        .expect("open");
    for i in 0..12 {
        spool.enqueue(vec![record(i)]).await.expect("enqueue");
    }
    faults.fail_nth(Op::Sync, 1, Fault::LostSync);
    let kept: BTreeSet<String> = (0..12).map(|i| format!("r{i:04}")).collect();
    for i in 12..40 {
        let _ = spool.enqueue(vec![record(i)]).await;
    }
    let trace = faults.trace();
    let failed_at = trace
        .iter()
        .position(|e| e.fault.is_some())
        .expect("the sync fault fired");
    let unlinks: Vec<_> = trace[failed_at..]
        .iter()
        .filter(|e| e.op == Op::Unlink)
        .collect();
    // Then the power goes: what the failed sync dropped, and everything
    // written since the last good sync, never reaches the disk.
    let cut = faults.power_cut();
    drop(spool);
    DiskSpool::wait_dropped(tmp.path()).await;
    cut.apply().expect("power cut");
    let ids = ids_after_reopen(tmp.path()).await;
    let lost: Vec<_> = kept.difference(&ids).collect();
    assert!(
        lost.is_empty(),
        "acknowledged records lost after a power cut: {lost:?}"
    );
    assert!(
        unlinks.is_empty(),
        "segments deleted after a failed sync: {unlinks:?}"
    );
}

/// A failed periodic sync (`FsyncMode::Interval`) stops the spool from
/// claiming durability: later enqueues fail, the writer does not retry the
/// sync in a loop, and the health says why.
#[tokio::test]
async fn failed_periodic_sync_stops_claiming_durability() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let faults = Faults::new();
    let spool = DiskSpool::builder(tmp.path())
        .faults(faults.clone())
        .fsync(FsyncMode::Interval(Duration::from_millis(5)))
        .open()
        .await
        .expect("open");
    faults.fail_from(Op::Sync, 1, Fault::Eio);
    spool.enqueue(vec![record(0)]).await.expect("enqueue 0");
    let deadline = Instant::now() + Duration::from_secs(20);
    while faults.fired() == 0 {
        assert!(Instant::now() < deadline, "the periodic sync never ran");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The writer reports the failure in stats (wait for it to be
    // published).
    while spool.stats().await.is_ok() {
        if Instant::now() >= deadline {
            let later = spool.enqueue(vec![record(1)]).await;
            panic!(
                "a failed periodic sync never showed in stats ({} syncs tried); \
                 an enqueue after it answered {:?}",
                faults.calls(Op::Sync),
                later.map(|e| e.durability)
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let syncs = faults.calls(Op::Sync);
    let later = spool.enqueue(vec![record(1)]).await;
    assert!(
        later.is_err(),
        "an enqueue after a failed periodic sync claimed {:?}",
        later.map(|e| e.durability)
    );
    assert_eq!(faults.calls(Op::Sync), syncs, "the writer retried the sync");
    drop(spool);
}

/// Creating a spool syncs the parent of every directory it creates (the
/// spool directory, `segments/`, `quarantine/`).
#[tokio::test]
async fn creating_the_spool_syncs_the_new_directories() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("new").join("spool");
    let faults = Faults::new();
    let spool = open(&dir, &faults).await;
    spool.close().await.expect("close");
    let trace = faults.trace();
    let synced_after = |created: &Path, parent: &Path| {
        let Some(at) = trace
            .iter()
            .position(|e| e.op == Op::CreateDir && e.path.as_deref() == Some(created))
        else {
            return true; // not created by this call (a parent's call made it)
        };
        trace[at..]
            .iter()
            .any(|e| e.op == Op::DirSync && e.path.as_deref() == Some(parent))
    };
    for (created, parent) in [
        (dir.clone(), tmp.path().join("new")),
        (dir.clone(), tmp.path().to_path_buf()),
        (dir.join("segments"), dir.clone()),
        (dir.join("quarantine"), dir.clone()),
    ] {
        assert!(
            synced_after(&created, &parent),
            "{} created without a sync of {}",
            created.display(),
            parent.display()
        );
    }
}

/// `lease` reads payloads off the runtime's threads (this test's runtime
/// runs on the test thread).
#[tokio::test(flavor = "current_thread")]
async fn lease_reads_payloads_off_the_runtime_thread() {
    let tmp = tempfile::tempdir().expect("tempdir");
    fill(tmp.path(), 3).await;
    let faults = Faults::new();
    let spool = open(tmp.path(), &faults).await;
    let from = faults.trace().len();
    let leased = spool.lease(10, TTL).await.expect("lease");
    assert_eq!(leased.len(), 3);
    let me = std::thread::current().id();
    let here: Vec<_> = faults.trace()[from..]
        .iter()
        .filter(|e| e.thread == me)
        .cloned()
        .collect();
    assert!(
        here.is_empty(),
        "file calls on the runtime thread: {here:?}"
    );
    spool.close().await.expect("close");
}

/// Dropping a spool inside a runtime does not wait for the writer's final
/// sync on the runtime thread; a reopen then waits for it.
#[tokio::test(flavor = "current_thread")]
async fn drop_does_not_block_the_runtime_thread() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let faults = Faults::new();
    let spool = open(tmp.path(), &faults).await;
    spool.enqueue(vec![record(0)]).await.expect("enqueue");
    faults.hold(Op::Sync);
    // Deadlock breaker: if drop blocks until the sync is let go, the
    // watchdog lets it go and says so.
    let by_watchdog = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (faults, flag) = (faults.clone(), by_watchdog.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && !flag.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if !flag.swap(true, Ordering::AcqRel) {
                faults.release();
                eprintln!("watchdog released the held sync");
            }
        })
    };
    drop(spool);
    let blocked = by_watchdog.swap(true, Ordering::AcqRel);
    faults.release();
    watchdog.join().expect("watchdog");
    assert!(
        !blocked,
        "drop blocked the runtime thread until the sync was let go"
    );
    assert_eq!(ids_after_reopen(tmp.path()).await.len(), 1);
}

/// A large garbage tail, in which every byte looks like the start of a
/// 16 MiB frame, is quarantined on open in bounded time and memory: the
/// search for the next good frame stops after a bounded amount of
/// checking, and the tail is copied to quarantine in pieces.
#[test]
fn large_garbage_tail_is_quarantined_in_bounded_time_and_memory() {
    const GARBAGE: usize = 40 << 20;
    let tmp = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(fill(tmp.path(), 3));
    let seg = tmp.path().join("segments").join("00000001.log");
    {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&seg)
            .expect("segment");
        let chunk = vec![1u8; 1 << 20];
        for _ in 0..GARBAGE >> 20 {
            f.write_all(&chunk).expect("garbage");
        }
    }
    let faults = Faults::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let (dir, f) = (tmp.path().to_path_buf(), faults.clone());
    std::thread::spawn(move || {
        let r = rt.block_on(async move {
            let spool = open(&dir, &f).await;
            let n = spool.lease(10, TTL).await.map(|v| v.len());
            let q = spool.stats().await.map(|s| s.quarantined_total);
            drop(spool);
            (n, q)
        });
        let _ = tx.send(r);
    });
    let limit = Duration::from_secs(60);
    let (leased, quarantined) = rx.recv_timeout(limit).unwrap_or_else(|_| {
        panic!(
            "opening a spool with a {} MiB garbage tail took more than {limit:?} ({} reads so far)",
            GARBAGE >> 20,
            faults.calls(Op::Read)
        )
    });
    assert_eq!(leased.expect("lease"), 3, "the good records stay");
    assert!(quarantined.expect("stats") >= 1, "the tail is quarantined");
    let biggest = faults
        .trace()
        .iter()
        .filter(|e| matches!(e.op, Op::Read | Op::Write))
        .map(|e| e.len)
        .max()
        .unwrap_or(0);
    assert!(
        biggest < GARBAGE / 2,
        "one call moved {biggest} bytes of a {GARBAGE}-byte tail"
    );
}

/// A record whose frame is corrupt leaves the spool only once its bytes
/// are safe in quarantine: if the copy fails, the record stays and the
/// call fails.
#[tokio::test]
async fn corrupt_record_stays_until_its_quarantine_copy_succeeds() {
    let tmp = tempfile::tempdir().expect("tempdir");
    fill(tmp.path(), 3).await;
    let faults = Faults::new();
    let spool = open(tmp.path(), &faults).await;
    // Damage record 1's payload after the open checked it.
    let seg = tmp.path().join("segments").join("00000001.log");
    let mut bytes = std::fs::read(&seg).expect("segment");
    let needle = record(1).payload;
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_ref())
        .expect("record 1's payload");
    bytes[at] ^= 0xff;
    std::fs::write(&seg, &bytes).expect("damage");
    // Open 1 is the segment's read handle, open 2 the quarantine file.
    faults.fail_nth(Op::Open, 2, Fault::Enospc);
    let first = spool.lease(10, TTL).await;
    assert!(
        first.is_err(),
        "lease answered {:?} though the quarantine copy failed",
        first.map(|v| v.len())
    );
    let stats = spool.stats().await.expect("stats");
    assert_eq!((stats.ready, stats.quarantined_total), (3, 0), "{stats:?}");
    let leased = spool.lease(10, TTL).await.expect("lease");
    assert_eq!(leased.len(), 2, "the corrupt record is left out");
    let stats = spool.stats().await.expect("stats");
    assert_eq!(stats.quarantined_total, 1, "{stats:?}");
    spool.close().await.expect("close");
}
