//! Disk space the agent keeps allocated beside the store, given up when the disk is full so
//! that delivery can record what it delivers.
//!
//! Recording a delivery is a write. A store that filled its own disk (its destination down
//! while updates kept coming) sent what delivery had read and no more, and nothing it did
//! made room. So the agent keeps `storage.reserve_bytes` allocated in `<store>/reserve`. When
//! a write fails for lack of room and no trial write fits, the reopen truncates the file to
//! nothing first ([`Store::recover`]): delivery records its outcomes in that room, and sled
//! writes over the space of what it deleted. Updates stay refused until the disk has room for
//! the reserve and as much again, when it is allocated again.
//!
//! The file's length is the state, so it holds across restarts: missing, none was made yet
//! (or none is kept: `storage.reserve_bytes = 0`); empty, it was given up and updates are
//! refused until it is allocated again; otherwise it is kept. Not a sled file: a rebuild of
//! the store leaves it where it is.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::error::is_no_space;
use super::{Store, StoreError};

pub const RESERVE_FILE: &str = "reserve";

/// What the agent keeps, and whether it was given up.
#[derive(Debug, Default)]
pub(super) struct Reserve {
    bytes: AtomicU64,
    given_up: AtomicBool,
}

/// What [`Store::keep_reserve`] found or did.
#[derive(Debug, PartialEq, Eq)]
pub enum ReserveState {
    Kept,
    /// None was made: too little room (the bytes free), or none is asked for.
    NotKept {
        free: u64,
    },
    None,
    /// Given up on a full disk and not allocated again yet: updates are refused.
    GivenUp,
}

fn reserve_path(store: &Path) -> PathBuf {
    store.join(RESERVE_FILE)
}

/// Allocates `bytes` for the file at `path` (created if missing), synced; a failure leaves it
/// empty, so that a partial allocation does not take the last room.
fn allocate(path: &Path, bytes: u64) -> io::Result<()> {
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    let allocated = (|| {
        let len = libc::off_t::try_from(bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the descriptor is open for writing for the length of the call.
        match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
            0 => file.sync_all(),
            errno => Err(io::Error::from_raw_os_error(errno)),
        }
    })();
    if allocated.is_err() {
        let _ = file.set_len(0);
        let _ = file.sync_all();
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

fn length(path: &Path) -> io::Result<Option<u64>> {
    match File::open(reserve_path(path)) {
        Ok(file) => Ok(Some(file.metadata()?.len())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl Store {
    /// At the agent's start: keeps `bytes` allocated beside the store (none: 0, and one kept
    /// before is deleted). One given up stays so until there is room for it and as much
    /// again; one never made is made when it fits with as much again.
    pub fn keep_reserve(&self, bytes: u64) -> Result<ReserveState, StoreError> {
        let io_error = |e: io::Error| StoreError::Io {
            path: reserve_path(&self.path),
            detail: super::error::io_detail(&e),
        };
        self.reserve.bytes.store(bytes, Ordering::SeqCst);
        let found = length(&self.path).map_err(io_error)?;
        if bytes == 0 {
            if found.is_some() {
                std::fs::remove_file(reserve_path(&self.path)).map_err(io_error)?;
            }
            self.reserve.given_up.store(false, Ordering::SeqCst);
            return Ok(ReserveState::None);
        }
        match found {
            Some(len) if len == bytes => Ok(ReserveState::Kept),
            Some(0) => {
                self.reserve.given_up.store(true, Ordering::SeqCst);
                self.keep_reserve_again().map_err(io_error)?;
                Ok(match self.reserve_given_up() {
                    true => ReserveState::GivenUp,
                    false => ReserveState::Kept,
                })
            }
            // Another size (the setting changed), or none made yet.
            _ => {
                let free =
                    super::rebuild::free_bytes(&self.path).map_err(io_error)? + found.unwrap_or(0);
                if free < bytes.saturating_mul(2) {
                    return Ok(ReserveState::NotKept { free });
                }
                match allocate(&reserve_path(&self.path), bytes) {
                    Ok(()) => Ok(ReserveState::Kept),
                    Err(e) if is_no_space(&e) => Ok(ReserveState::NotKept { free }),
                    Err(e) => Err(io_error(e)),
                }
            }
        }
    }

    /// Whether the reserve was given up on a full disk and not allocated again: updates are
    /// refused meanwhile.
    pub fn reserve_given_up(&self) -> bool {
        self.reserve.given_up.load(Ordering::SeqCst)
    }

    /// On a full disk, when no trial write fits: gives the reserve up, so that the store can
    /// be reopened and delivery record its outcomes. Whether it did.
    pub(super) fn give_up_reserve(&self) -> bool {
        if self.reserve.bytes.load(Ordering::SeqCst) == 0 {
            return false;
        }
        match give_up_at(&self.path) {
            Ok(true) => {
                self.reserve.given_up.store(true, Ordering::SeqCst);
                tracing::warn!(
                    reserve_bytes = self.reserve.bytes.load(Ordering::SeqCst),
                    "the disk is full: gave up the space kept for delivery (storage.reserve_bytes), which records its deliveries there; updates are refused until there is room for it and as much again"
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

    /// While the reserve is given up: allocates it again once the disk has room for it and
    /// as much again, and takes updates again then.
    pub fn keep_reserve_again(&self) -> io::Result<()> {
        let bytes = self.reserve.bytes.load(Ordering::SeqCst);
        if !self.reserve_given_up() || bytes == 0 {
            return Ok(());
        }
        if super::rebuild::free_bytes(&self.path)? < bytes.saturating_mul(2) {
            return Ok(());
        }
        match allocate(&reserve_path(&self.path), bytes) {
            Ok(()) => {
                self.reserve.given_up.store(false, Ordering::SeqCst);
                // At warn, as its giving up was said.
                tracing::warn!(
                    "there is room on the disk again: the space for delivery is kept again and updates are taken"
                );
                Ok(())
            }
            Err(e) if is_no_space(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_kept_given_up_and_kept_again_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let len = || length(dir.path()).unwrap();
        {
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            assert_eq!(store.keep_reserve(1 << 20).unwrap(), ReserveState::Kept);
            assert_eq!(len(), Some(1 << 20));
            assert!(!store.reserve_given_up());
            assert!(store.give_up_reserve());
            assert_eq!(len(), Some(0));
            assert!(store.reserve_given_up());
            assert!(!store.give_up_reserve(), "given up already");
        }
        // Given up, it stays so across a restart until it is allocated again; here there is
        // room at once.
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(store.keep_reserve(1 << 20).unwrap(), ReserveState::Kept);
        assert_eq!(len(), Some(1 << 20));
        // Another size is allocated as asked; none deletes it.
        assert_eq!(store.keep_reserve(2 << 20).unwrap(), ReserveState::Kept);
        assert_eq!(len(), Some(2 << 20));
        assert_eq!(store.keep_reserve(0).unwrap(), ReserveState::None);
        assert_eq!(len(), None);
        assert!(!store.give_up_reserve(), "none kept");
    }

    #[test]
    fn a_reserve_that_does_not_fit_twice_is_not_made() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let free = super::super::rebuild::free_bytes(dir.path()).unwrap();
        let asked = free / 2 + (1 << 30);
        match store.keep_reserve(asked).unwrap() {
            ReserveState::NotKept { free: found } => assert!(found < asked * 2),
            other => panic!("{other:?}"),
        }
        assert_eq!(length(dir.path()).unwrap(), None);
        assert!(!store.reserve_given_up());
    }
}
