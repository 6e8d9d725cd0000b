//! The tally: how many exports are pending and dead and how many bytes their values take,
//! kept exact by every transaction that changes `outbox` or `dead` (sled counts only by
//! walking a tree); and the stats built on it.
//!
//! `meta/tally`: 24 bytes, big-endian u64s: pending, dead, bytes.

use chrono::{DateTime, Utc};
use sled::transaction::TransactionalTree;

use super::error::{abort, StoreError, TxResult};
use super::export::format_ms;
use super::keys::meta;
use super::{backfill, Store};
use crate::clock;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OutboxStats {
    pub pending: u64,
    pub dead: u64,
    pub oldest_pending_created_at: Option<String>,
    /// Wall-clock age, for people: misleading while the clock is or was wrong.
    pub oldest_pending_age_s: Option<i64>,
    /// The longest any pending export has waited in agent run time (an export put back by
    /// `outbox retry` waits from then, whatever its number): what `delivery.max_age_s` is
    /// compared with.
    pub oldest_pending_waited_s: Option<u64>,
    pub bytes: u64,
    /// Profiles stored; left out by [`Store::outbox_stats`] while the count is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profiles: Option<u64>,
    pub store_id: String,
    /// Bytes the store's sled files take on the disk (left out if they cannot be read): sled
    /// never gives back what removed data took, `outpost compact` does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_disk_bytes: Option<u64>,
    /// The run time of the store (agents' running time, summed over runs).
    pub run_time_s: u64,
    /// Wall-clock jumps noticed on this store.
    pub clock_jumps: u64,
    pub last_clock_jump: Option<ClockJumpReport>,
    /// Whether delivery is paused (`outpost delivery pause`), and since when (wall clock).
    pub delivery_paused: bool,
    pub delivery_paused_since: Option<String>,
    /// The space kept for delivery was given up on a full disk: updates are refused until the
    /// disk has room for it twice over ([`super::reserve`]).
    pub reserve_given_up: bool,
    /// The backfill in progress (members of newly mapped segments being exported).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backfill: Option<backfill::BackfillProgress>,
    /// Rejected stream messages kept, and those not kept past `source.nats.max_rejected`.
    pub rejected: u64,
    pub rejected_not_kept: u64,
    /// The partitions this store handed over or is handing over (`outpost nats hand-over`),
    /// whose profiles it refuses from other inputs than the stream; left out by
    /// [`Store::outbox_stats`], read every second, which has no use for them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handed_over: Option<HandedOver>,
    /// The segments the store's last run mapped, to tell what a changed mapping will do at
    /// the next start; left out before the first run, and by [`Store::outbox_stats`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapped_segments: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HandedOver {
    pub partition_count: u32,
    pub partitions: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ClockJumpReport {
    /// Positive: the clock was set forward.
    pub by_s: i64,
    pub noticed_at: String,
}

pub(super) fn read_u64(tree: &TransactionalTree, key: &[u8]) -> TxResult<u64> {
    match tree.get(key)? {
        None => Ok(0),
        Some(v) => {
            let bytes: [u8; 8] = v.as_ref().try_into().map_err(|_| {
                abort(StoreError::corrupt(
                    String::from_utf8_lossy(key),
                    "not 8 bytes",
                ))
            })?;
            Ok(u64::from_be_bytes(bytes))
        }
    }
}

pub(super) fn write_u64(tree: &TransactionalTree, key: &[u8], value: u64) -> TxResult<()> {
    tree.insert(key, &value.to_be_bytes())?;
    Ok(())
}

/// Adds `changed` to `meta/profiles`. A missing count is unknown until the next open counts the
/// profiles; so is a damaged one, which is removed rather than refuse every commit that adds
/// or removes a profile until a restart.
pub(super) fn add_to_profile_count(meta_tx: &TransactionalTree, changed: i64) -> TxResult<()> {
    if changed == 0 {
        return Ok(());
    }
    match meta_tx.get(meta::PROFILES)? {
        None => {}
        Some(v) => match <[u8; 8]>::try_from(v.as_ref()) {
            Ok(bytes) => {
                let count = u64::from_be_bytes(bytes).saturating_add_signed(changed);
                write_u64(meta_tx, meta::PROFILES, count)?;
            }
            Err(_) => {
                tracing::warn!("the stored count of profiles is damaged: dropped; the next start counts them again");
                meta_tx.remove(meta::PROFILES)?;
            }
        },
    }
    Ok(())
}

/// Counts kept exact by every transaction that touches `outbox` or `dead`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    pub pending: u64,
    pub dead: u64,
    /// Bytes of the stored values of pending and dead exports.
    pub bytes: u64,
}

impl Tally {
    pub(super) fn to_bytes(self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[..8].copy_from_slice(&self.pending.to_be_bytes());
        out[8..16].copy_from_slice(&self.dead.to_be_bytes());
        out[16..].copy_from_slice(&self.bytes.to_be_bytes());
        out
    }

    pub(super) fn from_bytes(bytes: &[u8]) -> Option<Tally> {
        let word = |i: usize| {
            Some(u64::from_be_bytes(
                bytes.get(i * 8..i * 8 + 8)?.try_into().ok()?,
            ))
        };
        if bytes.len() != 24 {
            return None;
        }
        Some(Tally {
            pending: word(0)?,
            dead: word(1)?,
            bytes: word(2)?,
        })
    }

    /// Adds (`sign` 1) or takes away (`sign` -1) one stored value in `place`.
    pub(super) fn count(&mut self, place: Place, value_len: usize, sign: i64) {
        let apply = |n: &mut u64, by: u64| {
            *n = if sign > 0 {
                n.saturating_add(by)
            } else {
                n.saturating_sub(by)
            };
        };
        match place {
            Place::Pending => apply(&mut self.pending, 1),
            Place::Dead => apply(&mut self.dead, 1),
            Place::Gone => return,
        }
        apply(&mut self.bytes, value_len as u64);
    }
}

pub(super) fn read_tally(tree: &TransactionalTree) -> TxResult<Tally> {
    match tree.get(meta::TALLY)? {
        None => Ok(Tally::default()),
        Some(v) => {
            Tally::from_bytes(&v).ok_or_else(|| abort(StoreError::corrupt("tally", "not 24 bytes")))
        }
    }
}

pub(super) fn write_tally(tree: &TransactionalTree, tally: Tally) -> TxResult<()> {
    tree.insert(meta::TALLY, &tally.to_bytes())?;
    Ok(())
}

/// The outbox holds `storage.max_outbox_bytes` or more, pending exports and dead letters
/// together: nothing more is taken in. Dead letters count because they take the disk as
/// pending exports do; but deliveries free only what pending exports take, so the message says
/// when dead letters are there, and what frees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxFull {
    pub tally: Tally,
    pub max_bytes: u64,
}

impl std::fmt::Display for OutboxFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Tally {
            pending,
            dead,
            bytes,
        } = self.tally;
        write!(
            f,
            "the outbox is full: {pending} pending {} and {dead} dead {} take {bytes} bytes, \
             storage.max_outbox_bytes is {}; ",
            plural(pending, "export", "exports"),
            plural(dead, "letter", "letters"),
            self.max_bytes
        )?;
        const FREE_DEAD: &str = "dead letters stay until `outpost outbox retry` puts them back \
                                 or `outpost outbox drop` deletes them";
        match (pending, dead) {
            (_, 0) => f.write_str("nothing more is taken until deliveries make room"),
            (0, _) => write!(f, "{FREE_DEAD}: only that makes room, deliveries cannot"),
            _ => write!(
                f,
                "nothing more is taken until deliveries make room, and {FREE_DEAD}"
            ),
        }
    }
}

fn plural(n: u64, one: &'static str, more: &'static str) -> &'static str {
    if n == 1 {
        one
    } else {
        more
    }
}

/// Where an export goes in [`Store::change_export`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Pending,
    Dead,
    Gone,
}

/// How many pending exports from the head of the outbox are read at most for the longest
/// wait (see [`Store::head_of_outbox`]).
const HEAD_READ_FOR_WAIT: usize = 1_000;

impl Store {
    pub fn stats(&self, now: DateTime<Utc>) -> Result<OutboxStats, StoreError> {
        let mut stats = self.outbox_stats(now)?;
        stats.profiles = Some(self.profile_count()?);
        let handed_over = self.with(super::source::moved_away)?;
        stats.handed_over = handed_over.map(|(partition_count, partitions)| HandedOver {
            partition_count,
            partitions: partitions.into_iter().collect(),
        });
        let records = self.mapping_records()?;
        stats.mapped_segments = (!records.is_empty()).then(|| {
            records
                .into_iter()
                .filter(|(_, record)| record.mapped)
                .map(|(id, _)| id)
                .collect()
        });
        Ok(stats)
    }

    /// The first readable pending export (the oldest made), and the longest any pending
    /// export has waited (what `delivery.max_age_s` is compared with). An export put back by
    /// `outbox retry` keeps its number but waits from its put-back, so the first export is
    /// not always the one that waited longest: the exports are read from the head up to the
    /// first one never put back, whose wait is the longest of all after it (numbers follow
    /// the order exports were made), [`HEAD_READ_FOR_WAIT`] at most. A key that is no export
    /// number (damage `outpost check --store` lists) is passed over rather than fail the
    /// figures.
    fn head_of_outbox(
        &self,
        t: &super::Trees,
        uptime_ms: u64,
    ) -> Result<(Option<super::Export>, Option<u64>), StoreError> {
        let (mut oldest, mut longest) = (None, None::<u64>);
        for item in t.outbox.iter().take(HEAD_READ_FOR_WAIT) {
            let (key, value) = item?;
            let Ok(export) = self.decode_export_for_people(&key, &value, false) else {
                continue;
            };
            if export.record.is_unreadable() {
                continue;
            }
            let waited = clock::waited_ms(uptime_ms, export.record.queued_at_uptime_ms);
            longest = Some(longest.map_or(waited, |l| l.max(waited)));
            let put_back = export.record.queued_at_ms != export.record.created_at_ms;
            oldest.get_or_insert(export);
            if !put_back {
                break;
            }
        }
        Ok((oldest, longest))
    }

    /// [`Store::stats`], cheap enough to read every second (`outpost top`, `GET /metrics`):
    /// without the number of profiles while it is unknown, rather than count them.
    pub fn outbox_stats(&self, now: DateTime<Utc>) -> Result<OutboxStats, StoreError> {
        let uptime_ms = self.run_clock.uptime_ms();
        let (oldest, longest_waited_ms) = self.with(|t| self.head_of_outbox(t, uptime_ms))?;
        let tally = self.tally()?;
        let clock = self.clock_record()?;
        let (rejected, rejected_not_kept) = self.rejected_counts()?;
        Ok(OutboxStats {
            pending: tally.pending,
            dead: tally.dead,
            oldest_pending_created_at: oldest.as_ref().map(|e| format_ms(e.record.created_at_ms)),
            oldest_pending_age_s: oldest
                .as_ref()
                .map(|e| (now.timestamp_millis() - e.record.created_at_ms).max(0) / 1000),
            oldest_pending_waited_s: longest_waited_ms.map(|ms| ms / 1000),
            bytes: tally.bytes,
            profiles: self.with(super::profiles::read_profile_count)?,
            store_id: format!("{:08x}", self.store_id),
            store_disk_bytes: super::rebuild::sled_bytes(&self.path)
                .inspect_err(|e| tracing::debug!(error = %e, "reading the store's size on disk"))
                .ok(),
            run_time_s: uptime_ms / 1000,
            clock_jumps: clock.jumps,
            last_clock_jump: clock.last_jump.map(|j| ClockJumpReport {
                by_s: clock::whole_seconds(j.by_ms),
                noticed_at: format_ms(j.noticed_at_ms),
            }),
            delivery_paused: self.delivery_paused(),
            delivery_paused_since: self.delivery_paused_since_ms().map(format_ms),
            reserve_given_up: self.reserve_given_up(),
            backfill: self.backfill_progress()?,
            rejected,
            rejected_not_kept,
            handed_over: None,
            mapped_segments: None,
        })
    }

    /// Whether the outbox (pending and dead) holds `max_bytes` or more: then nothing more is
    /// taken in (`storage.max_outbox_bytes`), and what fills it.
    pub fn outbox_full(&self, max_bytes: u64) -> Result<Option<OutboxFull>, StoreError> {
        let tally = self.tally()?;
        Ok((tally.bytes >= max_bytes).then_some(OutboxFull { tally, max_bytes }))
    }

    /// Pending and dead counts and bytes, read without walking the trees.
    pub fn tally(&self) -> Result<Tally, StoreError> {
        self.with(|t| match t.meta.get(meta::TALLY)? {
            None => Ok(Tally::default()),
            Some(v) => {
                Tally::from_bytes(&v).ok_or_else(|| StoreError::corrupt("tally", "not 24 bytes"))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_outbox_says_what_fills_it_and_what_frees_it() {
        let full = |pending, dead| {
            let tally = Tally {
                pending,
                dead,
                bytes: 2048,
            };
            OutboxFull {
                tally,
                max_bytes: 1024,
            }
            .to_string()
        };
        let prefix = "the outbox is full: ";
        let table: &[(u64, u64, &str)] = &[
            (
                3,
                0,
                "3 pending exports and 0 dead letters take 2048 bytes, storage.max_outbox_bytes is 1024; \
                 nothing more is taken until deliveries make room",
            ),
            (
                0,
                1,
                "0 pending exports and 1 dead letter take 2048 bytes, storage.max_outbox_bytes is 1024; \
                 dead letters stay until `outpost outbox retry` puts them back or `outpost outbox drop` \
                 deletes them: only that makes room, deliveries cannot",
            ),
            (
                1,
                2,
                "1 pending export and 2 dead letters take 2048 bytes, storage.max_outbox_bytes is 1024; \
                 nothing more is taken until deliveries make room, and dead letters stay until \
                 `outpost outbox retry` puts them back or `outpost outbox drop` deletes them",
            ),
        ];
        for &(pending, dead, said) in table {
            assert_eq!(
                full(pending, dead),
                format!("{prefix}{said}"),
                "{pending}, {dead}"
            );
        }
    }
}
