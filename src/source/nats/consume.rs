//! Consuming a partition (one task per partition, so its messages stay in order):
//! 1. its consumer is (re)created to start right after the position recorded in the store;
//!    this happens at start and after every error, so a message the server still holds as
//!    delivered-but-unacknowledged (the agent died, the connection broke) is delivered again
//!    in stream order, never after a newer one;
//! 2. while the outbox is full, nothing is fetched: updates wait in the stream;
//! 3. a batch is fetched; [`sort_batch`] sorts it; the updates, the new position and the
//!    rejected messages go to the committer as one job, in one transaction;
//! 4. only once that group is flushed are the batch's messages acknowledged. At most one
//!    batch is unacknowledged at a time (the consumer's `max_ack_pending`).

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::stream::{check_partitions, stream_fingerprint};
use super::{nats_error, pause, Left, NatsError, Shared};
use crate::profile::update::FutureLimit;
use crate::source::batch::{delivery_gap, sort_batch, Fetched, HeldBack};
use crate::source::claim;
use crate::source::headers::unreadable_headers;
use crate::source::partition::subject_of;
use crate::store::source::Recorded;

/// How long a fetch waits for a first message when the partition is idle.
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// How often a paused partition looks at the outbox again.
const PAUSE_POLL: Duration = Duration::from_millis(100);
/// How often a paused partition reads how many messages wait for it.
const PENDING_REFRESH: Duration = Duration::from_secs(1);
/// How long a fetch may go without a message beyond the time it asks the server to wait: a
/// fetch whose end was lost must not hold the partition, while a large batch over a slow link
/// may take as long as it keeps coming.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often a claim is looked at again: on a partition another store claims, and on one
/// this agent consumes.
const CLAIM_LOOK_EVERY: Duration = Duration::from_secs(5);
/// How often a partition that waits for this host's clock looks at it.
const CLOCK_LOOK_EVERY: Duration = Duration::from_secs(1);
/// How long a partition's consumer may go on once the agent stops, to finish the batch it
/// holds (commit, acknowledge); then it is dropped. A call into the NATS client may wait
/// without end for room in the client's queue of commands, which it does not read while it
/// reconnects, and that queue fills when NATS has been unreachable for some minutes. A batch
/// dropped committed but unacknowledged comes again and is skipped by its recorded position.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(5);
/// The bytes of messages all owned partitions may hold fetched at once, shared out among them
/// ([`fetch_room`]): a batch is held, parsed and raw, until it is committed, and `fetch_batch`
/// messages of tens of KiB each in every one of 64 partitions would take gigabytes.
pub(super) const FETCH_BYTES_BUDGET: usize = 64 << 20;
/// What one partition may fetch at once whatever the budget: a batch of usual updates.
const MIN_FETCH_BYTES: usize = 1 << 20;

/// The bytes one of `owned` partitions asks for in a fetch of several messages. A message
/// larger than that alone is fetched by itself ([`fetch`]).
fn fetch_bytes(owned: usize) -> usize {
    (FETCH_BYTES_BUDGET / owned.max(1)).max(MIN_FETCH_BYTES)
}

/// Whether a fetch ended with JetStream's `409 Message Size Exceeds MaxBytes`: the next
/// message would pass the bytes asked for. The fetch ends there; what came before it stands.
fn ended_by_max_bytes(error: &dyn std::fmt::Display) -> bool {
    error
        .to_string()
        .to_ascii_lowercase()
        .contains("message size exceeds maxbytes")
}

/// Why a partition's consumer ended.
#[derive(Debug)]
enum PartitionStop {
    Failed(NatsError),
    /// A message waits for this host's clock (see `batch::HeldBack`): the partition starts
    /// over once the clock lets it pass, not on the backoff schedule, since every start over
    /// makes the consumer again and fetches a batch only to hold it back.
    Held {
        why: NatsError,
        passes_at: chrono::DateTime<chrono::Utc>,
    },
    /// Another store claims the partition (see `claim`): it is left alone, and its claim
    /// looked at again every [`CLAIM_LOOK_EVERY`].
    ClaimedElsewhere(String),
    /// The store marks the partition moved (handed over, or being moved): left alone, and
    /// looked at again as a claim is.
    Moved(String),
    /// Failed at a position, the partition consumed up to `recorded` of `stream`, in a way
    /// the next message may cause: the connection broke, a fetch failed or stalled among its
    /// messages, or a delivery never reached the agent. Counted, since a message whose header
    /// block the client cannot read as a message's does one of these every time it is fetched
    /// (see [`crate::source::headers`]).
    StoppedAt {
        error: NatsError,
        stream: u64,
        recorded: u64,
    },
}

/// Stops in a row at one position after which the partition's next messages are read by
/// their stream sequence.
const STOPS_BEFORE_READING_BY_SEQUENCE: u32 = 2;

/// How many times in a row the consumer stopped at `at` ((stream, position)), given where it
/// last stopped and how many times in a row: one at another position, or in another stream,
/// counts from 1 again.
fn stops_in_a_row(last: Option<((u64, u64), u32)>, at: (u64, u64)) -> u32 {
    match last {
        Some((seen, times)) if seen == at => times + 1,
        _ => 1,
    }
}

/// How often an idle partition asks its consumer whether it delivered messages the client
/// never handed on (see [`PartitionStop::StoppedAt`]).
const DELIVERED_LOOK_EVERY: Duration = Duration::from_secs(3);

/// Why a fetch failed.
enum FetchFailed {
    /// Asking for messages failed.
    Request(NatsError),
    /// It failed or stalled among the messages it brought: the next one may be the cause.
    AmongMessages(NatsError),
}

impl FetchFailed {
    /// Why the partition's consumer ends, consumed up to `recorded` of `stream`.
    fn stop(self, (stream, recorded): (u64, u64)) -> PartitionStop {
        match self {
            FetchFailed::Request(error) => PartitionStop::Failed(error),
            FetchFailed::AmongMessages(error) => PartitionStop::StoppedAt {
                error,
                stream,
                recorded,
            },
        }
    }
}

impl From<NatsError> for PartitionStop {
    fn from(e: NatsError) -> Self {
        PartitionStop::Failed(e)
    }
}

/// The durable consumer name of a partition: `<consumer_prefix>-p<partition>`.
pub fn consumer_name(prefix: &str, partition: u32) -> String {
    format!("{prefix}-p{partition}")
}

/// Room for a batch of `bytes` in the fetch budget (`budget`, what of it no batch holds),
/// held until the batch is committed and acknowledged: past 64 partitions, where each asks
/// for [`MIN_FETCH_BYTES`], their batches take turns rather than add up. `None` once the
/// agent stops (`shutdown`).
async fn fetch_room<'a>(
    budget: &'a tokio::sync::Semaphore,
    shutdown: &CancellationToken,
    bytes: usize,
) -> Option<tokio::sync::SemaphorePermit<'a>> {
    let bytes = u32::try_from(bytes.min(FETCH_BYTES_BUDGET)).expect("the budget fits a u32");
    tokio::select! {
        room = budget.acquire_many(bytes) => room.ok(),
        _ = shutdown.cancelled() => None,
    }
}

/// What a fetch asks for after a first message of `first` bytes fetched alone (of a batch of
/// `batch` messages and `bytes` of the partition's share): the rest of both, `None` when the
/// batch is that one message. Past the share, one byte, which no message fits: a message
/// larger than the share is fetched by itself (0 would ask for no bound at all).
fn rest_after_first(batch: usize, bytes: usize, first: usize) -> Option<(usize, usize)> {
    (batch > 1).then(|| (batch - 1, bytes.saturating_sub(first).max(1)))
}

/// `work`'s end, or `None` when it has not ended `grace` after `shutdown`.
async fn within_grace_of_stop<F: std::future::Future>(
    work: F,
    shutdown: &CancellationToken,
    grace: Duration,
) -> Option<F::Output> {
    tokio::pin!(work);
    tokio::select! {
        ended = &mut work => return Some(ended),
        _ = shutdown.cancelled() => {}
    }
    tokio::time::timeout(grace, work).await.ok()
}

/// Waits until the wall clock reads `time`, looking at it each second (NTP may set it right
/// at any moment), or returns false at once when the agent stops.
async fn until_the_clock_reaches(
    shutdown: &CancellationToken,
    time: chrono::DateTime<chrono::Utc>,
) -> bool {
    loop {
        // Negative once the time has passed.
        let left = (time - chrono::Utc::now()).to_std().unwrap_or_default();
        if left.is_zero() {
            return true;
        }
        if !pause(shutdown, left.min(CLOCK_LOOK_EVERY)).await {
            return false;
        }
    }
}

/// Consumes `partition` (at `slot` in `owned`) until the agent stops, starting its consumer
/// over after every stop once what stopped it allows: the backoff schedule after a failure,
/// this host's clock for a held message, the claim looked at again for a partition left alone.
pub(super) async fn consume_partition(shared: &Shared, slot: usize, partition: u32) {
    let mut backoff = BACKOFF_FIRST;
    // The same error again (NATS down for a while) is logged once, not at every retry.
    let mut last_error = String::new();
    // Where the consumer last stopped at a position ((stream, position)), and how many
    // times in a row.
    let mut stopped_at: Option<((u64, u64), u32)> = None;
    while !shared.shutdown.is_cancelled() {
        // When its consumer was made and began consuming, if it got that far.
        let mut consuming_since = None;
        let consumer = run_consumer(shared, slot, partition, &mut consuming_since);
        let Some(ended) = within_grace_of_stop(consumer, &shared.shutdown, STOP_GRACE).await else {
            shared
                .state
                .unended_at_stop
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(partition);
            return;
        };
        let ended = match ended {
            Err(PartitionStop::StoppedAt {
                error,
                stream,
                recorded,
            }) => {
                let at = (stream, recorded);
                let times = stops_in_a_row(stopped_at, at);
                stopped_at = Some((at, times));
                let mut ended = Err(PartitionStop::Failed(error));
                if times >= STOPS_BEFORE_READING_BY_SEQUENCE {
                    stopped_at = None;
                    // Read only while the partition is still this store's to consume: a
                    // claim that cannot be looked at now is looked at again before the next
                    // read (unlike `keep_claim`, which lets a running consumer go on).
                    let look = look_at_claim(shared, partition);
                    match within_grace_of_stop(look, &shared.shutdown, STOP_GRACE).await {
                        None => return,
                        Some(Ok(claim::Claim::Elsewhere(holder))) => {
                            ended = Err(PartitionStop::ClaimedElsewhere(holder))
                        }
                        Some(Err(e)) => {
                            tracing::debug!(partition, error = %e, "the claim could not be looked at; the partition's next messages are read by their stream sequence once it can");
                            stopped_at = Some((at, times));
                        }
                        Some(Ok(claim::Claim::Ours | claim::Claim::Made)) => {
                            let read = read_by_sequence(shared, partition, at);
                            match within_grace_of_stop(read, &shared.shutdown, STOP_GRACE).await {
                                None => return,
                                Some(Ok((0, None))) => {}
                                Some(Ok((read, held_back))) => {
                                    if read > 0 {
                                        tracing::info!(partition, read, "read the partition's next messages by their stream sequence, the consumer having stopped {times} times in a row at the same position; consuming goes on after them");
                                    }
                                    match held_back {
                                        Some(held) => ended = Err(held_stop(held)),
                                        None => {
                                            backoff = BACKOFF_FIRST;
                                            continue;
                                        }
                                    }
                                }
                                Some(Err(e)) => {
                                    tracing::warn!(partition, error = %e, "could not read the partition's next messages by their stream sequence");
                                }
                            }
                        }
                    }
                }
                ended
            }
            other => {
                stopped_at = None;
                other
            }
        };
        match ended {
            Ok(()) => return,
            Err(PartitionStop::Held { why, passes_at }) => {
                let error = why.to_string();
                if error != last_error {
                    tracing::warn!(partition, %error, "NATS partition waits for this host's clock");
                    last_error = error;
                }
                if !until_the_clock_reaches(&shared.shutdown, passes_at).await {
                    return;
                }
                backoff = BACKOFF_FIRST;
            }
            Err(PartitionStop::ClaimedElsewhere(holder)) => {
                shared.state.set_left(slot, Left::ClaimedElsewhere);
                // Not consumed here: no backlog of this agent's to show.
                shared.state.pending[slot].store(0, Ordering::Relaxed);
                let error = format!("claimed by {holder}");
                if error != last_error && holder.starts_with(claim::HANDED_OVER) {
                    tracing::warn!(
                        partition,
                        claim = %holder,
                        "NATS partition left alone: it was handed over (`outpost nats hand-over`), and waits for `outpost nats take-over` of that file"
                    );
                    last_error = error;
                } else if error != last_error {
                    tracing::error!(
                        partition,
                        claimed_by = %holder,
                        ours = %shared.claim_as,
                        "NATS partition left alone: another agent's store claims it (two agents own it: give every agent a distinct `owned`; to move it here, `outpost nats hand-over` it from the agent that holds it and `outpost nats take-over` the file here; only if the claiming store is lost, `outpost nats release` it, and this agent consumes the partition from the stream's start, sending its profiles' past versions again)"
                    );
                    last_error = error;
                }
                if !pause(&shared.shutdown, CLAIM_LOOK_EVERY).await {
                    return;
                }
                backoff = BACKOFF_FIRST;
            }
            Err(PartitionStop::Moved(why)) => {
                shared.state.pending[slot].store(0, Ordering::Relaxed);
                shared.state.set_left(slot, Left::HandedOver);
                if why != last_error {
                    tracing::warn!(partition, "NATS partition left alone: {why}");
                    last_error = why;
                }
                if !pause(&shared.shutdown, CLAIM_LOOK_EVERY).await {
                    return;
                }
                backoff = BACKOFF_FIRST;
            }
            Err(PartitionStop::Failed(e) | PartitionStop::StoppedAt { error: e, .. }) => {
                // A consumer that consumed for a good while failed for a new reason; one
                // that never got going (a request that timed out after 30 s) did not.
                let consumed_a_while = consuming_since
                    .is_some_and(|since: std::time::Instant| since.elapsed() > 2 * BACKOFF_MAX);
                if consumed_a_while {
                    backoff = BACKOFF_FIRST;
                    last_error.clear();
                }
                let connected = shared.state.connected();
                let error = if connected {
                    e.to_string()
                } else {
                    format!("not connected to NATS ({e})")
                };
                let retry_in_ms = backoff.as_millis() as u64;
                shared.state.set_left(slot, Left::Failing);
                // While the connection is down every partition fails for it, which the
                // connection's own warning says once.
                if error == last_error || !connected {
                    tracing::debug!(partition, %error, retry_in_ms, "NATS partition consumer failed again");
                } else {
                    tracing::warn!(partition, %error, retry_in_ms, "NATS partition consumer failed; it starts over from the stored position");
                    last_error = error;
                }
                if !pause(&shared.shutdown, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// A partition's consumer and where the store is in it.
struct Consuming {
    consumer: consumer::PullConsumer,
    stream: u64,
    recorded: u64,
}

/// (Re)creates the partition's durable consumer to start right after the position recorded
/// in the store for this stream.
async fn fresh_consumer(shared: &Shared, partition: u32) -> Result<Consuming, NatsError> {
    let stream = shared
        .js
        .get_stream(&shared.config.stream)
        .await
        .map_err(|e| {
            nats_error(
                &format!(
                    "stream {} (does `outpost nats setup` need to run?)",
                    shared.config.stream
                ),
                e,
            )
        })?;
    let info = stream.cached_info();
    check_partitions(info, &shared.config)?;
    let fingerprint = stream_fingerprint(info);
    let recorded = shared
        .store
        .source_position(partition, fingerprint, info.state.last_sequence)
        // Refused while the store takes no writes: the partition starts again once it does.
        .map_err(|e| nats_error("reading the stream position", e))?;
    match recorded {
        Recorded::OtherStream { seq } | Recorded::UnmarkedOther { seq } => {
            tracing::warn!(
                partition,
                stream = %shared.config.stream,
                recorded_seq = seq,
                "the store's position in this partition is one in another stream (the stream was made again, or source.nats.stream changed); consuming the partition from the stream's start"
            );
            // Another stream's position that names it stays until the first commit, in case
            // the config is turned back to that stream.
            if let Recorded::UnmarkedOther { .. } = recorded {
                shared
                    .store
                    .mark_source_position(partition, fingerprint, 0)
                    .map_err(|e| nats_error("recording the start over", e))?;
            }
        }
        Recorded::PastEnd { seq, last_seq } => {
            tracing::warn!(
                partition,
                stream = %shared.config.stream,
                recorded_seq = seq,
                last_seq,
                "the store's position in this partition lies past the stream's last message: the stream went back (restored from a backup, or its server lost writes); consuming its messages after the last one"
            );
            shared
                .store
                .mark_source_position(partition, fingerprint, last_seq)
                .map_err(|e| nats_error("setting the stream position back", e))?;
        }
        Recorded::Unmarked(seq) => shared
            .store
            .mark_source_position(partition, fingerprint, seq)
            .map_err(|e| nats_error("recording the stream of the position", e))?,
        Recorded::Nothing | Recorded::At(_) => {}
    }
    let recorded = recorded.seq();
    let name = consumer_name(&shared.config.consumer_prefix, partition);
    // The store, not the server, knows how far this partition is durable. A consumer that
    // could not be deleted would be reused as it is (creating one with the same config returns
    // it), handing out messages past some it holds unacknowledged, which would then be skipped
    // as below the position: only "not found" lets the start go on.
    match stream.delete_consumer(&name).await {
        Ok(deleted) if !deleted.success => {
            return Err(NatsError(format!(
                "deleting the old consumer {name}: the server did not delete it"
            )));
        }
        Ok(_) => {}
        Err(e) => {
            let not_found = matches!(
                e.kind(),
                jetstream::stream::ConsumerErrorKind::JetStream(ref js)
                    if js.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
            );
            if !not_found {
                return Err(nats_error(&format!("deleting the old consumer {name}"), e));
            }
        }
    }
    let deliver_policy = if recorded == 0 {
        consumer::DeliverPolicy::All
    } else {
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: recorded + 1,
        }
    };
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: subject_of(&shared.config.subject_prefix, partition),
            ack_policy: consumer::AckPolicy::Explicit,
            deliver_policy,
            ack_wait: shared.config.ack_wait,
            max_ack_pending: shared.config.fetch_batch as i64,
            ..Default::default()
        })
        .await
        .map_err(|e| nats_error(&format!("creating consumer {name}"), e))?;
    Ok(Consuming {
        consumer,
        stream: fingerprint,
        recorded,
    })
}

async fn claims_bucket(shared: &Shared) -> Result<async_nats::jetstream::kv::Store, NatsError> {
    let config = &shared.config;
    claim::bucket(
        &shared.js,
        &config.stream,
        &config.consumer_prefix,
        config.replicas,
    )
    .await
}

async fn claim_partition(shared: &Shared, partition: u32) -> Result<claim::Claim, NatsError> {
    claim::claim(&claims_bucket(shared).await?, partition, &shared.claim_as).await
}

/// Looks at this store's claim on `partition`, making it again if it was released.
async fn look_at_claim(shared: &Shared, partition: u32) -> Result<claim::Claim, NatsError> {
    let claims = claims_bucket(shared).await?;
    claim::look(&claims, partition, &shared.claim_as).await
}

/// Looks at the claim on a partition this agent consumes. Released meanwhile (`outpost nats
/// release` while the agent ran), it is made again, since the partition is still consumed
/// here; taken by another store, consuming stops. A look that fails changes nothing: the
/// claim was ours when consuming started, and a broken connection stops the fetches anyway.
async fn keep_claim(shared: &Shared, partition: u32) -> Result<(), PartitionStop> {
    match look_at_claim(shared, partition).await {
        Ok(claim::Claim::Ours) => Ok(()),
        Ok(claim::Claim::Made) => {
            tracing::warn!(
                partition,
                ours = %shared.claim_as,
                "the claim on a NATS partition this agent consumes was released; claimed again (to move the partition, stop the agent or take it out of `owned` first, then release it)"
            );
            Ok(())
        }
        Ok(claim::Claim::Elsewhere(holder)) => {
            tracing::warn!(
                partition,
                claimed_by = %holder,
                ours = %shared.claim_as,
                "another store claimed a NATS partition this agent consumes (its claim was released meanwhile); consuming it stops"
            );
            Err(PartitionStop::ClaimedElsewhere(holder))
        }
        Err(e) => {
            tracing::debug!(partition, error = %e, "the claim could not be looked at; looked at again later");
            Ok(())
        }
    }
}

/// Consumes until the agent stops (`Ok`) or something fails (`Err`: the caller starts over).
async fn run_consumer(
    shared: &Shared,
    slot: usize,
    partition: u32,
    consuming_since: &mut Option<std::time::Instant>,
) -> Result<(), PartitionStop> {
    // Messages that arrive over one unbroken connection arrive in order; after a break, some
    // may have been sent and lost, so the partition starts over. So it does when a delivery
    // is missing without a break (`delivery_gap`).
    let breaks = shared.state.events.breaks.load(Ordering::SeqCst);
    // Moved to another store: left unclaimed, for the store that took it over.
    let moved = shared
        .store
        .partition_moved(partition)
        .map_err(|e| nats_error("reading the stream position", e))?;
    if let Some(moved) = moved {
        return Err(PartitionStop::Moved(moved));
    }
    // Never consumed unclaimed: a claim that cannot be made or read now is tried again, on
    // the backoff schedule, like a consumer that cannot be made.
    if let claim::Claim::Elsewhere(holder) = claim_partition(shared, partition).await? {
        return Err(PartitionStop::ClaimedElsewhere(holder));
    }
    let mut consuming = fresh_consumer(shared, partition).await?;
    shared.state.set_left(slot, Left::Consumed);
    *consuming_since = Some(std::time::Instant::now());
    match consume(shared, slot, partition, &mut consuming, breaks).await {
        Err(PartitionStop::Failed(error))
            if shared.state.events.breaks.load(Ordering::SeqCst) != breaks =>
        {
            Err(PartitionStop::StoppedAt {
                error,
                stream: consuming.stream,
                recorded: consuming.recorded,
            })
        }
        other => other,
    }
}

/// Fetches, commits and acknowledges the partition's messages from where `consuming` is,
/// over the connection as it was when it had broken `breaks` times.
async fn consume(
    shared: &Shared,
    slot: usize,
    partition: u32,
    consuming: &mut Consuming,
    breaks: u64,
) -> Result<(), PartitionStop> {
    let consumer = &consuming.consumer;
    tracing::debug!(
        partition,
        recorded = consuming.recorded,
        "partition consumer ready"
    );
    let batch = shared.config.fetch_batch;
    let bytes = fetch_bytes(shared.config.owned.len());
    // The consumer sequence of the next delivery (a fresh consumer numbers them from 1).
    let mut next_delivery = 1;
    // When the pending count was last read while paused.
    let mut pending_read_at: Option<std::time::Instant> = None;
    let mut claim_looked_at = std::time::Instant::now();
    let mut delivered_looked_at = std::time::Instant::now();
    loop {
        if shared.shutdown.is_cancelled() {
            return Ok(());
        }
        if claim_looked_at.elapsed() >= CLAIM_LOOK_EVERY {
            keep_claim(shared, partition).await?;
            claim_looked_at = std::time::Instant::now();
        }
        // Back-pressure: a full outbox stops fetching; updates wait in the stream.
        let full = shared
            .store
            .outbox_full(shared.max_outbox_bytes)
            .map_err(|e| nats_error("reading the outbox tally", e))?
            .is_some();
        shared.state.paused.store(full, Ordering::Relaxed);
        if full {
            // No fetch tells how many messages wait meanwhile, and a paused agent is when an
            // operator looks: the consumer's own count, now and then.
            if pending_read_at.is_none_or(|at| at.elapsed() >= PENDING_REFRESH) {
                if let Ok(info) = consumer.get_info().await {
                    shared.state.pending[slot].store(info.num_pending, Ordering::Relaxed);
                }
                pending_read_at = Some(std::time::Instant::now());
            }
            if !pause(&shared.shutdown, PAUSE_POLL).await {
                return Ok(());
            }
            continue;
        }
        pending_read_at = None;
        // What is there now, at once; if nothing, wait a while for one message. One message
        // is fetched whatever its size: so a message larger than `bytes`, which ends the
        // first fetch with nothing, comes here.
        let at = (consuming.stream, consuming.recorded);
        let fetched = |fetch: Result<_, FetchFailed>| fetch.map_err(|e| e.stop(at));
        let Some(room) = fetch_room(&shared.fetch_room, &shared.shutdown, bytes).await else {
            return Ok(());
        };
        let mut messages = fetched(fetch(consumer, (batch, bytes), None, &shared.shutdown).await)?;
        // Held until this turn ends; not while waiting for a message (a single one, up to the
        // server's max_payload, whatever the budget).
        let mut _room = Some(room);
        if messages.is_empty() {
            _room = None;
            let one = (1, usize::MAX);
            messages = fetched(fetch(consumer, one, Some(IDLE_WAIT), &shared.shutdown).await)?;
            if !messages.is_empty() {
                let Some(room) = fetch_room(&shared.fetch_room, &shared.shutdown, bytes).await
                else {
                    return Ok(());
                };
                _room = Some(room);
            }
            if let Some(large) = messages.first().filter(|m| m.payload.len() > bytes) {
                tracing::debug!(
                    partition,
                    bytes = large.payload.len(),
                    share = bytes,
                    "a message larger than the partition's share of the fetch budget, fetched by itself"
                );
            }
            let rest = messages
                .first()
                .and_then(|first| rest_after_first(batch, bytes, first.payload.len()));
            if let Some(rest) = rest {
                messages.extend(fetched(
                    fetch(consumer, rest, None, &shared.shutdown).await,
                )?);
            }
        }
        if shared.state.events.breaks.load(Ordering::SeqCst) != breaks {
            return Err(NatsError(
                "the connection broke; starting the partition over from the stored position".into(),
            )
            .into());
        }
        let Some(last) = messages.last() else {
            shared.state.pending[slot].store(0, Ordering::Relaxed);
            // The client drops a message whose header block carries a status as the server's
            // answer to the fetch (404 and 408 end it as if nothing were there), with those
            // after it in the fetch: the partition would wait there for good, unseen.
            if delivered_looked_at.elapsed() >= DELIVERED_LOOK_EVERY {
                delivered_looked_at = std::time::Instant::now();
                // A look that fails changes nothing: the next one may tell.
                let info = consumer.get_info().await;
                if let Some(info) = info
                    .ok()
                    .filter(|info| info.delivered.consumer_sequence >= next_delivery)
                {
                    return Err(PartitionStop::StoppedAt {
                        error: NatsError(format!(
                            "the consumer made deliveries {next_delivery} to {}, which never reached the agent (the client drops a message whose header block carries a status); starting the partition over from the stored position",
                            info.delivered.consumer_sequence
                        )),
                        stream: at.0,
                        recorded: at.1,
                    });
                }
            }
            continue;
        };
        let deliveries = messages
            .iter()
            .map(|m| m.info().map(|info| info.consumer_sequence))
            .collect::<Result<Vec<u64>, _>>()
            .map_err(|e| nats_error("reading a message's consumer sequence", e))?;
        if let Some((expected, found)) = delivery_gap(next_delivery, &deliveries) {
            let what = if found < expected {
                format!("the consumer numbers its deliveries from {found} again (it was made again behind the agent's back)")
            } else {
                format!("delivery {expected} of the consumer never arrived (the next was {found})")
            };
            let error = NatsError(format!(
                "{what}; starting the partition over from the stored position"
            ));
            // A consumer made again elsewhere says nothing of the next message.
            if found < expected {
                return Err(error.into());
            }
            return Err(PartitionStop::StoppedAt {
                error,
                stream: at.0,
                recorded: at.1,
            });
        }
        next_delivery += deliveries.len() as u64;
        if let Ok(info) = last.info() {
            shared.state.pending[slot].store(info.pending, Ordering::Relaxed);
        }
        consuming.recorded = commit_and_ack(
            shared,
            partition,
            (consuming.stream, consuming.recorded),
            &messages,
        )
        .await?;
    }
}

/// One fetch of at most `max` messages and `max_bytes` bytes (`usize::MAX`: no limit):
/// without `wait`, only what is there now.
async fn fetch(
    consumer: &consumer::PullConsumer,
    (max, max_bytes): (usize, usize),
    wait: Option<Duration>,
    shutdown: &CancellationToken,
) -> Result<Vec<jetstream::Message>, FetchFailed> {
    let stalled =
        |limit: Duration| NatsError(format!("a fetch stalled: nothing came for {limit:?}"));
    let request_failed = |e| FetchFailed::Request(nats_error("fetching", e));
    // 0 asks for no limit.
    let max_bytes = if max_bytes == usize::MAX {
        0
    } else {
        max_bytes
    };
    let request = async {
        let mut batch = tokio::time::timeout(FETCH_TIMEOUT, async {
            match wait {
                None => {
                    consumer
                        .fetch()
                        .max_messages(max)
                        .max_bytes(max_bytes)
                        .messages()
                        .await
                }
                Some(wait) => {
                    consumer
                        .batch()
                        .max_messages(max)
                        .max_bytes(max_bytes)
                        .expires(wait)
                        .messages()
                        .await
                }
            }
        })
        .await
        .map_err(|_| FetchFailed::Request(stalled(FETCH_TIMEOUT)))?
        .map_err(request_failed)?;
        let mut messages = Vec::with_capacity(max.min(1024));
        let mut bytes_left = max_bytes;
        // The first message may take as long as the server was asked to wait.
        let mut limit = wait.unwrap_or_default() + FETCH_TIMEOUT;
        while let Some(message) = tokio::time::timeout(limit, batch.next())
            .await
            .map_err(|_| FetchFailed::AmongMessages(stalled(limit)))?
        {
            match message {
                Ok(message) => {
                    let budget_taken = max_bytes > 0 && {
                        bytes_left = bytes_left.saturating_sub(message.length);
                        bytes_left == 0
                    };
                    messages.push(message);
                    // The server ends a request whose messages take its bytes exactly
                    // without a status to say so; nothing more comes.
                    if budget_taken {
                        break;
                    }
                }
                Err(e) if ended_by_max_bytes(&e) => break,
                Err(e) => return Err(FetchFailed::AmongMessages(nats_error("fetching", e))),
            }
            limit = FETCH_TIMEOUT;
        }
        Ok(messages)
    };
    tokio::select! {
        result = request => result,
        // Stopping drops the fetch: what it held is not acknowledged, so it comes again.
        _ = shutdown.cancelled() => Ok(Vec::new()),
    }
}

/// Commits a batch of `partition` of `stream`, consumed up to `recorded`, and acknowledges
/// its messages; the position recorded after it.
async fn commit_and_ack(
    shared: &Shared,
    partition: u32,
    (stream, recorded): (u64, u64),
    messages: &[jetstream::Message],
) -> Result<u64, PartitionStop> {
    let mut fetched = Vec::with_capacity(messages.len());
    for message in messages {
        let info = message
            .info()
            .map_err(|e| nats_error("reading a message's stream sequence", e))?;
        fetched.push(Fetched {
            subject: message.subject.as_str(),
            seq: info.stream_sequence,
            payload: &message.payload,
            published: i64::try_from(info.published.unix_timestamp_nanos())
                .ok()
                .map(chrono::DateTime::from_timestamp_nanos),
        });
    }
    let (position, held_back) =
        commit_fetched(shared, partition, (stream, recorded), &fetched).await?;
    // The group is durable: now the messages may go, up to one held back.
    let held_at = held_back.as_ref().map(|held| held.seq);
    for (message, fetched) in messages.iter().zip(&fetched) {
        if held_at.is_some_and(|held| fetched.seq >= held) {
            continue;
        }
        message
            .ack()
            .await
            .map_err(|e| nats_error("acknowledging", e))?;
        shared.state.acks.fetch_add(1, Ordering::Relaxed);
        shared.metrics.source_acks.inc();
    }
    if let Some(held) = held_back {
        return Err(held_stop(held));
    }
    Ok(position)
}

/// The partition stopped for a message that waits for this host's clock.
fn held_stop(held: HeldBack) -> PartitionStop {
    PartitionStop::Held {
        why: NatsError(format!(
            "stream message {} waits: {}; it and those after it are tried again once this host's clock reaches {}",
            held.seq,
            held.reason,
            crate::profile::update::format_time(held.passes_at)
        )),
        passes_at: held.passes_at,
    }
}

/// Commits `fetched`, messages of `partition` of `stream` consumed up to `recorded`, durably:
/// the position recorded after them, and the message the batch stopped before, if one
/// waits for this host's clock.
async fn commit_fetched(
    shared: &Shared,
    partition: u32,
    (stream, recorded): (u64, u64),
    fetched: &[Fetched<'_>],
) -> Result<(u64, Option<HeldBack>), NatsError> {
    let now = chrono::Utc::now();
    let limit = FutureLimit {
        now,
        max_future_s: shared.max_future_s,
    };
    let sorted = sort_batch(
        partition,
        shared.config.partitions,
        (stream, recorded),
        fetched,
        &shared.committer.parsing(limit),
        now.timestamp_millis(),
    );
    let rejected = sorted
        .position
        .as_ref()
        .map_or(0, |p| p.rejected.len() as u64);
    for record in sorted.position.iter().flat_map(|p| &p.rejected) {
        tracing::warn!(partition, seq = record.seq, subject = %record.subject, error = %record.error, "rejected a message from the stream");
    }
    let committed = sorted.updates.len() as u64;
    let position = sorted.position.as_ref().map_or(recorded, |p| p.seq);
    if sorted.position.is_some() {
        let not_kept_before = (rejected > 0).then(|| shared.store.rejected_counts());
        shared
            .committer
            .commit_at(sorted.updates, sorted.position)
            .await
            .map_err(|e| nats_error("committing", e))?;
        // The count is the store's: partitions committed in the same while count in it too.
        if let (Some(Ok((_, before))), Ok((kept, after))) =
            (not_kept_before, shared.store.rejected_counts())
        {
            if after > before {
                tracing::warn!(
                    kept,
                    not_kept_in_all = after,
                    "rejected messages are no longer kept: the store keeps source.nats.max_rejected of them already; each is still logged as rejected, and `outpost rejected drop` makes room"
                );
            }
        }
    }
    shared
        .metrics
        .record_source_messages(committed, sorted.skipped, rejected);
    Ok((position, sorted.held_back))
}

/// Reads the partition's next messages after `recorded` of `stream` by their stream
/// sequence, through the JetStream API rather than the consumer, and commits each, up to and
/// including the first whose headers the client cannot read ([`crate::source::headers`]), or a
/// batch's worth; how many it committed, and the message it stopped before if that one waits
/// for this host's clock. Their order is the stream's, as the consumer's.
async fn read_by_sequence(
    shared: &Shared,
    partition: u32,
    (stream, mut recorded): (u64, u64),
) -> Result<(usize, Option<HeldBack>), NatsError> {
    let stored = shared
        .store
        .source_position(partition, stream, u64::MAX)
        .map_err(|e| nats_error("reading the partition's position", e))?;
    recorded = read_after(recorded, stored);
    let subject = subject_of(&shared.config.subject_prefix, partition);
    let mut read = 0;
    for _ in 0..shared.config.fetch_batch.max(1) {
        // A full outbox stops it, as it stops fetching.
        let full = shared.store.outbox_full(shared.max_outbox_bytes);
        if shared.shutdown.is_cancelled() || full.map_or(true, |full| full.is_some()) {
            break;
        }
        let Some(message) = message_after(shared, &subject, recorded).await? else {
            break;
        };
        let unreadable = message.headers.as_deref().and_then(unreadable_headers);
        let fetched = Fetched {
            subject: &message.subject,
            seq: message.seq,
            payload: &message.payload,
            published: message.published,
        };
        let (position, held_back) =
            commit_fetched(shared, partition, (stream, recorded), &[fetched]).await?;
        if held_back.is_some() {
            // Held back as the consumer would hold it: the partition waits for the clock.
            return Ok((read, held_back));
        }
        recorded = position;
        read += 1;
        if let Some(why) = unreadable {
            tracing::warn!(
                partition,
                seq = message.seq,
                why,
                "a stream message whose NATS headers the client cannot read stopped its partition each time it was fetched; it was read by its stream sequence instead (its headers are not used)"
            );
            break;
        }
    }
    Ok((read, None))
}

/// The stream sequence after which a partition's messages are read by their sequence, the
/// consumer having stopped at `stopped_at`: the store's position when it is further on in
/// this stream (`stored`). A group whose commit was in doubt yet reached the disk, or whose
/// acks failed after it, moved it on, and its messages are not to be applied again.
fn read_after(stopped_at: u64, stored: Recorded) -> u64 {
    match stored {
        Recorded::At(seq) => stopped_at.max(seq),
        _ => stopped_at,
    }
}

/// A stream message as the JetStream API's `STREAM.MSG.GET` gives it.
struct BySequence {
    subject: String,
    seq: u64,
    headers: Option<Vec<u8>>,
    payload: Vec<u8>,
    published: Option<chrono::DateTime<chrono::Utc>>,
}

/// The first message on `subject` after stream sequence `after`, if there is one.
async fn message_after(
    shared: &Shared,
    subject: &str,
    after: u64,
) -> Result<Option<BySequence>, NatsError> {
    use base64::Engine;
    let what = "reading a message by its stream sequence";
    let request = serde_json::json!({"seq": after + 1, "next_by_subj": subject});
    let api = format!("STREAM.MSG.GET.{}", shared.config.stream);
    let answer: serde_json::Value = shared
        .js
        .request(api, &request)
        .await
        .map_err(|e| nats_error(what, e))?;
    if let Some(error) = answer.get("error") {
        if error["err_code"].as_u64() == Some(NO_MESSAGE_FOUND) {
            return Ok(None);
        }
        return Err(NatsError(format!("{what}: {error}")));
    }
    let message = &answer["message"];
    let decoded = |field: &str| -> Result<Option<Vec<u8>>, NatsError> {
        let Some(text) = message[field].as_str() else {
            return Ok(None);
        };
        let bytes = base64::engine::general_purpose::STANDARD.decode(text);
        bytes.map(Some).map_err(|e| nats_error(what, e))
    };
    let unanswered = || NatsError(format!("{what}: the answer names no message"));
    Ok(Some(BySequence {
        subject: message["subject"]
            .as_str()
            .ok_or_else(unanswered)?
            .to_owned(),
        seq: message["seq"].as_u64().ok_or_else(unanswered)?,
        headers: decoded("hdrs")?,
        payload: decoded("data")?.unwrap_or_default(),
        published: message["time"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&chrono::Utc)),
    }))
}

/// JetStream's error code for a message that is not there.
const NO_MESSAGE_FOUND: u64 = 10037;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_partitions_share_the_fetch_budget_down_to_a_floor() {
        // (owned partitions, bytes a fetch asks for)
        let table = [
            (0, 64 << 20),
            (1, 64 << 20),
            (8, 8 << 20),
            (64, 1 << 20),
            (1024, 1 << 20),
        ];
        for (owned, bytes) in table {
            assert_eq!(fetch_bytes(owned), bytes, "{owned}");
        }
    }

    #[test]
    fn past_64_partitions_batches_take_turns_at_the_fetch_budget() {
        use futures_util::FutureExt;
        let shutdown = CancellationToken::new();
        // (owned partitions, how many hold room for a batch at once)
        for (owned, at_once) in [(1, 1), (8, 8), (64, 64), (128, 64), (4096, 64)] {
            let budget = tokio::sync::Semaphore::new(FETCH_BYTES_BUDGET);
            let share = fetch_bytes(owned);
            let mut held = Vec::new();
            for _ in 0..at_once {
                let room = fetch_room(&budget, &shutdown, share).now_or_never();
                held.push(room.flatten().expect("room in the budget"));
            }
            let mut waiting = Box::pin(fetch_room(&budget, &shutdown, share));
            assert!(
                (&mut waiting).now_or_never().is_none(),
                "{owned} owned: a batch past {at_once} waits for its turn"
            );
            // The turn comes once a batch is committed and acknowledged.
            held.pop();
            assert!(
                waiting.now_or_never().flatten().is_some(),
                "{owned} owned: its turn came"
            );
        }
    }

    #[test]
    fn room_for_more_than_the_fetch_budget_is_the_whole_budget_and_none_once_the_agent_stops() {
        use futures_util::FutureExt;
        let shutdown = CancellationToken::new();
        let budget = tokio::sync::Semaphore::new(FETCH_BYTES_BUDGET);
        let all = fetch_room(&budget, &shutdown, usize::MAX).now_or_never();
        let all = all.flatten().expect("never more than there is to wait for");
        assert_eq!(all.num_permits(), FETCH_BYTES_BUDGET);
        let mut waiting = Box::pin(fetch_room(&budget, &shutdown, MIN_FETCH_BYTES));
        assert!((&mut waiting).now_or_never().is_none());
        shutdown.cancel();
        assert_eq!(
            waiting.now_or_never().map(|room| room.is_none()),
            Some(true)
        );
    }

    #[test]
    fn a_message_larger_than_the_share_is_fetched_by_itself() {
        let share = 1 << 20;
        // (batch, size of the first message, fetched alone) -> what the rest of the fetch
        // asks for (messages, bytes)
        let table = [
            ((100, 1_000), Some((99, share - 1_000))),
            ((100, share - 1), Some((99, 1))),
            // One byte, which no message fits: 0 would ask for no bound.
            ((100, share), Some((99, 1))),
            ((100, 2 << 20), Some((99, 1))),
            ((2, 10), Some((1, share - 10))),
            ((1, 10), None),
            ((1, 2 << 20), None),
        ];
        for ((batch, first), expected) in table {
            assert_eq!(
                rest_after_first(batch, share, first),
                expected,
                "batch {batch}, first message of {first} bytes"
            );
        }
    }

    #[test]
    fn stops_count_in_a_row_only_at_one_position_of_one_stream() {
        // (where the consumer last stopped and how many times in a row, where it stops now
        // as (stream, position)) -> how many times in a row it has stopped there
        let table = [
            ((None, (7, 10)), 1),
            ((Some(((7, 10), 1)), (7, 10)), 2),
            ((Some(((7, 10), 2)), (7, 10)), 3),
            // Another position, or the same position in another stream: from 1 again.
            ((Some(((7, 10), 1)), (7, 11)), 1),
            ((Some(((7, 11), 1)), (8, 11)), 1),
        ];
        for ((last, at), expected) in table {
            assert_eq!(stops_in_a_row(last, at), expected, "{last:?}, then {at:?}");
        }
        // The second stop in a row at one position is the one that reads by sequence.
        assert_eq!(STOPS_BEFORE_READING_BY_SEQUENCE, 2);
    }

    #[test]
    fn reading_by_sequence_starts_after_the_store_position_when_it_is_further_on() {
        // (position the consumer stopped at, what the store records in this stream) -> the
        // sequence after which messages are read
        let table = [
            ((10, Recorded::At(10)), 10),
            // Committed after the consumer stopped (in doubt, or its acks failed).
            ((10, Recorded::At(15)), 15),
            ((10, Recorded::At(3)), 10),
            ((0, Recorded::At(4)), 4),
            ((10, Recorded::Nothing), 10),
            ((0, Recorded::Nothing), 0),
            // Another stream's position says nothing of this one.
            ((10, Recorded::OtherStream { seq: 15 }), 10),
            ((10, Recorded::UnmarkedOther { seq: 15 }), 10),
        ];
        for ((stopped_at, stored), expected) in table {
            assert_eq!(
                read_after(stopped_at, stored),
                expected,
                "stopped at {stopped_at}, store at {stored:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_consumer_stuck_in_the_nats_client_is_dropped_a_grace_after_the_stop() {
        let shutdown = CancellationToken::new();
        let grace = Duration::from_secs(5);
        let ended = within_grace_of_stop(async { 7 }, &shutdown, grace).await;
        assert_eq!(ended, Some(7), "work that ends is waited for");

        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            stop.cancel();
        });
        let started = tokio::time::Instant::now();
        let stuck = std::future::pending::<()>();
        assert_eq!(within_grace_of_stop(stuck, &shutdown, grace).await, None);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(65),
            "the stop, then the grace"
        );

        // Work that ends within the grace after the stop is waited for.
        let finishing = async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            "acknowledged"
        };
        let ended = within_grace_of_stop(finishing, &shutdown, grace).await;
        assert_eq!(ended, Some("acknowledged"));
    }
}
