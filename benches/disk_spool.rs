//! Durable enqueue throughput of `DiskSpool` against a raw write+fsync loop
//! and the `queue-file` crate, all on the same disk, in one run.
//!
//! Not a criterion bench: it measures throughput over a fixed time and
//! prints one table (`benches/disk_ratios.sh` runs it):
//!
//! - raw, preallocated: write a 256-byte record into a file preallocated
//!   1 MiB ahead with written zeros (as `DiskSpool` preallocates its active
//!   segment by default: the writes of the next 1 MiB are made, in the
//!   loop, when the records reach the end), `fdatasync`, repeat. The
//!   baseline of the 1-producer target: the same file treatment as the
//!   spool, so the ratio is the spool's own cost;
//! - raw, on a writer thread: the preallocated raw loop run by a plain
//!   thread for a task on the tokio runtime (a std channel in, a tokio
//!   oneshot back): the least any async API that keeps `fdatasync` off the
//!   runtime's threads adds to a raw sync (two thread wake-ups). Shown for
//!   reference: it is the floor of the 1-producer ratio on this machine;
//! - raw, growing: append a 256-byte record to a file, `fdatasync`, repeat
//!   (every sync also commits the file's new size); shown for reference;
//! - `DiskSpool`, `FsyncMode::Always`, 1 producer: `enqueue` one 256-byte
//!   record, wait for it to return (durable), repeat;
//! - `DiskSpool`, `FsyncMode::Always`, 64 producers: 64 tasks doing the same
//!   on one spool (group commit shares the syncs);
//! - `queue-file`: `add` one 256-byte record with `set_sync_writes(true)`
//!   (it syncs on every add: equal durability), repeat.
//!
//! Then the targets: 1 producer >= 0.95x the raw loop on a thread for a
//! tokio caller (the floor of any async API that keeps `fdatasync` off the
//! runtime's threads), the median of the turns' ratios; the raw
//! synchronous loop (preallocated, and growing) shown beside it for
//! reference; 64 producers >= 100,000 records/s and >= 20x queue-file.
//! Exits 1 if one is missed.
//!
//! The measurements take turns (`BENCH_ROUNDS`, default 6, turns of
//! `BENCH_SECS / BENCH_ROUNDS`), so a neighbour loading the disk or the CPU
//! for a while skews them alike (each turn starts one measurement later
//! in the list, so none always follows the same one). `BENCH_SECS`
//! (default 3) sets each measurement's total length; `BENCH_DIR` the
//! directory to measure in (default: the system temp dir). `BENCH_ONLY`
//! picks measurements by key (default `raw,rawthread,rawgrow,1,64,qf`); `1grow` and
//! `64grow` run the spool with preallocation off (`preallocate_bytes(0)`),
//! for A/B comparisons.
#![allow(clippy::print_stdout, reason = "a bench prints its table")]

use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reliability_core::{NewRecord, RecordId, Spool, SpoolLimits};
use reliability_disk::{DiskSpool, FsyncMode};

const RECORD: usize = 256;

struct Measured {
    records: u64,
    elapsed: Duration,
    /// Per-call latencies in microseconds, sorted.
    latencies: Vec<u64>,
}

impl Measured {
    fn merge(&mut self, other: Measured) {
        self.records += other.records;
        self.elapsed += other.elapsed;
        self.latencies.extend(other.latencies);
        self.latencies.sort_unstable();
    }

    fn rate(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64()
    }

    fn pct(&self, p: f64) -> String {
        self.pct_us(p).map_or_else(|| "-".into(), |v| v.to_string())
    }

    fn pct_us(&self, p: f64) -> Option<u64> {
        if self.latencies.is_empty() {
            return None;
        }
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        Some(self.latencies[i])
    }
}

/// The raw baseline: 256-byte records written one by one, each followed by
/// `fdatasync`; preallocated with written zeros 1 MiB ahead, or growing.
struct RawLog {
    file: std::fs::File,
    preallocate: bool,
    off: u64,
    allocated: u64,
    zeros: Vec<u8>,
}

impl RawLog {
    const AHEAD: u64 = 1024 * 1024;

    fn create(dir: &Path, preallocate: bool) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(dir.join("raw.log"))
            .expect("open raw.log");
        Self {
            file,
            preallocate,
            off: 0,
            allocated: 0,
            zeros: vec![0u8; Self::AHEAD as usize],
        }
    }

    /// Writes one record and syncs it.
    fn append(&mut self) {
        if self.preallocate && self.off + RECORD as u64 > self.allocated {
            self.file
                .write_all_at(&self.zeros, self.allocated)
                .expect("preallocate");
            self.allocated += Self::AHEAD;
        }
        self.file
            .write_all_at(&[0x5au8; RECORD], self.off)
            .expect("write");
        self.off += RECORD as u64;
        self.file.sync_data().expect("fdatasync");
    }
}

fn measured(start: Instant, mut lat: Vec<u64>) -> Measured {
    let elapsed = start.elapsed();
    lat.sort_unstable();
    Measured {
        records: lat.len() as u64,
        elapsed,
        latencies: lat,
    }
}

fn raw_fsync(dir: &Path, secs: Duration, preallocate: bool) -> Measured {
    let mut log = RawLog::create(dir, preallocate);
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed() < secs {
        let t = Instant::now();
        log.append();
        lat.push(t.elapsed().as_micros() as u64);
    }
    measured(start, lat)
}

/// The raw loop on a thread of its own, for a task on the runtime.
async fn raw_thread(dir: &Path, secs: Duration) -> Measured {
    let mut log = RawLog::create(dir, true);
    let (tx, rx) = std::sync::mpsc::channel::<tokio::sync::oneshot::Sender<()>>();
    let h = std::thread::spawn(move || {
        while let Ok(r) = rx.recv() {
            log.append();
            let _ = r.send(());
        }
    });
    // A spawned task, as the spool's producers are.
    let (start, lat) = tokio::spawn(async move {
        let mut lat = Vec::new();
        let start = Instant::now();
        while start.elapsed() < secs {
            let t = Instant::now();
            let (otx, orx) = tokio::sync::oneshot::channel();
            tx.send(otx).expect("send");
            orx.await.expect("reply");
            lat.push(t.elapsed().as_micros() as u64);
        }
        (start, lat)
    })
    .await
    .expect("caller");
    h.join().expect("join");
    measured(start, lat)
}

fn queue_file(dir: &Path, secs: Duration) -> Measured {
    let mut q = queue_file::QueueFile::open(dir.join("queue-file.qf")).expect("open queue-file");
    q.set_sync_writes(true);
    let rec = [0x5au8; RECORD];
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed() < secs {
        let t = Instant::now();
        q.add(&rec).expect("queue-file add");
        lat.push(t.elapsed().as_micros() as u64);
    }
    measured(start, lat)
}

async fn disk_spool(dir: PathBuf, producers: usize, prealloc: bool, secs: Duration) -> Measured {
    let spool = Arc::new(
        DiskSpool::builder(dir)
            .preallocate_bytes(if prealloc {
                reliability_disk::DEFAULT_PREALLOCATE_BYTES
            } else {
                0
            })
            .limits(
                SpoolLimits::default()
                    .with_max_records(u64::MAX / 4)
                    .with_max_bytes(u64::MAX / 4),
            )
            .fsync(FsyncMode::Always)
            .open()
            .await
            .expect("open DiskSpool"),
    );
    let payload = Bytes::from(vec![0x5au8; RECORD]);
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + secs;
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..producers {
        let (spool, payload, count) = (spool.clone(), payload.clone(), count.clone());
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                let id = RecordId::new(format!("p{p}-{n}")).expect("id");
                n += 1;
                let t = Instant::now();
                spool
                    .enqueue(vec![NewRecord::new(id, payload.clone())])
                    .await
                    .expect("enqueue");
                lat.push(t.elapsed().as_micros() as u64);
                count.fetch_add(1, Ordering::Relaxed);
            }
            lat
        });
    }
    let mut latencies = Vec::new();
    while let Some(l) = tasks.join_next().await {
        latencies.extend(l.expect("producer"));
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    Arc::into_inner(spool)
        .expect("sole owner")
        .close()
        .await
        .expect("close");
    Measured {
        records: count.load(Ordering::Relaxed),
        elapsed,
        latencies,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not run
    // a measurement.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let secs = Duration::from_secs_f64(
        std::env::var("BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3.0),
    );
    let rounds: u32 = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6)
        .max(1);
    let only =
        std::env::var("BENCH_ONLY").unwrap_or_else(|_| "raw,rawthread,rawgrow,1,64,qf".into());
    let runs = |key: &str| only.split(',').any(|o| o.trim() == key);
    let root = match std::env::var_os("BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .expect("bench dir");
    let sub = |name: &str| {
        let p = root.path().join(name);
        std::fs::create_dir_all(&p).expect("mkdir");
        p
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let load = || {
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "?".into())
    };
    let load_before = load();

    // The measurements take turns, `rounds` times, so a disk or CPU busy
    // with something else for a while weighs on all of them alike.
    let slice = secs / rounds;
    let rows: [(&str, &str); 8] = [
        ("raw", "raw write(256 B) + fdatasync, preallocated"),
        ("rawthread", "raw, preallocated, on a thread, tokio caller"),
        ("rawgrow", "raw write(256 B) + fdatasync, growing file"),
        ("1", "DiskSpool Always, 1 producer"),
        ("1grow", "DiskSpool Always, 1 producer, no prealloc"),
        ("64", "DiskSpool Always, 64 producers"),
        ("64grow", "DiskSpool Always, 64 producers, no prealloc"),
        ("qf", "queue-file add, sync_writes(true)"),
    ];
    let mut got: Vec<Measured> = rows
        .iter()
        .map(|_| Measured {
            records: 0,
            elapsed: Duration::ZERO,
            latencies: Vec::new(),
        })
        .collect();
    // Records/s of each measurement in each turn, for the spread.
    let mut turns: Vec<Vec<f64>> = Vec::new();
    for r in 0..rounds {
        let mut turn = vec![f64::NAN; rows.len()];
        // Each turn starts one measurement further down the list, so none
        // always runs right after the same neighbour.
        for k in 0..rows.len() {
            let i = (k + r as usize) % rows.len();
            let key = rows[i].0;
            if !runs(key) {
                continue;
            }
            let dir = sub(&format!("{key}-{r}"));
            let m = match key {
                "raw" => raw_fsync(&dir, slice, true),
                "rawthread" => rt.block_on(raw_thread(&dir, slice)),
                "rawgrow" => raw_fsync(&dir, slice, false),
                "1" => rt.block_on(disk_spool(dir, 1, true, slice)),
                "1grow" => rt.block_on(disk_spool(dir, 1, false, slice)),
                "64" => rt.block_on(disk_spool(dir, 64, true, slice)),
                "64grow" => rt.block_on(disk_spool(dir, 64, false, slice)),
                _ => queue_file(&dir, slice),
            };
            turn[i] = m.rate();
            got[i].merge(m);
        }
        turns.push(turn);
    }
    let median = |key: &str| {
        rows.iter()
            .position(|(k, _)| *k == key)
            .and_then(|i| got[i].pct_us(0.5))
            .map_or(f64::NAN, |v| v as f64)
    };
    let rate = |key: &str| {
        rows.iter()
            .position(|(k, _)| *k == key)
            .map_or(f64::NAN, |i| got[i].rate())
    };

    println!(
        "durable 256-byte records, {:.1} s each in {rounds} turns, in {}",
        secs.as_secs_f64(),
        root.path().display()
    );
    println!(
        "load average (1, 5, 15 min): before {load_before}, after {}",
        load()
    );
    println!(
        "{:46} {:>10} {:>12} {:>9} {:>9}",
        "what", "records", "records/s", "p50 µs", "p99 µs"
    );
    for ((key, what), m) in rows.iter().zip(&got) {
        if !runs(key) {
            continue;
        }
        println!(
            "{what:46} {:>10} {:>12.0} {:>9} {:>9}",
            m.records,
            m.rate(),
            m.pct(0.5),
            m.pct(0.99)
        );
    }
    println!();
    // The ratio of two measurements turn by turn, and its median over the
    // turns (each turn measures both within a few seconds: the median
    // shrugs off a turn a neighbour disturbed).
    let at = |key: &str| rows.iter().position(|(k, _)| *k == key);
    let per_turn = |a: Option<usize>, b: Option<usize>| -> Vec<f64> {
        turns
            .iter()
            .map(|t| match (a, b) {
                (Some(a), Some(b)) => t[a] / t[b],
                _ => f64::NAN,
            })
            .collect()
    };
    let median_of = |mut v: Vec<f64>| {
        v.retain(|x| !x.is_nan());
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    };
    let targets = [
        (
            "1 producer / raw on a thread (median of turns)",
            median_of(per_turn(at("1"), at("rawthread"))),
            Some(0.95),
            "x",
        ),
        (
            "1 producer / raw fsync rate (preallocated)",
            rate("1") / rate("raw"),
            None,
            "x",
        ),
        (
            "1 producer / raw fsync rate (growing file)",
            rate("1") / rate("rawgrow"),
            None,
            "x",
        ),
        (
            "raw on a thread for a task / raw (async floor)",
            rate("rawthread") / rate("raw"),
            None,
            "x",
        ),
        (
            "1 producer / raw on a thread (overall rates)",
            rate("1") / rate("rawthread"),
            None,
            "x",
        ),
        (
            "1 producer / raw, by median latency (prealloc.)",
            median("raw") / median("1"),
            None,
            "x",
        ),
        ("64 producers, records/s", rate("64"), Some(100_000.0), ""),
        (
            "64 producers / queue-file",
            rate("64") / rate("qf"),
            Some(20.0),
            "x",
        ),
    ];
    let mut missed = false;
    println!("{:46} {:>12} {:>12}", "target", "measured", "wanted");
    for (what, value, want, unit) in targets {
        if value.is_nan() {
            continue;
        }
        let verdict = match want {
            Some(w) if value >= w => "ok",
            Some(_) => {
                missed = true;
                "MISSED"
            }
            None => "(reference)",
        };
        let wanted = want.map_or_else(|| "-".to_string(), |w| format!(">= {w}"));
        println!("{what:46} {value:>11.2}{unit:1} {wanted:>10}{unit:1}  {verdict}");
    }
    // The same ratios turn by turn: how much the machine moved meanwhile.
    let pairs = [
        ("1 / raw", at("1"), at("raw")),
        ("floor / raw", at("rawthread"), at("raw")),
        ("1 / floor", at("1"), at("rawthread")),
        ("64 / queue-file", at("64"), at("qf")),
    ];
    println!();
    print!("turn");
    for (name, _, _) in &pairs {
        print!(" {name:>16}");
    }
    println!();
    for (r, turn) in turns.iter().enumerate() {
        print!("{r:>4}");
        for (_, a, b) in &pairs {
            let v = match (a, b) {
                (Some(a), Some(b)) => turn[*a] / turn[*b],
                _ => f64::NAN,
            };
            print!(" {v:>15.2}x");
        }
        println!();
    }
    if missed {
        // `exit` runs no destructors: remove the measurement files first.
        drop(root);
        std::process::exit(1);
    }
}
