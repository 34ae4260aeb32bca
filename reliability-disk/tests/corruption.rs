//! Corruption fixtures (issue 4, point 7): a bad checksum, a torn tail, a
//! zero-filled tail, garbage files and a missing segment. Each time: `open`
//! succeeds, the good records are intact, the bad parts are counted in
//! `stats().quarantined_total` and moved to `quarantine/`, and a second open
//! finds nothing more (no crash loop, no double count).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reliability_core::{ManualClock, NewRecord, RecordId, Spool};
use reliability_disk::{codec, inspect, repair, DiskSpool, FindingKind};

const TTL: Duration = Duration::from_secs(30);

fn rec(id: &str) -> NewRecord {
    NewRecord::new(
        RecordId::new(id).expect("id"),
        format!("payload of {id}").into_bytes(),
    )
}

async fn open(dir: &Path, segment_max: u64) -> DiskSpool {
    DiskSpool::builder(dir)
        .segment_max_bytes(segment_max)
        .clock(Arc::new(ManualClock::new()))
        .open()
        .await
        .expect("open succeeds whatever the damage")
}

/// A spool in `dir` holding `ids`, one enqueue call per id, closed.
async fn fill(dir: &Path, ids: &[&str], segment_max: u64) {
    let spool = open(dir, segment_max).await;
    for id in ids {
        spool.enqueue(vec![rec(id)]).await.expect("enqueue");
    }
    spool.close().await.expect("close");
}

/// Every record due, in lease order, payloads checked; each is given back
/// (due at once) so that the next open finds it due again.
async fn due_ids(spool: &DiskSpool) -> Vec<String> {
    let got = spool.lease(1000, TTL).await.expect("lease");
    for l in &got {
        assert_eq!(
            l.record.payload,
            format!("payload of {}", l.record.id).into_bytes(),
            "payload intact"
        );
        let _ = spool.nack(&l.token, Duration::ZERO).await.expect("nack");
    }
    got.iter().map(|l| l.record.id.to_string()).collect()
}

fn segment(dir: &Path, n: u32) -> PathBuf {
    dir.join("segments").join(format!("{n:08}.log"))
}

fn quarantine_items(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir.join("quarantine"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle present")
}

/// Opens and closes (which writes nothing): the quarantine count.
async fn open_close(dir: &Path) -> u64 {
    let spool = open(dir, 64 * 1024 * 1024).await;
    let q = spool.stats().await.expect("stats").quarantined_total;
    spool.close().await.expect("close");
    q
}

/// Opens, checks the survivors and the count, closes, opens again: clean.
async fn check(dir: &Path, want: &[&str], quarantined: u64) {
    let spool = open(dir, 64 * 1024 * 1024).await;
    let stats = spool.stats().await.expect("stats");
    assert_eq!(
        stats.quarantined_total, quarantined,
        "quarantined on first open"
    );
    let mut got = due_ids(&spool).await;
    got.sort();
    assert_eq!(got, want);
    spool.close().await.expect("close");

    let spool = open(dir, 64 * 1024 * 1024).await;
    let stats = spool.stats().await.expect("stats");
    assert_eq!(
        stats.quarantined_total, 0,
        "a second open finds nothing new"
    );
    assert_eq!(stats.depth(), want.len() as u64);
    assert!(
        inspect(dir).expect("inspect").corruption.is_empty(),
        "inspect agrees the directory is clean"
    );
    spool.close().await.expect("close");
}

#[tokio::test]
async fn bad_checksum_quarantines_one_frame_and_keeps_the_rest() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    fill(dir, &["a", "b", "c", "d", "e"], 64 * 1024 * 1024).await;
    let path = segment(dir, 1);
    let mut bytes = fs::read(&path).expect("read");
    let at = find(&bytes, b"payload of c");
    bytes[at + 3] ^= 0x40;
    fs::write(&path, &bytes).expect("write");

    let report = inspect(dir).expect("inspect");
    assert_eq!(report.corruption.len(), 1);
    assert_eq!(report.corruption[0].kind, FindingKind::BadFrame);
    assert_eq!(
        fs::read(&path).expect("read"),
        bytes,
        "inspect changes nothing"
    );

    assert_eq!(open_close(dir).await, 1);
    assert_eq!(
        fs::metadata(&path).expect("meta").len(),
        bytes.len() as u64,
        "padded in place, nothing good rewritten"
    );
    check(dir, &["a", "b", "d", "e"], 0).await;
    let items = quarantine_items(dir);
    assert_eq!(items.len(), 2, "the frame's bytes and a reason: {items:?}");
    let bin = items.iter().find(|n| n.ends_with(".bin")).expect(".bin");
    let saved = fs::read(dir.join("quarantine").join(bin)).expect("read");
    assert!(saved
        .windows(12)
        .any(|w| w == b"pXyload of c" || w == b"paylOad of c" || w.starts_with(b"pay")));
    let reason = fs::read_to_string(dir.join("quarantine").join(bin.replace(".bin", ".reason")))
        .expect("reason");
    assert!(reason.contains("kind: bad_frame"), "{reason}");
}

#[tokio::test]
async fn torn_tail_is_truncated_after_being_saved() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    fill(dir, &["a", "b", "c"], 64 * 1024 * 1024).await;
    let path = segment(dir, 1);
    let good_len = fs::metadata(&path).expect("meta").len();
    // Half of a frame: what a crash in the middle of a write leaves.
    let mut frame = Vec::new();
    codec::encode(&codec::Entry::Pad { len: 300 }, &mut frame);
    let mut f = OpenOptions::new().append(true).open(&path).expect("open");
    f.write_all(&frame[..frame.len() / 2]).expect("append");
    drop(f);

    assert_eq!(open_close(dir).await, 1);
    assert_eq!(
        fs::metadata(&path).expect("meta").len(),
        good_len,
        "truncated"
    );
    check(dir, &["a", "b", "c"], 0).await;
    let items = quarantine_items(dir);
    assert!(items.iter().any(|n| n.ends_with(".bin")), "{items:?}");
    let reason_name = items
        .iter()
        .find(|n| n.ends_with(".reason"))
        .expect("reason");
    let reason = fs::read_to_string(dir.join("quarantine").join(reason_name)).expect("read");
    assert!(reason.contains("kind: torn_tail"), "{reason}");
}

#[tokio::test]
async fn zero_filled_tail_is_truncated() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    fill(dir, &["a", "b"], 64 * 1024 * 1024).await;
    let path = segment(dir, 1);
    let good_len = fs::metadata(&path).expect("meta").len();
    let mut f = OpenOptions::new().append(true).open(&path).expect("open");
    f.write_all(&[0u8; 8192]).expect("append");
    drop(f);

    assert_eq!(open_close(dir).await, 1);
    assert_eq!(fs::metadata(&path).expect("meta").len(), good_len);
    check(dir, &["a", "b"], 0).await;
    let items = quarantine_items(dir);
    assert_eq!(items.len(), 1, "only a reason file for zeros: {items:?}");
    // Writing still works after the truncation.
    let spool = open(dir, 64 * 1024 * 1024).await;
    spool.enqueue(vec![rec("c")]).await.expect("enqueue");
    spool.close().await.expect("close");
    check(dir, &["a", "b", "c"], 0).await;
}

#[tokio::test]
async fn garbage_files_are_moved_out() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    fill(dir, &["a", "b"], 64 * 1024 * 1024).await;
    fs::write(dir.join("segments").join("notes.txt"), b"not a segment").expect("write");
    fs::write(segment(dir, 9), vec![0xAB; 4096]).expect("write");

    let report = inspect(dir).expect("inspect");
    assert_eq!(report.corruption.len(), 2, "{:?}", report.corruption);
    assert!(report
        .corruption
        .iter()
        .all(|f| f.kind == FindingKind::GarbageFile));

    check(dir, &["a", "b"], 2).await;
    let items = quarantine_items(dir);
    assert!(items.contains(&"notes.txt".to_string()), "{items:?}");
    assert!(items.contains(&"00000009.log".to_string()), "{items:?}");
    assert!(!segment(dir, 9).exists());
}

#[tokio::test]
async fn missing_segment_keeps_the_others() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    // Tiny segments: every enqueue batch after the first rolls to a new one.
    let ids = ["a", "b", "c", "d", "e", "f"];
    fill(dir, &ids, 64).await;
    let segs = fs::read_dir(dir.join("segments")).expect("ls").count();
    assert!(segs >= 4, "{segs} segments");
    // Which records live in segment 2?
    let seg2 = fs::read(segment(dir, 2)).expect("read");
    let lost: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| {
            seg2.windows(12)
                .any(|w| w == format!("payload of {id}").as_bytes())
        })
        .collect();
    assert!(!lost.is_empty());
    fs::remove_file(segment(dir, 2)).expect("rm");

    let report = inspect(dir).expect("inspect");
    assert_eq!(report.corruption.len(), 1);
    assert_eq!(report.corruption[0].kind, FindingKind::MissingSegment);

    let want: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| !lost.contains(id))
        .collect();
    check(dir, &want, 1).await;
    assert!(quarantine_items(dir)
        .iter()
        .any(|n| n.starts_with("missing-00000002")));
}

#[tokio::test]
async fn repair_quarantines_without_opening_and_inspect_reports_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    fill(dir, &["a", "b", "c"], 64 * 1024 * 1024).await;
    let path = segment(dir, 1);
    let mut bytes = fs::read(&path).expect("read");
    let at = find(&bytes, b"payload of b");
    bytes[at] ^= 0xFF;
    fs::write(&path, &bytes).expect("write");
    let mut f = OpenOptions::new().append(true).open(&path).expect("open");
    f.write_all(&[0u8; 100]).expect("append");
    drop(f);

    let r = repair(dir).expect("repair");
    let kinds: Vec<FindingKind> = r.quarantined.iter().map(|f| f.kind).collect();
    assert_eq!(kinds, [FindingKind::BadFrame, FindingKind::ZeroTail]);
    assert_eq!(r.records, 2);
    assert!(
        repair(dir).expect("repair").quarantined.is_empty(),
        "idempotent"
    );

    let report = inspect(dir).expect("inspect");
    assert!(report.corruption.is_empty());
    assert_eq!(report.quarantined.len(), 2);
    assert_eq!((report.waiting, report.dead), (2, 0));
    check(dir, &["a", "c"], 0).await;
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_is_refused_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let first = open(dir, 64 * 1024 * 1024).await;
    let err = DiskSpool::builder(dir)
        .open()
        .await
        .expect_err("the directory is locked");
    assert!(err.is_unavailable(), "{err}");
    assert!(
        err.to_string().contains(&dir.display().to_string()),
        "the error names the directory: {err}"
    );
    assert!(repair(dir).is_err(), "repair refuses an open spool too");
    first.close().await.expect("close");
    // Released by close: a new owner may open it.
    open(dir, 64 * 1024 * 1024)
        .await
        .close()
        .await
        .expect("close");
}

/// A frame that rots while the spool is open: `lease` cannot read it back,
/// moves its bytes to quarantine, counts it and drops the record (an ack
/// frame records that, so it does not come back); the other records are
/// delivered.
#[tokio::test]
async fn a_frame_rotting_while_open_is_quarantined_at_lease() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let spool = open(dir, 1 << 20).await;
    for id in ["a", "b", "c"] {
        spool.enqueue(vec![rec(id)]).await.expect("enqueue");
    }
    let path = segment(dir, 1);
    let mut bytes = fs::read(&path).expect("read segment");
    let at = find(&bytes, b"payload of b");
    bytes[at] ^= 0xff;
    let f = OpenOptions::new().write(true).open(&path).expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, &bytes[at..=at], at as u64).expect("rot");
    drop(f);
    assert_eq!(due_ids(&spool).await, ["a", "c"]);
    let stats = spool.stats().await.expect("stats");
    assert_eq!(stats.quarantined_total, 1);
    assert_eq!(stats.ready + stats.delayed + stats.leased, 2);
    spool.close().await.expect("close");
    assert!(
        quarantine_items(dir)
            .iter()
            .any(|n| n.starts_with("00000001.log@")),
        "{:?}",
        quarantine_items(dir)
    );
    let spool = open(dir, 1 << 20).await;
    assert_eq!(due_ids(&spool).await, ["a", "c"], "b does not come back");
    spool.close().await.expect("close");
}
