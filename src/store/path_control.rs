//! Who besides root may change what a store path names.
//!
//! A process that keeps root's rights opens the store by its path. Should another user be able
//! to change a folder on the way (own it, or write in it), they could swap the store folder for
//! one of theirs between outpost's look at it and sled's open, and root would write through the
//! links in it. So root keeps its rights only over a path no one else may change
//! ([`control`]), as OpenSSH's `StrictModes` asks of the files it trusts.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{self, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// How many symbolic links a path may go through, Linux's own limit.
const MAX_LINKS: usize = 40;

/// A user and group id, of a folder or an entry in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    fn of(meta: &Metadata) -> Owner {
        Owner {
            uid: meta.uid(),
            gid: meta.gid(),
        }
    }
}

/// Someone other than a trusted user who may change which entry a folder's name stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// The owner of the folder, or of the entry in a sticky folder (with the owner's group).
    User(Owner),
    /// The members of the folder's group, which may write in it.
    Group(u32),
    /// Anyone: others may write in the folder.
    Anyone,
}

/// What a path to a store folder lets users other than the trusted ones do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Only trusted users may change what the path names.
    Trusted,
    /// From `folder` on, `who` may change what the path names, or (`None`) put entries in
    /// the store folder itself.
    OpenTo { folder: Option<PathBuf>, who: Who },
    /// The path's first missing part, `entry`, would be made in a sticky folder of a trusted
    /// user's that `who` may write in (`/tmp`, a fresh tmpfs). Made there by a trusted user
    /// first (a plain `mkdir`, which anything put there before fails), it is theirs alone.
    /// `last`: it is what the path names (as the kernel resolves it: `a/../b` names `b`).
    MissingInSticky {
        entry: PathBuf,
        who: Who,
        last: bool,
    },
}

/// Something in a store folder that would lead the writes of a process keeping root's rights
/// elsewhere, or that another user may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Planted {
    Link,
    /// A file with more than one name: the others may be anywhere.
    HardLinked,
    /// An entry another user owns, or a folder in the store that `Who` may write in.
    OpenTo(Who),
}

impl Control {
    /// Who besides the trusted users may change what the path names, and from which folder
    /// on (`None`: in the store folder itself); `None` when no one may.
    pub fn open_to(self) -> Option<(Option<PathBuf>, Who)> {
        match self {
            Control::Trusted => None,
            Control::OpenTo { folder, who } => Some((folder, who)),
            Control::MissingInSticky { entry, who, .. } => {
                Some((entry.parent().map(Path::to_owned), who))
            }
        }
    }
}

/// Who besides the `trusted` users may change which entry a name in a folder stands for, given
/// the folder's owner and mode and the entry's owner (`None`: no such entry yet). Those who may
/// write in the folder come first: they are more.
pub fn who_may_change(
    folder: Owner,
    mode: u32,
    entry: Option<Owner>,
    trusted: impl Fn(u32) -> bool,
) -> Option<Who> {
    let (others_write, group_write) = (mode & 0o002 != 0, mode & 0o020 != 0);
    // In a sticky folder (`/tmp`) only an entry's owner and the folder's may rename or remove
    // the entry; a missing one anyone who may write there can make.
    let sticky_entry = entry.filter(|_| mode & 0o1000 != 0);
    match sticky_entry {
        Some(entry) if others_write || group_write => {
            if !trusted(folder.uid) {
                Some(Who::User(folder))
            } else {
                (!trusted(entry.uid)).then_some(Who::User(entry))
            }
        }
        _ if others_write => Some(Who::Anyone),
        _ if group_write => Some(Who::Group(folder.gid)),
        _ => (!trusted(folder.uid)).then_some(Who::User(folder)),
    }
}

/// Walks `path` (relative to the working folder, if relative) one name at a time as the
/// kernel would, following symbolic links, and says whether anyone but the `trusted` users may
/// change what it names: any folder looked into on the way, and the store folder itself.
pub fn control(path: &Path, trusted: impl Fn(u32) -> bool + Copy) -> std::io::Result<Control> {
    let path = std::env::current_dir()?.join(path);
    let mut rest = names(&path);
    let mut folder = PathBuf::from("/");
    let mut meta = fs::metadata(&folder)?;
    let mut links = 0;
    while let Some(name) = rest.pop_front() {
        if name == ".." {
            folder.pop();
            meta = fs::metadata(&folder)?;
            continue;
        }
        let entry = folder.join(&name);
        let found = match fs::symlink_metadata(&entry) {
            Ok(found) => Some(found),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let entry_owner = found.as_ref().map(Owner::of);
        if let Some(who) = who_may_change(Owner::of(&meta), meta.mode(), entry_owner, trusted) {
            let sticky = meta.mode() & 0o1000 != 0;
            if found.is_none() && sticky && trusted(meta.uid()) {
                let last = rest.is_empty();
                return Ok(Control::MissingInSticky { entry, who, last });
            }
            // In a sticky folder, it may be the entry's owner who may.
            let folder = match who {
                Who::User(user) if user.uid != meta.uid() => entry,
                _ => folder,
            };
            return Ok(Control::OpenTo {
                folder: Some(folder),
                who,
            });
        }
        let Some(found) = found else {
            if rest.iter().any(|name| name == "..") {
                // Made as it goes, the path would then lead where this walk cannot follow.
                return Err(std::io::Error::other(format!(
                    "{} goes up (`..`) out of {}, which is not there yet",
                    path.display(),
                    entry.display()
                )));
            }
            return Ok(Control::Trusted);
        };
        if found.file_type().is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                return Err(std::io::Error::other(format!(
                    "{} goes through more than {MAX_LINKS} symbolic links",
                    path.display()
                )));
            }
            let target = fs::read_link(&entry)?;
            if target.is_absolute() {
                folder = PathBuf::from("/");
                meta = fs::metadata(&folder)?;
            }
            for name in names(&target).into_iter().rev() {
                rest.push_front(name);
            }
            continue;
        }
        if !found.is_dir() {
            // Not a folder: opening the store there fails on its own.
            return Ok(Control::Trusted);
        }
        folder = entry;
        meta = found;
    }
    // The store folder: sled makes new files in it.
    Ok(
        match who_may_change(Owner::of(&meta), meta.mode(), None, trusted) {
            Some(who) => Control::OpenTo { folder: None, who },
            None => Control::Trusted,
        },
    )
}

/// The first entry in the store folder `store`, or in its folders at most `depth` down, that
/// would lead root's writes elsewhere or that another user may change; `None` when there is
/// none (trusted: those whose entries are not another's). Only for a store folder no one else
/// may change the path to ([`control`]): then no one else may change what it holds while it
/// is looked over.
pub fn planted_in(
    store: &Path,
    depth: usize,
    trusted: impl Fn(u32) -> bool + Copy,
) -> std::io::Result<Option<(PathBuf, Planted)>> {
    // A running agent adds and removes entries as it works: one gone meanwhile is passed over.
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let entries = match fs::read_dir(store) {
        Ok(entries) => entries,
        Err(e) if gone(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = match entry {
            Ok(entry) => entry.path(),
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        let planted = if meta.file_type().is_symlink() {
            Some(Planted::Link)
        } else if meta.is_dir() {
            // Its entries are made anew as the store works.
            who_may_change(Owner::of(&meta), meta.mode(), None, trusted).map(Planted::OpenTo)
        } else if !trusted(meta.uid()) {
            Some(Planted::OpenTo(Who::User(Owner::of(&meta))))
        } else if meta.is_file() && meta.nlink() > 1 {
            Some(Planted::HardLinked)
        } else {
            None
        };
        if let Some(planted) = planted {
            return Ok(Some((path, planted)));
        }
        if meta.is_dir() && depth > 0 {
            if let Some(found) = planted_in(&path, depth - 1, trusted)? {
                return Ok(Some(found));
            }
        }
    }
    Ok(None)
}

/// The names a path goes through, `..` kept; the root and `.` left out.
fn names(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|part| match part {
            Component::Normal(name) => Some(name.to_owned()),
            Component::ParentDir => Some("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::*;

    const ROOT: u32 = 0;
    const ALICE: u32 = 1000;
    const STAFF: u32 = 50;

    #[test]
    fn who_may_change_table() {
        let root_alone = |uid: u32| uid == ROOT;
        let root = Owner { uid: ROOT, gid: 0 };
        let alice = Owner {
            uid: ALICE,
            gid: ALICE,
        };
        let root_staff = Owner {
            uid: ROOT,
            gid: STAFF,
        };
        // (folder's owner, its mode, the entry's owner, who besides root may change the entry)
        let cases = [
            (root, 0o755, Some(root), None),
            (root, 0o700, None, None),
            (alice, 0o755, Some(root), Some(Who::User(alice))),
            (alice, 0o700, None, Some(Who::User(alice))),
            (root_staff, 0o775, Some(root), Some(Who::Group(STAFF))),
            (root, 0o757, Some(root), Some(Who::Anyone)),
            (root, 0o777, Some(root), Some(Who::Anyone)),
            // Those who may write in it before its owner.
            (alice, 0o777, Some(alice), Some(Who::Anyone)),
            // /tmp: sticky, so root's own entry stays root's to rename...
            (root, 0o1777, Some(root), None),
            (root_staff, 0o1775, Some(root), None),
            // ... another's is theirs...
            (root, 0o1777, Some(alice), Some(Who::User(alice))),
            // ... a missing one anyone may make...
            (root, 0o1777, None, Some(Who::Anyone)),
            (root_staff, 0o1770, None, Some(Who::Group(STAFF))),
            // ... and the folder's owner may rename any entry in it.
            (alice, 0o1777, Some(root), Some(Who::User(alice))),
        ];
        for (folder, mode, entry, expected) in cases {
            assert_eq!(
                who_may_change(folder, mode, entry, root_alone),
                expected,
                "folder of {folder:?}, mode {mode:o}, entry of {entry:?}"
            );
        }
    }

    /// A user running the tests stands for root: trusted are root and that user.
    fn me() -> impl Fn(u32) -> bool + Copy {
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        move |uid| uid == ROOT || uid == me
    }

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A folder of the user's own, closed to others' writes, under the system's temporary
    /// folder (`TMPDIR`), named without links, as the walk names folders.
    fn own_folder() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let path = dir.path().canonicalize().unwrap();
        (dir, path)
    }

    /// Makes a folder closed to others' writes, whatever the umask.
    fn folder(path: &Path) -> PathBuf {
        fs::create_dir_all(path).unwrap();
        chmod(path, 0o755);
        path.to_owned()
    }

    #[test]
    fn a_path_through_the_users_own_folders_is_trusted() {
        let (_dir, dir) = own_folder();
        let store = dir.join("store");
        assert_eq!(control(&store, me()).unwrap(), Control::Trusted);
        folder(&store);
        assert_eq!(control(&store, me()).unwrap(), Control::Trusted);
        let through_dots = dir.join("store/../store/./");
        assert_eq!(control(&through_dots, me()).unwrap(), Control::Trusted);
    }

    #[test]
    fn a_folder_others_may_write_in_on_the_way_is_named() {
        let (_dir, dir) = own_folder();
        let shared = folder(&dir.join("shared"));
        folder(&shared.join("store"));
        chmod(&shared, 0o777);
        assert_eq!(
            control(&shared.join("store"), me()).unwrap(),
            Control::OpenTo {
                folder: Some(shared.clone()),
                who: Who::Anyone
            }
        );
        chmod(&shared, 0o1777);
        assert_eq!(
            control(&shared.join("store"), me()).unwrap(),
            Control::Trusted
        );
        // Anyone could make it first; made by a trusted user, it is theirs to keep.
        assert_eq!(
            control(&shared.join("not-yet/store"), me()).unwrap(),
            Control::MissingInSticky {
                entry: shared.join("not-yet"),
                who: Who::Anyone,
                last: false,
            },
        );
        // The path's last name as the kernel resolves it, `..` and all: the store's folder.
        assert_eq!(
            control(&shared.join("store/../also-not-yet"), me()).unwrap(),
            Control::MissingInSticky {
                entry: shared.join("also-not-yet"),
                who: Who::Anyone,
                last: true,
            },
        );
        chmod(&shared, 0o775);
        let group = fs::metadata(&shared).unwrap().gid();
        assert_eq!(
            control(&shared.join("not-yet"), me()).unwrap().open_to(),
            Some((Some(shared), Who::Group(group))),
            "not sticky: anyone who may write there may rename what a trusted user made"
        );
    }

    #[test]
    fn a_store_folder_others_may_write_in_is_named() {
        let (_dir, dir) = own_folder();
        let store = folder(&dir.join("store"));
        chmod(&store, 0o770);
        let group = fs::metadata(&store).unwrap().gid();
        assert_eq!(
            control(&store, me()).unwrap(),
            Control::OpenTo {
                folder: None,
                who: Who::Group(group)
            }
        );
        chmod(&store, 0o1777);
        assert_eq!(
            control(&store, me()).unwrap().open_to(),
            Some((None, Who::Anyone)),
            "sled makes new files in it"
        );
    }

    #[test]
    fn links_are_followed_and_the_folders_they_go_through_judged() {
        let (_dir, dir) = own_folder();
        let open = folder(&dir.join("open"));
        let safe = folder(&dir.join("safe"));
        folder(&open.join("store"));
        folder(&safe.join("store"));
        chmod(&open, 0o777);
        // A link in a trusted folder to a store reached through a folder anyone may write in.
        symlink(open.join("store"), dir.join("absolute")).unwrap();
        symlink("open/store", dir.join("relative")).unwrap();
        symlink("../safe/store", safe.join("up-and-back")).unwrap();
        for link in ["absolute", "relative"] {
            assert_eq!(
                control(&dir.join(link), me()).unwrap(),
                Control::OpenTo {
                    folder: Some(open.clone()),
                    who: Who::Anyone
                },
                "{link}"
            );
        }
        assert_eq!(
            control(&safe.join("up-and-back"), me()).unwrap(),
            Control::Trusted
        );
        // A link in a folder anyone may write in could be pointed elsewhere.
        symlink("../safe/store", open.join("to-safe")).unwrap();
        assert_eq!(
            control(&open.join("to-safe"), me()).unwrap(),
            Control::OpenTo {
                folder: Some(open),
                who: Who::Anyone
            }
        );
        symlink("loop", dir.join("loop")).unwrap();
        let looping = control(&dir.join("loop"), me()).unwrap_err();
        assert!(
            looping.to_string().contains("more than 40 symbolic links"),
            "{looping}"
        );
    }

    #[test]
    fn a_path_that_goes_up_out_of_a_folder_not_yet_made_is_an_error() {
        let (_dir, dir) = own_folder();
        let up = control(&dir.join("not-yet/../store"), me()).unwrap_err();
        assert!(up.to_string().contains("goes up (`..`) out of"), "{up}");
    }

    #[test]
    fn what_a_store_folder_holds_is_looked_over() {
        let (_dir, dir) = own_folder();
        let store = folder(&dir.join("store"));
        let blobs = folder(&store.join("blobs"));
        fs::write(store.join("db"), b"").unwrap();
        fs::write(blobs.join("1"), b"").unwrap();
        assert_eq!(planted_in(&store, 2, me()).unwrap(), None);

        symlink("/etc/hostname", blobs.join("2")).unwrap();
        assert_eq!(
            planted_in(&store, 2, me()).unwrap(),
            Some((blobs.join("2"), Planted::Link))
        );
        assert_eq!(
            planted_in(&store, 0, me()).unwrap(),
            None,
            "below the depth"
        );
        fs::remove_file(blobs.join("2")).unwrap();

        fs::hard_link(store.join("db"), dir.join("elsewhere")).unwrap();
        assert_eq!(
            planted_in(&store, 2, me()).unwrap(),
            Some((store.join("db"), Planted::HardLinked))
        );
        fs::remove_file(dir.join("elsewhere")).unwrap();

        chmod(&blobs, 0o757);
        assert_eq!(
            planted_in(&store, 2, me()).unwrap(),
            Some((blobs, Planted::OpenTo(Who::Anyone)))
        );
    }
}
