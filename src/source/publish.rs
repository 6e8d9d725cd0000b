//! `outpost publish`: validated updates into the stream, each to its profile's partition, with
//! JetStream's publish acknowledgement and a de-duplication id.

use std::collections::{HashMap, VecDeque};

use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};

use super::config::NatsSource;
use super::nats::{check_partitions, connect, nats_error, NatsError};
use super::partition::{fnv1a64, fnv1a64_extend, partition_of, subject_of, FNV1A64_EMPTY};
use crate::profile::Update;

/// One message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub partition: u32,
    pub subject: String,
    pub payload: Vec<u8>,
    /// `Nats-Msg-Id`.
    pub msg_id: String,
    /// A hash of the update's profile id.
    pub profile: u64,
}

/// Plans the messages for `updates`, in input order, for the publish `nonce` (pure). The
/// input's digest is taken over the updates' message bodies, one a line.
pub fn plan(updates: &[Update], config: &NatsSource, nonce: u64) -> Vec<Planned> {
    let payloads: Vec<Vec<u8>> = updates.iter().map(payload_of).collect();
    let input = payloads.iter().fold(FNV1A64_EMPTY, |hash, payload| {
        fnv1a64_extend(fnv1a64_extend(hash, payload), b"\n")
    });
    let mut planner = Planner::new(config, input, nonce);
    updates
        .iter()
        .zip(payloads)
        .map(|(update, payload)| planner.plan_with(update, payload))
        .collect()
}

/// The message body of an update: its JSON, `op` included.
pub fn payload_of(update: &Update) -> Vec<u8> {
    serde_json::to_vec(&update.to_value()).expect("updates serialize")
}

/// [`plan`] one update at a time, for inputs too big to hold.
///
/// The de-duplication id is a digest of the whole input and the publish's nonce, and the
/// update's place in the input (`<digest>-<n>`). Each publish takes a fresh nonce, so an
/// input published again is published again: identical inputs may be meant (A, then B, then
/// A again for one profile, without timestamps), and JetStream would drop the repeat as a
/// duplicate. The same input with the nonce of a publish that failed halfway (`--resume`)
/// gets the same ids: what went through in order is not sent again, and within the stream's
/// duplicate window JetStream drops what went through of the rest. An update sent twice in one input (A, B, A) is a
/// message of its own each time.
pub struct Planner<'a> {
    config: &'a NatsSource,
    digest: u64,
    planned: u64,
}

/// A nonce for a new publish: the time and the process, so that two publishes do not share
/// one within the duplicate window.
pub fn fresh_nonce() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    fnv1a64_extend(
        fnv1a64(&nanos.to_le_bytes()),
        &std::process::id().to_le_bytes(),
    )
}

impl<'a> Planner<'a> {
    /// `input`: a digest of the whole input (FNV-1a 64 of its bytes); `nonce`: the publish's.
    pub fn new(config: &'a NatsSource, input: u64, nonce: u64) -> Self {
        Planner {
            config,
            digest: fnv1a64_extend(input, &nonce.to_le_bytes()),
            planned: 0,
        }
    }

    pub fn plan(&mut self, update: &Update) -> Planned {
        self.plan_with(update, payload_of(update))
    }

    fn plan_with(&mut self, update: &Update, payload: Vec<u8>) -> Planned {
        let partition = partition_of(&update.id, self.config.partitions);
        self.planned += 1;
        Planned {
            partition,
            subject: subject_of(&self.config.subject_prefix, partition),
            msg_id: format!("{:016x}-{}", self.digest, self.planned),
            payload,
            profile: fnv1a64(update.id.as_bytes()),
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

/// The largest message of an input, found before anything is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Largest {
    pub bytes: usize,
    /// The line where its update ends.
    pub line: u64,
}

/// What the `Nats-Msg-Id` header adds to a message on the wire at most, which the server
/// counts against its `max_payload` too: `NATS/1.0\r\n`, `Nats-Msg-Id: ` and an id of 16 hex
/// digits, `-` and up to 20 digits, `\r\n`, `\r\n`.
const MSG_ID_HEADER_BYTES: usize = 10 + 13 + 16 + 1 + 20 + 2 + 2;

/// Messages sent and not acknowledged yet, oldest first, with how many of each profile.
struct Unacknowledged<F> {
    queue: VecDeque<(F, u64)>,
    per_profile: HashMap<u64, usize>,
}

impl<F> Unacknowledged<F> {
    fn new() -> Self {
        Unacknowledged {
            queue: VecDeque::new(),
            per_profile: HashMap::new(),
        }
    }

    fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether a message of `profile` awaits its acknowledgement.
    fn holds(&self, profile: u64) -> bool {
        self.per_profile.contains_key(&profile)
    }

    fn push(&mut self, ack: F, profile: u64) {
        *self.per_profile.entry(profile).or_default() += 1;
        self.queue.push_back((ack, profile));
    }

    fn pop(&mut self) -> Option<F> {
        let (ack, profile) = self.queue.pop_front()?;
        if let Some(count) = self.per_profile.get_mut(&profile) {
            *count -= 1;
            if *count == 0 {
                self.per_profile.remove(&profile);
            }
        }
        Some(ack)
    }
}

/// Publishes in order, with at most `in_flight` messages awaiting their acknowledgement
/// (one connection keeps their order), and at most one of each profile: should a message
/// fail, no later update of its profile was sent after it, so publishing the same messages
/// again (which JetStream takes as duplicates up to where they stop, see [`Planner`]) sends
/// that profile's updates in their order. Stops at the first failure; the report says how far it got.
/// A `largest` message beyond what the server takes fails before anything is published.
pub async fn publish(
    config: &NatsSource,
    messages: impl IntoIterator<Item = Planned>,
    largest: Option<Largest>,
    in_flight: usize,
    progress: impl Fn(u64),
) -> Result<PublishReport, (PublishReport, NatsError)> {
    let client = connect(config, false)
        .await
        .map_err(|e| (PublishReport::default(), e))?;
    let failed = |e| (PublishReport::default(), e);
    let max_payload = client.server_info().max_payload;
    if let Some(largest) = largest.filter(|l| l.bytes + MSG_ID_HEADER_BYTES > max_payload) {
        return Err(failed(NatsError(format!(
            "line {}: the update is a message of {} bytes and its {MSG_ID_HEADER_BYTES}-byte Nats-Msg-Id header at most, more than the {max_payload} bytes the NATS server takes (its max_payload); nothing was published",
            largest.line, largest.bytes
        ))));
    }
    let js = jetstream::new(client);
    let stream = js.get_stream(&config.stream).await.map_err(|e| {
        failed(nats_error(
            &format!("stream {} (has `outpost nats setup` run?)", config.stream),
            e,
        ))
    })?;
    check_partitions(stream.cached_info(), config).map_err(failed)?;
    let js = &js;
    let send = |message: Planned| async move {
        let publish = PublishMessage::build()
            .payload(message.payload.into())
            .message_id(&message.msg_id);
        let ack: PublishAckFuture = js
            .send_publish(message.subject, publish)
            .await
            .map_err(|e| NatsError(format!("publishing: {e}")))?;
        Ok(async move {
            ack.await
                .map(|ack| ack.duplicate)
                .map_err(|e| NatsError(format!("publish not acknowledged: {e}")))
        })
    };
    send_in_order(messages, in_flight, send, progress).await
}

/// The loop of [`publish`]: `send` sends one message and gives the future of its
/// acknowledgement (whether JetStream took it as a duplicate).
async fn send_in_order<S, Sent, Ack>(
    messages: impl IntoIterator<Item = Planned>,
    in_flight: usize,
    mut send: S,
    progress: impl Fn(u64),
) -> Result<PublishReport, (PublishReport, NatsError)>
where
    S: FnMut(Planned) -> Sent,
    Sent: std::future::Future<Output = Result<Ack, NatsError>>,
    Ack: std::future::Future<Output = Result<bool, NatsError>>,
{
    let mut report = PublishReport::default();
    let mut waiting: Unacknowledged<Ack> = Unacknowledged::new();
    let settle = |duplicate: Result<bool, NatsError>, report: &mut PublishReport| {
        let duplicate = duplicate?;
        report.published += 1;
        report.duplicates += u64::from(duplicate);
        Ok(())
    };
    for message in messages {
        while waiting.len() >= in_flight.max(1) || waiting.holds(message.profile) {
            let ack = waiting.pop().expect("not empty").await;
            settle(ack, &mut report).map_err(|e| (report, e))?;
            progress(report.published);
        }
        let profile = message.profile;
        let ack = send(message).await.map_err(|e| (report, e))?;
        waiting.push(ack, profile);
    }
    while let Some(ack) = waiting.pop() {
        settle(ack.await, &mut report).map_err(|e| (report, e))?;
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

    /// A1, B1, A2 with room for all three in flight: A2 is sent only once A1 is acknowledged,
    /// so that a failed A1 never has A2 stored after it; B1 goes before A1's answer.
    #[tokio::test]
    async fn a_profile_has_one_message_awaiting_its_acknowledgement_at_a_time() {
        use std::sync::{Arc, Mutex};
        let body = br#"{"id":"a","profile":{"v":1}}
{"id":"b","profile":{"v":1}}
{"id":"a","profile":{"v":2}}"#;
        let planned = plan(&parse_body(body).unwrap(), &config(), 1);
        let names = ["A1", "B1", "A2"];
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let mut sent = 0;
        let send = |_message: Planned| {
            let name = names[sent];
            sent += 1;
            let log = Arc::clone(&log);
            log.lock().unwrap().push(format!("send {name}"));
            async move {
                Ok(async move {
                    log.lock().unwrap().push(format!("ack {name}"));
                    Ok(false)
                })
            }
        };
        let report = send_in_order(planned, 10, send, |_| {}).await.unwrap();
        assert_eq!(report.published, 3);
        assert_eq!(
            *log.lock().unwrap(),
            ["send A1", "send B1", "ack A1", "send A2", "ack B1", "ack A2"]
        );
    }

    #[test]
    fn unacknowledged_messages_are_counted_per_profile() {
        let mut waiting = Unacknowledged::new();
        waiting.push("a1", 1);
        waiting.push("b1", 2);
        waiting.push("a2", 1);
        assert!(waiting.holds(1) && waiting.holds(2) && !waiting.holds(3));
        assert_eq!(waiting.pop(), Some("a1"));
        assert!(waiting.holds(1), "a2 is still out");
        assert_eq!(waiting.pop(), Some("b1"));
        assert!(!waiting.holds(2));
        assert_eq!(waiting.pop(), Some("a2"));
        assert!(!waiting.holds(1));
        assert_eq!((waiting.len(), waiting.pop()), (0, None));
    }

    #[test]
    fn messages_go_to_their_partition_with_stable_distinct_ids() {
        let body = br#"{"id":"p-000001","profile":{"a":1}}
{"id":"p-000123","profile":{"a":1}}
{"id":"p-000001","profile":{"a":2}}
{"id":"p-000001","profile":{"a":1}}"#;
        let updates = parse_body(body).unwrap();
        let planned = plan(&updates, &config(), 7);
        let subjects: Vec<&str> = planned.iter().map(|p| p.subject.as_str()).collect();
        assert_eq!(subjects, ["u.1", "u.6", "u.1", "u.1"]);
        // A, B, A of one profile: the second A is a message of its own.
        assert_ne!(planned[0].msg_id, planned[3].msg_id);
        assert!(planned[3].msg_id.ends_with("-4"), "{}", planned[3].msg_id);
        let resumed = plan(&updates, &config(), 7);
        assert_eq!(
            planned, resumed,
            "the same input and nonce get the same ids"
        );
        // The same input published again: new ids, nothing taken for a duplicate.
        let again = plan(&updates, &config(), 8);
        assert!(planned
            .iter()
            .zip(&again)
            .all(|(a, b)| a.msg_id != b.msg_id));
        assert_ne!(fresh_nonce(), fresh_nonce());
        // The same update in another input (published later to set the profile back): new.
        let later = plan(&updates[3..], &config(), 7);
        assert_eq!(later[0].payload, planned[3].payload);
        assert_ne!(later[0].msg_id, planned[0].msg_id);
        assert_ne!(later[0].msg_id, planned[3].msg_id);
        let reparsed = crate::profile::update::update_from_json(&planned[2].payload, 1).unwrap();
        assert_eq!(reparsed, updates[2], "the body is the update");
    }
}
