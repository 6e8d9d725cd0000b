//! A command run as root on a store folder that another user owns (`sudo outpost compact`, or
//! `ingest`, while the agent, which runs as that user, is stopped) acts as that user
//! ([`act_as_owner`]): what it makes is the owner's, so the agent can open its store again,
//! and a link the owner planted in the folder leads root's writes nowhere. `outpost run` does
//! the same once it has bound its port and read its key files with root's rights
//! (`agent::Ready`). What root made there all the same (an agent or command of an earlier
//! build, which kept root) is handed back before root is given up ([`hand_back_to_owner`]); no
//! command keeps root on such a store any more. Root keeps its rights only on a store no one else may
//! change the path to ([`super::path_control`]): it refuses one it would not be alone on. It
//! takes on a user's rights only where that user and root alone may change the path, and the
//! user's hold on it does not begin in a sticky folder others may write in (`/tmp`), where
//! anyone could have made the folder that decides whose rights root takes.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::path_control::{self, Control, Owner, Planted, Who};

/// Folders below the store's that hold its files: `blobs/`, `rebuild/blobs/`.
const DEPTH: usize = 2;

/// Gives up root for the owner of the store folder `store` when this process runs as root and
/// the folder belongs to another user ([`StoreOwner::of_foreign_store`], [`StoreOwner::act_as`]).
/// Returns the user id taken; `None` when not root, or root keeps its rights.
pub fn act_as_owner(store: &Path, store_use: StoreUse) -> Result<Option<u32>, OwnerError> {
    match StoreOwner::of_foreign_store(store, store_use)? {
        Some(owner) => Ok(Some(owner.act_as()?)),
        None => Ok(None),
    }
}

/// What a command does with its store: the answer for a store not there yet differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreUse {
    /// Opens it, making it if it is not there (`ingest`, `run`).
    Make,
    /// Works only on one that is there.
    Existing,
}

/// Why a process run as root cannot work on a store.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    /// There is no store, and the command works only on one that is there.
    #[error("{}", super::StoreError::Missing(.0.clone()))]
    Missing(PathBuf),
    /// Taking on the store's owner failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Root would keep its rights on a store another user may change, or that holds what
    /// would lead its writes elsewhere: what, and what to do.
    #[error("{0}")]
    Refused(String),
}

/// What `who` may do, for a person: whose it is, or who may write in it.
fn who_may(who: Who) -> String {
    match who {
        Who::User(Owner { uid, .. }) => match user_entry(uid) {
            Some((name, _)) => format!("belongs to uid {uid} ({})", name.to_string_lossy()),
            None => format!("belongs to uid {uid}"),
        },
        Who::Group(gid) => format!("may be written in by the members of group {gid}"),
        Who::Anyone => "may be written in by anyone".to_owned(),
    }
}

/// The store folder (there, if `exists`, or to be made) is refused: from `folder` on (`None`:
/// in the store folder itself) `who` may change what the path names.
fn open_to_others(store: &Path, exists: bool, folder: Option<&Path>, who: Who) -> OwnerError {
    let (store, who_may) = (store.display(), who_may(who));
    let risk = match (folder, exists) {
        (None, _) => format!("the store folder {store} would be opened with root's rights, but it {who_may}: they could put links in it that outpost would write through"),
        (Some(folder), true) => format!("the store folder {store} would be opened with root's rights, but {}, on the way to it, {who_may}: they could put a folder of theirs in its place, whose links outpost would write through", folder.display()),
        (Some(folder), false) => format!("the store folder {store} is not there yet, and {}, on the way to it, {who_may}: they could put a folder of theirs in its place, whose links outpost would write through", folder.display()),
    };
    let fix = match (who, folder) {
        (Who::User(Owner { uid, gid }), _) if exists => format!(
            "give the store to that user (chown -R {uid}:{gid} {store}), whom outpost then acts as"
        ),
        (Who::User(_), _) => {
            "make the store folder where no one else may change the path".to_owned()
        }
        (Who::Group(_) | Who::Anyone, None) => format!("take that right away (chmod go-w {store})"),
        (Who::Group(_) | Who::Anyone, Some(folder)) => {
            let folder = folder.display();
            format!("take that right away (chmod go-w {folder}) or make the folder sticky (chmod +t {folder}), so that only root may rename what root made there")
        }
    };
    OwnerError::Refused(format!(
        "{risk}; {fix}, or keep the store where only root may change the path"
    ))
}

/// Whether `entry` is in a sticky folder that others than its owner may write in (`/tmp`):
/// anyone may have made it.
fn in_a_shared_sticky_folder(entry: &Path) -> bool {
    entry
        .parent()
        .and_then(|folder| fs::metadata(folder).ok())
        .is_some_and(|folder| folder.mode() & 0o1000 != 0 && folder.mode() & 0o022 != 0)
}

/// The store folder `store` is user `uid`'s, but from `folder` on `who` may change what its
/// path names.
fn swappable_users_store(store: &Path, uid: u32, folder: &Path, who: Who) -> OwnerError {
    let (store_shown, owner) = (store.display(), who_may(Who::User(Owner { uid, gid: 0 })));
    let folder_shown = folder.display();
    let fix = match who {
        Who::User(Owner { uid: other, gid }) => format!(
            "give {folder_shown} to the store's user (chown {uid} {folder_shown}) or to root, or run the command as the store's user; uid {other}:{gid} now holds it"
        ),
        Who::Group(_) | Who::Anyone => format!(
            "take that right away (chmod go-w {folder_shown}) or make the folder sticky (chmod +t {folder_shown}), or run the command as the store's user"
        ),
    };
    OwnerError::Refused(format!(
        "the store folder {store_shown} {owner}, whose rights outpost run as root would take on, but {folder_shown}, on the way to it, {}: they could put a folder of theirs in its place, and outpost would take on their rights; {fix}",
        who_may(who)
    ))
}

/// The entry `entry`, on the way to (or being) the store folder `store`, is user `uid`'s and
/// sits in a sticky folder others may write in: anyone could have made it first.
fn made_first_by_another(store: &Path, uid: u32, entry: &Path) -> OwnerError {
    let owner = who_may(Who::User(Owner { uid, gid: 0 }));
    OwnerError::Refused(format!(
        "{} {owner}, in a sticky folder others may make entries in, so another could have made it before the store's user did; outpost run as root will not take on the rights of whoever made it: run the command as the store's user (sudo -u), or keep the store where only root and its user may change the path (the store: {})",
        entry.display(),
        store.display()
    ))
}

/// The store folder, root's, holds `entry`, which would lead root's writes elsewhere.
fn planted(store: &Path, entry: &Path, planted: Planted) -> OwnerError {
    let (store, entry) = (store.display(), entry.display());
    let (what, fix) = match planted {
        Planted::Link => (format!("holds a link, {entry}, which outpost, keeping root's rights, would write through"), "remove it".to_owned()),
        Planted::HardLinked => (format!("holds {entry}, a file with other names, which may be anywhere, that outpost, keeping root's rights, would write to"), "remove it".to_owned()),
        Planted::OpenTo(who @ Who::User(Owner { uid, gid })) => (
            format!("holds {entry}, which {}: they could put links there that outpost, keeping root's rights, would write through", who_may(who)),
            format!("give the whole store to root (chown -R root: {store}) or to that user (chown -R {uid}:{gid} {store}), whom outpost then acts as"),
        ),
        Planted::OpenTo(who) => (
            format!("holds {entry}, which {}: they could put links there that outpost, keeping root's rights, would write through", who_may(who)),
            format!("take that right away (chmod go-w {entry})"),
        ),
    };
    OwnerError::Refused(format!(
        "the store folder {store} is root's, but it {what}; {fix}"
    ))
}

/// The user a process run as root takes on for a store folder another user owns: that user's
/// id and groups from the user database, or the folder's group alone for a user it has no
/// entry for.
#[derive(Debug)]
pub struct StoreOwner {
    uid: u32,
    groups: OwnerGroups,
    store: PathBuf,
}

#[derive(Debug)]
enum OwnerGroups {
    /// The user's name and primary group: `initgroups` adds the rest.
    Entry(std::ffi::CString, u32),
    /// The folder's group (never root's).
    Folder(u32),
}

impl StoreOwner {
    /// Whom a process run as root acts as on `store`: the folder's owner when another user owns
    /// it; when it is yet to be made, the user who may change what its path names (say, the
    /// owner of the folder it goes in), if no one else may. `None` when not root, or when root
    /// keeps its rights: no one else may change what the path names, and the store holds
    /// nothing another may change or that leads elsewhere. [`OwnerError::Refused`] when that
    /// is not so; [`OwnerError::Missing`] for a store not there that `store_use` needs; an
    /// error too for a user not in the user database whose folder's group is root's: no group
    /// is safe to take then. On a store that is not another user's, it tightens the umask and
    /// makes the store's first missing folder in a sticky folder anyone may write in.
    pub fn of_foreign_store(
        store: &Path,
        store_use: StoreUse,
    ) -> Result<Option<StoreOwner>, OwnerError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        match fs::metadata(store) {
            Ok(meta) if meta.is_dir() && meta.uid() != 0 => {
                return StoreOwner::of_users_store(store, meta.uid(), meta.gid()).map(Some)
            }
            Ok(_) => {}
            // Said before anything is made or judged: with no store, such a command stops.
            Err(e) if super::names_nothing(&e) && store_use == StoreUse::Existing => {
                return Err(OwnerError::Missing(store.to_owned()))
            }
            // A path through a file: nothing can be made there, and the open says which part
            // of it is a file.
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        // Root's, or yet to be made (or not a folder, which the open refuses): root keeps its
        // rights only where no one else may change what the path names, and what it makes
        // there from now on no one else may write in, whatever the umask.
        // SAFETY: a plain system call.
        unsafe { libc::umask(libc::umask(0o022) | 0o022) };
        let root_alone = |uid: u32| uid == 0;
        let mut control = path_control::control(store, root_alone)?;
        if let Control::MissingInSticky { entry, last, .. } = &control {
            // A plain mkdir fails on anything put there first, a link too; what another
            // process of root's made meanwhile is as good.
            // The store's own folder readable by its owner alone, as `Store::open` makes it
            // (compared as resolved: `storage.path` may hold `..`).
            let mode = if *last { 0o700 } else { 0o755 };
            match fs::DirBuilder::new().mode(mode).create(entry) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let made = fs::symlink_metadata(entry)?;
                    if !(made.is_dir() && made.uid() == 0) {
                        return Err(made_first_by_another(store, made.uid(), entry));
                    }
                }
                Err(e) => return Err(e.into()),
            }
            control = path_control::control(store, root_alone)?;
        }
        let exists = store.exists();
        match control.open_to() {
            None if store.is_dir() => match path_control::planted_in(store, DEPTH, root_alone)? {
                None => Ok(None),
                Some((entry, what)) => Err(planted(store, &entry, what)),
            },
            None => Ok(None),
            // One yet to be made where a user may change the path is made as that user, if
            // no one else may.
            Some((Some(folder), Who::User(user)))
                if !exists && in_a_shared_sticky_folder(&folder) =>
            {
                Err(made_first_by_another(store, user.uid, &folder))
            }
            Some((_, Who::User(user))) if !exists => {
                let root_or_user = |uid: u32| uid == 0 || uid == user.uid;
                match path_control::control(store, root_or_user)?.open_to() {
                    None => StoreOwner::of_user(user.uid, user.gid, store).map(Some),
                    Some((folder, who)) => {
                        Err(open_to_others(store, exists, folder.as_deref(), who))
                    }
                }
            }
            Some((folder, who)) => Err(open_to_others(store, exists, folder.as_deref(), who)),
        }
    }

    /// The owner of `store`, a folder user `uid` owns (its group `gid`), if root may take on
    /// their rights there: no one but root and that user may change what the path names
    /// (else another could put a folder of theirs in its place, and root would take on their
    /// rights), and the user's hold on the path does not begin with an entry in a sticky folder
    /// others may write in (`/tmp`: anyone could have made it first). What the store folder
    /// holds is the user's own business, as when the agent runs as them.
    fn of_users_store(store: &Path, uid: u32, gid: u32) -> Result<StoreOwner, OwnerError> {
        let root_or_owner = |u: u32| u == 0 || u == uid;
        if let Some((Some(folder), who)) = path_control::control(store, root_or_owner)?.open_to() {
            return Err(swappable_users_store(store, uid, &folder, who));
        }
        if let Some((Some(folder), Who::User(user))) =
            path_control::control(store, |u| u == 0)?.open_to()
        {
            if user.uid == uid && in_a_shared_sticky_folder(&folder) {
                return Err(made_first_by_another(store, uid, &folder));
            }
        }
        StoreOwner::of_user(uid, gid, store)
    }

    /// User `uid`, with the groups the user database gives, or else group `gid` (that of what
    /// the user owns), never root's.
    fn of_user(uid: u32, gid: u32, store: &Path) -> Result<StoreOwner, OwnerError> {
        let groups = match user_entry(uid) {
            Some((name, gid)) => OwnerGroups::Entry(name, gid),
            None if gid == 0 => {
                return Err(std::io::Error::other(format!(
                    "uid {uid}, whose rights it would take as the folder's owner, is not in the user database, and the folder's group is root's, which outpost will not take: add the user to the user database, or give the folder another group with chgrp"
                )).into());
            }
            None => OwnerGroups::Folder(gid),
        };
        Ok(StoreOwner {
            uid,
            groups,
            store: store.to_owned(),
        })
    }

    /// Gives up root for this user, on every thread of the process (glibc makes each call
    /// take effect on all of them), having handed the user what root made in the store
    /// before (an agent of an earlier build, which kept root, killed as it ran): the user
    /// could not open it afterwards. Returns the user id taken.
    pub fn act_as(self) -> std::io::Result<u32> {
        hand_back_to_owner(&self.store, self.uid);
        let failed = |what: &str| {
            let e = std::io::Error::last_os_error();
            std::io::Error::new(e.kind(), format!("{what}: {e}"))
        };
        // SAFETY: a plain system call.
        let set_gid = |gid: u32| match unsafe { libc::setgid(gid) } {
            0 => Ok(()),
            _ => Err(failed(&format!("setgid({gid})"))),
        };
        // Groups before the user id: once that is given up, they cannot be changed.
        match &self.groups {
            OwnerGroups::Entry(name, gid) => {
                // SAFETY: `name` is a NUL-terminated string that outlives the call.
                if unsafe { libc::initgroups(name.as_ptr(), *gid) } != 0 {
                    return Err(failed("initgroups"));
                }
                set_gid(*gid)?;
            }
            OwnerGroups::Folder(gid) => {
                // SAFETY: `gid` outlives the call.
                if unsafe { libc::setgroups(1, gid) } != 0 {
                    return Err(failed("setgroups"));
                }
                set_gid(*gid)?;
            }
        }
        // SAFETY: a plain system call.
        if unsafe { libc::setuid(self.uid) } != 0 {
            return Err(failed(&format!("setuid({})", self.uid)));
        }
        // Securebits a service manager set (`no_setuid_fixup`) keep capabilities past setuid,
        // and with some of them the user's links would still lead root's writes elsewhere.
        let kept = kept_file_capabilities().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot read the capabilities left after taking uid {}: {e}",
                    self.uid
                ),
            )
        })?;
        if let Some(kept) = kept {
            return Err(std::io::Error::other(format!(
                "capabilities over files remain after taking uid {} (effective or permitted set {kept:#x}; securebits such as no_setuid_fixup keep them): start outpost without them",
                self.uid
            )));
        }
        Ok(self.uid)
    }
}

/// Capabilities that pass over file permissions or give root back: CAP_CHOWN,
/// CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID, CAP_SETGID, CAP_SETUID,
/// CAP_SYS_ADMIN. Others (CAP_NET_BIND_SERVICE, which a service may be given) do not matter.
const FILE_CAPABILITIES: u64 = 0b1101_1111 | 1 << 21;

/// Those of [`FILE_CAPABILITIES`] this process still has in effect, or may raise into effect
/// (its permitted set: `capset` makes them effective again) (`None`: none).
fn kept_file_capabilities() -> std::io::Result<Option<u64>> {
    let (effective, permitted) = capability_sets()?;
    let kept = (effective | permitted) & FILE_CAPABILITIES;
    Ok((kept != 0).then_some(kept))
}

/// The header of `capget`/`capset`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// One 32-bit half of each capability set, as `capget`/`capset` take them.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapHalves {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64 bits a set, in two halves.
const CAP_VERSION_3: u32 = 0x2008_0522;

/// This thread's capability sets in halves (low, high), from the kernel itself.
fn capability_halves() -> std::io::Result<[CapHalves; 2]> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapHalves::default(); 2];
    // SAFETY: `header` and the two `data` entries are what capget reads and writes for
    // version 3, and live across the call.
    let code = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if code != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(data)
}

/// This thread's effective and permitted capability sets, from the kernel itself (`capget`),
/// so that the answer does not hang on `/proc` being mounted and readable.
fn capability_sets() -> std::io::Result<(u64, u64)> {
    let data = capability_halves()?;
    let both = |low: u32, high: u32| u64::from(low) | u64::from(high) << 32;
    Ok((
        both(data[0].effective, data[1].effective),
        both(data[0].permitted, data[1].permitted),
    ))
}

/// The name and primary group of user `uid` in the user database, if it has an entry.
fn user_entry(uid: u32) -> Option<(std::ffi::CString, u32)> {
    // SAFETY: all zeroes is a valid `passwd` (null pointers, zero ids); it is only read after
    // getpwuid_r filled it.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: the pointers are to live values of the right types and `buffer`'s length is
    // given; the strings in `entry` point into `buffer`, read before it is dropped.
    let code = unsafe {
        libc::getpwuid_r(
            uid,
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if code != 0 || found.is_null() || entry.pw_name.is_null() {
        return None;
    }
    // SAFETY: getpwuid_r succeeded, so `pw_name` is a NUL-terminated string in `buffer`.
    let name = unsafe { std::ffi::CStr::from_ptr(entry.pw_name) }.to_owned();
    Some((name, entry.pw_gid))
}

/// Hands what root made under `store` to its owner, user `uid`: only entries root owns, never
/// through a symbolic link, and only files with one link (a hard link put in the folder could
/// name a file elsewhere), and files only where the kernel keeps users from linking to files
/// they do not own (`fs.protected_hardlinks`); a socket is left (the next agent makes its
/// own). Does nothing unless this process runs as root and the folder it opens is still
/// `uid`'s: had the path been changed to lead to another user's folder since the owner was
/// decided, root would hand that user's files over. What fails is logged; opening the store as
/// the owner then says what it cannot use.
fn hand_back_to_owner(store: &Path, uid: u32) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let Ok(folder) = open(store, libc::O_DIRECTORY) else {
        return;
    };
    let files_too =
        fs::read_to_string("/proc/sys/fs/protected_hardlinks").is_ok_and(|on| on.trim() == "1");
    match folder.metadata() {
        Ok(meta) if meta.is_dir() && meta.uid() == uid && uid != 0 => {
            hand_back_under(&folder, uid, meta.gid(), DEPTH, files_too)
        }
        _ => {}
    }
}

fn open(path: &Path, flags: i32) -> std::io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | flags)
        .open(path)
}

/// Each entry is opened through the open folder (`/proc/self/fd/N/name`) and looked at and
/// changed through its own open file: a folder or file swapped for a link meanwhile is not
/// followed out of the store.
fn hand_back_under(dir: &File, uid: u32, gid: u32, depth: usize, files_too: bool) {
    let through = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    let entries = match fs::read_dir(&through) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list a store folder to hand its files to the folder's owner");
            return;
        }
    };
    for entry in entries.flatten() {
        let path = through.join(entry.file_name());
        let Ok(file) = open(&path, libc::O_NOFOLLOW) else {
            continue;
        };
        let Ok(meta) = file.metadata() else {
            continue;
        };
        if meta.uid() == 0 && meta.is_file() && !files_too {
            tracing::warn!(file = %entry.file_name().to_string_lossy(), uid, "a store file of root's is not handed to the store folder's owner: fs.protected_hardlinks is off (or could not be read), so it could be another file linked in; chown it by hand if it is the store's");
        }
        if meta.uid() == 0 && (meta.is_dir() || (files_too && meta.nlink() == 1)) {
            if let Err(e) = std::os::unix::fs::fchown(&file, Some(uid), Some(gid)) {
                tracing::warn!(file = %entry.file_name().to_string_lossy(), uid, error = %e, "cannot hand a store file to the store folder's owner");
            }
        }
        if meta.is_dir() && depth > 0 {
            hand_back_under(&file, uid, gid, depth - 1, files_too);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store yet to be made in a sticky folder is made by root readable by root alone, also
    /// when `storage.path` reaches it through `..` (compared unresolved, it was made 755).
    /// Needs root: skipped without, and failed under `CI`, which runs as root.
    #[test]
    fn a_store_made_in_a_sticky_folder_is_its_owners_alone_whatever_path_names_it() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(std::env::var_os("CI").is_none(), "needs root, which CI has");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let sticky = dir.path().join("sticky");
        fs::create_dir_all(sticky.join("x")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&sticky, fs::Permissions::from_mode(0o1777)).unwrap();
        for (path, made) in [
            (sticky.join("plain"), sticky.join("plain")),
            (sticky.join("x/../dotted"), sticky.join("dotted")),
        ] {
            StoreOwner::of_foreign_store(&path, StoreUse::Make).unwrap();
            let mode = fs::metadata(&made).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o700, "{} made {mode:o}", path.display());
        }
    }

    /// The kernel's answer and `/proc`'s agree, set by set and both halves of each (only
    /// where `/proc` can be read; the sets are empty but for a privileged user).
    #[test]
    fn the_capability_sets_are_those_proc_shows() {
        // On a thread of its own, which drops CAP_CHOWN from its effective set where it has
        // it, so that the two sets differ (as root they are equal, and a swap would pass).
        std::thread::spawn(|| {
            if fs::read_to_string("/proc/thread-self/status").is_err() {
                return;
            }
            let mut halves = capability_halves().unwrap();
            let dropped = halves[0].effective & 1 != 0;
            if dropped {
                halves[0].effective &= !1;
                let mut header = CapHeader {
                    version: CAP_VERSION_3,
                    pid: 0,
                };
                // SAFETY: as in capability_halves; capset only reads them.
                let code = unsafe {
                    libc::syscall(
                        libc::SYS_capset,
                        &mut header as *mut CapHeader,
                        halves.as_ptr(),
                    )
                };
                assert_eq!(code, 0, "capset: {}", std::io::Error::last_os_error());
            }
            let status = fs::read_to_string("/proc/thread-self/status").unwrap();
            let shown = |field: &str| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix(field))
                    .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
                    .unwrap()
            };
            let shown = (shown("CapEff:"), shown("CapPrm:"));
            assert_eq!(capability_sets().unwrap(), shown, "{shown:x?}");
            if dropped {
                assert_ne!(shown.0, shown.1, "the sets should differ now");
                // Still permitted, it may be made effective again: it is kept.
                let kept = kept_file_capabilities().unwrap().unwrap_or(0);
                assert_eq!(
                    kept & 1,
                    1,
                    "CAP_CHOWN, permitted, counts as kept: {kept:#x}"
                );
            }
        })
        .join()
        .unwrap();
    }
}
