//! What `outpost check` can check on this host before a run: that the store folder can be
//! written and how much space its file system has, and that `ingest.listen` is free.

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use crate::config::Config;

/// One checked item: the line to print, and what is wrong or worth knowing.
pub(super) struct Finding {
    pub line: String,
    pub problem: Option<String>,
    pub warning: Option<String>,
    /// The problem is one the agent refuses to start for, as a configuration mistake (exit 2).
    pub refused_at_start: bool,
}

/// The store folder, or the nearest folder above it that exists (`check` creates nothing);
/// `Err` with the part of the path that exists nearest to it when that is not a folder (a
/// file where the store or a folder on its way would be: the store could not be made).
fn existing_folder(path: &Path) -> Result<Option<PathBuf>, PathBuf> {
    let nearest = path
        .ancestors()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".") // above a relative path: the current folder
            } else {
                p
            }
        })
        .find(|p| p.exists());
    match nearest {
        Some(p) if p.is_dir() => Ok(Some(p.to_path_buf())),
        Some(p) => Err(p.to_path_buf()),
        None => Ok(None),
    }
}

/// Writes and removes a small file in the store folder (or where it would be created), and
/// reads the space left on that file system.
pub(super) fn store(config: &Config) -> Finding {
    let path = &config.storage.path;
    let folder = match existing_folder(path) {
        Ok(folder) => folder,
        Err(file) => {
            return Finding {
                refused_at_start: true,
                line: format!("{} ({} is not a folder)", path.display(), file.display()),
                problem: Some(format!(
                    "storage.path {}: a part of that path, {}, is a file, not a folder. Set \
                     storage.path to a folder (outpost creates it if it is missing)",
                    path.display(),
                    file.display()
                )),
                warning: None,
            }
        }
    };
    let Some(folder) = folder else {
        return Finding {
            refused_at_start: false,
            line: format!("{} (no folder of that path exists)", path.display()),
            problem: Some(format!(
                "storage.path {}: no folder of that path exists",
                path.display()
            )),
            warning: None,
        };
    };
    let written = tempfile::Builder::new()
        .prefix(".outpost-check-")
        .tempfile_in(&folder);
    if let Err(e) = written {
        tracing::debug!(error = ?e, folder = %folder.display(), "writing a file in the store folder");
        let problem = crate::explain::store_open(path, &sled::Error::Io(e)).unwrap_or_else(|| {
            format!(
                "storage.path {}: cannot write in {}",
                path.display(),
                folder.display()
            )
        });
        return Finding {
            refused_at_start: false,
            line: format!("{} (cannot be written)", path.display()),
            problem: Some(problem),
            warning: None,
        };
    }
    let created = if folder == *path {
        ""
    } else {
        ", created at the first run"
    };
    let (free, reserve, warnings) = match crate::store::free_bytes(&folder).ok() {
        Some(free) => {
            let room = crate::explain::outbox_room_warning(
                free,
                config.storage.max_outbox_bytes,
                config.storage.reserve_bytes,
            );
            let (reserve, reserve_warning) =
                crate::store::reserve::describe_at(path, config.storage.reserve_bytes, free);
            (
                format!(", {} free", bytes(free)),
                format!("; {reserve}"),
                [room, reserve_warning],
            )
        }
        None => (String::new(), String::new(), [None, None]),
    };
    let readable = crate::store::readable_by_others_warning(path);
    let warnings: Vec<String> = warnings.into_iter().chain([readable]).flatten().collect();
    Finding {
        refused_at_start: false,
        line: format!("{} (writable{free}{created}{reserve})", path.display()),
        problem: None,
        warning: (!warnings.is_empty()).then(|| warnings.join("; ")),
    }
}

/// Binds `ingest.listen` for a moment, unless the agent of this store is the one there.
pub(super) fn listen(config: &Config) -> Finding {
    let addr = config.ingest.listen;
    let tls = match &config.ingest.tls {
        Some(tls) if tls.client_ca_file.is_some() => " (HTTPS, client certificates required)",
        Some(_) => " (HTTPS)",
        None => "",
    };
    let token = format!(
        "{tls}{}",
        if config.ingest.token.is_some() {
            " (token required)"
        } else {
            ""
        }
    );
    // A socket of another user's agent counts as an agent running there too.
    if super::Backend::agent_answers(config).unwrap_or(true) {
        return Finding {
            refused_at_start: false,
            line: format!("{addr}{token} (the agent running on this store listens there)"),
            problem: None,
            warning: None,
        };
    }
    match TcpListener::bind(addr) {
        Ok(_) => Finding {
            refused_at_start: false,
            line: format!("{addr}{token} (free)"),
            problem: None,
            warning: None,
        },
        Err(e) => {
            tracing::debug!(error = ?e, %addr, "binding ingest.listen");
            Finding {
                refused_at_start: false,
                line: format!("{addr}{token} (cannot listen)"),
                problem: Some(crate::explain::listen("ingest.listen", &addr, &e)),
                warning: None,
            }
        }
    }
}

pub(super) use crate::explain::bytes;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_table() {
        for (n, text) in [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (32 << 20, "32.0 MiB"),
            (41 << 30, "41.0 GiB"),
            (3 << 40, "3.0 TiB"),
        ] {
            assert_eq!(bytes(n), text);
        }
    }

    #[test]
    fn existing_folder_is_the_nearest_that_exists() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/store");
        assert_eq!(existing_folder(&deep), Ok(Some(dir.path().to_path_buf())));
        std::fs::create_dir_all(&deep).unwrap();
        assert_eq!(existing_folder(&deep), Ok(Some(deep.clone())));
        assert_eq!(
            existing_folder(Path::new("no-such-folder-here/store")),
            Ok(Some(PathBuf::from(".")))
        );
    }

    #[test]
    fn a_file_where_the_store_or_a_folder_on_its_way_would_be_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(existing_folder(&file), Err(file.clone()));
        assert_eq!(existing_folder(&file.join("store")), Err(file.clone()));
    }
}
