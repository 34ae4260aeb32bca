//! Records that may be on both sides of a spool [`Fallback`](super::Fallback):
//! a primary `enqueue` that timed out may still have stored its batch, which
//! the secondary then took too. Each such record is delivered from one side
//! only: the first side to hand a copy out keeps it (a copy handed out stays
//! on its side until acked, so a failed delivery is retried from there), and
//! the other side's copy is acked without delivery when it shows up (in a
//! lease or a drain).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::spool::RecordId;

/// Records tracked at most: past it, new ones are counted but not tracked
/// (their copies may both be delivered).
const MAX_TRACKED: usize = 1 << 20;

/// The side a copy is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Side {
    Primary,
    Secondary,
}

/// What a lease or a drain does with a copy it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Deliver (or move) it.
    Keep,
    /// The other copy was handed out first: ack this one, deliver nothing.
    Drop,
    /// Not yet (a drain): this copy was handed out first, and the other,
    /// still on the primary, must go before this one may move there (the
    /// primary would take it for a duplicate of the copy about to go).
    Hold,
}

/// Counts of records a timed-out primary enqueue may have left on both
/// sides (see [`Fallback::double_enqueues`](super::Fallback::double_enqueues)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct DoubleEnqueues {
    /// Records whose primary enqueue timed out and that the secondary took.
    pub uncertain: u64,
    /// Copies acked without delivery because the other copy was handed out.
    pub avoided: u64,
    /// Records too many to track: both copies may be delivered.
    pub untracked: u64,
}

/// What is known of a record on both sides.
#[derive(Debug, Clone, Copy, Default)]
struct Pair {
    first: Option<Side>,
    dropping: bool,
}

#[derive(Debug, Default)]
pub(super) struct Copies {
    /// Records on both sides: the side that handed a copy out first, and
    /// whether the other copy's ack (without delivery) is in flight.
    tracked: Mutex<HashMap<RecordId, Pair>>,
    uncertain: AtomicU64,
    avoided: AtomicU64,
    untracked: AtomicU64,
}

impl Copies {
    fn lock(&self) -> MutexGuard<'_, HashMap<RecordId, Pair>> {
        self.tracked.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn counts(&self) -> DoubleEnqueues {
        DoubleEnqueues {
            uncertain: self.uncertain.load(Ordering::Relaxed),
            avoided: self.avoided.load(Ordering::Relaxed),
            untracked: self.untracked.load(Ordering::Relaxed),
        }
    }

    /// These records may now be on both sides.
    pub(super) fn both<'a>(&self, ids: impl Iterator<Item = &'a RecordId>) {
        let mut t = self.lock();
        for id in ids {
            self.uncertain.fetch_add(1, Ordering::Relaxed);
            if t.len() >= MAX_TRACKED {
                self.untracked.fetch_add(1, Ordering::Relaxed);
            } else {
                t.insert(id.clone(), Pair::default());
            }
        }
    }

    /// Whether the copy of `id` on `side`, just leased, is to be handed
    /// out: yes unless the other side handed its copy out first.
    pub(super) fn verdict(&self, id: &RecordId, side: Side) -> Verdict {
        let mut t = self.lock();
        if t.is_empty() {
            return Verdict::Keep;
        }
        let Some(pair) = t.get_mut(id) else {
            return Verdict::Keep;
        };
        match pair.first {
            None => {
                pair.first = Some(side);
                Verdict::Keep
            }
            Some(s) if s == side => Verdict::Keep,
            Some(_) => {
                pair.dropping = true;
                Verdict::Drop
            }
        }
    }

    /// The ack of a dropped copy of `id` returned: one copy is left, the
    /// pair is settled; or it failed, and the copy will show up again.
    pub(super) fn dropped(&self, id: &RecordId, acked: bool) {
        let mut t = self.lock();
        if acked {
            if t.remove(id).is_some() {
                self.avoided.fetch_add(1, Ordering::Relaxed);
            }
        } else if let Some(pair) = t.get_mut(id) {
            pair.dropping = false;
        }
    }

    /// What a drain does with the secondary's copy of `id`: move it unless
    /// the primary's copy was handed out first (drop this one) or this one
    /// was (hold it until the primary's copy is gone). A move does not count
    /// as handing out: the primary skips it as a duplicate if it still holds
    /// its own copy.
    pub(super) fn drain_verdict(&self, id: &RecordId) -> Verdict {
        let mut t = self.lock();
        if t.is_empty() {
            return Verdict::Keep;
        }
        match t.get_mut(id) {
            Some(pair) if pair.first == Some(Side::Primary) => {
                pair.dropping = true;
                Verdict::Drop
            }
            Some(pair) if pair.first == Some(Side::Secondary) => Verdict::Hold,
            _ => Verdict::Keep,
        }
    }

    /// The secondary's copy of `id` moved to the primary, which holds one
    /// copy now (a duplicate id is skipped there).
    pub(super) fn merged(&self, id: &RecordId) {
        let mut t = self.lock();
        if !t.is_empty() {
            t.remove(id);
        }
    }
}
