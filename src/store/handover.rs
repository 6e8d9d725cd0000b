//! Moving stream partitions between stores. `outpost nats hand-over` writes the stored
//! profiles of some partitions, and how far each was consumed, to a file
//! ([`super::handover_file`]) and forgets them; `outpost nats take-over` stores them in
//! another store, whose agent then consumes the partitions from where the first left off,
//! deciding against the versions the first stored.
//!
//! Invariants:
//! - everything below runs under the profile writer: no update changes a profile meanwhile;
//! - a partition is handed over only while no export of its profiles waits in the outbox or
//!   the dead letters, so every export the taking store makes of them comes after every one
//!   the giving store made: the endpoint hears each profile's versions in order;
//! - the giving store marks the partitions "handing over" ([`Moved::Giving`]) before it
//!   writes the file, and "handed over" ([`Moved::Given`]) once the file is whole and
//!   synced in its place; only then does it forget anything. Either mark keeps every consumer
//!   off the partition. A kill while the file is written leaves the first mark and every
//!   profile: the same hand-over again keeps a whole file the kill left at its place
//!   (placing it is atomic) or writes it anew. A kill while the profiles are forgotten leaves the
//!   second mark and the rest of them, which the same hand-over again forgets;
//! - the taking store marks the partitions "taking over" ([`Moved::Taking`]) before it
//!   stores the first profile, and sets their positions in the transaction that ends the
//!   take-over. A kill in between leaves the mark, and the partition does not start until a
//!   take-over of the same file finishes (a profile stored already with the same bytes is no
//!   conflict).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Seek};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sled::Transactional;

use super::codec;
use super::error::TxResult;
use super::groups::{group_key, Change, GroupKey, GroupView};
use super::handover_file::{FileReader, FileWriter, HandedPartition, Header, Terms};
use super::keys::meta;
use super::profiles::{group_name, groups_after};
use super::source::{decode_moved, decode_position, encode_moved, position_key, Moved};
use super::tally::add_to_profile_count;
use super::{Store, StoreError, Trees};
use crate::source::partition::partition_of;

/// Groups changed in one transaction.
const GROUPS_A_TRANSACTION: usize = 1_000;

/// Profiles of a hand-over file stored a chunk at a time.
const PROFILES_A_CHUNK: usize = 1_000;

/// Stored profiles read at a time while a hand-over forgets them.
const PROFILES_A_FORGETTING_STEP: usize = 4_000;

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// The store or the file is not in a state to move the partitions. The profiles and
    /// positions are as they were, but for marks that the same command, run again, goes on
    /// from (a hand-over that could not write its file, or found a profile changed since).
    #[error("{0}")]
    Refused(String),
    /// A take-over stopped after it began to store profiles: its partitions stay marked.
    #[error("{0}; the take-over stopped part way, and its partitions are not consumed until it is run again with a whole file")]
    Unfinished(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sled::Error> for MoveError {
    fn from(e: sled::Error) -> Self {
        MoveError::Store(e.into())
    }
}

fn refused(text: impl Into<String>) -> MoveError {
    MoveError::Refused(text.into())
}

fn io_error(path: &Path, what: &str, e: std::io::Error) -> MoveError {
    refused(format!("{what} {}: {e}", path.display()))
}

/// What a hand-over did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandedOver {
    /// The file's header: the one written, or the one a killed hand-over left.
    pub header: Header,
    pub profiles_in_file: u64,
    /// Whether this run wrote the file (not a hand-over run again).
    pub wrote: bool,
    pub forgotten: u64,
}

/// What a take-over did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenOver {
    pub header: Header,
    /// Profiles stored; those found stored already with the same bytes (a take-over run
    /// again) are not counted.
    pub stored: u64,
    pub profiles_in_file: u64,
}

/// Refuses a file written under other terms, naming what differs.
fn refuse_other_terms(path: &Path, file: &Terms, ours: &Terms) -> Result<(), MoveError> {
    let mut differ = Vec::new();
    if file.partition_count != ours.partition_count {
        differ.push(format!(
            "a stream of {} partitions there, {} here (a profile's partition depends on it)",
            file.partition_count, ours.partition_count
        ));
    }
    if file.fleet != ours.fleet {
        differ.push(format!("{} there, {} here", file.fleet, ours.fleet));
    }
    if file.mapping != ours.mapping {
        differ.push(format!(
            "the mapping there: {}; here: {} (stored profiles keep what the mapping asks for, \
             so both agents must run with the same)",
            file.mapping, ours.mapping
        ));
    }
    if differ.is_empty() {
        return Ok(());
    }
    Err(refused(format!(
        "{} was written by an agent whose config differs from this one: {}",
        path.display(),
        differ.join("; ")
    )))
}

/// Sets the partitions' marks in one atomic write, durably.
fn mark(
    store: &Store,
    t: &Trees,
    moved: Moved,
    partitions: &[HandedPartition],
) -> Result<(), MoveError> {
    let mut batch = sled::Batch::default();
    for partition in partitions {
        batch.insert(
            &position_key(partition.partition)[..],
            &encode_moved(moved, partition.position)[..],
        );
    }
    t.positions.apply_batch(batch)?;
    store.flush()?;
    Ok(())
}

/// Records the partition count a hand-over is of, durably, before its partitions are marked
/// (and on every run, for marks an older build wrote without it): with the marks, it says
/// which profiles' updates the store refuses (`source::moved_away`).
fn record_partition_count(store: &Store, t: &Trees, partition_count: u32) -> Result<(), MoveError> {
    let count = u64::from(partition_count).to_be_bytes();
    if t.meta.get(meta::MOVED_PARTITIONS_OF)?.as_deref() != Some(&count[..]) {
        t.meta.insert(meta::MOVED_PARTITIONS_OF, &count[..])?;
        store.flush()?;
    }
    Ok(())
}

/// A partition's position, as a move sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    Nothing,
    At(u64, u64),
    Moved(Moved, Option<(u64, u64)>),
}

fn standing(t: &Trees, partition: u32) -> Result<Standing, MoveError> {
    let Some(value) = t.positions.get(position_key(partition))? else {
        return Ok(Standing::Nothing);
    };
    if let Some((moved, position)) = decode_moved(&value) {
        return Ok(Standing::Moved(moved, position));
    }
    match decode_position(&value) {
        Ok((seq, Some(stream))) => Ok(Standing::At(seq, stream)),
        Ok((seq, None)) => Err(refused(format!(
            "partition {partition}'s position ({seq}) does not say which stream it counts in \
             (an older build wrote it): an agent records that when it starts the partition, \
             so run it once owning the partition first"
        ))),
        Err(e) => Err(refused(format!(
            "partition {partition}'s position cannot be read ({e}): set it with `outpost nats \
             set-position` first"
        ))),
    }
}

/// Refuses what a move cannot leave consistent: profiles an upgrade has yet to move into
/// their groups, a segment of `terms` the store has not run with (its backfill would miss
/// the profiles moved away, or repeat those moved in), a backfill under way, and
/// partitions the running agent owns (`owned`: empty when no agent runs).
fn refuse_unsettled(
    store: &Store,
    t: &Trees,
    partitions: &[u32],
    owned: &[u32],
    terms: &Terms,
) -> Result<(), MoveError> {
    if let Some(p) = partitions.iter().find(|p| owned.contains(p)) {
        return Err(refused(format!(
            "this agent owns partition {p}, and consumes it whenever it may: take it out of \
             `source.nats.owned` and restart the agent first"
        )));
    }
    if t.has_legacy_profiles || t.upgrade_unfinished {
        return Err(refused(
            "the store's profiles are still being upgraded to this build's format: let the \
             agent finish that (`outpost check --store` shows what is left) first",
        ));
    }
    let unbackfilled = store.segments_not_yet_run_with(&terms.segments)?;
    if !unbackfilled.is_empty() {
        return Err(refused(format!(
            "this store has not run with segment(s) {} mapped, so their stored members have \
             not been backfilled: start its agent once with this mapping and let the backfill \
             finish, then move the partitions",
            unbackfilled.join(", ")
        )));
    }
    if let Some(progress) = store.backfill_progress()? {
        return Err(refused(format!(
            "a backfill of segment(s) {} is under way ({} of about {} profiles scanned): move \
             partitions once it has finished",
            progress.segments.join(", "),
            progress.scanned,
            progress.profiles
        )));
    }
    Ok(())
}

/// Exports of profiles in `partitions` still in the outbox or the dead letters, as a refusal.
fn refuse_waiting_exports(
    t: &Trees,
    partitions: &BTreeSet<u32>,
    partition_count: u32,
) -> Result<(), MoveError> {
    let mut waiting: BTreeMap<u32, (u64, u64, String)> = BTreeMap::new();
    for (dead, tree) in [(false, &t.outbox), (true, &t.dead)] {
        for item in tree.iter() {
            let (_, value) = item?;
            let Ok(id) = codec::export_profile_id(&value) else {
                return Err(refused(
                    "the outbox or the dead letters hold an export that cannot be read, of a \
                     profile that may be in these partitions: `outpost check --store` lists \
                     it, `outpost repair` keeps it as a dead letter to drop",
                ));
            };
            let partition = partition_of(id, partition_count);
            if partitions.contains(&partition) {
                let entry = waiting
                    .entry(partition)
                    .or_insert_with(|| (0, 0, id.to_string()));
                if dead {
                    entry.1 += 1;
                } else {
                    entry.0 += 1;
                }
            }
        }
    }
    if waiting.is_empty() {
        return Ok(());
    }
    let listed: Vec<String> = waiting
        .iter()
        .map(|(partition, (pending, dead, example))| {
            format!(
                "partition {partition}: {pending} pending, {dead} dead (profile {example} among them)"
            )
        })
        .collect();
    Err(refused(format!(
        "exports of these partitions' profiles wait in the outbox ({}): the store that takes \
         the partitions over must not send newer versions before them. Let the agent deliver \
         them (it delivers while not consuming the partitions), retry or drop the dead letters, \
         then hand over",
        listed.join("; ")
    )))
}

/// Refuses to hand over a profile this build cannot read: written to the file as it is, it
/// would make every take-over of the file refuse it whole, once the profiles of its
/// partitions were forgotten here.
fn refuse_unreadable_profiles(
    t: &Trees,
    partitions: &BTreeSet<u32>,
    partition_count: u32,
) -> Result<(), MoveError> {
    for_each_profile_in(
        t,
        partitions,
        partition_count,
        |id, value| match codec::decode_profile(value) {
            Ok(_) => Ok(()),
            Err(e) => Err(refused(format!(
                "profile {id} cannot be read ({e}): a take-over would refuse the file whole. \
             `outpost repair` forgets it; then hand over again"
            ))),
        },
    )
}

/// The stored profiles of `partitions`, group by group, each passed to `each`.
fn for_each_profile_in(
    t: &Trees,
    partitions: &BTreeSet<u32>,
    partition_count: u32,
    mut each: impl FnMut(&str, &[u8]) -> Result<(), MoveError>,
) -> Result<(), MoveError> {
    for item in t.profile_groups.iter() {
        let (key, value) = item?;
        let Ok(group) = GroupKey::try_from(key.as_ref()) else {
            return Err(refused(format!(
                "the profile groups hold a key that names no group ({}): `outpost repair` \
                 deletes it",
                key.escape_ascii()
            )));
        };
        for (id, profile) in readable_group(&group, &value)?.entries() {
            if partitions.contains(&partition_of(id, partition_count)) {
                each(id, profile)?;
            }
        }
    }
    Ok(())
}

/// Changes to profiles, by group, each group's in id order (as `with_changes` wants them).
type GroupChanges<'a> = BTreeMap<GroupKey, Vec<Change<'a>>>;

fn by_group<'a>(changes: impl IntoIterator<Item = Change<'a>>) -> GroupChanges<'a> {
    let mut grouped = GroupChanges::new();
    for change in changes {
        grouped.entry(group_key(change.0)).or_default().push(change);
    }
    for changes in grouped.values_mut() {
        changes.sort_unstable_by(|a, b| a.0.cmp(b.0));
    }
    grouped
}

/// Forgets every stored profile of `partitions`, reading the groups anew a chunk at a time:
/// a move may forget most of the store, and neither the profiles nor the list of them are
/// held in memory at once. Returns how many were forgotten.
fn forget_profiles_of(
    t: &Trees,
    partitions: &BTreeSet<u32>,
    partition_count: u32,
) -> Result<u64, MoveError> {
    let mut forgotten = 0;
    let mut after: Option<sled::IVec> = None;
    loop {
        let (groups, done) = groups_after(
            &t.profile_groups,
            after.as_deref(),
            None,
            PROFILES_A_FORGETTING_STEP,
        )?;
        let mut changes = GroupChanges::new();
        for (key, value) in &groups {
            let group = GroupKey::try_from(key.as_ref()).expect("groups_after skips other keys");
            for (id, _) in readable_group(&group, value)?.entries() {
                if partitions.contains(&partition_of(id, partition_count)) {
                    changes.entry(group).or_default().push((id, None));
                }
            }
        }
        forgotten += change_groups(t, &changes)?.unsigned_abs();
        match groups.last() {
            Some((last, _)) if !done => after = Some(last.clone()),
            _ => return Ok(forgotten),
        }
    }
}

/// Makes `changes` (a value to store, or `None`: remove) in transactions of
/// [`GROUPS_A_TRANSACTION`] groups, keeping `meta/profiles`. Returns how many profiles were
/// added (positive) or removed (negative).
fn change_groups(t: &Trees, changes: &GroupChanges) -> Result<i64, MoveError> {
    let mut total = 0i64;
    let groups: Vec<_> = changes.iter().collect();
    for chunk in groups.chunks(GROUPS_A_TRANSACTION) {
        let changed = (&t.profile_groups, &t.meta).transaction(|(groups_tx, meta_tx)| {
            let mut changed = 0i64;
            for (key, changes) in chunk {
                let stored = groups_tx.get(key)?;
                let view = match &stored {
                    Some(bytes) => GroupView::decode(bytes).map_err(|e| {
                        super::error::abort(super::profiles::unreadable_group(*key, e))
                    })?,
                    None => GroupView::default(),
                };
                for (id, value) in changes.iter() {
                    match (view.get(id).is_some(), value.is_some()) {
                        (false, true) => changed += 1,
                        (true, false) => changed -= 1,
                        _ => {}
                    }
                }
                match view.with_changes(changes) {
                    Some(bytes) => groups_tx.insert(&key[..], bytes)?,
                    None => groups_tx.remove(&key[..])?,
                };
            }
            add_to_profile_count(meta_tx, changed)?;
            TxResult::Ok(changed)
        });
        total += changed.map_err(StoreError::from)?;
    }
    Ok(total)
}

/// The hash a profile's bytes are compared by, so that a large file is not held in memory.
fn digest(value: &[u8]) -> u64 {
    twox_hash::XxHash64::oneshot(0, value)
}

/// The whole hand-over file at `path`, read and checked, once found to be of `partitions`
/// (with the positions they were marked with); the [`digest`] of its profiles, by id.
fn read_own_file(
    path: &Path,
    partitions: &[HandedPartition],
) -> Result<(Header, HashMap<String, u64>), MoveError> {
    let not_it = |why: String| {
        refused(format!(
            "{} is not the file of this hand-over ({why}): put that file back, or, if this \
             hand-over never finished writing one, move this one away and run it again",
            path.display()
        ))
    };
    let file = File::open(path).map_err(|e| not_it(e.to_string()))?;
    let (header, mut reader) =
        FileReader::open(BufReader::new(file)).map_err(|e| not_it(e.to_string()))?;
    if header.partitions != partitions {
        return Err(not_it("it is of other partitions or positions".into()));
    }
    let mut profiles = HashMap::new();
    while let Some((id, value)) = reader.next_profile().map_err(|e| not_it(e.to_string()))? {
        profiles.insert(id, digest(&value));
    }
    Ok((header, profiles))
}

/// Writes the file beside its place, its profiles by `profiles`, and moves it there once
/// whole and synced. Returns how many profiles it holds.
fn write_file(
    path: &Path,
    header: &Header,
    profiles: impl FnOnce(&mut FileWriter<BufWriter<File>>) -> Result<(), MoveError>,
) -> Result<u64, MoveError> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let _ = std::fs::remove_file(&partial);
    // It holds customers' profiles: readable by its owner alone.
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(|e| io_error(&partial, "cannot create", e))?;
    let cannot_write = |e| io_error(&partial, "cannot write", e);
    let written = (|| {
        let mut writer = FileWriter::new(BufWriter::new(file), header).map_err(cannot_write)?;
        profiles(&mut writer)?;
        let (out, count) = writer.finish().map_err(cannot_write)?;
        let file = out.into_inner().map_err(|e| cannot_write(e.into_error()))?;
        file.sync_all().map_err(cannot_write)?;
        Ok(count)
    })();
    let count = written.inspect_err(|_: &MoveError| {
        let _ = std::fs::remove_file(&partial);
    })?;
    // A link, unlike a rename, never replaces a file that appeared at `path` meanwhile; where
    // the file system has no links (FAT), a rename once `path` is found free.
    let placed = match std::fs::hard_link(&partial, path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists && !path.exists() => {
            std::fs::rename(&partial, path)
        }
        linked => linked,
    };
    let _ = std::fs::remove_file(&partial);
    placed.map_err(|e| io_error(path, "cannot put the file at", e))?;
    super::rebuild::sync_parent(path)
        .map_err(|e| io_error(path, "cannot sync the folder of", e))?;
    Ok(count)
}

impl Store {
    /// Writes the stored profiles of `partitions` and their positions to a new file at
    /// `path`, then forgets them here. The partitions are marked as being handed over before
    /// the file is written, and as handed over once it is whole in its place; only the
    /// profiles the file holds, with the same bytes, are forgotten. Refused, with nothing
    /// changed, while exports of their profiles wait, while `owned` (what the running agent
    /// consumes) holds one of them, and in the cases [`refuse_unsettled`] names. Run again
    /// after a kill, it goes on: a whole file the kill left at `path` is kept, a missing one
    /// written; profiles of partitions handed over are forgotten as the file has them.
    ///
    /// With `write_only`, it stops once the file is written (the partitions stay marked as
    /// being handed over): the command then makes sure it sees the file itself, since the
    /// agent that wrote it may see another `/tmp` (systemd's `PrivateTmp`), before it asks
    /// again to forget.
    pub fn hand_over(
        &self,
        partitions: &[u32],
        terms: &Terms,
        path: &Path,
        owned: &[u32],
        write_only: bool,
    ) -> Result<HandedOver, MoveError> {
        let _section = self.write_section()?;
        let _writer = self.lock_profile_writer();
        let t = self.trees()?;
        refuse_unsettled(self, &t, partitions, owned, terms)?;
        let count = terms.partition_count;
        if let Some(p) = partitions.iter().find(|p| **p >= count) {
            return Err(refused(format!(
                "there is no partition {p}: the stream has {count}"
            )));
        }
        let set: BTreeSet<u32> = partitions.iter().copied().collect();
        // Each partition's state, and where it stood when the hand-over began.
        let mut states = BTreeSet::new();
        let mut handed = Vec::new();
        for &partition in &set {
            let (state, position) = match standing(&t, partition)? {
                Standing::Moved(Moved::Taking, _) => {
                    return Err(refused(format!(
                        "partition {partition}'s take-over has not finished: run `outpost nats \
                         take-over` with its file again first"
                    )))
                }
                Standing::Moved(moved, position) => (Some(moved), position),
                Standing::At(seq, stream) => (None, Some((seq, stream))),
                Standing::Nothing => (None, None),
            };
            states.insert(state);
            handed.push(HandedPartition {
                partition,
                position,
            });
        }
        let [state] = states.into_iter().collect::<Vec<_>>()[..] else {
            return Err(refused(
                "some of these partitions were handed over, or began to be, and others not: \
                 hand over the same partitions as before, then the others on their own",
            ));
        };
        // Exports of their profiles may have come since a killed run (over HTTP).
        self.rewinding(|| refuse_waiting_exports(&t, &set, count))?;
        if state != Some(Moved::Given) {
            refuse_unreadable_profiles(&t, &set, count)?;
        }
        record_partition_count(self, &t, count)?;
        let written = match (state, path.exists()) {
            (None, true) => {
                return Err(refused(format!(
                    "{} exists: give a file that does not, so that no earlier hand-over is lost",
                    path.display()
                )))
            }
            (None | Some(Moved::Giving), false) => {
                if state.is_none() {
                    mark(self, &t, Moved::Giving, &handed)?;
                }
                let header = Header {
                    terms: terms.clone(),
                    partitions: handed.clone(),
                    store_id: self.store_id(),
                    written_at_ms: chrono::Utc::now().timestamp_millis(),
                };
                let profiles = write_file(path, &header, |writer| {
                    for_each_profile_in(&t, &set, count, |id, value| {
                        writer
                            .profile(id, value)
                            .map_err(|e| io_error(path, "cannot write", e))
                    })
                })?;
                Some((header, profiles))
            }
            // A whole file a killed run left, or the file of a finished hand-over.
            _ => None,
        };
        let wrote = written.is_some();
        if write_only {
            // What is forgotten is compared with the file when asked to forget.
            let (header, profiles_in_file) = match written {
                Some(written) => written,
                None => {
                    let (header, in_file) = read_own_file(path, &handed)?;
                    (header, in_file.len() as u64)
                }
            };
            refuse_other_terms(path, &header.terms, terms)?;
            return Ok(HandedOver {
                header,
                profiles_in_file,
                wrote,
                forgotten: 0,
            });
        }
        let (header, in_file) = read_own_file(path, &handed)?;
        refuse_other_terms(path, &header.terms, terms)?;
        // Only what the file holds is forgotten: a version stored since (over HTTP) is in
        // no file. Under the profile writer, what is checked here is what is forgotten below.
        let (mut changed, mut first_changed) = (0u64, None);
        for_each_profile_in(&t, &set, count, |id, value| {
            if in_file.get(id) != Some(&digest(value)) {
                changed += 1;
                first_changed.get_or_insert_with(|| id.to_string());
            }
            Ok(())
        })?;
        let profiles_in_file = in_file.len() as u64;
        drop(in_file);
        if let Some(first) = first_changed {
            return Err(refused(format!(
                "{changed} profile(s) of these partitions are stored with another version than \
                 {} holds (profile {first} among them): they changed after the file was \
                 written. Forgetting them would lose that version; nothing was forgotten",
                path.display()
            )));
        }
        if state != Some(Moved::Given) {
            mark(self, &t, Moved::Given, &handed)?;
        }
        let forgotten = forget_profiles_of(&t, &set, count)?;
        self.flush()?;
        Ok(HandedOver {
            header,
            profiles_in_file,
            wrote,
            forgotten,
        })
    }

    /// Stores the profiles and positions of the hand-over file at `path`. Refused, with
    /// nothing changed, when the file is not whole or was written under other [`Terms`],
    /// when a partition in it has a position here or a profile of it is stored here with
    /// other bytes (it came by another input), when `owned` (what the running agent consumes)
    /// holds one of its partitions, and in the cases [`refuse_unsettled`] names. Run again
    /// after a kill, it goes on; after it finished, it finds everything stored and says so.
    pub fn take_over(
        &self,
        path: &Path,
        terms: &Terms,
        owned: &[u32],
        finished_only: bool,
    ) -> Result<TakenOver, MoveError> {
        self.take_over_as(path, terms, owned, finished_only, false)
    }

    /// Refuses the take-over of the file at `path` as [`Store::take_over`] would, and changes
    /// nothing: `outpost nats take-over` asks this before the claims say the file is being
    /// taken over by this store, so that a refusal leaves them as they were.
    pub fn check_take_over(
        &self,
        path: &Path,
        terms: &Terms,
        owned: &[u32],
        finished_only: bool,
    ) -> Result<TakenOver, MoveError> {
        self.take_over_as(path, terms, owned, finished_only, true)
    }

    fn take_over_as(
        &self,
        path: &Path,
        terms: &Terms,
        owned: &[u32],
        finished_only: bool,
        check_only: bool,
    ) -> Result<TakenOver, MoveError> {
        let in_file =
            |e: super::handover_file::FileError| refused(format!("{}: {e}", path.display()));
        let file = File::open(path).map_err(|e| io_error(path, "cannot open", e))?;
        let (header, mut reader) = FileReader::open(BufReader::new(file)).map_err(in_file)?;
        refuse_other_terms(path, &header.terms, terms)?;
        let count = terms.partition_count;
        let partitions: Vec<u32> = header.partitions.iter().map(|p| p.partition).collect();
        let set: BTreeSet<u32> = partitions.iter().copied().collect();
        if set.len() != partitions.len() || partitions.iter().any(|p| *p >= count) {
            return Err(in_file(super::handover_file::FileError::Damaged(format!(
                "its partitions {partitions:?} are not distinct partitions of {count}"
            ))));
        }
        // It stores profiles: refused while the space kept for delivery is given up.
        let _section = self.update_section()?;
        let _writer = self.lock_profile_writer();
        let t = self.trees()?;
        let ours = header.store_id == self.store_id();
        let mut found = Vec::with_capacity(header.partitions.len());
        for handed in &header.partitions {
            let standing = standing(&t, handed.partition)?;
            found.push(judge_partition(standing, handed, ours, path).map_err(refused)?);
        }
        let finished = finished_take_over(&found, finished_only);
        if finished_only && !finished {
            return Err(refused(format!(
                "the partitions' claims name this store already, but it did not take them over \
                 from {}: the file is stale",
                path.display()
            )));
        }
        let resuming = found.contains(&Found::Resuming);
        // A finished take-over run again writes nothing: the running agent may own them.
        let owned = if finished { &[] } else { owned };
        refuse_unsettled(self, &t, &partitions, owned, terms)?;
        // The first reading checks the file whole, and what it would change, before any write.
        let checked = check_profiles(&t, &mut reader, &set, count, finished, resuming, path)?;
        let profiles_in_file = checked.profiles_in_file;
        if finished || check_only {
            return Ok(TakenOver {
                header,
                stored: 0,
                profiles_in_file,
            });
        }
        // A store that has run with no mapping yet (made for this take-over) takes the file's
        // segments as the mapping it ran with: their members were exported where they come
        // from, and a segment mapped at its agent's first start is then new, and backfilled.
        if self.mapping_records()?.is_empty() {
            let now_ms = chrono::Utc::now().timestamp_millis();
            self.record_segments_taken_over(&terms.segments, now_ms)?;
        }
        mark(self, &t, Moved::Taking, &header.partitions)?;
        // The same file read again, from its start: checked as it goes.
        let unfinished = |e: String| MoveError::Unfinished(format!("{}: {e}", path.display()));
        let mut file = reader.into_inner().into_inner();
        file.rewind().map_err(|e| unfinished(e.to_string()))?;
        let (again, mut reader) =
            FileReader::open(BufReader::new(file)).map_err(|e| unfinished(e.to_string()))?;
        if again != header {
            return Err(unfinished("it changed while it was read".into()));
        }
        let stored = store_profiles(&t, &mut reader, &checked.newer, &unfinished)?;
        if reader.profiles_read() != profiles_in_file {
            return Err(unfinished("it changed while it was read".into()));
        }
        write_positions(&t, &header.partitions)?;
        self.flush()?;
        Ok(TakenOver {
            header,
            stored,
            profiles_in_file,
        })
    }
}

/// How a partition of a hand-over file stands in this store, as far as taking it over goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// As a finished take-over of this file leaves it: at the file's position.
    Finished,
    /// Never consumed, here nor where the file comes from: no position before or after.
    NeverConsumed,
    /// Marked as being taken over to the file's position: a take-over that stopped partway.
    Resuming,
    /// Nothing here yet, or handed over from here before the file's position.
    Untouched,
}

/// Judges one partition of the file (`handed`) by where this store stands with it: the
/// refusal says why it may not be taken over. `ours`: this store wrote the file.
fn judge_partition(
    standing: Standing,
    handed: &HandedPartition,
    ours: bool,
    path: &Path,
) -> Result<Found, String> {
    let partition = handed.partition;
    match standing {
        Standing::Moved(Moved::Given, _) if ours => Err(format!(
            "{} is the file this store wrote when it handed partition {partition} over: to \
             take the partition back, take over the file of the store that holds it now",
            path.display()
        )),
        Standing::Moved(Moved::Given, given) if behind(handed.position, given) => Err(format!(
            "{} hands partition {partition} over as it stood before this store handed it over \
             itself (at {}): the file is stale",
            path.display(),
            describe(given)
        )),
        Standing::Nothing if handed.position.is_none() => Ok(Found::NeverConsumed),
        Standing::Nothing | Standing::Moved(Moved::Given, _) => Ok(Found::Untouched),
        Standing::Moved(Moved::Taking, position) if position == handed.position => {
            Ok(Found::Resuming)
        }
        Standing::At(seq, stream) if Some((seq, stream)) == handed.position => Ok(Found::Finished),
        Standing::Moved(Moved::Giving, _) => Err(format!(
            "partition {partition}'s hand-over from this store has not finished: run `outpost \
             nats hand-over` again first"
        )),
        Standing::Moved(Moved::Taking, _) => Err(format!(
            "partition {partition}'s take-over from another file has not finished: run \
             `outpost nats take-over` with that file first"
        )),
        Standing::At(seq, _) => Err(format!(
            "partition {partition} was consumed in this store (up to {seq}): a store takes over \
             only a partition it has not consumed, or handed over since"
        )),
    }
}

/// Whether the take-over of the file has finished: every partition is as a finished take-over
/// leaves it, and at least one says so by its position, or the claims do (`finished_only`:
/// all never consumed). Every profile must then be found stored.
fn finished_take_over(found: &[Found], finished_only: bool) -> bool {
    let at_file = found.iter().filter(|f| **f == Found::Finished).count();
    found
        .iter()
        .all(|f| matches!(f, Found::Finished | Found::NeverConsumed))
        && (at_file != 0 || finished_only)
}

/// What the first reading of a hand-over file found.
struct CheckedProfiles {
    /// Stored since a take-over that stopped partway marked the partitions: newer than the
    /// file's versions, and kept.
    newer: HashSet<String>,
    profiles_in_file: u64,
}

/// Reads the file's profiles through, before anything is written: each of a partition it
/// hands over, once, readable by this build, and stored here with the same bytes or not at
/// all (all of them, once `finished`).
fn check_profiles(
    t: &Trees,
    reader: &mut FileReader<BufReader<File>>,
    partitions: &BTreeSet<u32>,
    count: u32,
    finished: bool,
    resuming: bool,
    path: &Path,
) -> Result<CheckedProfiles, MoveError> {
    let in_file = |e: super::handover_file::FileError| refused(format!("{}: {e}", path.display()));
    let (mut conflicts, mut example) = (0u64, None);
    let mut ids = HashSet::new();
    let mut newer = HashSet::new();
    while let Some((id, value)) = reader.next_profile().map_err(in_file)? {
        if !partitions.contains(&partition_of(&id, count)) {
            return Err(refused(format!(
                "{}: profile {id} is of none of the partitions it hands over",
                path.display()
            )));
        }
        codec::decode_profile(&value).map_err(|e| {
            refused(format!(
                "{}: profile {id} cannot be read by this build: {e}",
                path.display()
            ))
        })?;
        let stored = stored_value(t, &id)?;
        let differs = stored.as_ref().is_some_and(|stored| *stored != value);
        if differs && resuming {
            newer.insert(id.clone());
        } else if differs || (finished && stored.is_none()) {
            conflicts += 1;
            example.get_or_insert(id.clone());
        }
        if !ids.insert(id.clone()) {
            return Err(refused(format!(
                "{}: profile {id} is in it twice",
                path.display()
            )));
        }
    }
    if let Some(example) = example {
        return Err(refused(format!(
            "{conflicts} profile(s) of these partitions are stored here with other versions \
             (profile {example} among them), or missing though the partitions were taken \
             over: they came by another input, and the store cannot tell which is newer"
        )));
    }
    Ok(CheckedProfiles {
        newer,
        profiles_in_file: reader.profiles_read(),
    })
}

/// Stores the file's profiles, [`PROFILES_A_CHUNK`] at a time, but the `newer` ones stored
/// here since; returns how many were stored that were not already.
fn store_profiles(
    t: &Trees,
    reader: &mut FileReader<BufReader<File>>,
    newer: &HashSet<String>,
    unfinished: &dyn Fn(String) -> MoveError,
) -> Result<u64, MoveError> {
    let mut stored = 0i64;
    loop {
        let mut chunk = Vec::new();
        while chunk.len() < PROFILES_A_CHUNK {
            match reader
                .next_profile()
                .map_err(|e| unfinished(e.to_string()))?
            {
                Some(entry) => chunk.push(entry),
                None => break,
            }
        }
        if chunk.is_empty() {
            return Ok(stored.max(0) as u64);
        }
        let changes = by_group(
            chunk
                .iter()
                .filter(|(id, _)| !newer.contains(id))
                .map(|(id, v)| (id.as_str(), Some(&v[..]))),
        );
        stored += change_groups(t, &changes)?;
    }
}

/// Sets each partition's position to the file's, which ends the take-over's marks.
fn write_positions(t: &Trees, partitions: &[HandedPartition]) -> Result<(), MoveError> {
    let mut positions = sled::Batch::default();
    for handed in partitions {
        let key = position_key(handed.partition);
        match handed.position {
            Some((seq, stream)) => {
                positions.insert(&key[..], &super::source::encode_position(seq, stream)[..])
            }
            None => positions.remove(&key[..]),
        }
    }
    t.positions.apply_batch(positions)?;
    Ok(())
}

/// Whether a file's position of a partition lies before where this store stood when it
/// handed the partition over (`given`), in the same stream.
fn behind(file: Option<(u64, u64)>, given: Option<(u64, u64)>) -> bool {
    match (file, given) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some((seq, stream)), Some((given_seq, given_stream))) => {
            stream == given_stream && seq < given_seq
        }
    }
}

fn describe(position: Option<(u64, u64)>) -> String {
    match position {
        Some((seq, _)) => format!("stream sequence {seq}"),
        None => "its start".into(),
    }
}

/// The stored value of profile `id` in its group.
fn stored_value(t: &Trees, id: &str) -> Result<Option<Vec<u8>>, MoveError> {
    let key = group_key(id);
    let Some(bytes) = t.profile_groups.get(key)? else {
        return Ok(None);
    };
    Ok(readable_group(&key, &bytes)?.get(id).map(<[u8]>::to_vec))
}

/// A stored group, or the refusal that names it when it cannot be read.
fn readable_group<'a>(key: &GroupKey, bytes: &'a [u8]) -> Result<GroupView<'a>, MoveError> {
    GroupView::decode(bytes).map_err(|e| {
        refused(format!(
            "profile group {} cannot be read ({e}): `outpost repair` first",
            group_name(key)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each way a partition of a hand-over file may stand in the store taking it over, and
    /// what the take-over makes of it (the refusals by a word of their message).
    #[test]
    fn how_each_partition_of_a_file_is_judged() {
        use Found::*;
        let path = Path::new("/tmp/p3.handover");
        let at = |seq| Some((seq, 77));
        // (standing here, the file's position, this store wrote the file, found or refused)
        type Case = (
            Standing,
            Option<(u64, u64)>,
            bool,
            Result<Found, &'static str>,
        );
        let table: &[Case] = &[
            (Standing::Nothing, None, false, Ok(NeverConsumed)),
            (Standing::Nothing, at(10), false, Ok(Untouched)),
            (
                Standing::Moved(Moved::Given, at(10)),
                at(10),
                false,
                Ok(Untouched),
            ),
            (
                Standing::Moved(Moved::Given, at(10)),
                at(12),
                false,
                Ok(Untouched),
            ),
            // Handed over from here at 10; another stream's count says nothing of it.
            (
                Standing::Moved(Moved::Given, at(10)),
                Some((3, 78)),
                false,
                Ok(Untouched),
            ),
            (
                Standing::Moved(Moved::Given, at(10)),
                at(9),
                false,
                Err("the file is stale"),
            ),
            (
                Standing::Moved(Moved::Given, at(10)),
                None,
                false,
                Err("the file is stale"),
            ),
            (
                Standing::Moved(Moved::Given, None),
                None,
                false,
                Ok(Untouched),
            ),
            (
                Standing::Moved(Moved::Given, at(10)),
                at(12),
                true,
                Err("this store wrote"),
            ),
            (
                Standing::Moved(Moved::Taking, at(12)),
                at(12),
                false,
                Ok(Resuming),
            ),
            (
                Standing::Moved(Moved::Taking, None),
                None,
                false,
                Ok(Resuming),
            ),
            (
                Standing::Moved(Moved::Taking, at(11)),
                at(12),
                false,
                Err("take-over from another file"),
            ),
            (
                Standing::Moved(Moved::Giving, at(12)),
                at(12),
                false,
                Err("hand-over from this store"),
            ),
            (Standing::At(12, 77), at(12), false, Ok(Finished)),
            (
                Standing::At(12, 77),
                at(13),
                false,
                Err("was consumed in this store (up to 12)"),
            ),
            (
                Standing::At(12, 77),
                Some((12, 78)),
                false,
                Err("was consumed in this store"),
            ),
            (
                Standing::At(12, 77),
                None,
                false,
                Err("was consumed in this store"),
            ),
        ];
        for &(standing, position, ours, ref expected) in table {
            let handed = HandedPartition {
                partition: 3,
                position,
            };
            let judged = judge_partition(standing, &handed, ours, path);
            match (&judged, expected) {
                (Ok(found), Ok(wanted)) => assert_eq!(found, wanted, "{standing:?} {position:?}"),
                (Err(why), Err(word)) => assert!(why.contains(word), "{standing:?}: {why}"),
                _ => panic!("{standing:?} {position:?} {ours}: {judged:?}, not {expected:?}"),
            }
        }
    }

    #[test]
    fn a_take_over_is_finished_when_every_partition_says_so() {
        use Found::*;
        let table: &[(&[Found], bool, bool)] = &[
            (&[Finished, Finished], false, true),
            (&[Finished, NeverConsumed], false, true),
            // Nothing but never-consumed partitions: only the claims can say it finished.
            (&[NeverConsumed, NeverConsumed], false, false),
            (&[NeverConsumed, NeverConsumed], true, true),
            (&[Finished, Untouched], false, false),
            (&[Finished, Resuming], true, false),
            (&[Untouched], true, false),
        ];
        for &(found, finished_only, finished) in table {
            assert_eq!(
                finished_take_over(found, finished_only),
                finished,
                "{found:?} {finished_only}"
            );
        }
    }
    use crate::config::Mapping;
    use crate::profile::update::parse_body;
    use crate::profile::Update;
    use crate::source::partition::id_hash;
    use crate::store::source::{Recorded, SourcePosition};
    use crate::store::{ListFilter, Place};

    const PARTITIONS: u32 = 4;
    const STREAM: u64 = 77;

    fn mapping() -> Mapping {
        Mapping::new(&["name"], &["s"], &[])
    }

    fn terms() -> Terms {
        Terms {
            partition_count: PARTITIONS,
            mapping: mapping().fingerprint(),
            fleet: "stream UPDATES, consumer prefix outpost".into(),
            segments: mapping().segments,
        }
    }

    /// Profiles `p0`.. `p{n-1}`, each a member of `s` with a name, consumed from partition 1
    /// up to `seq` (and partition 0 up to 5).
    fn commit(store: &Store, n: usize, name: &str, seq: u64) {
        let body: Vec<String> = (0..n)
            .map(|i| member_line(&format!("p{i}"), name))
            .collect();
        let updates = parse_body(body.join("\n").as_bytes()).unwrap();
        let at = |partition, seq| SourcePosition {
            partition,
            stream: STREAM,
            seq,
            rejected: Vec::new(),
        };
        store
            .apply_each(
                &[&updates],
                &mapping(),
                chrono::Utc::now(),
                &[(0, at(1, seq)), (0, at(0, 5))],
            )
            .unwrap();
        store.flush().unwrap();
    }

    /// An update of profile `id`: a member of `s`, named `name`.
    fn member_line(id: &str, name: &str) -> String {
        format!(
            r#"{{"id":"{id}","profile":{{"name":"{name}","segmentMembership":{{"ups":{{"s":{{"status":"realized"}}}}}}}}}}"#
        )
    }

    /// Stores one update of profile `id` as one that came over HTTP would be.
    fn store_over_http(store: &Store, id: &str, name: &str) {
        let updates = parse_body(member_line(id, name).as_bytes()).unwrap();
        refuse_given_away(store, &updates).unwrap();
        store
            .apply_groups(&[&updates], &mapping(), chrono::Utc::now())
            .unwrap();
    }

    /// [`Store::refuse_given_away`] of `updates`, as the committer checks a large request.
    fn refuse_given_away(store: &Store, updates: &[Update]) -> Result<(), StoreError> {
        let hashes = updates.iter().map(|update| id_hash(&update.id));
        store.refuse_given_away(hashes, |i| updates[i].id.clone())
    }

    /// Asserts that `store` refuses `update`, not from the stream, as one of profile `id` in
    /// `partition`, given away, and stores nothing of it; the check made before a large
    /// request's first chunk refuses it alike.
    fn refused_as_given_away(store: &Store, update: &[Update], id: &str, partition: u32) {
        let before = store.profile_record(id).unwrap();
        let refused = store.apply_groups(&[update], &mapping(), chrono::Utc::now());
        let checked = refuse_given_away(store, update);
        for refusal in [refused.map(drop), checked] {
            assert!(
                matches!(&refusal, Err(StoreError::PartitionGivenAway { id: named, partition: p })
                    if named == id && *p == partition),
                "{refusal:?}"
            );
        }
        assert_eq!(store.profile_record(id).unwrap(), before);
    }

    /// A store to take over into, and partition 1 of another (`profiles` profiles consumed up
    /// to `seq`) handed over to `file`, in `dir`.
    struct HandedOverFixture {
        dir: tempfile::TempDir,
        taking: Store,
        file: PathBuf,
        terms: Terms,
    }

    fn partition_1_handed_over(profiles: usize, seq: u64) -> HandedOverFixture {
        let dir = tempfile::tempdir().unwrap();
        let giving = Store::open(&dir.path().join("a"), 8 << 20).unwrap();
        let taking = Store::open(&dir.path().join("b"), 8 << 20).unwrap();
        let file = dir.path().join("1.handover");
        let terms = terms();
        commit(&giving, profiles, "x", seq);
        deliver_all(&giving);
        giving.hand_over(&[1], &terms, &file, &[], false).unwrap();
        HandedOverFixture {
            dir,
            taking,
            file,
            terms,
        }
    }

    /// As if every pending export had been delivered.
    fn deliver_all(store: &Store) {
        for export in store.list(&ListFilter::default()).unwrap() {
            assert!(store.remove_export(export.id.seq, Place::Pending).unwrap());
        }
    }

    fn in_partition(n: usize, partition: u32) -> Vec<String> {
        (0..n)
            .map(|i| format!("p{i}"))
            .filter(|id| partition_of(id, PARTITIONS) == partition)
            .collect()
    }

    fn refusal<T: std::fmt::Debug>(result: Result<T, MoveError>) -> String {
        match result {
            Err(MoveError::Refused(text)) => text,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_partition_moves_with_its_profiles_and_position() {
        let dir = tempfile::tempdir().unwrap();
        let giving = Store::open(&dir.path().join("a"), 8 << 20).unwrap();
        let taking = Store::open(&dir.path().join("b"), 8 << 20).unwrap();
        let file = dir.path().join("1.handover");
        let terms = terms();
        commit(&giving, 40, "x", 40);
        let moving = in_partition(40, 1);
        assert!(moving.len() > 3 && moving.len() < 37, "{moving:?}");

        let waiting = refusal(giving.hand_over(&[1], &terms, &file, &[], false));
        assert!(waiting.contains("wait in the outbox"), "{waiting}");
        assert!(!file.exists());
        deliver_all(&giving);
        let consumed = refusal(giving.hand_over(&[1], &terms, &file, &[1], false));
        assert!(consumed.contains("owns partition 1,"), "{consumed}");

        let records: Vec<_> = moving
            .iter()
            .map(|id| giving.profile_record(id).unwrap().unwrap())
            .collect();
        let handed = giving.hand_over(&[1], &terms, &file, &[], false).unwrap();
        assert!(handed.wrote);
        // Handed over is no damage: `check --store` lists nothing.
        assert_eq!(giving.unreadable().unwrap(), []);
        assert_eq!(handed.profiles_in_file, moving.len() as u64);
        assert_eq!(handed.forgotten, moving.len() as u64);
        assert_eq!(
            handed.header.partitions,
            [HandedPartition {
                partition: 1,
                position: Some((40, STREAM))
            }]
        );
        assert_eq!(giving.profile_count().unwrap(), 40 - moving.len() as u64);
        for id in &moving {
            assert!(giving.profile_record(id).unwrap().is_none(), "{id} kept");
        }
        for id in (0..40)
            .map(|i| format!("p{i}"))
            .filter(|id| !moving.contains(id))
        {
            assert!(
                giving.profile_record(&id).unwrap().is_some(),
                "{id} forgotten"
            );
        }
        let moved = giving.source_position(1, STREAM, 100).unwrap_err();
        assert!(moved.to_string().contains("handed over"), "{moved}");
        assert_eq!(
            giving.source_position(0, STREAM, 100).unwrap(),
            Recorded::At(5)
        );
        // Handing them over again forgets only what a kill left (here: one profile put
        // back); the file stays as it is.
        let left = moving[0].as_str();
        let left_value = crate::store::codec::encode_profile(&records[0]);
        let put_back = by_group([(left, Some(&left_value[..]))]);
        change_groups(&giving.trees().unwrap(), &put_back).unwrap();
        let file_before = std::fs::read(&file).unwrap();
        let again = giving.hand_over(&[1], &terms, &file, &[], false).unwrap();
        assert_eq!((again.wrote, again.forgotten), (false, 1));
        assert!(giving.profile_record(left).unwrap().is_none());
        assert_eq!(std::fs::read(&file).unwrap(), file_before);
        // An update of a profile of the partition sent over HTTP after the hand-over is
        // refused, with nothing stored.
        let late = (100..)
            .map(|i| format!("p{i}"))
            .find(|id| partition_of(id, PARTITIONS) == 1)
            .unwrap();
        let update = parse_body(member_line(&late, "late").as_bytes()).unwrap();
        refused_as_given_away(&giving, &update, &late, 1);
        // A version stored all the same (here as from the stream, which is not checked: the
        // partitions given away are not consumed): its export waits, and once delivered,
        // its version is in no file: nothing is forgotten.
        let from_partition_0 = SourcePosition {
            partition: 0,
            stream: STREAM,
            seq: 6,
            rejected: Vec::new(),
        };
        giving
            .apply_each(
                &[&update],
                &mapping(),
                chrono::Utc::now(),
                &[(0, from_partition_0)],
            )
            .unwrap()
            .pop()
            .unwrap()
            .unwrap();
        let text = refusal(giving.hand_over(&[1], &terms, &file, &[], false));
        assert!(text.contains("wait in the outbox"), "{text}");
        deliver_all(&giving);
        let text = refusal(giving.hand_over(&[1], &terms, &file, &[], false));
        assert!(
            text.contains(&format!("profile {late} among them")),
            "{text}"
        );
        assert!(giving.profile_record(&late).unwrap().is_some());
        giving
            .with(|t| {
                let changes = by_group([(late.as_str(), None)]);
                change_groups(t, &changes).map_err(|e| StoreError::corrupt("test", e))?;
                Ok(())
            })
            .unwrap();

        let exists = refusal(giving.hand_over(&[2], &terms, &file, &[], false));
        assert!(exists.contains("exists"), "{exists}");

        let taken = taking.take_over(&file, &terms, &[], false).unwrap();
        assert_eq!(taken.stored, moving.len() as u64);
        assert_eq!(taken.header.store_id, giving.store_id());
        for (id, record) in moving.iter().zip(&records) {
            assert_eq!(taking.profile_record(id).unwrap().as_ref(), Some(record));
        }
        assert_eq!(taking.profile_count().unwrap(), moving.len() as u64);
        assert_eq!(
            taking.source_position(1, STREAM, 100).unwrap(),
            Recorded::At(40)
        );
        assert_eq!(
            taking.source_position(0, STREAM, 100).unwrap(),
            Recorded::Nothing
        );
        // Run again once finished: everything is found stored.
        let again = taking.take_over(&file, &terms, &[], false).unwrap();
        assert_eq!(
            (again.stored, again.profiles_in_file),
            (0, moving.len() as u64)
        );
        // So also when only a finished one fits (its claims name this store), while the
        // running agent owns the partition.
        let again = taking.take_over(&file, &terms, &[1], true).unwrap();
        assert_eq!(again.stored, 0);
        let fresh = Store::open(&dir.path().join("fresh"), 8 << 20).unwrap();
        let stale = refusal(fresh.take_over(&file, &terms, &[], true));
        assert!(stale.contains("the file is stale"), "{stale}");
        assert_eq!(fresh.profile_count().unwrap(), 0);
        // Consumed further since: the file is stale.
        commit(&taking, 1, "z", 41);
        deliver_all(&taking);
        let consumed_here = refusal(taking.take_over(&file, &terms, &[], false));
        assert!(
            consumed_here.contains("was consumed in this store"),
            "{consumed_here}"
        );

        // And back: the giving store takes over a partition it handed over, from the file of
        // the store that holds it now, not from its own.
        let own = refusal(giving.take_over(&file, &terms, &[], false));
        assert!(own.contains("is the file this store wrote"), "{own}");
        let back = dir.path().join("back.handover");
        taking.hand_over(&[1], &terms, &back, &[], false).unwrap();
        giving.take_over(&back, &terms, &[], false).unwrap();
        assert_eq!(
            giving.source_position(1, STREAM, 100).unwrap(),
            Recorded::At(41)
        );
        assert_eq!(giving.profile_count().unwrap(), 40);
        // Taken back, its profiles' updates are taken again from every input; the store that
        // gave it now refuses them.
        store_over_http(&giving, &moving[0], "back");
        refused_as_given_away(&taking, &update, &update[0].id, 1);
        // The store, made for the take-over, ran with the file's segments: one mapped at its
        // agent's first start is new, and its stored members are backfilled; the config's
        // entry of one taken over (its name here) is taken as it is, not as a change.
        assert!(taking.backfill_state().unwrap().jobs.is_empty());
        let mut first_start = Mapping::new(&["name"], &["s", "t"], &[]);
        first_start.segment_details.insert(
            "s".into(),
            crate::config::SegmentDetails {
                name: Some("Lapsed".into()),
                ..Default::default()
            },
        );
        taking.record_mapping(&mut first_start, 3).unwrap();
        let queued = taking.backfill_state().unwrap();
        assert_eq!(queued.jobs.len(), 1, "{queued:?}");
        assert_eq!(queued.jobs[0].segments, ["t"]);
        let s = first_start.mapped_at["s"];
        assert!(s.created_ms > 3 && s.updated_ms == s.created_ms, "{s:?}");
        assert_eq!(first_start.mapped_at["t"].created_ms, 3);
        // A change of its entry after that is one.
        first_start.segment_details.get_mut("s").unwrap().name = Some("Lapsed VIPs".into());
        taking.record_mapping(&mut first_start, 4).unwrap();
        assert_eq!(first_start.mapped_at["s"].updated_ms, 4);
    }

    /// A profile that cannot be read is not written to a file that every take-over would then
    /// refuse whole: the hand-over is refused before it marks anything.
    #[test]
    fn a_profile_this_build_cannot_read_is_not_handed_over() {
        let dir = tempfile::tempdir().unwrap();
        let giving = Store::open(&dir.path().join("a"), 8 << 20).unwrap();
        let file = dir.path().join("2.handover");
        commit(&giving, 40, "x", 40);
        deliver_all(&giving);
        let moving = in_partition(40, 2);
        giving
            .with(|t| {
                let changes = by_group([(moving[0].as_str(), Some(&b"damaged"[..]))]);
                change_groups(t, &changes).map_err(|e| StoreError::corrupt("test", e))?;
                Ok(())
            })
            .unwrap();
        let text = refusal(giving.hand_over(&[2], &terms(), &file, &[], false));
        assert!(
            text.contains(&format!("profile {} cannot be read", moving[0])),
            "{text}"
        );
        assert!(!file.exists());
        assert_eq!(giving.partition_moved(2).unwrap(), None);
        assert!(giving.profile_record(&moving[1]).unwrap().is_some());
    }

    /// A partition never consumed (its profiles came over HTTP) has no position, before or
    /// after: a take-over run again once finished is told apart from a stale one by the
    /// profiles it finds.
    #[test]
    fn a_partition_never_consumed_moves_and_its_take_over_runs_again() {
        let dir = tempfile::tempdir().unwrap();
        let giving = Store::open(&dir.path().join("a"), 8 << 20).unwrap();
        let taking = Store::open(&dir.path().join("b"), 8 << 20).unwrap();
        let file = dir.path().join("2.handover");
        let terms = terms();
        commit(&giving, 40, "x", 40);
        deliver_all(&giving);
        let moving = in_partition(40, 2);
        assert!(!moving.is_empty());
        // First the file alone, as the command asks before it sees the file itself.
        let written = giving.hand_over(&[2], &terms, &file, &[], true).unwrap();
        assert!(written.wrote && written.forgotten == 0);
        let why = giving.partition_moved(2).unwrap().unwrap();
        assert!(why.contains("hand-over did not finish"), "{why}");
        let listed = giving.unreadable().unwrap();
        assert_eq!(
            listed
                .iter()
                .map(|r| (r.key.as_str(), r.partition_waits_for))
                .collect::<Vec<_>>(),
            [("2", Some("nats hand-over"))]
        );
        assert!(giving.profile_record(&moving[0]).unwrap().is_some());
        // From then on, updates of the partition's profiles that do not come from the stream
        // are refused, and those of other partitions' profiles stored.
        let update = parse_body(member_line(&moving[0], "newer").as_bytes()).unwrap();
        refused_as_given_away(&giving, &update, &update[0].id, 2);
        let other = in_partition(80, 3).pop().unwrap();
        store_over_http(&giving, &other, "y");
        let handed = giving.hand_over(&[2], &terms, &file, &[], false).unwrap();
        assert!(!handed.wrote);
        assert_eq!(handed.forgotten, moving.len() as u64);
        // Marks an older build wrote, without the partition count, refuse nothing; the
        // hand-over run again records it.
        let away = || giving.with(super::super::source::moved_away).unwrap();
        assert_eq!(away(), Some((PARTITIONS, BTreeSet::from([2]))));
        giving
            .with(|t| Ok(t.meta.remove(meta::MOVED_PARTITIONS_OF).map(|_| ())?))
            .unwrap();
        assert_eq!(away(), None);
        let again = giving.hand_over(&[2], &terms, &file, &[], false).unwrap();
        assert_eq!(again.forgotten, 0);
        assert_eq!(away(), Some((PARTITIONS, BTreeSet::from([2]))));
        assert_eq!(handed.header.partitions[0].position, None);
        let fresh = Store::open(&dir.path().join("c"), 8 << 20).unwrap();
        let stale = refusal(fresh.take_over(&file, &terms, &[], true));
        assert!(stale.contains("missing though"), "{stale}");
        let taken = taking.take_over(&file, &terms, &[], false).unwrap();
        assert_eq!(taken.stored, moving.len() as u64);
        assert_eq!(
            taking.source_position(2, STREAM, 100).unwrap(),
            Recorded::Nothing
        );
        let again = taking.take_over(&file, &terms, &[2], true).unwrap();
        assert_eq!(again.stored, 0);

        // With a consumed partition beside it, a finished take-over run again is told by the
        // consumed one's position, whatever the claims say.
        let both = dir.path().join("1-2.handover");
        let (from, to) = (
            Store::open(&dir.path().join("d"), 8 << 20).unwrap(),
            Store::open(&dir.path().join("e"), 8 << 20).unwrap(),
        );
        commit(&from, 40, "x", 40);
        deliver_all(&from);
        from.hand_over(&[1, 2], &terms, &both, &[], false).unwrap();
        to.take_over(&both, &terms, &[], false).unwrap();
        let again = to.take_over(&both, &terms, &[], false).unwrap();
        assert_eq!(again.stored, 0);
        assert_eq!(
            to.source_position(1, STREAM, 100).unwrap(),
            Recorded::At(40)
        );
    }

    /// The check `outpost nats take-over` asks for before it changes the claims refuses as
    /// the take-over does, and changes nothing.
    #[test]
    fn a_take_over_checked_changes_nothing() {
        let f = partition_1_handed_over(30, 30);
        let owned = refusal(f.taking.check_take_over(&f.file, &f.terms, &[1], false));
        assert!(owned.contains("this agent owns partition 1,"), "{owned}");
        let checked = f
            .taking
            .check_take_over(&f.file, &f.terms, &[], false)
            .unwrap();
        assert_eq!(checked.stored, 0);
        assert_eq!(f.taking.profile_count().unwrap(), 0);
        assert!(f.taking.partition_moved(1).unwrap().is_none());
        assert_eq!(
            f.taking.source_position(1, STREAM, 100).unwrap(),
            Recorded::Nothing
        );
        let taken = f.taking.take_over(&f.file, &f.terms, &[], false).unwrap();
        assert_eq!(taken.stored, checked.profiles_in_file);
        assert!(taken.stored > 0);
    }

    /// A segment mapped in the config the store has not run with is backfilled at its
    /// agent's next start: the profiles moved away before would miss it.
    #[test]
    fn a_store_that_has_not_run_with_a_mapped_segment_moves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let giving = Store::open(dir.path(), 8 << 20).unwrap();
        let file = dir.path().join("1.handover");
        giving.record_mapping(&mut mapping(), 1).unwrap();
        commit(&giving, 20, "x", 20);
        deliver_all(&giving);
        let wider = Mapping::new(&["name"], &["s", "t"], &[]);
        let terms = Terms {
            mapping: wider.fingerprint(),
            segments: wider.segments.clone(),
            ..terms()
        };
        let text = refusal(giving.hand_over(&[1], &terms, &file, &[], false));
        assert!(
            text.contains("has not run with segment(s) t mapped"),
            "{text}"
        );
        assert!(!file.exists());
        giving.record_mapping(&mut wider.clone(), 2).unwrap();
        // Now the backfill of `t` is queued: still refused until it has run.
        let text = refusal(giving.hand_over(&[1], &terms, &file, &[], false));
        assert!(
            text.contains("a backfill of segment(s) t is under way"),
            "{text}"
        );
    }

    #[test]
    fn a_file_behind_this_stores_own_hand_over_is_stale() {
        let (s1, s2) = (1, 2);
        for (file, given, stale) in [
            (Some((40, s1)), None, false),
            (Some((40, s1)), Some((40, s1)), false),
            (Some((41, s1)), Some((40, s1)), false),
            (Some((39, s1)), Some((40, s1)), true),
            (None, Some((40, s1)), true),
            (None, None, false),
            // Another stream's sequences say nothing of this one's.
            (Some((3, s2)), Some((40, s1)), false),
        ] {
            assert_eq!(behind(file, given), stale, "{file:?} against {given:?}");
        }
    }

    #[test]
    fn a_take_over_cut_short_is_finished_by_running_it_again() {
        let HandedOverFixture {
            dir: _dir,
            taking,
            file,
            terms,
        } = partition_1_handed_over(60, 12);
        let moving = in_partition(60, 1);
        // Where a kill would leave a take-over: marked, and some of the profiles stored.
        let (_, mut reader) = FileReader::open(BufReader::new(File::open(&file).unwrap())).unwrap();
        let first: Vec<(String, Vec<u8>)> = (0..moving.len() / 2)
            .map(|_| reader.next_profile().unwrap().unwrap())
            .collect();
        {
            let t = taking.trees().unwrap();
            t.positions
                .insert(
                    position_key(1),
                    &encode_moved(Moved::Taking, Some((12, STREAM)))[..],
                )
                .unwrap();
            let changes = by_group(first.iter().map(|(id, v)| (id.as_str(), Some(&v[..]))));
            change_groups(&t, &changes).unwrap();
        }
        // A profile stored in the meantime (over HTTP, the agent started again): newer than
        // the file's, and kept.
        let (changed_id, _) = &first[0];
        store_over_http(&taking, changed_id, "newer");
        let newer_record = taking.profile_record(changed_id).unwrap().unwrap();
        let listed = taking.unreadable().unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(
            (
                listed[0].tree,
                listed[0].key.as_str(),
                listed[0].error.as_str()
            ),
            ("positions", "1", "the partition's take-over did not finish")
        );
        assert_eq!(listed[0].partition_waits_for, Some("nats take-over"));
        let unfinished = taking.source_position(1, STREAM, 100).unwrap_err();
        assert!(
            unfinished.to_string().contains("did not finish"),
            "{unfinished}"
        );
        let taken = taking.take_over(&file, &terms, &[], false).unwrap();
        assert_eq!(taken.stored, (moving.len() - first.len()) as u64);
        assert_eq!(taking.profile_count().unwrap(), moving.len() as u64);
        assert_eq!(
            taking.source_position(1, STREAM, 100).unwrap(),
            Recorded::At(12)
        );
        assert_eq!(taking.unreadable().unwrap(), []);
        assert_eq!(
            taking.profile_record(changed_id).unwrap().as_ref(),
            Some(&newer_record)
        );
    }

    #[test]
    fn a_take_over_that_does_not_fit_changes_nothing() {
        let HandedOverFixture {
            dir,
            taking,
            file,
            terms,
        } = partition_1_handed_over(30, 30);
        let unchanged = |taking: &Store| {
            assert_eq!(
                taking.source_position(1, STREAM, 100).unwrap(),
                Recorded::Nothing
            );
        };

        let other = |change: fn(&mut Terms)| {
            let mut other = terms.clone();
            change(&mut other);
            other
        };
        let other_mapping =
            other(|t| t.mapping = Mapping::new(&["name", "email"], &["s"], &[]).fingerprint());
        let text = refusal(taking.take_over(&file, &other_mapping, &[], false));
        assert!(text.contains("the mapping there"), "{text}");
        let text = refusal(taking.take_over(&file, &other(|t| t.partition_count = 8), &[], false));
        assert!(
            text.contains("a stream of 4 partitions there, 8 here"),
            "{text}"
        );
        let text =
            refusal(taking.take_over(&file, &other(|t| t.fleet = "another".into()), &[], false));
        assert!(text.contains("another here"), "{text}");
        let text = refusal(taking.take_over(&file, &terms, &[1], false));
        assert!(text.contains("owns partition 1,"), "{text}");

        // The same profile twice in a file.
        let (header, mut reader) =
            FileReader::open(BufReader::new(File::open(&file).unwrap())).unwrap();
        let (id, value) = reader.next_profile().unwrap().unwrap();
        let twice = dir.path().join("twice.handover");
        let mut writer = FileWriter::new(Vec::new(), &header).unwrap();
        writer.profile(&id, &value).unwrap();
        writer.profile(&id, &value).unwrap();
        std::fs::write(&twice, writer.finish().unwrap().0).unwrap();
        let text = refusal(taking.take_over(&twice, &terms, &[], false));
        assert!(
            text.contains(&format!("profile {id} is in it twice")),
            "{text}"
        );

        // A profile of the partition stored here with another version.
        let moving = in_partition(30, 1);
        let index: usize = moving[0][1..].parse().unwrap();
        commit(&taking, index + 1, "y", 0);
        let before = taking.profile_count().unwrap();
        // Its position for partition 1 was written by that commit: take it away again, as if
        // the profiles had come over HTTP.
        taking
            .trees()
            .unwrap()
            .positions
            .remove(position_key(1))
            .unwrap();
        let text = refusal(taking.take_over(&file, &terms, &[], false));
        assert!(text.contains(&format!("profile {}", moving[0])), "{text}");
        unchanged(&taking);
        assert_eq!(taking.profile_count().unwrap(), before);

        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let damaged = dir.path().join("damaged.handover");
        std::fs::write(&damaged, &bytes).unwrap();
        let fresh = Store::open(&dir.path().join("c"), 8 << 20).unwrap();
        let text = refusal(fresh.take_over(&damaged, &terms, &[], false));
        assert!(text.contains("checksum"), "{text}");
        assert_eq!(fresh.profile_count().unwrap(), 0);
        unchanged(&fresh);
    }
}
