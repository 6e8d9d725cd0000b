//! What delivery does to pending exports, applied many at a time.
//!
//! The delivery loop hands its changes (delivered, failed attempt, dead-lettered) to one
//! writer, which applies every change waiting in ONE transaction and then flushes once: the
//! cost of a flush is paid by the group, not by each export. The tally stays exact because the
//! same transaction adjusts it.

use std::sync::Arc;
use std::time::Duration;

use sled::Transactional;

use super::codec::{self, ExportRecord};
use super::tally::{read_tally, write_tally};
use super::{keys, superseded, Place, Store, StoreError, Trees};

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A change to one pending export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportChange {
    /// Answered 2xx: it leaves the outbox. `retried`: an attempt of it failed before, so a
    /// retry time may be stored for it (the usual delivery is spared a removal).
    Delivered { retried: bool },
    /// A failed attempt; the export stays pending, not to be sent again before
    /// `retry_at_uptime_ms` on the store's run-time clock (`None`: at once). `unanswered`: the
    /// request got no answer (a timeout, a connection lost after it was written), so the
    /// endpoint may have acknowledged the export all the same ([`super::unrecorded`]).
    Failed {
        error: String,
        at_ms: i64,
        retry_at_uptime_ms: Option<u64>,
        unanswered: bool,
    },
    /// Refused by the endpoint: a dead letter.
    Rejected { error: String, at_ms: i64 },
    /// Undelivered after `delivery.max_age_s`: a dead letter.
    Expired { max_age_s: u64, at_ms: i64 },
}

impl ExportChange {
    /// Whether the change must be durable before the export's profile sends again (so that
    /// an older export is never sent after a newer one was acknowledged).
    pub fn settles(&self) -> bool {
        !matches!(self, ExportChange::Failed { .. })
    }
}

/// Where the export goes and how it reads there.
pub fn changed_record(mut record: ExportRecord, change: &ExportChange) -> (Place, ExportRecord) {
    match change {
        ExportChange::Delivered { .. } => (Place::Gone, record),
        ExportChange::Failed { error, at_ms, .. } => {
            record.attempts = record.attempts.saturating_add(1);
            record.last_error = Some(error.clone());
            record.last_attempt_at_ms = Some(*at_ms);
            (Place::Pending, record)
        }
        ExportChange::Rejected { error, at_ms } => {
            record.attempts = record.attempts.saturating_add(1);
            record.last_error = Some(error.clone());
            record.last_attempt_at_ms = Some(*at_ms);
            record.dead_at_ms = Some(*at_ms);
            (Place::Dead, record)
        }
        ExportChange::Expired { max_age_s, at_ms } => {
            let cause = record.last_error.as_deref().unwrap_or("never attempted");
            record.last_error = Some(format!(
                "undelivered after max_age_s {max_age_s} ({} attempts; last: {cause})",
                record.attempts
            ));
            record.dead_at_ms = Some(*at_ms);
            (Place::Dead, record)
        }
    }
}

/// What delivery did to one export of a profile.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub profile: Arc<str>,
    pub seq: u64,
    pub change: ExportChange,
}

/// What [`Store::apply_export_changes`] found besides the changes it made.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Exports that were no longer pending (dropped meanwhile by `outbox drop`): passed over.
    pub missing: Vec<u64>,
    /// Older exports of a delivered one's profile, put back by `outbox retry` while it was in
    /// flight: moved back to the dead letters, never to be sent (see [`super::superseded`]).
    pub withdrawn: Vec<(Arc<str>, u64)>,
}

impl Store {
    /// From now on, [`Store::apply_export_changes`] panics.
    #[cfg(test)]
    pub(crate) fn panic_when_settling(&self) {
        self.settling_panics
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Applies the changes in order, in one transaction; a delivery also marks its profile's
    /// older dead letters as superseded ([`super::superseded`]). Not flushed.
    pub fn apply_export_changes(&self, changes: &[Outcome]) -> Result<Applied, StoreError> {
        #[cfg(test)]
        if self
            .settling_panics
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            panic!("a fault injected into settling");
        }
        let (older, applied, found) = self.with(|t| {
            let older = self.dead_letters.older_than(
                t,
                changes
                    .iter()
                    .filter(|o| matches!(o.change, ExportChange::Delivered { .. }))
                    .map(|o| (&o.profile, o.seq)),
            )?;
            let (applied, found) = (&t.outbox, &t.dead, &t.meta, &t.retry_at, &t.superseded)
                .transaction(|(outbox, dead, meta_tx, retry_at, superseded)| {
                    let mut tally = read_tally(meta_tx)?;
                    let mut applied = Applied::default();
                    for Outcome { seq, change, .. } in changes {
                        let key = keys::seq_key(*seq);
                        let Some(old) = outbox.remove(&key)? else {
                            applied.missing.push(*seq);
                            continue;
                        };
                        match change {
                            ExportChange::Failed {
                                retry_at_uptime_ms,
                                unanswered,
                                ..
                            } => {
                                // Once unanswered, the export may have been acknowledged,
                                // whatever later attempts got.
                                let unanswered = *unanswered || marked_unanswered(retry_at, key)?;
                                let entry = RetryEntry {
                                    at_uptime_ms: retry_at_uptime_ms.unwrap_or(0),
                                    unanswered,
                                };
                                if retry_at_uptime_ms.is_some() || unanswered {
                                    retry_at.insert(&key, entry.encode())?;
                                } else {
                                    retry_at.remove(&key)?;
                                }
                            }
                            ExportChange::Delivered { retried: false } => {}
                            ExportChange::Delivered { retried: true } => {
                                retry_at.remove(&key)?;
                            }
                            // A dead letter that may have been acknowledged keeps the mark,
                            // so that its profile's older ones wait for it (`unrecorded`).
                            ExportChange::Rejected { .. } | ExportChange::Expired { .. } => {
                                if *seq < self.unrecorded_below()
                                    || marked_unanswered(retry_at, key)?
                                {
                                    let entry = RetryEntry {
                                        at_uptime_ms: 0,
                                        unanswered: true,
                                    };
                                    retry_at.insert(&key, entry.encode())?;
                                } else {
                                    retry_at.remove(&key)?;
                                }
                            }
                        }
                        tally.count(Place::Pending, old.len(), -1);
                        if matches!(change, ExportChange::Delivered { .. }) {
                            continue; // gone: no need to read it
                        }
                        let (place, record) = match codec::decode_export(&old) {
                            Ok(record) => changed_record(record, change),
                            // Damaged since delivery read it: a dead letter, never sent again.
                            Err(e) => (
                                Place::Dead,
                                super::unreadable_record(
                                    &old,
                                    &format!("export {seq}: {e}"),
                                    now_ms(),
                                ),
                            ),
                        };
                        let target = match place {
                            Place::Pending => outbox,
                            Place::Dead => dead,
                            Place::Gone => continue,
                        };
                        let value = codec::encode_export(&record);
                        tally.count(place, value.len(), 1);
                        target.insert(&key, value)?;
                    }
                    let views = superseded::Views {
                        outbox,
                        dead,
                        retry_at,
                        superseded,
                    };
                    let found = self.mark_superseded(&views, &mut tally, &older)?;
                    for (candidate, what) in older.iter().zip(&found) {
                        if *what == superseded::Found::Withdrawn {
                            applied
                                .withdrawn
                                .push((Arc::clone(&candidate.profile), candidate.seq));
                        }
                    }
                    write_tally(meta_tx, tally)?;
                    Ok((applied, found))
                })?;
            Ok((older, applied, found))
        })?;
        // An answered failure recorded now may be older than an unanswered attempt heard of
        // since, whose change is still to come.
        self.forget_unanswered(
            changes
                .iter()
                .filter(|o| {
                    !matches!(
                        o.change,
                        ExportChange::Failed {
                            unanswered: false,
                            ..
                        }
                    )
                })
                .map(|o| o.seq),
        );
        self.forget_superseded(older, &found);
        for Outcome {
            profile,
            seq,
            change,
        } in changes
        {
            let died = matches!(
                change,
                ExportChange::Rejected { .. } | ExportChange::Expired { .. }
            );
            if died && !applied.missing.contains(seq) {
                self.dead_letters.add(profile, *seq);
            }
        }
        Ok(applied)
    }
}

/// A `retry_at` value: the run time (ms, u64 BE) before which the export is not sent again,
/// then the byte [`RetryEntry::UNANSWERED`] if an attempt of it got no answer (older builds
/// wrote the time alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RetryEntry {
    pub at_uptime_ms: u64,
    pub unanswered: bool,
}

impl RetryEntry {
    const UNANSWERED: u8 = 1;

    fn encode(self) -> Vec<u8> {
        let mut value = self.at_uptime_ms.to_be_bytes().to_vec();
        if self.unanswered {
            value.push(Self::UNANSWERED);
        }
        value
    }

    /// Whether stored `value` carries the mark that the export may have been acknowledged.
    pub fn is_marked(value: &[u8]) -> bool {
        Self::decode(value).is_some_and(|e| e.unanswered)
    }

    /// `None` for a value written by nobody (another size or flag).
    pub fn decode(value: &[u8]) -> Option<RetryEntry> {
        let (time, flag) = value.split_first_chunk::<8>()?;
        let unanswered = match flag {
            [] => false,
            [Self::UNANSWERED] => true,
            _ => return None,
        };
        Some(RetryEntry {
            at_uptime_ms: u64::from_be_bytes(*time),
            unanswered,
        })
    }
}

/// Whether export `key`'s retry entry carries the mark, inside a transaction.
fn marked_unanswered(
    retry_at: &sled::transaction::TransactionalTree,
    key: [u8; keys::SEQ_KEY_LEN],
) -> sled::transaction::ConflictableTransactionResult<bool, StoreError> {
    Ok(retry_at
        .get(key)?
        .is_some_and(|v| RetryEntry::is_marked(&v)))
}

/// Whether export `seq`'s retry entry carries the mark that it may have been acknowledged.
pub(super) fn is_marked(t: &Trees, seq: u64) -> sled::Result<bool> {
    Ok(t.retry_at
        .get(keys::seq_key(seq))?
        .is_some_and(|v| RetryEntry::is_marked(&v)))
}

/// When pending export `seq` may be sent again (run time, ms), if an attempt of it failed.
pub(super) fn retry_time(t: &Trees, seq: u64) -> sled::Result<Option<u64>> {
    Ok(t.retry_at
        .get(keys::seq_key(seq))?
        .and_then(|v| RetryEntry::decode(&v))
        .map(|e| e.at_uptime_ms))
}

impl Store {
    /// How long pending export `seq` waits for its retry time, in agent run time, if an
    /// attempt of it failed (zero once the time has come).
    pub fn retry_wait(&self, seq: u64) -> Result<Option<Duration>, StoreError> {
        let now_ms = self.run_clock().uptime_ms();
        let at = self.with(|t| Ok(retry_time(t, seq)?))?;
        // Run time 0: an entry that keeps only the mark of an unanswered attempt.
        Ok(at
            .filter(|&at_ms| at_ms > 0)
            .map(|at_ms| Duration::from_millis(at_ms.saturating_sub(now_ms))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_export_waits_for_its_retry_time_in_run_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let seqs = super::super::testing::export_each(
            &store,
            &[("p", "v1"), ("q", "v1"), ("r", "v1"), ("s", "v1")],
        );
        let now_ms = store.run_clock().uptime_ms();
        let fail = |seq: u64, retry_at_uptime_ms: Option<u64>, unanswered: bool| Outcome {
            profile: Arc::from("x"),
            seq,
            change: ExportChange::Failed {
                error: "HTTP 503: busy".into(),
                at_ms: 1,
                retry_at_uptime_ms,
                unanswered,
            },
        };
        store
            .apply_export_changes(&[
                fail(seqs[0], Some(now_ms + 60_000), false),
                fail(seqs[1], Some(1), false),
                fail(seqs[2], None, true),
            ])
            .unwrap();
        let wait = store.retry_wait(seqs[0]).unwrap().unwrap();
        assert!(
            wait > Duration::from_secs(59) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        assert_eq!(store.retry_wait(seqs[1]).unwrap(), Some(Duration::ZERO));
        // An unanswered attempt's mark alone, and an export never tried: no retry time.
        assert_eq!(store.retry_wait(seqs[2]).unwrap(), None);
        assert_eq!(store.retry_wait(seqs[3]).unwrap(), None);
    }

    fn record() -> ExportRecord {
        ExportRecord {
            profile_id: "p".into(),
            reason: 0,
            payload: "{}".into(),
            created_at_ms: 1,
            queued_at_ms: 1,
            queued_at_uptime_ms: 1,
            attempts: 2,
            last_error: Some("HTTP 500: down".into()),
            last_attempt_at_ms: Some(5),
            dead_at_ms: None,
        }
    }

    #[test]
    fn each_change_moves_and_rewrites_the_record() {
        let failed = ExportChange::Failed {
            error: "HTTP 503: busy".into(),
            at_ms: 9,
            retry_at_uptime_ms: Some(7),
            unanswered: false,
        };
        let (place, r) = changed_record(record(), &failed);
        assert_eq!(place, Place::Pending);
        assert_eq!(
            (
                r.attempts,
                r.last_error.as_deref(),
                r.last_attempt_at_ms,
                r.dead_at_ms
            ),
            (3, Some("HTTP 503: busy"), Some(9), None)
        );

        let rejected = ExportChange::Rejected {
            error: "HTTP 400: bad".into(),
            at_ms: 9,
        };
        let (place, r) = changed_record(record(), &rejected);
        assert_eq!(place, Place::Dead);
        assert_eq!((r.attempts, r.dead_at_ms), (3, Some(9)));

        let expired = ExportChange::Expired {
            max_age_s: 60,
            at_ms: 9,
        };
        let (place, r) = changed_record(record(), &expired);
        assert_eq!(place, Place::Dead);
        assert_eq!(
            r.last_error.as_deref(),
            Some("undelivered after max_age_s 60 (2 attempts; last: HTTP 500: down)")
        );
        assert_eq!(r.attempts, 2, "expiry is not an attempt");

        assert_eq!(
            changed_record(record(), &ExportChange::Delivered { retried: false }).0,
            Place::Gone
        );
    }

    #[test]
    fn retry_entries_read_as_written_and_as_older_builds_wrote_them() {
        for (at_uptime_ms, unanswered) in [(0, false), (7, true), (u64::MAX, false)] {
            let entry = RetryEntry {
                at_uptime_ms,
                unanswered,
            };
            assert_eq!(RetryEntry::decode(&entry.encode()), Some(entry));
        }
        let older_build = 9u64.to_be_bytes();
        assert_eq!(
            RetryEntry::decode(&older_build),
            Some(RetryEntry {
                at_uptime_ms: 9,
                unanswered: false
            })
        );
        for unknown in [&[0u8; 7][..], &[0; 10], &[0, 0, 0, 0, 0, 0, 0, 9, 2]] {
            assert_eq!(RetryEntry::decode(unknown), None, "{unknown:?}");
        }
    }

    #[test]
    fn only_failed_attempts_do_not_settle() {
        assert!(ExportChange::Delivered { retried: true }.settles());
        assert!(!ExportChange::Failed {
            error: String::new(),
            at_ms: 0,
            retry_at_uptime_ms: None,
            unanswered: true,
        }
        .settles());
        assert!(ExportChange::Rejected {
            error: String::new(),
            at_ms: 0
        }
        .settles());
    }
}
