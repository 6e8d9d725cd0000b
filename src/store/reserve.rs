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

use std::fs::OpenOptions;
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
        let state = match found_at(path) {
            Ok(Found::Empty) => GIVEN_UP,
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

/// The reserve file as found beside a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    None,
    /// Given up.
    Empty,
    /// Of this length, its blocks all on the disk.
    Whole(u64),
    /// Of this length, not all its blocks on the disk (`rsync -S`, a restore): it would free
    /// nothing when given up, so it is no reserve.
    Sparse(u64),
}

fn found_at(path: &Path) -> io::Result<Found> {
    let metadata = match std::fs::metadata(reserve_path(path)) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Found::None),
        Err(e) => return Err(e),
    };
    Ok(match metadata.len() {
        0 => Found::Empty,
        len if metadata.blocks() * 512 >= len => Found::Whole(len),
        len => Found::Sparse(len),
    })
}

/// What keeping `bytes` comes to, for a reserve found so with `free` bytes free beside it
/// (pure): what [`Store::keep_reserve`] does and `outpost check` says.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// None asked for: one found is deleted.
    Delete,
    /// Given up: allocated again only where it fits twice over.
    GivenUp,
    Keep,
    /// Made (into `reserve.new`, then renamed), there being room for it twice over.
    Make,
    /// Another size asked for, with too little room for it: the one kept stays.
    KeepAtItsSize(u64),
    /// Too little room to make one.
    NotMade,
}

fn plan(found: Found, bytes: u64, free: u64) -> Plan {
    match (bytes, found) {
        (0, _) => Plan::Delete,
        (_, Found::Empty) => Plan::GivenUp,
        (_, Found::Whole(len)) if len == bytes => Plan::Keep,
        _ if free >= bytes.saturating_mul(2) => Plan::Make,
        (_, Found::Whole(len)) => Plan::KeepAtItsSize(len),
        _ => Plan::NotMade,
    }
}

/// How the space kept for delivery stands for the store at `path`, `bytes` asked for and
/// `free` bytes free where it is, for `outpost check`: a few words, and a warning when it is
/// given up or will not be made.
pub fn describe_at(path: &Path, bytes: u64, free: u64) -> (String, Option<String>) {
    let (asked, free_text) = (crate::explain::bytes(bytes), crate::explain::bytes(free));
    let not_made = |kept: &str| {
        format!(
            "storage.reserve_bytes ({asked}) does not fit twice over in the {free_text} free: {kept}, and it is made only once there is room; make room there, or lower it"
        )
    };
    match plan(found_at(path).unwrap_or(Found::None), bytes, free) {
        Plan::Delete => ("none kept for delivery".into(), None),
        Plan::GivenUp if free >= bytes.saturating_mul(2) => (
            "the space kept for delivery given up, made again as the agent looks (there is room)"
                .into(),
            None,
        ),
        Plan::GivenUp => (
            "the space kept for delivery given up".into(),
            Some(format!(
                "the space kept for delivery was given up on a full disk: updates are refused until the disk has room for storage.reserve_bytes ({asked}) twice over ({free_text} free)"
            )),
        ),
        Plan::Keep => (format!("{asked} kept for delivery"), None),
        Plan::Make => (format!("{asked} for delivery, made at the next start"), None),
        Plan::KeepAtItsSize(kept) => {
            let kept = crate::explain::bytes(kept);
            (
                format!("{kept} kept for delivery, {asked} asked for"),
                Some(not_made(&format!("the {kept} kept stays"))),
            )
        }
        Plan::NotMade => (
            format!("{asked} for delivery not made"),
            Some(not_made(
                "until there is, a store that fills its disk cannot record its deliveries",
            )),
        ),
    }
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
        let found = found_at(&self.path).map_err(io_error)?;
        let free = super::rebuild::free_bytes(&self.path).map_err(io_error)?;
        let delete = || std::fs::remove_file(reserve_path(&self.path)).map_err(io_error);
        let (state, said) = match plan(found, bytes, free) {
            Plan::Delete => {
                if found != Found::None {
                    delete()?;
                }
                (NONE, ReserveState::None)
            }
            Plan::GivenUp => {
                self.reserve.state.store(GIVEN_UP, Ordering::SeqCst);
                if let Err(e) = self.keep_reserve_again() {
                    tracing::warn!(error = %e, "cannot allocate the space kept for delivery again");
                }
                return Ok(match self.reserve_given_up() {
                    true => ReserveState::GivenUp,
                    false => ReserveState::Kept,
                });
            }
            Plan::Keep => (KEPT, ReserveState::Kept),
            Plan::Make => match allocate(&self.path, bytes) {
                Ok(()) => (KEPT, ReserveState::Kept),
                Err(e) => {
                    // A file system that cannot allocate it: the store works without.
                    if !is_no_space(&e) {
                        tracing::warn!(error = %e, "cannot allocate the space kept for delivery on a full disk (storage.reserve_bytes)");
                    }
                    match found {
                        Found::Whole(kept) => (KEPT, ReserveState::KeptAtItsSize { kept, free }),
                        _ => (NOT_MADE, ReserveState::NotMade { free }),
                    }
                }
            },
            Plan::KeepAtItsSize(kept) => (KEPT, ReserveState::KeptAtItsSize { kept, free }),
            Plan::NotMade => (NOT_MADE, ReserveState::NotMade { free }),
        };
        // A sparse copy is no reserve: what is not made in its place leaves none.
        if state == NOT_MADE && matches!(found, Found::Sparse(_)) {
            delete()?;
        }
        self.reserve.state.store(state, Ordering::SeqCst);
        Ok(said)
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
        match (
            self.reserve.state.load(Ordering::SeqCst),
            found_at(&self.path),
        ) {
            (KEPT, Ok(Found::Whole(len))) => len,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;

    const MIB: u64 = 1 << 20;

    /// The reserve file's length beside the store at `path`, if there is one.
    fn length(path: &Path) -> io::Result<Option<u64>> {
        match std::fs::metadata(reserve_path(path)) {
            Ok(metadata) => Ok(Some(metadata.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

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
        assert_eq!(found_at(dir.path()).unwrap(), Found::Sparse(2 * MIB));
        assert_eq!(store.keep_reserve(2 * MIB).unwrap(), ReserveState::Kept);
        assert_eq!(found_at(dir.path()).unwrap(), Found::Whole(2 * MIB));
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
    fn what_keeping_a_reserve_comes_to() {
        let (asked, room, tight) = (2 * MIB, 4 * MIB, 3 * MIB);
        let cases = [
            (Found::Whole(asked), 0, tight, Plan::Delete),
            (Found::None, 0, 0, Plan::Delete),
            (Found::Empty, asked, room, Plan::GivenUp),
            (Found::Empty, asked, 0, Plan::GivenUp),
            (Found::Whole(asked), asked, 0, Plan::Keep),
            (Found::None, asked, room, Plan::Make),
            (Found::Whole(MIB), asked, room, Plan::Make),
            (Found::Sparse(asked), asked, room, Plan::Make),
            (Found::Whole(MIB), asked, tight, Plan::KeepAtItsSize(MIB)),
            (Found::None, asked, tight, Plan::NotMade),
            (Found::Sparse(asked), asked, tight, Plan::NotMade),
        ];
        for (found, bytes, free, expected) in cases {
            assert_eq!(
                plan(found, bytes, free),
                expected,
                "{found:?}, {bytes}, {free}"
            );
        }
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
        // Another size without the room for it: the one kept stays, as the start keeps it.
        let (line, warning) = says(3 * MIB, 5 * MIB);
        assert_eq!(line, "2.0 MiB kept for delivery, 3.0 MiB asked for");
        assert!(warning.unwrap().contains("the 2.0 MiB kept stays"));
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
