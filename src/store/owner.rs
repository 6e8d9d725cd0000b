//! A command run as root on a store folder that another user owns (`sudo outpost compact`, or
//! `ingest`, while the agent, which runs as that user, is stopped) acts as that user
//! ([`act_as_owner`]): what it makes is the owner's, so the agent can open its store again,
//! and a link the owner planted in the folder leads root's writes nowhere. `outpost run` does
//! the same once it has bound its port and read its key files with root's rights
//! (`agent::Ready`). What root made there all the same (an agent of a build before this one,
//! which kept root) is handed back before root is given up, and when a command that keeps
//! root ends ([`hand_back_to_owner`]).

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Folders below the store's that hold its files: `blobs/`, `rebuild/blobs/`.
const DEPTH: usize = 2;

/// Gives up root for the owner of the store folder `store` when this process runs as root and
/// the folder belongs to another user ([`StoreOwner::of_foreign_store`], [`StoreOwner::act_as`]).
/// Returns the user id taken; `None` when not root, or the folder is missing or root's.
pub fn act_as_owner(store: &Path) -> std::io::Result<Option<u32>> {
    match StoreOwner::of_foreign_store(store)? {
        Some(owner) => owner.act_as().map(Some),
        None => Ok(None),
    }
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
    /// The owner of `store` when this process runs as root and the folder belongs to another
    /// user; `None` when not root, or the folder is missing or root's. An error for a user not
    /// in the user database whose folder's group is root's: no group is safe to take then.
    pub fn of_foreign_store(store: &Path) -> std::io::Result<Option<StoreOwner>> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        let meta = match fs::metadata(store) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if !meta.is_dir() || meta.uid() == 0 {
            return Ok(None);
        }
        let uid = meta.uid();
        let groups = match user_entry(uid) {
            Some((name, gid)) => OwnerGroups::Entry(name, gid),
            None if meta.gid() == 0 => {
                return Err(std::io::Error::other(format!(
                    "its owner (uid {uid}) is not in the user database, and its group is root's, which outpost will not take: add the user to the user database, or give the folder another group with chgrp"
                )));
            }
            None => OwnerGroups::Folder(meta.gid()),
        };
        Ok(Some(StoreOwner {
            uid,
            groups,
            store: store.to_owned(),
        }))
    }

    /// Gives up root for this user, on every thread of the process (glibc makes each call
    /// take effect on all of them), having handed the user what root made in the store
    /// before (an agent of an earlier build, which kept root, killed as it ran): the user
    /// could not open it afterwards. Returns the user id taken.
    pub fn act_as(self) -> std::io::Result<u32> {
        hand_back_to_owner(&self.store);
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
        if let Some(kept) = kept_file_capabilities() {
            return Err(std::io::Error::other(format!(
                "capabilities over files remain after taking uid {} (effective set {kept:#x}; securebits such as no_setuid_fixup keep them): start outpost without them",
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

/// Those of [`FILE_CAPABILITIES`] this process still has in effect, as `/proc/self/status`
/// says (`None` when it has none, or says nothing).
fn kept_file_capabilities() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?;
    let kept = u64::from_str_radix(effective.trim(), 16).ok()? & FILE_CAPABILITIES;
    (kept != 0).then_some(kept)
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

/// Hands what root made under `store` to the owner of `store`: only entries root owns, never
/// through a symbolic link, and only files with one link (a hard link put in the folder could
/// name a file elsewhere); a socket is left (the next agent makes its own). Does nothing
/// unless this process runs as root and the folder belongs to another user. What fails is
/// logged: the command's own work is done.
pub fn hand_back_to_owner(store: &Path) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let Ok(folder) = open(store, 0) else {
        return;
    };
    match folder.metadata() {
        Ok(meta) if meta.is_dir() && meta.uid() != 0 => {
            hand_back_under(&folder, meta.uid(), meta.gid(), DEPTH)
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
fn hand_back_under(dir: &File, uid: u32, gid: u32, depth: usize) {
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
        if meta.uid() == 0 && (meta.is_dir() || meta.nlink() == 1) {
            if let Err(e) = std::os::unix::fs::fchown(&file, Some(uid), Some(gid)) {
                tracing::warn!(file = ?entry.file_name(), uid, error = %e, "cannot hand a store file to the store folder's owner");
            }
        }
        if meta.is_dir() && depth > 0 {
            hand_back_under(&file, uid, gid, depth - 1);
        }
    }
}
