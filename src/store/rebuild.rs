//! Rebuilding a store into a fresh sled database and swapping it in, inside the store's
//! folder (which keeps its name and place: it may be a mount point).
//!
//! Why: sled 0.34 never lets go of a page id. A store that emptied a large tree, as the
//! upgrade to format 4 empties `profiles`, keeps a record of every freed page in memory for as
//! long as it is open. A copy holds only what is live.
//!
//! When: at open, once an upgrade has finished (`meta/rebuild` is written when it starts,
//! also for a format-4 store, which an earlier build may have upgraded without a rebuild). The
//! copy counts the profiles as it goes (`meta/profiles`).
//!
//! In the store's folder:
//! - `rebuild/`: the copy being made, and a whole sled database once `rebuild.swap` exists;
//! - `rebuild.swap`: `delete` (the copy replaces the store; the store's own sled files,
//!   `conf`, `db`, `blobs/` and `snap.*`, are being deleted) or `move` (they are gone; the
//!   copy's files are being moved up into the folder);
//! - `outpost.lock`: locked (`flock`) by the process that has the store open.
//!
//! Invariants:
//! - the copy is made while nothing else writes to the store: at open, before the store is
//!   handed out;
//! - `rebuild.swap` is written (a temporary file, synced, renamed, the folder synced) only
//!   once every file of the copy is synced: a kill before leaves the store as it was and the
//!   next open deletes the copy; from then on, the next open finishes the swap;
//! - every step can be repeated, so a kill during one is mended by doing it again;
//! - a database's files are deleted or moved only once it is closed (its lock on `db` is
//!   free), so that none of its threads writes into the folder after;
//! - `outpost.lock` is held throughout, also between deleting the old files and moving the
//!   new ones, when no sled lock exists: no other outpost opens a folder half swapped.

use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::{is_no_space, StoreError};
use super::keys::meta;
use super::profiles::profiles_in;
use super::{Store, Trees};

const COPY_DIR: &str = "rebuild";
pub(super) const SWAP_STATE: &str = "rebuild.swap";
const SWAP_STATE_TEMP: &str = "rebuild.swap.tmp";
/// Locked by the process that has the store open (see [`lock`]).
pub(super) const LOCK_FILE: &str = "outpost.lock";

/// Keys copied per batch.
const COPY_BATCH: u64 = 1_000;

/// Where a swap is, as `rebuild.swap` records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Swap {
    DeleteOld,
    MoveNew,
}

impl Swap {
    fn text(self) -> &'static str {
        match self {
            Swap::DeleteOld => "delete\n",
            Swap::MoveNew => "move\n",
        }
    }

    fn read(store: &Path) -> io::Result<Option<Swap>> {
        match fs::read_to_string(store.join(SWAP_STATE)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
            Ok(text) => match text.trim() {
                "delete" => Ok(Some(Swap::DeleteOld)),
                "move" => Ok(Some(Swap::MoveNew)),
                other => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{SWAP_STATE} says {other:?}, not \"delete\" or \"move\""),
                )),
            },
        }
    }

    fn write(self, store: &Path) -> io::Result<()> {
        let temp = store.join(SWAP_STATE_TEMP);
        fs::write(&temp, self.text())?;
        File::open(&temp)?.sync_all()?;
        fs::rename(&temp, store.join(SWAP_STATE))?;
        sync_dir(store)
    }
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Syncs the folder `path` is in, so that its name is durable.
pub(super) fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => sync_dir(dir),
        None => sync_dir(Path::new(".")),
    }
}

/// Syncs every file under `dir`, and the folders.
fn sync_all_under(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_all_under(&entry.path())?;
        } else {
            File::open(entry.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}

/// The files and folders sled 0.34 keeps in its folder.
fn is_sled_file(name: &str) -> bool {
    matches!(name, "conf" | "db" | "blobs") || name.starts_with("snap.")
}

/// Takes `outpost.lock` in `store` (creating the folder and the file): [`StoreError::Locked`]
/// while another process holds it. Held until the returned file is dropped.
pub(super) fn lock(store: &Path) -> Result<File, StoreError> {
    let open_error = |source: io::Error| {
        tracing::debug!(error = ?source, path = %store.display(), "creating the store folder and its lock file");
        StoreError::Open {
            path: store.to_path_buf(),
            source: sled::Error::Io(source),
        }
    };
    super::open::make_store_folder(store).map_err(open_error)?;
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(store.join(LOCK_FILE))
        .map_err(open_error)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(StoreError::Locked(store.to_path_buf())),
        Err(fs::TryLockError::Error(e)) => Err(open_error(e)),
    }
}

/// Waits until no sled database has the folder `dir` open: sled's threads hold its lock on
/// `db` until they are done, shortly after the last handle is dropped.
pub(super) fn wait_closed(dir: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let db = match File::open(dir.join("db")) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            other => other?,
        };
        match db.try_lock() {
            Ok(()) => return Ok(()),
            Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("{} is still open after 30 s", dir.join("db").display()),
                ))
            }
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// Finishes a swap that a kill interrupted, or deletes a copy that was never finished. Called
/// at open, holding `outpost.lock`, before sled opens the folder.
pub(super) fn finish_interrupted(store: &Path) -> io::Result<()> {
    match Swap::read(store)? {
        Some(Swap::DeleteOld) if !store.join(COPY_DIR).join("db").exists() => {
            // Nothing was deleted yet (the copy goes only after every file of it moved), so
            // the store is whole as it is.
            tracing::warn!(
                "{SWAP_STATE} records a rebuild to swap in, but the copy is missing: the store is used as it is"
            );
            fs::remove_file(store.join(SWAP_STATE))?;
            sync_dir(store)
        }
        Some(state) => {
            tracing::info!(
                store = %store.display(),
                "finishing the swap of the rebuilt store that the last run began"
            );
            wait_closed(store)?;
            swap(store, state)
        }
        None => {
            let copy = store.join(COPY_DIR);
            if copy.exists() {
                tracing::warn!(
                    copy = %copy.display(),
                    "removing an unfinished rebuild of the store (the store is as it was before it; it is rebuilt again)"
                );
                fs::remove_dir_all(&copy)?;
            }
            match fs::remove_file(store.join(SWAP_STATE_TEMP)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
    }
}

/// Replaces the store's sled files by the copy's, from `state` on. The store's database must
/// be closed.
fn swap(store: &Path, state: Swap) -> io::Result<()> {
    if state == Swap::DeleteOld {
        delete_old(store)?;
    }
    move_new(store)
}

/// Deletes the store's sled files, then records that the copy's are to move up.
fn delete_old(store: &Path) -> io::Result<()> {
    for entry in fs::read_dir(store)? {
        let entry = entry?;
        if is_sled_file(&entry.file_name().to_string_lossy()) {
            if entry.file_type()?.is_dir() {
                fs::remove_dir_all(entry.path())?;
            } else {
                fs::remove_file(entry.path())?;
            }
        }
    }
    sync_dir(store)?;
    Swap::MoveNew.write(store)
}

/// Moves the copy's files up into the store's folder (those still in the copy), then removes
/// the copy's folder and `rebuild.swap`.
fn move_new(store: &Path) -> io::Result<()> {
    let copy = store.join(COPY_DIR);
    if copy.exists() {
        for entry in fs::read_dir(&copy)? {
            let entry = entry?;
            fs::rename(entry.path(), store.join(entry.file_name()))?;
        }
        sync_dir(&copy)?;
        sync_dir(store)?;
        fs::remove_dir(&copy)?;
    }
    fs::remove_file(store.join(SWAP_STATE))?;
    sync_dir(store)
}

/// What the copy held.
pub(super) struct Copied {
    pub keys: u64,
    pub profiles: u64,
}

/// Copies every tree of `t` into a fresh database in `<store>/rebuild/`, with `meta/profiles`
/// counted and `meta/rebuild` left out, syncs it and records that it replaces the store
/// (`rebuild.swap`). Nothing else may write to `t` meanwhile. On an error the copy is deleted
/// and the store is left as it was, but for [`StoreError::Swap`]: the swap may have been
/// recorded, and the store must not be used before the next open finishes it. It stops when
/// the disk has less than `reserve` bytes free ([`COPY_RESERVE_BYTES`]).
pub(super) fn copy(
    t: &Trees,
    store: &Path,
    cache_bytes: u64,
    reserve: u64,
) -> Result<Copied, StoreError> {
    check_reserve(store, reserve)?;
    let dir = store.join(COPY_DIR);
    let remove_copy = || {
        let _ = wait_closed(&dir);
        let _ = fs::remove_dir_all(&dir);
    };
    let copied = copy_into(t, store, &dir, cache_bytes, reserve).inspect_err(|_| remove_copy())?;
    if let Err(e) = Swap::DeleteOld.write(store) {
        // Whether the record landed is unknown: it goes before the copy does, or, if it cannot,
        // the copy stays for the next open to swap in, and this open fails.
        let taken_back = match fs::remove_file(store.join(SWAP_STATE)) {
            Err(gone) if gone.kind() != io::ErrorKind::NotFound => Err(gone),
            _ => sync_dir(store),
        };
        return match taken_back {
            Ok(()) => {
                remove_copy();
                Err(StoreError::Sync(e))
            }
            // The store must not be written to now: the next open may swap the copy in.
            Err(_) => Err(StoreError::Swap {
                path: store.to_path_buf(),
                detail: super::error::io_detail(&e),
            }),
        };
    }
    Ok(copied)
}

fn copy_into(
    t: &Trees,
    store: &Path,
    dir: &Path,
    cache_bytes: u64,
    reserve: u64,
) -> Result<Copied, StoreError> {
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(StoreError::Sync)?;
    }
    tracing::info!(
        "rebuilding the store into a fresh database, to free what sled keeps of the pages it emptied; a kill leaves the store as it was, and the next open begins again"
    );
    let started = Instant::now();
    let mut last_line = Instant::now();
    let new = super::open::sled_config(dir, cache_bytes).open()?;
    let mut copied = Copied {
        keys: 0,
        profiles: 0,
    };
    let mut unchecked_bytes = 0u64;
    for name in t.db.tree_names() {
        let from = t.db.open_tree(&name)?;
        let to = new.open_tree(&name)?;
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        for item in from.iter() {
            let (key, value) = item?;
            copied.profiles += profiles_in(&name, &key, &value);
            unchecked_bytes += (key.len() + value.len()) as u64;
            batch.insert(key, value);
            in_batch += 1;
            if in_batch == COPY_BATCH || unchecked_bytes >= SPACE_CHECK_BYTES {
                to.apply_batch(std::mem::take(&mut batch))?;
                copied.keys += in_batch;
                in_batch = 0;
                if unchecked_bytes >= SPACE_CHECK_BYTES {
                    check_reserve(store, reserve)?;
                    unchecked_bytes = 0;
                }
                if last_line.elapsed() >= Duration::from_secs(1) {
                    last_line = Instant::now();
                    tracing::info!("rebuilding the store: {} keys copied", copied.keys);
                }
            }
        }
        to.apply_batch(batch)?;
        copied.keys += in_batch;
    }
    let meta = new.open_tree("meta")?;
    meta.remove(meta::REBUILD)?;
    meta.insert(meta::PROFILES, &copied.profiles.to_be_bytes())?;
    new.flush()?;
    drop((meta, new));
    wait_closed(dir).map_err(StoreError::Sync)?;
    sync_all_under(dir).map_err(StoreError::Sync)?;
    tracing::info!(
        "rebuilt the store: {} keys copied in {:.1} s",
        copied.keys,
        started.elapsed().as_secs_f64()
    );
    Ok(copied)
}

/// Swaps the copy [`copy`] made in for the store, whose handles must be dropped already: waits
/// until sled has closed it, then deletes its files and moves the copy's up.
fn swap_in(store: &Path) -> Result<(), StoreError> {
    wait_closed(store)
        .and_then(|()| swap(store, Swap::DeleteOld))
        .map_err(|e| swap_error(store, e))
}

/// [`StoreError::Swap`] for the store at `store`.
pub(super) fn swap_error(store: &Path, e: io::Error) -> StoreError {
    StoreError::Swap {
        path: store.to_path_buf(),
        detail: super::error::io_detail(&e),
    }
}

/// What [`rebuild_if_wanted`] did.
pub(super) enum Outcome {
    /// The rebuilt store is in place: open it.
    Done,
    /// Not rebuilt (not wanted, or not now): the store as it was.
    NotNow(Box<Trees>),
}

/// The free space the last try had when it ran out of room, as `meta/rebuild` records it
/// (empty: no try ran out of room).
fn last_try_free(wanted: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(wanted.try_into().ok()?))
}

/// Rebuilds the store if `meta/rebuild` asks for it, at open, before anything else uses `t`.
/// A try that runs out of room records the free space it had, and the next is made only once
/// more is free, so that a disk too small is not filled up to the reserve at every open.
pub(super) fn rebuild_if_wanted(
    t: Trees,
    store: &Path,
    cache_bytes: u64,
) -> Result<Outcome, StoreError> {
    let Some(wanted) = t.meta.get(meta::REBUILD)? else {
        return Ok(Outcome::NotNow(Box::new(t)));
    };
    let later = "it is used as it is, and rebuilt at a later open";
    let free = match free_bytes(store) {
        Ok(free) => free,
        Err(e) => {
            tracing::warn!("the store was not rebuilt (its free space is unknown: {e}); {later}");
            return Ok(Outcome::NotNow(Box::new(t)));
        }
    };
    if let Some(last) = last_try_free(&wanted).filter(|&last| free <= last) {
        tracing::warn!(
            "the store was not rebuilt: its last rebuild ran out of room with {} MiB free, and the disk has {} MiB now; {later}, once more is free",
            last >> 20,
            free >> 20
        );
        return Ok(Outcome::NotNow(Box::new(t)));
    }
    match copy(&t, store, cache_bytes, COPY_RESERVE_BYTES) {
        Ok(copied) => {
            drop(t);
            swap_in(store)?;
            tracing::info!(profiles = copied.profiles, "the rebuilt store is in place");
            Ok(Outcome::Done)
        }
        Err(e @ StoreError::Swap { .. }) => Err(e),
        Err(e @ StoreError::NoRoomToRebuild { .. }) => {
            tracing::warn!("{e}; {later}, once more than {} MiB is free", free >> 20);
            let recorded = t
                .meta
                .insert(meta::REBUILD, &free.to_be_bytes())
                .and_then(|_| t.db.flush());
            if let Err(e) = recorded {
                tracing::warn!("could not record the rebuild's need for room: {e}");
            }
            Ok(Outcome::NotNow(Box::new(t)))
        }
        Err(e) => {
            tracing::warn!("the store was not rebuilt ({e}); {later}");
            Ok(Outcome::NotNow(Box::new(t)))
        }
    }
}

/// What [`Store::compact_in_place`] did.
#[derive(Clone, Copy, Debug)]
pub struct Compacted {
    /// Bytes the store's sled files took on the disk before, and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Keys copied, over every tree.
    pub keys: u64,
    /// Profiles stored (counted as they were copied).
    pub profiles: u64,
    /// From the call until the compacted store was open.
    pub took: Duration,
}

impl Compacted {
    /// As `outpost compact --json` prints it (also the admin socket's answer).
    pub fn to_json(&self, path: &Path) -> serde_json::Value {
        serde_json::json!({
            "path": path.display().to_string(),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "keys": self.keys,
            "profiles": self.profiles,
            "seconds": self.took.as_secs_f64(),
        })
    }
}

impl Store {
    /// [`Store::open`] for [`Store::compact_in_place`] to follow: not rebuilt at the open, as
    /// the compaction is a rebuild.
    pub fn open_to_compact(path: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        Store::open_rebuilding(path, cache_bytes, false)
    }

    /// Rebuilds the open store into a fresh database and goes on with it (`outpost compact`):
    /// sled's log keeps old versions of rewritten pages, and sled keeps the disk space, and a
    /// record in memory, of every page emptied (a delivered backlog, deleted profiles). Calls
    /// meanwhile fail with [`StoreError::Reopening`] (ingest answers 503, delivery's writes
    /// wait), as while the store is reopened after a full disk. Needs room for a copy of what
    /// is live plus [`COPY_RESERVE_BYTES`]. Whatever fails, the store is opened again, as it
    /// was or as the copy; a kill at any point loses nothing (the next open finishes the swap
    /// or deletes the copy).
    pub fn compact_in_place(&self) -> Result<Compacted, StoreError> {
        self.compact_keeping(COPY_RESERVE_BYTES)
    }

    /// [`Store::compact_in_place`], stopping below `reserve` bytes free.
    fn compact_keeping(&self, reserve: u64) -> Result<Compacted, StoreError> {
        use std::sync::atomic::Ordering;
        let started = Instant::now();
        let _reopening = self.lock_reopening();
        let not_compacted = |detail: String| StoreError::Io {
            path: self.path.clone(),
            detail: format!("not compacted: {detail}"),
        };
        // Writers between their write and their flush finish first; later ones are refused
        // (having written nothing) until the copy is open.
        let _no_writes = self.stop_writes().ok_or_else(|| {
            not_compacted(format!(
                "writes in progress held the store for {} s",
                super::open::CLOSE_WAIT.as_secs()
            ))
        })?;
        // A failed store's handles may have lost writes sled took in memory: those of a
        // delivery outcome too, so the reopen must raise the bound of what may have been
        // acknowledged unrecorded, as `Store::recover` does.
        let failed_before = self.is_failed();
        let old = self.take_trees().map_err(|()| {
            not_compacted(format!(
                "calls in progress held the store for {} s",
                super::open::CLOSE_WAIT.as_secs()
            ))
        })?;
        let old_missing = old.is_none();
        if let Some(old) = old {
            // A writer whose own flush comes after this point finds the handles gone (and
            // answers with an error) or, after the reopen, flushes the copy: what it wrote
            // must be durable before the copy is made of it.
            let one_at_a_time = self.lock_flushing();
            if let Err(e) = old.flush_to_drive() {
                let error = self.classify(e, self.generation.load(Ordering::SeqCst));
                drop(one_at_a_time);
                self.put_back(Arc::new(old));
                return Err(error);
            }
        }
        // Until the store is open again, a panic leaves it failed, for the agent to reopen.
        let reopen_guard = FailUnlessReopened(self);
        let compacted = self.copy_and_swap(reserve).map_err(|e| match e {
            // sled's own I/O errors name no path.
            e if e.io_cause().is_some_and(is_no_space) => StoreError::NoSpace(self.path.clone()),
            other => other,
        });
        if let Err(e) = self.reopen_trees() {
            // The agent reopens a failed store by itself (`recover`), finishing a swap begun.
            drop(reopen_guard);
            self.failed_no_space
                .store(matches!(e, StoreError::NoSpace(_)), Ordering::SeqCst);
            tracing::warn!(
                "the store could not be opened again after compacting ({e}); updates are refused until it is"
            );
            return Err(compacted.err().unwrap_or(e));
        }
        std::mem::forget(reopen_guard);
        if failed_before || old_missing {
            self.raise_unrecorded_below_after_reopen()?;
        }
        // The handles are new: an earlier failure is behind them.
        self.failed.store(false, Ordering::SeqCst);
        self.failed_no_space.store(false, Ordering::SeqCst);
        let (bytes_before, copied) = compacted?;
        let bytes_after = sled_bytes(&self.path).map_err(|e| io_error(&self.path, &e))?;
        tracing::info!(
            profiles = copied.profiles,
            "the compacted store is in place"
        );
        Ok(Compacted {
            bytes_before,
            bytes_after,
            keys: copied.keys,
            profiles: copied.profiles,
            took: started.elapsed(),
        })
    }

    /// Copies the closed store and swaps the copy in; returns the size on disk before.
    fn copy_and_swap(&self, reserve: u64) -> Result<(u64, Copied), StoreError> {
        let path = &self.path;
        wait_closed(path).map_err(|e| io_error(path, &e))?;
        let bytes_before = sled_bytes(path).map_err(|e| io_error(path, &e))?;
        let (t, _) = Store::open_trees(path, self.cache_bytes, false)?;
        if t.upgrade_unfinished {
            // The copy would drop `meta/rebuild`, which the upgrade set for when it is done.
            return Err(StoreError::UpgradeUnfinished(path.to_path_buf()));
        }
        let copied = copy(&t, path, self.cache_bytes, reserve)?;
        drop(t);
        swap_in(path)?;
        Ok((bytes_before, copied))
    }
}

/// Marks the store failed when dropped: while its handles are out, so that the agent's
/// `recover` reopens it should the compaction stop on a panic.
struct FailUnlessReopened<'a>(&'a Store);

impl Drop for FailUnlessReopened<'_> {
    fn drop(&mut self) {
        self.0
            .failed
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

pub(super) fn io_error(store: &Path, e: &io::Error) -> StoreError {
    StoreError::Io {
        path: store.to_path_buf(),
        detail: super::error::io_detail(e),
    }
}

/// Bytes the sled files in the folder `store` take on the disk (blocks allocated, so a sparse
/// file counts what it holds).
pub(super) fn sled_bytes(store: &Path) -> io::Result<u64> {
    fn under(path: &Path) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let metadata = fs::symlink_metadata(path)?;
        if !metadata.is_dir() {
            return Ok(metadata.blocks() * 512);
        }
        let mut bytes = 0;
        for entry in fs::read_dir(path)? {
            bytes += under(&entry?.path())?;
        }
        Ok(bytes)
    }
    let mut bytes = 0;
    for entry in fs::read_dir(store)? {
        let entry = entry?;
        if is_sled_file(&entry.file_name().to_string_lossy()) {
            bytes += under(&entry.path())?;
        }
    }
    Ok(bytes)
}

/// Free space a rebuild leaves on the store's disk: it stops rather than go below, since a
/// full disk would fail other writers too. sled writes a few MiB behind (it flushes every
/// 500 ms), and the free space is looked at again after each [`SPACE_CHECK_BYTES`] copied.
pub(super) const COPY_RESERVE_BYTES: u64 = 64 << 20;

/// Bytes of keys and values copied between two looks at the free space.
const SPACE_CHECK_BYTES: u64 = 16 << 20;

/// [`StoreError::NoRoomToRebuild`] while the disk holding `store` has less than `reserve` bytes
/// free.
fn check_reserve(store: &Path, reserve: u64) -> Result<(), StoreError> {
    let free = free_bytes(store).map_err(|e| io_error(store, &e))?;
    if free < reserve {
        return Err(StoreError::NoRoomToRebuild {
            path: store.to_path_buf(),
            free_mib: free >> 20,
            reserve_mib: reserve >> 20,
        });
    }
    Ok(())
}

/// Bytes an unprivileged writer may still use on the disk holding `dir`.
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs writes into the zeroed struct it is given; the path is NUL-terminated.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stats.f_bavail as u64 * stats.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mapping;
    use crate::store::Store;

    const CACHE: u64 = 8 << 20;

    fn mapping() -> Mapping {
        Mapping::new(&["person.name.firstName"], &["s1"], &[])
    }

    /// A store of `n` profiles, each a member of s1 (so each has a pending export), that wants
    /// a rebuild at its next open when `wants_rebuild`. Returns the ids.
    fn store_of(path: &Path, n: usize, wants_rebuild: bool) -> Vec<String> {
        let store = Store::open(path, CACHE).unwrap();
        let ids: Vec<String> = (0..n).map(|i| format!("profile-{i:04}")).collect();
        let body: Vec<String> = ids
            .iter()
            .map(|id| {
                serde_json::json!({"id": id, "profile": {
                    "person": {"name": {"firstName": id}},
                    "segmentMembership": {"ups": {"s1": {"status": "realized"}}}
                }})
                .to_string()
            })
            .collect();
        let updates = crate::profile::update::parse_body(body.join("\n").as_bytes()).unwrap();
        store
            .apply_groups(&[&updates], &mapping(), chrono::Utc::now())
            .unwrap();
        if wants_rebuild {
            store
                .with(|t| Ok(t.meta.insert(meta::REBUILD, &[])?))
                .unwrap();
        }
        store.flush().unwrap();
        ids
    }

    /// The handles of the store at `path` as a rebuild at open has them: every step of the
    /// open done, and `meta/rebuild` set.
    fn trees_wanting_a_rebuild(path: &Path) -> Trees {
        let (trees, _) = Store::open_trees(path, CACHE, false).unwrap();
        trees.meta.insert(meta::REBUILD, &[]).unwrap();
        trees
    }

    /// Opens the store and checks it holds what [`store_of`] wrote, whole,
    /// and nothing of a rebuild is left.
    fn assert_whole(path: &Path, ids: &[String]) -> Store {
        let store = Store::open(path, CACHE).unwrap();
        for id in ids {
            assert!(store.profile_record(id).unwrap().is_some(), "{id}");
        }
        assert_eq!(store.profile_count().unwrap(), ids.len() as u64);
        assert_eq!(store.tally().unwrap().pending, ids.len() as u64);
        assert_eq!(store.verify().unwrap(), Vec::<String>::new());
        assert_eq!(
            store.with(|t| Ok(t.meta.get(meta::REBUILD)?)).unwrap(),
            None
        );
        for leftover in [COPY_DIR, SWAP_STATE, SWAP_STATE_TEMP] {
            assert!(!path.join(leftover).exists(), "{leftover} is left");
        }
        store
    }

    /// Writes a key into the database in `rebuild/` (creating it if there is none), so that a
    /// store opened later shows whether it is that database.
    fn mark_the_copy(path: &Path) {
        let db = sled::open(path.join(COPY_DIR)).unwrap();
        db.open_tree("meta").unwrap().insert("copy", "1").unwrap();
        db.flush().unwrap();
        drop(db);
        wait_closed(&path.join(COPY_DIR)).unwrap();
    }

    fn is_the_copy(store: &Store) -> bool {
        store.with(|t| Ok(t.meta.get("copy")?)).unwrap().is_some()
    }

    /// Where a kill stops a rebuild after the copy is whole.
    #[derive(Clone, Copy, Debug)]
    enum StopAt {
        CopyWhole,
        OldDeleted,
        SomeMoved,
    }

    /// A kill at each step after the copy is whole: the next open finishes the swap, and the
    /// store it opens is the copy (marked here, after it was made, so that it shows).
    #[test]
    fn a_swap_stopped_at_any_step_is_finished_at_the_next_open() {
        for stop in [StopAt::CopyWhole, StopAt::OldDeleted, StopAt::SomeMoved] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path();
            let ids = store_of(path, 200, false);
            // The steps as a rebuild at open takes them, to the stop.
            let trees = trees_wanting_a_rebuild(path);
            let copied = copy(&trees, path, CACHE, COPY_RESERVE_BYTES).unwrap();
            assert_eq!((copied.profiles, copied.keys > 200), (200, true));
            drop(trees);
            wait_closed(path).unwrap();
            mark_the_copy(path);
            match stop {
                StopAt::CopyWhole => {}
                StopAt::OldDeleted => delete_old(path).unwrap(),
                StopAt::SomeMoved => {
                    delete_old(path).unwrap();
                    for name in ["db", "conf"] {
                        fs::rename(path.join(COPY_DIR).join(name), path.join(name)).unwrap();
                    }
                }
            }
            let store = assert_whole(path, &ids);
            assert!(
                is_the_copy(&store),
                "{stop:?}: the store opened is the copy"
            );
        }
    }

    /// A copy a kill left unfinished is deleted at the next open; the store is as it was.
    #[test]
    fn an_unfinished_copy_is_deleted_and_the_store_used_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let ids = store_of(path, 50, false);
        mark_the_copy(path);
        fs::write(path.join(SWAP_STATE_TEMP), "del").unwrap();
        let store = assert_whole(path, &ids);
        assert!(!is_the_copy(&store), "the unfinished copy was not used");
    }

    /// `rebuild.swap` without a whole copy beside it, as a failure to write it can leave:
    /// nothing of the store was deleted yet, and it opens as it was.
    #[test]
    fn a_swap_record_without_a_copy_leaves_the_store_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let ids = store_of(path, 30, false);
        Swap::DeleteOld.write(path).unwrap();
        assert_whole(path, &ids);
    }

    /// The trial write for room goes in the store's folder, or in the nearest folder above it
    /// that exists (a store not made yet), in a file without a name, and leaves every other
    /// file as it was and nothing behind.
    #[test]
    fn room_is_looked_for_where_the_store_is_or_is_to_be() {
        let dir = tempfile::tempdir().unwrap();
        let theirs = dir.path().join("space-probe");
        std::fs::write(&theirs, b"someone else's").unwrap();
        let to_be = dir.path().join("a/b/store");
        Store::room_for(&to_be).unwrap();
        assert!(!dir.path().join("a").exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert_eq!(std::fs::read(&theirs).unwrap(), b"someone else's");
        std::fs::remove_file(&theirs).unwrap();
        // A folder it cannot write in says so.
        let missing = dir.path().join("gone");
        let error = super::super::open::probe_space(&missing).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
        let made = dir.path().join("store");
        std::fs::create_dir(&made).unwrap();
        Store::room_for(&made).unwrap();
        assert_eq!(std::fs::read_dir(&made).unwrap().count(), 0);
        // A file where the folder would be: no folder above is the store's.
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        Store::room_for(&file.join("store")).unwrap();
    }

    /// A disk with less free than the reserve: no copy is made, the store opens as it is and
    /// keeps wanting a rebuild.
    #[test]
    fn no_copy_is_made_below_the_free_space_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let ids = store_of(path, 20, false);
        let trees = trees_wanting_a_rebuild(path);
        let reserve = free_bytes(path).unwrap() + (1 << 30);
        let error = copy(&trees, path, CACHE, reserve)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("not rebuilt: the disk holding"), "{error}");
        assert!(!path.join(COPY_DIR).exists() && !path.join(SWAP_STATE).exists());
        let wanted = trees.meta.get(meta::REBUILD).unwrap();
        assert!(wanted.is_some());
        drop(trees);
        assert_whole(path, &ids);
    }

    /// An open store compacts itself and goes on: what it holds is there, it takes writes,
    /// and a failure from before (a full disk) is behind it.
    #[test]
    fn an_open_store_compacts_itself_and_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let ids = store_of(path, 300, false);
        let store = Store::open(path, CACHE).unwrap();
        store
            .failed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let compacted = store.compact_in_place().unwrap();
        assert_eq!((compacted.profiles, compacted.keys > 300), (300, true));
        assert!(!store.is_failed());
        assert!(
            store.with(|t| Ok(t.generation)).unwrap() > 0,
            "not reopened"
        );
        let more = crate::profile::update::parse_body(
            br#"{"id":"after","profile":{"segmentMembership":{"ups":{"s1":{"status":"realized"}}}}}"#,
        )
        .unwrap();
        store
            .apply_groups(&[&more], &mapping(), chrono::Utc::now())
            .unwrap();
        store.flush().unwrap();
        drop(store);
        let mut ids = ids;
        ids.push("after".into());
        assert_whole(path, &ids);
    }

    /// A reopen after a failure waits for the write sections in progress: a writer between
    /// its write and its flush must not flush the reopened handles, which lack what it wrote.
    #[test]
    fn a_reopen_waits_for_the_writes_in_progress() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CACHE).unwrap();
        // A section taken before the failure (a failed store refuses new ones).
        let section = store.write_section().unwrap();
        store.failed.store(true, Ordering::SeqCst);
        std::thread::scope(|scope| {
            let reopening = scope.spawn(|| store.recover());
            // Until the reopen refuses new sections (it waits for this one then) or is done.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !store.closing.load(Ordering::SeqCst) && store.is_failed() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the reopen never began"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(store.is_failed(), "reopened beside a write in progress");
            assert_eq!(store.with(|t| Ok(t.generation)).unwrap(), 0);
            drop(section);
            assert!(reopening.join().unwrap().unwrap(), "not reopened after it");
        });
        assert!(!store.is_failed());
        drop(store.write_section().unwrap());
    }

    /// Write sections are refused while a compaction stops them, allowed after, and still
    /// allowed after a compaction panicked with them stopped.
    #[test]
    fn write_sections_come_back_after_a_compaction_also_one_that_panicked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CACHE).unwrap();
        let stopped = store.stop_writes().unwrap();
        assert!(matches!(
            store.write_section(),
            Err(StoreError::Reopening(_))
        ));
        drop(stopped);
        drop(store.write_section().unwrap());
        std::thread::scope(|scope| {
            let panicked = scope
                .spawn(|| {
                    let _stopped = store.stop_writes().unwrap();
                    panic!("a compaction panicked (as this test means it to)");
                })
                .join();
            assert!(panicked.is_err());
        });
        drop(store.write_section().unwrap());
        drop(store.stop_writes().unwrap());
    }

    /// A compaction without room leaves the open store as it was, and working.
    #[test]
    fn a_compaction_without_room_leaves_the_open_store_working() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let ids = store_of(path, 50, false);
        let store = Store::open(path, CACHE).unwrap();
        let reserve = free_bytes(path).unwrap() + (1 << 30);
        let error = store.compact_keeping(reserve).err().unwrap();
        assert!(
            matches!(error, StoreError::NoRoomToRebuild { .. }),
            "{error}"
        );
        assert!(!store.is_failed());
        assert!(!path.join(COPY_DIR).exists() && !path.join(SWAP_STATE).exists());
        assert_eq!(store.profile_count().unwrap(), 50);
        store.flush().unwrap();
        drop(store);
        assert_whole(path, &ids);
    }

    /// A rebuild that ran out of room is tried again only once more is free than it had.
    #[test]
    fn a_rebuild_that_ran_out_of_room_waits_for_more_room() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let ids = store_of(path, 20, false);
        let more_than_free = free_bytes(path).unwrap() + (1 << 30);
        let store = Store::open(path, CACHE).unwrap();
        store
            .with(|t| {
                Ok(t.meta
                    .insert(meta::REBUILD, &more_than_free.to_be_bytes())?)
            })
            .unwrap();
        store.flush().unwrap();
        drop(store);
        let store = Store::open(path, CACHE).unwrap();
        let wanted = store.with(|t| Ok(t.meta.get(meta::REBUILD)?)).unwrap();
        assert_eq!(
            wanted.as_deref(),
            Some(&more_than_free.to_be_bytes()[..]),
            "not tried: no more room than the last try had"
        );
        assert!(!path.join(COPY_DIR).exists());
        assert_eq!(store.profile_count().unwrap(), ids.len() as u64);
        store
            .with(|t| Ok(t.meta.insert(meta::REBUILD, &1u64.to_be_bytes())?))
            .unwrap();
        store.flush().unwrap();
        drop(store);
        assert_whole(path, &ids);
    }

    /// `outpost.lock` held elsewhere: the store is not opened (not even read).
    #[test]
    fn a_store_whose_lock_is_held_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), CACHE).unwrap());
        let held = File::open(dir.path().join(LOCK_FILE)).unwrap();
        held.try_lock().unwrap();
        assert!(matches!(
            Store::open(dir.path(), CACHE),
            Err(StoreError::Locked(_))
        ));
        drop(held);
        assert!(Store::open(dir.path(), CACHE).is_ok());
    }
}
