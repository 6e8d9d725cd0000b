//! `outpost publish`: validated updates into the stream, each to its profile's partition, with
//! JetStream's publish acknowledgement and a de-duplication id.

use std::collections::{HashMap, VecDeque};

use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};

use super::config::NatsSource;
use super::nats::{connect, NatsError};
use super::partition::{fnv1a64, partition_of, subject_of};
use crate::profile::Update;

/// One message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub partition: u32,
    pub subject: String,
    pub payload: Vec<u8>,
    /// `Nats-Msg-Id`.
    pub msg_id: String,
}

/// Plans the messages for `updates`, in input order (pure).
///
/// The de-duplication id is derived from the update: the FNV-1a 64 hashes of its id and of its
/// message body, and which occurrence of that same body in this input it is. Publishing the
/// same input again within the stream's duplicate window adds nothing; an input that sends
/// the same update twice on purpose (A, B, A) keeps both.
pub fn plan(updates: &[Update], config: &NatsSource) -> Vec<Planned> {
    let mut planner = Planner::new(config);
    updates.iter().map(|update| planner.plan(update)).collect()
}

/// [`plan`] one update at a time, for inputs too big to hold: it remembers only how often each
/// (id, body) pair came.
pub struct Planner<'a> {
    config: &'a NatsSource,
    seen: HashMap<(u64, u64), u32>,
}

impl<'a> Planner<'a> {
    pub fn new(config: &'a NatsSource) -> Self {
        Planner {
            config,
            seen: HashMap::new(),
        }
    }

    pub fn plan(&mut self, update: &Update) -> Planned {
        let partition = partition_of(&update.id, self.config.partitions);
        let payload = serde_json::to_vec(&update.to_value()).expect("updates serialize");
        let key = (fnv1a64(update.id.as_bytes()), fnv1a64(&payload));
        let occurrence = self.seen.entry(key).or_insert(0);
        *occurrence += 1;
        Planned {
            partition,
            subject: subject_of(&self.config.subject_prefix, partition),
            msg_id: format!("{:016x}{:016x}-{}", key.0, key.1, occurrence),
            payload,
        }
    }
}

/// What a publish did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishReport {
    pub published: u64,
    /// Acknowledged by JetStream as duplicates of messages it already had.
    pub duplicates: u64,
}

/// Publishes in order, with at most `in_flight` messages awaiting their acknowledgement
/// (one connection keeps their order). Stops at the first failure; the report says how far it
/// got, and publishing the same input again completes it (duplicates are dropped by JetStream).
pub async fn publish(
    config: &NatsSource,
    messages: impl IntoIterator<Item = Planned>,
    in_flight: usize,
    progress: impl Fn(u64),
) -> Result<PublishReport, (PublishReport, NatsError)> {
    let client = connect(config, false)
        .await
        .map_err(|e| (PublishReport::default(), e))?;
    let js = jetstream::new(client);
    let mut report = PublishReport::default();
    let mut waiting: VecDeque<PublishAckFuture> = VecDeque::new();
    let settle =
        |ack: Result<jetstream::publish::PublishAck, _>, report: &mut PublishReport| match ack {
            Ok(ack) => {
                report.published += 1;
                report.duplicates += u64::from(ack.duplicate);
                Ok(())
            }
            Err(e) => Err(NatsError(format!("publish not acknowledged: {e}"))),
        };
    for message in messages {
        let publish = PublishMessage::build()
            .payload(message.payload.into())
            .message_id(&message.msg_id);
        let future = js
            .send_publish(message.subject, publish)
            .await
            .map_err(|e| (report, NatsError(format!("publishing: {e}"))))?;
        waiting.push_back(future);
        if waiting.len() >= in_flight.max(1) {
            let ack = waiting.pop_front().expect("not empty").await;
            settle(ack, &mut report).map_err(|e| (report, e))?;
            progress(report.published);
        }
    }
    while let Some(future) = waiting.pop_front() {
        settle(future.await, &mut report).map_err(|e| (report, e))?;
        progress(report.published);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::update::parse_body;

    fn config() -> NatsSource {
        let text = r#"
[destination]
http_endpoint = "http://127.0.0.1:1/p"
[destination.auth]
type = "none"
[mapping]
segments = ["s"]
[source.nats]
servers = ["nats://127.0.0.1:4222"]
subject_prefix = "u"
partitions = 8
"#;
        crate::config::Config::parse(std::path::Path::new("/x/outpost.toml"), text)
            .unwrap()
            .nats
            .unwrap()
    }

    #[test]
    fn messages_go_to_their_partition_with_stable_distinct_ids() {
        let body = br#"{"id":"p-000001","profile":{"a":1}}
{"id":"p-000123","profile":{"a":1}}
{"id":"p-000001","profile":{"a":2}}
{"id":"p-000001","profile":{"a":1}}"#;
        let updates = parse_body(body).unwrap();
        let planned = plan(&updates, &config());
        let subjects: Vec<&str> = planned.iter().map(|p| p.subject.as_str()).collect();
        assert_eq!(subjects, ["u.1", "u.6", "u.1", "u.1"]);
        // A, B, A of one profile: the second A is a message of its own.
        assert_ne!(planned[0].msg_id, planned[3].msg_id);
        assert!(planned[3].msg_id.ends_with("-2"), "{}", planned[3].msg_id);
        let again = plan(&updates, &config());
        assert_eq!(planned, again, "the same input gets the same ids");
        let reparsed = crate::profile::update::update_from_json(&planned[2].payload, 1).unwrap();
        assert_eq!(reparsed, updates[2], "the body is the update");
    }
}
