//! Preallocation of the active segment: padding frames laid out ahead of
//! the data, a segment that is a valid sequence of frames at every moment,
//! reopen resuming after the data, sealed segments cut to their data, and
//! a crash in the middle of a batch written over the padding.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reliability_core::{ManualClock, NewRecord, RecordId, Spool};
use reliability_disk::codec::{self, Entry};
use reliability_disk::{inspect, DiskSpool};

const SEG_HEADER: usize = 16;
const GRID: u64 = 512;

fn rec(id: &str) -> NewRecord {
    NewRecord::new(
        RecordId::new(id).expect("id"),
        format!("payload of {id}").into_bytes(),
    )
}

async fn open(dir: &Path, segment_max: u64, prealloc: u64) -> DiskSpool {
    DiskSpool::builder(dir)
        .segment_max_bytes(segment_max)
        .preallocate_bytes(prealloc)
        .clock(Arc::new(ManualClock::new()))
        .open()
        .await
        .expect("open")
}

fn segment(dir: &Path, n: u32) -> PathBuf {
    dir.join("segments").join(format!("{n:08}.log"))
}

/// Every frame of a segment file, with its offset; panics if the file is not
/// a valid sequence of frames to its end.
fn frames(path: &Path) -> Vec<(u64, Entry, usize)> {
    let bytes = fs::read(path).expect("read segment");
    let mut off = SEG_HEADER;
    let mut out = Vec::new();
    while off < bytes.len() {
        match codec::decode(&bytes[off..]) {
            Ok(Some((e, used))) => {
                out.push((off as u64, e, used));
                off += used;
            }
            other => panic!("{}: no frame at {off}: {other:?}", path.display()),
        }
    }
    out
}

/// Where the data ends: after the last frame that is not padding.
fn data_end(frames: &[(u64, Entry, usize)]) -> u64 {
    frames
        .iter()
        .filter(|(_, e, _)| !matches!(e, Entry::Pad { .. }))
        .map(|(off, _, used)| off + *used as u64)
        .max()
        .unwrap_or(SEG_HEADER as u64)
}

/// Leases every record and checks ids and payloads.
async fn assert_holds(spool: &DiskSpool, want: &[&str]) {
    let got = spool
        .lease(1000, Duration::from_secs(60))
        .await
        .expect("lease");
    let mut ids: Vec<String> = got
        .iter()
        .map(|l| {
            assert_eq!(
                l.record.payload,
                format!("payload of {}", l.record.id).into_bytes()
            );
            l.record.id.to_string()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, want);
    for l in &got {
        let _ = spool.nack(&l.token, Duration::ZERO).await.expect("nack");
    }
}

#[tokio::test]
async fn the_active_segment_is_padding_after_its_data_and_reopens_there() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let spool = open(dir, 64 * 1024 * 1024, 64 * 1024).await;
    for id in ["a", "b", "c"] {
        spool.enqueue(vec![rec(id)]).await.expect("enqueue");
    }
    let path = segment(dir, 1);
    let len = fs::metadata(&path).expect("meta").len();
    let fr = frames(&path);
    let end = data_end(&fr);
    assert!(
        len >= end + 64 * 1024,
        "preallocated: {len} bytes, data to {end}"
    );
    assert_eq!(len % GRID, 0, "padding ends on the grid");
    for (off, e, used) in fr.iter().filter(|(off, _, _)| *off >= end) {
        assert!(
            matches!(e, Entry::Pad { .. }),
            "only padding after the data"
        );
        assert!(
            *off == end || (off % GRID == 0 && *used as u64 == GRID),
            "padding at {off} ({used} bytes) is on the grid"
        );
    }
    spool.close().await.expect("close");

    let report = inspect(dir).expect("inspect");
    assert!(report.corruption.is_empty(), "{:?}", report.corruption);
    assert_eq!(report.segments[0].entries, 3, "padding is not counted");

    // Reopen: writes resume after the data, over the padding; the file
    // stays a valid sequence of frames, the preallocation is kept.
    let spool = open(dir, 64 * 1024 * 1024, 64 * 1024).await;
    assert_eq!(spool.stats().await.expect("stats").quarantined_total, 0);
    spool.enqueue(vec![rec("d")]).await.expect("enqueue");
    assert_eq!(fs::metadata(&path).expect("meta").len(), len);
    let fr = frames(&path);
    let enqueues: Vec<u64> = fr
        .iter()
        .filter(|(_, e, _)| matches!(e, Entry::Enqueue { .. }))
        .map(|(off, _, _)| *off)
        .collect();
    assert_eq!(enqueues.len(), 4);
    assert_eq!(enqueues[3], end, "d is written where the data ended");
    assert_holds(&spool, &["a", "b", "c", "d"]).await;
    spool.close().await.expect("close");

    let spool = open(dir, 64 * 1024 * 1024, 64 * 1024).await;
    assert_eq!(spool.stats().await.expect("stats").quarantined_total, 0);
    assert_holds(&spool, &["a", "b", "c", "d"]).await;
    spool.close().await.expect("close");
}

#[tokio::test]
async fn sealed_segments_are_cut_to_their_data() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let spool = open(dir, 2048, 64 * 1024).await;
    let ids: Vec<String> = (0..120).map(|i| format!("r{i:03}")).collect();
    for id in &ids {
        spool.enqueue(vec![rec(id)]).await.expect("enqueue");
    }
    let report = inspect(dir).expect("inspect");
    assert!(report.segments.len() > 2, "{:?}", report.segments);
    let (sealed, active) = report.segments.split_at(report.segments.len() - 1);
    for s in sealed {
        let fr = frames(&segment(dir, s.number));
        let last = fr.last().expect("a frame");
        assert!(
            !matches!(last.1, Entry::Pad { .. }),
            "sealed segment {} ends in padding",
            s.number
        );
    }
    let len = fs::metadata(segment(dir, active[0].number))
        .expect("meta")
        .len();
    assert!(
        len <= 2048u64.next_multiple_of(GRID),
        "preallocation stops at the segment size: {len}"
    );
    let want: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_holds(&spool, &want).await;
    spool.close().await.expect("close");
}

#[tokio::test]
async fn without_preallocation_the_segment_ends_with_its_data() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let spool = open(dir, 64 * 1024 * 1024, 0).await;
    for id in ["a", "b"] {
        spool.enqueue(vec![rec(id)]).await.expect("enqueue");
    }
    spool.close().await.expect("close");
    let path = segment(dir, 1);
    let fr = frames(&path);
    assert!(fr.iter().all(|(_, e, _)| !matches!(e, Entry::Pad { .. })));
    assert_eq!(fs::metadata(&path).expect("meta").len(), data_end(&fr));
}

/// A crash while a batch was being written over the padding: half of its
/// frame reached the disk. The records before it stay, the torn bytes are
/// quarantined once, and writes resume.
#[tokio::test]
async fn a_batch_torn_over_the_padding_is_quarantined_and_the_rest_kept() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let spool = open(dir, 64 * 1024 * 1024, 64 * 1024).await;
    for id in ["a", "b"] {
        spool.enqueue(vec![rec(id)]).await.expect("enqueue");
    }
    spool.close().await.expect("close");
    let path = segment(dir, 1);
    let end = data_end(&frames(&path));
    let mut frame = Vec::new();
    codec::encode(
        &Entry::Enqueue {
            id: RecordId::new("torn").expect("id"),
            seq: 99,
            enqueued_at: reliability_core::Timestamp::ZERO,
            due_at: reliability_core::Timestamp::ZERO,
            attempts: 0,
            payload: bytes::Bytes::from(vec![7u8; 700]),
        },
        &mut frame,
    );
    let f = OpenOptions::new().write(true).open(&path).expect("open");
    f.write_all_at(&frame[..frame.len() / 2], end)
        .expect("torn write");
    drop(f);

    let spool = open(dir, 64 * 1024 * 1024, 64 * 1024).await;
    assert_eq!(spool.stats().await.expect("stats").quarantined_total, 1);
    assert_holds(&spool, &["a", "b"]).await;
    spool.enqueue(vec![rec("c")]).await.expect("enqueue");
    spool.close().await.expect("close");
    frames(&path);

    let spool = open(dir, 64 * 1024 * 1024, 64 * 1024).await;
    assert_eq!(
        spool.stats().await.expect("stats").quarantined_total,
        0,
        "a second open finds nothing new"
    );
    assert_holds(&spool, &["a", "b", "c"]).await;
    spool.close().await.expect("close");
    assert!(inspect(dir).expect("inspect").corruption.is_empty());
}
