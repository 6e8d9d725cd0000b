//! Store errors, worded for the person who reads them: a locked store, a full disk, a corrupt
//! record (named by its key), a store format this build does not read.

use std::path::{Path, PathBuf};

use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::open::FORMAT_VERSION;

/// How [`StoreError::Reopening`] says it: the store refused before it changed anything, and
/// the same request can be made again once the store is open.
pub const REOPENING: &str = "is being reopened";

/// Whether `message` (an error a running agent answered) says its store was being reopened.
pub fn says_reopening(message: &str) -> bool {
    message.contains(REOPENING)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the store at {0} is in use by another process (is `outpost run` running on it, or \
         another outpost command upgrading or rebuilding it?)"
    )]
    Locked(PathBuf),
    #[error("there is no store at {0} (`storage.path` in the config)")]
    Missing(PathBuf),
    /// The upgrade at open stopped on an I/O error (logged); the next open goes on with it.
    #[error(
        "the store at {0} was not compacted: the upgrade of its profiles to this outpost's \
         format stopped (the log above says why); once that is mended, run `outpost compact` \
         again, which goes on with the upgrade first"
    )]
    UpgradeUnfinished(PathBuf),
    /// Too little free space for a rebuild ([`rebuild`](super::rebuild)): logged, the store is
    /// used as it is.
    #[error(
        "not rebuilt: the disk holding the store at {path} has {free_mib} MiB free, and a \
         rebuild (a copy of what the store holds) stops below {reserve_mib} MiB so as never to \
         fill it"
    )]
    NoRoomToRebuild {
        path: PathBuf,
        free_mib: u64,
        reserve_mib: u64,
    },
    /// Finishing the swap of a rebuilt store failed; the next open goes on with it.
    #[error(
        "the store at {path} is being replaced by its rebuilt copy, and this stopped ({detail}); \
         nothing is lost, and the next start goes on with it"
    )]
    Swap { path: PathBuf, detail: String },
    #[error("{}", open_message(.path, .source))]
    Open { path: PathBuf, source: sled::Error },
    /// sled panicked reading its own files as it opened them (a file cut short or
    /// overwritten), which no record-level repair reaches.
    #[error(
        "the store at {path} cannot be opened: sled panicked reading its files ({detail}): \
         they are damaged (or sled met a bug of its own), beyond what `outpost repair` mends \
         (it mends records, not sled's files); move the folder aside and restore it from a \
         backup, or start on an empty one (its pending exports are then lost)"
    )]
    Damaged { path: PathBuf, detail: String },
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
    /// reopened, which [`Store::recover`](super::Store::recover) does once there is room again.
    #[error("no space left on device for the store at {0}")]
    NoSpace(PathBuf),
    /// The space kept for delivery was given up on a full disk ([`super::reserve`]): updates
    /// are refused until there is room for it twice over; delivery goes on.
    #[error(
        "no space left on device for the store at {path}: the space kept for delivery \
         (storage.reserve_bytes, {reserve}) was given up to record deliveries, and updates are \
         refused until the disk has room for it twice over"
    )]
    ReserveGivenUp { path: PathBuf, reserve: String },
    /// A partition handed over to another store, or one whose hand-over or take-over did not
    /// finish: its position says so, and it is not consumed ([`super::handover`]).
    #[error("{0}")]
    PartitionMoved(String),
    /// An update that did not come from the stream, of a profile whose partition this store
    /// handed over (or is handing over) to another: that store holds its stored version.
    #[error(
        "profile {id} is in partition {partition}, which this store handed over, or is handing \
         over, to another agent (`outpost nats hand-over`): send its updates to the stream, \
         which that agent consumes once it takes the partition over, and not to this one"
    )]
    PartitionGivenAway { id: String, partition: u32 },
    /// Another I/O error from the disk; the store is reopened as after a full disk.
    #[error("I/O error on the store at {path}: {detail}")]
    Io { path: PathBuf, detail: String },
    /// The store is being reopened: after an I/O error, or by a compaction. Said in these
    /// words ([`REOPENING`]), which a command reads in a running agent's answer.
    #[error("the store at {0} is being reopened (after an I/O error, or compacted)")]
    Reopening(PathBuf),
}

/// An I/O error as people read it: sled passes some on wrapped in their debug form.
pub(super) fn io_detail(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code).to_string(),
        None if e.get_ref().is_some() => format!("{:?} error", e.kind()),
        None => e.to_string(),
    }
}

/// Whether looking up a path failed because it names nothing: not there, or through a file
/// (`store/db` where `store` is a file), which can hold no store either.
pub(crate) fn names_nothing(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

/// Whether an I/O error means the disk (or the user's quota on it) is full.
pub fn is_no_space(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || matches!(e.raw_os_error(), Some(28 | 122))
    // ENOSPC, EDQUOT
}

/// What to do when the store cannot be opened, where [`crate::explain`] knows; else the error.
pub(super) fn open_message(path: &Path, source: &sled::Error) -> String {
    crate::explain::store_open(path, source)
        .unwrap_or_else(|| format!("cannot open the store at {}: {source}", path.display()))
}

impl StoreError {
    /// The I/O error under a failure of sled or of a sync, which names no path.
    pub(super) fn io_cause(&self) -> Option<&std::io::Error> {
        match self {
            StoreError::Sled(sled::Error::Io(io)) | StoreError::Sync(io) => Some(io),
            _ => None,
        }
    }

    /// Whether `storage.path` names no folder this user may keep a store in: a part of it is
    /// a file, the user may not write there, or the file system is read-only. A mistake in
    /// the configuration or the host's set-up (exit 2, which the systemd unit does not restart
    /// on: restarted every few seconds, it would fill the journal until someone mends it), as
    /// [`crate::explain::store_open`] says.
    pub fn path_is_unusable(&self) -> bool {
        use std::io::ErrorKind;
        matches!(
            self,
            StoreError::Open { source: sled::Error::Io(io), .. }
                if matches!(
                    io.kind(),
                    ErrorKind::NotADirectory
                        | ErrorKind::AlreadyExists
                        | ErrorKind::PermissionDenied
                        | ErrorKind::ReadOnlyFilesystem
                )
        )
    }

    /// Whether starting again cannot mend it, so that the agent exits 2 (a service manager
    /// then does not restart it over and over, `data/outpost.service`): a storage path it
    /// cannot use, or sled's own files damaged.
    pub fn restart_cannot_mend(&self) -> bool {
        self.path_is_unusable() || matches!(self, StoreError::Damaged { .. })
    }

    /// Whether the disk (or the user's quota on it) is full, whichever step met it.
    pub fn is_no_space(&self) -> bool {
        match self {
            StoreError::NoSpace(_) | StoreError::ReserveGivenUp { .. } => true,
            StoreError::Open {
                source: sled::Error::Io(io),
                ..
            } => is_no_space(io),
            other => other.io_cause().is_some_and(is_no_space),
        }
    }

    /// Whether the error is passing: the disk is full or was, and the store comes back by
    /// itself once there is room (callers answer 503 with `Retry-After`).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::NoSpace(_)
                | StoreError::ReserveGivenUp { .. }
                | StoreError::Io { .. }
                | StoreError::Reopening(_)
        )
    }

    pub(super) fn corrupt(what: impl Into<String>, detail: impl std::fmt::Display) -> Self {
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

pub(super) type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

pub(super) fn abort(e: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e)
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;

    /// A storage path this user cannot keep a store in is no case for a restart (exit 2):
    /// permission denied exited 1, and the systemd unit restarted the agent every 2 s.
    #[test]
    fn a_storage_path_that_cannot_hold_a_store_is_no_case_for_a_restart() {
        let open = |kind: ErrorKind| StoreError::Open {
            path: "/var/lib/outpost".into(),
            source: sled::Error::Io(kind.into()),
        };
        for (kind, unusable) in [
            (ErrorKind::NotADirectory, true),
            (ErrorKind::AlreadyExists, true),
            (ErrorKind::PermissionDenied, true),
            (ErrorKind::ReadOnlyFilesystem, true),
            (ErrorKind::StorageFull, false),
            (ErrorKind::Interrupted, false),
        ] {
            assert_eq!(open(kind).path_is_unusable(), unusable, "{kind:?}");
            assert_eq!(open(kind).restart_cannot_mend(), unusable, "{kind:?}");
        }
    }

    use super::*;

    #[test]
    fn a_reopening_says_so_in_the_words_a_command_reads() {
        let reopening = StoreError::Reopening("/var/lib/outpost".into()).to_string();
        assert!(says_reopening(&reopening), "{reopening}");
        let full = StoreError::NoSpace("/var/lib/outpost".into()).to_string();
        assert!(!says_reopening(&full), "{full}");
    }
}
