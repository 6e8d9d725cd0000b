//! sled's blob files, synced to the drive at each flush.
//!
//! sled 0.34 writes a log message too large for its log buffer (over a quarter of a 512 KiB
//! segment: a large value, or a leaf page of large values when it is rewritten) to a file of
//! its own, `blobs/<lsn>`, and the log holds only a pointer to it. It never syncs that file,
//! and outpost's fsync of the log file does not reach it: after a power loss the log could
//! point at a blob that never reached the drive, and the page it held, acknowledged updates
//! with it, would be unreadable. So each flush syncs the blob files it has not synced yet,
//! and the folder that names them, before the log file.
//!
//! A flush may list a blob another thread is still writing (flushes are not exclusive with
//! writes): it is synced as far as written then, and again by a later flush that finds it
//! longer. sled writes a blob once, growing it to its full length before the write that made
//! it returns, so the flush its writer then makes finds it whole.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The blob files synced so far, with the length each had then.
pub(super) struct BlobSync {
    dir: PathBuf,
    synced: Mutex<HashMap<OsString, u64>>,
}

impl BlobSync {
    /// For the store whose sled folder is `db_dir`. Nothing is taken as synced yet: the first
    /// [`BlobSync::sync_new`] syncs every blob there, also those an earlier run wrote.
    pub(super) fn new(db_dir: &Path) -> BlobSync {
        BlobSync {
            dir: db_dir.join("blobs"),
            synced: Mutex::default(),
        }
    }

    /// Syncs the blob files not synced yet, or synced shorter than they are now, then, when
    /// there were any, the folder. How many it synced. A blob sled removed meanwhile (it frees
    /// those no page needs) is passed over.
    pub(super) fn sync_new(&self) -> io::Result<usize> {
        let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut present = HashMap::with_capacity(synced.len());
        let mut newly = 0;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let path = entry.path();
            let len = match entry.metadata() {
                Ok(meta) => meta.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let synced_len = match synced.get(&name) {
                Some(&synced_len) if synced_len == len => len,
                _ => match sync_file(&path) {
                    // What was written before the length was read is on the drive now.
                    Ok(()) => {
                        newly += 1;
                        len
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                },
            };
            present.insert(name, synced_len);
        }
        if newly > 0 {
            File::open(&self.dir)?.sync_all()?;
        }
        // Names sled removed are forgotten, so that the table does not grow without end.
        *synced = present;
        Ok(newly)
    }
}

fn sync_file(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn each_blob_is_synced_once_and_removed_ones_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobSync::new(dir.path());
        assert_eq!(blobs.sync_new().unwrap(), 0, "no blobs folder yet");
        std::fs::create_dir(dir.path().join("blobs")).unwrap();
        std::fs::write(dir.path().join("blobs/100"), b"a").unwrap();
        std::fs::write(dir.path().join("blobs/200"), b"b").unwrap();
        assert_eq!(blobs.sync_new().unwrap(), 2);
        assert_eq!(blobs.sync_new().unwrap(), 0, "already synced");
        std::fs::write(dir.path().join("blobs/300"), b"c").unwrap();
        std::fs::remove_file(dir.path().join("blobs/100")).unwrap();
        assert_eq!(blobs.sync_new().unwrap(), 1, "only the new one");
        let names: HashSet<OsString> = blobs.synced.lock().unwrap().keys().cloned().collect();
        let expected: HashSet<OsString> = ["200", "300"].map(OsString::from).into();
        assert_eq!(names, expected);
    }

    /// A blob listed while another thread still writes it is synced again once it is longer,
    /// so the flush its writer makes does not pass over the rest of it.
    #[test]
    fn a_blob_that_grew_since_it_was_synced_is_synced_again() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("blobs")).unwrap();
        let blobs = BlobSync::new(dir.path());
        let mut written = File::create(dir.path().join("blobs/400")).unwrap();
        written.write_all(b"crc!").unwrap();
        assert_eq!(blobs.sync_new().unwrap(), 1, "as far as written");
        assert_eq!(blobs.sync_new().unwrap(), 0, "unchanged");
        written.write_all(b"kind and the rest").unwrap();
        assert_eq!(blobs.sync_new().unwrap(), 1, "grown since");
        assert_eq!(blobs.sync_new().unwrap(), 0);
    }

    /// A profile and an export larger than sled's log buffer take it to write blobs, and the
    /// store's flush syncs every one of them.
    #[test]
    fn the_store_flush_syncs_the_blobs_sled_writes_for_large_values() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::Store::open(&dir.path().join("store"), 8 << 20).unwrap();
        let large = "x".repeat(300 << 10);
        super::super::testing::write_each(&store, &[("p", &large)]);
        store.flush().unwrap();
        let on_disk: HashSet<OsString> = std::fs::read_dir(dir.path().join("store/blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(!on_disk.is_empty(), "sled wrote no blob");
        let trees = store.trees().unwrap();
        let synced: HashSet<OsString> =
            trees.blobs.synced.lock().unwrap().keys().cloned().collect();
        assert!(
            on_disk.is_subset(&synced),
            "{on_disk:?} not all in {synced:?}"
        );
    }
}
