//! Relocation: long-lived records do not keep old segments on disk.
//!
//! Each round enqueues one long-lived record and a segment's worth of
//! short-lived ones (leased and acked at once) into small segments (4 KiB).
//! The long-lived record takes turns being delayed for hours, dead-lettered
//! (nobody redrives it), leased by a stuck consumer (10-hour lease) and
//! nacked for hours. Without relocation every segment keeps one of them and
//! the log grows by a segment a round; with it the files on disk stay
//! bounded, and after a reopen every long-lived record is there with its
//! state: due time, attempts, dead reason and time, lease and token.

// The test prints the disk use it saw.
#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reliability_core::{
    Clock, DeadReason, ManualClock, NewRecord, RecordId, Spool, SpoolLimits, SpoolToken, Timestamp,
};
use reliability_disk::DiskSpool;

const SEGMENT_MAX_BYTES: u64 = 4096;
const ROUNDS: usize = 200;
const FILLERS: usize = 12;
const HOUR: Duration = Duration::from_secs(3600);

/// Segment files and their bytes (the writer may delete one meanwhile).
fn disk_use(dir: &Path) -> (usize, u64) {
    let mut files = 0;
    let mut bytes = 0;
    for e in fs::read_dir(dir.join("segments")).expect("segments dir") {
        if let Ok(meta) = e.expect("entry").metadata() {
            files += 1;
            bytes += meta.len();
        }
    }
    (files, bytes)
}

async fn open(dir: &Path, clock: &ManualClock) -> DiskSpool {
    DiskSpool::builder(dir)
        .segment_max_bytes(SEGMENT_MAX_BYTES)
        .limits(SpoolLimits::default().with_retention(Duration::from_secs(30 * 24 * 3600)))
        .clock(Arc::new(clock.clone()))
        .open()
        .await
        .expect("open")
}

/// What a long-lived record should be after the rounds.
#[derive(Debug, Clone)]
enum Fate {
    /// Enqueued with a delay: due then, never attempted.
    Delayed { due: Timestamp },
    /// Leased once, then dead-lettered with this reason at this time.
    Dead { reason: String, at: Timestamp },
    /// Leased once by a consumer that never came back.
    Stuck { token: SpoolToken, until: Timestamp },
    /// Leased once, then nacked: due then.
    Nacked { due: Timestamp },
}

fn id(kind: &str, round: usize, n: usize) -> RecordId {
    RecordId::new(format!("{kind}-{round:04}-{n:02}")).expect("id")
}

fn payload(id: &RecordId) -> Bytes {
    Bytes::from(format!("payload of {id}").repeat(3))
}

#[tokio::test]
async fn long_lived_records_do_not_keep_old_segments() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let clock = ManualClock::new();
    let spool = open(dir, &clock).await;
    let mut fates: BTreeMap<RecordId, Fate> = BTreeMap::new();
    let mut dead_order = Vec::new();
    let mut most = (0, 0);
    for round in 0..ROUNDS {
        clock.advance(Duration::from_secs(1));
        let now = clock.now();
        let long = id("long", round, 0);
        let delay = if round % 4 == 0 {
            fates.insert(
                long.clone(),
                Fate::Delayed {
                    due: now.saturating_add(6 * HOUR),
                },
            );
            6 * HOUR
        } else {
            Duration::ZERO
        };
        let mut batch = vec![NewRecord::new(long.clone(), payload(&long)).with_delay(delay)];
        for n in 0..FILLERS {
            let f = id("filler", round, n);
            batch.push(NewRecord::new(f.clone(), vec![n as u8; 300]));
        }
        let enqueued = spool.enqueue(batch).await.expect("enqueue");
        assert_eq!(enqueued.accepted, FILLERS + 1);
        let leased = spool.lease(100, 10 * HOUR).await.expect("lease");
        for l in leased {
            if l.record.id != long {
                spool.ack(&l.token).await.expect("ack a filler");
                continue;
            }
            match round % 4 {
                1 => {
                    let reason = format!("rejected in round {round}");
                    spool
                        .dead_letter(&l.token, DeadReason::Rejected(reason.clone()))
                        .await
                        .expect("dead-letter");
                    dead_order.push(long.clone());
                    fates.insert(long.clone(), Fate::Dead { reason, at: now });
                }
                2 => {
                    let until = now.saturating_add(10 * HOUR);
                    fates.insert(
                        long.clone(),
                        Fate::Stuck {
                            token: l.token,
                            until,
                        },
                    );
                }
                _ => {
                    let retry_in = 5 * HOUR;
                    let _ = spool.nack(&l.token, retry_in).await.expect("nack");
                    fates.insert(
                        long.clone(),
                        Fate::Nacked {
                            due: now.saturating_add(retry_in),
                        },
                    );
                }
            }
        }
        if round >= 20 {
            let (files, bytes) = disk_use(dir);
            most = (most.0.max(files), most.1.max(bytes));
        }
    }
    assert_eq!(fates.len(), ROUNDS);
    let relocated = spool.relocated_total();
    let (files, bytes) = disk_use(dir);
    println!(
        "{ROUNDS} rounds: {files} segment files, {bytes} bytes on disk at the end \
         (at most {} files, {} bytes after round 20), {relocated} records relocated",
        most.0, most.1
    );
    // Without relocation: a segment a round (over 200 files, 800 KB). With
    // it: at most twice the records' enqueue frames (200 of about 100
    // bytes) plus two segments, and the segment being written.
    assert!(relocated > 0, "nothing was relocated");
    assert!(most.0 <= 24, "{} segment files on disk", most.0);
    assert!(most.1 <= 96 * 1024, "{} bytes on disk", most.1);
    spool.close().await.expect("close");

    // Reopen: every long-lived record is there with its state.
    let spool = open(dir, &clock).await;
    let stats = spool.stats().await.expect("stats");
    let count = |f: fn(&Fate) -> bool| fates.values().filter(|x| f(x)).count() as u64;
    assert_eq!(stats.dead, count(|f| matches!(f, Fate::Dead { .. })));
    assert_eq!(stats.leased, count(|f| matches!(f, Fate::Stuck { .. })));
    assert_eq!(
        stats.delayed,
        count(|f| matches!(f, Fate::Delayed { .. } | Fate::Nacked { .. }))
    );
    assert_eq!(stats.ready, 0);

    let dead = spool.list_dead(1000).await.expect("list dead");
    let dead_ids: Vec<RecordId> = dead.iter().map(|d| d.record.id.clone()).collect();
    assert_eq!(dead_ids, dead_order, "dead-letter order");
    for d in &dead {
        let Some(Fate::Dead { reason, at }) = fates.get(&d.record.id) else {
            panic!("{} is dead", d.record.id);
        };
        assert_eq!(d.reason, DeadReason::Rejected(reason.clone()));
        assert_eq!(d.dead_at, *at);
        assert_eq!(d.record.attempts, 1);
        assert_eq!(d.record.payload, payload(&d.record.id));
    }

    // The stuck consumers' tokens still hold their leases: extending one
    // (to 11 hours from now) works, and nothing leased is handed out again
    // before its lease ends.
    for (rid, fate) in &fates {
        if let Fate::Stuck { token, .. } = fate {
            if rid.as_str().ends_with("0002-00") {
                spool
                    .extend(token, 11 * HOUR)
                    .await
                    .expect("extend a lease held across the reopen");
            }
        }
    }

    // Nacked records come due after 5 hours, attempted once before.
    let start = clock.now();
    clock.advance(5 * HOUR + Duration::from_secs(1));
    let due = spool.lease(1000, HOUR).await.expect("lease nacked");
    let mut want: Vec<RecordId> = fates
        .iter()
        .filter(|(_, f)| matches!(f, Fate::Nacked { due } if *due <= clock.now()))
        .map(|(id, _)| id.clone())
        .collect();
    let mut got: Vec<RecordId> = due.iter().map(|l| l.record.id.clone()).collect();
    want.sort();
    got.sort();
    assert_eq!(got, want, "due after 5 hours");
    for l in &due {
        assert_eq!(l.record.attempts, 2, "{}", l.record.id);
        assert_eq!(l.record.payload, payload(&l.record.id));
        spool.ack(&l.token).await.expect("ack");
    }

    // Delayed records come due at 6 hours, never attempted; stuck leases
    // end at 10 hours (the one extended an hour later).
    clock.advance(
        start
            .saturating_add(10 * HOUR + Duration::from_secs(1))
            .saturating_since(clock.now()),
    );
    let due = spool.lease(1000, HOUR).await.expect("lease the rest");
    let mut got: Vec<RecordId> = due.iter().map(|l| l.record.id.clone()).collect();
    let mut want: Vec<RecordId> = fates
        .iter()
        .filter(|(id, f)| match f {
            Fate::Delayed { due } => *due <= clock.now(),
            Fate::Stuck { until, .. } => *until <= clock.now() && !id.as_str().ends_with("0002-00"),
            _ => false,
        })
        .map(|(id, _)| id.clone())
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "due after 10 hours");
    for l in &due {
        let want_attempts = match fates.get(&l.record.id) {
            Some(Fate::Delayed { .. }) => 1,
            _ => 2,
        };
        assert_eq!(l.record.attempts, want_attempts, "{}", l.record.id);
        assert_eq!(l.record.payload, payload(&l.record.id));
    }
    spool.close().await.expect("close");
}

/// Consumers lease while the writer relocates (every sealed segment that
/// holds records, 2 KiB segments: the whole backlog moves again and again)
/// and deletes the old segments: a lease or `list_dead` that saw a record's
/// old place reads it at the new one, and nothing is taken for corruption,
/// lost or delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_follow_records_that_move() {
    const RECORDS: usize = 600;
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = Arc::new(
        DiskSpool::builder(tmp.path())
            .segment_max_bytes(2048)
            .relocate_below_percent(100)
            .open()
            .await
            .expect("open"),
    );
    let producer = {
        let spool = spool.clone();
        tokio::spawn(async move {
            for chunk in 0..RECORDS / 10 {
                let batch = (0..10)
                    .map(|i| {
                        let id = id("r", chunk, i);
                        NewRecord::new(id.clone(), payload(&id))
                    })
                    .collect();
                spool.enqueue(batch).await.expect("enqueue");
            }
        })
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut dead = 0;
    while seen.len() < RECORDS {
        let leased = spool.lease(7, HOUR).await.expect("lease");
        if leased.is_empty() {
            tokio::task::yield_now().await;
            continue;
        }
        for l in leased {
            assert_eq!(l.record.payload, payload(&l.record.id));
            assert!(seen.insert(l.record.id.clone()), "{} twice", l.record.id);
            // Every fifth record waits in the dead-letter queue a while, so
            // relocations move dead records too.
            if seen.len() % 5 == 0 {
                spool
                    .dead_letter(&l.token, DeadReason::RetriesExhausted)
                    .await
                    .expect("dead-letter");
                dead += 1;
            } else {
                spool.ack(&l.token).await.expect("ack");
            }
        }
        for d in spool.list_dead(1000).await.expect("list dead") {
            assert_eq!(d.record.payload, payload(&d.record.id));
        }
        if dead > 30 {
            assert_eq!(spool.redrive_dead(25).await.expect("redrive"), 25);
            for l in spool.lease(25, HOUR).await.expect("lease redriven") {
                assert_eq!(l.record.payload, payload(&l.record.id));
                spool.ack(&l.token).await.expect("ack redriven");
            }
            dead -= 25;
        }
    }
    producer.await.expect("producer");
    let stats = spool.stats().await.expect("stats");
    assert_eq!(
        stats.quarantined_total, 0,
        "a moved record was taken for corruption"
    );
    assert_eq!(stats.dead, dead);
    assert!(spool.relocated_total() > 0, "nothing was relocated");
    println!(
        "{RECORDS} records, {} relocated, {} segment files at the end",
        spool.relocated_total(),
        disk_use(tmp.path()).0
    );
    let spool = Arc::into_inner(spool).expect("one owner");
    spool.close().await.expect("close");
    let quarantined = fs::read_dir(tmp.path().join("quarantine"))
        .expect("quarantine dir")
        .count();
    assert_eq!(quarantined, 0);
}

/// A full disk in the middle of relocating: the steps that cannot be
/// written leave the records where they were (the writer cuts the segment
/// back), relocation resumes once writes succeed again, and after a reopen
/// every long-lived record the spool acknowledged is there.
#[tokio::test]
async fn a_full_disk_during_relocation_loses_nothing() {
    use std::sync::atomic::{AtomicU64, Ordering};

    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let clock = ManualClock::new();
    let budget = Arc::new(AtomicU64::new(u64::MAX / 2));
    let spool = DiskSpool::builder(dir)
        .segment_max_bytes(SEGMENT_MAX_BYTES)
        .clock(Arc::new(clock.clone()))
        .fail_writes_after(budget.clone())
        .open()
        .await
        .expect("open");
    let mut kept = Vec::new();
    let mut refused = 0;
    for round in 0..120usize {
        // Rounds 40 to 59 run on a nearly full disk: 3,000 to 7,000 bytes of
        // room each, so some enqueues fail and some pass, and the relocation
        // steps after a passing one often fail (23 failed steps in one run).
        let full = (40..60).contains(&round);
        budget.store(
            if full {
                3000 + 500 * (round as u64 % 9)
            } else {
                u64::MAX / 2
            },
            Ordering::Release,
        );
        clock.advance(Duration::from_secs(1));
        let long = id("long", round, 0);
        let mut batch = vec![NewRecord::new(long.clone(), payload(&long)).with_delay(6 * HOUR)];
        for n in 0..FILLERS {
            batch.push(NewRecord::new(id("filler", round, n), vec![n as u8; 300]));
        }
        match spool.enqueue(batch).await {
            Ok(e) => {
                assert_eq!(e.accepted, FILLERS + 1);
                kept.push(long);
            }
            Err(e) => {
                assert!(full, "round {round}: {e}");
                refused += 1;
            }
        }
        for l in spool.lease(100, HOUR).await.unwrap_or_default() {
            // An ack the disk refuses may come back: it is acked again below.
            let _ = spool.ack(&l.token).await;
        }
    }
    budget.store(u64::MAX / 2, Ordering::Release);
    clock.advance(2 * HOUR);
    for l in spool
        .lease(10_000, HOUR)
        .await
        .expect("lease the fillers left")
    {
        spool.ack(&l.token).await.expect("ack");
    }
    let relocated = spool.relocated_total();
    let (files, bytes) = disk_use(dir);
    println!(
        "{} rounds refused, {} kept, {relocated} relocated, {files} files, {bytes} bytes",
        refused,
        kept.len()
    );
    assert!(refused > 0, "the disk never refused");
    assert!(relocated > 0, "nothing was relocated");
    assert!(files <= 24, "{files} segment files on disk");
    spool.close().await.expect("close");

    let spool = open(dir, &clock).await;
    clock.advance(7 * HOUR);
    let due = spool.lease(10_000, HOUR).await.expect("lease");
    let mut got: Vec<RecordId> = due.iter().map(|l| l.record.id.clone()).collect();
    got.sort();
    kept.sort();
    assert_eq!(
        got, kept,
        "every acknowledged long-lived record, nothing else"
    );
    for l in &due {
        assert_eq!(l.record.payload, payload(&l.record.id));
        assert_eq!(l.record.attempts, 1);
    }
    spool.close().await.expect("close");
}
