//! Helpers shared by the fault tests.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reliability_core::{system_clock, ManualClock, Spool, SpoolStats};
use reliability_disk::DiskSpool;

/// Every record a spool directory holds (leased, ready, delayed or dead),
/// read by reopening it on the real file system with a clock `ttl` * 2
/// ahead (past every lease of at most `ttl`) and leasing everything; with
/// the stats read then.
pub(crate) async fn ids_after_reopen(
    dir: &Path,
    ttl: Duration,
) -> reliability_core::Result<(BTreeSet<String>, SpoolStats)> {
    let later = system_clock().now().saturating_add(ttl * 2);
    let spool = DiskSpool::builder(dir)
        .clock(Arc::new(ManualClock::starting_at(later)))
        .open()
        .await?;
    let mut ids = BTreeSet::new();
    for d in spool.list_dead(usize::MAX).await? {
        ids.insert(d.record.id.as_str().to_string());
    }
    for l in spool.lease(usize::MAX, ttl).await? {
        ids.insert(l.record.id.as_str().to_string());
    }
    let stats = spool.stats().await?;
    spool.close().await?;
    Ok((ids, stats))
}
