//! The in-memory index: per record its state and where its enqueue frame
//! is, never its payload. Built by replaying the log, then kept up to date
//! by the spool under its mutex.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use reliability_core::{DeadReason, LeaseToken, RecordId, Timestamp};

use crate::codec::Entry;

/// Where a record's enqueue frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    pub(crate) seg: u32,
    pub(crate) off: u64,
    pub(crate) len: u32,
}

/// A live (ready, delayed or leased) record.
#[derive(Debug, Clone)]
pub(crate) struct Live {
    pub(crate) loc: Loc,
    pub(crate) payload_len: u32,
    pub(crate) attempts: u32,
    pub(crate) enqueued_at: Timestamp,
    pub(crate) due_at: Timestamp,
    /// The lease holding it: token and end. Boxed: most records are not
    /// leased, and inline the token's 16-byte alignment made every entry
    /// of the index 112 bytes instead of 64.
    pub(crate) lease: Option<Box<(LeaseToken, Timestamp)>>,
    pub(crate) seq: u64,
    /// Indexed in `ready`, not `waiting`.
    pub(crate) ready: bool,
}

impl Live {
    /// Its key in the waiting index: the lease end while leased, else the
    /// due time.
    fn due_key(&self) -> Timestamp {
        self.lease
            .as_deref()
            .map_or(self.due_at, |&(_, until)| until)
    }
}

/// A dead record.
#[derive(Debug, Clone)]
pub(crate) struct Dead {
    pub(crate) loc: Loc,
    pub(crate) payload_len: u32,
    pub(crate) attempts: u32,
    pub(crate) enqueued_at: Timestamp,
    pub(crate) reason: DeadReason,
    pub(crate) dead_at: Timestamp,
    pub(crate) seq: u64,
}

/// Why an owner check failed.
pub(crate) enum NotOwner {
    /// No record with this id at all (acked, or purged from dead).
    Gone,
    /// The record is dead, or held by another lease or none.
    Lost,
}

#[derive(Debug, Default)]
pub(crate) struct Index {
    pub(crate) live: HashMap<RecordId, Live>,
    /// `(due key, seq, id)` of live records not yet found due.
    waiting: BTreeSet<(Timestamp, u64, RecordId)>,
    /// `(enqueued_at, seq, id)` of live records found due: oldest first.
    ready: BTreeSet<(Timestamp, u64, RecordId)>,
    /// How many of `waiting` are leased (the others are delayed).
    waiting_leased: u64,
    /// `(enqueued_at, seq)` of every live record: the oldest one's age
    /// without a walk over all records.
    ages: BTreeSet<(Timestamp, u64)>,
    /// Dead records by the order they died.
    pub(crate) dead: BTreeMap<u64, RecordId>,
    pub(crate) dead_ids: HashMap<RecordId, Dead>,
    /// Payload bytes held, dead records included.
    pub(crate) bytes: u64,
    pub(crate) next_seq: u64,
}

impl Index {
    pub(crate) fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    fn saw_seq(&mut self, seq: u64) {
        self.next_seq = self.next_seq.max(seq.saturating_add(1));
    }

    pub(crate) fn held(&self) -> u64 {
        (self.live.len() + self.dead_ids.len()) as u64
    }

    pub(crate) fn contains(&self, id: &RecordId) -> bool {
        self.live.contains_key(id) || self.dead_ids.contains_key(id)
    }

    /// Stores a live record as waiting until its due key.
    pub(crate) fn insert_live(&mut self, id: RecordId, mut live: Live) {
        live.ready = false;
        self.waiting.insert((live.due_key(), live.seq, id.clone()));
        self.waiting_leased += u64::from(live.lease.is_some());
        self.ages.insert((live.enqueued_at, live.seq));
        self.live.insert(id, live);
    }

    /// Removes a live record from the map and its index.
    pub(crate) fn take_live(&mut self, id: &RecordId) -> Option<Live> {
        let live = self.live.remove(id)?;
        if live.ready {
            self.ready.remove(&(live.enqueued_at, live.seq, id.clone()));
        } else {
            self.waiting.remove(&(live.due_key(), live.seq, id.clone()));
            self.waiting_leased -= u64::from(live.lease.is_some());
        }
        self.ages.remove(&(live.enqueued_at, live.seq));
        Some(live)
    }

    /// Moves every waiting record that is due at `now` to `ready`.
    pub(crate) fn promote(&mut self, now: Timestamp) {
        while self.waiting.first().is_some_and(|(due, _, _)| *due <= now) {
            let Some((_, seq, id)) = self.waiting.pop_first() else {
                break;
            };
            if let Some(live) = self.live.get_mut(&id) {
                live.ready = true;
                self.waiting_leased -= u64::from(live.lease.is_some());
                self.ready.insert((live.enqueued_at, seq, id));
            }
        }
    }

    /// Live records at `now` as (ready, delayed, leased), and the oldest
    /// one's `enqueued_at`, without a walk over the records: after
    /// [`promote`](Self::promote), what is not due yet is waiting, leased
    /// (lease not ended) or delayed; the rest is ready, including records
    /// whose lease ended.
    pub(crate) fn counts(&mut self, now: Timestamp) -> (u64, u64, u64, Option<Timestamp>) {
        self.promote(now);
        let waiting = self.waiting.len() as u64;
        (
            self.ready.len() as u64,
            waiting - self.waiting_leased,
            self.waiting_leased,
            self.ages.first().map(|&(t, _)| t),
        )
    }

    /// The oldest due record, taken out of the index.
    pub(crate) fn pop_ready(&mut self) -> Option<(RecordId, Live)> {
        while let Some((_, _, id)) = self.ready.pop_first() {
            if let Some(live) = self.live.remove(&id) {
                self.ages.remove(&(live.enqueued_at, live.seq));
                return Some((id, live));
            }
        }
        None
    }

    /// Checks that `token` still holds `id`, and takes the record out of
    /// the index (the caller puts it back or moves it).
    pub(crate) fn take_owned(
        &mut self,
        id: &RecordId,
        token: LeaseToken,
    ) -> Result<Live, NotOwner> {
        match self.live.get(id) {
            Some(l) if matches!(l.lease.as_deref(), Some((t, _)) if *t == token) => {}
            Some(_) => return Err(NotOwner::Lost),
            None if self.dead_ids.contains_key(id) => return Err(NotOwner::Lost),
            None => return Err(NotOwner::Gone),
        }
        self.take_live(id).ok_or(NotOwner::Gone)
    }

    pub(crate) fn bury(
        &mut self,
        id: RecordId,
        live: Live,
        reason: DeadReason,
        dead_at: Timestamp,
        seq: u64,
    ) {
        self.saw_seq(seq);
        self.dead.insert(seq, id.clone());
        self.dead_ids.insert(
            id,
            Dead {
                loc: live.loc,
                payload_len: live.payload_len,
                attempts: live.attempts,
                enqueued_at: live.enqueued_at,
                reason,
                dead_at,
                seq,
            },
        );
    }

    pub(crate) fn remove_dead(&mut self, id: &RecordId) -> Option<Dead> {
        let dead = self.dead_ids.remove(id)?;
        self.dead.remove(&dead.seq);
        Some(dead)
    }

    /// Replays one entry read from the log (`loc` is where it sits; it
    /// matters for enqueue frames only). Entries about unknown records (their
    /// enqueue frame was compacted away or quarantined) are ignored.
    pub(crate) fn apply(&mut self, entry: &Entry, loc: Loc, payload_len: u32) {
        match entry {
            Entry::Enqueue {
                id,
                seq,
                enqueued_at,
                due_at,
                attempts,
                ..
            } => {
                // A second enqueue frame for a known id replaces the first:
                // a relocation (crate docs, Relocation: the newest copy and
                // the state frames after it win, no duplicate) or a write
                // whose sync failed, then a retry.
                if let Some(old) = self.take_live(id) {
                    self.bytes -= u64::from(old.payload_len);
                }
                if let Some(old) = self.remove_dead(id) {
                    self.bytes -= u64::from(old.payload_len);
                }
                self.saw_seq(*seq);
                self.bytes += u64::from(payload_len);
                self.insert_live(
                    id.clone(),
                    Live {
                        loc,
                        payload_len,
                        attempts: *attempts,
                        enqueued_at: *enqueued_at,
                        due_at: *due_at,
                        lease: None,
                        seq: *seq,
                        ready: false,
                    },
                );
            }
            Entry::Lease {
                id,
                token,
                lease_until,
                attempts,
            } => {
                if let Some(mut l) = self.take_live(id) {
                    l.lease = Some(Box::new((*token, *lease_until)));
                    l.attempts = *attempts;
                    self.insert_live(id.clone(), l);
                }
            }
            Entry::Ack { id } => {
                if let Some(l) = self.take_live(id) {
                    self.bytes -= u64::from(l.payload_len);
                }
            }
            Entry::Nack { id, due_at } => {
                if let Some(mut l) = self.take_live(id) {
                    l.lease = None;
                    l.due_at = *due_at;
                    self.insert_live(id.clone(), l);
                }
            }
            Entry::Extend {
                id,
                token,
                lease_until,
            } => {
                if let Some(mut l) = self.take_live(id) {
                    if matches!(l.lease.as_deref(), Some((t, _)) if t == token) {
                        l.lease = Some(Box::new((*token, *lease_until)));
                    }
                    self.insert_live(id.clone(), l);
                }
            }
            Entry::DeadLetter {
                id,
                seq,
                dead_at,
                attempts,
                reason,
            } => {
                if let Some(mut l) = self.take_live(id) {
                    l.attempts = *attempts;
                    self.bury(id.clone(), l, reason.clone(), *dead_at, *seq);
                }
            }
            Entry::Redrive { id, seq, due_at } => {
                if let Some(d) = self.remove_dead(id) {
                    self.saw_seq(*seq);
                    self.insert_live(
                        id.clone(),
                        Live {
                            loc: d.loc,
                            payload_len: d.payload_len,
                            attempts: 0,
                            enqueued_at: d.enqueued_at,
                            due_at: *due_at,
                            lease: None,
                            seq: *seq,
                            ready: false,
                        },
                    );
                }
            }
            Entry::Purge { id } => {
                if let Some(d) = self.remove_dead(id) {
                    self.bytes -= u64::from(d.payload_len);
                }
            }
            Entry::Pad { .. } => {}
        }
    }

    /// Per segment of their enqueue frame: the records (live and dead) it
    /// holds and the bytes of their enqueue frames.
    pub(crate) fn pins_per_segment(&self) -> BTreeMap<u32, (u64, u64)> {
        let mut m: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        let locs = self.live.values().map(|l| l.loc);
        for loc in locs.chain(self.dead_ids.values().map(|d| d.loc)) {
            let e = m.entry(loc.seg).or_default();
            e.0 += 1;
            e.1 += u64::from(loc.len);
        }
        m
    }

    /// Where the enqueue frame of `id` (live or dead) is.
    pub(crate) fn loc_of(&self, id: &RecordId) -> Option<Loc> {
        self.live
            .get(id)
            .map(|l| l.loc)
            .or_else(|| self.dead_ids.get(id).map(|d| d.loc))
    }

    /// Records (live and dead) whose enqueue frame is in `seg`.
    pub(crate) fn in_segment(&self, seg: u32) -> Vec<(RecordId, Loc)> {
        let live = self.live.iter().map(|(id, l)| (id, l.loc));
        live.chain(self.dead_ids.iter().map(|(id, d)| (id, d.loc)))
            .filter(|(_, loc)| loc.seg == seg)
            .map(|(id, loc)| (id.clone(), loc))
            .collect()
    }

    /// Points `id` at its relocated enqueue frame `to` if it is still at
    /// `from` (not acked, purged or re-enqueued since); says whether it was.
    pub(crate) fn relocate(&mut self, id: &RecordId, from: Loc, to: Loc) -> bool {
        let loc = match (self.live.get_mut(id), self.dead_ids.get_mut(id)) {
            (Some(l), _) => &mut l.loc,
            (None, Some(d)) => &mut d.loc,
            (None, None) => return false,
        };
        if *loc != from {
            return false;
        }
        *loc = to;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::Live;

    /// The index holds one `Live` per record of the backlog: keep it small
    /// (a boxed lease instead of an inline 16-byte-aligned token).
    #[test]
    fn a_live_record_stays_small() {
        assert!(
            std::mem::size_of::<Live>() <= 64,
            "{} bytes",
            std::mem::size_of::<Live>()
        );
    }
}
