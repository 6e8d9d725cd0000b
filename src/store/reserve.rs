//! Disk space kept allocated beside the store, given up when the disk is full so that delivery
//! can record what it delivers.
//!
//! Recording a delivery is a write. A store that filled its own disk (its destination down
//! while updates kept coming) sent what delivery had read and no more, and nothing it did
//! made room. So `storage.reserve_bytes` are kept allocated in `<store>/reserve`. When a write
//! fails for lack of room and no trial write fits, the reopen truncates that file to nothing
//! first ([`Store::recover`]), and delivery records its outcomes in that room: a few hundred
//! bytes each at most (sled reuses little of the space of what it deleted). Updates stay
//! refused, by the agent and by `outpost ingest` alike, until the disk has room for the
//! reserve twice over, when it is allocated again.
//!
//! The file's length is the state, so it holds across restarts and for every process that
//! opens the store: missing, none was made (or none is kept: `storage.reserve_bytes = 0`);
//! empty, it was given up and updates are refused; otherwise it is kept. It is made (or
//! resized) as `reserve.new`, allocated, then renamed: a failure never leaves it empty. Not a
//! sled file: a rebuild of the store leaves it where it is.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use super::error::is_no_space;
use super::{Store, StoreError};

pub const RESERVE_FILE: &str = "reserve";
const RESERVE_NEW: &str = "reserve.new";

/// The least a reserve may be: the reopen after giving it up writes 1 MiB to see that there
/// is room ([`super::SPACE_PROBE_BYTES`]).
pub const RESERVE_AT_LEAST: u64 = 2 << 20;

const NONE: u8 = 0;
const NOT_MADE: u8 = 1;
const KEPT: u8 = 2;
const GIVEN_UP: u8 = 3;

/// What is kept, in memory: the file says it at every open, [`Store::keep_reserve`] the size.
#[derive(Debug, Default)]
pub(super) struct Reserve {
    bytes: AtomicU64,
    state: AtomicU8,
    /// That the disk filled again once the reserve was given up has been said.
    used_up_said: AtomicBool,
}

impl Reserve {
    /// As the file at the store's `path` says, opened by any process: a reserve given up
    /// refuses updates also to `outpost ingest` with no agent running.
    pub(super) fn found_at(path: &Path) -> Reserve {
        let state = match length(path) {
            Ok(Some(0)) => GIVEN_UP,
            _ => NONE,
        };
        Reserve {
            state: AtomicU8::new(state),
            ..Reserve::default()
        }
    }
}

/// What [`Store::keep_reserve`] found or did.
#[derive(Debug, PartialEq, Eq)]
pub enum ReserveState {
    Kept,
    /// None is asked for.
    None,
    /// Too little room to make it (`free` bytes, under twice it): made once there is.
    NotMade {
        free: u64,
    },
    /// Another size was asked for, with too little room for it: the one kept stays.
    KeptAtItsSize {
        kept: u64,
        free: u64,
    },
    /// Given up on a full disk and not allocated again yet: updates are refused.
    GivenUp,
}

fn reserve_path(store: &Path) -> PathBuf {
    store.join(RESERVE_FILE)
}

/// Allocates `bytes` for the store's reserve, synced, in a file of its own renamed over the
/// reserve once done: a failure leaves the reserve as it was.
fn allocate(store: &Path, bytes: u64) -> io::Result<()> {
    let new = store.join(RESERVE_NEW);
    let allocated = (|| {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&new)?;
        let len = libc::off_t::try_from(bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the descriptor is open for writing for the length of the call.
        match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
            0 => file.sync_all()?,
            errno => return Err(io::Error::from_raw_os_error(errno)),
        }
        std::fs::rename(&new, reserve_path(store))
    })();
    if allocated.is_err() {
        let _ = std::fs::remove_file(&new);
    }
    allocated
}

/// Gives the reserve of the store at `path` up, if one is kept: whether one was.
pub fn give_up_at(path: &Path) -> io::Result<bool> {
    let file = match OpenOptions::new().write(true).open(reserve_path(path)) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if file.metadata()?.len() == 0 {
        return Ok(false);
    }
    file.set_len(0)?;
    file.sync_all()?;
    Ok(true)
}

/// How the space kept for delivery stands for the store at `path`, `bytes` asked for and
/// `free` bytes free where it is, for `outpost check`: a few words, and a warning when it is
/// given up or will not be made.
pub fn describe_at(path: &Path, bytes: u64, free: u64) -> (String, Option<String>) {
    let asked = crate::explain::bytes(bytes);
    if bytes == 0 {
        return ("none kept for delivery".into(), None);
    }
    match length(path).ok().flatten() {
        Some(0) => (
            "the space kept for delivery given up".into(),
            Some(format!(
                "the space kept for delivery was given up on a full disk: updates are refused until the disk has room for storage.reserve_bytes ({asked}) twice over ({} free)",
                crate::explain::bytes(free)
            )),
        ),
        Some(len) if len == bytes && allocated_whole(path).unwrap_or(false) => {
            (format!("{asked} kept for delivery"), None)
        }
        found if free + found.unwrap_or(0) >= bytes.saturating_mul(2) => (
            format!("{asked} for delivery, made at the next start"),
            None,
        ),
        _ => (
            format!("{asked} for delivery not made"),
            Some(format!(
                "storage.reserve_bytes ({asked}) does not fit twice over in the {} free: it is made only once there is room, and until then a store that fills its disk cannot record its deliveries; make room there, or lower it",
                crate::explain::bytes(free)
            )),
        ),
    }
}

fn length(path: &Path) -> io::Result<Option<u64>> {
    match File::open(reserve_path(path)) {
        Ok(file) => Ok(Some(file.metadata()?.len())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether the reserve's blocks are all on the disk: a sparse copy (`rsync -S`, a restore) has
/// its length and frees nothing when given up.
fn allocated_whole(path: &Path) -> io::Result<bool> {
    let metadata = std::fs::metadata(reserve_path(path))?;
    Ok(metadata.blocks() * 512 >= metadata.len())
}

impl Store {
    /// At the agent's start, and before `outpost ingest` stores anything itself: keeps `bytes`
    /// allocated beside the store (none: 0, and one kept before is deleted). One given up
    /// stays so until there is room for it twice over; one not made yet is made only then.
    pub fn keep_reserve(&self, bytes: u64) -> Result<ReserveState, StoreError> {
        let io_error = |e: io::Error| StoreError::Io {
            path: reserve_path(&self.path),
            detail: super::error::io_detail(&e),
        };
        self.reserve.bytes.store(bytes, Ordering::SeqCst);
        // Left by a making that was cut short: it holds room the reserve may need.
        match std::fs::remove_file(self.path.join(RESERVE_NEW)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_error(e)),
            _ => {}
        }
        let mut found = length(&self.path).map_err(io_error)?;
        if bytes == 0 {
            if found.is_some() {
                std::fs::remove_file(reserve_path(&self.path)).map_err(io_error)?;
            }
            self.reserve.state.store(NONE, Ordering::SeqCst);
            return Ok(ReserveState::None);
        }
        if found == Some(0) {
            self.reserve.state.store(GIVEN_UP, Ordering::SeqCst);
            if let Err(e) = self.keep_reserve_again() {
                tracing::warn!(error = %e, "cannot allocate the space kept for delivery again");
            }
            return Ok(match self.reserve.state.load(Ordering::SeqCst) {
                KEPT => ReserveState::Kept,
                _ => ReserveState::GivenUp,
            });
        }
        if found.is_some() && !allocated_whole(&self.path).map_err(io_error)? {
            // A sparse copy is no reserve: it is made again, or not at all.
            std::fs::remove_file(reserve_path(&self.path)).map_err(io_error)?;
            found = None;
        }
        if found == Some(bytes) {
            self.reserve.state.store(KEPT, Ordering::SeqCst);
            return Ok(ReserveState::Kept);
        }
        let free = super::rebuild::free_bytes(&self.path).map_err(io_error)?;
        let made = free >= bytes.saturating_mul(2)
            && match allocate(&self.path, bytes) {
                Ok(()) => true,
                Err(e) if is_no_space(&e) => false,
                // A file system that cannot allocate it: the store works without.
                Err(e) => {
                    tracing::warn!(error = %e, "cannot allocate the space kept for delivery on a full disk (storage.reserve_bytes)");
                    false
                }
            };
        Ok(match (made, found) {
            (true, _) => {
                self.reserve.state.store(KEPT, Ordering::SeqCst);
                ReserveState::Kept
            }
            // Another size, with too little room for it: the one kept stays.
            (false, Some(kept)) => {
                self.reserve.state.store(KEPT, Ordering::SeqCst);
                ReserveState::KeptAtItsSize { kept, free }
            }
            (false, None) => {
                self.reserve.state.store(NOT_MADE, Ordering::SeqCst);
                ReserveState::NotMade { free }
            }
        })
    }

    /// Whether the reserve was given up on a full disk and not allocated again: updates are
    /// refused meanwhile.
    pub fn reserve_given_up(&self) -> bool {
        self.reserve.state.load(Ordering::SeqCst) == GIVEN_UP
    }

    /// On a full disk, when no trial write fits: gives the reserve up, so that the store can
    /// be reopened and delivery record its outcomes. Whether it did. Said once if the reserve
    /// was given up already: delivery has used it up.
    pub(super) fn give_up_reserve(&self) -> bool {
        match self.reserve.state.load(Ordering::SeqCst) {
            KEPT => {}
            GIVEN_UP => {
                if !self.reserve.used_up_said.swap(true, Ordering::SeqCst) {
                    tracing::warn!(
                        "the disk is full again, the space kept for delivery (storage.reserve_bytes) used up: nothing more is recorded until room is made on that disk (a larger storage.reserve_bytes records more deliveries)"
                    );
                }
                return false;
            }
            NOT_MADE => {
                if !self.reserve.used_up_said.swap(true, Ordering::SeqCst) {
                    tracing::warn!(
                        "the disk is full, and no space is kept for delivery (storage.reserve_bytes was not made for lack of room): nothing more is recorded until room is made on that disk"
                    );
                }
                return false;
            }
            _ => return false,
        }
        match give_up_at(&self.path) {
            Ok(true) => {
                self.reserve.state.store(GIVEN_UP, Ordering::SeqCst);
                tracing::warn!(
                    reserve_bytes = self.reserve.bytes.load(Ordering::SeqCst),
                    "the disk is full: gave up the space kept for delivery (storage.reserve_bytes), which records its deliveries there; updates are refused until there is room for it twice over"
                );
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot give up the space kept for delivery");
                false
            }
        }
    }

    /// Whether a reserve is asked for and not kept: given up, or not made for lack of room.
    pub fn reserve_wanted(&self) -> bool {
        self.reserve.bytes.load(Ordering::SeqCst) > 0
            && matches!(
                self.reserve.state.load(Ordering::SeqCst),
                GIVEN_UP | NOT_MADE
            )
    }

    /// While the reserve is given up, or was not made for lack of room: allocates it once the
    /// disk has room for it twice over (updates are taken again then).
    pub fn keep_reserve_again(&self) -> io::Result<()> {
        let bytes = self.reserve.bytes.load(Ordering::SeqCst);
        let state = self.reserve.state.load(Ordering::SeqCst);
        if !self.reserve_wanted() {
            return Ok(());
        }
        if super::rebuild::free_bytes(&self.path)? < bytes.saturating_mul(2) {
            return Ok(());
        }
        match allocate(&self.path, bytes) {
            Ok(()) => {
                self.reserve.state.store(KEPT, Ordering::SeqCst);
                self.reserve.used_up_said.store(false, Ordering::SeqCst);
                if state == GIVEN_UP {
                    // At warn, as its giving up was said.
                    tracing::warn!(
                        "there is room on the disk again: the space for delivery is kept again and updates are taken"
                    );
                } else {
                    tracing::info!("the space for delivery on a full disk is kept now");
                }
                Ok(())
            }
            Err(e) if is_no_space(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The reserve's size, as the agent or `outpost ingest` asked for it (0 until then).
    pub(super) fn reserve_bytes(&self) -> u64 {
        self.reserve.bytes.load(Ordering::SeqCst)
    }

    /// The space kept for delivery now, 0 when none is (not asked for, not made, given up).
    pub fn reserve_kept(&self) -> u64 {
        match self.reserve.state.load(Ordering::SeqCst) {
            KEPT => length(&self.path).ok().flatten().unwrap_or(0),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A reserve that does not fit twice over in what is free where `dir` is.
    fn over_half_the_room(dir: &Path) -> u64 {
        super::super::rebuild::free_bytes(dir).unwrap() / 2 + (1 << 30)
    }

    #[test]
    fn the_reserve_is_kept_given_up_and_kept_again_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let len = || length(dir.path()).unwrap();
        {
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            assert_eq!(store.keep_reserve(2 * MIB).unwrap(), ReserveState::Kept);
            assert_eq!(len(), Some(2 * MIB));
            assert!(!store.reserve_given_up());
            assert!(store.give_up_reserve());
            assert_eq!(len(), Some(0));
            assert!(store.reserve_given_up());
            assert!(!store.give_up_reserve(), "given up already");
        }
        // Given up, it refuses updates to whatever opens the store, until it is allocated
        // again; here there is room at once.
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        assert!(store.reserve_given_up());
        assert!(store.refusing_updates().is_some());
        assert_eq!(store.keep_reserve(2 * MIB).unwrap(), ReserveState::Kept);
        assert!(store.refusing_updates().is_none());
        assert_eq!(len(), Some(2 * MIB));
        // Another size is allocated as asked; none deletes it.
        assert_eq!(store.keep_reserve(3 * MIB).unwrap(), ReserveState::Kept);
        assert_eq!(len(), Some(3 * MIB));
        assert_eq!(store.keep_reserve(0).unwrap(), ReserveState::None);
        assert_eq!(len(), None);
        assert!(!store.give_up_reserve(), "none kept");
    }

    #[test]
    fn a_reserve_that_does_not_fit_twice_is_not_made_and_one_kept_stays_at_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let too_large = over_half_the_room(dir.path());
        assert!(matches!(
            store.keep_reserve(too_large).unwrap(),
            ReserveState::NotMade { .. }
        ));
        assert_eq!(length(dir.path()).unwrap(), None);
        assert!(!store.reserve_given_up());
        assert!(!dir.path().join(RESERVE_NEW).exists());

        assert_eq!(store.keep_reserve(2 * MIB).unwrap(), ReserveState::Kept);
        assert!(matches!(
            store.keep_reserve(too_large).unwrap(),
            ReserveState::KeptAtItsSize { kept, .. } if kept == 2 * MIB
        ));
        assert_eq!(length(dir.path()).unwrap(), Some(2 * MIB), "not emptied");
        assert!(!store.reserve_given_up());
    }

    #[test]
    fn a_sparse_reserve_is_allocated_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let file = File::create(reserve_path(dir.path())).unwrap();
        file.set_len(2 * MIB).unwrap();
        assert!(!allocated_whole(dir.path()).unwrap());
        assert_eq!(store.keep_reserve(2 * MIB).unwrap(), ReserveState::Kept);
        assert!(allocated_whole(dir.path()).unwrap());
        // With too little room to make one, a sparse copy is not taken for one kept.
        let file = File::create(reserve_path(dir.path())).unwrap();
        file.set_len(2 * MIB).unwrap();
        let too_large = over_half_the_room(dir.path());
        assert!(matches!(
            store.keep_reserve(too_large).unwrap(),
            ReserveState::NotMade { .. }
        ));
        assert_eq!(length(dir.path()).unwrap(), None);
        assert_eq!(store.reserve_kept(), 0);
    }

    #[test]
    fn check_says_how_the_reserve_stands() {
        let dir = tempfile::tempdir().unwrap();
        let says = |bytes: u64, free: u64| describe_at(dir.path(), bytes, free);
        assert_eq!(says(0, MIB), ("none kept for delivery".into(), None));
        assert_eq!(
            says(2 * MIB, 4 * MIB),
            ("2.0 MiB for delivery, made at the next start".into(), None)
        );
        let (line, warning) = says(2 * MIB, 3 * MIB);
        assert_eq!(line, "2.0 MiB for delivery not made");
        assert!(warning
            .unwrap()
            .contains("does not fit twice over in the 3.0 MiB free"));
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        store.keep_reserve(2 * MIB).unwrap();
        assert_eq!(says(2 * MIB, 0), ("2.0 MiB kept for delivery".into(), None));
        assert!(store.give_up_reserve());
        let (line, warning) = says(2 * MIB, 0);
        assert_eq!(line, "the space kept for delivery given up");
        assert!(warning.unwrap().contains("updates are refused"));
    }

    #[test]
    fn a_making_cut_short_leaves_nothing_behind_at_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(store.keep_reserve(2 * MIB).unwrap(), ReserveState::Kept);
        // A kill between the making of a new size and its rename, the old one kept.
        std::fs::write(dir.path().join(RESERVE_NEW), vec![0u8; 4096]).unwrap();
        assert_eq!(store.keep_reserve(2 * MIB).unwrap(), ReserveState::Kept);
        assert!(!dir.path().join(RESERVE_NEW).exists());
        assert_eq!(store.reserve_kept(), 2 * MIB);
    }
}
