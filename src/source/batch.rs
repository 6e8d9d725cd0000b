//! What a batch fetched from one partition becomes (pure): the updates to commit, the
//! redeliveries to skip, the messages to reject, and the position to record with them.

use chrono::{DateTime, Utc};

use crate::explain::cut_to;
use crate::profile::update::{update_from_json_with, without_bom, Parsing};
use crate::profile::Update;
use crate::store::source::{RejectedRecord, SourcePosition, MAX_REJECTED_RAW};

use super::partition::partition_of;

/// One message as fetched: its subject, stream sequence and body.
#[derive(Debug, Clone, Copy)]
pub struct Fetched<'a> {
    pub subject: &'a str,
    pub seq: u64,
    pub payload: &'a [u8],
    /// When the stream took the message, by the NATS server's clock.
    pub published: Option<DateTime<Utc>>,
}

/// The most of a rejected message's error that is kept and logged: serde's messages quote
/// the field names a message gave, which may be long.
const MAX_REJECTED_ERROR: usize = 1024;

/// The decision for one batch.
#[derive(Debug, Default)]
pub struct Sorted {
    pub updates: Vec<Update>,
    /// How far the partition is consumed after this batch, with its rejected messages; `None`
    /// when every message was a redelivery of something already in the store.
    pub position: Option<SourcePosition>,
    /// The message the batch stopped before, and why: timestamped too far ahead of the
    /// agent's clock, but not of the time the stream took it. This host's clock may be
    /// behind; the message and those after it wait, unacknowledged, for a later try.
    pub held_back: Option<HeldBack>,
    /// Messages at or below the recorded position (or repeated within the batch).
    pub skipped: u64,
}

/// A message held back for this host's clock (see [`Sorted::held_back`]).
#[derive(Debug)]
pub struct HeldBack {
    /// Its stream sequence.
    pub seq: u64,
    pub reason: String,
    /// When this host's clock lets its timestamp pass (`ingest.max_future_s` before it).
    pub passes_at: DateTime<Utc>,
}

/// Sorts the messages of `partition` of `stream` (its fingerprint) fetched after `recorded`
/// (the position in the store).
///
/// A message is skipped when its sequence is not above every sequence before it: it is
/// already in the store, so it changes nothing and exports nothing. A message that is not a
/// valid update (the same strict parser and `ingest.max_future_s` limit as HTTP ingest), or
/// whose profile belongs to another partition, is rejected; the others of the batch are
/// committed all the same. A timestamp too far ahead of the agent's clock but not of the time
/// the stream took the message holds the batch back from that message on ([`Sorted::held_back`]):
/// rejected, it would be acknowledged and gone, and an edge host whose clock starts days
/// behind would reject every update waiting for it. Too far ahead of both, it is rejected.
pub fn sort_batch(
    partition: u32,
    partitions: u32,
    (stream, recorded): (u64, u64),
    messages: &[Fetched<'_>],
    parsing: &Parsing,
    now_ms: i64,
) -> Sorted {
    let mut sorted = Sorted::default();
    let mut high = recorded;
    let mut rejected = Vec::new();
    for message in messages {
        if message.seq <= high {
            sorted.skipped += 1;
            continue;
        }
        high = message.seq;
        let agent_clock = parsing.limit;
        let mut parsing = *parsing;
        if let (Some(limit), Some(published)) = (&mut parsing.limit, message.published) {
            limit.now = limit.now.max(published);
        }
        // Each message is an input of its own, so a byte-order mark may start it.
        let parsed = update_from_json_with(without_bom(message.payload), message.seq, &parsing)
            .map_err(|e| e.reason)
            .and_then(|update| {
                let home = partition_of(&update.id, partitions);
                if home == partition {
                    Ok(update)
                } else {
                    Err(format!(
                        "profile `{}` belongs to partition {home}, not {partition}: the producer routes with another function or partition count",
                        update.id
                    ))
                }
            });
        let ahead_of_this_host = match (&parsed, agent_clock) {
            (Ok(update), Some(limit)) => update
                .timestamp
                .filter(|&t| limit.check(t).is_err())
                .map(|t| (t, limit.max_future_s, limit.passes_at(t))),
            _ => None,
        };
        if let Some((timestamp, max_future_s, passes_at)) = ahead_of_this_host {
            let format = crate::profile::update::format_time;
            // The same words at each try, so that the log says it once.
            sorted.held_back = Some(HeldBack {
                seq: message.seq,
                reason: format!(
                    "its timestamp {} is more than ingest.max_future_s ({max_future_s}) ahead of this host's clock, though not of the time the stream took it ({}): this host's clock may be behind",
                    format(timestamp),
                    message.published.map(format).unwrap_or_default()
                ),
                passes_at,
            });
            high = message.seq - 1;
            break;
        }
        match parsed {
            Ok(update) => sorted.updates.push(update),
            Err(error) => rejected.push(RejectedRecord {
                partition,
                seq: message.seq,
                subject: message.subject.to_owned(),
                received_at_ms: now_ms,
                raw: message.payload[..message.payload.len().min(MAX_REJECTED_RAW)].to_vec(),
                raw_len: message.payload.len() as u64,
                error: cut_to(error, MAX_REJECTED_ERROR),
            }),
        }
    }
    if high > recorded {
        sorted.position = Some(SourcePosition {
            partition,
            stream,
            seq: high,
            rejected,
        });
    }
    sorted
}

/// Where a batch's deliveries skip one: the consumer numbers every message it delivers
/// (redeliveries too) from 1, so when the one a client expects next is not the one that came,
/// the server sent some that never arrived (a fetch ended before its message came, which the
/// client then drops). Committing past it would skip that message for good: its redelivery is
/// at or below the position. `Some((expected, found))` at the first skip.
pub fn delivery_gap(expected: u64, consumer_seqs: &[u64]) -> Option<(u64, u64)> {
    let mut next = expected;
    for &found in consumer_seqs {
        if found != next {
            return Some((next, found));
        }
        next = found + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::update::FutureLimit;

    const PARTITIONS: u32 = 8;

    /// An update of a profile that lives in partition 1 of 8 (`p-000001`).
    fn good(name: &str) -> String {
        format!(r#"{{"id":"p-000001","profile":{{"name":"{name}"}}}}"#)
    }

    fn run(recorded: u64, messages: &[(u64, &str)]) -> Sorted {
        run_published(recorded, messages, None)
    }

    fn run_published(
        recorded: u64,
        messages: &[(u64, &str)],
        published: Option<DateTime<Utc>>,
    ) -> Sorted {
        let fetched: Vec<Fetched> = messages
            .iter()
            .map(|(seq, body)| Fetched {
                subject: "u.1",
                seq: *seq,
                payload: body.as_bytes(),
                published,
            })
            .collect();
        let limit = FutureLimit {
            now: chrono::DateTime::from_timestamp(1_767_225_600, 0).unwrap(), // 2026-01-01
            max_future_s: 86_400,
        };
        sort_batch(
            1,
            PARTITIONS,
            (5, recorded),
            &fetched,
            &Parsing::within(limit),
            7,
        )
    }

    /// The agent's clock two days behind the stream's: an update timestamped by the stream's
    /// time holds the batch back from it (acknowledged up to the one before); one a day and
    /// more ahead of both clocks is rejected.
    #[test]
    fn an_update_ahead_of_this_hosts_clock_only_waits_and_one_ahead_of_both_is_rejected() {
        let stream_now = chrono::DateTime::from_timestamp(1_767_225_600 + 2 * 86_400, 0);
        let fine = r#"{"id":"p-000001","timestamp":"2026-01-01T00:00:00Z","profile":{}}"#;
        let stream_time = r#"{"id":"p-000001","timestamp":"2026-01-03T00:00:00Z","profile":{}}"#;
        let ahead = r#"{"id":"p-000001","timestamp":"2026-01-04T00:00:01Z","profile":{}}"#;

        let sorted = run_published(0, &[(1, fine), (4, stream_time), (6, fine)], stream_now);
        assert_eq!(sorted.updates.len(), 1);
        assert_eq!(sorted.position.as_ref().map(|p| p.seq), Some(3));
        let held = sorted.held_back.unwrap();
        assert_eq!(held.seq, 4);
        assert!(
            held.reason.contains("this host's clock may be behind"),
            "{held:?}"
        );
        // Once the clock is within ingest.max_future_s (a day) of its timestamp.
        assert_eq!(held.passes_at.to_rfc3339(), "2026-01-02T00:00:00+00:00");

        let sorted = run_published(0, &[(1, ahead), (2, fine)], stream_now);
        assert_eq!(sorted.updates.len(), 1);
        assert!(sorted.held_back.is_none());
        let rejected: Vec<u64> = sorted
            .position
            .unwrap()
            .rejected
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(rejected, [1]);

        // Without the stream's time, the agent's clock alone judges: rejected.
        let sorted = run(0, &[(1, stream_time)]);
        assert!(sorted.held_back.is_none());
        assert_eq!(sorted.position.unwrap().rejected.len(), 1);
    }

    /// A rejected message's error is kept short, however long the field it names: the field
    /// by its ends.
    #[test]
    fn a_rejected_message_keeps_a_short_error() {
        let long_field = format!(
            r#"{{"id":"p-000001","{}":1,"profile":{{}}}}"#,
            "é".repeat(5_000)
        );
        let sorted = run(0, &[(1, &long_field)]);
        let error = &sorted.position.unwrap().rejected[0].error;
        assert!(
            error.len() <= MAX_REJECTED_ERROR + '…'.len_utf8(),
            "{}",
            error.len()
        );
        assert!(
            error.starts_with("unknown field `éé") && error.ends_with("`timestamp`"),
            "{error}"
        );
        assert!(error.len() < 200, "{error}");
    }

    #[test]
    fn a_delivery_the_client_never_saw_is_a_gap() {
        type Case = (u64, &'static [u64], Option<(u64, u64)>);
        let cases: &[Case] = &[
            (1, &[], None),
            (1, &[1, 2, 3], None),
            (4, &[4], None),
            (1, &[2], Some((1, 2))),
            (1, &[1, 3, 4], Some((2, 3))),
            (5, &[5, 6, 6], Some((7, 6))),
        ];
        for &(expected, seqs, gap) in cases {
            assert_eq!(delivery_gap(expected, seqs), gap, "{expected} {seqs:?}");
        }
    }

    #[test]
    fn batches_are_sorted() {
        let (a, b) = (good("a"), good("b"));
        let long = "x".repeat(MAX_REJECTED_RAW + 10);
        let other = r#"{"id":"p-000123","profile":{}}"#; // partition 6 of 8
        let future = r#"{"id":"p-000001","timestamp":"2026-01-03T00:00:00Z","profile":{}}"#;
        let with_bom = format!("\u{feff}{a}");
        // (recorded, messages) -> (updates, skipped, position, rejected seqs)
        type Case<'a> = (u64, Vec<(u64, &'a str)>, usize, u64, Option<u64>, Vec<u64>);
        let table: Vec<Case> = vec![
            (0, vec![(1, &a), (5, &b)], 2, 0, Some(5), vec![]),
            (5, vec![(4, &a), (5, &b)], 0, 2, None, vec![]),
            (4, vec![(4, &a), (6, &b)], 1, 1, Some(6), vec![]),
            (
                0,
                vec![(1, &a), (2, "{bad"), (3, &b)],
                2,
                0,
                Some(3),
                vec![2],
            ),
            (0, vec![(1, "nope"), (2, &long)], 0, 0, Some(2), vec![1, 2]),
            (0, vec![(3, &a), (3, &a), (2, &b)], 1, 2, Some(3), vec![]),
            (0, vec![(9, other)], 0, 0, Some(9), vec![9]),
            (0, vec![(1, &a), (2, future)], 1, 0, Some(2), vec![2]),
            (0, vec![(1, &with_bom)], 1, 0, Some(1), vec![]),
            (0, vec![], 0, 0, None, vec![]),
        ];
        for (i, (recorded, messages, updates, skipped, position, rejected)) in
            table.into_iter().enumerate()
        {
            let sorted = run(recorded, &messages);
            assert_eq!(sorted.updates.len(), updates, "case {i}: updates");
            assert_eq!(sorted.skipped, skipped, "case {i}: skipped");
            assert_eq!(
                sorted.position.as_ref().map(|p| p.seq),
                position,
                "case {i}"
            );
            let seqs: Vec<u64> = sorted
                .position
                .iter()
                .flat_map(|p| p.rejected.iter().map(|r| r.seq))
                .collect();
            assert_eq!(seqs, rejected, "case {i}: rejected");
        }
    }

    #[test]
    fn rejected_messages_keep_subject_reason_and_capped_bytes() {
        let long = format!("{{{}", "x".repeat(MAX_REJECTED_RAW + 10));
        let sorted = run(0, &[(1, r#"{"id":"p-000001","extra":1}"#), (2, &long)]);
        let rejected = &sorted.position.unwrap().rejected;
        assert_eq!(rejected[0].subject, "u.1");
        assert!(rejected[0].error.contains("extra"), "{}", rejected[0].error);
        assert_eq!(rejected[0].received_at_ms, 7);
        assert_eq!(rejected[1].raw.len(), MAX_REJECTED_RAW);
        assert_eq!(rejected[1].raw_len, long.len() as u64);
        assert!(
            rejected[1].error.contains("not valid JSON"),
            "{}",
            rejected[1].error
        );
    }
}
