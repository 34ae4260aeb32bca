//! The spool conformance suite on `DiskSpool`, including the cases that
//! close and reopen the spool on the same directory.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use reliability_core::testkit::SpoolFactory;
use reliability_core::{spool_suite, ManualClock, SpoolLimits};
use reliability_disk::DiskSpool;
use tempfile::TempDir;

/// Opens each spool in a fresh temporary directory (removed when the test's
/// factory drops); `reopen` closes the spool and opens the same directory.
#[derive(Default)]
struct DiskSpools {
    dirs: Mutex<Vec<TempDir>>,
}

#[async_trait]
impl SpoolFactory for DiskSpools {
    type Spool = DiskSpool;

    async fn create(&self, clock: ManualClock, limits: SpoolLimits) -> DiskSpool {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = DiskSpool::builder(dir.path())
            .limits(limits)
            .clock(Arc::new(clock))
            .open()
            .await
            .expect("open");
        self.dirs.lock().expect("dirs").push(dir);
        spool
    }

    async fn reopen(&self, spool: DiskSpool, clock: ManualClock, limits: SpoolLimits) -> DiskSpool {
        let dir = spool.dir().to_path_buf();
        spool.close().await.expect("close");
        DiskSpool::builder(dir)
            .limits(limits)
            .clock(Arc::new(clock))
            .open()
            .await
            .expect("reopen")
    }
}

spool_suite!(DiskSpools::default());
