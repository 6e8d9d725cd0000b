//! Where the agent is in each stream partition, and the messages it could not use.
//!
//! Invariants:
//! - `positions[partition]` is the highest stream sequence of that partition whose update (or
//!   rejection) is in the store, and the stream it counts in; it is written in the same
//!   transaction as those updates, so after a crash it never claims more than the store holds,
//!   nor less;
//! - a position only grows within its stream. Sequences of another stream say nothing about
//!   this one: a stream deleted and made again (or `source.nats.stream` changed) starts at 1,
//!   and consuming it starts over;
//! - but a partition moves between stores ([`super::handover`]): its position is then replaced
//!   by a mark ([`Moved`], 19 bytes, where a position has 8 or 16) that no consumer starts
//!   from, and a take-over writes the position the giving store had;
//! - `rejected[(partition, sequence)]` keeps a message that was not a valid update, with the
//!   reason, written in the same transaction as its partition's position. A stream made again
//!   numbers its messages from 1 again: a different message rejected where one is kept goes
//!   under `(partition, sequence, n)`, the first n = 2, 3, ... that is free, so no kept
//!   message is replaced by another. The same message rejected again (a position set back by
//!   hand) is not kept again if found before that free place (so it may be, after a drop).
//!   Keys of 12 bytes (partition u32 BE, sequence u64 BE) are the first message at their
//!   place, keys of 16 bytes (the same, then n u32 BE, n >= 2) the later ones, so a place's
//!   messages list together. The first key of 16 bytes marks the store format 6
//!   ([`FORMAT_VERSION`]), in the same transaction: a build of format 5 takes them for damage.
//! - `meta/rejected` counts the keys of `rejected`, written in the transactions that add or
//!   remove one (counted at open when missing or unreadable). Once it reaches
//!   `source.nats.max_rejected`, a message rejected is not kept: `meta/rejected_not_kept`
//!   counts it, in the same transaction, and the log has its reason. The rejected messages
//!   thus take a bounded room on the disk, whatever a producer publishes. A build before the
//!   count adds and drops rejected messages without it: an agent that starts with the count
//!   at the limit counts the tree again, beside its work ([`Store::recount_rejected_if_full`]),
//!   so that a count left too high never stops the keeping for good; `check --store` lists a
//!   count that disagrees with the tree, and `repair` counts again. A count is taken while
//!   `meta/rejected` stays as it was, and written only if it still is (a commit or a drop
//!   changes both), so one that lands meanwhile is not missed; a drop and a keep that both
//!   land within one walk leave the value as it was, and may leave the count one off.

use std::collections::BTreeSet;

use bincode::{Decode, Encode};
use sled::transaction::TransactionalTree;
use sled::IVec;

use super::error::{abort, TxResult};
use super::keys::meta;
use super::tally::write_u64;
use super::unreadable::{key_text, UnreadableRecord, UNREADABLE};
use super::Trees;
use super::FORMAT_VERSION;
use super::{Store, StoreError};

/// The format byte of a [`RejectedRecord`] value.
pub const REJECTED_V1: u8 = 1;

/// At most this many bytes of a rejected message are kept.
pub const MAX_REJECTED_RAW: usize = 64 * 1024;

/// What a committed group consumed from one stream partition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SourcePosition {
    pub partition: u32,
    /// The stream it was consumed from: a fingerprint of its name and when it was made
    /// (`nats::stream::made_at`).
    pub stream: u64,
    /// The highest stream sequence consumed: committed, rejected or skipped.
    pub seq: u64,
    pub rejected: Vec<RejectedRecord>,
}

/// What [`Store::set_unreadable_position`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PositionSet {
    Set,
    /// The partition has no position: nothing of it is in the store.
    NoPosition,
    /// The stored position reads (this sequence): left as it is.
    Readable(u64),
    /// The partition was handed over, or is being taken over: left as it is.
    Moved,
}

/// A partition's position in the store, seen from the stream being consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Nothing of this partition is in the store.
    Nothing,
    /// The highest sequence of this stream in the store.
    At(u64),
    /// The same, from a position that does not say which stream it counts in (written before
    /// positions kept one, or by `outpost nats set-position`): the consumer writes it again
    /// with this stream's fingerprint, so that a stream that later goes back is known as
    /// [`Recorded::PastEnd`] rather than taken for another.
    Unmarked(u64),
    /// A position in another stream: it says nothing about this one.
    OtherStream { seq: u64 },
    /// A position that does not say its stream, past this stream's end: taken for another
    /// stream's, as [`Recorded::OtherStream`]. The consumer records that it starts over
    /// (position 0 of this stream), since once the stream grows past it, it would read as
    /// this stream's.
    UnmarkedOther { seq: u64 },
    /// A position of this stream past its last message: the stream went back (restored from
    /// a backup, or its server lost its last writes). What it holds up to `last_seq` was
    /// committed; its messages after that are new, whatever their numbers.
    PastEnd { seq: u64, last_seq: u64 },
}

impl Recorded {
    /// The sequence after which this stream is consumed.
    pub fn seq(self) -> u64 {
        match self {
            Recorded::At(seq) | Recorded::Unmarked(seq) => seq,
            Recorded::PastEnd { last_seq, .. } => last_seq,
            Recorded::Nothing | Recorded::OtherStream { .. } | Recorded::UnmarkedOther { .. } => 0,
        }
    }
}

/// A message from the stream that is not a valid update.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct RejectedRecord {
    pub partition: u32,
    pub seq: u64,
    pub subject: String,
    pub received_at_ms: i64,
    /// The message's first [`MAX_REJECTED_RAW`] bytes.
    pub raw: Vec<u8>,
    /// The message's whole length.
    pub raw_len: u64,
    pub error: String,
}

impl RejectedRecord {
    /// Whether this stands for a stored message that could not be decoded (its bytes in
    /// `raw`, no subject or time).
    pub fn is_unreadable(&self) -> bool {
        self.subject.is_empty() && self.error.starts_with(UNREADABLE)
    }

    /// Whether `other` is the same message (handed again), as far as the store keeps it.
    fn same_message(&self, other: &RejectedRecord) -> bool {
        (&self.subject, &self.raw, self.raw_len) == (&other.subject, &other.raw, other.raw_len)
    }
}

/// Where a rejected message is kept: its partition and stream sequence, and `nth` > 1 for a
/// later message rejected at the same place (from a stream made again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RejectedId {
    pub partition: u32,
    pub seq: u64,
    pub nth: u32,
}

impl RejectedId {
    /// The first message rejected at this place.
    pub fn first(partition: u32, seq: u64) -> RejectedId {
        RejectedId {
            partition,
            seq,
            nth: 1,
        }
    }

    /// Parses `<partition>-<sequence>`, or `<partition>-<sequence>-<n>` for a later one.
    pub fn parse(text: &str) -> Result<RejectedId, String> {
        let bad = || {
            format!(
                "`{text}` is not a rejected message id (like 7-1042, or 7-1042-2 for a later message at the same place)"
            )
        };
        let mut parts = text.split('-');
        let (Some(partition), Some(seq)) = (parts.next(), parts.next()) else {
            return Err(bad());
        };
        let nth = match parts.next() {
            None => 1,
            Some(nth) => number(nth).filter(|&n: &u32| n >= 2).ok_or_else(bad)?,
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(RejectedId {
            partition: number(partition).ok_or_else(bad)?,
            seq: number(seq).ok_or_else(bad)?,
            nth,
        })
    }

    fn key(self) -> Vec<u8> {
        let mut key = Vec::with_capacity(LATER_REJECTED_KEY_LEN);
        key.extend(self.partition.to_be_bytes());
        key.extend(self.seq.to_be_bytes());
        if self.nth > 1 {
            key.extend(self.nth.to_be_bytes());
        }
        key
    }

    /// The id a `rejected` key names, if it names one.
    fn from_key(key: &[u8]) -> Option<RejectedId> {
        let partition = u32::from_be_bytes(key.get(..4)?.try_into().ok()?);
        let seq = u64::from_be_bytes(key.get(4..12)?.try_into().ok()?);
        let nth = match key.len() {
            REJECTED_KEY_LEN => 1,
            LATER_REJECTED_KEY_LEN => {
                Some(u32::from_be_bytes(key[12..].try_into().ok()?)).filter(|&n| n >= 2)?
            }
            _ => return None,
        };
        Some(RejectedId {
            partition,
            seq,
            nth,
        })
    }
}

/// A number written as `Display` writes it: digits only, no leading zero, so that each id has
/// one spelling.
fn number<N: std::str::FromStr + ToString>(text: &str) -> Option<N> {
    let n: N = text.parse().ok()?;
    (n.to_string() == text).then_some(n)
}

impl std::fmt::Display for RejectedId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.partition, self.seq)?;
        if self.nth > 1 {
            write!(f, "-{}", self.nth)?;
        }
        Ok(())
    }
}

/// A rejected message and where it is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub id: RejectedId,
    pub record: RejectedRecord,
}

impl Rejected {
    /// The object `rejected list --json` and `rejected show --json` print. `raw` is text for
    /// people; bytes that are not UTF-8 read there as U+FFFD, so they also come whole as
    /// `raw_base64`.
    pub fn to_json(&self) -> serde_json::Value {
        use base64::Engine;
        let record = &self.record;
        let raw_base64 = std::str::from_utf8(&record.raw)
            .is_err()
            .then(|| base64::engine::general_purpose::STANDARD.encode(&record.raw));
        let mut view = serde_json::json!({
            "id": self.id.to_string(),
            "partition": self.id.partition,
            "seq": self.id.seq,
            "subject": record.subject,
            "received_at": (!record.is_unreadable()).then(|| super::format_ms(record.received_at_ms)),
            "error": record.error,
            "raw": String::from_utf8_lossy(&record.raw),
            "raw_bytes": record.raw_len,
            "raw_truncated": (record.raw.len() as u64) < record.raw_len,
        });
        if let Some(raw_base64) = raw_base64 {
            view["raw_base64"] = raw_base64.into();
        }
        view
    }
}

pub(super) fn position_key(partition: u32) -> [u8; 4] {
    partition.to_be_bytes()
}

fn encode_rejected(record: &RejectedRecord) -> Vec<u8> {
    let mut bytes = vec![REJECTED_V1];
    bincode::encode_into_std_write(record, &mut bytes, bincode::config::standard())
        .expect("writing to a Vec cannot fail");
    bytes
}

/// The id a `rejected` key names, or an error that says it names none.
fn rejected_key_id(key: &[u8]) -> Result<RejectedId, StoreError> {
    RejectedId::from_key(key).ok_or_else(|| StoreError::Corrupt {
        what: "rejected message key".into(),
        detail: format!(
            "{} names no rejected message (a partition and a sequence, and which one at that place); `outpost repair` deletes it",
            key.escape_ascii()
        ),
    })
}

/// A rejected message as stored at `key`. One whose value cannot be decoded is shown by a
/// stand-in that keeps the stored bytes as its `raw` (so `rejected list|show|drop` still work
/// and nothing is lost); a key that names no message is an error that says so.
fn read_rejected(key: &[u8], value: &[u8]) -> Result<Rejected, StoreError> {
    let id = rejected_key_id(key)?;
    let record = decode_rejected(value).unwrap_or_else(|e| RejectedRecord {
        partition: id.partition,
        seq: id.seq,
        subject: String::new(),
        received_at_ms: 0,
        raw: value.to_vec(),
        raw_len: value.len() as u64,
        error: format!("{UNREADABLE}: {e}"),
    });
    Ok(Rejected { id, record })
}

fn decode_rejected(bytes: &[u8]) -> Result<RejectedRecord, StoreError> {
    super::codec::decode(REJECTED_V1, bytes).map_err(|e| StoreError::corrupt("rejected message", e))
}

/// A position value: the sequence (u64 BE), then the stream's fingerprint (u64 BE). Stores
/// before the fingerprint hold the sequence alone (`None`).
pub(super) fn encode_position(seq: u64, stream: u64) -> [u8; 16] {
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&seq.to_be_bytes());
    value[8..].copy_from_slice(&stream.to_be_bytes());
    value
}

/// The first byte of a position value that says the partition moved ([`Moved`]); a
/// position of 8 or 16 bytes never is one, by its length.
const MOVED_TAG: u8 = 0xff;
const MOVED_LEN: usize = 19;

/// Why a partition's position names no place to consume from: it was handed over to another
/// store, or is being taken over from one ([`super::handover`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Moved {
    /// Being handed over: its file is being written, its profiles are all still here.
    Giving,
    /// Handed over: its file is whole, its profiles are forgotten, or being forgotten.
    Given,
    /// Being taken over from a hand-over file.
    Taking,
}

/// A position value marking a moved partition, with where the partition stood: tag, kind
/// (`W`, `H` or `T`), 1 if a position follows, its sequence and stream (u64 BE each).
pub(super) fn encode_moved(moved: Moved, position: Option<(u64, u64)>) -> [u8; MOVED_LEN] {
    let mut value = [0u8; MOVED_LEN];
    value[0] = MOVED_TAG;
    value[1] = match moved {
        Moved::Giving => b'W',
        Moved::Given => b'H',
        Moved::Taking => b'T',
    };
    if let Some((seq, stream)) = position {
        value[2] = 1;
        value[3..11].copy_from_slice(&seq.to_be_bytes());
        value[11..].copy_from_slice(&stream.to_be_bytes());
    }
    value
}

pub(super) fn decode_moved(bytes: &[u8]) -> Option<(Moved, Option<(u64, u64)>)> {
    if bytes.len() != MOVED_LEN || bytes[0] != MOVED_TAG {
        return None;
    }
    let moved = match bytes[1] {
        b'W' => Moved::Giving,
        b'H' => Moved::Given,
        b'T' => Moved::Taking,
        _ => return None,
    };
    let u64_at = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let position = match bytes[2] {
        0 => None,
        1 => Some((u64_at(3), u64_at(11))),
        _ => return None,
    };
    Some((moved, position))
}

/// The partitions this store handed over or is handing over ([`Moved::Giving`],
/// [`Moved::Given`]), and the partition count they are of; `None` when it gave none away, or
/// when an older build marked them without recording the count (`meta/moved_partitions_of`,
/// which the next run of the hand-over records).
pub(super) fn moved_away(t: &Trees) -> Result<Option<(u32, BTreeSet<u32>)>, StoreError> {
    let mut away = BTreeSet::new();
    for item in t.positions.iter() {
        let (key, value) = item?;
        let Ok(partition) = <[u8; 4]>::try_from(key.as_ref()) else {
            continue;
        };
        if let Some((Moved::Giving | Moved::Given, _)) = decode_moved(&value) {
            away.insert(u32::from_be_bytes(partition));
        }
    }
    if away.is_empty() {
        return Ok(None);
    }
    let count = t
        .meta
        .get(meta::MOVED_PARTITIONS_OF)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
        .and_then(|count| u32::try_from(count).ok())
        .filter(|count| *count > 0);
    Ok(count.map(|count| (count, away)))
}

fn moved_error(moved: Moved) -> StoreError {
    StoreError::PartitionMoved(match moved {
        Moved::Given => "the partition was handed over to another store (`outpost nats \
             hand-over`): take it out of `source.nats.owned`, or take it back with `outpost nats \
             take-over` and the other store's hand-over file"
            .into(),
        Moved::Giving => "the partition's hand-over did not finish: run `outpost nats \
             hand-over` again"
            .into(),
        Moved::Taking => "the partition's take-over did not finish: run `outpost nats \
             take-over` again with the same file"
            .into(),
    })
}

/// `Ok` for a position that names a place, of either length.
pub(super) fn decode_position(bytes: &[u8]) -> Result<(u64, Option<u64>), StoreError> {
    if let Some((moved, _)) = decode_moved(bytes) {
        return Err(moved_error(moved));
    }
    let u64_at = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    match bytes.len() {
        8 => Ok((u64_at(0), None)),
        16 => Ok((u64_at(0), Some(u64_at(8)))),
        n => Err(StoreError::Corrupt {
            what: "stream position".into(),
            detail: format!("{n} bytes, not 8 or 16"),
        }),
    }
}

/// How a stored position reads for `stream`, whose last sequence is `last_seq`. A position
/// from before fingerprints counts as this stream's unless it lies beyond the stream's end.
fn recorded_for(value: (u64, Option<u64>), stream: u64, last_seq: u64) -> Recorded {
    match value {
        (seq, Some(fingerprint)) if fingerprint == stream && seq > last_seq => {
            Recorded::PastEnd { seq, last_seq }
        }
        (seq, Some(fingerprint)) if fingerprint == stream => Recorded::At(seq),
        (seq, None) if seq <= last_seq => Recorded::Unmarked(seq),
        (seq, None) => Recorded::UnmarkedOther { seq },
        (seq, Some(_)) => Recorded::OtherStream { seq },
    }
}

/// Writes the positions and rejected messages of a group, inside its transaction; rejected
/// messages past `max_rejected` kept are counted, not kept.
pub(super) fn write(
    positions: &TransactionalTree,
    rejected: &TransactionalTree,
    meta_tx: &TransactionalTree,
    consumed: &[SourcePosition],
    max_rejected: u64,
) -> TxResult<()> {
    let mut kept = None;
    let mut not_kept = 0u64;
    for position in consumed {
        let key = position_key(position.partition);
        let grows = match positions.get(key)? {
            Some(v) => match decode_position(&v).map_err(abort)? {
                (old, Some(stream)) if stream == position.stream => position.seq > old,
                // Another stream's, or from before fingerprints: replaced.
                _ => true,
            },
            None => true,
        };
        if grows {
            positions.insert(&key, &encode_position(position.seq, position.stream))?;
        }
        for record in &position.rejected {
            let Some(id) = id_for(rejected, record)? else {
                continue;
            };
            let count = match kept {
                Some(count) => count,
                None => count_in(meta_tx, meta::REJECTED)?,
            };
            if count >= max_rejected {
                kept = Some(count);
                not_kept += 1;
                continue;
            }
            if id.nth > 1 {
                // A store of an older format is marked with the first key it cannot read.
                meta_tx.insert(meta::FORMAT, &FORMAT_VERSION.to_be_bytes())?;
            }
            rejected.insert(id.key(), encode_rejected(record))?;
            kept = Some(count + 1);
        }
    }
    if let Some(count) = kept {
        write_u64(meta_tx, meta::REJECTED, count)?;
    }
    if not_kept > 0 {
        let before = count_in(meta_tx, meta::REJECTED_NOT_KEPT)?;
        write_u64(
            meta_tx,
            meta::REJECTED_NOT_KEPT,
            before.saturating_add(not_kept),
        )?;
    }
    Ok(())
}

/// Counts the rejected messages into `meta/rejected` if it is missing (a store from a build
/// that kept no count). Not durable until a flush.
pub(super) fn count_rejected_if_unknown(t: &Trees) -> Result<(), StoreError> {
    if t.meta.get(meta::REJECTED)?.is_none() {
        recount(t)?;
    }
    Ok(())
}

/// What `meta/rejected` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CountSaid {
    Missing,
    Count(u64),
    /// Not 8 bytes.
    Unreadable,
}

impl CountSaid {
    fn of(value: Option<&IVec>) -> CountSaid {
        match value.map(|v| <[u8; 8]>::try_from(v.as_ref())) {
            None => CountSaid::Missing,
            Some(Ok(bytes)) => CountSaid::Count(u64::from_be_bytes(bytes)),
            Some(Err(_)) => CountSaid::Unreadable,
        }
    }

    /// The count, or 0 for none that reads (an open counts it again).
    fn or_zero(self) -> u64 {
        match self {
            CountSaid::Count(n) => n,
            CountSaid::Missing | CountSaid::Unreadable => 0,
        }
    }

    /// Whether it holds `counted` (missing holds none).
    pub(super) fn holds(self, counted: u64) -> bool {
        match self {
            CountSaid::Missing => counted == 0,
            CountSaid::Count(n) => n == counted,
            CountSaid::Unreadable => false,
        }
    }

    pub(super) fn text(self) -> String {
        match self {
            CountSaid::Missing => "nothing".into(),
            CountSaid::Count(n) => n.to_string(),
            CountSaid::Unreadable => "something not 8 bytes".into(),
        }
    }
}

/// A count of rejected messages (`meta/rejected` or `meta/rejected_not_kept`) inside a
/// transaction: missing or unreadable counts as 0 (an open counts the first again and starts
/// the second from 0), so that a damaged value never fails the commits that carry them.
fn count_in(meta_tx: &TransactionalTree, key: &[u8]) -> TxResult<u64> {
    Ok(CountSaid::of(meta_tx.get(key)?.as_ref()).or_zero())
}

/// How many times a count is taken again when a commit or a drop changed `meta/rejected`
/// during the walk.
const COUNT_TRIES: usize = 5;

/// `meta/rejected` as stored, and the keys of `rejected`, counted while the value stayed as it
/// was: a commit or a drop that lands during the walk changes both, and the walk is made
/// again (up to [`COUNT_TRIES`] times; then the last stands, and `settled` is false). A drop
/// and a keep within one walk are not seen (the value is as it was). Reads every value with
/// its key (sled's key iterator does).
fn settled_count(t: &Trees) -> Result<Counted, StoreError> {
    let mut tries = 0;
    loop {
        let before = t.meta.get(meta::REJECTED)?;
        let mut counted = 0u64;
        for key in t.rejected.iter().keys() {
            key?;
            counted += 1;
        }
        let after = t.meta.get(meta::REJECTED)?;
        tries += 1;
        let settled = before == after;
        if settled || tries == COUNT_TRIES {
            return Ok(Counted {
                value: after,
                counted,
                settled,
            });
        }
    }
}

/// What [`settled_count`] found.
struct Counted {
    value: Option<IVec>,
    counted: u64,
    /// Whether nothing changed the count during the walk that counted.
    settled: bool,
}

/// What `meta/rejected` says, and the keys the tree holds (see [`settled_count`]; a walk the
/// count kept changing during may report a mismatch, which `repair`'s recount, made with
/// keeps stopped, then judges).
pub(super) fn rejected_count_and_keys(t: &Trees) -> Result<(CountSaid, u64), StoreError> {
    let found = settled_count(t)?;
    Ok((CountSaid::of(found.value.as_ref()), found.counted))
}

/// What [`recount`] did.
enum Recounted {
    AsSaid,
    Changed {
        said: CountSaid,
        counted: u64,
    },
    /// Drops kept changing the count while it was counted: nothing written.
    Disturbed,
}

/// Sets `meta/rejected` to the keys the tree holds if it says otherwise, unless a commit or a
/// drop changed it meanwhile (then counted again, up to [`COUNT_TRIES`] times).
fn recount(t: &Trees) -> Result<Recounted, StoreError> {
    for _ in 0..COUNT_TRIES {
        let Counted {
            value,
            counted,
            settled,
        } = settled_count(t)?;
        // A walk that drops kept disturbing may have counted what is gone since.
        if !settled {
            return Ok(Recounted::Disturbed);
        }
        let said = CountSaid::of(value.as_ref());
        if said.holds(counted) {
            return Ok(Recounted::AsSaid);
        }
        let written = Some(counted.to_be_bytes().to_vec());
        if t.meta
            .compare_and_swap(meta::REJECTED, value, written)?
            .is_ok()
        {
            return Ok(Recounted::Changed { said, counted });
        }
    }
    Ok(Recounted::Disturbed)
}

/// `outpost repair`: the count set to what the tree holds; a line saying so if it changed, or
/// that it could not be counted.
pub(super) fn recount_rejected(t: &Trees) -> Result<Option<String>, StoreError> {
    Ok(match recount(t)? {
        Recounted::AsSaid => None,
        Recounted::Changed { said, counted } => Some(format!(
            "rejected messages counted again: {counted} (meta/rejected said {})",
            said.text()
        )),
        Recounted::Disturbed => Some(
            "rejected messages not counted again: drops kept changing their count while it was counted; run repair again once they are done".into(),
        ),
    })
}

/// Removes a rejected message by its key, and lowers `meta/rejected` with it, in one
/// transaction; whether there was one.
fn remove_rejected(t: &Trees, key: &[u8]) -> Result<bool, StoreError> {
    use sled::Transactional;
    Ok((&t.rejected, &t.meta).transaction(|(rejected, meta_tx)| {
        let removed = rejected.remove(key)?.is_some();
        if removed {
            let count = count_in(meta_tx, meta::REJECTED)?;
            write_u64(meta_tx, meta::REJECTED, count.saturating_sub(1))?;
        }
        Ok(removed)
    })?)
}

/// Where `record` is to be kept: the first id of its place that is free. `None` when an id
/// before that one keeps this same message (handed again): it is kept once, as it was first
/// recorded. A kept message that cannot be read is left as it is.
fn id_for(rejected: &TransactionalTree, record: &RejectedRecord) -> TxResult<Option<RejectedId>> {
    let mut id = RejectedId::first(record.partition, record.seq);
    loop {
        match rejected.get(id.key())? {
            None => return Ok(Some(id)),
            Some(kept) if decode_rejected(&kept).is_ok_and(|kept| kept.same_message(record)) => {
                return Ok(None)
            }
            Some(_) => id.nth += 1,
        }
    }
}

impl Store {
    /// How far `partition` of `stream` (a fingerprint; its last sequence `last_seq`) is in
    /// the store. Refused while the store takes no writes: a failed store may read back a
    /// position whose write never reached the disk, which its reopen forgets, and a consumer
    /// started past it would skip the messages in between.
    pub fn source_position(
        &self,
        partition: u32,
        stream: u64,
        last_seq: u64,
    ) -> Result<Recorded, StoreError> {
        if let Some(refused) = self.refusing_writes() {
            return Err(refused);
        }
        self.with(|t| match t.positions.get(position_key(partition))? {
            Some(v) => Ok(recorded_for(decode_position(&v)?, stream, last_seq)),
            None => Ok(Recorded::Nothing),
        })
    }

    /// Why `partition` is not to be consumed in this store, when it was handed over to
    /// another or its take-over did not finish ([`super::handover`]).
    pub fn partition_moved(&self, partition: u32) -> Result<Option<String>, StoreError> {
        self.with(|t| {
            Ok(t.positions
                .get(position_key(partition))?
                .and_then(|value| decode_moved(&value))
                .map(|(moved, _)| moved_error(moved).to_string()))
        })
    }

    /// Sets the partition's position to `seq` of `stream`, durably, as its consumer starts:
    /// for a stream that went back ([`Recorded::PastEnd`]), whose positions after `seq` are
    /// new messages, so that a position written for them is not taken for one below what was
    /// recorded; for a position that did not say its stream ([`Recorded::Unmarked`]); and to
    /// 0 for one that did not and lies past the stream's end ([`Recorded::UnmarkedOther`]),
    /// so that the decision to start over holds however far the stream has grown at the next
    /// start.
    pub fn mark_source_position(
        &self,
        partition: u32,
        stream: u64,
        seq: u64,
    ) -> Result<(), StoreError> {
        // Within a write section, so that a compaction does not come between the write and
        // its flush.
        let _section = self.write_section()?;
        self.with(|t| {
            t.positions
                .insert(position_key(partition), &encode_position(seq, stream))?;
            Ok(())
        })?;
        self.flush()
    }

    /// Sets `partition`'s position to `seq` where the stored one cannot be read (`outpost nats
    /// set-position`): its partition, stopped until then, starts again with the messages after
    /// `seq`, and takes those up to it as in the store. Written without a stream fingerprint,
    /// as positions from before fingerprints are: one past the stream's end reads as another
    /// stream's, and the partition is then consumed from the stream's start. A readable
    /// position, or none, is left as it is. Durable on return.
    pub fn set_unreadable_position(
        &self,
        partition: u32,
        seq: u64,
    ) -> Result<PositionSet, StoreError> {
        let _section = self.write_section()?;
        let key = position_key(partition);
        let set = self.with(|t| loop {
            let Some(stored) = t.positions.get(key)? else {
                return Ok(PositionSet::NoPosition);
            };
            if let Ok((at, _)) = decode_position(&stored) {
                return Ok(PositionSet::Readable(at));
            }
            if decode_moved(&stored).is_some() {
                return Ok(PositionSet::Moved);
            }
            // Only the unreadable bytes just read are replaced.
            let swapped =
                t.positions
                    .compare_and_swap(key, Some(stored), Some(&seq.to_be_bytes()[..]))?;
            if swapped.is_ok() {
                return Ok(PositionSet::Set);
            }
        })?;
        if set == PositionSet::Set {
            self.flush()?;
        }
        Ok(set)
    }

    /// Every recorded partition position, by partition.
    pub fn source_positions(&self) -> Result<Vec<(u32, u64)>, StoreError> {
        self.with(|t| {
            t.positions
                .iter()
                .map(|item| {
                    let (key, value) = item?;
                    let partition = u32::from_be_bytes(key.as_ref().try_into().map_err(|_| {
                        StoreError::Corrupt {
                            what: "stream position key".into(),
                            detail: format!("{key:?}"),
                        }
                    })?);
                    Ok((partition, decode_position(&value)?.0))
                })
                .collect()
        })
    }

    /// Up to `limit` rejected messages (0: all) by partition and sequence, those after `after`
    /// if given. Keys that name no message are passed over (`outpost check --store` lists them,
    /// `outpost repair` deletes them), so that one damaged key does not hide every message.
    pub fn rejected_list(
        &self,
        limit: usize,
        after: Option<RejectedId>,
    ) -> Result<Vec<Rejected>, StoreError> {
        let limit = if limit == 0 { usize::MAX } else { limit };
        let from = match after {
            Some(after) => std::ops::Bound::Excluded(after.key()),
            None => std::ops::Bound::Unbounded,
        };
        self.with(|t| {
            named(
                t.rejected
                    .range::<Vec<u8>, _>((from, std::ops::Bound::Unbounded)),
            )
            .take(limit)
            .map(|item| {
                let (key, value) = item?;
                read_rejected(&key, &value)
            })
            .collect()
        })
    }

    /// How many rejected messages the store keeps, and how many it did not keep, having
    /// `source.nats.max_rejected` already.
    pub fn rejected_counts(&self) -> Result<(u64, u64), StoreError> {
        self.with(|t| {
            let read = |key| -> Result<u64, StoreError> {
                Ok(CountSaid::of(t.meta.get(key)?.as_ref()).or_zero())
            };
            Ok((read(meta::REJECTED)?, read(meta::REJECTED_NOT_KEPT)?))
        })
    }

    /// Counts the rejected messages again if the count says `max` or more are kept: a build
    /// without the count may have dropped some since it was last right, and a count left too
    /// high would keep none for good. Called as an agent starts, beside its work: it reads
    /// every rejected message.
    pub fn recount_rejected_if_full(&self, max: u64) -> Result<(), StoreError> {
        self.with(|t| {
            match CountSaid::of(t.meta.get(meta::REJECTED)?.as_ref()) {
                CountSaid::Count(n) if n >= max => {}
                _ => return Ok(()),
            }
            if let Recounted::Changed { said, counted } = recount(t)? {
                tracing::warn!(
                    was = %said.text(),
                    counted,
                    "the count of rejected messages kept was wrong (a build without it ran on this store); counted again"
                );
            }
            Ok(())
        })
    }

    /// At most this many rejected messages are kept (`source.nats.max_rejected`); others are
    /// counted.
    pub fn set_max_rejected(&self, max: u64) {
        self.max_rejected
            .store(max, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn rejected_get(&self, id: RejectedId) -> Result<Option<Rejected>, StoreError> {
        self.with(|t| {
            let key = id.key();
            t.rejected
                .get(&key)?
                .map(|v| read_rejected(&key, &v))
                .transpose()
        })
    }

    /// Deletes one rejected message; false if there was none. Not durable until a flush.
    pub fn rejected_drop(&self, id: RejectedId) -> Result<bool, StoreError> {
        self.with(|t| remove_rejected(t, &id.key()))
    }

    /// Ids of up to `limit` rejected messages after `after`, in order (keys that name none are
    /// passed over, as by [`Store::rejected_list`]).
    pub fn rejected_ids(
        &self,
        after: Option<RejectedId>,
        limit: usize,
    ) -> Result<Vec<RejectedId>, StoreError> {
        let from = match after {
            Some(after) => std::ops::Bound::Excluded(after.key()),
            None => std::ops::Bound::Unbounded,
        };
        self.with(|t| {
            named(
                t.rejected
                    .range::<Vec<u8>, _>((from, std::ops::Bound::Unbounded)),
            )
            .take(limit)
            .map(|item| rejected_key_id(&item?.0))
            .collect()
        })
    }

    /// The stream records `outpost check --store` lists: keys of either tree that name
    /// nothing (`outpost repair` deletes those), positions that cannot be read (their
    /// partition does not start) and rejected messages shown by a stand-in.
    pub(super) fn unreadable_stream_records(&self) -> Result<Vec<UnreadableRecord>, StoreError> {
        self.with(|t| {
            let mut found: Vec<UnreadableRecord> = stream_keys_not_ids(t)?
                .iter()
                .map(|&(tree, ref key)| UnreadableRecord {
                    tree,
                    key: key_text(key),
                    error: match tree {
                        "positions" => "the key is not a partition number",
                        _ => "the key names no rejected message",
                    }
                    .into(),
                    action: "delete it (the key names nothing)".into(),
                    repairs: true,
                    partition_waits_for: None,
                })
                .collect();
            for item in t.positions.iter() {
                let (key, value) = item?;
                let Ok(key) = <[u8; POSITION_KEY_LEN]>::try_from(key.as_ref()) else {
                    continue;
                };
                // A moved partition's mark is no damage, but a move left unfinished wants its
                // command run again.
                match decode_moved(&value) {
                    Some((Moved::Given, _)) => continue,
                    Some((moved, _)) => {
                        let (command, waits_for) = match moved {
                            Moved::Taking => ("take-over", "nats take-over"),
                            _ => ("hand-over", "nats hand-over"),
                        };
                        found.push(UnreadableRecord {
                            tree: "positions",
                            key: u32::from_be_bytes(key).to_string(),
                            error: format!("the partition's {command} did not finish"),
                            action: format!(
                                "left as it is: the partition is not consumed until `outpost \
                                 nats {command}` is run again as before, and finishes"
                            ),
                            repairs: false,
                            partition_waits_for: Some(waits_for),
                        });
                        continue;
                    }
                    None => {}
                }
                let Err(e) = decode_position(&value) else {
                    continue;
                };
                found.push(UnreadableRecord {
                    tree: "positions",
                    key: u32::from_be_bytes(key).to_string(),
                    error: e.to_string(),
                    action: "left as it is: its partition does not start while it is unreadable, \
                             since neither the stream's start (messages applied again) nor its \
                             end (messages skipped) is a safe guess; `outpost nats set-position` \
                             sets it"
                        .into(),
                    repairs: false,
                    partition_waits_for: Some("nats set-position"),
                });
            }
            for item in t.rejected.iter() {
                let (key, value) = item?;
                match read_rejected(&key, &value) {
                    Ok(Rejected { id, record }) if record.is_unreadable() => {
                        found.push(UnreadableRecord {
                            tree: "rejected",
                            key: id.to_string(),
                            error: record.error,
                            action: "nothing to do: `rejected list|show` show its stored bytes, \
                                 `rejected drop` deletes it"
                                .into(),
                            repairs: false,
                            partition_waits_for: None,
                        })
                    }
                    // Readable, or a key listed above.
                    Ok(_) | Err(_) => {}
                }
            }
            let (said, counted) = rejected_count_and_keys(t)?;
            if !said.holds(counted) {
                found.push(UnreadableRecord {
                    tree: "meta",
                    key: "rejected".into(),
                    error: format!(
                        "says {}, the tree holds {counted} (a build without the count ran on this store, or the value is damaged)",
                        said.text()
                    ),
                    action: "count them again".into(),
                    repairs: true,
                    partition_waits_for: None,
                });
            }
            Ok(found)
        })
    }
}

/// The `entries` of `rejected` whose keys name a message; a key that names none is passed
/// over with a warning.
fn named(entries: sled::Iter) -> impl Iterator<Item = Result<(IVec, IVec), StoreError>> {
    entries.filter_map(|item| match item {
        Ok((key, _)) if RejectedId::from_key(&key).is_none() => {
            tracing::warn!(
                key = %key_text(&key),
                "a key of the rejected messages names none; passed over (`outpost check --store` lists it, `outpost repair` deletes it)"
            );
            None
        }
        item => Some(item.map_err(StoreError::from)),
    })
}

/// Position keys are a partition number.
const POSITION_KEY_LEN: usize = 4;
/// The key of the first message rejected at a place: a partition number and a sequence.
const REJECTED_KEY_LEN: usize = 12;
/// The key of a later one: the same, then which one it is.
const LATER_REJECTED_KEY_LEN: usize = 16;

/// The keys of `positions` and `rejected` that name nothing, by tree. Reads keys only.
pub(super) fn stream_keys_not_ids(t: &Trees) -> Result<Vec<(&'static str, IVec)>, StoreError> {
    let mut found = Vec::new();
    for key in t.positions.iter().keys() {
        let key = key?;
        if key.len() != POSITION_KEY_LEN {
            found.push(("positions", key));
        }
    }
    for key in t.rejected.iter().keys() {
        let key = key?;
        if RejectedId::from_key(&key).is_none() {
            found.push(("rejected", key));
        }
    }
    Ok(found)
}

/// Deletes `keys` (from [`stream_keys_not_ids`]); what it deleted, one line each. Not durable
/// until a flush.
pub(super) fn delete_stream_keys(
    t: &Trees,
    keys: &[(&'static str, IVec)],
) -> Result<Vec<String>, StoreError> {
    let mut done = Vec::new();
    for (name, key) in keys {
        let removed = if *name == "positions" {
            t.positions.remove(key)?.is_some()
        } else {
            remove_rejected(t, key)?
        };
        if removed {
            done.push(format!(
                "{name} entry with key {}: deleted (the key names nothing)",
                key_text(key)
            ));
        }
    }
    Ok(done)
}

/// Commits messages `seqs` of `partition` in `stream` as rejected (not valid JSON), the
/// partition's position moved to the last.
#[cfg(test)]
pub(crate) fn commit_rejected(
    store: &Store,
    mapping: &crate::config::Mapping,
    (partition, stream): (u32, u64),
    seqs: std::ops::RangeInclusive<u64>,
) {
    let rejected = seqs
        .clone()
        .map(|seq| RejectedRecord {
            partition,
            seq,
            subject: format!("u.{partition}"),
            received_at_ms: 1,
            raw: b"{".to_vec(),
            raw_len: 1,
            error: "not valid JSON".into(),
        })
        .collect();
    let position = SourcePosition {
        partition,
        stream,
        seq: *seqs.end(),
        rejected,
    };
    store
        .apply_each(&[&[]], mapping, chrono::Utc::now(), &[(0, position)])
        .unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejected_ids_round_trip_and_bad_ones_are_named() {
        let first = RejectedId::first(7, 1042);
        let later = RejectedId { nth: 3, ..first };
        for id in [first, later] {
            assert_eq!(RejectedId::parse(&id.to_string()), Ok(id));
            assert_eq!(RejectedId::from_key(&id.key()), Some(id));
        }
        assert_eq!(first.to_string(), "7-1042");
        assert_eq!(later.to_string(), "7-1042-3");
        assert_eq!(first.key().len(), REJECTED_KEY_LEN);
        assert_eq!(later.key().len(), LATER_REJECTED_KEY_LEN);
        // The first of a place lists before the later ones, and they before the next place.
        let next = RejectedId::first(7, 1043);
        assert!(first.key() < later.key() && later.key() < next.key());
        assert!(RejectedId::parse("7").unwrap_err().contains("`7`"));
        for bad in [
            "a-1",
            "7-1042-1",
            "7-1042-0",
            "7-1042-2-2",
            "7-1042-",
            "+7-1042",
            "7-01042",
            "7-1042-+2",
            "7-1042-02",
        ] {
            assert!(RejectedId::parse(bad).is_err(), "{bad}");
        }
        // A 16-byte key that would repeat the first of its place names nothing.
        let mut one = first.key();
        one.extend(1u32.to_be_bytes());
        assert_eq!(RejectedId::from_key(&one), None);
        assert_eq!(RejectedId::from_key(&first.key()[..11]), None);
    }

    #[test]
    fn raw_bytes_that_are_not_utf8_also_come_whole_in_base64() {
        let record = |raw: &[u8]| Rejected {
            id: RejectedId::first(1, 2),
            record: RejectedRecord {
                partition: 1,
                seq: 2,
                subject: "profiles.1".into(),
                received_at_ms: 0,
                raw: raw.to_vec(),
                raw_len: raw.len() as u64,
                error: "line 1: not JSON".into(),
            },
        };
        let text = record(b"{\"id\":1}").to_json();
        assert_eq!(text["raw"], "{\"id\":1}");
        assert!(text.get("raw_base64").is_none(), "{text}");
        let bytes = record(&[b'{', 0xff, 0xfe, b'}']).to_json();
        assert_eq!(bytes["raw"], "{\u{fffd}\u{fffd}}");
        assert_eq!(bytes["raw_base64"], "e//+fQ==");
    }

    /// A position written by a commit whose flush failed is not read back: the reopen forgets
    /// it, and a consumer started past it would skip that commit's messages.
    #[test]
    fn a_failed_store_reads_no_position_until_reopened() {
        use crate::config::Mapping;
        use crate::profile::update::parse_body;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let mapping = Mapping::new(&["name"], &["s"], &[]);
        let updates = parse_body(br#"{"id":"a","profile":{"name":"x"}}"#).unwrap();
        let at = SourcePosition {
            partition: 3,
            stream: 77,
            seq: 10,
            rejected: Vec::new(),
        };
        store
            .apply_each(&[&updates], &mapping, chrono::Utc::now(), &[(0, at)])
            .unwrap();
        // As if the flush of that commit had failed in `sync_data`.
        super::super::testing::fail_as_after_eio(&store);
        assert!(store.source_position(3, 77, 10).is_err());
        assert!(store.recover().unwrap());
        assert!(store.source_position(3, 77, 10).is_ok());
    }

    /// The position and rejected messages are written with the updates, and a position never
    /// goes back.
    #[test]
    fn positions_are_committed_with_their_updates() {
        use crate::config::Mapping;
        use crate::profile::update::parse_body;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let mapping = Mapping::new(&["name"], &["s"], &[]);
        let updates = parse_body(br#"{"id":"a","profile":{"name":"x"}}"#).unwrap();
        let rejected = RejectedRecord {
            partition: 3,
            seq: 9,
            subject: "u.3".into(),
            received_at_ms: 1,
            raw: b"{".to_vec(),
            raw_len: 1,
            error: "not valid JSON".into(),
        };
        let at = |seq, rejected: Vec<RejectedRecord>| SourcePosition {
            partition: 3,
            stream: 77,
            seq,
            rejected,
        };
        let now = chrono::Utc::now();
        store
            .apply_each(
                &[&updates],
                &mapping,
                now,
                &[(0, at(10, vec![rejected.clone()]))],
            )
            .unwrap();
        assert_eq!(store.source_position(3, 77, 10).unwrap(), Recorded::At(10));
        assert_eq!(store.source_position(4, 77, 10).unwrap(), Recorded::Nothing);
        assert!(store.profile("a").unwrap().is_some());
        let id = RejectedId::first(3, 9);
        let kept = store.rejected_get(id).unwrap().unwrap();
        assert_eq!((kept.id, kept.record), (id, rejected));
        store
            .apply_each(&[&[]], &mapping, now, &[(0, at(7, vec![]))])
            .unwrap();
        assert_eq!(store.source_positions().unwrap(), [(3, 10)]);

        // Another stream (made again, or another name): its sequences start over.
        assert_eq!(
            store.source_position(3, 78, 100).unwrap(),
            Recorded::OtherStream { seq: 10 }
        );
        let other = SourcePosition {
            stream: 78,
            ..at(2, vec![])
        };
        store
            .apply_each(&[&[]], &mapping, now, &[(0, other)])
            .unwrap();
        assert_eq!(store.source_position(3, 78, 100).unwrap(), Recorded::At(2));
        assert_eq!(
            store.source_position(3, 77, 100).unwrap(),
            Recorded::OtherStream { seq: 2 }
        );
        assert!(store.rejected_drop(id).unwrap());
        assert!(!store.rejected_drop(id).unwrap());
        assert_eq!(store.rejected_counts().unwrap(), (0, 0));

        // The stream went back (restored from a backup): consumed from its end, and the
        // position set back there, so that what comes next is recorded.
        let recorded = store.source_position(3, 78, 1).unwrap();
        assert_eq!(
            recorded,
            Recorded::PastEnd {
                seq: 2,
                last_seq: 1
            }
        );
        assert_eq!(recorded.seq(), 1);
        store.mark_source_position(3, 78, 1).unwrap();
        assert_eq!(store.source_position(3, 78, 1).unwrap(), Recorded::At(1));
        let next = SourcePosition {
            stream: 78,
            ..at(2, vec![])
        };
        store
            .apply_each(&[&[]], &mapping, now, &[(0, next)])
            .unwrap();
        assert_eq!(store.source_position(3, 78, 2).unwrap(), Recorded::At(2));
    }

    /// At most `max_rejected` rejected messages are kept; past it they are counted. A drop
    /// makes room again, and a store that kept no count is counted at open.
    #[test]
    fn rejected_messages_past_the_limit_are_counted_not_kept() {
        use crate::config::Mapping;
        let dir = tempfile::tempdir().unwrap();
        let mapping = Mapping::new(&["name"], &["s"], &[]);
        let commit = |store: &Store, seqs| commit_rejected(store, &mapping, (1, 7), seqs);
        let kept_seqs = |store: &Store| -> Vec<u64> {
            let list = store.rejected_list(0, None).unwrap();
            list.iter().map(|r| r.id.seq).collect()
        };
        {
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            store.set_max_rejected(3);
            commit(&store, 1..=2);
            commit(&store, 3..=5);
            assert_eq!(kept_seqs(&store), [1, 2, 3]);
            assert_eq!(store.rejected_counts().unwrap(), (3, 2));
            assert!(store.rejected_drop(RejectedId::first(1, 2)).unwrap());
            assert_eq!(store.rejected_counts().unwrap(), (2, 2));
            commit(&store, 6..=7);
            assert_eq!(kept_seqs(&store), [1, 3, 6]);
            assert_eq!(store.rejected_counts().unwrap(), (3, 3));
            // As a build that kept no count left it.
            store.with(|t| Ok(t.meta.remove(meta::REJECTED)?)).unwrap();
            store.flush().unwrap();
        }
        {
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            assert_eq!(store.rejected_counts().unwrap(), (3, 3));
            // No limit until the agent sets one.
            commit(&store, 8..=8);
            assert_eq!(store.rejected_counts().unwrap(), (4, 3));
            // Dropped as a build without the count drops them: it stays at 4.
            store
                .with(|t| {
                    for seq in [1, 3, 6] {
                        t.rejected.remove(RejectedId::first(1, seq).key())?;
                    }
                    Ok(())
                })
                .unwrap();
            store.flush().unwrap();
        }
        {
            // Found at the limit as an agent starts, counted again: one is kept, and room is
            // left.
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            store.set_max_rejected(3);
            store.recount_rejected_if_full(3).unwrap();
            commit(&store, 9..=9);
            assert_eq!(kept_seqs(&store), [8, 9]);
            assert_eq!(store.rejected_counts().unwrap(), (2, 3));
            // Damaged, it is counted again at the next open.
            store
                .with(|t| Ok(t.meta.insert(meta::REJECTED, &[1u8, 2, 3])?))
                .unwrap();
            store.flush().unwrap();
        }
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(store.rejected_counts().unwrap(), (2, 3));
        assert_eq!(store.verify().unwrap(), Vec::<String>::new());
        // Wrong but readable (a build without the count ran): `check --store` says so, and
        // `repair` counts them again.
        store
            .with(|t| Ok(t.meta.insert(meta::REJECTED, &7u64.to_be_bytes())?))
            .unwrap();
        let problems = store.verify().unwrap();
        assert_eq!(problems, ["meta/rejected says 7, the tree holds 2"]);
        // Beside the note of the damaged value counted again at open.
        let listed = store.unreadable().unwrap();
        let to_repair: Vec<_> = listed.iter().filter(|r| r.repairs).collect();
        assert_eq!(to_repair.len(), 1, "{listed:?}");
        assert_eq!(
            (to_repair[0].tree, to_repair[0].key.as_str()),
            ("meta", "rejected")
        );
        assert!(to_repair[0].error.contains("says 7, the tree holds 2"));
        let done = store.repair_unreadable().unwrap();
        assert_eq!(
            done,
            ["rejected messages counted again: 2 (meta/rejected said 7)"]
        );
        assert_eq!(store.verify().unwrap(), Vec::<String>::new());
        assert_eq!(store.rejected_counts().unwrap(), (2, 3));
        // A damaged count of those not kept fails no commit either: it counts from 0 again.
        store.set_max_rejected(2);
        store
            .with(|t| Ok(t.meta.insert(meta::REJECTED_NOT_KEPT, &[9u8])?))
            .unwrap();
        commit(&store, 10..=10);
        assert_eq!(kept_seqs(&store), [8, 9]);
        assert_eq!(store.rejected_counts().unwrap(), (2, 1));
    }

    /// A stream made again numbers its messages from 1 again: a message rejected where another
    /// is kept is kept beside it, and the same message rejected again is kept once.
    #[test]
    fn a_message_rejected_where_another_is_kept_replaces_nothing() {
        use crate::config::Mapping;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let mapping = Mapping::new(&["name"], &["s"], &[]);
        let message = |seq, raw: &str| RejectedRecord {
            partition: 3,
            seq,
            subject: "u.3".into(),
            received_at_ms: 1,
            raw: raw.as_bytes().to_vec(),
            raw_len: raw.len() as u64,
            error: "not valid JSON".into(),
        };
        let commit = |stream, seq, rejected: Vec<RejectedRecord>| {
            let position = SourcePosition {
                partition: 3,
                stream,
                seq,
                rejected,
            };
            store
                .apply_each(&[&[]], &mapping, chrono::Utc::now(), &[(0, position)])
                .unwrap();
        };
        // A store of format 5 keeps it until it keeps a second message at one place.
        let format = || {
            let bytes = store
                .with(|t| Ok(t.meta.get(meta::FORMAT)?))
                .unwrap()
                .unwrap();
            u64::from_be_bytes(bytes.as_ref().try_into().unwrap())
        };
        store
            .with(|t| Ok(t.meta.insert(meta::FORMAT, &5u64.to_be_bytes())?))
            .unwrap();
        commit(77, 10, vec![message(9, "{old"), message(10, "{old 10")]);
        // Handed again: kept once, as first recorded.
        let again = RejectedRecord {
            received_at_ms: 2,
            ..message(9, "{old")
        };
        commit(77, 10, vec![again]);
        assert_eq!(format(), 5);
        // The stream made again (another fingerprint), its messages rejected at the same places.
        commit(78, 9, vec![message(9, "{new")]);
        assert_eq!(format(), FORMAT_VERSION);
        commit(78, 10, vec![message(10, "{old 10")]);
        // A third stream, and the first message handed again.
        commit(79, 9, vec![message(9, "{newer"), message(9, "{old")]);
        let kept: Vec<(String, String)> = store
            .rejected_list(0, None)
            .unwrap()
            .into_iter()
            .map(|r| (r.id.to_string(), String::from_utf8(r.record.raw).unwrap()))
            .collect();
        let expected = [
            ("3-9", "{old"),
            ("3-9-2", "{new"),
            ("3-9-3", "{newer"),
            ("3-10", "{old 10"),
        ];
        assert_eq!(
            kept,
            expected.map(|(id, raw)| (id.to_owned(), raw.to_owned()))
        );
        // Page by page: the ids after the one given, in id order.
        let page = |limit, after: Option<&str>| -> Vec<String> {
            let after = after.map(|id| RejectedId::parse(id).unwrap());
            let list = store.rejected_list(limit, after).unwrap();
            list.into_iter().map(|r| r.id.to_string()).collect()
        };
        assert_eq!(page(2, None), ["3-9", "3-9-2"]);
        assert_eq!(page(2, Some("3-9-2")), ["3-9-3", "3-10"]);
        assert_eq!(page(2, Some("3-10")), Vec::<String>::new());
        assert_eq!(page(0, Some("3-9")), ["3-9-2", "3-9-3", "3-10"]);
        let first = store
            .rejected_get(RejectedId::first(3, 9))
            .unwrap()
            .unwrap();
        assert_eq!(first.record.received_at_ms, 1);
        let later = RejectedId::parse("3-9-2").unwrap();
        assert_eq!(
            store.rejected_get(later).unwrap().unwrap().record.raw,
            b"{new"
        );
        assert!(store.rejected_drop(later).unwrap());
        assert_eq!(store.rejected_ids(None, usize::MAX).unwrap().len(), 3);
        assert!(store.unreadable_stream_records().unwrap().is_empty());
    }

    #[test]
    fn an_unreadable_position_is_set_and_then_read_like_one_without_a_stream() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        store
            .with(|t| Ok(t.positions.insert(position_key(5), b"abc")?))
            .unwrap();
        assert!(store.source_position(5, 9, 100).is_err());
        assert_eq!(
            store.set_unreadable_position(6, 40).unwrap(),
            PositionSet::NoPosition
        );
        assert_eq!(
            store.set_unreadable_position(5, 40).unwrap(),
            PositionSet::Set
        );
        assert_eq!(
            store.source_position(5, 9, 100).unwrap(),
            Recorded::Unmarked(40)
        );
        assert_eq!(
            store.source_position(5, 9, 39).unwrap(),
            Recorded::UnmarkedOther { seq: 40 }
        );
        assert_eq!(
            store.set_unreadable_position(5, 41).unwrap(),
            PositionSet::Readable(40)
        );
        assert_eq!(store.source_positions().unwrap(), [(5, 40)]);
    }

    /// A position from before fingerprints is the stream's own unless the stream ends before
    /// it; the first position written for the stream, or the consumer's marking it with the
    /// stream, replaces it.
    #[test]
    fn positions_without_a_stream_are_taken_while_the_stream_reaches_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        store
            .with(|t| Ok(t.positions.insert(position_key(5), &40u64.to_be_bytes())?))
            .unwrap();
        assert_eq!(
            store.source_position(5, 9, 40).unwrap(),
            Recorded::Unmarked(40)
        );
        assert_eq!(
            store.source_position(5, 9, 39).unwrap(),
            Recorded::UnmarkedOther { seq: 40 }
        );
        assert_eq!(Recorded::UnmarkedOther { seq: 40 }.seq(), 0);
        assert_eq!(Recorded::OtherStream { seq: 40 }.seq(), 0);
        let mapping = crate::config::Mapping::new(&["name"], &["s"], &[]);
        let position = SourcePosition {
            partition: 5,
            stream: 9,
            seq: 3,
            rejected: vec![],
        };
        store
            .apply_each(&[&[]], &mapping, chrono::Utc::now(), &[(0, position)])
            .unwrap();
        assert_eq!(store.source_position(5, 9, 3).unwrap(), Recorded::At(3));
        // Marked with its stream, a position past the stream's end says the stream went back.
        store
            .with(|t| Ok(t.positions.insert(position_key(5), &40u64.to_be_bytes())?))
            .unwrap();
        store.mark_source_position(5, 9, 40).unwrap();
        assert_eq!(store.source_position(5, 9, 40).unwrap(), Recorded::At(40));
        assert_eq!(
            store.source_position(5, 9, 39).unwrap(),
            Recorded::PastEnd {
                seq: 40,
                last_seq: 39
            }
        );
        let err = decode_position(&[0; 5]).unwrap_err().to_string();
        assert!(err.contains("5 bytes"), "{err}");
    }

    /// Pins the layout of format 1.
    #[test]
    fn rejected_record_v1_bytes() {
        let record = RejectedRecord {
            partition: 2,
            seq: 3,
            subject: "s.2".into(),
            received_at_ms: 5,
            raw: b"x".to_vec(),
            raw_len: 1,
            error: "e".into(),
        };
        let bytes = encode_rejected(&record);
        assert_eq!(
            bytes,
            [1, 2, 3, 3, b's', b'.', b'2', 10, 1, b'x', 1, 1, b'e']
        );
        assert_eq!(decode_rejected(&bytes).unwrap(), record);
        // Bytes past the record: damaged, as any other value with them.
        let longer = [bytes.as_slice(), b"x"].concat();
        let error = decode_rejected(&longer).unwrap_err().to_string();
        assert!(error.contains("1 trailing bytes"), "{error}");
    }
}
