//! Crash oracle: a child process writes to a [`DiskSpool`] and is killed
//! with SIGKILL at random moments; after each kill the parent reopens the
//! same directory and checks that nothing acknowledged was lost.
//!
//! The test binary runs itself as the child (`current_exe()` with
//! `RELIABILITY_CRASH_CHILD=<dir>` and `--exact crash_child`). The child
//! opens the spool in `FsyncMode::Always` and runs several producer tasks
//! that enqueue batches of records and print `@@E <id>` for every record of
//! a batch once `enqueue` returned. In two cycles out of three a consumer
//! task also leases records, checks their payloads, acks most of them
//! (printing `@@L <id>` before it calls `ack` and `@@A <id>` once `ack`
//! returned) and nacks the rest, so kills
//! land in the middle of leases, acks and nacks as well as enqueues. In odd
//! cycles the child relocates eagerly (the records of the oldest sealed
//! segment move whenever it holds any: `relocate_below_percent(100)`), so
//! kills also land in the middle of relocations and of the deletions that
//! follow them. Every payload is derived from its id, so a payload can be
//! checked anywhere.
//!
//! The parent kills the child after a random number of printed lines (0
//! included: a kill while the spool is opening), reopens the spool, leases
//! everything and checks, with `must` = every id printed as enqueued or
//! seen present at an earlier check, minus the ids a consumer acked or was
//! about to ack since (`@@L`: the kill may land between `ack` and `@@A`):
//! - every id in `must` is present (0 lost);
//! - every present record has an id of the child's form and an intact
//!   payload (never an id that was not enqueued);
//! - an id the parent acked before a clean close never comes back;
//! - an acked id may come back (at-least-once; counted as a duplicate), and
//!   an id enqueued but killed before it was printed may appear (counted as
//!   an unacknowledged extra; from then on it must stay).
//!
//! The parent reads the spool on a manual clock an hour ahead of the real
//! one: leases are durable, so a record a killed consumer had leased stays
//! invisible for its lease (30 s) on the real clock, and an hour ahead
//! every such lease has ended. Its own leases (1 µs) end before the next
//! parent's check for the same reason. Then it closes the spool and starts
//! the next child on the same directory; later consumers see the records
//! enqueued in their own run. `CRASH_CYCLES=N` sets the number of
//! cycles (default 50), `CRASH_SEED=N` the random seed (printed on failure).
//!
//! The child exits by itself when its standard input closes (the parent
//! died) or after 60 seconds, so no process outlives the test.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use reliability_core::{Clock, ManualClock, NewRecord, RecordId, Spool, SpoolLimits, SystemClock};
use reliability_disk::{DiskSpool, FsyncMode, DEFAULT_RELOCATE_BELOW_PERCENT};

const CHILD_ENV: &str = "RELIABILITY_CRASH_CHILD";
const CYCLE_ENV: &str = "RELIABILITY_CRASH_CYCLE";
const PRODUCERS: usize = 6;
/// Small segments, so they roll and get compacted between kills.
const SEGMENT_MAX_BYTES: u64 = 64 * 1024;
/// Largest number of printed lines after which the parent kills the child.
const MAX_LINES_BEFORE_KILL: u64 = 400;

fn limits() -> SpoolLimits {
    SpoolLimits::default()
        .with_max_records(u64::MAX / 4)
        .with_max_bytes(u64::MAX / 4)
}

/// The payload of `id`: its bytes repeated to a length between 16 and 527
/// bytes that depends on the id.
fn payload_of(id: &str) -> Bytes {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let len = 16 + (h % 512) as usize;
    Bytes::from(id.bytes().cycle().take(len).collect::<Vec<u8>>())
}

/// Whether `id` has the form the child gives its ids: `c<cycle>-p<task>-<n>`.
fn child_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('-').collect();
    parts.len() == 3
        && parts[0]
            .strip_prefix('c')
            .is_some_and(|c| c.parse::<u64>().is_ok())
        && parts[1]
            .strip_prefix('p')
            .is_some_and(|p| p.parse::<u64>().is_ok())
        && parts[2].parse::<u64>().is_ok()
}

/// The cycle in a child id.
fn id_cycle(id: &str) -> u64 {
    id.strip_prefix('c')
        .and_then(|rest| rest.split('-').next())
        .and_then(|c| c.parse().ok())
        .expect("a child id")
}

/// splitmix64: a small seeded generator (no dependency needed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---------------------------------------------------------------------------
// Child

/// Prints one line and flushes it, under a lock so lines never interleave.
fn say(out: &Mutex<()>, tag: char, id: &str) {
    let _guard = out
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut stdout = std::io::stdout().lock();
    // A closed pipe means the parent is gone: stop.
    if writeln!(stdout, "@@{tag} {id}")
        .and_then(|()| stdout.flush())
        .is_err()
    {
        std::process::exit(0);
    }
}

async fn child_main(dir: &Path, cycle: u64) {
    let spool = Arc::new(
        DiskSpool::builder(dir)
            .limits(limits())
            .fsync(FsyncMode::Always)
            .segment_max_bytes(SEGMENT_MAX_BYTES)
            .relocate_below_percent(if cycle % 2 == 1 {
                100
            } else {
                DEFAULT_RELOCATE_BELOW_PERCENT
            })
            .open()
            .await
            .expect("child: open"),
    );
    let out = Arc::new(Mutex::new(()));
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..PRODUCERS {
        let (spool, out) = (spool.clone(), out.clone());
        tasks.spawn(async move {
            let mut rng = Rng(cycle << 8 | p as u64);
            let mut n = 0u64;
            loop {
                let size = 1 + rng.below(8);
                let ids: Vec<String> = (0..size)
                    .map(|i| format!("c{cycle}-p{p}-{}", n + i))
                    .collect();
                n += size;
                let batch = ids
                    .iter()
                    .map(|id| {
                        NewRecord::new(RecordId::new(id.clone()).expect("id"), payload_of(id))
                    })
                    .collect();
                spool.enqueue(batch).await.expect("child: enqueue");
                for id in &ids {
                    say(&out, 'E', id);
                }
            }
        });
    }
    if !cycle.is_multiple_of(3) {
        let (spool, out) = (spool.clone(), out.clone());
        tasks.spawn(async move {
            let mut rng = Rng(!cycle);
            loop {
                let got = spool
                    .lease(1 + rng.below(32) as usize, Duration::from_secs(30))
                    .await
                    .expect("child: lease");
                if got.is_empty() {
                    // Poll again shortly (nothing to synchronise with).
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                for l in got {
                    let id = l.record.id.as_str();
                    assert_eq!(l.record.payload, payload_of(id), "child: payload of {id}");
                    if rng.below(8) == 0 {
                        let _ = spool
                            .nack(&l.token, Duration::ZERO)
                            .await
                            .expect("child: nack");
                    } else {
                        say(&out, 'L', id);
                        spool.ack(&l.token).await.expect("child: ack");
                        say(&out, 'A', id);
                    }
                }
            }
        });
    }
    if let Some(done) = tasks.join_next().await {
        done.expect("child task");
    }
}

/// The child's entry point; a no-op unless the parent started this process.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let cycle: u64 = std::env::var(CYCLE_ENV)
        .ok()
        .and_then(|c| c.parse().ok())
        .expect("cycle");
    // Exit when the parent goes away (its end of our stdin closes), or
    // after a minute whatever happens.
    std::thread::spawn(|| {
        let mut buf = [0u8; 64];
        while matches!(std::io::stdin().read(&mut buf), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
    std::thread::spawn(|| {
        std::thread::park_timeout(Duration::from_secs(60));
        std::process::exit(0);
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(child_main(Path::new(&dir), cycle));
}

// ---------------------------------------------------------------------------
// Parent

/// Kills the child if the parent unwinds before it did.
struct Reaper(Option<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[derive(Default, Debug)]
struct Tally {
    enqueued_acked: u64,
    consumer_acked: u64,
    ack_started: u64,
    parent_acked: u64,
    /// Acked ids present again (the ack was lost).
    duplicates: u64,
    /// Ids killed between `@@L` and `@@A` whose ack did not land.
    ack_interrupted: u64,
    /// Ids enqueued but killed before `@@E` was printed.
    extras: u64,
    quarantined: u64,
    max_present: usize,
    max_segments: usize,
    segments_at_end: usize,
}

/// One child run: start it, kill it after `kill_after` lines, return the
/// lines it printed.
/// Returns the ids printed as enqueued, as about to be acked and as acked.
fn run_child(dir: &Path, cycle: u64, kill_after: u64) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut child = Command::new(std::env::current_exe().expect("current_exe"))
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .env(CYCLE_ENV, cycle.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("stdout");
    let mut reaper = Reaper(Some(child));
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // libtest may print "test crash_child ... " before the child's
            // first line, on the same line.
            let Some(at) = line.find("@@") else { continue };
            if tx.send(line[at..].to_string()).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    while (lines.len() as u64) < kill_after {
        match rx.recv() {
            Ok(line) => lines.push(line),
            Err(_) => panic!("cycle {cycle}: the child exited before it was killed"),
        }
    }
    let mut child = reaper.0.take().expect("child");
    child.kill().expect("kill -9 the child");
    child.wait().expect("reap the child");
    reader.join().expect("reader thread");
    lines.extend(rx.try_iter());
    let (mut enq, mut acked) = (Vec::new(), Vec::new());
    let mut acking = BTreeSet::new();
    for line in lines {
        match line.split_once(' ') {
            Some(("@@E", id)) => enq.push(id.to_string()),
            Some(("@@L", id)) => {
                acking.insert(id.to_string());
            }
            Some(("@@A", id)) => {
                assert!(acking.contains(id), "cycle {cycle}: @@A {id} without @@L");
                acked.push(id.to_string());
            }
            _ => panic!("cycle {cycle}: unexpected line {line:?}"),
        }
    }
    (enq, acking.into_iter().collect(), acked)
}

/// What the parent knows across cycles.
#[derive(Default)]
struct Oracle {
    /// Ids that must be present at the next check.
    must: BTreeSet<String>,
    /// Ids a child printed `@@A` for.
    acked: BTreeSet<String>,
    /// Ids a child printed `@@L` for.
    acking: BTreeSet<String>,
    /// Ids the parent acked before a clean close: they never come back.
    parent_acked: BTreeSet<String>,
    tally: Tally,
}

/// Opens the spool after a kill, checks it, acks every record enqueued two
/// or more cycles ago and half of the newer ones (so the backlog stays small
/// and whole segments become obsolete: compaction runs between and during
/// kills) and closes it.
async fn check_after_kill(
    clock: &ManualClock,
    dir: &Path,
    cycle: u64,
    oracle: &mut Oracle,
    rng: &mut Rng,
) {
    let spool = DiskSpool::builder(dir)
        .limits(limits())
        .fsync(FsyncMode::Never)
        .segment_max_bytes(SEGMENT_MAX_BYTES)
        .clock(Arc::new(clock.clone()))
        .open()
        .await
        .unwrap_or_else(|e| panic!("cycle {cycle}: reopen after kill -9: {e}"));
    let stats = spool.stats().await.expect("stats");
    oracle.tally.quarantined += stats.quarantined_total;
    assert_eq!(
        stats.dead, 0,
        "cycle {cycle}: nothing is dead-lettered here"
    );
    let leased = spool
        .lease(usize::MAX, Duration::from_micros(1))
        .await
        .expect("lease everything");
    let mut present = BTreeSet::new();
    let tally = &mut oracle.tally;
    for l in &leased {
        let id = l.record.id.as_str();
        assert!(
            child_id(id),
            "cycle {cycle}: record {id:?} was never enqueued"
        );
        assert_eq!(
            l.record.payload,
            payload_of(id),
            "cycle {cycle}: payload of {id} damaged"
        );
        assert!(
            present.insert(id.to_string()),
            "cycle {cycle}: {id} leased twice"
        );
        assert!(
            !oracle.parent_acked.contains(id),
            "cycle {cycle}: {id} came back after an ack and a clean close"
        );
        if !oracle.must.contains(id) {
            if oracle.acked.contains(id) {
                tally.duplicates += 1;
            } else if oracle.acking.contains(id) {
                tally.ack_interrupted += 1;
            } else {
                tally.extras += 1;
            }
        }
    }
    let lost: Vec<&String> = oracle.must.difference(&present).collect();
    assert!(
        lost.is_empty(),
        "cycle {cycle}: {} acknowledged records lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert_eq!(
        stats.depth(),
        present.len() as u64,
        "cycle {cycle}: stats depth and the leased records disagree"
    );
    tally.max_present = tally.max_present.max(present.len());
    // The leases (1 µs) have ended on this clock, and acks still succeed:
    // no other lease took the records.
    for l in &leased {
        let old = id_cycle(l.record.id.as_str()) + 2 <= cycle;
        if old || rng.below(2) == 0 {
            spool.ack(&l.token).await.expect("parent ack");
            let id = l.record.id.to_string();
            present.remove(&id);
            oracle.parent_acked.insert(id);
            tally.parent_acked += 1;
        }
    }
    spool.close().await.expect("close");
    // Evidence that compaction runs: segments come and go.
    let segments = std::fs::read_dir(dir.join("segments")).map_or(0, Iterator::count);
    oracle.tally.max_segments = oracle.tally.max_segments.max(segments);
    oracle.tally.segments_at_end = segments;
    oracle.must = present;
}

#[test]
fn kill_9_loses_no_acknowledged_record() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let cycles: u64 = std::env::var("CRASH_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(50);
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("crash oracle: {cycles} cycles, CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut oracle = Oracle::default();
    let started = std::time::Instant::now();
    for cycle in 0..cycles {
        let kill_after = match rng.below(10) {
            0 => 0,
            1 => 1 + rng.below(10),
            _ => rng.below(MAX_LINES_BEFORE_KILL + 1),
        };
        let (enq, acking, acked) = run_child(dir.path(), cycle, kill_after);
        oracle.tally.enqueued_acked += enq.len() as u64;
        oracle.tally.ack_started += acking.len() as u64;
        oracle.tally.consumer_acked += acked.len() as u64;
        oracle.must.extend(enq);
        for id in acking {
            assert!(
                child_id(&id),
                "cycle {cycle}: the consumer leased {id:?}, which was never enqueued"
            );
            oracle.must.remove(&id);
            oracle.acking.insert(id);
        }
        oracle.acked.extend(acked);
        // An hour ahead of the real clock: every lease a child took has ended.
        let clock = ManualClock::starting_at(
            SystemClock::new()
                .now()
                .saturating_add(Duration::from_secs(3600)),
        );
        rt.block_on(check_after_kill(
            &clock,
            dir.path(),
            cycle,
            &mut oracle,
            &mut rng,
        ));
    }
    eprintln!(
        "crash oracle: {cycles} cycles in {:.1?}, seed {seed}: {:?}, 0 lost",
        started.elapsed(),
        oracle.tally
    );
}
