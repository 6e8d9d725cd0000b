//! Profiles: applying groups of updates (read the stored versions, decide each update, write
//! the new versions and their exports in one transaction), and reading one profile.
//!
//! `profiles`: key = the profile id (UTF-8); value = format byte 2 + bincode of a
//! [`ProfileRecord`] (`profile::record`: the update time in microseconds, every segment entry,
//! the kept identities and attribute values as JSON text). Format 1 (the pruned profile as
//! JSON text) is still read, and upgraded when a store is opened (`open`).

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sled::Transactional;

use super::codec;
use super::error::StoreError;
use super::export::{append_exports, new_export};
use super::{source, Store};
use crate::config::Mapping;
use crate::profile::apply::{StoredProfile, UpdateResult};
use crate::profile::engine::{apply_record, RecordAction};
use crate::profile::layout::Layout;
use crate::profile::record::ProfileRecord;
use crate::profile::{Reason, Update};

/// What one request's updates did, as `POST /v1/updates` and `outpost ingest` report it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BatchSummary {
    pub accepted: u64,
    pub exports: u64,
    pub unchanged: u64,
    pub stale: u64,
    pub deleted: u64,
    /// Exports by [`Reason`] code.
    #[serde(skip)]
    pub by_reason: [u64; 4],
}

impl BatchSummary {
    pub fn add(&mut self, other: &BatchSummary) {
        self.accepted += other.accepted;
        self.exports += other.exports;
        self.unchanged += other.unchanged;
        self.stale += other.stale;
        self.deleted += other.deleted;
        for (mine, theirs) in self.by_reason.iter_mut().zip(other.by_reason) {
            *mine += theirs;
        }
    }

    pub fn exports_for(&self, reason: Reason) -> u64 {
        self.by_reason[reason.code() as usize]
    }

    /// The summary with `exports_by_reason`, as `outpost ingest --json` prints it.
    pub fn report(&self) -> Value {
        let mut value = serde_json::to_value(self).expect("summary serializes");
        value["exports_by_reason"] = Reason::ALL
            .iter()
            .map(|r| (r.as_str().to_owned(), Value::from(self.exports_for(*r))))
            .collect();
        value
    }

    /// Reads back what [`BatchSummary::report`] wrote.
    pub fn from_report(value: &Value) -> Option<BatchSummary> {
        let field = |name: &str| value.get(name)?.as_u64();
        let mut summary = BatchSummary {
            accepted: field("accepted")?,
            exports: field("exports")?,
            unchanged: field("unchanged")?,
            stale: field("stale")?,
            deleted: field("deleted")?,
            by_reason: [0; 4],
        };
        for reason in Reason::ALL {
            summary.by_reason[reason.code() as usize] = value
                .get("exports_by_reason")?
                .get(reason.as_str())?
                .as_u64()?;
        }
        Some(summary)
    }
}

/// The record as people read a profile: its time and the kept parts as JSON.
pub fn stored_view(record: &ProfileRecord) -> StoredProfile {
    StoredProfile {
        timestamp: record.timestamp(),
        profile: record.to_value(),
    }
}

/// Up to `limit` stored profiles (id, value) after the id `after` (`None`: from the first),
/// in id order: how the backfill and the upgrade walk the store in steps.
pub(super) fn profiles_after(
    profiles: &sled::Tree,
    after: Option<&[u8]>,
    limit: usize,
) -> Result<Vec<(sled::IVec, sled::IVec)>, sled::Error> {
    let from = match after {
        Some(after) => Bound::Excluded(after),
        None => Bound::Unbounded,
    };
    profiles
        .range::<&[u8], _>((from, Bound::Unbounded))
        .take(limit)
        .collect()
}

/// Decodes a stored profile of either format, naming it in the error.
pub(super) fn decode_profile(id: &str, bytes: &[u8]) -> Result<ProfileRecord, StoreError> {
    codec::decode_profile(bytes).map_err(|e| StoreError::corrupt(format!("profile {id}"), e))
}

impl Store {
    /// Applies each group of updates in order, all in ONE transaction, and returns a summary per
    /// group. Nothing is durable until [`Store::flush`].
    ///
    /// The decisions are made before the transaction, reading the stored versions directly:
    /// that is sound because there is one writer of `profiles` (the committer, or the CLI
    /// holding the store alone), and it keeps the transaction, which sled may re-run, short.
    ///
    /// A group that updates a profile whose stored version cannot be read is refused whole
    /// ([`StoreError::UnreadableProfile`]) and the others go on: see [`Store::apply_each`].
    /// This returns the first such refusal.
    pub fn apply_groups(
        &self,
        groups: &[&[Update]],
        mapping: &Mapping,
        received_at: DateTime<Utc>,
    ) -> Result<Vec<BatchSummary>, StoreError> {
        self.apply_each(groups, mapping, received_at, &[])?
            .into_iter()
            .collect()
    }

    /// [`Store::apply_groups`], with a result per group: a group that touches an unreadable
    /// profile stores nothing and gets [`StoreError::UnreadableProfile`]. `consumed` says, for
    /// groups from a stream, how far its partition was consumed (and the messages of it that
    /// were rejected): recorded in the same transaction, for the groups that are stored.
    pub fn apply_each(
        &self,
        groups: &[&[Update]],
        mapping: &Mapping,
        received_at: DateTime<Utc>,
        consumed: &[(usize, source::SourcePosition)],
    ) -> Result<Vec<Result<BatchSummary, StoreError>>, StoreError> {
        let created_at_ms = received_at.timestamp_millis();
        let queued_at_uptime_ms = self.run_clock.uptime_ms();
        let layout = Layout::new(mapping);
        // The latest version of each profile touched, and whether it must be written.
        let mut versions: HashMap<&str, (Option<ProfileRecord>, bool)> = HashMap::new();
        let mut exports: Vec<Vec<u8>> = Vec::new();
        let mut summaries = Vec::with_capacity(groups.len());
        'groups: for group in groups {
            // Every profile of the group is read before any update of it is applied, so that a
            // refused group leaves nothing behind.
            for update in group.iter() {
                let id = update.id.as_str();
                if !versions.contains_key(id) {
                    match self.profile_record(id) {
                        Ok(version) => {
                            versions.insert(id, (version, false));
                        }
                        Err(StoreError::Corrupt { detail, .. }) => {
                            tracing::warn!(
                                profile = id,
                                "{detail}: an update of an unreadable profile is refused"
                            );
                            summaries.push(Err(StoreError::UnreadableProfile {
                                id: id.to_owned(),
                                detail,
                            }));
                            continue 'groups;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            let mut summary = BatchSummary::default();
            for update in group.iter() {
                let id = update.id.as_str();
                let (version, dirty) = versions.get_mut(id).expect("inserted above");
                let applied = apply_record(version.as_ref(), update, mapping, &layout, received_at);
                summary.accepted += 1;
                match applied.result {
                    UpdateResult::Exported => {}
                    UpdateResult::Unchanged => summary.unchanged += 1,
                    UpdateResult::Stale => summary.stale += 1,
                    UpdateResult::Deleted => summary.deleted += 1,
                }
                match applied.store {
                    RecordAction::Keep => {}
                    RecordAction::Put(new) => (*version, *dirty) = (Some(new), true),
                    RecordAction::Remove => (*version, *dirty) = (None, true),
                }
                if let Some((reason, payload)) = applied.export {
                    exports.push(new_export(
                        &update.id,
                        reason,
                        payload,
                        created_at_ms,
                        queued_at_uptime_ms,
                    ));
                    summary.exports += 1;
                    summary.by_reason[reason.code() as usize] += 1;
                }
            }
            summaries.push(Ok(summary));
        }
        let mut writes: Vec<(&str, Option<Vec<u8>>)> = versions
            .into_iter()
            .filter(|(_, (_, dirty))| *dirty)
            .map(|(id, (version, _))| (id, version.map(|v| codec::encode_profile(&v))))
            .collect();
        // In key order, sled touches each leaf once rather than hopping between them.
        writes.sort_unstable_by(|a, b| a.0.cmp(b.0));

        // A refused group's stream position is not recorded: its messages come again.
        let consumed: Vec<source::SourcePosition> = consumed
            .iter()
            .filter(|(group, _)| summaries.get(*group).is_some_and(Result::is_ok))
            .map(|(_, position)| position.clone())
            .collect();
        let next_seq = self.with(|t| {
            let trees = (&t.profiles, &t.outbox, &t.meta, &t.positions, &t.rejected);
            Ok(
                trees.transaction(|(profiles, outbox, meta_tx, positions, rejected)| {
                    source::write(positions, rejected, &consumed)?;
                    for (id, value) in &writes {
                        match value {
                            Some(bytes) => profiles.insert(id.as_bytes(), bytes.as_slice())?,
                            None => profiles.remove(id.as_bytes())?,
                        };
                    }
                    append_exports(outbox, meta_tx, &exports)
                })?,
            )
        })?;
        self.written_next.fetch_max(next_seq, Ordering::SeqCst);
        Ok(summaries)
    }

    /// A stored profile as people read it (`outpost profile`).
    pub fn profile(&self, id: &str) -> Result<Option<StoredProfile>, StoreError> {
        Ok(self.profile_record(id)?.as_ref().map(stored_view))
    }

    pub fn profile_record(&self, id: &str) -> Result<Option<ProfileRecord>, StoreError> {
        self.with(|t| match t.profiles.get(id.as_bytes())? {
            None => Ok(None),
            Some(bytes) => decode_profile(id, &bytes).map(Some),
        })
    }
}
