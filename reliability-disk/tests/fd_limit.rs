//! A real descriptor limit: this test binary re-executes itself under
//! `ulimit -n` (a shell sets the limit, then `exec`s the child test). The
//! child opens a spool whose records lie in several segments, takes every
//! descriptor left, and leases: opening a segment to read the payloads
//! fails with EMFILE. After the child exits, the parent (no such limit)
//! reopens the spool and finds every record.

// The child reports what it saw on stdout, for the parent's failure text.
#![allow(clippy::print_stdout)]

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use reliability_core::{NewRecord, RecordId, Spool};
use reliability_disk::DiskSpool;

mod common;

/// Set in the child's environment: the spool directory.
const CHILD_DIR: &str = "RELIABILITY_DISK_FD_LIMIT_DIR";
/// The descriptor limit of the child.
const LIMIT: u32 = 64;
const RECORDS: usize = 60;
const TTL: Duration = Duration::from_secs(60);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn record(i: usize) -> NewRecord {
    let id = RecordId::new(format!("r{i:04}")).expect("id");
    NewRecord::new(id, vec![(i % 251) as u8; 200])
}

/// The child's side: runs only when the parent set [`CHILD_DIR`].
#[test]
fn fd_limit_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    runtime().block_on(async {
        let spool = DiskSpool::builder(&dir).open().await.expect("child: open");
        // Take every descriptor the limit leaves.
        let mut held = Vec::new();
        let err = loop {
            match std::fs::File::open("/dev/null") {
                Ok(f) => held.push(f),
                Err(e) => break e,
            }
        };
        println!("child: holding {} descriptors, then: {err}", held.len());
        let leased = spool.lease(RECORDS, TTL).await;
        match &leased {
            Ok(v) => println!("child: lease under EMFILE answered Ok({})", v.len()),
            Err(e) => println!("child: lease under EMFILE answered Err({e})"),
        }
        drop(held);
        spool.close().await.expect("child: close");
    });
}

#[test]
fn lease_under_a_real_descriptor_limit_loses_nothing() {
    if std::env::var_os(CHILD_DIR).is_some() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("spool");
    let rt = runtime();
    rt.block_on(async {
        let spool = DiskSpool::builder(&dir)
            .segment_max_bytes(4096)
            .preallocate_bytes(0)
            .relocate_below_percent(0)
            .open()
            .await
            .expect("open");
        for i in 0..RECORDS {
            spool.enqueue(vec![record(i)]).await.expect("enqueue");
        }
        spool.close().await.expect("close");
    });
    let segments = std::fs::read_dir(dir.join("segments"))
        .expect("segments")
        .count();
    assert!(segments >= 3, "records in {segments} segments only");

    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n {LIMIT} && exec \"$0\" fd_limit_child --exact --nocapture --test-threads=1"
        ))
        .arg(&exe)
        .env(CHILD_DIR, &dir)
        .output()
        .expect("run the child");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{said}");
    assert!(out.status.success(), "the child failed:\n{said}");
    assert!(
        said.contains("Too many open files"),
        "the child never hit its descriptor limit:\n{said}"
    );

    let (ids, _) = rt
        .block_on(common::ids_after_reopen(&dir, TTL))
        .expect("reopen");
    let want: BTreeSet<String> = (0..RECORDS).map(|i| format!("r{i:04}")).collect();
    let lost: Vec<_> = want.difference(&ids).collect();
    assert!(
        lost.is_empty(),
        "{} of {RECORDS} records lost after a lease under EMFILE; the child said:\n{}",
        lost.len(),
        said.lines()
            .filter(|l| l.starts_with("child:"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
