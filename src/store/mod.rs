//! The sled store: typed access to its trees. One concept a file:
//!
//! | part | file | trees and keys (key → value) |
//! |---|---|---|
//! | opening, format, reopening after an I/O error, flush | `open.rs` | `meta/format` → layout version (u64 BE); `meta/store_id` → u32 BE |
//! | moving the profiles of older stores (formats 1 to 3, one to a key) into groups | `upgrade.rs` | `profiles`: profile id (UTF-8) → a profile value; `meta/upgrade` → format byte, present while under way |
//! | rebuilding a store into a fresh database after an upgrade, swapped in inside its folder | `rebuild.rs` | `meta/rebuild` → empty, present while wanted; files `rebuild/`, `rebuild.swap`, `outpost.lock` |
//! | disk space kept for delivery, given up on a full disk | `reserve.rs` | file `reserve`: missing (none made), empty (given up: updates refused), or allocated |
//! | profile groups: the stored profiles, a few to a key | `groups.rs` | `profile_groups`: group (u32 BE) → format byte + bincode of `[(profile id, profile value)]` |
//! | profiles and applying updates | `profiles.rs` | a profile value: format byte + bincode of a [`crate::profile::record::ProfileRecord`] (format 1: [`codec::ProfileJson`]); `meta/profiles` → how many (u64 BE) |
//! | exports: numbering, appending, reading in order, listing | `export.rs` | `outbox`, `dead`: sequence (u64 BE) → [`codec::ExportRecord`]; `meta/next_seq` → u64 BE |
//! | what delivery does to exports, in groups | `outbox.rs` | `outbox`, `dead`; `retry_at`: sequence (u64 BE) → run time (ms, u64 BE) before which a failed export is not sent again, then byte 1 if it may have been acknowledged unrecorded (`unrecorded.rs`) |
//! | dead letters overtaken by a newer export of their profile | `superseded.rs` | `superseded`: sequence (u64 BE) → sequence of the acknowledged newer export |
//! | index entries that outlived their export, looked over beside the agent's work | `stale.rs` | `retry_at`, `superseded` |
//! | counts and bytes of the outbox, stats | `tally.rs` | `meta/tally` → pending, dead, bytes (3 × u64 BE) |
//! | a command run as root on another user's store acts as that user; `run` hands its files back | `owner.rs` | |
//! | who besides root may change what the store's path names | `path_control.rs` | |
//! | unreadable records, the self-check | `unreadable.rs` | any tree |
//! | the mapping last run with | `mapping.rs` | `meta/mapping` → format byte + JSON |
//! | backfill of newly mapped segments | `backfill.rs` | `meta/backfill` → format byte + JSON; `backfill_exported`: group key ++ profile id → export number (u64 BE) |
//! | stream positions, rejected messages | `source.rs` | `positions`, `rejected` |
//! | moving stream partitions to another store, and the file that carries them | `handover.rs`, `handover_file.rs` | `positions`: a moved partition's mark ([`source`]) |
//! | the run-time clock | `crate::clock` | `meta/clock` → [`codec`] clock record |
//! | delivery paused by `outpost delivery pause` | `pause.rs` | `meta/delivery_paused` → when (wall clock, ms since the epoch, i64 BE), present only while paused |
//! | value encodings (format byte + bincode), key encodings | `codec.rs`, `keys.rs` | |
//! | the one writer (group commit) | `committer.rs` | |
//!
//! Invariants:
//! - a profile version and the export it caused are written in one transaction, so the store
//!   never holds one without the other;
//! - profiles are changed by one writer at a time (`profile_writer`): a group read for a
//!   change is written back before anyone else reads it for another;
//! - export sequence numbers only grow; an export keeps its number (and so its id) for life,
//!   also when it moves to `dead` and back;
//! - `meta/tally` counts the entries of `outbox` and `dead` and the bytes of their values,
//!   kept in the same transactions that change those trees (sled can only count by walking);
//!   `meta/profiles` counts the profiles the same way (`outpost repair` counts them again, as
//!   an unreadable group's profiles cannot be counted);
//! - nothing is acknowledged before [`Store::flush`] has returned; the committer and the
//!   settler write and flush inside a [`Store::write_section`], which a compaction waits for
//!   before closing the store, so a writer refused because of a compaction wrote nothing;
//! - one process has the store open (`outpost.lock`, and sled's own lock on `db`); a rebuild
//!   replaces the store's files only once its copy is whole and synced ([`rebuild`]);
//! - after an I/O error (a full disk) sled fails every write until the store is reopened:
//!   the sled handles sit behind a swappable `Trees`, which [`Store::recover`] replaces once
//!   there is room, so holders of `Arc<Store>` keep working; the sequence watermarks are
//!   re-read from the reopened store, the run clock carries on;
//! - a record that cannot be decoded stops nothing: exports become dead letters
//!   ([`unreadable_record`]), profiles refuse their updates until `outpost repair`, derived
//!   `meta` values are rebuilt at open;
//! - every export carries the store's run time when it was queued (`queued_at_uptime_ms`), and
//!   `meta/clock` the run time at the last checkpoint ([`crate::clock`]);
//! - exports below [`Store::durable_next_seq`] are durable; delivery reads only those;
//! - `retry_at` holds an entry only for a pending export whose last attempt failed with a
//!   retry time, or one that may have been acknowledged unrecorded, pending or a dead letter
//!   ([`unrecorded`]), written and removed in the transactions that record what delivery did
//!   (and drop an export); one left by a dead letter without the mark (an unreadable record)
//!   or by an older build is removed once the agent has started (`stale.rs`);
//! - `superseded` marks a dead letter once the endpoint has acknowledged a newer export of its
//!   profile, in the transaction that records that delivery; a marked dead letter is never put
//!   back; a drop of a dead letter removes its mark, and a mark left without its dead letter
//!   (by an older build) is removed once the agent has started.

pub mod backfill;
mod blobs;
pub mod codec;
pub mod committer;
mod error;
mod export;
pub mod groups;
pub mod handover;
pub mod handover_file;
pub mod keys;
pub mod mapping;
mod open;
pub mod outbox;
mod owner;
mod path_control;
mod pause;
mod profiles;
mod rebuild;
pub mod reserve;
pub mod source;
mod stale;
mod superseded;
mod tally;
#[cfg(test)]
pub(crate) mod testing;
mod unreadable;
mod unrecorded;
mod upgrade;

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64};
use std::sync::{Arc, RwLock};

use crate::clock::{ClockRecord, RunClock};
use keys::meta;

use error::names_nothing;
pub use error::{is_no_space, says_reopening, StoreError};
pub use export::{format_ms, put_back_wait, Export, ExportId, ListFilter, NotQuiet};
pub use open::{readable_by_others_warning, FORMAT_VERSION, SPACE_PROBE_BYTES};
pub use owner::{act_as_owner, OwnerError, StoreOwner, StoreUse};
pub use pause::{Pausing, Resuming};
pub use profiles::BatchSummary;
pub use rebuild::{free_bytes, Compacted};
pub use reserve::ReserveState;
pub use superseded::PutBack;
pub use tally::{ClockJumpReport, OutboxFull, OutboxStats, Place, Tally};
pub use unreadable::{unreadable_record, UnreadableRecord, UNREADABLE};
pub use unrecorded::MaybeAcknowledged;

/// The sled handles of an open store. They are replaced as a whole when the store is reopened
/// after an I/O error ([`Store::recover`]); holders of `Arc<Store>` keep working.
pub(crate) struct Trees {
    db: sled::Db,
    /// The stored profiles, a few to a key ([`groups`]).
    pub(crate) profile_groups: sled::Tree,
    /// Profiles one to a key, as stores before format 4 hold them: moved into their groups
    /// when the store is opened ([`upgrade`]), empty after but for those whose group could
    /// not be read.
    pub(crate) legacy_profiles: sled::Tree,
    /// Whether `legacy_profiles` held anything once the upgrade at open was done: reads then
    /// look there for a profile missing from its group. Profiles stay there while an upgrade
    /// is unfinished, and after it those whose group could not be read (`outpost repair`
    /// moves them in when it forgets the group).
    pub(crate) has_legacy_profiles: bool,
    /// The upgrade stopped on an I/O error; the next open goes on with it.
    pub(crate) upgrade_unfinished: bool,
    pub(crate) outbox: sled::Tree,
    pub(crate) dead: sled::Tree,
    /// When failed pending exports may be sent again, on the run-time clock (see
    /// [`outbox`]): a restart keeps a `Retry-After`.
    pub(crate) retry_at: sled::Tree,
    /// Dead letters a newer export of their profile overtook ([`superseded`]).
    pub(crate) superseded: sled::Tree,
    /// Profiles exported while a backfill job had yet to scan them ([`backfill`]).
    pub(crate) backfill_exported: sled::Tree,
    pub(crate) meta: sled::Tree,
    /// Stream positions and rejected stream messages (see [`source`]).
    pub(crate) positions: sled::Tree,
    pub(crate) rejected: sled::Tree,
    /// The log file, fsynced after each flush: sled's own flush does not reach the drive.
    log_file: File,
    /// sled's blob files, which its flush does not sync either.
    blobs: blobs::BlobSync,
    /// Which opening of the store these handles come from: an error from the handles of an
    /// earlier opening (a call that began before a reopen) does not fail the current one.
    generation: u64,
}

impl Trees {
    /// sled's flush, then an fsync of its blob files not synced yet and of its log file:
    /// sled's own flush does not reach the drive. The blobs go first, as the log points at
    /// them.
    fn flush_to_drive(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        self.sync_files()
    }

    fn sync_files(&self) -> Result<(), StoreError> {
        self.blobs.sync_new().map_err(StoreError::Sync)?;
        self.log_file.sync_data().map_err(StoreError::Sync)
    }
}

pub struct Store {
    path: PathBuf,
    cache_bytes: u64,
    /// `None` while the store is being reopened.
    trees: RwLock<Option<Arc<Trees>>>,
    /// sled reported an I/O error: every later write fails until the store is reopened.
    failed: AtomicBool,
    /// The failure was a full disk.
    failed_no_space: AtomicBool,
    /// The disk space kept for delivery on a full disk ([`reserve`]).
    reserve: reserve::Reserve,
    /// The [`Trees::generation`] in use.
    generation: AtomicU64,
    store_id: u32,
    /// Written while exports are put back under their old (lower) sequence numbers or dropped,
    /// read while the delivery loop starts requests; `rewound` then makes the loop read the
    /// outbox again from its head (see [`Store::unless_rewound`]).
    rewind_lock: RwLock<()>,
    rewound: AtomicBool,
    /// Put-backs waiting for the delivery loop to have nothing out, and what it has out (see
    /// [`Store::rewinding_with_nothing_out`]).
    holding_requests: AtomicU32,
    exports_out: AtomicU64,
    /// The delivery loop's request timeout, which bounds how long it has an export in flight.
    request_timeout_ms: AtomicU64,
    /// `source.nats.max_rejected` (see `store::source`); no limit until set.
    max_rejected: AtomicU64,
    /// Pending exports below this sequence may have been acknowledged unrecorded, as the store
    /// was found at open, or at a reopen after an I/O error ([`unrecorded`]); it only grows.
    unrecorded_below: AtomicU64,
    /// Pending exports whose last attempt got no answer, from the delivery loop's hearing of
    /// it until the store records it in `retry_at` ([`unrecorded`]).
    unanswered: std::sync::Mutex<std::collections::HashSet<u64>>,
    /// The store's run time as this process counts it, from the last checkpoint on.
    run_clock: RunClock,
    /// `next_seq` as the last committed transaction left it, and as the last completed flush
    /// made durable: exports below `durable_next` survive any crash, so delivery reads only
    /// those (an export is never sent before the update that caused it is acknowledged).
    written_next: AtomicU64,
    durable_next: AtomicU64,
    /// Unreadable `meta` values rebuilt when the store was opened (see [`rebuild_meta`]).
    rebuilt_meta: std::sync::Mutex<Vec<open::RebuiltMeta>>,
    /// Held by whoever changes profiles, from reading their groups to writing them back: the
    /// committer, and `outpost repair` through the admin socket while the agent runs. A group
    /// holds several profiles, so two writers would each write back the other's old version.
    profile_writer: std::sync::Mutex<()>,
    /// Held around every `fsync` of the store until a failure of it marks the store failed:
    /// Linux reports a failed writeback to one `fsync` only, so a second one running beside it
    /// could succeed on pages the disk has lost, and its writer be answered that they are
    /// durable (or a reopen be thought sound).
    flushing: std::sync::Mutex<()>,
    /// See [`Store::lock_reopening`].
    reopening: std::sync::Mutex<()>,
    /// See [`Store::write_section`] and [`Store::stop_writes`].
    write_sections: RwLock<()>,
    /// Set while a compaction stops write sections.
    closing: AtomicBool,
    /// Where each profile's dead letters are ([`superseded`]).
    dead_letters: superseded::DeadLetterIndex,
    /// When delivery was paused, as `meta/delivery_paused` holds it ([`pause`]).
    paused_since_ms: AtomicI64,
    /// Held by a pause or a resume from reading the state to setting it.
    pausing: std::sync::Mutex<()>,
    /// Makes [`Store::apply_export_changes`] panic: a fault for tests of what follows when
    /// delivery's outcomes can no longer be recorded.
    #[cfg(test)]
    settling_panics: AtomicBool,
    /// Lets this many flushes through, then makes the next one wait this long and fail as an
    /// `fsync` that got `EIO`: a fault for tests of what follows a failed flush.
    #[cfg(test)]
    failing_sync: std::sync::Mutex<Option<(u32, std::time::Duration)>>,
    /// `outpost.lock` in the store's folder, locked for as long as the store is open: sled's
    /// own lock is on a file that a rebuild replaces ([`rebuild`]).
    _lock: File,
}

impl Store {
    /// The sled handles, or [`StoreError::Reopening`] while they are being replaced.
    pub(crate) fn trees(&self) -> Result<Arc<Trees>, StoreError> {
        self.trees
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| StoreError::Reopening(self.path.clone()))
    }

    /// Runs `f` on the sled handles. An I/O error marks the store failed (see
    /// [`Store::recover`]) and comes back as [`StoreError::NoSpace`] or [`StoreError::Io`],
    /// naming the store.
    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&Trees) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let trees = self.trees()?;
        self.with_trees(&trees, f)
    }

    /// [`Store::with`] on handles taken earlier: a caller that must read and write through
    /// the same handles takes them once ([`Store::trees`]).
    pub(crate) fn with_trees<T>(
        &self,
        trees: &Trees,
        f: impl FnOnce(&Trees) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        f(trees).map_err(|e| self.classify(e, trees.generation))
    }

    /// The store's folder.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    pub fn store_id(&self) -> u32 {
        self.store_id
    }

    /// The store's run-time clock, counting from the run time of the last checkpoint.
    pub fn run_clock(&self) -> RunClock {
        self.run_clock
    }

    /// The clock state as last written (default before the first checkpoint).
    pub fn clock_record(&self) -> Result<ClockRecord, StoreError> {
        self.with(|t| match t.meta.get(meta::CLOCK)? {
            Some(v) => codec::decode_clock(&v).map_err(|e| StoreError::corrupt("clock", e)),
            None => Ok(ClockRecord::default()),
        })
    }

    /// Writes the clock state (made durable by the next flush). One writer: the agent's clock
    /// task.
    pub fn write_clock_record(&self, record: &ClockRecord) -> Result<(), StoreError> {
        self.with(|t| {
            t.meta.insert(meta::CLOCK, codec::encode_clock(record))?;
            Ok(())
        })
    }

    pub fn export_id(&self, seq: u64) -> ExportId {
        ExportId {
            store: self.store_id,
            seq,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mapping;
    use crate::profile::update::parse_body;
    use chrono::Utc;
    use std::time::Duration;

    fn seqs(store: &Store, cursor: &mut u64) -> Vec<u64> {
        store
            .read_pending(cursor, 100, usize::MAX)
            .unwrap()
            .iter()
            .map(|e| e.id.seq)
            .collect()
    }

    /// A failed export's retry time is kept with it while it is pending, and only then: the
    /// next failure without one, its delivery, or its drop removes it.
    #[test]
    fn retry_times_live_while_their_export_is_pending() {
        use crate::store::outbox::ExportChange;
        let dir = tempfile::tempdir().unwrap();
        let mapping = Mapping::new(&["name"], &["s"], &[]);
        let line = |id: &str| {
            format!(
                r#"{{"id":"{id}","profile":{{"name":"1","segmentMembership":{{"ups":{{"s":{{"status":"realized"}}}}}}}}}}"#
            )
        };
        let failed = |retry_at_uptime_ms| ExportChange::Failed {
            error: "HTTP 503: busy".into(),
            at_ms: 1,
            retry_at_uptime_ms,
            unanswered: false,
        };
        let retry_times = |store: &Store| -> Vec<(u64, Option<u64>)> {
            let mut cursor = 0;
            let pending = store.read_pending(&mut cursor, 100, usize::MAX).unwrap();
            pending
                .iter()
                .map(|e| (e.id.seq, e.retry_at_uptime_ms))
                .collect()
        };
        {
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            let body = [line("a"), line("b"), line("c")].join("\n");
            let updates = parse_body(body.as_bytes()).unwrap();
            store
                .apply_groups(&[&updates], &mapping, Utc::now())
                .unwrap();
            store.flush().unwrap();
            assert_eq!(retry_times(&store), [(0, None), (1, None), (2, None)]);
            let outcome = |seq: u64, change| crate::store::outbox::Outcome {
                profile: ["a", "b", "c"][seq as usize].into(),
                seq,
                change,
            };
            let changes = [
                outcome(0, failed(Some(5_000))),
                outcome(1, failed(Some(6_000))),
                outcome(2, failed(Some(7_000))),
            ];
            store.apply_export_changes(&changes).unwrap();
            assert_eq!(
                retry_times(&store),
                [(0, Some(5_000)), (1, Some(6_000)), (2, Some(7_000))]
            );
            // Failed again without a retry time (a refused token), and delivered.
            store
                .apply_export_changes(&[
                    outcome(0, failed(None)),
                    outcome(1, ExportChange::Delivered { retried: true }),
                ])
                .unwrap();
            assert_eq!(retry_times(&store), [(0, None), (2, Some(7_000))]);
            assert_eq!(store.trees().unwrap().retry_at.len(), 1);
            // Dropped (`outbox drop`): its retry time goes with it.
            assert!(store.drop_pending(2).unwrap());
            assert_eq!(store.trees().unwrap().retry_at.len(), 0);
            store.flush().unwrap();
        }
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(retry_times(&store), [(0, None)]);
        assert_eq!(store.trees().unwrap().retry_at.len(), 0);
    }

    /// Regression: a scan that kept its place must not skip a dead letter put back below it,
    /// or it would send that profile's newer export first.
    #[test]
    fn scans_start_over_after_exports_are_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let mapping = Mapping::new(&["name"], &["s"], &[]);
        let line = |id: &str, name: &str| {
            format!(
                r#"{{"id":"{id}","profile":{{"name":"{name}","segmentMembership":{{"ups":{{"s":{{"status":"realized"}}}}}}}}}}"#
            )
        };
        let body = [line("a", "1"), line("b", "1"), line("a", "2")].join("\n");
        let updates = parse_body(body.as_bytes()).unwrap();
        store
            .apply_groups(&[&updates], &mapping, Utc::now())
            .unwrap();
        store
            .change_export(0, Place::Pending, |r| (Place::Dead, r))
            .unwrap();

        let mut cursor = 0;
        assert!(
            seqs(&store, &mut cursor).is_empty(),
            "nothing is durable yet"
        );
        store.flush().unwrap();
        assert_eq!(seqs(&store, &mut cursor), [1, 2]);
        assert_eq!(cursor, 3);
        assert!(!store.unless_rewound(|rewound| rewound));
        store.rewinding(|| {
            store
                .change_export(0, Place::Dead, |r| (Place::Pending, r))
                .unwrap()
        });
        assert!(
            store.unless_rewound(|rewound| rewound),
            "the reader is told to start over"
        );
        assert!(!store.unless_rewound(|rewound| rewound), "once");
        cursor = 0;
        assert_eq!(
            seqs(&store, &mut cursor),
            [0, 1, 2],
            "the put-back export comes first"
        );
    }

    /// A read stops at its count or once it read `max_bytes`, and the next one goes on from
    /// there; only a read that reached the end moves the cursor to the end.
    #[test]
    fn reads_page_through_the_outbox_by_count_and_by_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let profiles = ["p0", "p1", "p2", "p3", "p4", "p5"].map(|p| (p, "1"));
        assert_eq!(testing::export_each(&store, &profiles), [0, 1, 2, 3, 4, 5]);
        let read = |cursor: &mut u64, limit, max_bytes| -> Vec<u64> {
            let exports = store.read_pending(cursor, limit, max_bytes).unwrap();
            exports.iter().map(|e| e.id.seq).collect()
        };
        let mut cursor = 0;
        assert_eq!(read(&mut cursor, 2, usize::MAX), [0, 1]);
        assert_eq!(cursor, 2);
        assert_eq!(
            read(&mut cursor, 100, 1),
            [2],
            "at least one, then the bytes stop it"
        );
        assert_eq!(cursor, 3);
        let two_records = {
            let t = store.trees().unwrap();
            let size = |seq| t.outbox.get(keys::seq_key(seq)).unwrap().unwrap().len();
            size(3) + size(4)
        };
        assert_eq!(read(&mut cursor, 100, two_records - 1), [3, 4]);
        assert_eq!(cursor, 5, "stopped by the bytes before the last export");
        assert_eq!(read(&mut cursor, 100, usize::MAX), [5]);
        assert_eq!(cursor, 6);
        assert_eq!(read(&mut cursor, 100, usize::MAX), Vec::<u64>::new());
        assert_eq!(cursor, store.durable_next_seq());
    }

    /// The run time carries across reopening the store; exports are queued at the run time,
    /// and `outbox retry` queues them again at the run time of the retry.
    #[test]
    fn exports_wait_on_the_run_time_carried_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let earlier_runs = ClockRecord {
            uptime_ms: 50_000,
            ..ClockRecord::default()
        };
        {
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            store.write_clock_record(&earlier_runs).unwrap();
            store.flush().unwrap();
        }
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        assert!(store.run_clock().uptime_ms() >= 50_000);
        let mapping = Mapping::new(&["name"], &["s"], &[]);
        let body = r#"{"id":"a","profile":{"name":"x","segmentMembership":{"ups":{"s":{"status":"realized"}}}}}"#;
        let updates = parse_body(body.as_bytes()).unwrap();
        // A wall clock ten years off changes nothing about the wait.
        let wrong_wall = Utc::now() - chrono::Duration::days(3650);
        store
            .apply_groups(&[&updates], &mapping, wrong_wall)
            .unwrap();
        let export = store.export(store.export_id(0)).unwrap().unwrap();
        let queued = export.record.queued_at_uptime_ms;
        assert!((50_000..60_000).contains(&queued), "{queued}");
        assert!(!store
            .run_clock()
            .expired(&export.record, Duration::from_secs(1)));
        let stats = store.stats(Utc::now()).unwrap();
        assert_eq!(stats.oldest_pending_waited_s, Some(0));
        assert!(stats.oldest_pending_age_s.unwrap() > 3600 * 24 * 3000);
        store
            .change_export(0, Place::Pending, |r| (Place::Dead, r))
            .unwrap();
        store
            .write_clock_record(&ClockRecord {
                uptime_ms: 500_000,
                ..earlier_runs
            })
            .unwrap();
        store.flush().unwrap();
        drop(store);

        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let dead = store.export(store.export_id(0)).unwrap().unwrap();
        assert!(
            store
                .run_clock()
                .expired(&dead.record, Duration::from_secs(60)),
            "450 s of run time passed since it was queued"
        );
        crate::admin::execute(
            &store,
            &crate::admin::AdminRequest::Retry {
                ids: vec![],
                all_dead: true,
            },
        )
        .unwrap();
        let retried = store.export(store.export_id(0)).unwrap().unwrap();
        assert!(!retried.dead);
        assert!(retried.record.queued_at_uptime_ms >= 500_000);
        assert!(!store
            .run_clock()
            .expired(&retried.record, Duration::from_secs(60)));
        // A clock record that cannot be read starts again from when the export was queued,
        // not from 0: it waits on from there, and ages from the first run time on.
        let meta_tree = store.trees().unwrap().meta.clone();
        meta_tree.insert(meta::CLOCK, &b"\x09zz"[..]).unwrap();
        store.flush().unwrap();
        drop((meta_tree, store));
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let uptime = store.run_clock().uptime_ms();
        assert!(
            (retried.record.queued_at_uptime_ms..retried.record.queued_at_uptime_ms + 10_000)
                .contains(&uptime),
            "{uptime}"
        );
    }

    /// A store without the count of profiles gets it at open, counted: one of format 4 (before
    /// the count was kept) is marked format 6 and rebuilt, which counts; one of format 5 or 6
    /// whose count a stopped `repair` left unknown is counted where it is, and keeps its
    /// format.
    #[test]
    fn a_store_without_a_profile_count_is_counted_at_open() {
        for (format, marked) in [(4, FORMAT_VERSION), (5, 5), (6, 6)] {
            count_at_open(format, marked);
        }
    }

    /// A profile count damaged while the store is open is listed by `check --store`, and a
    /// repair counts the profiles again.
    #[test]
    fn a_damaged_profile_count_is_listed_and_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let mapping = crate::config::Mapping::new(&["person.name.firstName"], &["s1"], &[]);
        let updates = crate::profile::update::parse_body(
            br#"{"id":"p1","profile":{"person":{"name":{"firstName":"A"}}}}"#,
        )
        .unwrap();
        store
            .apply_groups(&[&updates], &mapping, chrono::Utc::now())
            .unwrap();
        store
            .with(|t| Ok(t.meta.insert(meta::PROFILES, b"bad")?))
            .unwrap();
        let listed = |store: &Store| -> Vec<(&str, String, bool)> {
            let found = store.unreadable().unwrap();
            found
                .iter()
                .map(|r| (r.tree, r.key.clone(), r.repairs))
                .collect()
        };
        assert_eq!(listed(&store), [("meta", "profiles".to_owned(), true)]);
        assert_eq!(
            store.repair_unreadable().unwrap(),
            ["profiles counted again: 1 (meta/profiles said something unreadable)"]
        );
        assert_eq!(store.profile_count().unwrap(), 1);
        assert!(listed(&store).is_empty());
    }

    /// A profile count damaged while the agent runs does not refuse the commits that add or
    /// remove profiles: it is dropped, unknown (as a missing one) until the next open counts
    /// the profiles; a walk counts them meanwhile.
    #[test]
    fn a_profile_count_damaged_while_open_is_counted_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let mapping = crate::config::Mapping::new(&["person.name.firstName"], &["s1"], &[]);
        let apply = |body: &[u8]| {
            let updates = crate::profile::update::parse_body(body).unwrap();
            store.apply_groups(&[&updates], &mapping, chrono::Utc::now())
        };
        apply(br#"{"id":"p1","profile":{"person":{"name":{"firstName":"A"}}}}"#).unwrap();
        store
            .with(|t| Ok(t.meta.insert(meta::PROFILES, b"bad")?))
            .unwrap();
        let stats = store.outbox_stats(chrono::Utc::now()).unwrap();
        assert_eq!(stats.profiles, None, "unknown, not an error");
        assert_eq!(store.verify().unwrap(), ["meta/profiles is not 8 bytes"]);
        let added = apply(br#"{"id":"p2","profile":{"person":{"name":{"firstName":"B"}}}}"#);
        assert!(added.is_ok(), "{added:?}");
        assert_eq!(store.profile_count().unwrap(), 2);
        assert_eq!(store.verify().unwrap(), Vec::<String>::new(), "dropped");
    }

    fn count_at_open(format: u64, marked: u64) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let mapping = crate::config::Mapping::new(&["person.name.firstName"], &["s1"], &[]);
        let updates = crate::profile::update::parse_body(
            br#"{"id":"p1","profile":{"person":{"name":{"firstName":"A"}}}}
{"id":"p2","profile":{"person":{"name":{"firstName":"B"}}}}
{"id":"p3","profile":{"person":{"name":{"firstName":"C"}}}}
{"id":"p2","op":"delete"}"#,
        )
        .unwrap();
        store
            .apply_groups(&[&updates], &mapping, chrono::Utc::now())
            .unwrap();
        store.flush().unwrap();
        assert_eq!(store.profile_count().unwrap(), 2);
        drop(store);
        rebuild::wait_closed(dir.path()).unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let meta_tree = db.open_tree("meta").unwrap();
            meta_tree.remove(meta::PROFILES).unwrap();
            meta_tree
                .insert(meta::FORMAT, &format.to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(store.profile_count().unwrap(), 2, "format {format}");
        assert_eq!(store.verify().unwrap(), Vec::<String>::new());
        let meta_value = |key| store.with(|t| Ok(t.meta.get(key)?)).unwrap();
        assert_eq!(
            meta_value(meta::FORMAT).as_deref(),
            Some(&marked.to_be_bytes()[..]),
            "format {format}"
        );
        assert_eq!(meta_value(meta::REBUILD), None, "format {format}");
    }

    /// A format-1 store opens, its old exports read as queued at run time 0, and it is marked
    /// format 2 so that older builds refuse it whole; an unknown newer format is refused.
    #[test]
    fn format_1_stores_are_upgraded_and_newer_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let v1_export: Vec<u8> = [
            &[1u8, 2, b'p', b'1', 2, 2, b'{', b'}'][..],
            &[251, 0xd0, 0x07, 251, 0xd0, 0x07, 0, 0, 0, 0],
        ]
        .concat();
        {
            let db = sled::open(dir.path()).unwrap();
            let meta_tree = db.open_tree("meta").unwrap();
            meta_tree.insert(meta::FORMAT, &1u64.to_be_bytes()).unwrap();
            meta_tree
                .insert(meta::NEXT_SEQ, &1u64.to_be_bytes())
                .unwrap();
            db.open_tree("outbox")
                .unwrap()
                .insert(keys::seq_key(0), v1_export)
                .unwrap();
            db.flush().unwrap();
        }
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let old = store.export(store.export_id(0)).unwrap().unwrap();
        assert_eq!(old.record.queued_at_uptime_ms, 0);
        assert_eq!(old.record.created_at_ms, 1000);
        assert!(!store
            .run_clock()
            .expired(&old.record, Duration::from_secs(1)));
        drop(store);

        let db = sled::open(dir.path()).unwrap();
        let meta_tree = db.open_tree("meta").unwrap();
        let format = meta_tree.get(meta::FORMAT).unwrap().unwrap();
        assert_eq!(format.as_ref(), FORMAT_VERSION.to_be_bytes());
        meta_tree
            .insert(meta::FORMAT, &(FORMAT_VERSION + 1).to_be_bytes())
            .unwrap();
        db.flush().unwrap();
        drop((meta_tree, db));
        assert!(matches!(
            Store::open(dir.path(), 8 << 20),
            Err(StoreError::Format { found, .. }) if found == FORMAT_VERSION + 1
        ));
    }

    /// A failed `fsync` of outpost's own leaves sled taking writes: until the store is
    /// reopened, nothing may be written or flushed, so that no later write is acknowledged on
    /// top of what the disk may have lost, and delivery never reads the exports written before
    /// the failure.
    #[test]
    fn a_failed_store_refuses_writes_and_flushes_until_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        testing::export_each(&store, &[("a", "1")]);
        let durable = store.durable_next_seq();
        testing::write_each(&store, &[("b", "1")]);
        // As if the flush of that write had failed in `sync_data`.
        testing::fail_as_after_eio(&store);

        assert!(store.write_section().is_err());
        let flushed = store.flush();
        assert!(matches!(flushed, Err(StoreError::Io { .. })), "{flushed:?}");
        assert_eq!(store.durable_next_seq(), durable);

        assert!(store.recover().unwrap());
        assert!(store.write_section().is_ok());
        store.flush().unwrap();
    }

    /// A drop or a put-back whose flush failed is in sled's memory but not on the disk, and the
    /// reopen forgets it: delivery reads nothing meanwhile, and the outbox again from its head
    /// once the store is reopened.
    #[test]
    fn delivery_reads_nothing_of_a_failed_store_and_reads_again_after_its_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let seqs = testing::export_each(&store, &[("a", "1"), ("b", "1")]);
        let mut cursor = 0;
        assert_eq!(
            store
                .read_pending(&mut cursor, 10, usize::MAX)
                .unwrap()
                .len(),
            2
        );
        assert!(!store.unless_rewound(|rewound| rewound));

        testing::fail_as_after_eio(&store);
        let read = store.read_pending(&mut 0, 10, usize::MAX);
        assert!(matches!(read, Err(StoreError::Io { .. })), "{read:?}");
        let read = store.read_pending_by_seq(&seqs, usize::MAX);
        assert!(matches!(read, Err(StoreError::Io { .. })), "{read:?}");

        assert!(store.recover().unwrap());
        assert!(store.unless_rewound(|rewound| rewound));
        assert_eq!(store.read_pending(&mut 0, 10, usize::MAX).unwrap().len(), 2);
    }

    #[test]
    fn a_flush_beside_a_failing_one_is_not_answered_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        testing::export_each(&store, &[("a", "1")]);
        let durable = store.durable_next_seq();
        *store.failing_sync.lock().unwrap() = Some((0, Duration::from_millis(400)));
        std::thread::scope(|scope| {
            let failing = scope.spawn(|| store.flush());
            while store.failing_sync.lock().unwrap().is_some() {
                std::thread::sleep(Duration::from_millis(1));
            }
            // The failing flush has begun its `fsync`; this write's flush comes beside it, as
            // the settler's comes beside the committer's, and its own `fsync` would succeed.
            testing::write_each(&store, &[("b", "1")]);
            let beside = store.flush();
            assert!(matches!(beside, Err(StoreError::Io { .. })), "{beside:?}");
            let failed = failing.join().unwrap();
            assert!(matches!(failed, Err(StoreError::Io { .. })), "{failed:?}");
        });
        assert_eq!(store.durable_next_seq(), durable);
    }
}
