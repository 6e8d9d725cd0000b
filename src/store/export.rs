//! Exports: their ids, how new ones are numbered and appended to the outbox, and how the
//! outbox is read: in order from a cursor for delivery, by id or listed for people, and changed
//! one at a time by the CLI (`outbox retry|drop`).
//!
//! `outbox` and `dead`: key = the sequence number, big-endian u64 (so key order is number
//! order); value = an [`ExportRecord`] (`codec`: format byte + bincode). An export keeps its
//! number, and so its id `<store id>-<sequence>`, for life, also in `dead` and back.
//! `meta/next_seq` (big-endian u64) is the number the next export gets; it only grows, and
//! a process about to make exports raises it to at least [`sequence_floor`] of the wall clock
//! ([`Store::number_exports_past_the_clock`]).

use std::sync::atomic::{AtomicU32, Ordering};

use chrono::{TimeZone, Utc};
use serde_json::Value;
use sled::transaction::TransactionalTree;
use sled::Transactional;

use super::codec::{self, ExportRecord};
use super::error::{abort, StoreError, TxResult};
use super::keys::{self, meta};
use super::tally::{read_tally, read_u64, write_tally, write_u64, Place};
use super::unreadable::{unreadable_record, UNREADABLE};
use super::Store;
use crate::profile::Reason;

/// The id of an export, as sent in `Idempotency-Key`: `<store id>-<sequence>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExportId {
    pub store: u32,
    pub seq: u64,
}

impl std::fmt::Display for ExportId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:08x}-{}", self.store, self.seq)
    }
}

impl std::str::FromStr for ExportId {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{text}` is not an export id (like 3fa2c1d0-42)");
        let (store, seq) = text.split_once('-').ok_or_else(bad)?;
        let id = ExportId {
            store: u32::from_str_radix(store, 16).map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        };
        // Only as the id is shown and sent (`Idempotency-Key`): the integer parsers also take
        // a `+`, leading zeros and capitals, which would name the export by another key.
        match id.to_string() == text {
            true => Ok(id),
            false => Err(bad()),
        }
    }
}

/// An export as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub id: ExportId,
    pub dead: bool,
    pub record: ExportRecord,
    /// For delivery ([`Store::read_pending`]): the run time (ms) before which it is not sent
    /// again, its last attempt having failed. `None` elsewhere.
    pub retry_at_uptime_ms: Option<u64>,
}

impl Export {
    /// The object `outbox list --json` and `outbox show --json` print.
    pub fn to_json(&self) -> Value {
        let r = &self.record;
        let payload: Value =
            serde_json::from_str(&r.payload).unwrap_or(Value::String(r.payload.clone()));
        serde_json::json!({
            "id": self.id.to_string(),
            "profile_id": r.profile_id,
            "reason": r.reason().as_str(),
            "payload": payload,
            "attempts": r.attempts,
            "created_at": format_ms(r.created_at_ms),
            "last_attempt_at": r.last_attempt_at_ms.map(format_ms),
            "last_error": r.last_error,
            "dead": self.dead,
            "dead_at": r.dead_at_ms.map(format_ms),
        })
    }
}

pub fn format_ms(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

/// Which exports `list` returns.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub dead: bool,
    pub profile_id: Option<String>,
    /// 0: all.
    pub limit: usize,
    /// Only exports numbered above this one: where the page before ended.
    pub after: Option<u64>,
}

/// A new pending export, encoded.
pub(super) fn new_export(
    profile_id: &str,
    reason: Reason,
    payload: String,
    created_at_ms: i64,
    queued_at_uptime_ms: u64,
) -> Vec<u8> {
    codec::encode_export(&ExportRecord::new_pending(
        profile_id.to_owned(),
        reason,
        payload,
        created_at_ms,
        queued_at_uptime_ms,
    ))
}

/// Export numbers a process that makes exports starts from at least: 1,024 a millisecond of
/// the wall clock since the Unix epoch. A store gives out far fewer than that (about 100 a
/// millisecond at most), so every number it gave out by a time lies below that time's floor.
/// A store put back from a copy of its files (a backup, a disk snapshot rolled back) and
/// started again therefore numbers its new exports past every export made after the copy,
/// which the endpoint may have seen: their ids are not reused, and a receiver that
/// deduplicates by id does not drop the new ones. Not covered: a wall clock that was ahead
/// when those numbers were given out, or is behind when the copy starts again; a snapshot
/// that holds the running process's memory (it is not started again).
pub(super) fn sequence_floor(now: std::time::SystemTime) -> u64 {
    let ms = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis());
    u64::try_from(ms.saturating_mul(1024)).unwrap_or(u64::MAX / 2)
}

impl Store {
    /// Raises `meta/next_seq` to [`sequence_floor`] of `now`, durably, before this process
    /// makes exports (an agent as it starts, `outpost ingest` before its first chunk); the
    /// number it now starts from. Only before anything else writes exports: it reads and
    /// writes `next_seq` apart, so a commit between the two would be numbered over.
    pub fn number_exports_past_the_clock(
        &self,
        now: std::time::SystemTime,
    ) -> Result<u64, StoreError> {
        let floor = sequence_floor(now);
        // Within a write section, so that no reopen comes between the write and its flush.
        let _section = self.write_section()?;
        let next = self.with(|t| {
            let stored = t
                .meta
                .get(meta::NEXT_SEQ)?
                .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                .map_or(0, u64::from_be_bytes);
            if stored < floor {
                t.meta.insert(meta::NEXT_SEQ, &floor.to_be_bytes())?;
            }
            Ok(stored.max(floor))
        })?;
        self.written_next.fetch_max(next, Ordering::SeqCst);
        self.flush()?;
        Ok(next)
    }
}

/// Appends encoded exports to the outbox under the next sequence numbers, counting them in
/// the tally; returns the next sequence number after them.
pub(super) fn append_exports(
    outbox: &TransactionalTree,
    meta_tx: &TransactionalTree,
    exports: &[Vec<u8>],
) -> TxResult<u64> {
    let mut next_seq = read_u64(meta_tx, meta::NEXT_SEQ)?;
    let mut tally = read_tally(meta_tx)?;
    for value in exports {
        tally.count(Place::Pending, value.len(), 1);
        outbox.insert(&keys::seq_key(next_seq), value.as_slice())?;
        // Only damage brings the number this far (a key or mark near the end of the range,
        // raised past at open): wrapping round would write new exports over pending ones.
        next_seq = next_seq.checked_add(1).ok_or_else(|| {
            abort(StoreError::corrupt(
                "next_seq",
                "export numbers ran out: the store holds a number near 2^64, which only damage makes",
            ))
        })?;
    }
    write_u64(meta_tx, meta::NEXT_SEQ, next_seq)?;
    write_tally(meta_tx, tally)?;
    Ok(next_seq)
}

/// Why [`Store::rewinding_with_nothing_out`] ran nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotQuiet {
    /// Exports were still out when the wait ended.
    StillOut,
    /// The delivery loop stopped with exports whose outcome it did not record (the count it
    /// publishes then is `usize::MAX`): nothing out will ever be reported.
    GaveUp,
}

/// How long a put-back waits for the delivery loop to have nothing out: the longest a request
/// in flight can take, then time for the outcomes to be recorded (a minute with the default
/// 10 s timeout).
pub fn put_back_wait(request_timeout: std::time::Duration) -> std::time::Duration {
    request_timeout + std::time::Duration::from_secs(50)
}

impl Store {
    pub(super) fn decode_export(
        &self,
        key: &[u8],
        value: &[u8],
        dead: bool,
    ) -> Result<Export, StoreError> {
        let seq = keys::seq_from_key(key)
            .ok_or_else(|| StoreError::corrupt("export key", format!("{key:?}")))?;
        let record = codec::decode_export(value)
            .map_err(|e| StoreError::corrupt(format!("export {seq}"), e))?;
        Ok(Export {
            id: self.export_id(seq),
            dead,
            record,
            retry_at_uptime_ms: None,
        })
    }

    /// [`Store::decode_export`] for people reading the outbox (`outbox list`, `show`,
    /// `stats`): an unreadable record under an export key reads as the dead letter
    /// [`unreadable_record`] it becomes (nothing is written here), so one bad record does not
    /// hide the others.
    pub(super) fn decode_export_for_people(
        &self,
        key: &[u8],
        value: &[u8],
        dead: bool,
    ) -> Result<Export, StoreError> {
        match (
            self.decode_export(key, value, dead),
            keys::seq_from_key(key),
        ) {
            (Err(e), Some(seq)) => Ok(Export {
                id: self.export_id(seq),
                dead,
                record: unreadable_record(value, &e.to_string(), 0),
                retry_at_uptime_ms: None,
            }),
            (result, _) => result,
        }
    }

    /// The export with this id, pending or dead.
    pub fn export(&self, id: ExportId) -> Result<Option<Export>, StoreError> {
        if id.store != self.store_id {
            return Ok(None);
        }
        let key = keys::seq_key(id.seq);
        self.with(|t| {
            for (tree, dead) in [(&t.outbox, false), (&t.dead, true)] {
                if let Some(value) = tree.get(key)? {
                    return self.decode_export_for_people(&key, &value, dead).map(Some);
                }
            }
            Ok(None)
        })
    }

    /// Exports oldest first, pending or (with `filter.dead`) dead.
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<Export>, StoreError> {
        let t = self.trees()?;
        let tree = if filter.dead { &t.dead } else { &t.outbox };
        let limit = if filter.limit == 0 {
            usize::MAX
        } else {
            filter.limit
        };
        let mut exports = Vec::new();
        let from = filter.after.map_or(0, |seq| seq.saturating_add(1));
        for item in tree.range(keys::seq_key(from)..) {
            if exports.len() >= limit {
                break;
            }
            let (key, value) = item.map_err(|e| self.classify(e.into(), t.generation))?;
            let Ok(export) = self.decode_export_for_people(&key, &value, filter.dead) else {
                passed_over_damaged_key(&key);
                continue;
            };
            if filter
                .profile_id
                .as_deref()
                .is_none_or(|p| p == export.record.profile_id)
            {
                exports.push(export);
            }
        }
        Ok(exports)
    }

    /// While the store is failed, sled's memory may hold changes that its reopen will forget
    /// (a drop or a put-back whose flush failed): delivery reads nothing until the reopen,
    /// after which it reads the outbox again from its head (see `Store::reopen_trees`).
    fn refuse_reads_while_failed(&self) -> Result<(), StoreError> {
        if self.is_failed() {
            return Err(self.failure());
        }
        Ok(())
    }

    /// Runs `change`, which puts exports back into the outbox under their old sequence numbers
    /// or drops pending ones, while the delivery loop starts nothing (see
    /// [`Store::unless_rewound`]); the loop then reads the outbox again from its head.
    pub fn rewinding<T>(&self, change: impl FnOnce() -> T) -> T {
        let _guard = self.rewind_lock.write().unwrap_or_else(|e| e.into_inner());
        let result = change();
        self.rewound.store(true, Ordering::SeqCst);
        result
    }

    /// [`Store::rewinding`] once the delivery loop has no export out (in flight, or answered
    /// and not yet durable), starting none meanwhile: a dead letter put back while a newer
    /// export of its profile is out could be sent after the endpoint acknowledged that one
    /// (after a crash, before the acknowledgement is durable). Runs nothing if exports are
    /// still out after `wait`, or if the loop stopped with some it will never report on.
    pub fn rewinding_with_nothing_out<T>(
        &self,
        wait: std::time::Duration,
        change: impl FnOnce() -> T,
    ) -> Result<T, NotQuiet> {
        struct Release<'a>(&'a AtomicU32);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.holding_requests.fetch_add(1, Ordering::SeqCst);
        let _release = Release(&self.holding_requests);
        // A start of requests that did not see the hold has ended, and published what is out,
        // once the lock was free.
        drop(self.rewind_lock.write().unwrap_or_else(|e| e.into_inner()));
        let deadline = std::time::Instant::now() + wait;
        loop {
            match self.exports_out.load(Ordering::SeqCst) {
                0 => return Ok(self.rewinding(change)),
                u64::MAX => return Err(NotQuiet::GaveUp),
                _ if std::time::Instant::now() >= deadline => return Err(NotQuiet::StillOut),
                _ => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
    }

    /// Whether a put-back waits for the delivery loop to have nothing out: the loop starts no
    /// request meanwhile. Read in [`Store::unless_rewound`].
    pub fn requests_held(&self) -> bool {
        self.holding_requests.load(Ordering::SeqCst) > 0
    }

    /// The delivery loop says how long a request of its may take, before it starts any.
    pub fn set_request_timeout(&self, timeout: std::time::Duration) {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.request_timeout_ms.store(ms, Ordering::SeqCst);
    }

    /// How long a put-back through a running agent waits for it to have nothing out: see
    /// [`put_back_wait`].
    pub fn put_back_wait(&self) -> std::time::Duration {
        put_back_wait(std::time::Duration::from_millis(
            self.request_timeout_ms.load(Ordering::SeqCst),
        ))
    }

    /// The delivery loop says how many exports it has out, in [`Store::unless_rewound`].
    pub fn set_exports_out(&self, n: usize) {
        let n = if n == usize::MAX { u64::MAX } else { n as u64 };
        self.exports_out.store(n, Ordering::SeqCst);
    }

    /// Runs `start` while no [`Store::rewinding`] can run, telling it whether exports were put
    /// back or dropped since the last call: then whatever the caller holds of the outbox is out
    /// of date, and it must read again from the head before starting anything.
    pub fn unless_rewound<T>(&self, start: impl FnOnce(bool) -> T) -> T {
        let _guard = self.rewind_lock.read().unwrap_or_else(|e| e.into_inner());
        start(self.rewound.swap(false, Ordering::SeqCst))
    }

    /// Up to `limit` durable pending exports from `*cursor` on, oldest first, for a reader that
    /// keeps its place between calls; `*cursor` moves past the last one returned. Stops early
    /// once the records read reach `max_bytes` (stored size; the first is read whatever its
    /// size).
    pub fn read_pending(
        &self,
        cursor: &mut u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Export>, StoreError> {
        self.refuse_reads_while_failed()?;
        let until = self.durable_next_seq();
        if *cursor >= until {
            return Ok(Vec::new());
        }
        let mut exports = Vec::new();
        let mut unreadable = Vec::new();
        let (mut seen, mut bytes, mut stopped) = (0, 0, false);
        let t = self.trees()?;
        // Usually none: then no look-up per export.
        let retry_times = !t.retry_at.is_empty();
        for item in t.outbox.range(keys::seq_key(*cursor)..keys::seq_key(until)) {
            seen += 1;
            let (key, value) = item.map_err(|e| self.classify(e.into(), t.generation))?;
            bytes += value.len();
            stopped = seen >= limit || bytes >= max_bytes;
            match self.decode_export(&key, &value, false) {
                Ok(mut export) => {
                    *cursor = export.id.seq + 1;
                    if retry_times {
                        export.retry_at_uptime_ms = super::outbox::retry_time(&t, export.id.seq)
                            .map_err(|e| self.classify(e.into(), t.generation))?;
                    }
                    exports.push(export);
                }
                Err(e) => match keys::seq_from_key(&key) {
                    Some(seq) => {
                        *cursor = seq + 1;
                        unreadable.push((seq, e.to_string()));
                    }
                    None => passed_over_damaged_key(&key),
                },
            }
            if stopped {
                break; // before the next record is read
            }
        }
        drop(t);
        self.dead_letter_unreadable_read(unreadable)?;
        if !stopped {
            *cursor = until;
        }
        Ok(exports)
    }

    /// The pending exports of these sequence numbers, as [`Store::read_pending`] reads them,
    /// for a reader that let go of them and wants them back one by one, with how many of
    /// `seqs` were looked up: it stops once the records read reach `max_bytes`, as
    /// [`Store::read_pending`] does. One no longer pending is left out; an unreadable one is
    /// dead-lettered, as [`Store::read_pending`] does.
    pub fn read_pending_by_seq(
        &self,
        seqs: &[u64],
        max_bytes: usize,
    ) -> Result<(Vec<Export>, usize), StoreError> {
        self.refuse_reads_while_failed()?;
        let mut exports = Vec::with_capacity(seqs.len());
        let mut unreadable = Vec::new();
        let (mut looked_up, mut bytes) = (0, 0);
        let t = self.trees()?;
        for &seq in seqs {
            if bytes >= max_bytes {
                break;
            }
            looked_up += 1;
            let key = keys::seq_key(seq);
            let value = t
                .outbox
                .get(key)
                .map_err(|e| self.classify(e.into(), t.generation))?;
            let Some(value) = value else { continue };
            bytes += value.len();
            match self.decode_export(&key, &value, false) {
                Ok(mut export) => {
                    export.retry_at_uptime_ms = super::outbox::retry_time(&t, seq)
                        .map_err(|e| self.classify(e.into(), t.generation))?;
                    exports.push(export);
                }
                Err(e) => unreadable.push((seq, e.to_string())),
            }
        }
        drop(t);
        self.dead_letter_unreadable_read(unreadable)?;
        Ok((exports, looked_up))
    }

    /// Dead-letters the exports a read found unreadable, `(sequence, error)`, saying so.
    fn dead_letter_unreadable_read(
        &self,
        unreadable: Vec<(u64, String)>,
    ) -> Result<(), StoreError> {
        for (seq, error) in unreadable {
            tracing::warn!(
                export = %self.export_id(seq),
                "{error}; it goes to the dead letters as \"{UNREADABLE}\""
            );
            self.dead_letter_unreadable(seq, &error)?;
        }
        Ok(())
    }

    /// Moves or rewrites one export in one transaction, keeping the tally exact.
    /// `change` gets the record where it is now and returns where it goes and how it reads
    /// there; it may run more than once, so it must be pure. Returns false if no such export
    /// is `from` where it was looked for. An export that goes ([`Place::Gone`]) takes its
    /// retry entry and its `superseded` mark with it; other moves leave both as they are.
    pub fn change_export(
        &self,
        seq: u64,
        from: Place,
        change: impl Fn(ExportRecord) -> (Place, ExportRecord),
    ) -> Result<bool, StoreError> {
        self.rewrite_export(seq, from, |old| {
            let record = codec::decode_export(old)
                .map_err(|e| StoreError::corrupt(format!("export {seq}"), e))?;
            let (to, record) = change(record);
            Ok((to, (to != Place::Gone).then_some(record)))
        })
    }

    /// Removes one export as [`Store::change_export`] does, without reading its record: one
    /// that cannot be decoded goes too (`outbox drop` of an unreadable export).
    pub fn remove_export(&self, seq: u64, from: Place) -> Result<bool, StoreError> {
        self.rewrite_export(seq, from, |_| Ok((Place::Gone, None)))
    }

    /// [`Store::change_export`] on the stored bytes: `change` says where the export goes and,
    /// unless gone, its record there.
    fn rewrite_export(
        &self,
        seq: u64,
        from: Place,
        change: impl Fn(&[u8]) -> Result<(Place, Option<ExportRecord>), StoreError>,
    ) -> Result<bool, StoreError> {
        let key = keys::seq_key(seq);
        self.with(|t| {
            Ok(
                (&t.outbox, &t.dead, &t.meta, &t.retry_at, &t.superseded).transaction(
                    |(outbox, dead, meta_tx, retry_at, superseded)| {
                        let source = match from {
                            Place::Pending => outbox,
                            Place::Dead => dead,
                            Place::Gone => return Ok(false),
                        };
                        let Some(old) = source.remove(&key)? else {
                            return Ok(false);
                        };
                        let (to, record) = change(&old).map_err(abort)?;
                        let mut tally = read_tally(meta_tx)?;
                        tally.count(from, old.len(), -1);
                        let target = match (to, &record) {
                            (Place::Pending, Some(record)) => Some((outbox, record)),
                            (Place::Dead, Some(record)) => Some((dead, record)),
                            _ => None,
                        };
                        if let Some((target, record)) = target {
                            let value = codec::encode_export(record);
                            tally.count(to, value.len(), 1);
                            target.insert(&key, value)?;
                        }
                        if to == Place::Gone {
                            // Its retry time, and its mark if it was superseded, serve nothing
                            // once it is gone.
                            retry_at.remove(&key)?;
                            superseded.remove(&key)?;
                        }
                        write_tally(meta_tx, tally)?;
                        Ok(true)
                    },
                )?,
            )
        })
    }

    /// Whether export `seq` is pending (in the outbox).
    pub fn is_pending(&self, seq: u64) -> Result<bool, StoreError> {
        self.with(|t| Ok(t.outbox.contains_key(keys::seq_key(seq))?))
    }

    /// Sequence numbers of the oldest `at_most` dead letters after `after` (from the first
    /// with `None`), oldest first.
    pub fn dead_seqs(&self, after: Option<u64>, at_most: usize) -> Result<Vec<u64>, StoreError> {
        let t = self.trees()?;
        let from = match after {
            None => 0,
            Some(u64::MAX) => return Ok(Vec::new()),
            Some(seq) => seq + 1,
        };
        let mut seqs = Vec::new();
        for key in t.dead.range(keys::seq_key(from)..).keys() {
            if seqs.len() >= at_most {
                break;
            }
            let key = key.map_err(|e| self.classify(e.into(), t.generation))?;
            match keys::seq_from_key(&key) {
                Some(seq) => seqs.push(seq),
                None => passed_over_damaged_key(&key),
            }
        }
        Ok(seqs)
    }
}

/// A key of `outbox` or `dead` that is no export number (damage) holds no export a command
/// can name: delivery, listings and `--all-dead` pass over it rather than fail for it.
/// `outpost check --store` lists it and `outpost repair` deletes it.
fn passed_over_damaged_key(key: &[u8]) {
    tracing::warn!(
        key = ?key,
        "an outbox or dead-letter key that is not a sequence number is passed over; `outpost check --store` lists it, `outpost repair` deletes it"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_floor_gives_1024_numbers_a_millisecond_of_the_wall_clock() {
        use std::time::{Duration, UNIX_EPOCH};
        for (since_epoch, floor) in [
            (Duration::ZERO, 0),
            (Duration::from_millis(1), 1_024),
            (Duration::from_micros(1_999), 1_024),
            (Duration::from_secs(1), 1_024_000),
            // 2026-12-05T00:00:00Z
            (Duration::from_secs(1_796_428_800), 1_839_543_091_200_000),
        ] {
            assert_eq!(
                sequence_floor(UNIX_EPOCH + since_epoch),
                floor,
                "{since_epoch:?}"
            );
        }
        // A clock before the epoch gives no floor.
        assert_eq!(sequence_floor(UNIX_EPOCH - Duration::from_secs(1)), 0);
    }

    #[test]
    fn an_export_id_is_read_only_as_it_is_shown() {
        let id = ExportId {
            store: 0xcfd8_b88b,
            seq: 1839,
        };
        assert_eq!("cfd8b88b-1839".parse::<ExportId>(), Ok(id));
        assert_eq!(
            "0000000a-0".parse::<ExportId>(),
            Ok(ExportId { store: 10, seq: 0 })
        );
        for text in [
            "CFD8B88B-1839",
            "cfd8b88b-+1839",
            "+fd8b88b-1839",
            "cfd8b88b-01839",
            "fd8b88b-1839",
            "0cfd8b88b-1839",
            "cfd8b88b-1839 ",
            "cfd8b88b--1839",
            "cfd8b88b-",
            "cfd8b88b",
            "",
        ] {
            assert_eq!(
                text.parse::<ExportId>(),
                Err(format!("`{text}` is not an export id (like 3fa2c1d0-42)")),
                "{text}"
            );
        }
    }

    #[test]
    fn numbering_past_the_clock_raises_the_next_number_and_never_lowers_it() {
        use std::time::{Duration, UNIX_EPOCH};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let second = UNIX_EPOCH + Duration::from_secs(1);
        assert_eq!(
            store.number_exports_past_the_clock(second).unwrap(),
            1_024_000
        );
        assert_eq!(store.durable_next_seq(), 1_024_000);
        // A clock set back keeps the number it reached.
        assert_eq!(
            store.number_exports_past_the_clock(UNIX_EPOCH).unwrap(),
            1_024_000
        );
        drop(store);
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(store.durable_next_seq(), 1_024_000, "durable");
    }

    /// Only damage brings the next number to the end of the range: the commit that would run
    /// past it is refused whole, rather than number new exports from 0 over pending ones.
    #[test]
    fn export_numbers_that_run_out_refuse_the_commit_rather_than_wrap_round() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let first = super::super::testing::export_each(&store, &[("a", "1")]);
        store
            .with(|t| Ok(t.meta.insert(meta::NEXT_SEQ, &u64::MAX.to_be_bytes())?))
            .unwrap();
        let mapping = crate::config::Mapping::new(&["name"], &["s"], &[]);
        let line = r#"{"id":"b","profile":{"name":"2","segmentMembership":{"ups":{"s":{"status":"realized"}}}}}"#;
        let updates = crate::profile::update::parse_body(line.as_bytes()).unwrap();
        let refused = store.apply_groups(&[&updates], &mapping, Utc::now());
        assert!(
            matches!(&refused, Err(StoreError::Corrupt { what, .. }) if what == "next_seq"),
            "{refused:?}"
        );
        let listed: Vec<u64> = store
            .list(&super::super::ListFilter::default())
            .unwrap()
            .iter()
            .map(|e| e.id.seq)
            .collect();
        assert_eq!(listed, first, "nothing written");
        assert_eq!(store.tally().unwrap().pending, 1);
    }

    #[test]
    fn a_put_back_waits_for_nothing_out_and_lets_requests_go_after() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(
            store.rewinding_with_nothing_out(std::time::Duration::ZERO, || 7),
            Ok(7),
            "nothing out: at once"
        );
        store.set_exports_out(1);
        let started = std::time::Instant::now();
        let wait = std::time::Duration::from_millis(50);
        assert_eq!(
            store.rewinding_with_nothing_out(wait, || 7),
            Err(NotQuiet::StillOut)
        );
        assert!(started.elapsed() >= wait);
        assert!(!store.requests_held(), "released after giving up");
        std::thread::scope(|scope| {
            let waiting = scope.spawn(|| {
                store.rewinding_with_nothing_out(std::time::Duration::from_secs(10), || 8)
            });
            while !store.requests_held() {
                std::thread::yield_now();
            }
            store.set_exports_out(0);
            assert_eq!(waiting.join().unwrap(), Ok(8));
        });
        assert!(!store.requests_held());
        store.set_exports_out(usize::MAX);
        let started = std::time::Instant::now();
        assert_eq!(
            store.rewinding_with_nothing_out(std::time::Duration::from_secs(10), || 9),
            Err(NotQuiet::GaveUp),
            "a loop that gave up reports nothing more: not waited for"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        store.set_exports_out(0);
        store.set_request_timeout(std::time::Duration::from_secs(100));
        assert_eq!(
            store.put_back_wait(),
            std::time::Duration::from_secs(150),
            "the longest request, then time to record its outcome"
        );
        assert!(
            store.unless_rewound(|rewound| rewound),
            "the loop reads the outbox again"
        );
    }
}
