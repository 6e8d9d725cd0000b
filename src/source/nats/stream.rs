//! The stream: making it (`outpost nats setup`), or checking the one there and recording in
//! its description what it lacks; and the checks agents, publishers and `outpost check` make
//! of it. Its description records the partition count it was made for and when it was made,
//! which tells it from one deleted and made again under its name ([`stream_fingerprint`]).

use std::collections::BTreeSet;

use async_nats::jetstream::{self, stream};
use futures_util::StreamExt;

use super::{connect, nats_error, no_such_stream, NatsError};
use crate::source::config::NatsSource;
use crate::source::partition::{is_partition_subject, subject_of};

/// The stream `outpost nats setup` makes: file storage, subjects `<prefix>.*`, and the
/// partition count in its description.
pub fn stream_config(config: &NatsSource) -> stream::Config {
    stream::Config {
        name: config.stream.clone(),
        subjects: vec![format!("{}.*", config.subject_prefix)],
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        description: Some(format!("{}{MADE_AT_PENDING}", description(config, None))),
        ..Default::default()
    }
}

/// What a stream `nats setup` has just made says until it records when it was made: another
/// setup run at the same time that finds it so records it as well (the same time), where it
/// leaves one an earlier build made alone unless asked.
const MADE_AT_PENDING: &str = "; made at pending";

const DESCRIPTION_START: &str = "outpost: partitions = ";

/// A stream's description as `nats setup` writes it: the partition count it was made for
/// (NATS 2.9 has no stream metadata), so that agents and publishers with another count are
/// refused rather than route profiles to partitions nobody consumes; and when it was made
/// ([`made_at`]).
fn description(config: &NatsSource, made_at: Option<i128>) -> String {
    let last = config.partitions - 1;
    let prefix = &config.subject_prefix;
    let text = format!(
        "{DESCRIPTION_START}{}; subjects {prefix}.0 to {prefix}.{last}",
        config.partitions
    );
    match made_at {
        Some(nanos) => with_made_at(&text, nanos),
        None => text,
    }
}

const MADE_AT: &str = "; made at ";

fn with_made_at(description: &str, nanos: i128) -> String {
    format!("{description}{MADE_AT}{nanos} (ns since 1970)")
}

/// When the stream was made (nanoseconds since 1970), as recorded in its description by
/// `nats setup`, if it was.
pub fn recorded_made_at(description: Option<&str>) -> Option<i128> {
    let recorded = description?.strip_prefix(DESCRIPTION_START)?;
    // The last one: `nats setup` adds one after an unreadable one edited by hand.
    let after = &recorded[recorded.rfind(MADE_AT)? + MADE_AT.len()..];
    let digits = after
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(after.len());
    after[..digits].parse().ok()
}

/// When the stream was made, which tells it from one deleted and made again under its name:
/// as its description records it, else as the server says. The server's own time is not
/// enough: nats-server (2.9.10, and later versions by their issues) reports the time it
/// started again as the creation time of a stream edited since its last start, which would
/// make every partition be consumed again from the stream's start.
fn made_at(info: &stream::Info) -> i128 {
    recorded_made_at(info.config.description.as_deref())
        .unwrap_or_else(|| info.created.unix_timestamp_nanos())
}

/// The partition count a stream's description records, if `nats setup` wrote it.
pub fn recorded_partitions(description: Option<&str>) -> Option<u32> {
    description?
        .strip_prefix(DESCRIPTION_START)?
        .split(';')
        .next()?
        .parse()
        .ok()
}

/// Whether NATS subject `pattern` (a stream's, where `*` takes one token and a last `>` the
/// rest) takes `subject`.
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let (mut pattern, mut subject) = (pattern.split('.'), subject.split('.'));
    loop {
        match (pattern.next(), subject.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(token), Some(other)) if token == other => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The first partition whose subject none of the stream's `subjects` takes, if any: its
/// updates would find no stream, and its consumer could not be made.
fn partition_not_taken(subjects: &[String], prefix: &str, partitions: u32) -> Option<u32> {
    // A subject that takes `<prefix>.*` takes every partition's (the prefix holds no
    // wildcard): each partition's consumer checks the stream as it is made, and one subject
    // each for thousands of partitions would be millions at an agent's start.
    let every = format!("{prefix}.*");
    if subjects
        .iter()
        .any(|pattern| subject_matches(pattern, &every))
    {
        return None;
    }
    (0..partitions).find(|&partition| {
        let subject = subject_of(prefix, partition);
        !subjects
            .iter()
            .any(|pattern| subject_matches(pattern, &subject))
    })
}

/// Whether the stream was made for the partition count of `config`, as far as it records one,
/// and keeps its messages until its limits, not only while a consumer wants them: each
/// partition's consumer is made anew at every start, and a stream that drops what no consumer
/// holds (interest or work-queue retention) would lose the updates published or left
/// unacknowledged meanwhile.
pub fn check_partitions(info: &stream::Info, config: &NatsSource) -> Result<(), NatsError> {
    // A stream made by hand may take them otherwise than `<prefix>.*` (`>`, or each listed).
    let subjects = &info.config.subjects;
    if let Some(partition) =
        partition_not_taken(subjects, &config.subject_prefix, config.partitions)
    {
        return Err(NatsError(format!(
            "stream {} takes subjects {subjects:?}, not {} (partition {partition}'s, under \
             source.nats.subject_prefix): nothing published there would find the stream, and \
             its partition could not be consumed; set subject_prefix as the stream was made \
             for, or delete the stream or change source.nats.stream",
            config.stream,
            subject_of(&config.subject_prefix, partition)
        )));
    }
    if info.config.retention != stream::RetentionPolicy::Limits {
        return Err(NatsError(format!(
            "stream {} has {:?} retention; outpost needs limits retention (the default), since it makes its consumers anew at every start and the stream must keep what none holds meanwhile",
            config.stream, info.config.retention
        )));
    }
    match recorded_partitions(info.config.description.as_deref()) {
        Some(made_for) if made_for != config.partitions => Err(NatsError(format!(
            "stream {} was made for {made_for} partitions, not source.nats.partitions = {}: every profile would be routed to another partition; keep the count, or make a new stream for the new one",
            config.stream, config.partitions
        ))),
        _ => Ok(()),
    }
}

/// What of the stream's limits removes messages no one consumed, told in one line: such a
/// stream loses the updates that wait in it past them (while the outbox is full, or no agent
/// consumes their partition), and no agent can tell. Limits on counts with `discard = new`
/// refuse publishes instead, which the publisher hears of.
fn limits_that_drop_updates(config: &stream::Config) -> Option<String> {
    let discards_old = config.discard == stream::DiscardPolicy::Old;
    let mut limits = Vec::new();
    if !config.max_age.is_zero() {
        limits.push(format!(
            "removes messages older than {}",
            crate::top::view::duration(config.max_age.as_secs())
        ));
    }
    if discards_old && config.max_messages > 0 {
        limits.push(format!("keeps the newest {} messages", config.max_messages));
    }
    if discards_old && config.max_bytes > 0 {
        limits.push(format!("keeps the newest {} bytes", config.max_bytes));
    }
    let refuses_per_subject = !discards_old && config.discard_new_per_subject;
    if config.max_messages_per_subject > 0 && !refuses_per_subject {
        limits.push(format!(
            "keeps the newest {} messages of each subject (a partition's)",
            config.max_messages_per_subject
        ));
    }
    (!limits.is_empty()).then(|| {
        format!(
            "stream {} {}: updates that wait in it longer (while the outbox is full, or no agent consumes their partition) are removed unconsumed, and no agent can tell; give it no such limits, or `discard = new` for the counts, which refuses publishes instead",
            config.name,
            limits.join(", ")
        )
    })
}

/// A warning when the stream's description is someone else's: it then records neither the
/// partition count nor when the stream was made ([`made_at`]), which `nats setup` writes only
/// in a description that is empty or outpost's.
fn foreign_description_warning(description: Option<&str>) -> Option<String> {
    let description = description.filter(|d| !d.is_empty())?;
    recorded_partitions(Some(description)).is_none().then(|| {
        format!(
            "the stream's description ({}) is not outpost's, so it records neither the partition count (agents and publishers of another count are not refused) nor when the stream was made (a NATS server restarted after the stream was edited reports another time, which agents take for a new stream, consumed again from its start); clear the description and run `outpost nats setup` to record them",
            description.escape_debug()
        )
    })
}

/// What `check` and the agent at start warn of in the stream's config:
/// [`limits_that_drop_updates`] and [`foreign_description_warning`].
pub fn stream_warnings(config: &stream::Config) -> Vec<String> {
    [
        limits_that_drop_updates(config),
        foreign_description_warning(config.description.as_deref()),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// What `nats setup` found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetupOutcome {
    Created,
    /// The stream was there with the subjects and storage outpost needs.
    Found {
        messages: u64,
        replicas: usize,
        /// It recorded no partition count, and now records this agent's (its messages fit).
        recorded: bool,
        /// Whether its description now records when it was made ([`made_at`]); `None` when
        /// it did already, or is not outpost's.
        made_at_recorded: Option<bool>,
        /// [`stream_warnings`] (`nats setup` leaves a description of someone else's as it is).
        warnings: Vec<String>,
    },
}

/// Creates the stream, or checks the one that is there (idempotent, also when setups on
/// several hosts run at once).
pub async fn setup(config: &NatsSource, record_made_at: bool) -> Result<SetupOutcome, NatsError> {
    let client = connect(config, false).await?;
    let js = jetstream::new(client);
    let looking_up = |e| nats_error(&format!("looking up stream {}", config.stream), e);
    match js.get_stream(&config.stream).await {
        Ok(stream) => found(&js, &stream, config, record_made_at).await,
        Err(e) if no_such_stream(&e) => {
            let made = match js.create_stream(stream_config(config)).await {
                Ok(made) => made,
                // Another setup made it meanwhile and recorded when in its description, which
                // this create's (made at pending) no longer matches.
                Err(e)
                    if matches!(
                        e.kind(),
                        jetstream::context::CreateStreamErrorKind::JetStream(ref j)
                            if j.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST
                    ) =>
                {
                    let stream = js.get_stream(&config.stream).await.map_err(looking_up)?;
                    return found(&js, &stream, config, record_made_at).await;
                }
                Err(e) => return Err(nats_error(&format!("creating stream {}", config.stream), e)),
            };
            let mut described = made.cached_info().config.clone();
            let nanos = made.cached_info().created.unix_timestamp_nanos();
            described.description = Some(description(config, Some(nanos)));
            js.update_stream(described).await.map_err(|e| {
                nats_error(
                    &format!(
                        "stream {} created, but recording when in its description failed (run `outpost nats setup` again)",
                        config.stream
                    ),
                    e,
                )
            })?;
            Ok(SetupOutcome::Created)
        }
        Err(e) => Err(looking_up(e)),
    }
}

/// Checks the stream that is there, and records in its description what it lacks.
async fn found(
    js: &jetstream::Context,
    stream: &stream::Stream,
    config: &NatsSource,
    record_made_at: bool,
) -> Result<SetupOutcome, NatsError> {
    let info = stream.cached_info().clone();
    check_partitions(&info, config)?;
    if info.config.storage != stream::StorageType::File {
        return Err(NatsError(format!(
            "stream {} keeps its messages in memory; outpost needs file storage",
            config.stream
        )));
    }
    let messages = info.state.messages;
    let replicas = info.config.num_replicas;
    let description_now = info.config.description.as_deref().unwrap_or("");
    let recorded = description_now.is_empty();
    // Outpost's description of an earlier build, without the time: the server's time
    // is still the stream's, unless it was edited and the server restarted since.
    // Recorded only when asked, or when the stream is one another setup has just made and
    // not yet recorded: to agents of earlier builds, which know the stream by the server's
    // time, the edit is one after which a restarted server reports another, and they would
    // consume again from the stream's start what was published since.
    let without_made_at = recorded_partitions(Some(description_now)).is_some()
        && recorded_made_at(Some(description_now)).is_none();
    let pending = description_now.contains(MADE_AT_PENDING);
    let made_at_recorded = without_made_at.then_some(record_made_at || pending);
    if recorded {
        // Made by hand or by an earlier build: its messages must fit the count.
        check_subjects_fit(stream, config).await?;
    }
    if recorded || made_at_recorded == Some(true) {
        let nanos = info.created.unix_timestamp_nanos();
        let mut described = info.config.clone();
        described.description = Some(match recorded {
            true => description(config, Some(nanos)),
            false => with_made_at(&description_now.replace(MADE_AT_PENDING, ""), nanos),
        });
        js.update_stream(described)
            .await
            .map_err(|e| nats_error("recording the stream's description", e))?;
    }
    Ok(SetupOutcome::Found {
        messages,
        replicas,
        recorded,
        made_at_recorded,
        warnings: stream_warnings(&info.config),
    })
}

/// Fails when the stream holds messages on a subject beyond the partitions of `config`.
async fn check_subjects_fit(stream: &stream::Stream, config: &NatsSource) -> Result<(), NatsError> {
    // Every subject under the prefix, at any depth: the stream may take more than `<prefix>.*`.
    let mut subjects = stream
        .info_with_subjects(format!("{}.>", config.subject_prefix))
        .await
        .map_err(|e| nats_error("reading the stream's subjects", e))?;
    while let Some(subject) = subjects.next().await {
        let (subject, count) =
            subject.map_err(|e| nats_error("reading the stream's subjects", e))?;
        if !is_partition_subject(&config.subject_prefix, &subject, config.partitions) {
            return Err(NatsError(format!(
                "stream {} holds {count} message(s) on {subject}, which is not one of the {} partitions of source.nats.partitions",
                config.stream, config.partitions
            )));
        }
    }
    Ok(())
}

/// What `outpost check` reads of the stream.
pub struct Probed {
    pub messages: u64,
    pub stray: StraySubjects,
    /// [`stream_warnings`].
    pub warnings: Vec<String>,
    /// The claims on the partitions the config owns, in their order; `None` when no agent has
    /// claimed any partition of the stream yet; `Err` when they cannot be read.
    pub claims: Result<Option<Vec<Option<String>>>, NatsError>,
}

/// For `outpost check`: connects and reads the stream, or says why not.
pub async fn probe(config: &NatsSource) -> Result<Probed, NatsError> {
    let client = connect(config, false).await?;
    let js = jetstream::new(client);
    let mut stream = js.get_stream(&config.stream).await.map_err(|e| {
        nats_error(
            &format!("stream {} (has `outpost nats setup` run?)", config.stream),
            e,
        )
    })?;
    let info = stream
        .info()
        .await
        .map_err(|e| nats_error("reading the stream", e))?;
    check_partitions(info, config)?;
    let messages = info.state.messages;
    let warnings = stream_warnings(&info.config);
    Ok(Probed {
        messages,
        warnings,
        stray: stray_subjects(&stream, config).await?,
        claims: crate::source::claim::read_if_any(
            &js,
            &config.stream,
            &config.consumer_prefix,
            &config.owned,
        )
        .await,
    })
}

/// The sequence of the stream's last message (0 while it has had none).
pub async fn last_sequence(config: &NatsSource) -> Result<u64, NatsError> {
    let client = connect(config, false).await?;
    let js = jetstream::new(client);
    let stream = js
        .get_stream(&config.stream)
        .await
        .map_err(|e| nats_error(&format!("stream {}", config.stream), e))?;
    Ok(stream.cached_info().state.last_sequence)
}

/// The subjects under the prefix that hold messages of the stream and name no partition
/// (`<prefix>.01`, or a number past the partitions): no agent consumes them, since each
/// consumer filters on its partition's subject. Counted, with the first few by name: a
/// producer that publishes on a subject per profile makes millions of them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StraySubjects {
    pub subjects: usize,
    pub messages: usize,
    /// The [`StraySubjects::NAMED`] first in name order.
    pub first: BTreeSet<String>,
}

impl StraySubjects {
    const NAMED: usize = 3;

    fn add(&mut self, subject: String, messages: usize) {
        self.subjects += 1;
        self.messages = self.messages.saturating_add(messages);
        self.first.insert(subject);
        if self.first.len() > Self::NAMED {
            self.first.pop_last();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.subjects == 0
    }

    /// One line on them, naming a few.
    pub fn describe(&self) -> String {
        let named: Vec<&str> = self.first.iter().map(String::as_str).collect();
        format!(
            "{} message(s) on {} subject(s) that name no partition ({}{}): no agent consumes them; publish each update on the subject of its profile's partition, as `outpost publish` does",
            self.messages,
            self.subjects,
            named.join(", "),
            if self.subjects > named.len() { ", …" } else { "" }
        )
    }
}

/// The stream's [`StraySubjects`].
pub async fn stray_subjects(
    stream: &stream::Stream,
    config: &NatsSource,
) -> Result<StraySubjects, NatsError> {
    use futures_util::TryStreamExt;
    let mut subjects = stream
        .info_with_subjects(format!("{}.>", config.subject_prefix))
        .await
        .map_err(|e| nats_error("listing the stream's subjects", e))?;
    let mut stray = StraySubjects::default();
    while let Some((subject, count)) = subjects
        .try_next()
        .await
        .map_err(|e| nats_error("listing the stream's subjects", e))?
    {
        if !is_partition_subject(&config.subject_prefix, &subject, config.partitions) {
            stray.add(subject, count);
        }
    }
    Ok(stray)
}

/// Which stream this is: a fingerprint of its name and when it was made ([`made_at`]), so
/// that a stream deleted and made again under the same name is another stream.
pub(super) fn stream_fingerprint(info: &stream::Info) -> u64 {
    let identity = format!("{}\0{}", info.config.name, made_at(info));
    crate::source::partition::fnv1a64(identity.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_partitions_a_streams_subjects_take() {
        let subjects = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // (the stream's subjects, the prefix, partitions, the first not taken)
        let table: &[(&[&str], &str, u32, Option<u32>)] = &[
            (&["u.p.*"], "u.p", 4, None),
            (&["u.p.>"], "u.p", 4, None),
            (&["u.>"], "u.p", 4, None),
            (&[">"], "u.p", 4, None),
            (&["*.p.*"], "u.p", 4, None),
            (&["u.p.0", "u.p.1", "u.p.2", "u.p.3"], "u.p", 4, None),
            (&["u.p.0", "u.p.1", "u.p.3"], "u.p", 4, Some(2)),
            (&["u.q.*"], "u.p", 4, Some(0)),
            (&["u.p"], "u.p", 4, Some(0)),
            (&["u.p.*.x"], "u.p", 4, Some(0)),
            (&["u.*"], "u.p", 4, Some(0)),
            (&["u.p.*"], "u.p.q", 2, Some(0)),
        ];
        for &(list, prefix, partitions, first) in table {
            assert_eq!(
                partition_not_taken(&subjects(list), prefix, partitions),
                first,
                "{list:?} {prefix}"
            );
        }
    }

    #[test]
    fn limits_that_remove_unconsumed_updates_are_told() {
        use std::time::Duration;
        type Edit = fn(&mut stream::Config);
        let made = |edit: Edit| {
            let mut config = stream::Config {
                name: "UPDATES".into(),
                ..Default::default()
            };
            edit(&mut config);
            limits_that_drop_updates(&config)
        };
        let none: [Edit; 5] = [
            |_| {},
            // Counts with `discard = new`: publishes past them are refused, not old messages removed.
            |c| {
                c.discard = stream::DiscardPolicy::New;
                c.max_messages = 10;
                c.max_bytes = 1 << 20;
            },
            |c| {
                c.discard = stream::DiscardPolicy::New;
                c.discard_new_per_subject = true;
                c.max_messages_per_subject = 10;
            },
            |c| c.max_messages = -1,
            |c| c.max_bytes = -1,
        ];
        for edit in none {
            assert_eq!(made(edit), None);
        }
        let told: [(Edit, &str); 5] = [
            (
                |c| c.max_age = Duration::from_secs(7200),
                "removes messages older than 2h 0m",
            ),
            (|c| c.max_messages = 10, "keeps the newest 10 messages"),
            (|c| c.max_bytes = 4096, "keeps the newest 4096 bytes"),
            (
                |c| c.max_messages_per_subject = 3,
                "keeps the newest 3 messages of each subject (a partition's)",
            ),
            // Per subject, `discard = new` refuses only with discard_new_per_subject.
            (
                |c| {
                    c.discard = stream::DiscardPolicy::New;
                    c.max_messages_per_subject = 3;
                },
                "keeps the newest 3 messages of each subject (a partition's)",
            ),
        ];
        for (edit, limit) in told {
            let said = made(edit).expect(limit);
            assert!(
                said.starts_with(&format!("stream UPDATES {limit}: ")),
                "{said}"
            );
            assert!(said.contains("are removed unconsumed"), "{said}");
        }
        let both = made(|c| {
            c.max_age = Duration::from_secs(90);
            c.max_messages = 5;
        })
        .unwrap();
        assert!(
            both.starts_with(
                "stream UPDATES removes messages older than 1m 30s, keeps the newest 5 messages: "
            ),
            "{both}"
        );
    }

    /// However many subjects there are, a few of them are named, the first by name, and all
    /// are counted.
    #[test]
    fn stray_subjects_are_counted_and_the_first_few_named() {
        let mut stray = StraySubjects::default();
        assert!(stray.is_empty());
        for i in (0..10_000).rev() {
            stray.add(format!("u.p-{i:05}"), 2);
        }
        assert_eq!((stray.subjects, stray.messages), (10_000, 20_000));
        let said = stray.describe();
        assert!(
            said.starts_with("20000 message(s) on 10000 subject(s) that name no partition (u.p-00000, u.p-00001, u.p-00002, …)"),
            "{said}"
        );
        let mut two = StraySubjects::default();
        two.add("u.9".into(), 2);
        two.add("u.01".into(), 1);
        assert!(two
            .describe()
            .contains("3 message(s) on 2 subject(s) that name no partition (u.01, u.9):"));
    }

    #[test]
    fn when_a_stream_was_made_as_its_description_records_it() {
        let table: &[(Option<&str>, Option<i128>)] = &[
            (
                Some("outpost: partitions = 8; subjects u.0 to u.7; made at 1796500000123456789 (ns since 1970)"),
                Some(1_796_500_000_123_456_789),
            ),
            // Edited by hand: the number as far as it goes; the last one, which setup adds.
            (Some("outpost: partitions = 8; made at 12;"), Some(12)),
            (Some("outpost: partitions = 8; made at x; made at 34 (ns)"), Some(34)),
            (Some("outpost: partitions = 8; subjects u.0 to u.7"), None),
            (Some("outpost: partitions = 8; made at soon"), None),
            // Not outpost's description.
            (Some("made at 12"), None),
            (None, None),
        ];
        for (description, made) in table {
            assert_eq!(recorded_made_at(*description), *made, "{description:?}");
        }
    }
}
