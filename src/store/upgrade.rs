//! Upgrading a store of format 1, 2 or 3, whose profiles are one to a key in the `profiles`
//! tree (formats 1 and 2 as JSON text, value format byte 1; format 3 as typed records, value
//! format byte 2), to format 4: each profile moves into its group ([`groups`](super::groups))
//! as a typed record, in place, when the store is opened. (Store formats number the whole
//! layout; each value's own format byte numbers its encoding.)
//!
//! `meta/upgrade`: [`UPGRADE_V1`], then what older builds wrote after it (ignored). Present
//! while an upgrade is under way.
//!
//! Invariants:
//! - `meta/format` says 4 and `meta/upgrade` is set in one write, before any profile is
//!   moved: an older outpost refuses the store from then on, so it never meets a layout it
//!   cannot read;
//! - a chunk of profiles leaves `profiles` and enters its groups in one transaction, so a kill
//!   at any instant loses none and stores none twice; the next open goes on with those left;
//! - a profile is never in both places: a move, and an update of a profile read from
//!   `profiles`, remove it there in the same transaction (were it found in both, the group's
//!   would be kept);
//! - a profile whose JSON cannot be read moves as it is: it stays unreadable, as before;
//! - a profile whose group cannot be read stays in `profiles`, refused like the group's own
//!   profiles, until `outpost repair` forgets the group and moves it in; a key that is not
//!   UTF-8 (never a profile id) stays too, and `outpost check --store` lists both;
//! - an error while moving (a full disk) stops the upgrade, not the open: profiles not yet
//!   moved are read where they are, and the next open goes on.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::time::{Duration, Instant};

use sled::Transactional;

use super::codec;
use super::error::{StoreError, TxResult};
use super::groups::{group_key, Change, GroupKey, GroupView};
use super::keys::meta;
use super::Trees;

pub(super) const UPGRADE_V1: u8 = 1;

/// Profiles moved per chunk: each chunk is one transaction and one flush.
const CHUNK_PROFILES: usize = 2_000;

/// The value of `meta/upgrade` before any profile was moved.
pub(super) fn not_started() -> Vec<u8> {
    vec![UPGRADE_V1]
}

/// A profile value as format 4 stores it: typed; JSON that cannot be read stays as it is.
pub(super) fn typed(value: &[u8]) -> Vec<u8> {
    if codec::is_profile_json(value) {
        if let Ok(record) = codec::decode_profile(value) {
            return codec::encode_profile(&record);
        }
    }
    value.to_vec()
}

/// Finishes the upgrade recorded in `meta/upgrade`, if any: moves every profile still in
/// `profiles` into its group, chunk by chunk, logging how far it is.
pub(super) fn finish(t: &Trees) -> Result<(), StoreError> {
    if t.meta.get(meta::UPGRADE)?.is_none() {
        return Ok(());
    }
    let total = t.legacy_profiles.len();
    tracing::info!(
        profiles = total,
        "upgrading the stored profiles to groups of typed records (store format 4); a restart goes on where this stops"
    );
    let started = Instant::now();
    let mut last_line = Instant::now();
    let (mut moved, mut left) = (0u64, 0u64);
    // Past the profiles that stay (see below): the others leave the tree as they move.
    let mut after: Option<sled::IVec> = None;
    loop {
        let from = match &after {
            Some(key) => Bound::Excluded(key.clone()),
            None => Bound::Unbounded,
        };
        let chunk: Vec<(sled::IVec, sled::IVec)> = t
            .legacy_profiles
            .range((from, Bound::Unbounded))
            .take(CHUNK_PROFILES)
            .collect::<Result<_, _>>()?;
        let Some((last, _)) = chunk.last() else { break };
        after = Some(last.clone());
        // Each group's arrivals, ids ascending (the tree's order). A key that is not UTF-8
        // was never a profile id that outpost wrote: it stays, as `outpost check` shows.
        let mut arrivals: BTreeMap<GroupKey, Vec<(&str, Vec<u8>)>> = BTreeMap::new();
        for (key, value) in &chunk {
            if let Ok(id) = std::str::from_utf8(key) {
                arrivals
                    .entry(group_key(id))
                    .or_default()
                    .push((id, typed(value)));
            }
        }
        let arriving = arrivals.values().map(Vec::len).sum::<usize>() as u64;
        let stayed = (&t.legacy_profiles, &t.profile_groups).transaction(
            |(legacy, groups)| -> TxResult<u64> {
                let mut stayed = 0u64;
                for (group, entries) in &arrivals {
                    let stored = groups.get(group)?;
                    let view = match &stored {
                        None => GroupView::default(),
                        Some(bytes) => match GroupView::decode(bytes) {
                            Ok(view) => view,
                            // An unreadable group keeps its bytes; its arrivals stay in
                            // `profiles` until `outpost repair` forgets it.
                            Err(_) => {
                                stayed += entries.len() as u64;
                                continue;
                            }
                        },
                    };
                    let changes: Vec<Change> = entries
                        .iter()
                        .filter(|(id, _)| view.get(id).is_none())
                        .map(|(id, value)| (*id, Some(value.as_slice())))
                        .collect();
                    if let Some(bytes) = view.with_changes(&changes) {
                        groups.insert(group, bytes)?;
                    }
                    for (id, _) in entries {
                        legacy.remove(id.as_bytes())?;
                    }
                }
                Ok(stayed)
            },
        )?;
        t.db.flush()?;
        left += chunk.len() as u64 - arriving + stayed;
        moved += arriving - stayed;
        if last_line.elapsed() >= Duration::from_secs(1) {
            last_line = Instant::now();
            tracing::info!("upgrading profiles: {moved} of {total} moved");
        }
    }
    t.meta.remove(meta::UPGRADE)?;
    t.db.flush()?;
    tracing::info!(
        "upgraded the stored profiles: {moved} rewritten of {total} in {:.1} s{}",
        started.elapsed().as_secs_f64(),
        if left > 0 {
            format!("; {left} left where they were, their key or group unreadable (see `outpost check --store`)")
        } else {
            String::new()
        }
    );
    Ok(())
}
