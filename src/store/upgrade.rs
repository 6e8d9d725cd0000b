//! Upgrading the profiles of a store of format 1 or 2, whose profile values are JSON text
//! (value format byte 1), to typed records (value format byte 2) in place when the store is
//! opened; the store is then of format 3. (Store formats number the whole layout; each value's
//! own format byte numbers its encoding.)
//!
//! `meta/upgrade`: [`UPGRADE_V1`] then the last profile id rewritten (none yet: nothing after
//! the byte). Present while an upgrade is under way.
//!
//! Invariants:
//! - `meta/format` says 3 and `meta/upgrade` is set in one write, before any profile is
//!   rewritten: an older outpost refuses the store from then on, so it never meets a record it
//!   cannot read;
//! - every profile value says its own format, and both are read (`codec::decode_profile`):
//!   a store whose upgrade was cut short by a kill works as it is, and opening it again goes
//!   on from the last chunk recorded; rewriting a profile twice changes nothing;
//! - a profile whose JSON cannot be read is left as it is: it stays unreadable, as before;
//! - an error while rewriting (a full disk) stops the upgrade, not the open: the store works
//!   as it is, and the next open goes on.

use std::time::{Duration, Instant};

use super::codec;
use super::error::StoreError;
use super::keys::meta;
use super::profiles::profiles_after;
use super::Trees;

pub(super) const UPGRADE_V1: u8 = 1;

/// Profiles rewritten per chunk: each chunk is one batch and one flush.
const CHUNK_PROFILES: usize = 10_000;

/// The value of `meta/upgrade` before any profile was rewritten.
pub(super) fn not_started() -> Vec<u8> {
    vec![UPGRADE_V1]
}

/// Finishes the upgrade recorded in `meta/upgrade`, if any: rewrites each profile still
/// stored as JSON, chunk by chunk, logging how far it is.
pub(super) fn finish(t: &Trees) -> Result<(), StoreError> {
    let Some(state) = t.meta.get(meta::UPGRADE)? else {
        return Ok(());
    };
    let mut after = match state.split_first() {
        Some((&UPGRADE_V1, rest)) => (!rest.is_empty()).then(|| rest.to_vec()),
        // An unreadable cursor: start again (rewriting is idempotent).
        _ => None,
    };
    let total = t.profiles.len();
    tracing::info!(
        profiles = total,
        "upgrading the stored profiles to typed records (store format 3); a restart goes on where this stops"
    );
    let started = Instant::now();
    let mut last_line = Instant::now();
    let (mut scanned, mut rewritten, mut unreadable) = (0u64, 0u64, 0u64);
    loop {
        let chunk = profiles_after(&t.profiles, after.as_deref(), CHUNK_PROFILES)?;
        let mut batch = sled::Batch::default();
        for (key, value) in &chunk {
            if codec::is_profile_json(value) {
                match codec::decode_profile(value) {
                    Ok(record) => {
                        batch.insert(key, codec::encode_profile(&record));
                        rewritten += 1;
                    }
                    Err(_) => unreadable += 1,
                }
            }
        }
        scanned += chunk.len() as u64;
        let Some((last, _)) = chunk.last() else { break };
        t.profiles.apply_batch(batch)?;
        let mut cursor = not_started();
        cursor.extend_from_slice(last);
        t.meta.insert(meta::UPGRADE, cursor)?;
        t.db.flush()?;
        after = Some(last.to_vec());
        if last_line.elapsed() >= Duration::from_secs(1) {
            last_line = Instant::now();
            tracing::info!(
                "upgrading profiles: {scanned} of {total} scanned, {rewritten} rewritten"
            );
        }
        if chunk.len() < CHUNK_PROFILES {
            break;
        }
    }
    t.meta.remove(meta::UPGRADE)?;
    t.db.flush()?;
    tracing::info!(
        "upgraded the stored profiles: {rewritten} rewritten of {scanned} in {:.1} s{}",
        started.elapsed().as_secs_f64(),
        if unreadable > 0 {
            format!("; {unreadable} unreadable, left as they were (see `outpost repair`)")
        } else {
            String::new()
        }
    );
    Ok(())
}
