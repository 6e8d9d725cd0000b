//! Opening a store: the lock, the format check and in-place upgrade, rebuilding the derived
//! `meta` values when they cannot be read; reopening after an I/O error (a full disk); and the
//! flush that makes commits durable.
//!
//! `meta/format`: the layout version (big-endian u64), [`FORMAT_VERSION`]; `meta/store_id`:
//! a random u32 (big-endian), part of every export id. `meta/profiles` is written with the
//! format in a new store; missing, it is unknown, and counted at open.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::codec;
use super::error::{io_detail, is_no_space, StoreError};
use super::keys::{self, meta};
use super::superseded::DeadLetterIndex;
use super::tally::{Place, Tally};
use super::{pause, profiles, rebuild, unrecorded, upgrade, Store, Trees};
use crate::clock::{ClockRecord, RunClock};

/// The on-disk layout this build writes and reads. Format 2 added the run-time clock
/// (`meta/clock`, exports of format 2); format 3 stores profiles as typed records; format 4
/// stores them a few to a key ([`groups`](super::groups)); format 5 keeps their number
/// (`meta/profiles`), which a build of format 4 would not keep up to date; format 6 may keep
/// several rejected messages at one place, under keys a build of format 5 takes for damage
/// ([`source`](super::source)).
pub const FORMAT_VERSION: u64 = 6;

/// Formats this build opens as they are, without marking them [`FORMAT_VERSION`], since they
/// differ from it only in keys they do not hold: so a build of that format still opens the
/// store until one is written, by the transaction that marks it [`FORMAT_VERSION`].
pub(super) const OPENED_AS_THEY_ARE: &[u64] = &[5];

/// Older layouts this build opens and upgrades: it records [`FORMAT_VERSION`] (an older build
/// then refuses the store whole), moves the profiles of formats 1 to 3 into groups as typed
/// records ([`upgrade`](super::upgrade)), and rebuilds the store ([`rebuild`]), which counts
/// them. Their other values stay readable as they are ([`codec`]).
pub(super) const UPGRADABLE_FORMATS: &[u64] = &[1, 2, 3, 4];

/// The formats whose profiles are one to a key, in the old `profiles` tree.
const PROFILES_ONE_TO_A_KEY: &[u64] = &[1, 2, 3];

/// What opening a store read from it.
pub(super) struct Opened {
    store_id: u32,
    clock: ClockRecord,
    next_seq: u64,
    /// Unreadable `meta` values rebuilt at open, described.
    rebuilt: Vec<RebuiltMeta>,
}

/// Removes the snapshot files sled left unfinished, under sled's own lock.
///
/// At every open sled 0.34 writes a snapshot of its page table to `snap.<lsn>.generating`,
/// syncs it, then renames it to `snap.<lsn>` and removes the older one. A kill before the
/// rename leaves the `.generating` file, which the next open takes for the newest snapshot,
/// finds incomplete, and refuses the whole store as corrupt (sled issue #1527). Such a file
/// is never needed: the snapshot it was to replace stays until after the rename, and the log
/// holds the rest. It is removed only while holding the lock sled takes on `db` (an `flock`),
/// so that the snapshot of a process opening the store right now is left alone.
fn remove_unfinished_snapshots(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::io::AsRawFd;
    let open_error = |source: std::io::Error| StoreError::Open {
        path: path.to_path_buf(),
        source: sled::Error::Io(source),
    };
    let Ok(db) = File::open(path.join("db")) else {
        return Ok(()); // a new store, or one sled will report itself
    };
    // SAFETY: flock on a descriptor this function owns; released when `db` is closed.
    if unsafe { libc::flock(db.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Ok(()); // another process has the store open: sled reports the lock
    }
    for entry in std::fs::read_dir(path).map_err(open_error)? {
        let entry = entry.map_err(open_error)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(
                file = %name,
                "removing a snapshot the store's last run did not finish (it was stopped while opening the store)"
            );
            std::fs::remove_file(entry.path()).map_err(open_error)?;
        }
    }
    Ok(())
}

/// How outpost opens a sled database in `dir`.
pub(super) fn sled_config(dir: &Path, cache_bytes: u64) -> sled::Config {
    sled::Config::new()
        .path(dir)
        .cache_capacity(cache_bytes)
        .mode(sled::Mode::HighThroughput)
}

/// How long closing the store waits for the calls that hold its handles.
pub(super) const CLOSE_WAIT: Duration = Duration::from_secs(30);

/// Write sections stopped by [`Store::stop_writes`]; allowed again when dropped.
pub(super) struct WritesStopped<'a> {
    _refusing: Refusing<'a>,
    _sections: std::sync::RwLockWriteGuard<'a, ()>,
}

/// Makes [`Store::write_section`] refuse at once, until dropped.
struct Refusing<'a>(&'a AtomicBool);

impl<'a> Refusing<'a> {
    fn start(closing: &'a AtomicBool) -> Refusing<'a> {
        closing.store(true, Ordering::SeqCst);
        Refusing(closing)
    }
}

impl Drop for Refusing<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Runs `open` again for a moment while it finds the store locked: a process that closed it
/// just before (this one, or one exiting) releases it shortly after (sled's threads).
pub(super) fn retry_locked<T>(
    mut open: impl FnMut() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut tries = 0;
    loop {
        match open() {
            Err(StoreError::Locked(_)) if tries < 10 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            result => return result,
        }
    }
}

/// How far past the highest sequence held (by an export, a retry entry or a mark) a rebuilt
/// `next_seq` starts: exports delivered or dropped before may have had higher numbers, and an
/// export id must never be reused.
pub(super) const NEXT_SEQ_GAP: u64 = 1 << 32;

/// A `meta` value rebuilt, or dropped, at open because its bytes could not be read as they
/// were (or, for `next_seq`, were behind the exports stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RebuiltMeta {
    /// Its key in `meta`.
    pub key: &'static str,
    /// What it was, and what was done: "unreadable (not 8 bytes); recounted: 3 profiles".
    pub was: String,
}

impl RebuiltMeta {
    fn new(key: &'static str, was: String) -> RebuiltMeta {
        RebuiltMeta { key, was }
    }
}

impl std::fmt::Display for RebuiltMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "meta/{} was {}", self.key, self.was)
    }
}

/// Rebuilds the `meta` values that are derived from the rest of the store when their bytes
/// cannot be read (or, for `tally`, are missing while exports are stored): `tally` and
/// `profiles` are recounted, `next_seq` starts [`NEXT_SEQ_GAP`] past the highest sequence
/// held, `clock` starts again from the latest run time a pending export was queued at (which
/// delays expiry by what was lost since, never hastens it). `mapping` and `backfill` cannot be
/// rebuilt: they are dropped, so that the store opens and runs, and what that loses is said.
/// Returns what it did, one line each; flushed when anything was done.
pub(super) fn rebuild_meta(t: &Trees) -> Result<Vec<RebuiltMeta>, StoreError> {
    let mut rebuilt = Vec::new();
    if let Some(v) = t.meta.get(meta::CLOCK)? {
        if let Err(e) = codec::decode_clock(&v) {
            // From 0, every export queued before would wait again as long as the store had
            // run before it was queued, before it could expire.
            let mut latest = 0;
            for item in t.outbox.iter().values() {
                if let Ok(record) = codec::decode_export(&item?) {
                    latest = latest.max(record.queued_at_uptime_ms);
                }
            }
            let record = ClockRecord {
                uptime_ms: latest,
                ..ClockRecord::default()
            };
            t.meta.insert(meta::CLOCK, codec::encode_clock(&record))?;
            rebuilt.push(RebuiltMeta::new(
                "clock",
                format!("unreadable ({e}); the run time starts again from {latest} ms, the latest a pending export was queued at"),
            ));
        }
    }
    if let Some(v) = t.meta.get(meta::NEXT_SEQ)? {
        if v.len() != 8 {
            let mut highest = super::backfill::highest_seq_recorded(t)?;
            // The indexes' keys too: an entry may outlive its export.
            for tree in [&t.outbox, &t.dead, &t.retry_at, &t.superseded] {
                for key in tree.iter().keys() {
                    highest = highest.max(keys::seq_from_key(&key?));
                }
            }
            let next = highest
                .map_or(0, |h| h.saturating_add(1))
                .saturating_add(NEXT_SEQ_GAP);
            t.meta.insert(meta::NEXT_SEQ, &next.to_be_bytes())?;
            rebuilt.push(RebuiltMeta::new(
                "next_seq",
                format!("unreadable (not 8 bytes); new exports are numbered from {next}"),
            ));
        }
    }
    // A next number at or below a stored export's (written by hand, or lost) would write new
    // exports over older ones: raised past every export and index entry.
    let next = t
        .meta
        .get(meta::NEXT_SEQ)?
        .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
        .unwrap_or(0);
    let mut last = None;
    for tree in [&t.outbox, &t.dead, &t.retry_at, &t.superseded] {
        // The last key that is an export number: a damaged one (not 8 bytes) may sort past it.
        for item in tree.iter().rev() {
            let (key, _) = item?;
            if let Some(seq) = keys::seq_from_key(&key) {
                last = last.max(Some(seq));
                break;
            }
        }
    }
    if let Some(last) = last.filter(|&last| next <= last) {
        let raised = last.saturating_add(1).saturating_add(NEXT_SEQ_GAP);
        t.meta.insert(meta::NEXT_SEQ, &raised.to_be_bytes())?;
        rebuilt.push(RebuiltMeta::new(
            "next_seq",
            format!(
                "{next}, not past export {last} stored; new exports are numbered from {raised}"
            ),
        ));
    }
    // `meta/rejected` is counted again once the store is open; the other starts from 0.
    for (key, name, then) in [
        (meta::REJECTED, "rejected", "counted again"),
        (
            meta::REJECTED_NOT_KEPT,
            "rejected_not_kept",
            "counted from 0 again",
        ),
    ] {
        if t.meta.get(key)?.is_some_and(|v| v.len() != 8) {
            t.meta.remove(key)?;
            rebuilt.push(RebuiltMeta::new(
                name,
                format!("unreadable (not 8 bytes); {then}"),
            ));
        }
    }
    if let Some(v) = t.meta.get(meta::PROFILES)? {
        if v.len() != 8 {
            let count = profiles::recount_profiles(t)?;
            rebuilt.push(RebuiltMeta::new(
                "profiles",
                format!("unreadable (not 8 bytes); recounted: {count} profiles"),
            ));
        }
    }
    // Missing, it would read as nothing pending while exports are (a store of a build before
    // the tally): what is delivered then would count below zero, kept at it, for good.
    let tally_state = match t.meta.get(meta::TALLY)? {
        Some(v) if Tally::from_bytes(&v).is_none() => Some("unreadable (not 24 bytes)"),
        Some(_) => None,
        None if !(t.outbox.is_empty() && t.dead.is_empty()) => Some("missing, with exports stored"),
        None => None,
    };
    if let Some(state) = tally_state {
        let mut tally = Tally::default();
        for (tree, place) in [(&t.outbox, Place::Pending), (&t.dead, Place::Dead)] {
            for item in tree.iter() {
                let (_, value) = item?;
                tally.count(place, value.len(), 1);
            }
        }
        t.meta.insert(meta::TALLY, &tally.to_bytes())?;
        rebuilt.push(RebuiltMeta::new(
            "tally",
            format!(
                "{state}; recounted: {} pending, {} dead",
                tally.pending, tally.dead
            ),
        ));
    }
    if let Some(v) = t.meta.get(meta::MAPPING)? {
        if let Err(e) = super::mapping::decode_records(&v) {
            t.meta.remove(meta::MAPPING)?;
            rebuilt.push(RebuiltMeta::new(
                "mapping",
                format!("unreadable ({e}); the mapping of this run is recorded as if new: nothing is backfilled for it, and its segments' mappingCreatedAt and mappingUpdatedAt start again"),
            ));
        }
    }
    if let Some(v) = t.meta.get(meta::BACKFILL)? {
        if let Err(e) = super::backfill::BackfillState::decode(&v) {
            t.meta.remove(meta::BACKFILL)?;
            rebuilt.push(RebuiltMeta::new(
                "backfill",
                format!("unreadable ({e}); the backfills queued in it are dropped: members of segments mapped since the last finished backfill may have had no export (map such a segment out and in again to backfill it)"),
            ));
        }
    }
    if !rebuilt.is_empty() {
        t.db.flush()?;
    }
    Ok(rebuilt)
}

/// How much [`Store::recover`] writes beside a failed store, to see whether there is room.
pub const SPACE_PROBE_BYTES: usize = 1 << 20;

/// Writes and syncs [`SPACE_PROBE_BYTES`] in `dir`, in a file without a name (`O_TMPFILE`
/// where the file system has it, else one of a random name, removed at once): `dir` may be a
/// folder above a store not made yet, which holds other files, and a kill leaves nothing.
pub(super) fn probe_space(dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = tempfile::tempfile_in(dir)?;
    file.write_all(&vec![0u8; SPACE_PROBE_BYTES])?;
    file.sync_all()
}

impl Store {
    /// Whether the disk that holds, or is to hold, a store at `path` has room for it to be
    /// written again: [`probe_space`] in `path`, or in the nearest folder above it that
    /// exists (a store not made yet).
    pub fn room_for(path: &Path) -> std::io::Result<()> {
        let existing = path
            .ancestors()
            .find(|dir| dir.is_dir())
            .unwrap_or(Path::new("."));
        probe_space(existing)
    }

    /// Whether a store was ever made at `path`: its database, or a store halfway through a
    /// swap ([`rebuild`]) with only the state of the swap.
    pub fn exists_at(path: &Path) -> Result<bool, StoreError> {
        for file in ["db", rebuild::SWAP_STATE] {
            match path.join(file).try_exists() {
                Ok(true) => return Ok(true),
                Ok(false) => {}
                Err(e) if super::names_nothing(&e) => {}
                Err(e) => return Err(rebuild::io_error(path, &e)),
            }
        }
        Ok(false)
    }

    /// Opens (or creates) the store. A store open in another process is [`StoreError::Locked`].
    ///
    /// A lock is retried for a moment: sled's threads release it shortly after a store is
    /// dropped, so a store closed just before (by this or an exiting process) opens.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        Store::open_rebuilding(path, cache_bytes, true)
    }

    /// [`Store::open`]; a rebuild the store wants is made only when `may_rebuild`.
    pub(super) fn open_rebuilding(
        path: &Path,
        cache_bytes: u64,
        may_rebuild: bool,
    ) -> Result<Store, StoreError> {
        let lock = retry_locked(|| rebuild::lock(path))?;
        let (trees, opened) = Store::open_trees(path, cache_bytes, may_rebuild)?;
        let unrecorded_below = unrecorded::unrecorded_below_at_open(&trees, opened.next_seq)?;
        let paused_since_ms = pause::read_paused_since(&trees)?;
        Ok(Store {
            path: path.to_path_buf(),
            cache_bytes,
            trees: RwLock::new(Some(Arc::new(trees))),
            failed: AtomicBool::new(false),
            failed_no_space: AtomicBool::new(false),
            reserve: super::reserve::Reserve::found_at(path),
            generation: AtomicU64::new(0),
            run_clock: RunClock::starting_at(opened.clock.uptime_ms),
            store_id: opened.store_id,
            rewind_lock: RwLock::new(()),
            rewound: AtomicBool::new(false),
            holding_requests: AtomicU32::new(0),
            exports_out: AtomicU64::new(0),
            request_timeout_ms: AtomicU64::new(0),
            max_rejected: AtomicU64::new(u64::MAX),
            unrecorded_below: AtomicU64::new(unrecorded_below),
            unanswered: Default::default(),
            written_next: AtomicU64::new(opened.next_seq),
            durable_next: AtomicU64::new(opened.next_seq),
            rebuilt_meta: std::sync::Mutex::new(opened.rebuilt),
            profile_writer: std::sync::Mutex::new(()),
            flushing: std::sync::Mutex::new(()),
            reopening: std::sync::Mutex::new(()),
            write_sections: RwLock::new(()),
            closing: AtomicBool::new(false),
            dead_letters: DeadLetterIndex::default(),
            paused_since_ms: AtomicI64::new(paused_since_ms),
            pausing: std::sync::Mutex::new(()),
            #[cfg(test)]
            settling_panics: AtomicBool::new(false),
            #[cfg(test)]
            failing_sync: std::sync::Mutex::new(None),
            _lock: lock,
        })
    }

    /// Opens the sled database in the store's folder; the caller holds `outpost.lock`. A
    /// rebuild the store wants is made when `may_rebuild` ([`rebuild`]).
    pub(super) fn open_trees(
        path: &Path,
        cache_bytes: u64,
        may_rebuild: bool,
    ) -> Result<(Trees, Opened), StoreError> {
        retry_locked(|| Store::open_once(path, cache_bytes, may_rebuild))
    }

    fn open_once(
        path: &Path,
        cache_bytes: u64,
        may_rebuild: bool,
    ) -> Result<(Trees, Opened), StoreError> {
        let io_error = |e: std::io::Error| {
            tracing::debug!(error = ?e, path = %path.display(), "opening the store folder");
            StoreError::Open {
                path: path.to_path_buf(),
                source: sled::Error::Io(e),
            }
        };
        make_store_folder(path).map_err(io_error)?;
        rebuild::finish_interrupted(path).map_err(|e| rebuild::swap_error(path, e))?;
        remove_unfinished_snapshots(path)?;
        // sled panics on some damage to its files (0.34.7: "tried to serialize
        // Uninitialized" for a file cut short) rather than return an error.
        let opened = crate::logging::panic_said_by_caller(|| sled_config(path, cache_bytes).open())
            .map_err(|panic| StoreError::Damaged {
                path: path.to_path_buf(),
                detail: crate::logging::panic_message(&*panic),
            })?;
        let db = opened.map_err(|e| match e {
            // sled reports the lock as `Other` with this text (0.34.7, config.rs).
            sled::Error::Io(ref io)
                if io.kind() == std::io::ErrorKind::WouldBlock
                    || io.to_string().contains("could not acquire lock") =>
            {
                StoreError::Locked(path.to_path_buf())
            }
            source => {
                tracing::debug!(error = ?source, path = %path.display(), "opening the store");
                StoreError::Open {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        let meta = db.open_tree("meta")?;
        match meta.get(meta::FORMAT)? {
            None => {
                let mut batch = sled::Batch::default();
                batch.insert(meta::FORMAT, &FORMAT_VERSION.to_be_bytes());
                batch.insert(meta::PROFILES, &0u64.to_be_bytes());
                // A new store: no delivery has run on it, of this version or any other (builds
                // that did not keep track refuse its format), so nothing in it may have been
                // acknowledged unrecorded until one does, though `outpost ingest` fills it first.
                batch.insert(meta::UNRECORDED_BELOW, &keys::seq_key(0));
                meta.apply_batch(batch)?;
            }
            Some(v) => {
                let found = v
                    .as_ref()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .unwrap_or(u64::MAX);
                if UPGRADABLE_FORMATS.contains(&found) {
                    let mut batch = sled::Batch::default();
                    batch.insert(meta::FORMAT, &FORMAT_VERSION.to_be_bytes());
                    if PROFILES_ONE_TO_A_KEY.contains(&found) {
                        batch.insert(meta::UPGRADE, upgrade::not_started());
                    }
                    // Unknown until counted (by the rebuild, or at open if it is not made).
                    batch.remove(meta::PROFILES);
                    batch.insert(meta::REBUILD, &[]);
                    meta.apply_batch(batch)?;
                    db.flush()?;
                } else if found != FORMAT_VERSION && !OPENED_AS_THEY_ARE.contains(&found) {
                    return Err(StoreError::Format {
                        path: path.to_path_buf(),
                        found,
                    });
                }
            }
        }
        let store_id = match meta.get(meta::STORE_ID)? {
            Some(v) => u32::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::corrupt("store id", "not 4 bytes"))?,
            ),
            None => {
                let id: u32 = rand::random();
                meta.insert(meta::STORE_ID, &id.to_be_bytes())?;
                db.flush()?;
                // A new store: the names of its files, and its folder's own, are durable only
                // once their folders are synced (a flush syncs the log's data alone). The
                // folder it is in may be one this user can enter but not read (mode 0711).
                rebuild::sync_dir(path).map_err(io_error)?;
                if let Err(e) = rebuild::sync_parent(path) {
                    tracing::warn!(error = %e, path = %path.display(), "cannot sync the folder the new store is in: its name survives a power cut only as the filesystem keeps it");
                }
                id
            }
        };
        let log_file = File::open(path.join("db")).map_err(|e| StoreError::Open {
            path: path.join("db"),
            source: sled::Error::Io(e),
        })?;
        let mut trees = Trees {
            profile_groups: db.open_tree("profile_groups")?,
            legacy_profiles: db.open_tree("profiles")?,
            has_legacy_profiles: true,
            upgrade_unfinished: true,
            outbox: db.open_tree("outbox")?,
            dead: db.open_tree("dead")?,
            retry_at: db.open_tree("retry_at")?,
            superseded: db.open_tree("superseded")?,
            backfill_exported: db.open_tree("backfill_exported")?,
            positions: db.open_tree("positions")?,
            rejected: db.open_tree("rejected")?,
            meta,
            db,
            log_file,
            blobs: super::blobs::BlobSync::new(path),
            generation: 0,
        };
        let rebuilt = rebuild_meta(&trees)?;
        for note in &rebuilt {
            tracing::warn!("{note}");
        }
        if let Err(e) = upgrade::finish(&trees) {
            // Profiles not yet moved are read where they are, so the store works meanwhile.
            tracing::warn!(
                "the upgrade of the stored profiles stopped ({e}); profiles not yet moved are read where they are, and the next open goes on with it"
            );
        }
        trees.has_legacy_profiles = !trees.legacy_profiles.is_empty();
        trees.upgrade_unfinished = trees.meta.get(meta::UPGRADE)?.is_some();
        if may_rebuild && !trees.upgrade_unfinished {
            trees = match rebuild::rebuild_if_wanted(trees, path, cache_bytes)? {
                rebuild::Outcome::NotNow(trees) => *trees,
                rebuild::Outcome::Done => {
                    // The copy holds the `meta` values rebuilt above; say so all the same.
                    let (trees, mut opened) = Store::open_once(path, cache_bytes, false)?;
                    opened.rebuilt.splice(0..0, rebuilt);
                    return Ok((trees, opened));
                }
            };
        }
        if trees.meta.get(meta::PROFILES)?.is_none() {
            // Not rebuilt after an upgrade, or a repair was stopped: commits keep no count
            // until it is counted. A failure (a full disk) fails the store's writes too, and
            // the reopen that follows counts again.
            match profiles::recount_profiles(&trees).and_then(|count| {
                trees.db.flush()?;
                Ok(count)
            }) {
                Ok(count) => tracing::info!(profiles = count, "counted the stored profiles"),
                Err(e) => tracing::warn!(
                    "the stored profiles could not be counted ({e}); the next open counts them"
                ),
            }
        }
        super::source::count_rejected_if_unknown(&trees)?;
        let clock = match trees.meta.get(meta::CLOCK)? {
            Some(v) => codec::decode_clock(&v).map_err(|e| StoreError::corrupt("clock", e))?,
            None => ClockRecord::default(),
        };
        let next_seq = trees
            .meta
            .get(meta::NEXT_SEQ)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0);
        Ok((
            trees,
            Opened {
                store_id,
                clock,
                next_seq,
                rebuilt,
            },
        ))
    }

    /// Names the store in an I/O error and marks the store failed, if the error came from the
    /// handles in use (`generation`).
    pub(super) fn classify(&self, e: StoreError, generation: u64) -> StoreError {
        let Some(io) = e.io_cause() else {
            return e;
        };
        let no_space = is_no_space(io);
        let error = if no_space {
            StoreError::NoSpace(self.path.clone())
        } else {
            StoreError::Io {
                path: self.path.clone(),
                detail: io_detail(io),
            }
        };
        let current = generation == self.generation.load(Ordering::SeqCst);
        if current && !self.failed.swap(true, Ordering::SeqCst) {
            self.failed_no_space.store(no_space, Ordering::SeqCst);
            tracing::warn!(
                "{error}: updates are refused (503) until it is reopened, which happens by itself once there is room"
            );
        }
        error
    }

    /// Whether sled reported an I/O error since the store was (re)opened.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Why writes are refused now, if they are: sled reported an I/O error (a full disk), or
    /// the store is closed for a compaction or being reopened.
    pub fn refusing_writes(&self) -> Option<StoreError> {
        if self.is_failed() {
            return Some(self.failure());
        }
        if let Some(refused) = self.refusing_updates() {
            return Some(refused);
        }
        if self.closing.load(Ordering::SeqCst) {
            return Some(StoreError::Reopening(self.path.clone()));
        }
        self.trees().err()
    }

    /// Why updates (and backfill steps, which make exports) are refused while other writes
    /// are taken: the space kept for delivery was given up on a full disk ([`super::reserve`]).
    pub fn refusing_updates(&self) -> Option<StoreError> {
        self.reserve_given_up().then(|| StoreError::ReserveGivenUp {
            path: self.path.clone(),
            reserve: match self.reserve_bytes() {
                0 => "as it was".into(),
                bytes => crate::explain::bytes(bytes),
            },
        })
    }

    /// The error a failed store answers with.
    pub fn failure(&self) -> StoreError {
        if self.failed_no_space.load(Ordering::SeqCst) {
            StoreError::NoSpace(self.path.clone())
        } else {
            StoreError::Io {
                path: self.path.clone(),
                detail: "an earlier write failed".into(),
            }
        }
    }

    /// Reopens a failed store once its disk has room again: sled fails every write after an
    /// I/O error until it is reopened. Returns `Ok(false)` when the store had not failed, and
    /// [`StoreError::NoSpace`] (without reopening) while a trial write of
    /// [`SPACE_PROBE_BYTES`] beside the store does not fit.
    ///
    /// Nothing acknowledged is lost: acknowledged writes were flushed, so the reopened store
    /// holds them. Writes that failed were answered as failures; those of them sled had
    /// written may be in the reopened store or not, and their sequence numbers are
    /// re-read from it (delivery reads only durable exports, so none of them was sent).
    pub fn recover(&self) -> Result<bool, StoreError> {
        if !self.is_failed() {
            return Ok(false);
        }
        let probed = match probe_space(&self.path) {
            // A store that filled its disk itself: the space kept for delivery makes room.
            Err(e) if is_no_space(&e) && self.give_up_reserve() => probe_space(&self.path),
            probed => probed,
        };
        probed.map_err(|e| {
            if is_no_space(&e) {
                StoreError::NoSpace(self.path.clone())
            } else {
                StoreError::Io {
                    path: self.path.clone(),
                    detail: io_detail(&e),
                }
            }
        })?;
        let _reopening = self.lock_reopening();
        if !self.is_failed() {
            return Ok(false); // a compaction reopened it meanwhile
        }
        // A writer between its write and its flush must not flush the new handles, which do
        // not hold what it wrote: sections in progress end first (with an error, the old
        // handles failing), later ones are refused until the store is open again.
        let Some(_no_writes) = self.stop_writes() else {
            return Err(StoreError::Io {
                path: self.path.clone(),
                detail: "writes in progress held it; reopening later".into(),
            });
        };
        if self.take_trees().is_err() {
            return Err(StoreError::Io {
                path: self.path.clone(),
                detail: "its handles are still in use; reopening later".into(),
            });
        }
        // Not rebuilt here: updates would be refused while it copies (the next start does).
        self.reopen_trees()?;
        self.raise_unrecorded_below_after_reopen()?;
        self.failed.store(false, Ordering::SeqCst);
        self.failed_no_space.store(false, Ordering::SeqCst);
        // At warn, as its failure was said.
        match self.reserve_given_up() {
            false => {
                tracing::warn!(store = %self.path.display(), "the store was reopened; it takes writes again")
            }
            true => {
                tracing::warn!(store = %self.path.display(), "the store was reopened: it records deliveries; updates wait for room for the space kept for delivery")
            }
        }
        Ok(true)
    }

    /// Held by a writer from its write to its flush (the committer's groups and backfill
    /// steps, delivery's outcomes), so that a compaction, which waits for every section in
    /// progress before closing the store, never comes between the two: a writer refused
    /// because of a compaction has written nothing. [`StoreError::Reopening`] at once while a
    /// compaction runs or waits to.
    ///
    /// Refused too while the store is failed: an error outpost's own `fsync` got leaves sled
    /// taking writes, and a later write flushed then would be acknowledged on top of what may
    /// not have reached the disk.
    pub fn write_section(&self) -> Result<std::sync::RwLockReadGuard<'_, ()>, StoreError> {
        let refused = || StoreError::Reopening(self.path.clone());
        if self.closing.load(Ordering::SeqCst) {
            return Err(refused());
        }
        if self.is_failed() {
            return Err(self.failure());
        }
        match self.write_sections.try_read() {
            Ok(section) => Ok(section),
            // A compaction that panicked: the store was marked failed and is reopened.
            Err(std::sync::TryLockError::Poisoned(poisoned)) => Ok(poisoned.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => Err(refused()),
        }
    }

    /// [`Store::write_section`] for writes that take room on the disk for good (updates, a
    /// backfill's exports): refused also while the space kept for delivery is given up.
    pub fn update_section(&self) -> Result<std::sync::RwLockReadGuard<'_, ()>, StoreError> {
        if let Some(refused) = self.refusing_updates() {
            return Err(refused);
        }
        self.write_section()
    }

    /// Refuses new write sections and waits (at most [`CLOSE_WAIT`]) for those in progress;
    /// `None` if they took longer. New sections are refused until the guard is dropped.
    pub(super) fn stop_writes(&self) -> Option<WritesStopped<'_>> {
        // New sections are refused from here on, also while those in progress finish.
        let refusing = Refusing::start(&self.closing);
        let deadline = Instant::now() + CLOSE_WAIT;
        let sections = loop {
            match self.write_sections.try_write() {
                Ok(sections) => break sections,
                Err(std::sync::TryLockError::Poisoned(poisoned)) => break poisoned.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(std::sync::TryLockError::WouldBlock) => return None,
            }
        };
        Some(WritesStopped {
            _refusing: refusing,
            _sections: sections,
        })
    }

    /// Held while the handles are closed and opened again: by one reopening or compaction at
    /// a time.
    pub(super) fn lock_reopening(&self) -> std::sync::MutexGuard<'_, ()> {
        self.reopening.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the sled handles out (calls meanwhile fail with [`StoreError::Reopening`]) and
    /// waits until the calls that took them before are done; returns them, the last holder
    /// (`None` if they were out already). `Err` (the handles back in place) if that takes over
    /// [`CLOSE_WAIT`]. sled lets one open at a time, so every handle must be dropped before
    /// the next open.
    pub(super) fn take_trees(&self) -> Result<Option<Trees>, ()> {
        let old = self.trees.write().unwrap_or_else(|e| e.into_inner()).take();
        let Some(mut old) = old else {
            return Ok(None);
        };
        let deadline = Instant::now() + CLOSE_WAIT;
        loop {
            match Arc::try_unwrap(old) {
                Ok(trees) => return Ok(Some(trees)),
                Err(still_shared) if Instant::now() < deadline => {
                    old = still_shared;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(still_shared) => {
                    self.put_back(still_shared);
                    return Err(());
                }
            }
        }
    }

    /// Puts handles taken out by [`Store::take_trees`] back in place.
    pub(super) fn put_back(&self, trees: Arc<Trees>) {
        *self.trees.write().unwrap_or_else(|e| e.into_inner()) = Some(trees);
    }

    /// Opens the store's folder again after [`Store::take_trees`] (never rebuilding) and puts
    /// the new handles in place, with the sequence watermarks and the pause read from it.
    pub(super) fn reopen_trees(&self) -> Result<(), StoreError> {
        // sled's threads release the file lock shortly after the last handle goes.
        let mut tries = 0;
        let (mut trees, opened) = loop {
            match Store::open_trees(&self.path, self.cache_bytes, false) {
                Err(StoreError::Locked(_)) if tries < 10 => tries += 1,
                Err(e) => return Err(self.classify(e, u64::MAX)),
                Ok(opened) => break opened,
            }
        };
        if opened.store_id != self.store_id {
            return Err(StoreError::corrupt(
                "store id",
                format!(
                    "{:08x} after reopening, {:08x} before",
                    opened.store_id, self.store_id
                ),
            ));
        }
        {
            // What the reopened store read is on the drive before anything is sent from it.
            let _one_at_a_time = self.lock_flushing();
            trees.sync_files()?;
        }
        self.rebuilt_meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(opened.rebuilt);
        self.written_next.store(opened.next_seq, Ordering::SeqCst);
        self.durable_next.store(opened.next_seq, Ordering::SeqCst);
        trees.generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        // Writes that were not durable are gone: the dead letters are read again, and so is
        // the outbox by the delivery loop, as after a put-back (a drop that was not durable
        // is undone, below where the loop had read).
        self.dead_letters.read_again();
        self.rewinding(|| self.put_back(Arc::new(trees)));
        self.read_pause_again()
    }

    /// Makes every earlier write durable: sled's flush, then an fsync of its log file.
    ///
    /// Refused while the store is failed, also when the failure comes from another writer's
    /// flush: the exports written before a failed flush are not durable (the disk may have
    /// lost them, and a reopen forgets them), so delivery must not read them. Flushes run one
    /// at a time, so a failing one marks the store failed before the next one begins.
    pub fn flush(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.lock_flushing();
        if self.is_failed() {
            return Err(self.failure());
        }
        self.with(|t| {
            let written = self.written_next.load(Ordering::SeqCst);
            #[cfg(test)]
            self.sync_fault()?;
            t.flush_to_drive()?;
            if self.is_failed() {
                return Err(self.failure());
            }
            self.durable_next.fetch_max(written, Ordering::SeqCst);
            Ok(())
        })
    }

    #[cfg(test)]
    fn sync_fault(&self) -> Result<(), StoreError> {
        let mut fault = self.failing_sync.lock().unwrap();
        match fault.as_mut() {
            None => Ok(()),
            Some((pass, _)) if *pass > 0 => {
                *pass -= 1;
                Ok(())
            }
            Some(&mut (_, delay)) => {
                *fault = None;
                drop(fault);
                std::thread::sleep(delay);
                Err(StoreError::Sync(std::io::Error::from_raw_os_error(5)))
            }
        }
    }

    /// Held around every `fsync` of the store (see `Store::flushing`).
    pub(super) fn lock_flushing(&self) -> std::sync::MutexGuard<'_, ()> {
        self.flushing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every export below this sequence number is durable.
    pub fn durable_next_seq(&self) -> u64 {
        self.durable_next.load(Ordering::SeqCst)
    }
}

/// Makes the store's folder readable by its owner alone, since it holds customers' profiles
/// (the folders above it as the umask says). A folder that is there is left as it is:
/// [`readable_by_others_warning`] tells of one others may read.
pub(super) fn make_store_folder(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        made => made,
    }
}

/// The warning for a store folder that users other than its owner and group may read or
/// enter: every profile and export in it is theirs to copy.
pub fn readable_by_others_warning(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o005 != 0).then(|| {
        format!(
            "storage.path {0}: other users may read the store (its folder's mode is {1:o}), and \
             with it the customers' profiles it holds; run chmod o-rwx {0}",
            path.display(),
            mode & 0o777
        )
    })
}
