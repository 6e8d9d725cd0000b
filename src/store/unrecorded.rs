//! Exports the endpoint may have acknowledged without the store knowing.
//!
//! A delivery is recorded (the export removed, durably) after the endpoint's 2xx. A run of the
//! delivery loop that ends before recording every outcome (`kill -9`, a crash, or a stop that
//! gave up on requests) may leave pending exports that the endpoint acknowledged. Sending one
//! again is harmless (at least once; `Idempotency-Key`), but a dead letter of its profile put
//! back before it would reach the endpoint after it: an older export after a newer one was
//! acknowledged (SPEC "Order").
//!
//! So `meta/delivering` is written, durably, before the loop sends anything, and removed once
//! it stopped with every outcome recorded. An open that finds it knows the last run ended
//! otherwise: every export pending then, all below `next_seq` at that open, may have been
//! acknowledged; so does an open of a store no delivery loop of this version ran on yet, and
//! a reopen after an I/O error (`Store::recover`), which forgets what was not flushed.
//! `meta/unrecorded_below` keeps that bound for later runs (it only grows), and
//! `outbox retry` refuses a dead letter while a newer export of its profile below it is
//! pending. Once that export is delivered, the dead letter is superseded
//! ([`super::superseded`]). A dead letter put back under the bound counts too, which errs
//! towards refusing.
//!
//! A request that got no answer once its connection was ready (a timeout, a connection lost)
//! may have been acknowledged too: the endpoint may have taken it and answered too late, or
//! the answer was lost. Its exports count the same way: marked in `retry_at` by the
//! transaction that records the failed attempt, and held in memory (`Store::unanswered`) from
//! the moment the delivery loop hears of it until then.
//!
//! Such an export (marked, or pending under the bound) that becomes a dead letter keeps the
//! mark (an entry with run time 0), so its profile's older dead letters still wait for it: put
//! back and delivered, it supersedes them; dropped, it does so at once.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::keys::{self, meta};
use super::outbox::{self, RetryEntry};
use super::tally::{read_tally, write_tally};
use super::{codec, Place, Store, StoreError, Trees};
use sled::Transactional;

/// The bound below which pending exports may have been acknowledged unrecorded, as an open
/// finds it: the recorded one, raised to `next_seq` if the last delivery loop did not stop
/// with every outcome recorded, or if no delivery loop of this version ran on the store yet
/// (one of an earlier version may have ended any way; a new store has `next_seq` 0).
pub(super) fn unrecorded_below_at_open(t: &Trees, next_seq: u64) -> Result<u64, StoreError> {
    let Some(recorded) = t.meta.get(meta::UNRECORDED_BELOW)? else {
        return Ok(next_seq);
    };
    let Some(recorded) = keys::seq_from_key(&recorded) else {
        tracing::warn!(
            "meta/unrecorded_below is unreadable; every export pending now counts as one the endpoint may have acknowledged"
        );
        return Ok(next_seq);
    };
    Ok(if t.meta.contains_key(meta::DELIVERING)? {
        recorded.max(next_seq)
    } else {
        recorded
    })
}

/// The newest export that the endpoint may have acknowledged, pending or a dead letter, of each
/// profile of some dead letters.
#[derive(Debug, Default)]
pub struct MaybeAcknowledged {
    newest: HashMap<String, u64>,
}

impl MaybeAcknowledged {
    /// An export of `profile` newer than `seq`, pending or a dead letter, that the endpoint may
    /// have acknowledged.
    pub fn newer_than(&self, profile: &str, seq: u64) -> Option<u64> {
        self.newest.get(profile).copied().filter(|&n| n > seq)
    }
}

impl Store {
    /// Before the delivery loop sends anything: records that it runs, and the bound found at
    /// open, durably.
    pub fn delivery_starting(&self) -> Result<(), StoreError> {
        // Within a write section, so that no reopen comes between the writes and their flush:
        // one would drop them unflushed, and the loop would send believing them durable.
        let _section = self.write_section()?;
        self.with(|t| {
            t.meta.insert(
                meta::UNRECORDED_BELOW,
                &keys::seq_key(self.unrecorded_below()),
            )?;
            t.meta.insert(meta::DELIVERING, &[])?;
            Ok(())
        })?;
        self.flush()
    }

    pub(super) fn unrecorded_below(&self) -> u64 {
        self.unrecorded_below.load(Ordering::SeqCst)
    }

    /// After a reopen of the store that forgot what was not flushed (`Store::recover`, after
    /// an I/O error): a failed attempt's mark in `retry_at` may have been among it, so, as
    /// after a crash, every export pending then may have been acknowledged if a delivery loop
    /// ran. The raised bound is recorded durably, so that a clean stop does not lower it.
    pub(super) fn raise_unrecorded_below_after_reopen(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.lock_flushing();
        self.with(|t| {
            let next_seq = self.written_next.load(Ordering::SeqCst);
            let found = unrecorded_below_at_open(t, next_seq)?;
            let bound = self
                .unrecorded_below
                .fetch_max(found, Ordering::SeqCst)
                .max(found);
            t.meta
                .insert(meta::UNRECORDED_BELOW, &keys::seq_key(bound))?;
            t.flush_to_drive()
        })
    }

    /// Once the delivery loop stopped with every outcome recorded; made durable by the next
    /// flush (until then a restart errs towards refusing).
    pub fn delivery_stopped_recorded(&self) -> Result<(), StoreError> {
        self.with(|t| {
            t.meta.remove(meta::DELIVERING)?;
            Ok(())
        })
    }

    /// The delivery loop heard no answer to a request of pending export `seq`: from now on it
    /// may have been acknowledged (until it is delivered or dropped, also as a dead letter).
    pub fn attempt_unanswered(&self, seq: u64) {
        self.unanswered_now().insert(seq);
    }

    /// Once the changes of these exports are recorded (`retry_at` marks the unanswered).
    pub(super) fn forget_unanswered(&self, seqs: impl Iterator<Item = u64>) {
        let mut unanswered = self.unanswered_now();
        if !unanswered.is_empty() {
            for seq in seqs {
                unanswered.remove(&seq);
            }
        }
    }

    fn unanswered_now(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.unanswered.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether pending export `seq` may have been acknowledged without the store knowing.
    fn may_be_acknowledged(&self, t: &Trees, seq: u64) -> Result<bool, StoreError> {
        if seq < self.unrecorded_below() || self.unanswered_now().contains(&seq) {
            return Ok(true);
        }
        Ok(outbox::is_marked(t, seq)?)
    }

    /// Drops pending export `seq`; `false` if it is not pending. See [`Store::drop_export`].
    pub fn drop_pending(&self, seq: u64) -> Result<bool, StoreError> {
        self.drop_export(seq, Place::Pending)
    }

    /// Drops dead letter `seq`; `false` if it is not one. See [`Store::drop_export`].
    pub fn drop_dead(&self, seq: u64) -> Result<bool, StoreError> {
        self.drop_export(seq, Place::Dead)
    }

    /// Drops export `seq` from `from`; `false` if it is not there. One the endpoint may have
    /// acknowledged unrecorded (pending under the bound or unanswered, or a dead letter marked
    /// when it died) supersedes its profile's older dead letters in the same transaction, as
    /// a delivery does, since sending one of them could undo it at the endpoint. An older dead
    /// letter already superseded keeps naming the export that was acknowledged. The dropped
    /// export's own retry entry and `superseded` mark go with it.
    fn drop_export(&self, seq: u64, from: Place) -> Result<bool, StoreError> {
        let key = keys::seq_key(seq);
        // Read first, to find the older dead letters outside the transaction (which takes no
        // index lock); the transaction finds out whether it is still there.
        let superseding = self.with(|t| {
            let (value, may_be_acknowledged) = match from {
                Place::Pending => (t.outbox.get(key)?, self.may_be_acknowledged(t, seq)?),
                Place::Dead => (t.dead.get(key)?, outbox::is_marked(t, seq)?),
                Place::Gone => return Ok(None),
            };
            Ok(value
                .filter(|_| may_be_acknowledged)
                .and_then(|v| codec::export_profile_id(&v).ok().map(Arc::<str>::from)))
        })?;
        let Some(profile) = superseding else {
            return self.remove_export(seq, from);
        };
        let (older, dropped, found) = self.with(|t| {
            let mut older = self
                .dead_letters
                .older_than(t, std::iter::once((&profile, seq)))?;
            for candidate in &mut older {
                candidate.acknowledged = false;
            }
            let (dropped, found) = (&t.outbox, &t.dead, &t.meta, &t.retry_at, &t.superseded)
                .transaction(|(outbox, dead, meta_tx, retry_at, superseded)| {
                    let source = if from == Place::Pending { outbox } else { dead };
                    let Some(old) = source.remove(&key)? else {
                        return Ok((false, Vec::new()));
                    };
                    retry_at.remove(&key)?;
                    if from == Place::Dead {
                        superseded.remove(&key)?;
                    }
                    let mut tally = read_tally(meta_tx)?;
                    tally.count(from, old.len(), -1);
                    let views = super::superseded::Views {
                        outbox,
                        dead,
                        retry_at,
                        superseded,
                    };
                    let found = self.mark_superseded(&views, &mut tally, &older)?;
                    write_tally(meta_tx, tally)?;
                    Ok((true, found))
                })?;
            Ok((older, dropped, found))
        })?;
        if dropped {
            self.forget_unanswered(std::iter::once(seq));
            self.forget_superseded(older, &found);
        }
        Ok(dropped)
    }

    /// For a put-back of `dead` (sequences of dead letters): the exports of their profiles,
    /// pending or dead letters, that the endpoint may have acknowledged (see the module docs).
    /// Reads the profile ids of the pending exports between the oldest of them and the bound,
    /// and of the marked ones after the oldest.
    pub fn maybe_acknowledged(&self, dead: &[u64]) -> Result<MaybeAcknowledged, StoreError> {
        let mut found = MaybeAcknowledged::default();
        let Some(oldest) = dead.iter().copied().min() else {
            return Ok(found);
        };
        let from = oldest.saturating_add(1);
        let unrecorded_below = self.unrecorded_below();
        let over_bound = from.max(unrecorded_below);
        let unanswered_now: Vec<u64> = self
            .unanswered_now()
            .iter()
            .copied()
            .filter(|&s| s >= over_bound)
            .collect();
        self.with(|t| {
            // Marked after the oldest: pending ones that got no answer, and dead letters that
            // may have been acknowledged before they died; then those heard of but not yet
            // recorded.
            let mut held = Vec::new();
            for item in t.retry_at.range(keys::seq_key(from)..) {
                let (key, value) = item?;
                if RetryEntry::is_marked(&value) {
                    held.push(key);
                }
            }
            held.extend(
                unanswered_now
                    .iter()
                    .map(|&seq| sled::IVec::from(&keys::seq_key(seq)[..])),
            );
            if held.is_empty() && from >= unrecorded_below {
                return Ok(());
            }
            for &seq in dead {
                if let Some(value) = t.dead.get(keys::seq_key(seq))? {
                    if let Ok(profile) = codec::export_profile_id(&value) {
                        found.newest.entry(profile.to_owned()).or_insert(0);
                    }
                }
            }
            if found.newest.is_empty() {
                return Ok(());
            }
            let mut note = |key: &[u8], value: &[u8]| {
                let (Some(seq), Ok(profile)) =
                    (keys::seq_from_key(key), codec::export_profile_id(value))
                else {
                    return;
                };
                if let Some(newest) = found.newest.get_mut(profile) {
                    *newest = (*newest).max(seq);
                }
            };
            if from < unrecorded_below {
                let range = keys::seq_key(from)..keys::seq_key(unrecorded_below);
                for item in t.outbox.range(range) {
                    let (key, value) = item?;
                    note(&key, &value);
                }
            }
            for key in held {
                let value = match t.outbox.get(&key)? {
                    Some(value) => Some(value),
                    None => t.dead.get(&key)?,
                };
                if let Some(value) = value {
                    note(&key, &value);
                }
            }
            Ok(())
        })?;
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::outbox::{ExportChange, Outcome};
    use crate::store::testing::export_each;
    use crate::store::PutBack;

    fn kill(store: &Store, seq: u64) {
        assert!(store
            .change_export(seq, Place::Pending, |r| (Place::Dead, r))
            .unwrap());
        store.flush().unwrap();
    }

    fn put_back(store: &Store, seq: u64) -> PutBack {
        let maybe = store.maybe_acknowledged(&[seq]).unwrap();
        store.put_back_dead_letter(seq, 1, 1, &maybe).unwrap()
    }

    /// An export of p made a dead letter, then a newer one pending.
    fn dead_then_pending(store: &Store) -> (u64, u64) {
        let seqs = export_each(store, &[("p", "v1"), ("p", "v2")]);
        kill(store, seqs[0]);
        (seqs[0], seqs[1])
    }

    /// Recording that delivery runs waits for no compaction or reopen: refused while one holds
    /// the writes, so that neither comes between its writes and their flush.
    #[test]
    fn recording_that_delivery_runs_is_refused_while_writes_are_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        {
            let _stopped = store.stop_writes().unwrap();
            assert!(matches!(
                store.delivery_starting(),
                Err(StoreError::Reopening(_))
            ));
        }
        store.delivery_starting().unwrap();
    }

    #[test]
    fn a_dead_letter_waits_for_a_newer_export_a_run_that_stopped_unrecorded_may_have_sent() {
        let dir = tempfile::tempdir().unwrap();
        let (older, newer) = {
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            let seqs = dead_then_pending(&store);
            store.delivery_starting().unwrap();
            seqs // dropped without delivery_stopped_recorded: as a kill -9 leaves it
        };
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(
            put_back(&store, older),
            PutBack::MaybeOvertaken { by: newer }
        );
        // Exports made after that run were never sent by it.
        let later = export_each(&store, &[("q", "v1"), ("q", "v2")]);
        kill(&store, later[0]);
        assert_eq!(put_back(&store, later[0]), PutBack::Done);

        // A run that stops with everything recorded keeps the bound of the one before.
        store.delivery_starting().unwrap();
        store.delivery_stopped_recorded().unwrap();
        store.flush().unwrap();
        drop(store);
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(
            put_back(&store, older),
            PutBack::MaybeOvertaken { by: newer }
        );
        assert_eq!(store.tally().unwrap().dead, 1, "still a dead letter");
    }

    /// A reopen after an I/O error forgets what was not flushed, the mark of an attempt that
    /// got no answer among it: then, as after a crash, every export pending at the reopen may
    /// have been acknowledged, also after a clean stop.
    #[test]
    fn a_reopen_after_an_io_error_errs_towards_holding_as_a_crash_does() {
        let dir = tempfile::tempdir().unwrap();
        let (older, newer) = {
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            store.delivery_starting().unwrap();
            let (older, newer) = dead_then_pending(&store);
            // Its unanswered attempt's mark is what the reopen forgets.
            let maybe = store.maybe_acknowledged(&[older]).unwrap();
            assert_eq!(maybe.newer_than("p", older), None);

            super::super::testing::fail_as_after_eio(&store);
            assert!(store.recover().unwrap());
            let maybe = store.maybe_acknowledged(&[older]).unwrap();
            assert_eq!(maybe.newer_than("p", older), Some(newer));

            store.delivery_stopped_recorded().unwrap();
            store.flush().unwrap();
            (older, newer)
        };
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(
            put_back(&store, older),
            PutBack::MaybeOvertaken { by: newer }
        );
    }

    /// A reopen that failed after giving up the handles, then a compaction that opens the
    /// store again: the compaction raises the bound as the reopen would have.
    #[test]
    fn a_compaction_that_ends_a_failed_reopen_errs_towards_holding() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        store.delivery_starting().unwrap();
        let (older, newer) = dead_then_pending(&store);
        super::super::testing::fail_as_after_eio(&store);
        drop(store.take_trees().unwrap());

        store.compact_in_place().unwrap();
        assert!(!store.is_failed());
        let maybe = store.maybe_acknowledged(&[older]).unwrap();
        assert_eq!(maybe.newer_than("p", older), Some(newer));
    }

    #[test]
    fn a_store_no_delivery_of_this_version_ran_on_errs_towards_holding() {
        let dir = tempfile::tempdir().unwrap();
        let (older, newer) = {
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            let seqs = dead_then_pending(&store);
            // As a store an earlier build made and delivered from has it: no bound recorded.
            store
                .with(|t| {
                    t.meta.remove(meta::UNRECORDED_BELOW)?;
                    Ok(())
                })
                .unwrap();
            store.flush().unwrap();
            seqs
        };
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(
            put_back(&store, older),
            PutBack::MaybeOvertaken { by: newer }
        );
    }

    /// `outpost ingest` into a new store, then the agent: its dead letters go back, since no
    /// delivery ran on the store before (they were held, said to be behind exports an agent
    /// may have had acknowledged).
    #[test]
    fn a_store_made_by_this_version_and_filled_before_any_delivery_holds_nothing_back() {
        let dir = tempfile::tempdir().unwrap();
        let older = {
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            dead_then_pending(&store).0
        };
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(put_back(&store, older), PutBack::Done);
    }

    #[test]
    fn a_dead_letter_goes_back_when_every_run_recorded_its_outcomes() {
        let dir = tempfile::tempdir().unwrap();
        let older = {
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            let (older, _) = dead_then_pending(&store);
            store.delivery_starting().unwrap();
            store.delivery_stopped_recorded().unwrap();
            store.flush().unwrap();
            older
        };
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(put_back(&store, older), PutBack::Done);
    }

    #[test]
    fn only_newer_exports_of_the_same_profile_hold_a_dead_letter() {
        let dir = tempfile::tempdir().unwrap();
        let seqs = {
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            let seqs = export_each(&store, &[("p", "v1"), ("q", "v1"), ("p", "v2")]);
            kill(&store, seqs[1]);
            kill(&store, seqs[2]);
            store.delivery_starting().unwrap();
            seqs
        };
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let maybe = store.maybe_acknowledged(&[seqs[1], seqs[2]]).unwrap();
        assert_eq!(maybe.newer_than("q", seqs[1]), None, "q has none pending");
        assert_eq!(
            maybe.newer_than("p", seqs[2]),
            None,
            "p's pending one is older"
        );
        assert_eq!(put_back(&store, seqs[2]), PutBack::Done);
    }

    #[test]
    fn dropping_an_export_that_may_have_been_acknowledged_supersedes_older_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let (older, newer) = {
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            let seqs = dead_then_pending(&store);
            store.delivery_starting().unwrap();
            seqs
        };
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        assert!(store.drop_pending(newer).unwrap());
        assert!(!store.drop_pending(newer).unwrap(), "gone");
        assert_eq!(put_back(&store, older), PutBack::Superseded { by: newer });
        assert_eq!(store.tally().unwrap().pending, 0);

        // Over the bound, a drop is only a drop.
        let later = export_each(&store, &[("q", "v1"), ("q", "v2")]);
        kill(&store, later[0]);
        assert!(store.drop_pending(later[1]).unwrap());
        assert_eq!(put_back(&store, later[0]), PutBack::Done);
    }

    fn settle(store: &Store, profile: &str, seq: u64, change: ExportChange) {
        store
            .apply_export_changes(&[Outcome {
                profile: Arc::from(profile),
                seq,
                change,
            }])
            .unwrap();
    }

    fn fail(store: &Store, profile: &str, seq: u64, unanswered: bool) {
        let change = ExportChange::Failed {
            error: if unanswered {
                "timed out"
            } else {
                "HTTP 503: busy"
            }
            .into(),
            at_ms: 1,
            retry_at_uptime_ms: Some(5),
            unanswered,
        };
        settle(store, profile, seq, change);
    }

    /// A fresh store: every export it makes is over the bound.
    fn stopped_cleanly(dir: &std::path::Path) -> Store {
        let store = Store::open(dir, 8 << 20).unwrap();
        store.delivery_starting().unwrap();
        store.delivery_stopped_recorded().unwrap();
        store.flush().unwrap();
        store
    }

    /// Delivers `newer` of profile p: `older` is then superseded, and neither has a retry
    /// entry left.
    fn deliver_then_superseded(store: &Store, older: u64, newer: u64) {
        settle(store, "p", newer, ExportChange::Delivered { retried: true });
        assert_eq!(put_back(store, older), PutBack::Superseded { by: newer });
        let retry_at = store.trees().unwrap().retry_at.clone();
        for seq in [older, newer] {
            assert!(!retry_at.contains_key(keys::seq_key(seq)).unwrap(), "{seq}");
        }
    }

    #[test]
    fn a_dead_letter_waits_for_a_newer_export_whose_request_got_no_answer_until_it_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let (older, newer) = {
            let store = stopped_cleanly(dir.path());
            let (older, newer) = dead_then_pending(&store);
            // Answered failures hold nothing.
            fail(&store, "p", newer, false);
            assert_eq!(
                store
                    .maybe_acknowledged(&[older])
                    .unwrap()
                    .newer_than("p", older),
                None
            );
            // Heard by the delivery loop, not yet recorded; an answered failure from before,
            // recorded meanwhile, does not clear it.
            store.attempt_unanswered(newer);
            fail(&store, "p", newer, false);
            assert_eq!(
                put_back(&store, older),
                PutBack::MaybeOvertaken { by: newer }
            );
            // Recorded; an answered failure after it does not clear it.
            fail(&store, "p", newer, true);
            assert!(store.unanswered_now().is_empty(), "recorded in retry_at");
            fail(&store, "p", newer, false);
            assert_eq!(
                put_back(&store, older),
                PutBack::MaybeOvertaken { by: newer }
            );
            store.flush().unwrap();
            (older, newer)
        };
        // Across a clean stop: the store keeps it.
        let store = stopped_cleanly(dir.path());
        assert_eq!(
            put_back(&store, older),
            PutBack::MaybeOvertaken { by: newer }
        );
        deliver_then_superseded(&store, older, newer);
    }

    #[test]
    fn dropping_an_export_whose_request_got_no_answer_supersedes_older_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let store = stopped_cleanly(dir.path());
        let seqs = export_each(
            &store,
            &[("p", "v1"), ("q", "v1"), ("p", "v2"), ("q", "v2")],
        );
        kill(&store, seqs[0]);
        kill(&store, seqs[1]);
        // Heard by the delivery loop only, and recorded only.
        store.attempt_unanswered(seqs[2]);
        fail(&store, "q", seqs[3], true);
        assert!(store.drop_pending(seqs[2]).unwrap());
        assert!(store.drop_pending(seqs[3]).unwrap());
        assert_eq!(
            put_back(&store, seqs[0]),
            PutBack::Superseded { by: seqs[2] }
        );
        assert_eq!(
            put_back(&store, seqs[1]),
            PutBack::Superseded { by: seqs[3] }
        );
    }

    fn refuse(store: &Store, profile: &str, seq: u64) {
        let change = ExportChange::Rejected {
            error: "HTTP 400: refused".into(),
            at_ms: 1,
        };
        settle(store, profile, seq, change);
    }

    #[test]
    fn a_dead_letter_waits_for_a_newer_one_that_may_have_been_acknowledged_before_it_died() {
        let dir = tempfile::tempdir().unwrap();
        let ((older, newer), r) = {
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            let seqs = dead_then_pending(&store);
            let r = export_each(&store, &[("r", "v1"), ("r", "v2")]);
            kill(&store, r[0]);
            store.delivery_starting().unwrap();
            (seqs, r) // pending when a run stopped unrecorded
        };
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        refuse(&store, "p", newer);
        let expired = ExportChange::Expired {
            max_age_s: 60,
            at_ms: 1,
        };
        settle(&store, "r", r[1], expired);
        // A newer export that died with an answer, over the bound, holds nothing.
        let q = export_each(&store, &[("q", "v1"), ("q", "v2")]);
        refuse(&store, "q", q[0]);
        refuse(&store, "q", q[1]);
        let all_dead = [older, newer, r[0], r[1], q[0], q[1]];
        let maybe = store.maybe_acknowledged(&all_dead).unwrap();
        assert_eq!(maybe.newer_than("p", older), Some(newer));
        assert_eq!(maybe.newer_than("r", r[0]), Some(r[1]), "expired");
        assert_eq!(maybe.newer_than("q", q[0]), None);
        // `--all-dead`, in order: the older one waits, the newer one goes back.
        let put_back_as_one = |seq| store.put_back_dead_letter(seq, 1, 1, &maybe).unwrap();
        assert_eq!(
            put_back_as_one(older),
            PutBack::MaybeOvertaken { by: newer }
        );
        assert_eq!(put_back_as_one(newer), PutBack::Done);
        assert_eq!(put_back_as_one(q[0]), PutBack::Done);
        deliver_then_superseded(&store, older, newer);
    }

    #[test]
    fn dropping_a_dead_letter_that_may_have_been_acknowledged_supersedes_older_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (older, newer) = {
            let store = stopped_cleanly(dir.path());
            let (older, newer) = dead_then_pending(&store);
            fail(&store, "p", newer, true);
            refuse(&store, "p", newer);
            store.flush().unwrap();
            (older, newer)
        };
        // The mark outlives a clean stop and the open's clean-up.
        let store = stopped_cleanly(dir.path());
        assert_eq!(
            put_back(&store, older),
            PutBack::MaybeOvertaken { by: newer }
        );
        // Marked superseded too, as only an older build leaves a marked dead letter: the mark
        // goes with it.
        store
            .trees()
            .unwrap()
            .superseded
            .insert(keys::seq_key(newer), &keys::seq_key(newer + 10)[..])
            .unwrap();
        assert!(store.drop_dead(newer).unwrap());
        assert!(!store.drop_dead(newer).unwrap(), "gone");
        assert_eq!(store.superseded_by(newer).unwrap(), None);
        assert_eq!(put_back(&store, older), PutBack::Superseded { by: newer });
        assert_eq!(store.tally().unwrap().dead, 1, "the older one stays");
        assert_eq!(store.trees().unwrap().retry_at.len(), 0);

        // An unmarked dead letter is only dropped.
        let q = export_each(&store, &[("q", "v1"), ("q", "v2")]);
        kill(&store, q[0]);
        refuse(&store, "q", q[1]);
        assert!(store.drop_dead(q[1]).unwrap());
        assert_eq!(put_back(&store, q[0]), PutBack::Done);
    }

    #[test]
    fn superseded_dead_letters_lose_their_mark_and_keep_the_export_that_superseded_them() {
        let dir = tempfile::tempdir().unwrap();
        let v = {
            let store = stopped_cleanly(dir.path());
            let v = export_each(
                &store,
                &[("p", "v1"), ("p", "v2"), ("p", "v3"), ("p", "v4")],
            );
            kill(&store, v[0]);
            fail(&store, "p", v[1], true);
            refuse(&store, "p", v[1]);
            // v3, delivered, supersedes both; a mark on a superseded one would hold nothing.
            settle(
                &store,
                "p",
                v[2],
                ExportChange::Delivered { retried: false },
            );
            assert_eq!(store.superseded_by(v[1]).unwrap(), Some(v[2]));
            assert_eq!(store.trees().unwrap().retry_at.len(), 0);
            fail(&store, "p", v[3], true);
            refuse(&store, "p", v[3]);
            store.flush().unwrap();
            v
        };
        // Dropping the newest, marked, after an open read the dead letters again: the older
        // ones still name v3, which the endpoint did acknowledge.
        let store = stopped_cleanly(dir.path());
        assert!(store.drop_dead(v[3]).unwrap());
        assert_eq!(store.superseded_by(v[0]).unwrap(), Some(v[2]));
        assert_eq!(store.superseded_by(v[1]).unwrap(), Some(v[2]));
        // So does dropping a pending export that may have been acknowledged (after an open,
        // which reads the superseded dead letters into the index again).
        let v5 = export_each(&store, &[("p", "v5")])[0];
        store.flush().unwrap();
        drop(store);
        let store = stopped_cleanly(dir.path());
        fail(&store, "p", v5, true);
        assert!(store.drop_pending(v5).unwrap());
        assert_eq!(store.superseded_by(v[0]).unwrap(), Some(v[2]));
        assert_eq!(store.superseded_by(v[1]).unwrap(), Some(v[2]));
        assert_eq!(store.tally().unwrap().pending, 0);
        // A superseded dead letter dropped takes its mark with it.
        assert!(store.drop_dead(v[1]).unwrap());
        assert_eq!(store.superseded_by(v[1]).unwrap(), None);
        assert_eq!(store.superseded_by(v[0]).unwrap(), Some(v[2]));
    }

    #[test]
    fn the_retry_entries_of_pending_exports_and_of_marked_dead_letters_only_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let seqs = {
            let store = stopped_cleanly(dir.path());
            let seqs = export_each(&store, &[("p", "v1"), ("q", "v1"), ("r", "v1")]);
            kill(&store, seqs[0]);
            kill(&store, seqs[1]);
            let time_only = 9u64.to_be_bytes().to_vec();
            let mut marked = 0u64.to_be_bytes().to_vec();
            marked.push(1);
            let retry_at = store.trees().unwrap().retry_at.clone();
            for (seq, entry) in [
                (seqs[0], &time_only), // a dead letter, unmarked (an unreadable record's)
                (seqs[1], &marked),
                (seqs[2], &time_only), // pending
                (99, &marked),         // neither
            ] {
                retry_at
                    .insert(keys::seq_key(seq), entry.as_slice())
                    .unwrap();
            }
            store.flush().unwrap();
            seqs
        };
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let kept = || -> Vec<u64> {
            store
                .trees()
                .unwrap()
                .retry_at
                .iter()
                .keys()
                .map(|k| keys::seq_from_key(&k.unwrap()).unwrap())
                .collect()
        };
        // Not at open: the agent looks them over once it has started, until it stops.
        assert_eq!(kept().len(), 4);
        assert_eq!(store.forget_stale_retry_entries(|| true).unwrap(), 0);
        assert_eq!(kept().len(), 4);
        assert_eq!(store.forget_stale_retry_entries(|| false).unwrap(), 2);
        assert_eq!(kept(), [seqs[1], seqs[2]]);
        assert_eq!(store.forget_stale_retry_entries(|| false).unwrap(), 0);
        // More than are looked over at a time.
        let retry_at = store.trees().unwrap().retry_at.clone();
        for seq in 1_000..3_500u64 {
            retry_at
                .insert(keys::seq_key(seq), &9u64.to_be_bytes()[..])
                .unwrap();
        }
        assert_eq!(store.forget_stale_retry_entries(|| false).unwrap(), 2_500);
        assert_eq!(kept(), [seqs[1], seqs[2]]);
    }

    #[test]
    fn an_unreadable_bound_opens_the_store_erring_towards_holding() {
        let dir = tempfile::tempdir().unwrap();
        let (older, newer) = {
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            let seqs = dead_then_pending(&store);
            store.delivery_starting().unwrap();
            store.delivery_stopped_recorded().unwrap();
            store
                .with(|t| Ok(t.meta.insert(meta::UNRECORDED_BELOW, b"bad".as_slice())?))
                .unwrap();
            store.flush().unwrap();
            seqs
        };
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(
            put_back(&store, older),
            PutBack::MaybeOvertaken { by: newer }
        );
    }
}
