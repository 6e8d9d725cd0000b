//! A value read from a file of its own, read again when it may have been rotated there: a
//! secret (the destination's token, client secret or password, the ingest token) or the
//! custom headers of `destination.custom_headers_file`. A file that cannot be read then, or
//! holds what cannot be used (empty, or gone for a moment while it is rotated), leaves what
//! was read before in use, with a warning; one changed less than a second ago, maybe still
//! being written, is taken up at the next read after that.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

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

/// What a failure to read the file at `path` says; `again`, after the start: one this process
/// may no longer read then says why that may be and what to do (an agent started as root
/// reads its files then, and acts as the store's owner from then on).
pub fn cannot_read(path: &Path, error: &std::io::Error, again: bool) -> String {
    let hint = match (again, error.kind()) {
        (true, std::io::ErrorKind::PermissionDenied) => {
            " (read at start, perhaps with root's rights, which outpost gave up for the store owner's: let that user read it, or restart outpost to take up a change)"
        }
        _ => "",
    };
    format!("cannot read {}: {error}{hint}", path.display())
}

/// Puts a FIFO in the place of the file at `path`: reading it waits for a writer, as reading
/// a file on a network mount that stopped answering does.
#[cfg(test)]
pub fn fifo_in_place_of(path: &Path) {
    let fifo = path.with_extension("fifo");
    let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
    std::fs::rename(&fifo, path).unwrap();
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

/// How often files that are followed ([`look_every_second`]) are looked at.
pub const LOOK_EVERY: Duration = Duration::from_secs(1);

/// Has `look` called on `followed` every [`LOOK_EVERY`], on a thread of its own, for as long
/// as anything else holds it: files on a mount that hangs then hold that thread, never a
/// handshake, a request or the runtime's threads.
pub fn look_every_second<T: Send + Sync + 'static>(followed: &Arc<T>, look: fn(&T)) {
    let weak = Arc::downgrade(followed);
    let spawned = std::thread::Builder::new()
        .name("outpost-files".into())
        .stack_size(256 * 1024)
        .spawn(move || loop {
            std::thread::sleep(LOOK_EVERY);
            let Some(followed) = weak.upgrade() else {
                return;
            };
            // A look that panics (a bug) must not end the looking: the panic is logged by
            // the hook, and the next look comes a second later.
            let looked = std::panic::catch_unwind(AssertUnwindSafe(|| look(&followed)));
            if looked.is_err() {
                tracing::error!("looking at files again panicked; looking again in a second");
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "no thread to read files again: what was read at start is used");
    }
}

/// How long a task waits for a file read on a thread of its own before it goes on with what
/// is held.
const READ_WAIT: Duration = Duration::from_secs(2);

/// A value held, and the file it was read from, if any: [`Rereadable::reread`] holds what
/// the file holds now.
pub struct Rereadable<F: FileRead> {
    inner: Arc<Inner<F>>,
}

struct Inner<F: FileRead> {
    held: RwLock<Arc<F::Value>>,
    file: Option<F>,
    /// The last failure to read the file that was warned of: one that keeps failing the same
    /// way is warned of once, not at each read.
    warned: Mutex<Option<String>>,
    /// The read of the file on a thread of its own, for
    /// [`Rereadable::reread_off_the_runtime`], while one runs: one at a time, so that a file
    /// that hangs holds one thread, not one a call.
    read_running: Mutex<Option<Arc<ReadRunning>>>,
}

/// One read of the file on a thread of its own.
#[derive(Default)]
struct ReadRunning {
    ended: AtomicBool,
    ended_told: Notify,
    /// Whether a caller stopped waiting for it: later ones then do not wait.
    waited_out: AtomicBool,
}

impl<F: FileRead + 'static> Rereadable<F> {
    pub fn new(held: F::Value, file: Option<F>) -> Rereadable<F> {
        Rereadable {
            inner: Arc::new(Inner {
                held: RwLock::new(Arc::new(held)),
                file,
                warned: Mutex::new(None),
                read_running: Mutex::new(None),
            }),
        }
    }

    /// What is held now: the same `Arc` until a read finds the file changed.
    pub fn held(&self) -> Arc<F::Value> {
        self.inner.held()
    }

    /// Whether it was read from a file, and so may change.
    pub fn read_from_a_file(&self) -> bool {
        self.inner.file.is_some()
    }

    /// Reads its file again, when it came from one, on this thread, and holds what the file
    /// holds now.
    pub fn reread(&self) {
        self.inner.reread();
    }

    /// [`Rereadable::reread`] on a thread of its own, waited for [`READ_WAIT`] at most: a
    /// file on a mount that hangs leaves what is held in use and holds that thread alone. A
    /// call while another's read runs waits for that one, unless a caller already stopped
    /// waiting for it.
    pub async fn reread_off_the_runtime(&self) {
        if self.inner.file.is_none() {
            return;
        }
        let (read, start) = {
            let mut running = self
                .inner
                .read_running
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match &*running {
                Some(read) if read.waited_out.load(Ordering::SeqCst) => return,
                Some(read) => (Arc::clone(read), false),
                None => {
                    let read = Arc::new(ReadRunning::default());
                    *running = Some(Arc::clone(&read));
                    (read, true)
                }
            }
        };
        if start {
            let reading = Reading {
                inner: Arc::clone(&self.inner),
                read: Arc::clone(&read),
            };
            let spawned = std::thread::Builder::new()
                .name("outpost-reread".into())
                .spawn(move || reading.inner.reread());
            if spawned.is_err() {
                // The `Reading` was dropped with the closure, which ended the read.
                self.inner.reread();
                return;
            }
        }
        let ended = read.ended_told.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        if read.ended.load(Ordering::SeqCst) {
            return;
        }
        if tokio::time::timeout(READ_WAIT, ended).await.is_err() {
            read.waited_out.store(true, Ordering::SeqCst);
        }
    }
}

/// A read for [`Rereadable::reread_off_the_runtime`], which ends when this is dropped, also
/// by a panic.
struct Reading<F: FileRead> {
    inner: Arc<Inner<F>>,
    read: Arc<ReadRunning>,
}

impl<F: FileRead> Drop for Reading<F> {
    fn drop(&mut self) {
        let mut running = self
            .inner
            .read_running
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if running
            .as_ref()
            .is_some_and(|read| Arc::ptr_eq(read, &self.read))
        {
            *running = None;
        }
        drop(running);
        self.read.ended.store(true, Ordering::SeqCst);
        self.read.ended_told.notify_waiters();
    }
}

impl<F: FileRead> Inner<F> {
    fn held(&self) -> Arc<F::Value> {
        Arc::clone(&self.held.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn reread(&self) {
        let Some(file) = &self.file else {
            return;
        };
        let key = file.key();
        match file.read() {
            Ok(value) => {
                *self.warned.lock().unwrap_or_else(|e| e.into_inner()) = None;
                if *self.held() == value {
                    return;
                }
                if written_just_now(file.path()) {
                    tracing::debug!(
                        "{key} changed less than a second ago: taken up once left alone"
                    );
                    return;
                }
                tracing::info!(
                    "{key} holds another value than the one read before: the new one is used"
                );
                *self.held.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
            }
            Err(error) => {
                let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
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

    /// A file that hangs when read (a FIFO here, as one on a network mount that stopped
    /// answering) leaves what is held in use after [`READ_WAIT`], and holds one thread, not
    /// one a call, nor each call's time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_that_hangs_leaves_what_is_held_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        write_settled(&path, "first\n");
        let file = super::super::SecretFile::new(path.clone(), "destination.auth.token_file", true);
        let token = Rereadable::new(file.read().unwrap(), Some(file));
        fifo_in_place_of(&path);
        let running = || token.inner.read_running.lock().unwrap().is_some();
        let started = std::time::Instant::now();
        tokio::time::timeout(2 * READ_WAIT, token.reread_off_the_runtime())
            .await
            .expect("waited past READ_WAIT");
        assert!(started.elapsed() >= READ_WAIT);
        assert_eq!(token.held().expose(), "first");
        assert!(running(), "the read hangs on");
        // Waited out once: a later call does not wait for it again, nor start another.
        let started = std::time::Instant::now();
        token.reread_off_the_runtime().await;
        assert!(started.elapsed() < READ_WAIT / 2, "{:?}", started.elapsed());
        assert_eq!(token.held().expose(), "first");
        std::fs::write(&path, "first\n").unwrap();
        let deadline = std::time::Instant::now() + 2 * READ_WAIT;
        while running() {
            assert!(std::time::Instant::now() < deadline, "the read never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(token.held().expose(), "first");
    }

    /// A read that panics ends as any other: the next is not kept waiting for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_that_panics_ends_its_read() {
        struct PanicsFirst {
            path: std::path::PathBuf,
            panicked: AtomicBool,
        }
        impl FileRead for PanicsFirst {
            type Value = String;
            fn key(&self) -> &'static str {
                "a key"
            }
            fn path(&self) -> &Path {
                &self.path
            }
            fn read(&self) -> Result<String, String> {
                if !self.panicked.swap(true, Ordering::SeqCst) {
                    panic!("the first read panics");
                }
                Ok(std::fs::read_to_string(&self.path).unwrap())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("value");
        write_settled(&path, "second");
        let file = PanicsFirst {
            path,
            panicked: AtomicBool::new(false),
        };
        let value = Rereadable::new("first".to_owned(), Some(file));
        for expected in ["first", "second"] {
            let started = std::time::Instant::now();
            value.reread_off_the_runtime().await;
            assert!(
                started.elapsed() < READ_WAIT,
                "waited for a read that had ended"
            );
            assert_eq!(*value.held(), expected);
        }
    }

    /// A look that panics is followed by the next a second later, and none once the value
    /// looked at is dropped.
    #[test]
    fn looking_goes_on_after_a_panic_and_ends_with_the_value() {
        use std::sync::atomic::AtomicUsize;
        static LOOKS: AtomicUsize = AtomicUsize::new(0);
        fn look(_: &()) {
            if LOOKS.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("the first look panics");
            }
        }
        let followed = Arc::new(());
        look_every_second(&followed, look);
        let deadline = std::time::Instant::now() + 10 * LOOK_EVERY;
        while LOOKS.load(Ordering::SeqCst) < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "no look after the panic"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(followed);
        std::thread::sleep(LOOK_EVERY * 3 / 2);
        let looks = LOOKS.load(Ordering::SeqCst);
        std::thread::sleep(LOOK_EVERY * 3 / 2);
        assert_eq!(
            LOOKS.load(Ordering::SeqCst),
            looks,
            "looked at after it was dropped"
        );
    }

    #[test]
    fn a_file_no_longer_readable_says_why_that_may_be() {
        let path = Path::new("/etc/ssl/private/ingest.key");
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let said = cannot_read(path, &denied, true);
        assert!(
            said.starts_with("cannot read /etc/ssl/private/ingest.key: ")
                && said.contains("root's rights")
                && said.contains("let that user read it"),
            "{said}"
        );
        assert!(
            !cannot_read(path, &denied, false).contains("root"),
            "at start"
        );
        let gone = std::io::Error::from(std::io::ErrorKind::NotFound);
        let said = cannot_read(path, &gone, true);
        assert!(!said.contains("root"), "{said}");
        // A secret's file says it so: the warning puts its key before it.
        let dir = tempfile::tempdir().unwrap();
        let file =
            super::super::SecretFile::new(dir.path().join("gone"), "ingest.token_file", true);
        let said = file.read().unwrap_err();
        assert!(said.starts_with("cannot read "), "{said}");
    }
}
