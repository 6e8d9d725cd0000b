//! A value read from a file of its own, read again when it may have been rotated there: a
//! secret (the destination's token, client secret or password, the ingest token) or the
//! custom headers of `destination.custom_headers_file`. A file that cannot be read then, or
//! holds what cannot be used (empty, or gone for a moment while it is rotated), leaves what
//! was read before in use, with a warning.

use std::sync::{Arc, Mutex, RwLock};

/// A file [`Rereadable`] reads.
pub trait FileRead: Send + Sync {
    type Value: PartialEq + Send + Sync;
    /// The key that names the file in messages.
    fn key(&self) -> &'static str;
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
                if **held != value {
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
