//! Profiles: applying groups of updates (read the stored versions, decide each update, write
//! the new versions and their exports in one transaction), and reading one profile.
//!
//! A profile value: format byte 2 + bincode of a [`ProfileRecord`] (`profile::record`: the
//! update time in microseconds, every segment entry, the kept identities and attribute values
//! as JSON text), stored in the profile's group ([`groups`](super::groups)). Format 1 (the
//! pruned profile as JSON text) is still read, and upgraded when a store is opened (`open`).

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sled::Transactional;

use super::codec;
use super::error::{StoreError, TxResult};
use super::export::{append_exports, new_export};
use super::groups::{self, group_key, Change, GroupKey, GroupView, GROUP_KEY_LEN};
use super::keys::meta;
use super::tally::add_to_profile_count;
use super::{backfill, source, Store, Trees};
use crate::config::Mapping;
use crate::profile::apply::{StoredProfile, UpdateResult};
use crate::profile::engine::{apply_record, RecordAction};
use crate::profile::layout::Layout;
use crate::profile::record::ProfileRecord;
use crate::profile::{Reason, Update};
use crate::source::partition::{id_hash, partition_of_hash};

/// The refusal of the first of profiles `ids` whose partition is among the `moved` ones (the
/// partition count and the partitions, as [`source::moved_away`] reads them).
fn first_given_away<'a>(
    ids: impl IntoIterator<Item = &'a str> + Clone,
    moved: &(u32, BTreeSet<u32>),
) -> Option<StoreError> {
    let hashes = ids.clone().into_iter().map(id_hash);
    let (index, partition) = first_given_away_at(hashes, moved)?;
    let id = ids.into_iter().nth(index)?.to_owned();
    Some(StoreError::PartitionGivenAway { id, partition })
}

/// Where, among profile ids known by their [`id_hash`]es, the first whose partition is among
/// the `moved` ones lies, and that partition.
fn first_given_away_at(
    hashes: impl IntoIterator<Item = u64>,
    moved: &(u32, BTreeSet<u32>),
) -> Option<(usize, u32)> {
    let (count, partitions) = moved;
    hashes.into_iter().enumerate().find_map(|(index, hash)| {
        let partition = partition_of_hash(hash, *count);
        partitions
            .contains(&partition)
            .then_some((index, partition))
    })
}

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

/// The groups after `after` (`None`: from the first) up to `until` (`None`: the last), in key
/// order, until they hold at least `min_profiles` profiles or the range ends (then `true`):
/// how the backfill walks the store in steps. An unreadable group counts as one.
pub(super) fn groups_after(
    groups: &sled::Tree,
    after: Option<&[u8]>,
    until: Option<&[u8]>,
    min_profiles: usize,
) -> Result<(Vec<(sled::IVec, sled::IVec)>, bool), sled::Error> {
    let from = match after {
        Some(after) => Bound::Excluded(after),
        None => Bound::Unbounded,
    };
    let to = match until {
        Some(until) => Bound::Included(until),
        None => Bound::Unbounded,
    };
    if let (Some(after), Some(until)) = (after, until) {
        if after >= until {
            return Ok((Vec::new(), true));
        }
    }
    let mut found = Vec::new();
    let mut profiles = 0;
    for item in groups.range::<&[u8], _>((from, to)) {
        let (key, value) = item?;
        if key.len() != GROUP_KEY_LEN {
            // Damage (`outpost check --store` lists it), never a group outpost wrote.
            continue;
        }
        profiles += GroupView::decode(&value).map_or(1, |view| view.len());
        found.push((key, value));
        if profiles >= min_profiles {
            return Ok((found, false));
        }
    }
    Ok((found, true))
}

/// How many profiles the entry `key` → `value` of the tree named `tree` holds: those of a
/// readable group, one for a key of the old `profiles` tree that is a profile id, else none.
pub(super) fn profiles_in(tree: &[u8], key: &[u8], value: &[u8]) -> u64 {
    match tree {
        b"profile_groups" if key.len() == GROUP_KEY_LEN => {
            GroupView::decode(value).map_or(0, |view| view.len() as u64)
        }
        b"profiles" => u64::from(std::str::from_utf8(key).is_ok()),
        _ => 0,
    }
}

/// How many profiles the store holds, counted by walking every group (`meta/profiles` keeps
/// the count without walking). The profiles of an unreadable group are not counted.
pub(super) fn count_profiles(t: &Trees) -> Result<u64, StoreError> {
    let mut count = 0;
    for (name, tree) in [
        (&b"profiles"[..], &t.legacy_profiles),
        (b"profile_groups", &t.profile_groups),
    ] {
        for item in tree.iter() {
            let (key, value) = item?;
            count += profiles_in(name, &key, &value);
        }
    }
    Ok(count)
}

/// `meta/profiles`; `None` while it is unknown (missing or damaged: the next open counts).
pub(super) fn read_profile_count(t: &Trees) -> Result<Option<u64>, StoreError> {
    Ok(t.meta
        .get(meta::PROFILES)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes))
}

/// Whether `meta/profiles` is there but not a count (not 8 bytes).
pub(super) fn profile_count_damaged(t: &Trees) -> Result<bool, StoreError> {
    Ok(t.meta.get(meta::PROFILES)?.is_some_and(|v| v.len() != 8))
}

/// Counts the profiles by walking them and records the count in `meta/profiles`. Not flushed.
pub(super) fn recount_profiles(t: &Trees) -> Result<u64, StoreError> {
    let count = count_profiles(t)?;
    t.meta.insert(meta::PROFILES, &count.to_be_bytes())?;
    Ok(count)
}

/// Decodes a stored profile of either format, naming it in the error.
pub(super) fn decode_profile(id: &str, bytes: &[u8]) -> Result<ProfileRecord, StoreError> {
    codec::decode_profile(bytes).map_err(|e| StoreError::corrupt(format!("profile {id}"), e))
}

/// The error for a group that cannot be read: every profile in it is unreadable.
pub(super) fn unreadable_group(key: &[u8], error: impl std::fmt::Display) -> StoreError {
    StoreError::corrupt(format!("profile group {}", group_name(key)), error)
}

/// A group's key as people read it: hex, 8 digits (a key of another length is damage).
pub(super) fn group_name(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// A stored profile that cannot be read, or a group whose profiles cannot be.
pub(super) enum Unreadable {
    Group {
        key: sled::IVec,
        error: StoreError,
    },
    Profile {
        id: String,
        error: StoreError,
    },
    /// A key left in the old tree that is not a profile id (not UTF-8).
    NotAnId {
        key: sled::IVec,
    },
}

/// Every unreadable group and profile, in groups and where an unfinished upgrade left them.
pub(super) fn unreadable_profiles(t: &Trees) -> Result<Vec<Unreadable>, StoreError> {
    let mut found = Vec::new();
    for item in t.profile_groups.iter() {
        let (key, value) = item?;
        if key.len() != GROUP_KEY_LEN {
            found.push(Unreadable::Group {
                error: StoreError::corrupt(
                    format!("profile group key {}", group_name(&key)),
                    format!("{} bytes, not {GROUP_KEY_LEN}", key.len()),
                ),
                key,
            });
            continue;
        }
        match GroupView::decode(&value) {
            Err(e) => found.push(Unreadable::Group {
                error: unreadable_group(&key, e),
                key,
            }),
            Ok(view) => {
                for &(id, value) in view.entries() {
                    if let Err(error) = decode_profile(id, value) {
                        found.push(Unreadable::Profile {
                            id: id.to_owned(),
                            error,
                        });
                    }
                }
            }
        }
    }
    for item in t.legacy_profiles.iter() {
        let (key, value) = item?;
        let Ok(id) = std::str::from_utf8(&key) else {
            found.push(Unreadable::NotAnId { key });
            continue;
        };
        if let Err(error) = decode_profile(id, &value) {
            found.push(Unreadable::Profile {
                id: id.to_owned(),
                error,
            });
        }
    }
    Ok(found)
}

/// Removes profile `id` wherever it is stored (`outpost repair`). Not flushed.
pub(super) fn forget_profile(t: &Trees, id: &str) -> Result<(), StoreError> {
    let key = group_key(id);
    if let Some(stored) = t.profile_groups.get(key)? {
        let view = GroupView::decode(&stored).map_err(|e| unreadable_group(&key, e))?;
        if view.get(id).is_some() {
            match view.with_changes(&[(id, None)]) {
                Some(bytes) => t.profile_groups.insert(key, bytes)?,
                None => t.profile_groups.remove(key)?,
            };
        }
    }
    t.legacy_profiles.remove(id.as_bytes())?;
    Ok(())
}

/// Forgets the unreadable group `key`, and moves into its place the profiles the upgrade left
/// in the old tree because the group could not be read (`outpost repair`). Returns how many
/// moved. Not flushed.
pub(super) fn forget_group(t: &Trees, key: &[u8]) -> Result<usize, StoreError> {
    let mut left: Vec<(String, Vec<u8>)> = Vec::new();
    if t.has_legacy_profiles && key.len() == GROUP_KEY_LEN {
        for item in t.legacy_profiles.iter() {
            let (id, value) = item?;
            if let Ok(id) = std::str::from_utf8(&id) {
                if group_key(id) == key {
                    left.push((id.to_owned(), super::upgrade::typed(&value)));
                }
            }
        }
    }
    let entries: Vec<groups::Entry> = left.iter().map(|(id, v)| (id.as_str(), &v[..])).collect();
    (&t.profile_groups, &t.legacy_profiles).transaction(|(groups, legacy)| -> TxResult<()> {
        if entries.is_empty() {
            groups.remove(key)?;
        } else {
            groups.insert(key, groups::encode(&entries))?;
        }
        for (id, _) in &entries {
            legacy.remove(id.as_bytes())?;
        }
        Ok(())
    })?;
    Ok(entries.len())
}

/// The key [`group_name`] wrote.
pub(super) fn group_from_name(name: &str) -> Option<Vec<u8>> {
    if !name.len().is_multiple_of(2) || !name.is_ascii() {
        return None;
    }
    (0..name.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&name[at..at + 2], 16).ok())
        .collect()
}

/// The stored groups read so far by one caller: each is read from sled once.
type GroupReads = HashMap<GroupKey, Option<sled::IVec>>;

/// Reads profile `id`: from its group, or from `legacy_profiles` while an upgrade has not
/// finished moving it.
fn read_record(
    t: &Trees,
    reads: &mut GroupReads,
    id: &str,
) -> Result<Option<ProfileRecord>, StoreError> {
    let key = group_key(id);
    let stored = match reads.entry(key) {
        Entry::Occupied(entry) => entry.into_mut(),
        Entry::Vacant(entry) => entry.insert(t.profile_groups.get(key)?),
    };
    if let Some(bytes) = stored {
        let view = GroupView::decode(bytes).map_err(|e| {
            let detail = format!("its group {} is unreadable: {e}", group_name(&key));
            StoreError::corrupt(format!("profile {id}"), detail)
        })?;
        if let Some(value) = view.get(id) {
            return decode_profile(id, value).map(Some);
        }
    }
    if t.has_legacy_profiles {
        if let Some(bytes) = t.legacy_profiles.get(id.as_bytes())? {
            return decode_profile(id, &bytes).map(Some);
        }
    }
    Ok(None)
}

/// A group to store (`None`: to remove, no profile left in it).
type GroupWrite = (GroupKey, Option<Vec<u8>>);

/// The groups that `writes` change, encoded (`None`: the group is left empty, remove it), from
/// the stored groups `reads` holds (every written profile was read first).
fn changed_groups(
    reads: &GroupReads,
    writes: &mut [(GroupKey, &str, Option<Vec<u8>>)],
) -> Result<Vec<GroupWrite>, StoreError> {
    writes.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let mut changed = Vec::new();
    for same_group in writes.chunk_by(|a, b| a.0 == b.0) {
        let key = same_group[0].0;
        let stored = reads.get(&key).and_then(Option::as_ref);
        let view = match stored {
            Some(bytes) => GroupView::decode(bytes).map_err(|e| unreadable_group(&key, e))?,
            None => GroupView::default(),
        };
        let changes: Vec<Change> = same_group
            .iter()
            .map(|(_, id, value)| (*id, value.as_deref()))
            .collect();
        changed.push((key, view.with_changes(&changes)));
    }
    Ok(changed)
}

impl Store {
    /// Applies each group of updates in order, all in ONE transaction, and returns a summary per
    /// group. Nothing is durable until [`Store::flush`].
    ///
    /// The decisions are made before the transaction, reading the stored versions directly:
    /// that is sound because profiles have one writer at a time (the committer, `repair`, or
    /// the CLI holding the store alone; see `Store::profile_writer`), and it keeps the
    /// transaction, which sled may re-run, short.
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

    /// Refuses `updates` as [`Store::apply_each`] would when one updates a profile of a
    /// partition this store handed over, or is handing over. Checked before the first chunk
    /// of a request committed in chunks is stored, so that such a request stores nothing; a
    /// hand-over that begins between its chunks is caught by each chunk's own check.
    ///
    /// The profiles are known by their ids' [`id_hash`]es (a large request's are not kept
    /// whole); `id_of(i)` names the `i`th, for the refusal.
    pub fn refuse_given_away(
        &self,
        hashes: impl IntoIterator<Item = u64>,
        id_of: impl FnOnce(usize) -> String,
    ) -> Result<(), StoreError> {
        let trees = self.trees()?;
        let Some(moved) = self.with_trees(&trees, source::moved_away)? else {
            return Ok(());
        };
        match first_given_away_at(hashes, &moved) {
            Some((index, partition)) => Err(StoreError::PartitionGivenAway {
                id: id_of(index),
                partition,
            }),
            None => Ok(()),
        }
    }

    /// [`Store::apply_groups`], with a result per group: a group that touches an unreadable
    /// profile stores nothing and gets [`StoreError::UnreadableProfile`], and one not from the
    /// stream that updates a profile of a partition this store handed over (or is handing
    /// over) gets [`StoreError::PartitionGivenAway`]. `consumed` says, for
    /// groups from a stream, how far its partition was consumed (and the messages of it that
    /// were rejected): recorded in the same transaction, for the groups that are stored.
    pub fn apply_each(
        &self,
        groups: &[&[Update]],
        mapping: &Mapping,
        received_at: DateTime<Utc>,
        consumed: &[(usize, source::SourcePosition)],
    ) -> Result<Vec<Result<BatchSummary, StoreError>>, StoreError> {
        let _writer = self.lock_profile_writer();
        // One set of handles for the reads and the transaction: groups read from handles that
        // a reopen (`Store::recover`) has since replaced must not be written to the new ones,
        // which may hold other versions of their profiles. The old handles refuse the write.
        let trees = self.trees()?;
        let created_at_ms = received_at.timestamp_millis();
        let queued_at_uptime_ms = self.run_clock.uptime_ms();
        let layout = Layout::new(mapping);
        // The latest version of each profile touched, whether it must be written, and whether
        // it was stored before (for the count of profiles).
        let mut versions: HashMap<&str, (Option<Cow<ProfileRecord>>, bool, bool)> = HashMap::new();
        let mut reads = GroupReads::new();
        let mut exports: Vec<Vec<u8>> = Vec::new();
        let mut exported: Vec<&str> = Vec::new();
        let mut summaries = Vec::with_capacity(groups.len());
        // Under the profile writer, as a hand-over marks them: no update of a profile given
        // away is stored once the hand-over began.
        let from_stream = |index: usize| consumed.iter().any(|(group, _)| *group == index);
        let given_away = if (0..groups.len()).all(from_stream) {
            None
        } else {
            self.with_trees(&trees, source::moved_away)?
        };
        'groups: for (index, group) in groups.iter().enumerate() {
            if let Some(moved) = given_away.as_ref().filter(|_| !from_stream(index)) {
                let ids = group.iter().map(|update| update.id.as_str());
                if let Some(refusal) = first_given_away(ids, moved) {
                    summaries.push(Err(refusal));
                    continue 'groups;
                }
            }
            // Every profile of the group is read before any update of it is applied, so that a
            // refused group leaves nothing behind.
            for update in group.iter() {
                let id = update.id.as_str();
                if !versions.contains_key(id) {
                    match self.with_trees(&trees, |t| read_record(t, &mut reads, id)) {
                        Ok(version) => {
                            let stored = version.is_some();
                            versions.insert(id, (version.map(Cow::Owned), false, stored));
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
                let (version, dirty, _) = versions.get_mut(id).expect("inserted above");
                let applied =
                    apply_record(version.as_deref(), update, mapping, &layout, received_at);
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
                    exported.push(id);
                    summary.exports += 1;
                    summary.by_reason[reason.code() as usize] += 1;
                }
            }
            summaries.push(Ok(summary));
        }
        let added: i64 = versions
            .values()
            .filter(|(_, dirty, _)| *dirty)
            .map(|(version, _, stored)| i64::from(version.is_some()) - i64::from(*stored))
            .sum();
        let mut writes: Vec<(GroupKey, &str, Option<Vec<u8>>)> = versions
            .into_iter()
            .filter(|(_, (_, dirty, _))| *dirty)
            .map(|(id, (version, _, _))| {
                (
                    group_key(id),
                    id,
                    version.map(|v| codec::encode_profile(&v)),
                )
            })
            .collect();
        // In key order, so that sled touches each leaf once rather than hopping between them.
        let groups = changed_groups(&reads, &mut writes)?;

        // A refused group's stream position is not recorded: its messages come again.
        let consumed: Vec<source::SourcePosition> = consumed
            .iter()
            .filter(|(group, _)| summaries.get(*group).is_some_and(Result::is_ok))
            .map(|(_, position)| position.clone())
            .collect();
        let marks = self.with_trees(&trees, |t| backfill::marks_for(t, exported.into_iter()))?;
        let max_rejected = self.max_rejected.load(Ordering::SeqCst);
        let next_seq = self.with_trees(&trees, |t| {
            let trees = (
                &t.profile_groups,
                &t.legacy_profiles,
                &t.outbox,
                &t.meta,
                &t.positions,
                &t.rejected,
                &t.backfill_exported,
            );
            Ok(trees.transaction(
                |(profile_groups, legacy, outbox, meta_tx, positions, rejected, marks_tx)| {
                    source::write(positions, rejected, meta_tx, &consumed, max_rejected)?;
                    for (key, value) in &groups {
                        match value {
                            Some(bytes) => profile_groups.insert(key, bytes.as_slice())?,
                            None => profile_groups.remove(key)?,
                        };
                    }
                    // A profile read from where an unfinished upgrade left it now lives in
                    // its group only.
                    if t.has_legacy_profiles {
                        for (_, id, _) in &writes {
                            legacy.remove(id.as_bytes())?;
                        }
                    }
                    add_to_profile_count(meta_tx, added)?;
                    backfill::write_marks(marks_tx, meta_tx, &marks)?;
                    append_exports(outbox, meta_tx, &exports)
                },
            )?)
        })?;
        self.written_next.fetch_max(next_seq, Ordering::SeqCst);
        Ok(summaries)
    }

    /// The right to change profiles (see `Store::profile_writer`).
    pub(super) fn lock_profile_writer(&self) -> std::sync::MutexGuard<'_, ()> {
        self.profile_writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A stored profile as people read it (`outpost profile`).
    pub fn profile(&self, id: &str) -> Result<Option<StoredProfile>, StoreError> {
        Ok(self.profile_record(id)?.as_ref().map(stored_view))
    }

    /// How many profiles the store holds, as `meta/profiles` keeps it; counted by walking them
    /// in the rare case it is unknown (an open that could not count, a repair that failed).
    pub fn profile_count(&self) -> Result<u64, StoreError> {
        self.with(|t| match read_profile_count(t)? {
            Some(count) => Ok(count),
            None => count_profiles(t),
        })
    }

    pub fn profile_record(&self, id: &str) -> Result<Option<ProfileRecord>, StoreError> {
        self.with(|t| read_record(t, &mut GroupReads::new(), id))
    }
}
