//! Delivery paused by `outpost delivery pause`: ingest goes on, nothing is sent until
//! `outpost delivery resume`.
//!
//! `meta/delivery_paused` holds the wall-clock time of the pause (ms since the epoch, i64 BE)
//! and is there only while delivery is paused, so a store an older build made, which has no
//! such key, delivers. The store keeps the state in memory too ([`Store::delivery_paused`]),
//! read at open and at every reopen, and set once a pause or a resume is durable: the
//! delivery loop asks it at every turn without reading sled.

use std::sync::atomic::Ordering;

use super::keys::meta;
use super::{Store, StoreError, Trees};

/// [`Store::paused_since_ms`] while delivery is not paused.
pub(super) const NOT_PAUSED: i64 = i64::MIN;

/// What a pause did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pausing {
    /// Paused now, at this wall-clock time (ms since the epoch).
    Paused { since_ms: i64 },
    /// It was paused already, since then; nothing was changed.
    AlreadyPaused { since_ms: i64 },
}

/// What a resume did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resuming {
    /// Resumed; it had been paused since then.
    Resumed { paused_since_ms: i64 },
    /// It was not paused; nothing was changed.
    NotPaused,
}

/// When the store in `t` was paused, if it is. A value that is not 8 bytes reads as a pause
/// since 0: the operator asked for a pause, and the time alone is lost.
pub(super) fn read_paused_since(t: &Trees) -> Result<i64, StoreError> {
    Ok(match t.meta.get(meta::DELIVERY_PAUSED)? {
        None => NOT_PAUSED,
        Some(v) => v
            .as_ref()
            .try_into()
            .map(i64::from_be_bytes)
            .unwrap_or(0)
            .max(NOT_PAUSED + 1),
    })
}

impl Store {
    /// Whether delivery is paused: no request starts, no probe is sent.
    pub fn delivery_paused(&self) -> bool {
        self.paused_since_ms.load(Ordering::SeqCst) != NOT_PAUSED
    }

    /// When delivery was paused (wall clock, ms since the epoch), while it is.
    pub fn delivery_paused_since_ms(&self) -> Option<i64> {
        Some(self.paused_since_ms.load(Ordering::SeqCst)).filter(|&ms| ms != NOT_PAUSED)
    }

    /// Pauses delivery, durably, from `now_ms` (wall clock); a store paused already stays
    /// paused since its first pause.
    pub fn pause_delivery(&self, now_ms: i64) -> Result<Pausing, StoreError> {
        let _one_at_a_time = self.pausing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(since_ms) = self.delivery_paused_since_ms() {
            return Ok(Pausing::AlreadyPaused { since_ms });
        }
        let since_ms = now_ms.max(NOT_PAUSED + 1);
        self.write_and_flush(|t| {
            t.meta
                .insert(meta::DELIVERY_PAUSED, &since_ms.to_be_bytes())?;
            Ok(())
        })?;
        self.paused_since_ms.store(since_ms, Ordering::SeqCst);
        Ok(Pausing::Paused { since_ms })
    }

    /// Resumes delivery, durably.
    pub fn resume_delivery(&self) -> Result<Resuming, StoreError> {
        let _one_at_a_time = self.pausing.lock().unwrap_or_else(|e| e.into_inner());
        let Some(paused_since_ms) = self.delivery_paused_since_ms() else {
            return Ok(Resuming::NotPaused);
        };
        self.write_and_flush(|t| {
            t.meta.remove(meta::DELIVERY_PAUSED)?;
            Ok(())
        })?;
        self.paused_since_ms.store(NOT_PAUSED, Ordering::SeqCst);
        Ok(Resuming::Resumed { paused_since_ms })
    }

    /// Reads the pause again from the store's handles, after a reopen: a pause or resume
    /// whose flush failed may or may not be in the reopened store, and what it holds counts.
    pub(super) fn read_pause_again(&self) -> Result<(), StoreError> {
        let since_ms = self.with(read_paused_since)?;
        self.paused_since_ms.store(since_ms, Ordering::SeqCst);
        Ok(())
    }

    /// `write`, then a flush, inside a write section (a compaction waits for it).
    fn write_and_flush(
        &self,
        write: impl FnOnce(&Trees) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let _section = self.write_section()?;
        self.with(write)?;
        self.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CACHE: u64 = 8 << 20;

    fn stored_value(store: &Store) -> Option<Vec<u8>> {
        store
            .with(|t| Ok(t.meta.get(meta::DELIVERY_PAUSED)?))
            .unwrap()
            .map(|v| v.to_vec())
    }

    #[test]
    fn a_pause_and_a_resume_are_kept_across_reopening_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CACHE).unwrap();
        assert!(!store.delivery_paused(), "a new store delivers");
        assert_eq!(store.resume_delivery().unwrap(), Resuming::NotPaused);

        let since_ms = 1_767_225_600_123;
        assert_eq!(
            store.pause_delivery(since_ms).unwrap(),
            Pausing::Paused { since_ms }
        );
        assert!(store.delivery_paused());
        assert_eq!(stored_value(&store), Some(since_ms.to_be_bytes().to_vec()));
        assert_eq!(
            store.pause_delivery(since_ms + 5_000).unwrap(),
            Pausing::AlreadyPaused { since_ms },
            "paused since the first pause"
        );
        drop(store);

        let store = Store::open(dir.path(), CACHE).unwrap();
        assert_eq!(store.delivery_paused_since_ms(), Some(since_ms));
        assert_eq!(
            store.resume_delivery().unwrap(),
            Resuming::Resumed {
                paused_since_ms: since_ms
            }
        );
        assert!(!store.delivery_paused());
        assert_eq!(
            stored_value(&store),
            None,
            "the key is there only while paused"
        );
        drop(store);

        let store = Store::open(dir.path(), CACHE).unwrap();
        assert!(!store.delivery_paused());
    }

    /// A reopen after an I/O error, and a compaction, keep the pause: the key is copied with
    /// the rest of `meta`, and read again from the reopened store.
    #[test]
    fn a_pause_outlives_a_reopen_and_a_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CACHE).unwrap();
        store.pause_delivery(42).unwrap();

        super::super::testing::fail_as_after_eio(&store);
        assert!(store.recover().unwrap());
        assert_eq!(store.delivery_paused_since_ms(), Some(42));

        store.compact_in_place().unwrap();
        assert_eq!(store.delivery_paused_since_ms(), Some(42));
        assert_eq!(stored_value(&store), Some(42i64.to_be_bytes().to_vec()));
        drop(store);
        let store = Store::open(dir.path(), CACHE).unwrap();
        assert_eq!(store.delivery_paused_since_ms(), Some(42));
    }

    /// What the reopened store holds counts: a resume written behind the state's back (as one
    /// whose flush failed but reached the disk) shows after the reopen.
    #[test]
    fn a_reopen_reads_the_pause_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CACHE).unwrap();
        store.pause_delivery(7).unwrap();
        store
            .with(|t| Ok(t.meta.remove(meta::DELIVERY_PAUSED).map(drop)?))
            .unwrap();
        store.flush().unwrap();
        assert!(store.delivery_paused(), "not read again until reopened");
        super::super::testing::fail_as_after_eio(&store);
        assert!(store.recover().unwrap());
        assert!(!store.delivery_paused());
    }

    #[test]
    fn a_damaged_pause_reads_as_paused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CACHE).unwrap();
        store
            .with(|t| {
                Ok(t.meta
                    .insert(meta::DELIVERY_PAUSED, &b"bad"[..])
                    .map(drop)?)
            })
            .unwrap();
        store.flush().unwrap();
        drop(store);
        let store = Store::open(dir.path(), CACHE).unwrap();
        assert_eq!(store.delivery_paused_since_ms(), Some(0));
        assert!(matches!(
            store.resume_delivery().unwrap(),
            Resuming::Resumed { .. }
        ));
    }
}
