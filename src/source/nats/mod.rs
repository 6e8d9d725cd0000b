//! The NATS JetStream source: the connection, and the start of one durable pull consumer per
//! owned partition, with what they share. The stream's set-up and the checks made of it are in
//! `stream`; how a partition is consumed, in `consume`.

mod consume;
mod stream;

pub use consume::consumer_name;
use consume::{consume_partition, FETCH_BYTES_BUDGET};
pub use stream::{
    check_partitions, last_sequence, probe, recorded_made_at, recorded_partitions, setup,
    stray_subjects, stream_config, stream_warnings, Probed, SetupOutcome, StraySubjects,
};

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::claim;
use super::config::{NatsAuth, NatsSource};
use crate::log_limit::AtMostEvery;
use crate::metrics::Metrics;
use crate::store::committer::Committer;
use crate::store::Store;

/// How long the agent gives NATS, at start or once the connection is lost, before it says it
/// cannot connect; and how often it looks again.
const CONNECT_GRACE: Duration = Duration::from_secs(3);
/// How often the warning that NATS cannot be reached is said again while it lasts (the
/// client tries every few seconds).
const UNREACHABLE_SAID_EVERY: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
#[error("NATS: {0}")]
pub struct NatsError(pub String);

pub(crate) fn nats_error(what: &str, e: impl std::fmt::Display) -> NatsError {
    NatsError(format!("{what}: {e}"))
}

/// Whether looking a stream up failed because there is no such stream.
pub(crate) fn no_such_stream(e: &jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(ref j)
            if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// Connects to the servers of `[source.nats]`. With `keep_trying`, the connection is made in
/// the background and re-made whenever it breaks (the agent); without, a failure is an error
/// (the CLI).
pub async fn connect(
    config: &NatsSource,
    keep_trying: bool,
) -> Result<async_nats::Client, NatsError> {
    connect_counting(config, keep_trying, Arc::default()).await
}

/// What the client's events tell of its connection.
#[derive(Default)]
struct ConnectionEvents {
    /// How many times the connection was lost.
    breaks: AtomicU64,
    /// Attempts to connect that failed since the connection was last made.
    failed_attempts: AtomicU64,
    /// Why the last of them failed, as the client says it (`authorization violation`).
    last_failure: std::sync::Mutex<Option<String>>,
}

impl ConnectionEvents {
    fn on(&self, event: async_nats::Event) {
        match event {
            async_nats::Event::Connected => {
                self.failed_attempts.store(0, Ordering::SeqCst);
                *self.last_failure() = None;
                tracing::info!("connected to NATS")
            }
            async_nats::Event::Disconnected => {
                self.breaks.fetch_add(1, Ordering::SeqCst);
                tracing::warn!("disconnected from NATS; reconnecting")
            }
            // A permissions violation surfaces here alone: the request it refused
            // only times out.
            async_nats::Event::ServerError(error) => {
                tracing::warn!(%error, "the NATS server reported an error")
            }
            // A failed attempt to connect, said by its kind alone (the client logs the
            // detail); the warning that NATS cannot be reached gives it.
            async_nats::Event::ClientError(error) => {
                let reason = match error {
                    async_nats::ClientError::Other(reason) => reason,
                    other => other.to_string(),
                };
                tracing::debug!(%reason, "an attempt to connect to NATS failed");
                self.failed_attempts.fetch_add(1, Ordering::SeqCst);
                *self.last_failure() = Some(reason);
            }
            other => tracing::debug!(event = %other, "NATS event"),
        }
    }

    fn last_failure(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.last_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What to look at when attempts to connect fail for `reason` (the kind of failure the NATS
/// client names).
fn connect_failure_hint(reason: &str) -> &'static str {
    if client_certificate_refused(reason) {
        return CLIENT_CERTIFICATE_HINT;
    }
    match reason {
        "authorization violation" => {
            "the server refused source.nats's credentials: check user and password, token or creds_file, and the server's accounts"
        }
        "failed signing nonce" => "source.nats.creds_file could not sign the server's challenge: check its seed",
        "TLS error" => {
            "check that the server speaks TLS where source.nats asks for it, and that its certificate is signed by a CA this host or source.nats.tls_ca_file trusts"
        }
        "DNS error" => "check the host names of source.nats.servers",
        _ => "check that the server runs and that this host can reach source.nats.servers (firewall, port)",
    }
}

/// [`connect`], telling `events` what the client's events say.
async fn connect_counting(
    config: &NatsSource,
    keep_trying: bool,
    events: Arc<ConnectionEvents>,
) -> Result<async_nats::Client, NatsError> {
    let mut options = match &config.auth {
        NatsAuth::CredsFile(path) => {
            let file = super::creds::CredsFile::open(path).map_err(|e| {
                NatsError(format!("source.nats.creds_file {}: {e}", path.display()))
            })?;
            let file = Arc::new(file);
            async_nats::ConnectOptions::with_auth_callback(move |nonce| {
                let file = Arc::clone(&file);
                async move { file.auth(&nonce) }
            })
        }
        NatsAuth::Token(token) => {
            async_nats::ConnectOptions::new().token(token.expose().to_owned())
        }
        NatsAuth::UserPassword { user, password } => async_nats::ConnectOptions::new()
            .user_and_password(user.clone(), password.expose().to_owned()),
        NatsAuth::None => async_nats::ConnectOptions::new(),
    };
    if let Some(ca) = &config.tls_ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &config.tls_client_cert {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if config.requires_tls() {
        options = options.require_tls(true);
    }
    options = options
        .name(format!("outpost/{}", env!("CARGO_PKG_VERSION")))
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let events = Arc::clone(&events);
            async move { events.on(event) }
        });
    if keep_trying {
        options = options.retry_on_initial_connect();
    } else {
        options = options.max_reconnects(3);
    }
    let servers: Vec<&str> = config.servers.iter().map(String::as_str).collect();
    options.connect(servers).await.map_err(|e| {
        let error = e.to_string();
        let hint = match client_certificate_refused(&error) {
            true => format!(" ({CLIENT_CERTIFICATE_HINT})"),
            false => String::new(),
        };
        NatsError(format!(
            "cannot connect to {}: {error}{hint}",
            config.servers.join(", ")
        ))
    })
}

/// Whether a failure to connect (`error`, as the NATS client tells it) is the server's TLS
/// alert that it refused this client's certificate, or the lack of one.
fn client_certificate_refused(error: &str) -> bool {
    [
        "BadCertificate",
        "CertificateRequired",
        "UnknownCA",
        "certificate required",
    ]
    .iter()
    .any(|alert| error.contains(alert))
}

const CLIENT_CERTIFICATE_HINT: &str = "the server refused this client's TLS certificate, or wants one: set source.nats.tls_cert_file and tls_key_file to a certificate a CA the server trusts signed";

/// Says in the log, once at start, when the stream holds messages no agent consumes, or has
/// limits that remove updates before they are consumed.
async fn warn_of_unconsumed_updates(shared: Arc<Shared>) {
    let found = async {
        let stream = shared
            .js
            .get_stream(&shared.config.stream)
            .await
            .map_err(|e| nats_error("the stream", e))?;
        for warning in stream_warnings(&stream.cached_info().config) {
            tracing::warn!(stream = %shared.config.stream, "{warning}");
        }
        stray_subjects(&stream, &shared.config).await
    };
    let found = tokio::select! {
        found = found => found,
        _ = shared.shutdown.cancelled() => return,
    };
    match found {
        Ok(stray) if !stray.is_empty() => {
            tracing::warn!(stream = %shared.config.stream, "{}", stray.describe());
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "could not list the stream's subjects"),
    }
}

/// What `/healthz` and `/metrics` show of the source.
pub struct SourceState {
    client: async_nats::Client,
    pub stream: String,
    pub owned: Vec<u32>,
    paused: AtomicBool,
    /// Messages waiting in the stream per owned partition, as of the last fetch.
    pending: Vec<AtomicU64>,
    /// Per owned partition, how its last try to consume it ended ([`Left`]).
    left: Vec<AtomicU8>,
    acks: AtomicU64,
    events: Arc<ConnectionEvents>,
    /// The owned partitions whose consumers did not end within the grace after the stop.
    unended_at_stop: std::sync::Mutex<Vec<u32>>,
}

impl SourceState {
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    pub fn acks(&self) -> u64 {
        self.acks.load(Ordering::Relaxed)
    }

    /// `(partition, pending)` for every owned partition.
    pub fn pending(&self) -> Vec<(u32, u64)> {
        self.owned
            .iter()
            .zip(&self.pending)
            .map(|(p, n)| (*p, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// The owned partitions left alone because another agent's store claims them.
    pub fn claimed_elsewhere(&self) -> Vec<u32> {
        self.owned_where(Left::ClaimedElsewhere)
    }

    fn owned_where(&self, left: Left) -> Vec<u32> {
        self.owned
            .iter()
            .zip(&self.left)
            .filter(|(_, l)| l.load(Ordering::Relaxed) == left as u8)
            .map(|(p, _)| *p)
            .collect()
    }

    /// Records how the try to consume the partition of `slot` ended.
    fn set_left(&self, slot: usize, left: Left) {
        self.left[slot].store(left as u8, Ordering::Relaxed);
    }

    /// Whether no owned partition is consumed: each is left alone or failing.
    fn consumed_none(&self) -> bool {
        self.left
            .iter()
            .all(|l| l.load(Ordering::Relaxed) != Left::Consumed as u8)
    }

    fn state(&self) -> &'static str {
        if !self.connected() {
            "disconnected"
        } else if self.paused() {
            "paused"
        } else if !self.owned.is_empty() && self.consumed_none() {
            "consuming none"
        } else {
            "consuming"
        }
    }

    /// Sets the source's gauges to what they are now: read when shown (`/metrics`,
    /// `outpost top`), not kept up to date as they change.
    pub fn set_gauges(&self, metrics: &crate::metrics::Metrics) {
        metrics.source_connected.set(i64::from(self.connected()));
        metrics.source_paused.set(i64::from(self.paused()));
        let left_alone = self.claimed_elsewhere().len();
        metrics.source_claimed_elsewhere.set(left_alone as i64);
        for (partition, pending) in self.pending() {
            metrics.set_source_pending(partition, pending);
        }
    }

    /// Says in one line which partitions' consumers did not end within the grace after the
    /// stop, once the consumers' tasks are over (with NATS unreachable, that is every one).
    pub fn say_unended_at_stop(&self) {
        let mut unended = std::mem::take(
            &mut *self
                .unended_at_stop
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if unended.is_empty() {
            return;
        }
        unended.sort_unstable();
        tracing::warn!(
            partitions = %super::partition::format_owned(&unended),
            grace_s = consume::STOP_GRACE.as_secs(),
            "consumers did not end within the grace after the stop (NATS unreachable?); \
             messages they held unacknowledged come again at the next start (those already committed are skipped)"
        );
    }

    /// The object `/healthz` carries under `nats`.
    pub fn to_json(&self) -> serde_json::Value {
        let pending: serde_json::Map<String, serde_json::Value> = self
            .pending()
            .into_iter()
            .map(|(p, n)| (p.to_string(), n.into()))
            .collect();
        serde_json::json!({
            "state": self.state(),
            "stream": self.stream,
            "owned": super::partition::format_owned(&self.owned),
            "pending": pending,
            "claimed_elsewhere": self.claimed_elsewhere(),
            "handed_over": self.owned_where(Left::HandedOver),
            "failing": self.owned_where(Left::Failing),
            "acks": self.acks(),
        })
    }
}

/// How a partition's last try to consume it ended, as `/healthz` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Left {
    /// Consumed, or not tried yet.
    Consumed = 0,
    /// Left alone: another store claims it (see `claim`).
    ClaimedElsewhere,
    /// Left alone: this store handed it over (`outpost nats hand-over`), or a hand-over or
    /// take-over of it here has not finished.
    HandedOver,
    /// No consumer could be made (the stream missing, the consumer refused), tried again.
    Failing,
}

/// What the consumer tasks share.
struct Shared {
    config: NatsSource,
    js: jetstream::Context,
    /// This store's claim on the partitions it owns (see `claim`).
    claim_as: String,
    store: Arc<Store>,
    committer: Committer,
    metrics: Arc<Metrics>,
    state: Arc<SourceState>,
    max_outbox_bytes: u64,
    /// `ingest.max_future_s`: the same limit on timestamps as HTTP ingest.
    max_future_s: u64,
    shutdown: CancellationToken,
    /// The fetch budget's bytes not held by a partition's batch (`consume::fetch_room`).
    fetch_room: tokio::sync::Semaphore,
}

/// Why the NATS source did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Connect(NatsError),
    /// The stream cannot serve this configuration (made for another partition count, other
    /// subjects, a retention that drops what no consumer holds): no restart mends it.
    #[error("{0}")]
    Stream(NatsError),
}

/// How long the start waits for NATS to look the stream over: a server that does not answer
/// by then leaves it to the consumers, which keep trying.
const CONNECT_AT_START: Duration = Duration::from_secs(1);
const STREAM_AT_START: Duration = Duration::from_secs(3);

/// Refuses a stream that cannot serve `config`, when NATS answers within a moment: each
/// partition's consumer would otherwise fail on it for ever, one warning each, with the agent
/// running and healthy.
async fn refuse_an_unusable_stream(
    config: &NatsSource,
    js: &jetstream::Context,
    state: &SourceState,
) -> Result<(), StartError> {
    let connected = tokio::time::timeout(CONNECT_AT_START, async {
        while !state.connected() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    if connected.await.is_err() {
        return Ok(());
    }
    match tokio::time::timeout(STREAM_AT_START, js.get_stream(&config.stream)).await {
        Ok(Ok(stream)) => {
            check_partitions(stream.cached_info(), config).map_err(StartError::Stream)
        }
        // Not there yet (`nats setup` to come), or no answer: the consumers say so.
        _ => Ok(()),
    }
}

/// Connects (in the background) and starts one consumer task per owned partition.
pub async fn start(
    config: &NatsSource,
    store: Arc<Store>,
    committer: Committer,
    metrics: Arc<Metrics>,
    (max_outbox_bytes, max_future_s): (u64, u64),
    shutdown: CancellationToken,
) -> Result<(Arc<SourceState>, Vec<JoinHandle<()>>), StartError> {
    store.set_max_rejected(config.max_rejected);
    let recounting = Arc::clone(&store);
    let max_rejected = config.max_rejected;
    tokio::task::spawn_blocking(move || {
        if let Err(e) = recounting.recount_rejected_if_full(max_rejected) {
            tracing::warn!(error = %e, "counting the rejected messages again failed");
        }
    });
    let events = Arc::<ConnectionEvents>::default();
    let client = connect_counting(config, true, Arc::clone(&events))
        .await
        .map_err(StartError::Connect)?;
    let state = Arc::new(SourceState {
        events,
        client: client.clone(),
        stream: config.stream.clone(),
        owned: config.owned.clone(),
        paused: AtomicBool::new(false),
        pending: config.owned.iter().map(|_| AtomicU64::new(0)).collect(),
        left: config.owned.iter().map(|_| AtomicU8::default()).collect(),
        acks: AtomicU64::new(0),
        unended_at_stop: std::sync::Mutex::default(),
    });
    let shared = Arc::new(Shared {
        config: config.clone(),
        js: jetstream::new(client),
        claim_as: claim::holder(store.store_id(), &claim::host_name()),
        store,
        committer,
        metrics,
        state: Arc::clone(&state),
        max_outbox_bytes,
        max_future_s,
        shutdown,
        fetch_room: tokio::sync::Semaphore::new(FETCH_BYTES_BUDGET),
    });
    refuse_an_unusable_stream(config, &shared.js, &state).await?;
    tokio::spawn(warn_while_unreachable(
        Arc::clone(&state),
        config.servers.join(", "),
        shared.shutdown.clone(),
    ));
    tokio::spawn(warn_of_unconsumed_updates(Arc::clone(&shared)));
    let tasks = config
        .owned
        .iter()
        .enumerate()
        .map(|(slot, &partition)| {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move { consume_partition(&shared, slot, partition).await })
        })
        .collect();
    tracing::info!(
        stream = %config.stream,
        owned = %config.owned.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
        "consuming NATS partitions"
    );
    Ok((state, tasks))
}

/// Says so when NATS cannot be reached, at start or once the connection is lost, with why the
/// last attempt failed; again every [`UNREACHABLE_SAID_EVERY`] while it lasts. The client
/// tries again in the background, and the consumers' own errors (requests that time out)
/// would not say why.
async fn warn_while_unreachable(
    state: Arc<SourceState>,
    servers: String,
    shutdown: CancellationToken,
) {
    let mut said = AtMostEvery::new(UNREACHABLE_SAID_EVERY);
    // Looks in a row that found the connection down.
    let mut down_for = 0u32;
    while pause(&shutdown, CONNECT_GRACE).await {
        if state.connected() {
            // The next outage is said at once.
            said = AtMostEvery::new(UNREACHABLE_SAID_EVERY);
            down_for = 0;
            continue;
        }
        down_for += 1;
        let last_failure = state.events.last_failure().clone();
        // An attempt may take a while to fail (a connection timeout of 5 s, a slow DNS):
        // its reason is worth waiting for, a little.
        if last_failure.is_none() && down_for < 10 {
            continue;
        }
        if said.due(tokio::time::Instant::now()).is_none() {
            continue;
        }
        let failed_attempts = state.events.failed_attempts.load(Ordering::SeqCst);
        match last_failure {
            Some(reason) => tracing::warn!(
                %servers,
                %reason,
                failed_attempts,
                hint = connect_failure_hint(&reason),
                "cannot connect to NATS; trying again in the background (`/healthz` shows nats.state)"
            ),
            None => tracing::warn!(
                %servers,
                "cannot connect to NATS; no attempt has ended yet; trying again in the background (`/healthz` shows nats.state)"
            ),
        }
    }
}

/// Sleeps, or returns false at once when the agent stops.
async fn pause(shutdown: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = shutdown.cancelled() => false,
    }
}
