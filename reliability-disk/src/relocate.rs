//! Relocation: rewriting the few records that keep an old segment on disk
//! at the head of the log, so that the segment can be deleted.
//!
//! A segment is deleted once it is the oldest and no record pins it (see
//! the crate docs, Compaction). One long-lived record (delayed for hours by
//! a retry schedule, dead-lettered and never redriven, leased by a stuck
//! consumer) would otherwise keep its whole segment, and with it every
//! segment after it, however little they hold.
//!
//! # When
//!
//! After a batch, the writer looks at the oldest sealed segment that still
//! holds records. It relocates them when either
//! - the segment is sparse: the enqueue frames of its records take less
//!   than [`DiskSpoolConfig::relocate_below_percent`] of the segment's
//!   bytes (default 25 %: moving them costs at most a third of what
//!   deleting the segment frees), or
//! - the log is bloated: the segments on disk hold more than twice the
//!   bytes of all records' enqueue frames plus two segments. Then even a
//!   dense oldest segment moves; since at least half of the log is garbage,
//!   cleaning it oldest first writes no more than it frees, over a lap of
//!   the log.
//!
//! Both tests read counters the writer keeps per segment ([`Pin`]): no
//! scan. Only the oldest segment is ever relocated: deletion is oldest
//! first, so moving the records of a younger one would free nothing yet.
//!
//! # How
//!
//! A plan lists the records whose enqueue frame is in the segment (one pass
//! over the index, under the state lock). Each step then moves at most
//! [`STEP_BYTES`] of them (one record at least), so the writer never stalls
//! the callers for long:
//! 1. Read the step's enqueue frames, payloads included, without the state
//!    lock (frames never change once written; the CRC is checked again).
//! 2. Under the state lock, for each record still at that exact place (one
//!    acked, purged or re-enqueued meanwhile is skipped), encode frames
//!    that restore its *current* state: an enqueue frame with the same id,
//!    seq, `enqueued_at`, due time, attempts and payload, then a lease frame
//!    (token, end, attempts) if it is leased, or a dead-letter frame (seq,
//!    time, attempts, reason) if it is dead.
//! 3. Still under the lock, take whatever callers queued before it off the
//!    channel and queue the step's request behind them: the log order is
//!    the order of state changes, so a change made after the step (an ack,
//!    a nack) lands after the relocated frames.
//! 4. When the request is written, under the state lock, each record still
//!    at its old place points at its new enqueue frame, pins the new
//!    segment and unpins the old one. A record changed meanwhile needs
//!    nothing: its change was logged after the relocated frames.
//!
//! Replay reads an enqueue frame for an id it already holds as a move: the
//! newest copy and the frames after it win (no duplicate), and an ack after
//! the copy still deletes the record (no resurrection).
//!
//! # Durability order
//!
//! The old segment goes the usual way: when it is the oldest and unpinned,
//! the writer syncs the active segment (holding the relocated frames;
//! older ones were synced when sealed), deletes the file, then syncs the
//! directory. A crash before the sync leaves the old copies, which a replay
//! reads as before; a crash after it finds the relocated copies. Between the
//! write and the deletion a reader may still hold the old place: the
//! spool's reads retry at the record's current place when the old one is
//! gone.
//!
//! A new plan starts only after the writer wrote a batch for callers, so
//! relocation never feeds itself: each plan is finite, and with no callers
//! it stops.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, PoisonError};

use bytes::Bytes;
use reliability_core::RecordId;

use crate::codec::{self, Entry};
use crate::index::{Index, Loc};
use crate::spool::ReadError;
use crate::writer::{Cmd, WriteReq, Writer, Written};

#[cfg(doc)]
use crate::{writer::Pin, DiskSpoolConfig};

/// Bytes of records a step moves at most (one record at least).
pub(crate) const STEP_BYTES: u64 = 1024 * 1024;

/// A record a relocation step rewrites.
pub(crate) struct Move {
    id: RecordId,
    /// Its enqueue frame before.
    from: Loc,
    /// Where its new enqueue frame starts in the request's bytes.
    rel: u64,
    /// The new enqueue frame's length.
    len: u32,
}

/// The writer's relocation state.
#[derive(Debug)]
pub(crate) struct Relocator {
    /// Percent of a segment's bytes under which it counts as sparse.
    below_percent: u64,
    /// Records of the segment being relocated still to move, in file order.
    plan: VecDeque<(RecordId, Loc)>,
    /// A step's request is queued or being written.
    in_flight: bool,
    /// The writer wrote a batch for callers since the last plan began.
    may_plan: bool,
    /// Enqueue frames that did not read back (left for `lease` or
    /// `list_dead` to quarantine).
    unreadable: Vec<Loc>,
    /// The oldest segment and its record count when a plan found nothing
    /// it could move: not planned again until the count changes.
    stuck: Option<(u32, u64)>,
    /// Records relocated since the spool opened.
    pub(crate) moved: Arc<AtomicU64>,
}

impl Relocator {
    pub(crate) fn new(below_percent: u8) -> Self {
        Self {
            below_percent: u64::from(below_percent),
            plan: VecDeque::new(),
            in_flight: false,
            may_plan: false,
            unreadable: Vec::new(),
            stuck: None,
            moved: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A batch for callers was written: a new plan may start.
    pub(crate) fn wrote_for_callers(&mut self) {
        self.may_plan = true;
    }

    /// A step's request was written (or failed): points each record still
    /// at its old place at its new enqueue frame and returns the
    /// `(from, to)` of those.
    pub(crate) fn settle(
        &mut self,
        index: &mut Index,
        moves: Vec<Move>,
        r: &io::Result<Written>,
    ) -> Vec<(Loc, Loc)> {
        self.in_flight = false;
        let Ok(w) = r else {
            return Vec::new();
        };
        let moved: Vec<(Loc, Loc)> = moves
            .into_iter()
            .filter_map(|m| {
                let to = Loc {
                    seg: w.seg,
                    off: w.off + m.rel,
                    len: m.len,
                };
                index.relocate(&m.id, m.from, to).then_some((m.from, to))
            })
            .collect();
        self.moved.fetch_add(moved.len() as u64, Ordering::Relaxed);
        moved
    }
}

/// Appends to `out` the frames that restore the current state of `id` if
/// its enqueue frame is still at `from`; returns the new enqueue frame's
/// length.
fn restore(
    index: &Index,
    id: &RecordId,
    from: Loc,
    payload: Bytes,
    out: &mut Vec<u8>,
) -> Option<u32> {
    let start = out.len();
    let (enqueue, state) = if let Some(l) = index.live.get(id).filter(|l| l.loc == from) {
        let enqueue = Entry::Enqueue {
            id: id.clone(),
            seq: l.seq,
            enqueued_at: l.enqueued_at,
            due_at: l.due_at,
            attempts: l.attempts,
            payload,
        };
        let lease = l
            .lease
            .as_deref()
            .map(|&(token, lease_until)| Entry::Lease {
                id: id.clone(),
                token,
                lease_until,
                attempts: l.attempts,
            });
        (enqueue, lease)
    } else {
        let d = index.dead_ids.get(id).filter(|d| d.loc == from)?;
        let enqueue = Entry::Enqueue {
            id: id.clone(),
            seq: d.seq,
            enqueued_at: d.enqueued_at,
            due_at: d.dead_at,
            attempts: d.attempts,
            payload,
        };
        let dead = Entry::DeadLetter {
            id: id.clone(),
            seq: d.seq,
            dead_at: d.dead_at,
            attempts: d.attempts,
            reason: d.reason.clone(),
        };
        (enqueue, Some(dead))
    };
    codec::encode(&enqueue, out);
    let len = u32::try_from(out.len() - start).ok()?;
    if let Some(e) = state {
        codec::encode(&e, out);
    }
    Some(len)
}

impl Writer {
    /// The oldest sealed segment if it holds records and is sparse, or the
    /// log is bloated (see the module docs), with its record count.
    fn relocation_target(&self) -> Option<(u32, u64)> {
        let (&seg, pin) = self.counts.first_key_value()?;
        if seg >= self.seg || pin.records == 0 {
            return None;
        }
        let sparse =
            pin.bytes.saturating_mul(100) < pin.size.saturating_mul(self.reloc.below_percent);
        let (disk, pinned) = self.counts.iter().fold((0u64, 0u64), |(d, p), (&n, pin)| {
            let size = if n == self.seg { self.len } else { pin.size };
            (d.saturating_add(size), p.saturating_add(pin.bytes))
        });
        let bloated = disk
            > pinned
                .saturating_mul(2)
                .saturating_add(self.segment_max.saturating_mul(2));
        (sparse || bloated).then_some((seg, pin.records))
    }

    /// Starts a plan for the segment to relocate, if any; says whether one
    /// is under way.
    fn plan(&mut self) -> bool {
        if !self.reloc.may_plan {
            return false;
        }
        let Some((seg, records)) = self.relocation_target() else {
            return false;
        };
        if self.reloc.stuck == Some((seg, records)) {
            return false;
        }
        self.reloc.may_plan = false;
        let mut plan = {
            let st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            st.index.in_segment(seg)
        };
        self.reloc
            .unreadable
            .retain(|loc| self.counts.contains_key(&loc.seg));
        plan.retain(|(_, loc)| !self.reloc.unreadable.contains(loc));
        if plan.is_empty() {
            self.reloc.stuck = Some((seg, records));
            return false;
        }
        plan.sort_by_key(|(_, loc)| loc.off);
        tracing::debug!(
            segment = seg,
            records = plan.len(),
            "disk spool: relocating the records of an old segment"
        );
        self.reloc.plan = plan.into();
        true
    }

    /// Takes one step of relocation, if one is due: its request goes to
    /// `carry` behind every command queued before it (see the module docs).
    pub(crate) fn relocate_step(&mut self, rx: &Receiver<Cmd>, carry: &mut VecDeque<Cmd>) {
        if self.reloc.in_flight || self.stopped.get().is_some() {
            return;
        }
        loop {
            if self.reloc.plan.is_empty() && !self.plan() {
                return;
            }
            let seg = self.reloc.plan.front().map(|(_, loc)| loc.seg);
            if seg
                .and_then(|s| self.counts.get(&s))
                .is_none_or(|pin| pin.records == 0)
            {
                // Everything left in it was acked or purged meanwhile (and
                // the segment may be deleted already).
                self.reloc.plan.clear();
                return;
            }
            let read = self.read_step();
            if self.queue_step(read, rx, carry) {
                return;
            }
        }
    }

    /// Reads the enqueue frames of the next step of the plan (no lock: a
    /// frame never changes once written, and the segment is deleted on
    /// this thread only).
    fn read_step(&mut self) -> Vec<(RecordId, Loc, Bytes)> {
        let mut read = Vec::new();
        let mut bytes = 0u64;
        while bytes < STEP_BYTES {
            let Some((id, loc)) = self.reloc.plan.pop_front() else {
                break;
            };
            bytes += u64::from(loc.len);
            match self.files.read_enqueue(&id, loc) {
                Ok(payload) => read.push((id, loc, payload)),
                Err(ReadError::Corrupt { why, .. }) => {
                    tracing::warn!(id = %id, segment = loc.seg, offset = loc.off, why, "disk spool: cannot relocate a record that does not read back");
                    self.reloc.unreadable.push(loc);
                }
                Err(ReadError::Io(e)) => {
                    // Not corruption: the plan stops here and a later one
                    // (after the next batch for callers) tries again.
                    tracing::warn!(error = %e, segment = loc.seg, "disk spool: cannot read records to relocate, retrying later");
                    self.reloc.plan.clear();
                    break;
                }
            }
        }
        read
    }

    /// Under the state lock, encodes the current state of the records read
    /// that are still where they were read and queues it behind what
    /// callers queued before; says whether it queued anything.
    fn queue_step(
        &mut self,
        read: Vec<(RecordId, Loc, Bytes)>,
        rx: &Receiver<Cmd>,
        carry: &mut VecDeque<Cmd>,
    ) -> bool {
        let state = self.state.clone();
        let st = state.lock().unwrap_or_else(PoisonError::into_inner);
        let size = read.iter().map(|(_, loc, _)| loc.len as usize + 128).sum();
        let mut out = Vec::with_capacity(size);
        let mut moves = Vec::with_capacity(read.len());
        for (id, from, payload) in read {
            let rel = out.len() as u64;
            if let Some(len) = restore(&st.index, &id, from, payload, &mut out) {
                moves.push(Move { id, from, rel, len });
            }
        }
        if moves.is_empty() {
            return false;
        }
        // Log order is state-change order: what callers queued before this
        // lock is written first, changes made after it come after.
        carry.extend(rx.try_iter());
        carry.push_back(Cmd::Write(WriteReq {
            bytes: out,
            sync: false,
            enqueued: 0,
            released: Vec::new(),
            moves,
            done: None,
            reply: None,
        }));
        self.reloc.in_flight = true;
        drop(st);
        true
    }
}
