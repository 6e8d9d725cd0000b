//! Dead letters overtaken by a newer export of their profile.
//!
//! A dead letter does not hold back its profile's later exports. Once the endpoint has
//! acknowledged one of those, sending the dead letter would undo it (SPEC: no older export of
//! a profile is sent after a newer one was acknowledged). So the transaction that records a
//! delivery marks the profile's older dead letters in `superseded` (the dead letter's
//! sequence → the acknowledged export's), and `outbox retry` refuses them. `outbox retry`
//! waits for the requests in flight before it puts back ([`Store::rewinding_with_nothing_out`]);
//! should an older export still be found pending when a newer one is delivered, it goes back
//! to the dead letters, marked, and the delivery loop forgets it.
//!
//! `dead` is keyed by sequence, and a transaction cannot scan, so finding a profile's dead
//! letters needs an index: [`DeadLetterIndex`] keeps (hash of the profile id, sequence) in
//! memory, read from `dead` when the first delivery is recorded and added to as exports die
//! or are put back. It may name exports that are no longer dead letters (put back, dropped):
//! the transaction checks each, and one found nowhere is forgotten.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use sled::Transactional;

use super::codec::{self, ExportRecord};
use super::tally::{read_tally, write_tally, Tally};
use super::{keys, MaybeAcknowledged, Place, Store, StoreError, Trees};
use crate::source::partition::fnv1a64;

/// See the module docs.
#[derive(Debug, Default)]
pub(super) struct DeadLetterIndex {
    entries: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    /// (hash of the profile id, sequence).
    set: BTreeSet<(u64, u64)>,
    /// Whether `dead` was read into `set`: when a delivery is first recorded, so commands that
    /// record none never read it. Entries added before then are kept.
    scanned: bool,
}

/// A dead letter (or one put back) older than an export of its profile being delivered.
#[derive(Debug, Clone)]
pub(super) struct Candidate {
    pub seq: u64,
    pub profile: Arc<str>,
    /// The delivered export (or the dropped one).
    pub newer: u64,
    /// `newer` was acknowledged; else it is an export dropped (pending or a dead letter) that
    /// may have been ([`Store::drop_pending`], [`Store::drop_dead`]).
    pub acknowledged: bool,
}

fn entry(profile: &str, seq: u64) -> (u64, u64) {
    (fnv1a64(profile.as_bytes()), seq)
}

impl DeadLetterIndex {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Indexes a dead letter: one that died, or one about to be put back (added before it
    /// leaves `dead`, so that a scan made meanwhile cannot miss it).
    pub fn add(&self, profile: &str, seq: u64) {
        self.lock().set.insert(entry(profile, seq));
    }

    /// The indexed exports older than each delivered one, of its profile (or of another
    /// profile with the same hash: the transaction checks). Reads every dead letter of `t`
    /// into the index first if that was not done yet. Takes no sled lock while holding the
    /// index's (nor the reverse), so it cannot deadlock with a transaction.
    pub fn older_than<'a>(
        &self,
        t: &Trees,
        delivered: impl Iterator<Item = (&'a Arc<str>, u64)>,
    ) -> sled::Result<Vec<Candidate>> {
        let mut entries = self.lock();
        if !entries.scanned {
            for item in t.dead.iter() {
                let (key, value) = item?;
                // One marked already is never put back: no later delivery needs to mark it
                // again (after a restart, each would, in its settling transaction).
                if t.superseded.contains_key(&key)? {
                    continue;
                }
                if let (Some(seq), Ok(profile)) =
                    (keys::seq_from_key(&key), codec::export_profile_id(&value))
                {
                    entries.set.insert(entry(profile, seq));
                }
            }
            entries.scanned = true;
        }
        let mut found = Vec::new();
        if entries.set.is_empty() {
            return Ok(found);
        }
        for (profile, newer) in delivered {
            let hash = fnv1a64(profile.as_bytes());
            for &(_, seq) in entries.set.range((hash, 0)..(hash, newer)) {
                found.push(Candidate {
                    seq,
                    profile: Arc::clone(profile),
                    newer,
                    acknowledged: true,
                });
            }
        }
        Ok(found)
    }

    /// Makes the next delivery read `dead` again, keeping what is indexed (after the store was
    /// reopened, a dead letter whose drop or put-back was not durable is one again).
    pub fn read_again(&self) {
        self.lock().scanned = false;
    }

    /// Forgets exports that need no more looking at: found neither dead nor pending, or
    /// marked (never put back again).
    pub fn forget(&self, gone: &[Candidate]) {
        let mut entries = self.lock();
        for c in gone {
            entries.set.remove(&entry(&c.profile, c.seq));
        }
    }
}

/// What the transaction found of a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Found {
    /// A dead letter of the profile: now marked.
    Marked,
    /// Put back and pending: moved to the dead letters and marked; the loop must forget it.
    Withdrawn,
    /// Another profile's export (same hash): left alone.
    Other,
    /// Neither dead nor pending any more.
    Gone,
}

/// The trees the settling transaction works on.
pub(super) struct Views<'a> {
    pub outbox: &'a TransactionalTree,
    pub dead: &'a TransactionalTree,
    pub retry_at: &'a TransactionalTree,
    pub superseded: &'a TransactionalTree,
}

/// Marks, inside the settling transaction, candidate `c` as overtaken by its newer export,
/// whose id reads `newer_id`.
pub(super) fn mark(
    v: &Views<'_>,
    tally: &mut Tally,
    c: &Candidate,
    newer_id: &str,
    now_ms: i64,
) -> Result<Found, ConflictableTransactionError<StoreError>> {
    let key = keys::seq_key(c.seq);
    let of_profile = |value: &[u8]| codec::export_profile_id(value).is_ok_and(|p| *p == *c.profile);
    if let Some(value) = v.dead.get(key)? {
        if !of_profile(&value) {
            return Ok(Found::Other);
        }
        // A drop does not replace a mark naming an export the endpoint acknowledged with one
        // naming an export that is gone.
        if c.acknowledged || v.superseded.get(key)?.is_none() {
            v.superseded.insert(&key, &c.newer.to_be_bytes())?;
        }
        // A superseded dead letter is never put back: a mark that it may have been
        // acknowledged would only hold older ones, which are superseded with it.
        v.retry_at.remove(&key)?;
        return Ok(Found::Marked);
    }
    let Some(value) = v.outbox.get(key)? else {
        return Ok(Found::Gone);
    };
    let Some(mut record) = codec::decode_export(&value)
        .ok()
        .filter(|r: &ExportRecord| *r.profile_id == *c.profile)
    else {
        return Ok(Found::Other);
    };
    v.outbox.remove(&key)?;
    v.retry_at.remove(&key)?;
    tally.count(Place::Pending, value.len(), -1);
    let before = record
        .last_error
        .as_deref()
        .map_or(String::new(), |e| format!(" (before: {e})"));
    let acknowledged = if c.acknowledged {
        "acknowledged"
    } else {
        "may have acknowledged"
    };
    record.last_error = Some(format!(
        "put back, then not sent: the endpoint {acknowledged} {newer_id}, a newer export of the same profile, first{before}"
    ));
    record.dead_at_ms = Some(now_ms);
    let value = codec::encode_export(&record);
    tally.count(Place::Dead, value.len(), 1);
    v.dead.insert(&key, value)?;
    v.superseded.insert(&key, &c.newer.to_be_bytes())?;
    Ok(Found::Withdrawn)
}

impl Store {
    /// [`mark`]s each candidate, inside the settling transaction.
    pub(super) fn mark_superseded(
        &self,
        v: &Views<'_>,
        tally: &mut Tally,
        older: &[Candidate],
    ) -> Result<Vec<Found>, ConflictableTransactionError<StoreError>> {
        older
            .iter()
            .map(|c| {
                let newer_id = self.export_id(c.newer).to_string();
                mark(
                    v,
                    tally,
                    c,
                    &newer_id,
                    chrono::Utc::now().timestamp_millis(),
                )
            })
            .collect()
    }

    /// Once the transaction that marked them is committed: the index forgets the candidates
    /// that need no more looking at.
    pub(super) fn forget_superseded(&self, older: Vec<Candidate>, found: &[Found]) {
        let gone: Vec<_> = older
            .into_iter()
            .zip(found)
            .filter(|(_, what)| **what != Found::Other)
            .map(|(candidate, _)| candidate)
            .collect();
        self.dead_letters.forget(&gone);
    }
}

fn superseded_by(
    superseded: &TransactionalTree,
    seq: u64,
) -> Result<Option<u64>, ConflictableTransactionError<StoreError>> {
    // A value of another size (written by nobody) reads as none.
    Ok(superseded
        .get(keys::seq_key(seq))?
        .as_deref()
        .and_then(keys::seq_from_key))
}

/// What became of a dead letter to be put back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutBack {
    /// Pending again.
    Done,
    /// Not put back: the endpoint acknowledged `by`, a newer export of its profile.
    Superseded { by: u64 },
    /// Not put back: `by`, a newer export of its profile, pending or a dead letter, may have
    /// been acknowledged unrecorded: by a run that did not record it, or in answer to a
    /// request that got none ([`super::unrecorded`]).
    MaybeOvertaken { by: u64 },
    /// Not put back: nothing can be sent from a record that could not be read.
    Unreadable,
    /// No such dead letter.
    NotDead,
}

impl Store {
    /// Puts dead letter `seq` back in the outbox, queued anew at `queued_at_ms` (wall clock)
    /// and `queued_at_uptime_ms` (run time), unless it is superseded or unreadable. One
    /// transaction: a delivery recorded at the same moment either marks it before, or finds
    /// it pending after and withdraws it.
    pub fn put_back_dead_letter(
        &self,
        seq: u64,
        queued_at_ms: i64,
        queued_at_uptime_ms: u64,
        maybe_acknowledged: &MaybeAcknowledged,
    ) -> Result<PutBack, StoreError> {
        let key = keys::seq_key(seq);
        self.with(|t| {
            // A marked one is refused below, and needs no entry.
            if let (Some(value), false) = (t.dead.get(key)?, t.superseded.contains_key(key)?) {
                if let Ok(profile) = codec::export_profile_id(&value) {
                    self.dead_letters.add(profile, seq);
                }
            }
            Ok((&t.outbox, &t.dead, &t.meta, &t.superseded).transaction(
                |(outbox, dead, meta_tx, superseded)| {
                    let Some(old) = dead.get(key)? else {
                        return Ok(PutBack::NotDead);
                    };
                    if let Some(by) = superseded_by(superseded, seq)? {
                        return Ok(PutBack::Superseded { by });
                    }
                    let mut record = match codec::decode_export(&old) {
                        Ok(record) if !record.is_unreadable() => record,
                        _ => return Ok(PutBack::Unreadable),
                    };
                    if let Some(by) = maybe_acknowledged.newer_than(&record.profile_id, seq) {
                        return Ok(PutBack::MaybeOvertaken { by });
                    }
                    record.dead_at_ms = None;
                    record.queued_at_ms = queued_at_ms;
                    record.queued_at_uptime_ms = queued_at_uptime_ms;
                    let value = codec::encode_export(&record);
                    let mut tally = read_tally(meta_tx)?;
                    tally.count(Place::Dead, old.len(), -1);
                    tally.count(Place::Pending, value.len(), 1);
                    dead.remove(&key)?;
                    outbox.insert(&key, value)?;
                    write_tally(meta_tx, tally)?;
                    Ok(PutBack::Done)
                },
            )?)
        })
    }

    /// The acknowledged export that overtook dead letter `seq`, if one did.
    pub fn superseded_by(&self, seq: u64) -> Result<Option<u64>, StoreError> {
        self.with(|t| {
            Ok(t.superseded
                .get(keys::seq_key(seq))?
                .as_deref()
                .and_then(keys::seq_from_key))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::outbox::{ExportChange, Outcome};
    use crate::store::testing::export_each;
    use crate::store::Tally;

    fn settle(
        store: &Store,
        profile: &str,
        seq: u64,
        change: ExportChange,
    ) -> Vec<(Arc<str>, u64)> {
        let outcome = Outcome {
            profile: profile.into(),
            seq,
            change,
        };
        store.apply_export_changes(&[outcome]).unwrap().withdrawn
    }

    fn refused() -> ExportChange {
        ExportChange::Rejected {
            error: "HTTP 400: refused".into(),
            at_ms: 1,
        }
    }

    const DELIVERED: ExportChange = ExportChange::Delivered { retried: false };

    /// A store at `dir` where profile a's export 0 was refused (a dead letter) and its export
    /// 1 delivered.
    fn dead_letter_superseded_by_the_next(dir: &std::path::Path) -> Store {
        let store = Store::open(dir, 8 << 20).unwrap();
        export_each(&store, &[("a", "1"), ("a", "2")]);
        settle(&store, "a", 0, refused());
        settle(&store, "a", 1, DELIVERED);
        store
    }

    fn put_back(store: &Store, seq: u64) -> PutBack {
        store
            .put_back_dead_letter(seq, 2, 2, &MaybeAcknowledged::default())
            .unwrap()
    }

    fn counts(store: &Store) -> (u64, u64) {
        let Tally { pending, dead, .. } = store.tally().unwrap();
        (pending, dead)
    }

    /// An export put back by `outbox retry` keeps its low number but waits from its put-back:
    /// the longest wait (what `max_age_s` is compared with) is still that of the export behind
    /// it that has waited all along.
    #[test]
    fn an_export_put_back_ahead_does_not_hide_the_longest_wait() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        export_each(&store, &[("a", "1"), ("b", "1")]);
        settle(&store, "a", 0, refused());
        std::thread::sleep(std::time::Duration::from_millis(1_100));
        let put_back = store.put_back_dead_letter(
            0,
            chrono::Utc::now().timestamp_millis(),
            store.run_clock().uptime_ms(),
            &MaybeAcknowledged::default(),
        );
        assert_eq!(put_back.unwrap(), PutBack::Done);
        let stats = store.outbox_stats(chrono::Utc::now()).unwrap();
        assert_eq!(stats.pending, 2);
        assert!(
            stats.oldest_pending_waited_s >= Some(1),
            "{:?}",
            stats.oldest_pending_waited_s
        );
    }

    /// A key in the outbox that is no export number (damage; this one sorts first) is passed
    /// over by the figures that `outbox stats`, `outpost top` and `/metrics` read, rather
    /// than fail them.
    #[test]
    fn the_outbox_figures_pass_over_a_key_that_is_no_export_number() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        export_each(&store, &[("a", "1")]);
        store
            .with(|t| Ok(t.outbox.insert(b"\x00", b"\x01")?))
            .unwrap();
        let stats = store.outbox_stats(chrono::Utc::now()).unwrap();
        assert_eq!(stats.pending, 1);
        assert!(stats.oldest_pending_created_at.is_some());
    }

    /// Nor do listings and the pages of `--all-dead` fail for such a key among dead letters;
    /// a page still holds as many dead letters as asked, so paging goes on past it.
    #[test]
    fn listings_and_pages_of_dead_letters_pass_over_a_key_that_is_no_export_number() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        export_each(&store, &[("a", "1"), ("b", "1"), ("c", "1")]);
        for (profile, seq) in [("a", 0), ("b", 1), ("c", 2)] {
            settle(&store, profile, seq, refused());
        }
        // Nine bytes: between export 0's key and export 1's.
        let between = [0u8; 9];
        store
            .with(|t| Ok(t.dead.insert(between, b"\x01")?))
            .unwrap();
        assert_eq!(store.dead_seqs(None, 2).unwrap(), [0, 1]);
        assert_eq!(store.dead_seqs(Some(1), 2).unwrap(), [2]);
        let dead = crate::store::ListFilter {
            dead: true,
            ..crate::store::ListFilter::default()
        };
        let listed: Vec<u64> = store
            .list(&dead)
            .unwrap()
            .iter()
            .map(|e| e.id.seq)
            .collect();
        assert_eq!(listed, [0, 1, 2]);
    }

    #[test]
    fn a_delivery_marks_the_older_dead_letters_of_its_profile_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        export_each(&store, &[("a", "1"), ("b", "1"), ("a", "2"), ("b", "2")]);
        settle(&store, "a", 0, refused());
        settle(&store, "b", 1, refused());
        assert!(settle(&store, "a", 2, DELIVERED).is_empty());
        assert_eq!(store.superseded_by(0).unwrap(), Some(2));
        assert_eq!(store.superseded_by(1).unwrap(), None, "another profile");
        assert_eq!(put_back(&store, 0), PutBack::Superseded { by: 2 });
        assert_eq!(counts(&store), (1, 2), "refused: still a dead letter");
        // b's newer export is pending, not acknowledged: its dead letter goes back ahead of it.
        assert_eq!(put_back(&store, 1), PutBack::Done);
        assert_eq!(counts(&store), (2, 1));
        assert_eq!(put_back(&store, 1), PutBack::NotDead);
    }

    /// The index is built when first needed, from the dead letters as they are then: also
    /// when the first need is a dead letter put back, before any delivery is recorded.
    #[test]
    fn dead_letters_of_an_earlier_run_are_found() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            export_each(&store, &[("a", "1"), ("a", "2")]);
            settle(&store, "a", 0, refused());
            store.flush().unwrap();
        }
        {
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            assert_eq!(put_back(&store, 0), PutBack::Done);
            assert_eq!(settle(&store, "a", 1, DELIVERED), [(Arc::from("a"), 0)]);
            store.flush().unwrap();
        }
        // Marked then by 1, it keeps that mark.
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        export_each(&store, &[("a", "3")]);
        settle(&store, "a", 2, DELIVERED);
        assert_eq!(put_back(&store, 0), PutBack::Superseded { by: 1 });
    }

    /// A dead letter marked in an earlier run is not indexed again: a later delivery of its
    /// profile has nothing to mark, and its mark stays that of the delivery that made it.
    #[test]
    fn dead_letters_marked_in_an_earlier_run_are_left_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = dead_letter_superseded_by_the_next(dir.path());
            assert_eq!(store.superseded_by(0).unwrap(), Some(1));
            store.flush().unwrap();
        }
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        export_each(&store, &[("a", "3")]);
        let t = store.trees().unwrap();
        let delivered = Arc::from("a");
        let candidates = store
            .dead_letters
            .older_than(&t, std::iter::once((&delivered, 2)))
            .unwrap();
        assert!(candidates.is_empty(), "{candidates:?}");
        settle(&store, "a", 2, DELIVERED);
        assert_eq!(store.superseded_by(0).unwrap(), Some(1));
    }

    #[test]
    fn one_put_back_while_the_newer_one_was_out_is_withdrawn() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        export_each(&store, &[("a", "1"), ("a", "2"), ("a", "3")]);
        settle(&store, "a", 0, refused());
        assert_eq!(put_back(&store, 0), PutBack::Done);
        assert_eq!(counts(&store), (3, 0));
        assert_eq!(
            settle(&store, "a", 1, DELIVERED),
            [(Arc::from("a"), 0)],
            "the loop is told to forget it"
        );
        assert_eq!(counts(&store), (1, 1));
        let dead = store.export(store.export_id(0)).unwrap().unwrap();
        assert!(dead.dead);
        let error = dead.record.last_error.unwrap();
        assert!(error.contains(&store.export_id(1).to_string()), "{error}");
        assert_eq!(put_back(&store, 0), PutBack::Superseded { by: 1 });
        // Settled for good: the next delivery finds nothing more to withdraw or mark.
        assert!(settle(&store, "a", 2, DELIVERED).is_empty());
        assert_eq!(store.superseded_by(0).unwrap(), Some(1));
        assert!(
            store.dead_letters.lock().set.is_empty(),
            "a marked dead letter is no longer looked at"
        );
    }

    #[test]
    fn a_mark_goes_with_its_dropped_dead_letter() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        export_each(&store, &[("a", "1"), ("a", "2"), ("b", "1"), ("b", "2")]);
        settle(&store, "a", 0, refused());
        settle(&store, "b", 2, refused());
        settle(&store, "a", 1, DELIVERED);
        settle(&store, "b", 3, DELIVERED);
        let marks = || store.trees().unwrap().superseded.len();
        assert_eq!(marks(), 2);
        assert!(store
            .change_export(0, Place::Dead, |r| (Place::Gone, r))
            .unwrap());
        assert_eq!(marks(), 1);
        assert_eq!(store.superseded_by(0).unwrap(), None);
        assert_eq!(store.superseded_by(2).unwrap(), Some(3));
    }

    /// Marks left by older builds, whose drops kept them.
    #[test]
    fn marks_without_their_dead_letter_go_once_looked_over() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = dead_letter_superseded_by_the_next(dir.path());
            let t = store.trees().unwrap();
            // Beyond the first chunk: a dead letter with its mark, and stale marks around it.
            t.dead
                .insert(
                    keys::seq_key(5_000),
                    t.dead.get(keys::seq_key(0)).unwrap().unwrap(),
                )
                .unwrap();
            t.superseded
                .insert(keys::seq_key(5_000), &keys::seq_key(5_001)[..])
                .unwrap();
            for seq in (1_000..3_500u64).chain(6_000..6_010) {
                t.superseded
                    .insert(keys::seq_key(seq), &keys::seq_key(7_000)[..])
                    .unwrap();
            }
            store.flush().unwrap();
        }
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let marks = || store.trees().unwrap().superseded.len();
        // Not at open: the agent looks them over once it has started, until it stops.
        assert_eq!(marks(), 2_512);
        assert_eq!(store.forget_stale_marks(|| true).unwrap(), 0);
        assert_eq!(marks(), 2_512);
        assert_eq!(store.forget_stale_marks(|| false).unwrap(), 2_510);
        assert_eq!(marks(), 2);
        assert_eq!(store.superseded_by(0).unwrap(), Some(1));
        assert_eq!(store.superseded_by(5_000).unwrap(), Some(5_001));
        assert_eq!(store.forget_stale_marks(|| false).unwrap(), 0);
    }
}
