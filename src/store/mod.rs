//! The sled store: typed access to the `profiles`, `outbox`, `dead` and `meta` trees.
//!
//! Invariants:
//! - a profile version and the export it caused are written in one transaction, so the store
//!   never holds one without the other;
//! - export sequence numbers only grow; an export keeps its number (and so its id) for life,
//!   also when it moves to `dead` and back;
//! - `meta/tally` counts the entries of `outbox` and `dead` and the bytes of their values,
//!   kept in the same transactions that change those trees (sled can only count by walking);
//! - nothing is acknowledged before [`Store::flush`] has returned;
//! - after an I/O error (a full disk) sled fails every write until the store is reopened:
//!   the sled handles sit behind a swappable `Trees`, which [`Store::recover`] replaces once
//!   there is room, so holders of `Arc<Store>` keep working; the sequence watermarks are
//!   re-read from the reopened store, the run clock carries on;
//! - a record that cannot be decoded stops nothing: exports become dead letters
//!   ([`unreadable_record`]), profiles refuse their updates until `outpost repair`, derived
//!   `meta` values are rebuilt at open;
//! - every export carries the store's run time when it was queued (`queued_at_uptime_ms`), and
//!   `meta/clock` the run time at the last checkpoint ([`crate::clock`]);
//! - exports below [`Store::durable_next_seq`] are durable; delivery reads only those.

pub mod backfill;
pub mod codec;
pub mod committer;
pub mod keys;
pub mod mapping;
pub mod outbox;
pub mod source;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use serde_json::Value;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;

use crate::clock::{self, ClockRecord, RunClock};
use crate::config::Mapping;
use crate::profile::apply::{apply, StoreAction, StoredProfile, UpdateResult};
use crate::profile::{Reason, Update};
use codec::{ExportRecord, ProfileRecord};
use keys::meta;

/// The on-disk layout this build writes and reads. Format 2 added the run-time clock
/// (`meta/clock`, exports of format 2).
pub const FORMAT_VERSION: u64 = 2;
/// Older layouts this build opens, and upgrades by recording [`FORMAT_VERSION`]: their values
/// stay readable as they are (see [`codec`]). An older build then refuses the store whole.
const UPGRADABLE_FORMATS: &[u64] = &[1];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store at {0} is in use by another process (is `outpost run` running on it?)")]
    Locked(PathBuf),
    #[error("{}", open_message(.path, .source))]
    Open { path: PathBuf, source: sled::Error },
    #[error(
        "the store at {path} has format {found}, this outpost reads formats 1 to {FORMAT_VERSION}"
    )]
    Format { path: PathBuf, found: u64 },
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store: cannot sync to disk: {0}")]
    Sync(std::io::Error),
    #[error("store: corrupt {what}: {detail}")]
    Corrupt { what: String, detail: String },
    #[error(
        "the stored version of profile `{id}` is unreadable ({detail}); its updates are refused \
         until `outpost repair` forgets it (`outpost check --store` lists unreadable records)"
    )]
    UnreadableProfile { id: String, detail: String },
    /// The disk holding the store is full: sled fails every write until the store is
    /// reopened, which [`Store::recover`] does once there is room again.
    #[error("no space left on device for the store at {0}")]
    NoSpace(PathBuf),
    /// Another I/O error from the disk; the store is reopened as after a full disk.
    #[error("I/O error on the store at {path}: {detail}")]
    Io { path: PathBuf, detail: String },
    /// The store is being reopened after an I/O error.
    #[error("the store at {0} is being reopened after an I/O error")]
    Reopening(PathBuf),
}

/// An I/O error as people read it: sled passes some on wrapped in their debug form.
fn io_detail(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code).to_string(),
        None if e.get_ref().is_some() => format!("{:?} error", e.kind()),
        None => e.to_string(),
    }
}

/// Whether an I/O error means the disk (or the user's quota on it) is full.
pub fn is_no_space(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || matches!(e.raw_os_error(), Some(28 | 122))
    // ENOSPC, EDQUOT
}

/// What to do when the store cannot be opened, where [`crate::explain`] knows; else the error.
fn open_message(path: &Path, source: &sled::Error) -> String {
    crate::explain::store_open(path, source)
        .unwrap_or_else(|| format!("cannot open the store at {}: {source}", path.display()))
}

impl StoreError {
    /// Whether the error is passing: the disk is full or was, and the store comes back by
    /// itself once there is room (callers answer 503 with `Retry-After`).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::NoSpace(_) | StoreError::Io { .. } | StoreError::Reopening(_)
        )
    }

    fn corrupt(what: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        StoreError::Corrupt {
            what: what.into(),
            detail: detail.to_string(),
        }
    }
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Sled(e),
        }
    }
}

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

fn abort(e: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e)
}

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
        if store.len() != 8 {
            return Err(bad());
        }
        Ok(ExportId {
            store: u32::from_str_radix(store, 16).map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// An export as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub id: ExportId,
    pub dead: bool,
    pub record: ExportRecord,
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

/// What one request's updates did, as `POST /v1/updates` and `outpost ingest` report it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BatchSummary {
    pub accepted: u64,
    pub exports: u64,
    pub unchanged: u64,
    pub stale: u64,
    pub deleted: u64,
    /// Exports by [`Reason`] code.
    #[serde(skip)]
    pub by_reason: [u64; 4],
}

impl BatchSummary {
    pub fn add(&mut self, other: &BatchSummary) {
        self.accepted += other.accepted;
        self.exports += other.exports;
        self.unchanged += other.unchanged;
        self.stale += other.stale;
        self.deleted += other.deleted;
        for (mine, theirs) in self.by_reason.iter_mut().zip(other.by_reason) {
            *mine += theirs;
        }
    }

    pub fn exports_for(&self, reason: Reason) -> u64 {
        self.by_reason[reason.code() as usize]
    }

    /// The summary with `exports_by_reason`, as `outpost ingest --json` prints it.
    pub fn report(&self) -> Value {
        let mut value = serde_json::to_value(self).expect("summary serializes");
        value["exports_by_reason"] = Reason::ALL
            .iter()
            .map(|r| (r.as_str().to_owned(), Value::from(self.exports_for(*r))))
            .collect();
        value
    }

    /// Reads back what [`BatchSummary::report`] wrote.
    pub fn from_report(value: &Value) -> Option<BatchSummary> {
        let field = |name: &str| value.get(name)?.as_u64();
        let mut summary = BatchSummary {
            accepted: field("accepted")?,
            exports: field("exports")?,
            unchanged: field("unchanged")?,
            stale: field("stale")?,
            deleted: field("deleted")?,
            by_reason: [0; 4],
        };
        for reason in Reason::ALL {
            summary.by_reason[reason.code() as usize] = value
                .get("exports_by_reason")?
                .get(reason.as_str())?
                .as_u64()?;
        }
        Some(summary)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OutboxStats {
    pub pending: u64,
    pub dead: u64,
    pub oldest_pending_created_at: Option<String>,
    /// Wall-clock age, for people: misleading while the clock is or was wrong.
    pub oldest_pending_age_s: Option<i64>,
    /// How long the oldest pending export has waited in agent run time: what
    /// `delivery.max_age_s` is compared with.
    pub oldest_pending_waited_s: Option<u64>,
    pub bytes: u64,
    /// Profiles stored; left out by [`Store::outbox_stats`] (counting walks the profile tree).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profiles: Option<u64>,
    pub store_id: String,
    /// The run time of the store (agents' running time, summed over runs).
    pub run_time_s: u64,
    /// Wall-clock jumps noticed on this store.
    pub clock_jumps: u64,
    pub last_clock_jump: Option<ClockJumpReport>,
    /// The backfill in progress (members of newly mapped segments being exported).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backfill: Option<backfill::BackfillProgress>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ClockJumpReport {
    /// Positive: the clock was set forward.
    pub by_s: i64,
    pub noticed_at: String,
}

/// Which exports `list` returns.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub dead: bool,
    pub profile_id: Option<String>,
    /// 0: all.
    pub limit: usize,
}

/// The sled handles of an open store. They are replaced as a whole when the store is reopened
/// after an I/O error ([`Store::recover`]); holders of `Arc<Store>` keep working.
pub(crate) struct Trees {
    db: sled::Db,
    pub(crate) profiles: sled::Tree,
    pub(crate) outbox: sled::Tree,
    pub(crate) dead: sled::Tree,
    pub(crate) meta: sled::Tree,
    /// Stream positions and rejected stream messages (see [`source`]).
    pub(crate) positions: sled::Tree,
    pub(crate) rejected: sled::Tree,
    /// The log file, fsynced after each flush: sled's own flush does not reach the drive.
    log_file: Option<File>,
    /// Which opening of the store these handles come from: an error from the handles of an
    /// earlier opening (a call that began before a reopen) does not fail the current one.
    generation: u64,
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
    /// The [`Trees::generation`] in use.
    generation: AtomicU64,
    store_id: u32,
    /// Written while exports are put back under their old (lower) sequence numbers or dropped,
    /// read while the delivery loop starts requests; `rewound` then makes the loop read the
    /// outbox again from its head (see [`Store::unless_rewound`]).
    rewind_lock: RwLock<()>,
    rewound: AtomicBool,
    /// The store's run time as this process counts it, from the last checkpoint on.
    run_clock: RunClock,
    /// `next_seq` as the last committed transaction left it, and as the last completed flush
    /// made durable: exports below `durable_next` survive any crash, so delivery reads only
    /// those (an export is never sent before the update that caused it is acknowledged).
    written_next: AtomicU64,
    durable_next: AtomicU64,
    /// Unreadable `meta` values rebuilt when the store was opened (see [`rebuild_meta`]).
    rebuilt_meta: std::sync::Mutex<Vec<String>>,
}

/// The reason (`last_error`) of a dead letter made of an unreadable export record.
pub const UNREADABLE: &str = "unreadable record";

/// The dead letter that stands for an export record that cannot be decoded: no profile, its
/// stored bytes (base64) as the payload, so that nothing is lost and nothing is sent from it
/// (`outbox retry` refuses it; `outbox drop` deletes it).
pub fn unreadable_record(bytes: &[u8], error: &str, now_ms: i64) -> ExportRecord {
    use base64::Engine;
    let stored = base64::engine::general_purpose::STANDARD.encode(bytes);
    ExportRecord {
        profile_id: String::new(),
        reason: 0,
        payload: serde_json::json!({ "unreadable_record_base64": stored }).to_string(),
        created_at_ms: now_ms,
        queued_at_ms: now_ms,
        queued_at_uptime_ms: 0,
        attempts: 0,
        last_error: Some(format!("{UNREADABLE}: {error}")),
        last_attempt_at_ms: None,
        dead_at_ms: Some(now_ms),
    }
}

impl ExportRecord {
    /// Whether this is a dead letter made by [`unreadable_record`].
    pub fn is_unreadable(&self) -> bool {
        self.profile_id.is_empty()
            && self
                .last_error
                .as_deref()
                .is_some_and(|e| e.starts_with(UNREADABLE))
    }
}

/// What opening a store read from it.
struct Opened {
    store_id: u32,
    clock: ClockRecord,
    next_seq: u64,
    /// Unreadable `meta` values rebuilt at open, described.
    rebuilt: Vec<String>,
}

/// How far past the highest export held a rebuilt `next_seq` starts: exports delivered or
/// dropped before may have had higher numbers, and an export id must never be reused.
const NEXT_SEQ_GAP: u64 = 1 << 32;

/// Rebuilds the `meta` values that are derived from the rest of the store when their bytes
/// cannot be read: `tally` is recounted, `next_seq` starts [`NEXT_SEQ_GAP`] past the highest
/// export held, `clock` starts again (run time 0, which delays expiry, never hastens it).
/// Returns what it did, one line each; flushed when anything was done.
fn rebuild_meta(t: &Trees) -> Result<Vec<String>, StoreError> {
    let mut rebuilt = Vec::new();
    if let Some(v) = t.meta.get(meta::CLOCK)? {
        if let Err(e) = codec::decode_clock(&v) {
            t.meta
                .insert(meta::CLOCK, codec::encode_clock(&ClockRecord::default()))?;
            rebuilt.push(format!(
                "meta/clock was unreadable ({e}); the run time starts again from 0"
            ));
        }
    }
    if let Some(v) = t.meta.get(meta::NEXT_SEQ)? {
        if v.len() != 8 {
            let mut highest = None;
            for tree in [&t.outbox, &t.dead] {
                for key in tree.iter().keys() {
                    highest = highest.max(keys::seq_from_key(&key?));
                }
            }
            let next = highest.map_or(0, |h| h + 1) + NEXT_SEQ_GAP;
            t.meta.insert(meta::NEXT_SEQ, &next.to_be_bytes())?;
            rebuilt.push(format!(
                "meta/next_seq was unreadable (not 8 bytes); new exports are numbered from {next}"
            ));
        }
    }
    if let Some(v) = t.meta.get(meta::TALLY)? {
        if Tally::from_bytes(&v).is_none() {
            let mut tally = Tally::default();
            for (tree, place) in [(&t.outbox, Place::Pending), (&t.dead, Place::Dead)] {
                for item in tree.iter() {
                    let (_, value) = item?;
                    tally.count(place, value.len(), 1);
                }
            }
            t.meta.insert(meta::TALLY, &tally.to_bytes())?;
            rebuilt.push(format!(
                "meta/tally was unreadable (not 24 bytes); recounted: {} pending, {} dead",
                tally.pending, tally.dead
            ));
        }
    }
    if !rebuilt.is_empty() {
        t.db.flush()?;
    }
    Ok(rebuilt)
}

/// A record that cannot be read, as `outpost check --store` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UnreadableRecord {
    /// `profiles`, `outbox`, `dead` or `meta`.
    pub tree: &'static str,
    /// The key: a profile id, an export id, a meta key (bytes shown escaped when not text).
    pub key: String,
    pub error: String,
    /// What `outpost repair` does with it, or did already.
    pub action: String,
}

fn key_text(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) => text.to_owned(),
        Err(_) => key.escape_ascii().to_string(),
    }
}

/// How much [`Store::recover`] writes beside a failed store, to see whether there is room.
pub const SPACE_PROBE_BYTES: usize = 1 << 20;

/// Writes, syncs and removes [`SPACE_PROBE_BYTES`] in `dir`.
fn probe_space(dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let path = dir.join("space-probe");
    let result = (|| {
        let mut file = File::create(&path)?;
        file.write_all(&vec![0u8; SPACE_PROBE_BYTES])?;
        file.sync_all()
    })();
    let _ = std::fs::remove_file(&path);
    result
}

fn read_u64(tree: &TransactionalTree, key: &[u8]) -> TxResult<u64> {
    match tree.get(key)? {
        None => Ok(0),
        Some(v) => {
            let bytes: [u8; 8] = v.as_ref().try_into().map_err(|_| {
                abort(StoreError::corrupt(
                    String::from_utf8_lossy(key),
                    "not 8 bytes",
                ))
            })?;
            Ok(u64::from_be_bytes(bytes))
        }
    }
}

fn write_u64(tree: &TransactionalTree, key: &[u8], value: u64) -> TxResult<()> {
    tree.insert(key, &value.to_be_bytes())?;
    Ok(())
}

/// Counts kept exact by every transaction that touches `outbox` or `dead`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    pub pending: u64,
    pub dead: u64,
    /// Bytes of the stored values of pending and dead exports.
    pub bytes: u64,
}

impl Tally {
    fn to_bytes(self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[..8].copy_from_slice(&self.pending.to_be_bytes());
        out[8..16].copy_from_slice(&self.dead.to_be_bytes());
        out[16..].copy_from_slice(&self.bytes.to_be_bytes());
        out
    }

    fn from_bytes(bytes: &[u8]) -> Option<Tally> {
        let word = |i: usize| {
            Some(u64::from_be_bytes(
                bytes.get(i * 8..i * 8 + 8)?.try_into().ok()?,
            ))
        };
        if bytes.len() != 24 {
            return None;
        }
        Some(Tally {
            pending: word(0)?,
            dead: word(1)?,
            bytes: word(2)?,
        })
    }

    /// Adds (`sign` 1) or takes away (`sign` -1) one stored value in `place`.
    fn count(&mut self, place: Place, value_len: usize, sign: i64) {
        let apply = |n: &mut u64, by: u64| {
            *n = if sign > 0 {
                *n + by
            } else {
                n.saturating_sub(by)
            };
        };
        match place {
            Place::Pending => apply(&mut self.pending, 1),
            Place::Dead => apply(&mut self.dead, 1),
            Place::Gone => return,
        }
        apply(&mut self.bytes, value_len as u64);
    }
}

fn read_tally(tree: &TransactionalTree) -> TxResult<Tally> {
    match tree.get(meta::TALLY)? {
        None => Ok(Tally::default()),
        Some(v) => {
            Tally::from_bytes(&v).ok_or_else(|| abort(StoreError::corrupt("tally", "not 24 bytes")))
        }
    }
}

fn write_tally(tree: &TransactionalTree, tally: Tally) -> TxResult<()> {
    tree.insert(meta::TALLY, &tally.to_bytes())?;
    Ok(())
}

/// A new pending export, encoded.
fn new_export(
    profile_id: &str,
    reason: Reason,
    payload: &Value,
    created_at_ms: i64,
    queued_at_uptime_ms: u64,
) -> Vec<u8> {
    codec::encode_export(&ExportRecord {
        profile_id: profile_id.to_owned(),
        reason: reason.code(),
        payload: payload.to_string(),
        created_at_ms,
        queued_at_ms: created_at_ms,
        queued_at_uptime_ms,
        attempts: 0,
        last_error: None,
        last_attempt_at_ms: None,
        dead_at_ms: None,
    })
}

/// Appends encoded exports to the outbox under the next sequence numbers, counting them in
/// the tally; returns the next sequence number after them.
fn append_exports(
    outbox: &TransactionalTree,
    meta_tx: &TransactionalTree,
    exports: &[Vec<u8>],
) -> TxResult<u64> {
    let mut next_seq = read_u64(meta_tx, meta::NEXT_SEQ)?;
    let mut tally = read_tally(meta_tx)?;
    for value in exports {
        tally.count(Place::Pending, value.len(), 1);
        outbox.insert(&keys::seq_key(next_seq), value.as_slice())?;
        next_seq += 1;
    }
    write_u64(meta_tx, meta::NEXT_SEQ, next_seq)?;
    write_tally(meta_tx, tally)?;
    Ok(next_seq)
}

fn stored_from_record(id: &str, record: ProfileRecord) -> Result<StoredProfile, StoreError> {
    let profile = serde_json::from_str(&record.json)
        .map_err(|e| StoreError::corrupt(format!("profile {id}"), e))?;
    let timestamp = record
        .timestamp_micros
        .map(|us| {
            Utc.timestamp_micros(us)
                .single()
                .ok_or_else(|| StoreError::corrupt(format!("profile {id}"), "bad timestamp"))
        })
        .transpose()?;
    Ok(StoredProfile { timestamp, profile })
}

fn record_from_stored(stored: &StoredProfile) -> ProfileRecord {
    ProfileRecord {
        timestamp_micros: stored.timestamp.map(|t| t.timestamp_micros()),
        json: stored.profile.to_string(),
    }
}

impl Store {
    /// Opens (or creates) the store. A store open in another process is [`StoreError::Locked`].
    ///
    /// A lock is retried for a moment: sled's threads release it shortly after a store is
    /// dropped, so a store closed just before (by this or an exiting process) opens.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        let (trees, opened) = Store::open_trees(path, cache_bytes)?;
        Ok(Store {
            path: path.to_path_buf(),
            cache_bytes,
            trees: RwLock::new(Some(Arc::new(trees))),
            failed: AtomicBool::new(false),
            failed_no_space: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            run_clock: RunClock::starting_at(opened.clock.uptime_ms),
            store_id: opened.store_id,
            rewind_lock: RwLock::new(()),
            rewound: AtomicBool::new(false),
            written_next: AtomicU64::new(opened.next_seq),
            durable_next: AtomicU64::new(opened.next_seq),
            rebuilt_meta: std::sync::Mutex::new(opened.rebuilt),
        })
    }

    fn open_trees(path: &Path, cache_bytes: u64) -> Result<(Trees, Opened), StoreError> {
        let mut tries = 0;
        loop {
            match Store::open_once(path, cache_bytes) {
                Err(StoreError::Locked(_)) if tries < 10 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                result => return result,
            }
        }
    }

    fn open_once(path: &Path, cache_bytes: u64) -> Result<(Trees, Opened), StoreError> {
        std::fs::create_dir_all(path).map_err(|e| {
            tracing::debug!(error = ?e, path = %path.display(), "creating the store folder");
            StoreError::Open {
                path: path.to_path_buf(),
                source: sled::Error::Io(e),
            }
        })?;
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| match e {
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
                meta.insert(meta::FORMAT, &FORMAT_VERSION.to_be_bytes())?;
            }
            Some(v) => {
                let found = v
                    .as_ref()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .unwrap_or(u64::MAX);
                if UPGRADABLE_FORMATS.contains(&found) {
                    meta.insert(meta::FORMAT, &FORMAT_VERSION.to_be_bytes())?;
                    db.flush()?;
                } else if found != FORMAT_VERSION {
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
                id
            }
        };
        let log_file = File::open(path.join("db")).ok();
        let trees = Trees {
            profiles: db.open_tree("profiles")?,
            outbox: db.open_tree("outbox")?,
            dead: db.open_tree("dead")?,
            positions: db.open_tree("positions")?,
            rejected: db.open_tree("rejected")?,
            meta,
            db,
            log_file,
            generation: 0,
        };
        let rebuilt = rebuild_meta(&trees)?;
        for note in &rebuilt {
            tracing::warn!("{note}");
        }
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
        f(&trees).map_err(|e| self.classify(e, trees.generation))
    }

    /// Names the store in an I/O error and marks the store failed, if the error came from the
    /// handles in use (`generation`).
    fn classify(&self, e: StoreError, generation: u64) -> StoreError {
        let io = match &e {
            StoreError::Sled(sled::Error::Io(io)) | StoreError::Sync(io) => io,
            _ => return e,
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
        probe_space(&self.path).map_err(|e| {
            if is_no_space(&e) {
                StoreError::NoSpace(self.path.clone())
            } else {
                StoreError::Io {
                    path: self.path.clone(),
                    detail: io_detail(&e),
                }
            }
        })?;
        let old = self.trees.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut old) = old {
            // Calls that took the handles before finish (their writes fail); sled lets one
            // open at a time, so every handle must be gone before the next open.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match Arc::try_unwrap(old) {
                    Ok(trees) => {
                        drop(trees);
                        break;
                    }
                    Err(still_shared) if Instant::now() < deadline => {
                        old = still_shared;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(still_shared) => {
                        *self.trees.write().unwrap_or_else(|e| e.into_inner()) = Some(still_shared);
                        return Err(StoreError::Io {
                            path: self.path.clone(),
                            detail: "its handles are still in use; reopening later".into(),
                        });
                    }
                }
            }
        }
        // sled's threads release the file lock shortly after the last handle goes.
        let mut tries = 0;
        let (mut trees, opened) = loop {
            match Store::open_trees(&self.path, self.cache_bytes) {
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
        if let Some(file) = &trees.log_file {
            // What the reopened store read is on the drive before anything is sent from it.
            file.sync_data().map_err(StoreError::Sync)?;
        }
        self.rebuilt_meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(opened.rebuilt);
        self.written_next.store(opened.next_seq, Ordering::SeqCst);
        self.durable_next.store(opened.next_seq, Ordering::SeqCst);
        trees.generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        *self.trees.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(trees));
        self.failed.store(false, Ordering::SeqCst);
        self.failed_no_space.store(false, Ordering::SeqCst);
        tracing::info!(store = %self.path.display(), "the store was reopened; it takes writes again");
        Ok(true)
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

    /// Makes every earlier write durable: sled's flush, then an fsync of its log file.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.with(|t| {
            let written = self.written_next.load(Ordering::SeqCst);
            t.db.flush()?;
            if let Some(file) = &t.log_file {
                file.sync_data().map_err(StoreError::Sync)?;
            }
            self.durable_next.fetch_max(written, Ordering::SeqCst);
            Ok(())
        })
    }

    /// Every export below this sequence number is durable.
    pub fn durable_next_seq(&self) -> u64 {
        self.durable_next.load(Ordering::SeqCst)
    }

    /// Applies each group of updates in order, all in ONE transaction, and returns a summary per
    /// group. Nothing is durable until [`Store::flush`].
    ///
    /// The decisions are made before the transaction, reading the stored versions directly:
    /// that is sound because there is one writer of `profiles` (the committer, or the CLI
    /// holding the store alone), and it keeps the transaction, which sled may re-run, short.
    ///
    /// A group that updates a profile whose stored version cannot be read is refused whole
    /// ([`StoreError::UnreadableProfile`]) and the others go on: see [`Store::apply_each`].
    /// This returns the first such refusal.
    pub fn apply_groups(
        &self,
        groups: &[&[Update]],
        mapping: &Mapping,
        received_at: DateTime<Utc>,
    ) -> Result<Vec<BatchSummary>, StoreError> {
        self.apply_each(groups, mapping, received_at, &[])?
            .into_iter()
            .collect()
    }

    /// [`Store::apply_groups`], with a result per group: a group that touches an unreadable
    /// profile stores nothing and gets [`StoreError::UnreadableProfile`]. `consumed` says, for
    /// groups from a stream, how far its partition was consumed (and the messages of it that
    /// were rejected): recorded in the same transaction, for the groups that are stored.
    pub fn apply_each(
        &self,
        groups: &[&[Update]],
        mapping: &Mapping,
        received_at: DateTime<Utc>,
        consumed: &[(usize, source::SourcePosition)],
    ) -> Result<Vec<Result<BatchSummary, StoreError>>, StoreError> {
        let created_at_ms = received_at.timestamp_millis();
        let queued_at_uptime_ms = self.run_clock.uptime_ms();
        // The latest version of each profile touched, and whether it must be written.
        let mut versions: HashMap<&str, (Option<StoredProfile>, bool)> = HashMap::new();
        let mut exports: Vec<Vec<u8>> = Vec::new();
        let mut summaries = Vec::with_capacity(groups.len());
        'groups: for group in groups {
            // Every profile of the group is read before any update of it is applied, so that a
            // refused group leaves nothing behind.
            for update in group.iter() {
                let id = update.id.as_str();
                if !versions.contains_key(id) {
                    match self.profile(id) {
                        Ok(version) => {
                            versions.insert(id, (version, false));
                        }
                        Err(StoreError::Corrupt { detail, .. }) => {
                            tracing::warn!(
                                profile = id,
                                "{detail}: an update of an unreadable profile is refused"
                            );
                            summaries.push(Err(StoreError::UnreadableProfile {
                                id: id.to_owned(),
                                detail,
                            }));
                            continue 'groups;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            let mut summary = BatchSummary::default();
            for update in group.iter() {
                let id = update.id.as_str();
                let (version, dirty) = versions.get_mut(id).expect("inserted above");
                let applied = apply(version.as_ref(), update, mapping, received_at);
                summary.accepted += 1;
                match applied.result {
                    UpdateResult::Exported => {}
                    UpdateResult::Unchanged => summary.unchanged += 1,
                    UpdateResult::Stale => summary.stale += 1,
                    UpdateResult::Deleted => summary.deleted += 1,
                }
                match applied.store {
                    StoreAction::Keep => {}
                    StoreAction::Put(new) => (*version, *dirty) = (Some(new), true),
                    StoreAction::Remove => (*version, *dirty) = (None, true),
                }
                if let Some((reason, payload)) = applied.export {
                    exports.push(new_export(
                        &update.id,
                        reason,
                        &payload,
                        created_at_ms,
                        queued_at_uptime_ms,
                    ));
                    summary.exports += 1;
                    summary.by_reason[reason.code() as usize] += 1;
                }
            }
            summaries.push(Ok(summary));
        }
        let mut writes: Vec<(&str, Option<Vec<u8>>)> = versions
            .into_iter()
            .filter(|(_, (_, dirty))| *dirty)
            .map(|(id, (version, _))| {
                (
                    id,
                    version.map(|v| codec::encode_profile(&record_from_stored(&v))),
                )
            })
            .collect();
        // In key order, sled touches each leaf once rather than hopping between them.
        writes.sort_unstable_by(|a, b| a.0.cmp(b.0));

        // A refused group's stream position is not recorded: its messages come again.
        let consumed: Vec<source::SourcePosition> = consumed
            .iter()
            .filter(|(group, _)| summaries.get(*group).is_some_and(Result::is_ok))
            .map(|(_, position)| position.clone())
            .collect();
        let next_seq = self.with(|t| {
            let trees = (&t.profiles, &t.outbox, &t.meta, &t.positions, &t.rejected);
            Ok(
                trees.transaction(|(profiles, outbox, meta_tx, positions, rejected)| {
                    source::write(positions, rejected, &consumed)?;
                    for (id, value) in &writes {
                        match value {
                            Some(bytes) => profiles.insert(id.as_bytes(), bytes.as_slice())?,
                            None => profiles.remove(id.as_bytes())?,
                        };
                    }
                    append_exports(outbox, meta_tx, &exports)
                })?,
            )
        })?;
        self.written_next.fetch_max(next_seq, Ordering::SeqCst);
        Ok(summaries)
    }

    pub fn profile(&self, id: &str) -> Result<Option<StoredProfile>, StoreError> {
        self.with(|t| match t.profiles.get(id.as_bytes())? {
            None => Ok(None),
            Some(bytes) => {
                let record = codec::decode_profile(&bytes)
                    .map_err(|e| StoreError::corrupt(format!("profile {id}"), e))?;
                stored_from_record(id, record).map(Some)
            }
        })
    }

    fn decode_export(&self, key: &[u8], value: &[u8], dead: bool) -> Result<Export, StoreError> {
        let seq = keys::seq_from_key(key)
            .ok_or_else(|| StoreError::corrupt("export key", format!("{key:?}")))?;
        let record = codec::decode_export(value)
            .map_err(|e| StoreError::corrupt(format!("export {seq}"), e))?;
        Ok(Export {
            id: self.export_id(seq),
            dead,
            record,
        })
    }

    /// [`Store::decode_export`] for people reading the outbox (`outbox list`, `show`,
    /// `stats`): an unreadable record under an export key reads as the dead letter
    /// [`unreadable_record`] it becomes (nothing is written here), so one bad record does not
    /// hide the others.
    fn decode_export_for_people(
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
        for item in tree.iter() {
            if exports.len() >= limit {
                break;
            }
            let (key, value) = item.map_err(|e| self.classify(e.into(), t.generation))?;
            let export = self.decode_export_for_people(&key, &value, filter.dead)?;
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

    pub fn stats(&self, now: DateTime<Utc>) -> Result<OutboxStats, StoreError> {
        let mut stats = self.outbox_stats(now)?;
        stats.profiles = Some(self.trees()?.profiles.len() as u64);
        Ok(stats)
    }

    /// [`Store::stats`] without the count of profiles, which walks the profile tree: cheap
    /// enough to read every second (`outpost top`, `GET /metrics`).
    pub fn outbox_stats(&self, now: DateTime<Utc>) -> Result<OutboxStats, StoreError> {
        let first = self.with(|t| Ok(t.outbox.first()?))?;
        let oldest = match first {
            Some((key, value)) => Some(self.decode_export_for_people(&key, &value, false)?)
                .filter(|e| !e.record.is_unreadable()),
            None => None,
        };
        let tally = self.tally()?;
        let uptime_ms = self.run_clock.uptime_ms();
        let clock = self.clock_record()?;
        Ok(OutboxStats {
            pending: tally.pending,
            dead: tally.dead,
            oldest_pending_created_at: oldest.as_ref().map(|e| format_ms(e.record.created_at_ms)),
            oldest_pending_age_s: oldest
                .as_ref()
                .map(|e| (now.timestamp_millis() - e.record.created_at_ms).max(0) / 1000),
            oldest_pending_waited_s: oldest
                .map(|e| clock::waited_ms(uptime_ms, e.record.queued_at_uptime_ms) / 1000),
            bytes: tally.bytes,
            profiles: None,
            store_id: format!("{:08x}", self.store_id),
            run_time_s: uptime_ms / 1000,
            clock_jumps: clock.jumps,
            last_clock_jump: clock.last_jump.map(|j| ClockJumpReport {
                by_s: clock::whole_seconds(j.by_ms),
                noticed_at: format_ms(j.noticed_at_ms),
            }),
            backfill: self.backfill_progress()?,
        })
    }

    /// Whether the outbox (pending and dead) holds `max_bytes` or more: then nothing more is
    /// taken in (`storage.max_outbox_bytes`).
    pub fn outbox_full(&self, max_bytes: u64) -> Result<bool, StoreError> {
        Ok(self.tally()?.bytes >= max_bytes)
    }

    /// Pending and dead counts and bytes, read without walking the trees.
    pub fn tally(&self) -> Result<Tally, StoreError> {
        self.with(|t| match t.meta.get(meta::TALLY)? {
            None => Ok(Tally::default()),
            Some(v) => {
                Tally::from_bytes(&v).ok_or_else(|| StoreError::corrupt("tally", "not 24 bytes"))
            }
        })
    }

    /// Checks the invariants a crash must not break; returns what is wrong, if anything.
    pub fn verify(&self) -> Result<Vec<String>, StoreError> {
        let mut problems = Vec::new();
        let mut counted = Tally::default();
        let mut max_seq = None;
        let t = self.trees()?;
        for (tree, place) in [(&t.outbox, Place::Pending), (&t.dead, Place::Dead)] {
            for item in tree.iter() {
                let (key, value) = item?;
                counted.count(place, value.len(), 1);
                match self.decode_export(&key, &value, place == Place::Dead) {
                    Ok(e) => max_seq = max_seq.max(Some(e.id.seq)),
                    Err(e) => problems.push(e.to_string()),
                }
            }
        }
        for item in t.profiles.iter() {
            let (key, value) = item?;
            let id = String::from_utf8_lossy(&key).into_owned();
            let decoded = codec::decode_profile(&value)
                .map_err(|e| StoreError::corrupt(&id, e))
                .and_then(|r| stored_from_record(&id, r));
            if let Err(e) = decoded {
                problems.push(e.to_string());
            }
        }
        let recorded = self.tally()?;
        if recorded != counted {
            problems.push(format!(
                "the tally says {recorded:?}, the trees hold {counted:?}"
            ));
        }
        let next = t
            .meta
            .get(meta::NEXT_SEQ)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0);
        if let Some(max) = max_seq {
            if max >= next {
                problems.push(format!("export {max} is not below next_seq {next}"));
            }
        }
        Ok(problems)
    }
}

/// Where an export goes in [`Store::change_export`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Pending,
    Dead,
    Gone,
}

impl Store {
    /// Runs `change`, which puts exports back into the outbox under their old sequence numbers
    /// or drops pending ones, while the delivery loop starts nothing (see
    /// [`Store::unless_rewound`]); the loop then reads the outbox again from its head.
    pub fn rewinding<T>(&self, change: impl FnOnce() -> T) -> T {
        let _guard = self.rewind_lock.write().unwrap_or_else(|e| e.into_inner());
        let result = change();
        self.rewound.store(true, Ordering::SeqCst);
        result
    }

    /// Runs `start` while no [`Store::rewinding`] can run, telling it whether exports were put
    /// back or dropped since the last call: then whatever the caller holds of the outbox is out
    /// of date, and it must read again from the head before starting anything.
    pub fn unless_rewound<T>(&self, start: impl FnOnce(bool) -> T) -> T {
        let _guard = self.rewind_lock.read().unwrap_or_else(|e| e.into_inner());
        start(self.rewound.swap(false, Ordering::SeqCst))
    }

    /// Up to `limit` durable pending exports from `*cursor` on, oldest first, for a reader that
    /// keeps its place between calls; `*cursor` moves past the last one returned.
    pub fn read_pending(&self, cursor: &mut u64, limit: usize) -> Result<Vec<Export>, StoreError> {
        let until = self.durable_next_seq();
        if *cursor >= until {
            return Ok(Vec::new());
        }
        let mut exports = Vec::new();
        let mut unreadable = Vec::new();
        let mut seen = 0;
        let t = self.trees()?;
        for item in t
            .outbox
            .range(keys::seq_key(*cursor)..keys::seq_key(until))
            .take(limit)
        {
            seen += 1;
            let (key, value) = item.map_err(|e| self.classify(e.into(), t.generation))?;
            match self.decode_export(&key, &value, false) {
                Ok(export) => {
                    *cursor = export.id.seq + 1;
                    exports.push(export);
                }
                Err(e) => match keys::seq_from_key(&key) {
                    Some(seq) => {
                        *cursor = seq + 1;
                        unreadable.push((seq, e.to_string()));
                    }
                    None => tracing::warn!(
                        key = ?key.as_ref(),
                        "an outbox key that is not a sequence number is passed over; `outpost check --store` lists it"
                    ),
                },
            }
        }
        drop(t);
        for (seq, error) in unreadable {
            tracing::warn!(
                export = %self.export_id(seq),
                "{error}; it goes to the dead letters as \"{UNREADABLE}\""
            );
            self.dead_letter_unreadable(seq, &error)?;
        }
        if seen < limit {
            *cursor = until;
        }
        Ok(exports)
    }

    /// Moves the pending export `seq`, whose record cannot be read, to the dead letters as an
    /// [`unreadable_record`] keeping its bytes. Not flushed.
    pub fn dead_letter_unreadable(&self, seq: u64, error: &str) -> Result<(), StoreError> {
        let key = keys::seq_key(seq);
        let now_ms = Utc::now().timestamp_millis();
        self.with(|t| {
            Ok(
                (&t.outbox, &t.dead, &t.meta).transaction(|(outbox, dead, meta_tx)| {
                    let Some(old) = outbox.remove(&key)? else {
                        return Ok(());
                    };
                    let mut tally = read_tally(meta_tx)?;
                    tally.count(Place::Pending, old.len(), -1);
                    let value = codec::encode_export(&unreadable_record(&old, error, now_ms));
                    tally.count(Place::Dead, value.len(), 1);
                    dead.insert(&key, value)?;
                    write_tally(meta_tx, tally)?;
                    Ok(())
                })?,
            )
        })
    }

    /// Every record that cannot be read, with its key, and the `meta` values rebuilt when the
    /// store was opened.
    pub fn unreadable(&self) -> Result<Vec<UnreadableRecord>, StoreError> {
        let mut found = Vec::new();
        for note in self
            .rebuilt_meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let (key, error) = note
                .split_once(" was unreadable ")
                .unwrap_or(("meta", note));
            found.push(UnreadableRecord {
                tree: "meta",
                key: key.trim_start_matches("meta/").to_owned(),
                error: format!("was unreadable {error}"),
                action: "rebuilt when the store was opened".into(),
            });
        }
        let t = self.trees()?;
        for item in t.profiles.iter() {
            let (key, value) = item?;
            let id = key_text(&key);
            let decoded = codec::decode_profile(&value)
                .map_err(|e| StoreError::corrupt(&id, e))
                .and_then(|r| stored_from_record(&id, r));
            if let Err(e) = decoded {
                found.push(UnreadableRecord {
                    tree: "profiles",
                    key: id,
                    error: e.to_string(),
                    action: "forget the profile (its next update counts it as new)".into(),
                });
            }
        }
        for (tree, name, dead) in [(&t.outbox, "outbox", false), (&t.dead, "dead", true)] {
            for item in tree.iter() {
                let (raw, value) = item?;
                let Err(e) = self.decode_export(&raw, &value, dead) else {
                    continue;
                };
                let (key, action) = match keys::seq_from_key(&raw) {
                    Some(seq) => (
                        self.export_id(seq).to_string(),
                        "keep it as a dead letter \"unreadable record\" with its bytes",
                    ),
                    None => (key_text(&raw), "delete it (the key is not an export id)"),
                };
                found.push(UnreadableRecord {
                    tree: name,
                    key,
                    error: e.to_string(),
                    action: action.into(),
                });
            }
        }
        Ok(found)
    }

    /// Acts on every unreadable record as [`Store::unreadable`] says: forgets unreadable
    /// profiles, keeps unreadable exports as dead letters "unreadable record" (with their
    /// bytes), deletes outbox and dead entries whose key is not an export id. Flushed. Returns
    /// what it did, one line each.
    pub fn repair_unreadable(&self) -> Result<Vec<String>, StoreError> {
        let found = self.unreadable()?;
        let t = self.trees()?;
        let mut done = Vec::new();
        for record in found {
            match record.tree {
                "profiles" => {
                    t.profiles.remove(record.key.as_bytes())?;
                    done.push(format!(
                        "profile {}: forgotten ({})",
                        record.key, record.error
                    ));
                }
                "outbox" | "dead" => {
                    let tree = if record.tree == "outbox" {
                        &t.outbox
                    } else {
                        &t.dead
                    };
                    let place = if record.tree == "outbox" {
                        Place::Pending
                    } else {
                        Place::Dead
                    };
                    let id: Option<ExportId> = record.key.parse().ok();
                    let now_ms = Utc::now().timestamp_millis();
                    // Find the raw key again: the listed key is an export id or escaped bytes.
                    let raw: Option<Vec<u8>> = match id {
                        Some(id) => Some(keys::seq_key(id.seq).to_vec()),
                        None => tree
                            .iter()
                            .keys()
                            .filter_map(Result::ok)
                            .find(|k| key_text(k) == record.key)
                            .map(|k| k.to_vec()),
                    };
                    let Some(raw) = raw else { continue };
                    (&t.outbox, &t.dead, &t.meta).transaction(|(outbox, dead, meta_tx)| {
                        let source = if place == Place::Pending {
                            outbox
                        } else {
                            dead
                        };
                        let Some(old) = source.remove(raw.as_slice())? else {
                            return Ok(());
                        };
                        let mut tally = read_tally(meta_tx)?;
                        tally.count(place, old.len(), -1);
                        if id.is_some() {
                            let value = codec::encode_export(&unreadable_record(
                                &old,
                                &record.error,
                                now_ms,
                            ));
                            tally.count(Place::Dead, value.len(), 1);
                            dead.insert(raw.as_slice(), value)?;
                        }
                        write_tally(meta_tx, tally)?;
                        Ok(())
                    })?;
                    done.push(match id {
                        Some(_) => format!(
                            "export {} ({}): a dead letter \"{UNREADABLE}\" ({})",
                            record.key, record.tree, record.error
                        ),
                        None => format!(
                            "{} entry with key {}: deleted ({})",
                            record.tree, record.key, record.error
                        ),
                    });
                }
                _ => {}
            }
        }
        drop(t);
        self.flush()?;
        Ok(done)
    }

    /// Moves or rewrites one export in one transaction, keeping the tally exact.
    /// `change` gets the record where it is now and returns where it goes and how it reads
    /// there; it may run more than once, so it must be pure. Returns false if no such export
    /// is `from` where it was looked for.
    pub fn change_export(
        &self,
        seq: u64,
        from: Place,
        change: impl Fn(ExportRecord) -> (Place, ExportRecord),
    ) -> Result<bool, StoreError> {
        let key = keys::seq_key(seq);
        self.with(|t| {
            Ok(
                (&t.outbox, &t.dead, &t.meta).transaction(|(outbox, dead, meta_tx)| {
                    let source = match from {
                        Place::Pending => outbox,
                        Place::Dead => dead,
                        Place::Gone => return Ok(false),
                    };
                    let Some(old) = source.remove(&key)? else {
                        return Ok(false);
                    };
                    let record = codec::decode_export(&old)
                        .map_err(|e| abort(StoreError::corrupt(format!("export {seq}"), e)))?;
                    let mut tally = read_tally(meta_tx)?;
                    tally.count(from, old.len(), -1);
                    let (to, record) = change(record);
                    let target = match to {
                        Place::Pending => Some(outbox),
                        Place::Dead => Some(dead),
                        Place::Gone => None,
                    };
                    if let Some(target) = target {
                        let value = codec::encode_export(&record);
                        tally.count(to, value.len(), 1);
                        target.insert(&key, value)?;
                    }
                    write_tally(meta_tx, tally)?;
                    Ok(true)
                })?,
            )
        })
    }

    /// Sequence numbers of every dead letter, oldest first.
    pub fn dead_seqs(&self) -> Result<Vec<u64>, StoreError> {
        let t = self.trees()?;
        t.dead
            .iter()
            .keys()
            .map(|k| {
                let k = k.map_err(|e| self.classify(e.into(), t.generation))?;
                keys::seq_from_key(&k)
                    .ok_or_else(|| StoreError::corrupt("dead key", format!("{k:?}")))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::update::parse_body;
    use std::time::Duration;

    fn seqs(store: &Store, cursor: &mut u64) -> Vec<u64> {
        store
            .read_pending(cursor, 100)
            .unwrap()
            .iter()
            .map(|e| e.id.seq)
            .collect()
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
            Err(StoreError::Format { found: 3, .. })
        ));
    }
}
