//! Backfill: when a segment joins the mapping, each stored profile that is a member of it gets
//! one export (reason `segment`), as Adobe's destination does (SPEC "When an update produces
//! an export"). The store keeps every segment membership, mapped or not, for this.
//!
//! Value of `meta/backfill`: one format byte, then JSON `{"jobs": [...]}`, each job
//! `{segments, after_group, until_group, after, scanned, exported, profiles, queued_ms,
//! queued_seq, counted_from}`: the segments to backfill, the last profile group scanned
//! (absent: none yet), the last group to scan (absent: to the end), the last profile id a
//! build before profile groups scanned (in id order; `null`: none), how many profiles were
//! scanned and exported so far, how many were stored when the job was queued (for progress),
//! the export number exports were numbered from when it was queued or last joined by new
//! segments (absent in jobs of earlier builds: 0, as they marked nothing), and for segments in
//! the job before the last join, the lower number each counts from (absent: none joined, or
//! the job was last written by a build that kept no such numbers; then every segment counts
//! from `queued_seq`, which can make a second export but never a missing one).
//!
//! Invariants:
//! - a job is queued in the same write that records the mapping that made it
//!   (`Store::record_mapping`), so no kill can record the mapping and lose the job;
//! - a step scans the next groups after `after_group` in key order and writes their exports
//!   and the advanced job in one transaction, reading and writing through one set of store
//!   handles: a kill at any instant, or a reopen after an I/O error, neither repeats nor skips
//!   a profile; a job begun before profile groups, with `after` set, skips the profiles whose
//!   ids are not above it, which it had scanned then;
//! - a profile that cannot be read when its step passes (its record or its group is
//!   unreadable, or it is one an upgrade left outside its unreadable group) gets no export
//!   from the job, also if `outpost repair` makes it readable later;
//! - while an upgrade is unfinished (it stopped on an I/O error), steps wait until the next
//!   start, which finishes it: they would miss the profiles not yet moved;
//! - steps run where updates are applied (the committer thread, or `outpost ingest` before
//!   its first chunk), never at the same time as an update: a step reads the versions the
//!   updates before it left, and an update after it is judged against the same, so each
//!   profile's exports stay in order;
//! - a job's segments that have left the mapping by the time a step runs are skipped, and
//!   are taken out of every job when the mapping without them is recorded, so that a segment
//!   mapped again is backfilled once, by the job its return queues;
//! - a profile exported by an update after a job was queued, while the job had yet to scan
//!   its group, is skipped by the job: that export carried the job's segments (every mapped
//!   one), and a later change of their membership exports again; a segment that joined the
//!   job later counts only exports from when it joined, so a member of it exported before
//!   gets the job's export, and a profile that is a member only of the job's other segments
//!   does not. So an update does not make a member get a second export from the backfill.
//!   The update's transaction marks the profile in `backfill_exported` (group key ++ profile
//!   id → the export number the transaction's exports begin at), and the job skips a marked
//!   profile unless it is a member of a segment that counts from above the mark; a step
//!   removes the marks of the groups it passes that no other job has yet to scan, and
//!   the last step of the last job every mark left; the marks of jobs dropped with their
//!   segments go when the mapping is recorded. A mark lost can only make a second export,
//!   never a missing one; a mark at or above a later job's number would make one missing, so
//!   export numbers rebuilt from an unreadable `meta/next_seq` start above every mark;
//! - a profile is exported at most once for the segments newly mapped by one recording of
//!   the mapping: they join every queued job for the groups it has yet to scan, and jobs
//!   bounded by `after_group` and `until_group` cover the groups none of those will scan
//!   ([`BackfillState::with_new_segments`]; jobs begun before profile groups excepted).

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sled::transaction::TransactionalTree;
use sled::Transactional;

use super::error::TxResult;
use super::export::{append_exports, new_export};
use super::groups::{group_key, GroupKey, GroupView, GROUP_BITS, GROUP_KEY_LEN};
use super::keys::meta;
use super::profiles::{
    decode_profile, group_from_name, group_name, groups_after, unreadable_group,
};
use super::tally::read_u64;
use super::tally::Tally;
use super::{codec, Store, StoreError, Trees};
use crate::config::Mapping;
use crate::profile::layout::Layout;
use crate::profile::payload::{self, Kind};
use crate::profile::record::ProfileRecord;
use crate::profile::update::format_time;
use crate::profile::Reason;

const BACKFILL_V1: u8 = 1;

/// Marks removed in one batch when no job needs them.
const MARKS_A_BATCH: usize = 10_000;

/// Whether a backfill waits for deliveries before its next step (pure): while pending
/// exports take half of the room dead letters leave in `storage.max_outbox_bytes`, or the
/// outbox is full. The other half stays for ingest, which a backfill of many members would
/// otherwise keep refused for as long as delivery takes to drain what it adds. Dead letters
/// are counted out by their share of the exports (the tally keeps one byte count for both):
/// no delivery frees them, so a backfill that counted them could wait for good.
pub fn waits_for_deliveries(tally: Tally, max_outbox_bytes: u64) -> bool {
    if tally.bytes >= max_outbox_bytes {
        return true;
    }
    let held = u128::from(tally.pending) + u128::from(tally.dead);
    let dead_bytes = match held {
        0 => 0,
        _ => (u128::from(tally.bytes) * u128::from(tally.dead) / held) as u64,
    };
    let room = max_outbox_bytes - dead_bytes;
    tally.bytes - dead_bytes >= (room / 2).max(1)
}

/// Profiles a step scans, at least (it takes whole groups): small enough that updates waiting
/// behind a step wait a few milliseconds, large enough that the transaction and flush per step
/// are a small share.
pub const STEP_PROFILES: usize = 1_000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackfillState {
    pub jobs: Vec<BackfillJob>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackfillJob {
    pub segments: Vec<String>,
    /// The key of the last profile group scanned, in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_group: Option<String>,
    /// The key of the last profile group to scan, in hex (absent: to the last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_group: Option<String>,
    /// For a job begun before profile groups: the last profile id scanned then, in id order.
    pub after: Option<String>,
    pub scanned: u64,
    pub exported: u64,
    /// Profiles stored when the job was queued.
    pub profiles: u64,
    pub queued_ms: i64,
    /// Exports numbered from here on were written after the job was queued, or last joined by
    /// new segments: a profile marked exported at or above it is skipped.
    #[serde(default)]
    pub queued_seq: u64,
    /// Segments that were in the job before new ones joined it, each with the lower number it
    /// counts exports from, in place of `queued_seq`. Kept apart so that a build that reads
    /// only `queued_seq` counts from the later number: it exports a member twice, never not.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counted_from: BTreeMap<String, u64>,
}

impl BackfillState {
    /// Whether a queued job has yet to scan `group`: a profile exported there is marked.
    fn needs_mark_of(&self, group: &[u8]) -> bool {
        self.jobs.iter().any(|job| job.has_ahead(group))
    }

    /// [`Self::needs_mark_of`] the group of a `backfill_exported` key.
    fn needs_mark(&self, key: &[u8]) -> bool {
        self.needs_mark_of(&key[..key.len().min(GROUP_KEY_LEN)])
    }

    /// The state once `mapped` is the mapping (pure): segments it no longer maps are taken
    /// out of every job (a job left without any is dropped), and `new` segments (newly mapped)
    /// are backfilled so that no profile gets two exports for them: they join the queued jobs
    /// for the groups each has yet to scan (its exports, written after this, carry them
    /// anyway), and new jobs cover the groups none of those will scan (those scanned before
    /// `new` was mapped, whose exports did not carry them). A job whose remaining groups
    /// overlap those of a job joined already (queues made by earlier builds) is not joined. A
    /// job begun before profile groups, whose scan skips ids rather than groups, is not
    /// joined either: a member of its segments and of `new` gets an export from it and one
    /// from the new jobs.
    ///
    /// The segments joining a job count exports from `next_seq`, its new `queued_seq`: the
    /// exports before carried none of them, so their marks do not make the job skip a member
    /// of them. Its segments before keep the number they counted from (`counted_from`).
    pub fn with_new_segments(
        mut self,
        mapped: &[String],
        new: Vec<String>,
        profiles: u64,
        now_ms: i64,
        next_seq: u64,
    ) -> Self {
        for job in &mut self.jobs {
            job.segments.retain(|s| mapped.contains(s));
            job.counted_from.retain(|s, _| mapped.contains(s));
        }
        self.jobs.retain(|job| !job.segments.is_empty());
        if new.is_empty() {
            return self;
        }
        // What each job has yet to scan: the groups after `after_group` (None: from the
        // first) up to `until_group` (None: to the last). Group names are hex of one length,
        // so they sort as the keys do.
        let mut candidates: Vec<(Option<String>, Option<String>, usize)> = Vec::new();
        for (at, job) in self.jobs.iter().enumerate() {
            let (from, to) = (job.after_group.clone(), job.until_group.clone());
            let empty = matches!((&from, &to), (Some(from), Some(to)) if from >= to);
            if job.after.is_none() && !empty {
                candidates.push((from, to, at));
            }
        }
        candidates.sort();
        // Joined: jobs whose ranges do not overlap (queues made by earlier builds may hold
        // overlapping ones), so that no group is scanned for `new` twice.
        let mut ranges = Vec::new();
        for (from, to, at) in candidates {
            let overlaps = match ranges.last() {
                None => false,
                Some((_, None)) => true,
                Some((_, Some(end))) => from.as_ref().is_none_or(|from| from < end),
            };
            if overlaps {
                continue;
            }
            let job = &mut self.jobs[at];
            for segment in &job.segments {
                if !new.contains(segment) {
                    let from = job.counted_from.get(segment).copied();
                    let from = from.unwrap_or(job.queued_seq);
                    job.counted_from.insert(segment.clone(), from);
                }
            }
            for segment in &new {
                if !job.segments.contains(segment) {
                    job.segments.push(segment.clone());
                }
                job.counted_from.remove(segment);
            }
            job.queued_seq = next_seq;
            // Its progress counts from the join: what it scanned and exported before was for
            // its segments of then, and would read as progress for the new ones.
            job.scanned = 0;
            job.exported = 0;
            ranges.push((from, to));
        }
        let mut gaps = Vec::new();
        // The gap starts after this group (None: from the first); `open` while groups after
        // it may still be uncovered.
        let mut from: Option<String> = None;
        let mut open = true;
        for (start, end) in ranges {
            if let Some(start) = &start {
                if from.as_ref().is_none_or(|from| start > from) {
                    gaps.push((from.clone(), Some(start.clone())));
                }
            }
            match end {
                None => {
                    open = false;
                    break;
                }
                Some(end) => {
                    if from.as_ref().is_none_or(|from| end > *from) {
                        from = Some(end);
                    }
                }
            }
        }
        if open {
            gaps.push((from, None));
        }
        for (after_group, until_group) in gaps {
            let mut job = BackfillJob::new(new.clone(), profiles, now_ms, next_seq);
            job.after_group = after_group;
            job.until_group = until_group;
            self.jobs.push(job);
        }
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        codec::encode_json(BACKFILL_V1, self)
    }

    /// Decoded, with every job's group names readable (a step could not go on from one that
    /// is not).
    pub(super) fn decode(bytes: &[u8]) -> Result<BackfillState, StoreError> {
        let state: BackfillState = codec::decode_json(BACKFILL_V1, bytes)
            .map_err(|e| StoreError::corrupt("the backfill state", e))?;
        for job in &state.jobs {
            for (name, what) in [
                (&job.after_group, "after_group"),
                (&job.until_group, "until_group"),
            ] {
                if name
                    .as_deref()
                    .is_some_and(|n| group_from_name(n).is_none())
                {
                    return Err(StoreError::corrupt(
                        "the backfill state",
                        format!("{what} is not hex"),
                    ));
                }
            }
        }
        Ok(state)
    }
}

/// How far the backfill is, after a step or for `outbox stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackfillProgress {
    pub segments: Vec<String>,
    pub scanned: u64,
    pub exported: u64,
    /// Profiles the job scans in all, as far as can be told ([`BackfillJob::expected_profiles`]).
    pub profiles: u64,
    /// Whether the job in progress is finished (set only on the answer of its last step).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub done: bool,
    /// Jobs queued behind this one.
    pub queued_after: usize,
    /// Exports the step that answered this made (0 for `outbox stats`).
    #[serde(skip)]
    pub step_exported: u64,
}

impl BackfillJob {
    fn new(segments: Vec<String>, profiles: u64, now_ms: i64, next_seq: u64) -> BackfillJob {
        BackfillJob {
            segments,
            after_group: None,
            until_group: None,
            after: None,
            scanned: 0,
            exported: 0,
            profiles,
            queued_ms: now_ms,
            queued_seq: next_seq,
            counted_from: BTreeMap::new(),
        }
    }

    /// The export number from which an export of a profile carried `segment`.
    fn counts_from(&self, segment: &str) -> u64 {
        self.counted_from
            .get(segment)
            .copied()
            .unwrap_or(self.queued_seq)
    }

    /// Whether the job has yet to scan `group` (an unreadable bound counts as none).
    fn has_ahead(&self, group: &[u8]) -> bool {
        let key = |name: &Option<String>| name.as_deref().and_then(group_from_name);
        key(&self.after_group).is_none_or(|after| group > after.as_slice())
            && key(&self.until_group).is_none_or(|until| group <= until.as_slice())
    }

    /// The profiles the job scans in all: those it scanned, and, of the profiles stored when
    /// it was queued, the share of the groups it has yet to scan (a group is a hash of the id,
    /// so groups hold about as many each). So a job bounded to some of the groups counts only
    /// theirs. A job begun before profile groups scans ids: the count when it was queued.
    pub fn expected_profiles(&self) -> u64 {
        if self.after.is_some() {
            return self.profiles;
        }
        let index = |name: &Option<String>| {
            let key = GroupKey::try_from(group_from_name(name.as_deref()?)?).ok()?;
            Some(i64::from(u32::from_be_bytes(key)))
        };
        let groups = 1i64 << GROUP_BITS;
        // Scanned: groups up to `after_group`; to scan: those after it up to `until_group`.
        let after = index(&self.after_group).unwrap_or(-1);
        let until = index(&self.until_group).unwrap_or(groups - 1);
        let left = (until - after).clamp(0, groups) as u128;
        let share = u128::from(self.profiles) * left / groups as u128;
        self.scanned.saturating_add(share as u64)
    }
}

impl BackfillProgress {
    fn of(job: &BackfillJob, queued_after: usize) -> BackfillProgress {
        BackfillProgress {
            segments: job.segments.clone(),
            scanned: job.scanned,
            exported: job.exported,
            profiles: job.expected_profiles(),
            done: false,
            queued_after,
            step_exported: 0,
        }
    }
}

/// The payload a stored profile gets from a backfill of `segments`, if it is a member of one
/// of them that is still mapped (pure).
pub fn backfill_payload(
    profile: &ProfileRecord,
    segments: &[String],
    mapping: &Mapping,
    layout: &Layout,
    time: &str,
) -> Option<String> {
    let member = segments
        .iter()
        .any(|s| layout.maps_segment(s) && profile.is_member(s));
    member.then(|| payload::write(profile, profile, Kind::Update, mapping, layout, time))
}

fn read_state(t: &Trees) -> Result<BackfillState, StoreError> {
    match t.meta.get(meta::BACKFILL)? {
        None => Ok(BackfillState::default()),
        Some(bytes) => BackfillState::decode(&bytes),
    }
}

/// The `backfill_exported` key of profile `id`: its group key, then the id.
fn mark_key(id: &str) -> Vec<u8> {
    let mut key = group_key(id).to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

/// The marks to write for the profiles `exported` by updates now: those whose group a queued
/// job has yet to scan. None while no job is queued, or the queue cannot be read (a mark
/// missing makes a second export at worst).
pub(super) fn marks_for<'a>(
    t: &Trees,
    exported: impl Iterator<Item = &'a str>,
) -> Result<Vec<Vec<u8>>, StoreError> {
    let mut exported = exported.peekable();
    if exported.peek().is_none() {
        return Ok(Vec::new());
    }
    let state = match read_state(t) {
        Ok(state) if !state.jobs.is_empty() => state,
        Ok(_) | Err(StoreError::Corrupt { .. }) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(exported
        .filter(|id| {
            let group = group_key(id);
            state.needs_mark_of(&group)
        })
        .map(mark_key)
        .collect())
}

/// Writes `marks` ([`marks_for`]) in the transaction that appends their exports, before it
/// does: each holds the number its exports begin at.
pub(super) fn write_marks(
    marks_tx: &TransactionalTree,
    meta_tx: &TransactionalTree,
    marks: &[Vec<u8>],
) -> TxResult<()> {
    if marks.is_empty() {
        return Ok(());
    }
    let from = read_u64(meta_tx, meta::NEXT_SEQ)?.to_be_bytes();
    for key in marks {
        marks_tx.insert(key.as_slice(), &from)?;
    }
    Ok(())
}

/// The marks of the groups after `after` up to `through` (`None`: to the last), with the
/// number each holds (`None`: unreadable, which skips nothing).
fn marks_between(
    marks: &sled::Tree,
    after: Option<&[u8]>,
    through: Option<&[u8]>,
) -> Result<Vec<(sled::IVec, Option<u64>)>, sled::Error> {
    let successor = |key: &[u8]| -> Option<Vec<u8>> {
        let key = GroupKey::try_from(key).ok()?;
        Some(
            u32::from_be_bytes(key)
                .checked_add(1)?
                .to_be_bytes()
                .to_vec(),
        )
    };
    let from = match after {
        None => Bound::Unbounded,
        Some(after) => match successor(after) {
            Some(next) => Bound::Included(next),
            None => return Ok(Vec::new()),
        },
    };
    let to = match through.map(successor) {
        Some(Some(next)) => Bound::Excluded(next),
        Some(None) | None => Bound::Unbounded,
    };
    marks
        .range::<Vec<u8>, _>((from, to))
        .map(|item| {
            let (key, value) = item?;
            let seq = <[u8; 8]>::try_from(value.as_ref())
                .ok()
                .map(u64::from_be_bytes);
            Ok((key, seq))
        })
        .collect()
}

/// The highest export number the backfill's records hold (jobs' `queued_seq`, marks), so that
/// export numbers rebuilt from the outbox never fall below them: a mark above a job's
/// `queued_seq` made later would skip a member. `None` when they hold none, or cannot be read.
pub(super) fn highest_seq_recorded(t: &Trees) -> Result<Option<u64>, StoreError> {
    let mut highest = read_state(t).ok().and_then(|state| {
        let earlier = state.jobs.iter().flat_map(|job| job.counted_from.values());
        let queued = state.jobs.iter().map(|job| &job.queued_seq);
        queued.chain(earlier).copied().max()
    });
    for value in t.backfill_exported.iter().values() {
        let value = value?;
        if let Ok(bytes) = <[u8; 8]>::try_from(value.as_ref()) {
            highest = highest.max(Some(u64::from_be_bytes(bytes)));
        }
    }
    Ok(highest)
}

impl Store {
    pub fn backfill_state(&self) -> Result<BackfillState, StoreError> {
        self.with(read_state)
    }

    /// Removes the marks no queued job needs (every mark, when none is queued): those of jobs
    /// dropped with their segments when the mapping was recorded, or left by the last step.
    /// Run after the queue is written, so a kill before leaves marks only where a job had
    /// them. In batches of [`MARKS_A_BATCH`], not in one: a mark left by a kill part way
    /// makes no job skip a profile (a later job counts from a later export), and a store
    /// updated throughout a long backfill holds a mark for each profile updated.
    pub(super) fn remove_unneeded_marks(&self) -> Result<usize, StoreError> {
        self.with(|t| {
            let state = match read_state(t) {
                Ok(state) => state,
                // An unreadable queue: the marks stay, as the step leaves them.
                Err(StoreError::Corrupt { .. }) => return Ok(0),
                Err(e) => return Err(e),
            };
            let mut unneeded = sled::Batch::default();
            let (mut count, mut in_batch) = (0, 0);
            for key in t.backfill_exported.iter().keys() {
                let key = key?;
                if !state.needs_mark(&key) {
                    unneeded.remove(key);
                    count += 1;
                    in_batch += 1;
                    if in_batch == MARKS_A_BATCH {
                        t.backfill_exported
                            .apply_batch(std::mem::take(&mut unneeded))?;
                        in_batch = 0;
                    }
                }
            }
            if in_batch > 0 {
                t.backfill_exported.apply_batch(unneeded)?;
            }
            Ok(count)
        })
    }

    /// The backfill in progress, if any.
    pub fn backfill_progress(&self) -> Result<Option<BackfillProgress>, StoreError> {
        let state = self.backfill_state()?;
        Ok(state
            .jobs
            .first()
            .map(|job| BackfillProgress::of(job, state.jobs.len() - 1)))
    }

    /// Runs one step of the first queued backfill: scans whole groups until they held at least
    /// `max_profiles` profiles, and queues the exports of the members found, with the job's
    /// progress, in one transaction. `None` when nothing is queued, or the job waits for the
    /// upgrade (see the invariants). Not durable until [`Store::flush`].
    pub fn backfill_step(
        &self,
        mapping: &Mapping,
        max_profiles: usize,
        now: DateTime<Utc>,
    ) -> Result<Option<BackfillProgress>, StoreError> {
        // One set of handles for the reads and the write: a cursor read from handles that a
        // reopen (`Store::recover`) replaced must not be written to the new ones.
        let trees = self.trees()?;
        let mut state = self.with_trees(&trees, read_state)?;
        let Some(mut job) = state.jobs.first().cloned() else {
            return Ok(None);
        };
        if trees.upgrade_unfinished {
            tracing::warn!(
                "the backfill waits until the upgrade of the stored profiles has finished (at the next start)"
            );
            return Ok(None);
        }
        let still_mapped = job.segments.iter().any(|s| mapping.segments.contains(s));
        let group_key = |name: Option<&str>, what: &str| match name.map(group_from_name) {
            None => Ok(None),
            Some(Some(key)) => Ok(Some(key)),
            Some(None) => Err(StoreError::corrupt(
                "the backfill state",
                format!("{what} is not hex"),
            )),
        };
        let after = group_key(job.after_group.as_deref(), "after_group")?;
        let until = group_key(job.until_group.as_deref(), "until_group")?;
        let (groups, done) = if still_mapped {
            self.with_trees(&trees, |t| {
                Ok(groups_after(
                    &t.profile_groups,
                    after.as_deref(),
                    until.as_deref(),
                    max_profiles,
                )?)
            })?
        } else {
            (Vec::new(), true)
        };
        // The marks of the groups this step passes: up to its last group, or to the job's end.
        let through = match groups.last() {
            _ if done => until.clone(),
            Some((last, _)) => Some(last.to_vec()),
            None => after.clone(),
        };
        let passed = if through.is_some() || done {
            self.with_trees(&trees, |t| {
                Ok(marks_between(
                    &t.backfill_exported,
                    after.as_deref(),
                    through.as_deref(),
                )?)
            })?
        } else {
            Vec::new()
        };
        let exported_since: HashMap<&[u8], u64> = passed
            .iter()
            .filter_map(|(key, seq)| Some((key.as_ref(), (*seq)?)))
            .collect();
        let time = format_time(now);
        let created_at_ms = now.timestamp_millis();
        let queued_at_uptime_ms = self.run_clock.uptime_ms();
        let layout = Layout::new(mapping);
        let mut exports = Vec::new();
        let scanned_before = job.after.as_deref();
        for (key, value) in &groups {
            let view = match GroupView::decode(value) {
                Ok(view) => view,
                Err(e) => {
                    let e = unreadable_group(key, e);
                    tracing::warn!("backfill skips an unreadable profile group: {e}");
                    continue;
                }
            };
            for &(id, value) in view.entries() {
                if scanned_before.is_some_and(|before| id <= before) {
                    continue;
                }
                job.scanned += 1;
                // The segments an update's export since has not carried to the destination.
                let mark = exported_since.get([key.as_ref(), id.as_bytes()].concat().as_slice());
                let segments = match mark {
                    None => std::borrow::Cow::Borrowed(&job.segments),
                    Some(&seq) => std::borrow::Cow::Owned(
                        job.segments
                            .iter()
                            .filter(|s| seq < job.counts_from(s))
                            .cloned()
                            .collect(),
                    ),
                };
                if segments.is_empty() {
                    continue;
                }
                match decode_profile(id, value) {
                    Ok(stored) => {
                        if let Some(payload) =
                            backfill_payload(&stored, &segments, mapping, &layout, &time)
                        {
                            exports.push(new_export(
                                id,
                                Reason::Segment,
                                payload,
                                created_at_ms,
                                queued_at_uptime_ms,
                            ));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(profile = %id, "backfill skips an unreadable profile: {e}")
                    }
                }
            }
        }
        job.exported += exports.len() as u64;
        if let Some((last, _)) = groups.last() {
            job.after_group = Some(group_name(last));
        }
        let mut progress = BackfillProgress::of(&job, state.jobs.len() - 1);
        progress.done = done;
        progress.step_exported = exports.len() as u64;
        if done {
            state.jobs.remove(0);
        } else {
            state.jobs[0] = job;
        }
        // Marks another job still needs are kept; once no job is left, none is: the rest are
        // removed after this step, in batches.
        let unmarked: Vec<sled::IVec> = passed
            .into_iter()
            .map(|(key, _)| key)
            .filter(|key| !state.needs_mark(key))
            .collect();
        let value = state.encode();
        let next_seq = self.with_trees(&trees, |t| {
            Ok((&t.outbox, &t.meta, &t.backfill_exported).transaction(
                |(outbox, meta_tx, marks)| {
                    for key in &unmarked {
                        marks.remove(key)?;
                    }
                    let next_seq = append_exports(outbox, meta_tx, &exports)?;
                    meta_tx.insert(meta::BACKFILL, value.as_slice())?;
                    Ok(next_seq)
                },
            )?)
        })?;
        self.written_next.fetch_max(next_seq, Ordering::SeqCst);
        // The step is committed whatever comes of this: what is left goes at the next open.
        if state.jobs.is_empty() {
            if let Err(e) = self.remove_unneeded_marks() {
                tracing::warn!(error = %e, "the backfill is done, but not all of its marks could be removed; the rest go when the store is next opened");
            }
        }
        Ok(Some(progress))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn a_backfill_waits_while_pending_exports_take_half_the_room_dead_letters_leave() {
        let tally = |pending, dead, bytes| Tally {
            pending,
            dead,
            bytes,
        };
        // (tally, max_outbox_bytes, waits)
        let cases = [
            (tally(0, 0, 0), 1_000, false),
            (tally(10, 0, 499), 1_000, false),
            (tally(10, 0, 500), 1_000, true),
            (tally(10, 0, 1_000), 1_000, true),
            // Dead letters take 600 of 1,000: pending exports may take 200.
            (tally(1, 3, 800), 1_000, true),
            (tally(1, 3, 760), 1_000, false),
            // All dead, 90% full: room for the backfill still.
            (tally(0, 9, 900), 1_000, false),
            (tally(0, 9, 1_000), 1_000, true),
            // The smallest outbox: a step at a time while it is empty.
            (tally(0, 0, 0), 1, false),
            (tally(1, 0, 1), 1, true),
            (tally(u64::MAX, u64::MAX, u64::MAX - 1), u64::MAX, true),
        ];
        for (tally, max, waits) in cases {
            assert_eq!(
                waits_for_deliveries(tally, max),
                waits,
                "{tally:?} of {max}"
            );
        }
    }

    /// With no job queued, every mark goes, over more than one batch and a last one short
    /// (how many go at once is not seen from outside; this holds the loop to removing all).
    #[test]
    fn every_unneeded_mark_goes_over_several_batches() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let marks = 2 * MARKS_A_BATCH + 7;
        store
            .with(|t| {
                for n in 0..marks {
                    let key = mark_key(&format!("p-{n}"));
                    t.backfill_exported.insert(key, &1u64.to_be_bytes())?;
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(store.remove_unneeded_marks().unwrap(), marks);
        assert!(store.with(|t| Ok(t.backfill_exported.is_empty())).unwrap());
    }

    #[test]
    fn a_job_expects_its_groups_share_of_the_profiles() {
        let job = |after_group: Option<&str>, until_group: Option<&str>, scanned: u64| {
            let mut job = BackfillJob::new(vec!["s".into()], 1_000, 0, 0);
            job.after_group = after_group.map(str::to_owned);
            job.until_group = until_group.map(str::to_owned);
            job.scanned = scanned;
            job
        };
        // (after_group, until_group, scanned) → expected; 2^18 groups, 1,000 profiles stored.
        let cases: [(Option<&str>, Option<&str>, u64, u64); 6] = [
            (None, None, 0, 1_000),
            (Some("0001ffff"), None, 480, 980),
            (None, Some("0000ffff"), 0, 250),
            (Some("0001ffff"), None, 0, 500),
            (Some("0000ffff"), Some("0001ffff"), 100, 350),
            (Some("0001ffff"), Some("0001ffff"), 230, 230),
        ];
        for (after, until, scanned, expected) in cases {
            assert_eq!(
                job(after, until, scanned).expected_profiles(),
                expected,
                "{after:?}..{until:?} with {scanned} scanned"
            );
        }
        let mut legacy = job(Some("0001ffff"), None, 10);
        legacy.after = Some("p-0042".into());
        assert_eq!(legacy.expected_profiles(), 1_000, "scans ids, not groups");
    }

    #[test]
    fn members_of_a_still_mapped_segment_get_their_payload() {
        let mapping = Mapping::new(&["person.name"], &["old", "new"], &[]);
        let layout = Layout::new(&mapping);
        let record = |profile: Value| {
            ProfileRecord::from_profile(None, profile.as_object().unwrap(), &layout)
        };
        let segments = vec!["new".to_owned(), "gone".to_owned()];
        let member = json!({
            "person": {"name": "Jane"},
            "segmentMembership": {"ups": {
                "new": {"status": "existing"},
                "gone": {"status": "realized"},
                "unmapped": {"status": "realized"}
            }}
        });
        let payload = backfill_payload(&record(member), &segments, &mapping, &layout, "t");
        assert_eq!(
            payload.map(|p| serde_json::from_str::<Value>(&p).unwrap()),
            Some(json!({
                "person": {"name": "Jane"},
                "segmentMembership": {"ups": {"new": {"status": "existing"}}}
            }))
        );
        for not_member in [
            json!({"segmentMembership": {"ups": {"new": {"status": "exited"}}}}),
            json!({"segmentMembership": {"ups": {"old": {"status": "realized"}}}}),
            json!({"segmentMembership": {"ups": {"gone": {"status": "realized"}}}}),
            json!({}),
        ] {
            assert_eq!(
                backfill_payload(
                    &record(not_member.clone()),
                    &segments,
                    &mapping,
                    &layout,
                    "t"
                ),
                None,
                "{not_member}"
            );
        }
    }

    #[test]
    fn newly_mapped_segments_join_the_queued_jobs_and_unmapped_ones_leave_them() {
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let group = |name: &str| Some(name.to_owned());
        let jobs = |state: &BackfillState| {
            state
                .jobs
                .iter()
                .map(|j| {
                    (
                        j.segments.clone(),
                        j.after_group.clone(),
                        j.until_group.clone(),
                    )
                })
                .collect::<Vec<_>>()
        };
        // Nothing queued: one job over every group.
        let state = BackfillState::default().with_new_segments(
            &names(&["a", "b"]),
            names(&["b"]),
            10,
            1,
            100,
        );
        assert_eq!(jobs(&state), [(names(&["b"]), None, None)]);
        // A job not begun takes new segments in: nothing else to cover.
        let state = state.with_new_segments(&names(&["a", "b", "c"]), names(&["c"]), 10, 2, 200);
        assert_eq!(jobs(&state), [(names(&["b", "c"]), None, None)]);
        // Under way: it takes them in for what it has yet to scan, a new job covers the rest.
        let mut state = state;
        state.jobs[0].after_group = group("0500");
        let state =
            state.with_new_segments(&names(&["a", "b", "c", "d"]), names(&["d"]), 10, 3, 300);
        assert_eq!(
            jobs(&state),
            [
                (names(&["b", "c", "d"]), group("0500"), None),
                (names(&["d"]), None, group("0500"))
            ]
        );
        // Both under way: what neither will scan is covered, once.
        let mut state = state;
        state.jobs[0].after_group = group("0900");
        state.jobs[1].after_group = group("0100");
        let state = state.with_new_segments(
            &names(&["a", "b", "c", "d", "e"]),
            names(&["e"]),
            10,
            4,
            400,
        );
        assert_eq!(
            jobs(&state),
            [
                (names(&["b", "c", "d", "e"]), group("0900"), None),
                (names(&["d", "e"]), group("0100"), group("0500")),
                (names(&["e"]), None, group("0100")),
                (names(&["e"]), group("0500"), group("0900")),
            ]
        );
        // Unmapped segments leave every job; a job left with none is dropped.
        let state = state.with_new_segments(&names(&["a", "b", "c"]), vec![], 10, 5, 500);
        assert_eq!(jobs(&state), [(names(&["b", "c"]), group("0900"), None)]);
        // Overlapping jobs (as earlier builds queued them): one is joined, no gap.
        let overlapping = BackfillState {
            jobs: vec![
                BackfillJob {
                    after_group: group("0500"),
                    ..BackfillJob::new(names(&["b"]), 10, 1, 0)
                },
                BackfillJob::new(names(&["c"]), 10, 1, 0),
            ],
        };
        let state_of =
            overlapping.with_new_segments(&names(&["b", "c", "d"]), names(&["d"]), 10, 2, 200);
        assert_eq!(
            jobs(&state_of),
            [
                (names(&["b"]), group("0500"), None),
                (names(&["c", "d"]), None, None)
            ]
        );
        // A job begun before profile groups is not joined: new jobs over every group.
        let mut state = state;
        state.jobs[0].after = Some("p1".into());
        let state =
            state.with_new_segments(&names(&["a", "b", "c", "f"]), names(&["f"]), 10, 6, 600);
        assert_eq!(
            jobs(&state),
            [
                (names(&["b", "c"]), group("0900"), None),
                (names(&["f"]), None, None)
            ]
        );
    }

    #[test]
    fn a_job_counts_exports_from_when_it_was_queued_or_joined_and_knows_what_is_ahead() {
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let state = BackfillState::default().with_new_segments(
            &names(&["a", "b"]),
            names(&["b"]),
            10,
            1,
            100,
        );
        assert_eq!(state.jobs[0].queued_seq, 100);
        let mut state = state;
        state.jobs[0].after_group = Some("00000500".into());
        state.jobs[0].until_group = Some("00000900".into());
        let ahead = |job: &BackfillJob, group: u32| job.has_ahead(&group.to_be_bytes());
        let cases = [
            (0x4ff, false),
            (0x500, false),
            (0x501, true),
            (0x900, true),
            (0x901, false),
        ];
        for (group, expected) in cases {
            assert_eq!(ahead(&state.jobs[0], group), expected, "{group:x}");
        }
        // Joined: the exports before carried none of the new segment, and carried the job's
        // own; the jobs for the groups outside it are new.
        let state = state.with_new_segments(&names(&["a", "b", "c"]), names(&["c"]), 10, 2, 200);
        let counts_from = |segment: &str| -> Vec<u64> {
            state.jobs.iter().map(|j| j.counts_from(segment)).collect()
        };
        assert_eq!(counts_from("b"), [100, 200, 200]);
        assert_eq!(counts_from("c"), [200, 200, 200]);
        // A build that reads only `queued_seq` counts every segment from the join.
        assert!(state.jobs.iter().all(|j| j.queued_seq == 200));
        // No new segment: nothing joins.
        let state = state.with_new_segments(&names(&["a", "b", "c"]), vec![], 10, 3, 300);
        assert_eq!(state.jobs[0].counts_from("b"), 100);
        assert_eq!(state.jobs[0].counts_from("c"), 200);
        // Another join: each segment before keeps its number.
        let state =
            state.with_new_segments(&names(&["a", "b", "c", "d"]), names(&["d"]), 10, 4, 300);
        let first = &state.jobs[0];
        assert_eq!(
            ["b", "c", "d"].map(|s| first.counts_from(s)),
            [100, 200, 300]
        );
        assert_eq!(first.queued_seq, 300);
        // A segment unmapped leaves the job; the others count as they did.
        let state = state.with_new_segments(&names(&["a", "b"]), vec![], 10, 5, 400);
        assert_eq!(state.jobs[0].segments, ["b"]);
        assert_eq!(state.jobs[0].counts_from("b"), 100);
        assert_eq!(state.jobs[0].counted_from.len(), 1);
        // A job of an earlier build counts from 0; a job not begun has every group ahead.
        let earlier: BackfillJob = serde_json::from_value(json!({"segments": ["s"], "after": null,
            "scanned": 0, "exported": 0, "profiles": 1, "queued_ms": 5}))
        .unwrap();
        assert_eq!(earlier.queued_seq, 0);
        assert!(ahead(&earlier, 0) && ahead(&earlier, u32::MAX));
    }

    #[test]
    fn the_state_reads_back_and_bad_bytes_are_named() {
        let state = BackfillState {
            jobs: vec![BackfillJob::new(vec!["s".into()], 3, 7, 9)],
        };
        assert_eq!(BackfillState::decode(&state.encode()).unwrap(), state);
        let error = BackfillState::decode(&[9, b'{']).unwrap_err().to_string();
        assert!(error.contains("backfill state"), "{error}");
        // JSON, but a step could not go on from its position: unreadable too.
        for field in ["after_group", "until_group"] {
            let mut bad = state.clone();
            let name = Some("0q01ff00".to_owned());
            match field {
                "after_group" => bad.jobs[0].after_group = name,
                _ => bad.jobs[0].until_group = name,
            }
            let error = BackfillState::decode(&bad.encode())
                .unwrap_err()
                .to_string();
            assert!(error.contains(&format!("{field} is not hex")), "{error}");
        }
    }
}
