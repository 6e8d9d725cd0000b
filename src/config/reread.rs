//! A value read from a file of its own, read again when it may have been rotated there: a
//! secret (the destination's token, client secret or password, the ingest token) or the
//! custom headers of `destination.custom_headers_file`. A file that cannot be read then, or
//! holds what cannot be used (empty, or gone for a moment while it is rotated), leaves what
//! was read before in use, with a warning; one changed less than a second ago, maybe still
//! being written, is taken up at the next read after that.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

/// How long a changed file is left alone before what it holds is taken up: one written in
/// several writes (`echo … > f; echo … >> f`, a chain of certificates `cat`ted together) is
/// not taken up between them, though what it holds then may be usable.
pub const SETTLE: Duration = Duration::from_secs(1);

/// Whether the file at `path` was modified less than [`SETTLE`] ago. A modification time
/// ahead of the clock (set back since) counts as settled: the clock may lag for long.
pub fn written_just_now(path: &Path) -> bool {
    std::fs::metadata(path)
        .and_then(|metadata| metadata.modified())
        .is_ok_and(|modified| {
            SystemTime::now()
                .duration_since(modified)
                .is_ok_and(|age| age < SETTLE)
        })
}

/// Writes `contents` to `path` as one left alone since [`SETTLE`] and more.
#[cfg(test)]
pub fn write_settled(path: &Path, contents: impl AsRef<[u8]>) {
    std::fs::write(path, contents).unwrap();
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(SystemTime::now() - 2 * SETTLE).unwrap();
}

/// A file [`Rereadable`] reads.
pub trait FileRead: Send + Sync {
    type Value: PartialEq + Send + Sync;
    /// The key that names the file in messages.
    fn key(&self) -> &'static str;
    fn path(&self) -> &Path;
    /// What the file holds now; an error names the file, never what it holds.
    fn read(&self) -> Result<Self::Value, String>;
}

/// A value held, and the file it was read from, if any: [`Rereadable::reread`] holds what
/// the file holds now.
pub struct Rereadable<F: FileRead> {
    held: RwLock<Arc<F::Value>>,
    file: Option<F>,
    /// The last failure to read the file that was warned of: one that keeps failing the same
    /// way is warned of once, not at each read.
    warned: Mutex<Option<String>>,
}

impl<F: FileRead> Rereadable<F> {
    pub fn new(held: F::Value, file: Option<F>) -> Rereadable<F> {
        Rereadable {
            held: RwLock::new(Arc::new(held)),
            file,
            warned: Mutex::new(None),
        }
    }

    /// What is held now: the same `Arc` until a read finds the file changed.
    pub fn held(&self) -> Arc<F::Value> {
        Arc::clone(&self.held.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Whether it was read from a file, and so may change.
    pub fn read_from_a_file(&self) -> bool {
        self.file.is_some()
    }

    /// Reads its file again, when it came from one, and holds what the file holds now.
    pub fn reread(&self) {
        let Some(file) = &self.file else {
            return;
        };
        let key = file.key();
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        match file.read() {
            Ok(value) => {
                *warned = None;
                let mut held = self.held.write().unwrap_or_else(|e| e.into_inner());
                if **held != value && written_just_now(file.path()) {
                    tracing::debug!(
                        "{key} changed less than a second ago: taken up once left alone"
                    );
                } else if **held != value {
                    tracing::info!(
                        "{key} holds another value than the one read before: the new one is used"
                    );
                    *held = Arc::new(value);
                }
            }
            Err(error) => {
                if warned.as_deref() != Some(error.as_str()) {
                    tracing::warn!(
                        error = %format!("{key}: {error}"),
                        "reading a file again failed: what was read from it before is used"
                    );
                    *warned = Some(error);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file changed less than a second ago is taken up at the first read after that; one
    /// whose modification time is ahead of the clock, at once.
    #[test]
    fn a_changed_file_is_taken_up_once_left_alone_for_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        write_settled(&path, "first\n");
        let file = super::super::SecretFile::new(path.clone(), "destination.auth.token_file", true);
        let token = Rereadable::new(file.read().unwrap(), Some(file));
        std::fs::write(&path, "sec").unwrap();
        token.reread();
        assert_eq!(token.held().expose(), "first", "written just now");
        std::fs::write(&path, "second\n").unwrap();
        token.reread();
        assert_eq!(token.held().expose(), "first", "still written just now");
        let settled = std::fs::File::options().write(true).open(&path).unwrap();
        settled.set_modified(SystemTime::now() - SETTLE).unwrap();
        token.reread();
        assert_eq!(token.held().expose(), "second");
        std::fs::write(&path, "third\n").unwrap();
        let ahead = std::fs::File::options().write(true).open(&path).unwrap();
        ahead
            .set_modified(SystemTime::now() + Duration::from_secs(3_600))
            .unwrap();
        token.reread();
        assert_eq!(
            token.held().expose(),
            "third",
            "modified ahead of the clock"
        );
    }
}
