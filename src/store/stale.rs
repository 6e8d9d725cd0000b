//! Index entries that outlived their export, looked over beside the agent's work.
//!
//! `retry_at` and `superseded` are keyed by an export's sequence. The transactions that record
//! what delivery does, and those that drop exports, keep them with their exports. A retry
//! entry is left behind by a record found unreadable (it stays a dead letter, without the
//! retry entry's mark), and both kinds by older builds, whose drops kept them. Such an entry
//! changes nothing: a sequence is never given again, a retry time counts only for an export
//! still pending, and a mark only for a dead letter.
//!
//! Each look-over reads every entry of its index, which takes seconds with a million of them
//! (a store whose endpoint was down holds a retry entry for every pending export that failed,
//! and a mark for every dead letter a newer export overtook). So they run once the agent has
//! started, not when the store opens: a chunk at a time, so that a reopen of the store waits
//! for one chunk only, and each removal checked again in the transaction that makes it, so
//! that an entry that serves something again meanwhile is kept.

use std::ops::Bound;

use sled::Transactional;

use super::outbox::RetryEntry;
use super::{Store, StoreError, Trees};

/// How many entries are looked over at a time (and at most removed in one transaction).
const CHUNK: usize = 1024;

impl Store {
    /// Removes the retry entries of exports neither pending nor dead letters, and of dead
    /// letters without the mark that they may have been acknowledged. Returns how many.
    pub fn forget_stale_retry_entries(&self, stop: impl Fn() -> bool) -> Result<usize, StoreError> {
        self.forget_in_chunks(
            &stop,
            |t| &t.retry_at,
            |t, key, value| {
                Ok(!(t.outbox.contains_key(key)?
                    || (RetryEntry::is_marked(value) && t.dead.contains_key(key)?)))
            },
            |t, stale| {
                Ok(
                    (&t.outbox, &t.dead, &t.retry_at).transaction(|(outbox, dead, retry_at)| {
                        let mut removed = 0;
                        for key in stale {
                            let Some(value) = retry_at.get(key)? else {
                                continue;
                            };
                            let serves = outbox.get(key)?.is_some()
                                || (RetryEntry::is_marked(&value) && dead.get(key)?.is_some());
                            if !serves {
                                retry_at.remove(key)?;
                                removed += 1;
                            }
                        }
                        Ok(removed)
                    })?,
                )
            },
        )
    }

    /// Removes the `superseded` marks of exports no longer dead letters. Returns how many.
    pub fn forget_stale_marks(&self, stop: impl Fn() -> bool) -> Result<usize, StoreError> {
        self.forget_in_chunks(
            &stop,
            |t| &t.superseded,
            |t, key, _| Ok(!t.dead.contains_key(key)?),
            |t, stale| {
                Ok((&t.dead, &t.superseded).transaction(|(dead, superseded)| {
                    let mut removed = 0;
                    for key in stale {
                        if dead.get(key)?.is_none() && superseded.remove(key)?.is_some() {
                            removed += 1;
                        }
                    }
                    Ok(removed)
                })?)
            },
        )
    }

    /// Reads `index` a chunk at a time; `remove` gets the keys `stale` picked in a chunk and
    /// removes, in one transaction, those still stale there.
    fn forget_in_chunks(
        &self,
        stop: &dyn Fn() -> bool,
        index: fn(&Trees) -> &sled::Tree,
        stale: impl Fn(&Trees, &[u8], &[u8]) -> sled::Result<bool>,
        remove: impl Fn(&Trees, &[sled::IVec]) -> Result<usize, StoreError>,
    ) -> Result<usize, StoreError> {
        let mut after: Option<sled::IVec> = None;
        let mut removed = 0;
        while !stop() {
            let (picked, last) = self.with(|t| {
                let from = match after.clone() {
                    Some(key) => Bound::Excluded(key),
                    None => Bound::Unbounded,
                };
                let (mut picked, mut last) = (Vec::new(), None);
                for item in index(t).range((from, Bound::Unbounded)).take(CHUNK) {
                    let (key, value) = item?;
                    if stale(t, &key, &value)? {
                        picked.push(key.clone());
                    }
                    last = Some(key);
                }
                Ok((picked, last))
            })?;
            let Some(last) = last else { break };
            after = Some(last);
            if picked.is_empty() {
                continue;
            }
            let _section = self.write_section()?;
            removed += self.with(|t| remove(t, &picked))?;
        }
        Ok(removed)
    }
}
