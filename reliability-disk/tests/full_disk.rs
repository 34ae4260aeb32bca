//! A full disk (issue 4): `enqueue` answers an `Unavailable { reason: Io }`
//! error (never a panic, never `Full`), nothing acknowledged is lost, and
//! writing resumes once space frees.
//!
//! The disk is real where possible: a 1 MiB tmpfs mounted on a temporary
//! directory (needs root, as on the CI machines), unmounted by a drop guard.
//! Where mounting is refused, the test says so and runs against the
//! spool's fault-injecting write hook instead.

// The test reports which kind of full disk it used.
#![allow(clippy::print_stdout)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reliability_core::{Error, NewRecord, RecordId, Spool, UnavailableReason};
use reliability_disk::DiskSpool;

const PAYLOAD: usize = 4096;

/// Unmounts on drop (also when the test fails).
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn try_mount(at: &Path) -> Result<Mount, String> {
    fs::create_dir_all(at).map_err(|e| e.to_string())?;
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(at)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(Mount(at.to_path_buf()))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn record(i: usize) -> NewRecord {
    let id = RecordId::new(format!("r{i:05}")).expect("id");
    let byte = (i % 251) as u8;
    NewRecord::new(id, vec![byte; PAYLOAD])
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
        "a full disk is an Io unavailability, got {e:?}"
    );
}

/// Enqueues one record at a time until the disk refuses; returns the
/// acknowledged indices.
async fn fill_until_refused(spool: &DiskSpool, from: usize) -> (Vec<usize>, Error) {
    let mut acked = Vec::new();
    for i in from..from + 10_000 {
        match spool.enqueue(vec![record(i)]).await {
            Ok(e) => {
                assert_eq!(e.accepted, 1);
                acked.push(i);
            }
            Err(e) => return (acked, e),
        }
    }
    panic!("the disk never filled up");
}

/// Every acknowledged record is there, payload intact.
async fn assert_all_present(spool: &DiskSpool, acked: &[usize]) {
    let got = spool
        .lease(acked.len() + 10, Duration::from_secs(60))
        .await
        .expect("lease");
    let mut seen: Vec<usize> = got
        .iter()
        .map(|l| {
            let i: usize = l.record.id.as_str()[1..].parse().expect("index");
            assert_eq!(
                l.record.payload,
                vec![(i % 251) as u8; PAYLOAD],
                "payload of {i}"
            );
            i
        })
        .collect();
    seen.sort_unstable();
    let mut want = acked.to_vec();
    want.sort_unstable();
    assert_eq!(seen, want, "every acknowledged record, nothing else");
}

#[tokio::test]
async fn full_disk_refuses_then_resumes_and_loses_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("mnt");
    match try_mount(&mnt) {
        Ok(mount) => {
            println!("full_disk: real 1 MiB tmpfs mounted at {}", mnt.display());
            real_full_disk(&mnt).await;
            drop(mount);
        }
        Err(why) => {
            println!(
                "full_disk: mounting a tmpfs was refused ({why}); \
                 falling back to the fault-injecting write hook"
            );
            injected_full_disk(tmp.path()).await;
        }
    }
}

async fn real_full_disk(mnt: &Path) {
    let dir = mnt.join("spool");
    let filler = mnt.join("filler");
    // Take most of the space up front, so the spool meets the wall soon.
    fs::write(&filler, vec![7u8; 600 * 1024]).expect("filler");
    let spool = DiskSpool::builder(&dir)
        .segment_max_bytes(128 * 1024)
        .open()
        .await
        .expect("open");
    let (mut acked, err) = fill_until_refused(&spool, 0).await;
    assert_io(&err);
    assert!(!acked.is_empty(), "some records fit before the wall");
    // Still refused while full, and the spool stays usable for reads.
    assert_io(
        &spool
            .enqueue(vec![record(50_000)])
            .await
            .expect_err("still full"),
    );
    let stats = spool.stats().await.expect("stats");
    assert_eq!(
        stats.depth(),
        acked.len() as u64,
        "failed batches left nothing behind"
    );

    // Space frees: writing resumes.
    fs::remove_file(&filler).expect("rm filler");
    let next = acked.len() + 100;
    for i in next..next + 20 {
        spool.enqueue(vec![record(i)]).await.expect("writes resume");
        acked.push(i);
    }
    spool.close().await.expect("close");

    let spool = DiskSpool::builder(&dir).open().await.expect("reopen");
    assert_eq!(spool.stats().await.expect("stats").quarantined_total, 0);
    assert_all_present(&spool, &acked).await;
    spool.close().await.expect("close");
}

async fn injected_full_disk(base: &Path) {
    let dir = base.join("spool");
    let budget = Arc::new(AtomicU64::new(200 * 1024));
    let spool = DiskSpool::builder(&dir)
        .fail_writes_after(budget.clone())
        .open()
        .await
        .expect("open");
    let (mut acked, err) = fill_until_refused(&spool, 0).await;
    assert_io(&err);
    assert!(!acked.is_empty());
    budget.store(u64::MAX, Ordering::Release);
    let next = acked.len() + 100;
    for i in next..next + 20 {
        spool.enqueue(vec![record(i)]).await.expect("writes resume");
        acked.push(i);
    }
    spool.close().await.expect("close");
    let spool = DiskSpool::builder(&dir).open().await.expect("reopen");
    assert_eq!(spool.stats().await.expect("stats").quarantined_total, 0);
    assert_all_present(&spool, &acked).await;
    spool.close().await.expect("close");
}

/// The fallback path runs everywhere too, so it cannot rot unnoticed.
#[tokio::test]
async fn injected_write_failures_refuse_then_resume() {
    let tmp = tempfile::tempdir().expect("tempdir");
    injected_full_disk(tmp.path()).await;
}
