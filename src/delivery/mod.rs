//! The delivery loop: drains the outbox to the destination.
//!
//! One task owns the loop's state; requests run as their own tasks (`request`) and report
//! back; one thread (the [`settler`]) writes their outcomes to the store in groups.
//!
//! - **Reading**: a read-ahead window ([`queue::Queue`]) of durable pending exports, filled in
//!   order from a cursor, bounded by count and by bytes (`window`); new commits wake the loop.
//!   Exports put back or dropped by the CLI make it start over from the head of the outbox; so
//!   does a profile moving whose exports the full window let go of (they waited behind a
//!   failing one).
//! - **Order**: a profile has at most one export out at a time. A delivered (or dead-lettered)
//!   export's removal is made durable before that profile's next export is sent, so once the
//!   endpoint acknowledged an export, no older one of that profile is sent again, whatever
//!   crash follows. Removals of many deliveries share one transaction and one flush, and request
//!   slots never wait for them.
//! - **Retries**: a failed export gets its own next-attempt time (exponential backoff, with
//!   `Retry-After` as a floor); its profile's later exports wait behind it, other profiles go on.
//! - **Pressure**: how many requests are in flight, how fast they start, and whether the
//!   destination is probed one request at a time because it looks down is the
//!   [`controller::Controller`]'s decision, fed every answer.
//! - **Batches**: with `delivery.max_profiles_per_request` > 1, whatever ready exports of
//!   distinct profiles there are go together as a JSON array; an array refused with a 4xx is
//!   split and its exports sent alone, so only an export refused on its own is dead-lettered.

pub mod auth;
pub mod client;
pub mod controller;
mod credentials;
use credentials::CustomHeaders;
pub mod proxy;
pub mod queue;
pub mod quota;
mod request;
pub mod retry;
pub mod settler;
mod window;

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use hyper::Uri;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::RunClock;
use crate::config::Config;
use crate::log_limit::{self, LogLimit};
use crate::logging::panic_message;
use crate::metrics::{DeliveryOutcome, Metrics, RetryCause};
use crate::store::outbox::{ExportChange, Outcome};
use crate::store::{Export, Store, StoreError};
use auth::TokenSource;
use client::HttpClient;
use controller::{Controller, ControllerConfig, Signal};
use queue::{Queue, MAX_HELD};
pub use request::{request_body, user_agent};
use request::{secrets_to_hide, Attempted, Batch};
use retry::{NoAnswer, RetrySchedule, Verdict};
pub use settler::RecordingFailure;
use settler::Settler;
use window::{
    read_retry_passed, retry_instant, wants_read, window, window_full, DOWN_READ_BACK, FIRST_READ,
    MAX_HELD_BYTES, READ_CHUNK,
};

/// A failed read of the outbox is tried again after this long.
const READ_RETRY: Duration = Duration::from_secs(1);
/// At shutdown, outcomes are waited for this long beyond the request timeout; what is not
/// recorded by then stays pending (sent again: at least once).
const STOP_GRACE: Duration = Duration::from_secs(5);
/// While this many deliveries and dead letters wait to be recorded, no request starts: a store
/// that refuses to record them (a damaged tally, say, which does not stop reads as a full disk
/// does) would otherwise have the loop send the head export of every profile in the outbox,
/// each outcome held in memory until it is recorded. Failed attempts are held one per export
/// meanwhile ([`settler`]).
const MAX_SETTLING: usize = 65_536;

/// Whether requests may start (and a permit be waited for): not while delivery is paused
/// (`outpost delivery pause`: no probe either), nor while a put-back holds them, nor while
/// `settling` outcomes wait to be recorded, [`MAX_SETTLING`] or more. Requests in flight
/// finish and are recorded whatever this says.
fn may_start_requests(paused: bool, requests_held: bool, settling: usize) -> bool {
    !paused && !requests_held && settling < MAX_SETTLING
}

/// Why delivery ended before it was told to stop. Everything not recorded stays pending and is
/// sent again after a restart.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryStopped {
    #[error("the delivery loop panicked: {0}")]
    Panicked(String),
    #[error("the thread that records deliveries in the store stopped: {0}")]
    SettlerGone(String),
}

/// A wake-up even without commits: picks up expiries and anything missed.
const IDLE_TICK: Duration = Duration::from_secs(1);
/// The window starts over to read exports it let go of at most this often (the idle tick
/// wakes it for that).
const LET_GO_START_OVER_EVERY: Duration = Duration::from_secs(1);

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A failed attempt, as its exports' retries are scheduled from it.
struct Failure {
    error: String,
    retry_after: Option<Duration>,
    retry: retry::Retry,
    /// The endpoint may have taken the request without answering.
    unanswered: bool,
}

/// A read of the outbox: which read it was, where the cursor got to, and what was read.
struct Read {
    generation: u64,
    cursor: u64,
    /// Heads let go of that were read back ([`Queue::read_back`]), rather than the outbox
    /// from the cursor on.
    heads: Vec<(Arc<str>, u64)>,
    exports: Result<Vec<Export>, crate::store::StoreError>,
    /// Of `heads`, how many were looked up (the rest are to be read later).
    heads_looked_up: usize,
}

struct Finished {
    batch: Batch,
    /// When its permit was taken.
    started_at: Instant,
    /// When the request went out, after any wait for a token: the endpoint's answer time is
    /// what the round-trip times and the latency metric judge, not the token endpoint's.
    sent_at: Instant,
    attempted: Attempted,
}

/// Everything a request task needs; shared by all of them.
pub struct Deliverer {
    store: Arc<Store>,
    client: HttpClient,
    tokens: Arc<TokenSource>,
    endpoint: Uri,
    headers: CustomHeaders,
    /// What of `headers`, `endpoint` and the config's secrets is hidden in error answers
    /// ([`secrets_to_hide`]).
    secrets_to_hide: Vec<String>,
    max_profiles_per_request: usize,
    /// See [`window()`].
    window: usize,
    max_age: Duration,
    request_timeout: Duration,
    /// `delivery.rate_limit_headers`: whether answers' advertised quotas are read.
    rate_limit_headers: bool,
    clock: RunClock,
    controller: ControllerConfig,
    metrics: Arc<Metrics>,
    recording_failure: Arc<RecordingFailure>,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A certificate or key file the configuration names (the message names the key).
    #[error("{0}")]
    Files(String),
    #[error("destination: {0}")]
    Client(client::ClientError),
    #[error("destination.http_endpoint: {0}")]
    Endpoint(String),
}

impl From<client::ClientError> for SetupError {
    fn from(e: client::ClientError) -> Self {
        match e {
            client::ClientError::Config(message) => SetupError::Files(message),
            other => SetupError::Client(other),
        }
    }
}

impl SetupError {
    /// A mistake in the configuration (exit status 2), not a failure.
    pub fn is_config(&self) -> bool {
        matches!(self, SetupError::Files(_) | SetupError::Endpoint(_))
    }
}

impl Deliverer {
    /// `client` is made from `config` beforehand (`agent::Ready`): it may read key files only
    /// root may read.
    pub fn new(
        config: &Config,
        client: HttpClient,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> Result<Deliverer, SetupError> {
        let tokens = Arc::new(
            TokenSource::new(
                config.destination.auth.clone(),
                client.clone(),
                metrics.token_fetches.clone(),
            )
            .with_expiry(metrics.token_expiry.clone()),
        );
        let endpoint: Uri = config
            .destination
            .http_endpoint
            .as_str()
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| SetupError::Endpoint(e.to_string()))?;
        let headers = credentials::custom_headers(
            &config.destination.custom_headers,
            config.destination.custom_headers_file.clone(),
        );
        let d = &config.delivery;
        let secrets_to_hide = secrets_to_hide(
            config
                .destination
                .custom_headers
                .iter()
                .map(|(_, v)| v.expose()),
            endpoint.query(),
            config.secrets_held().into_iter(),
        );
        Ok(Deliverer {
            clock: store.run_clock(),
            store,
            client,
            tokens,
            endpoint,
            headers,
            secrets_to_hide,
            max_profiles_per_request: d.max_profiles_per_request,
            window: window(d.max_concurrency, d.max_profiles_per_request),
            max_age: d.max_age,
            request_timeout: d.request_timeout,
            rate_limit_headers: d.rate_limit_headers,
            controller: ControllerConfig {
                max_concurrency: d.max_concurrency,
                fixed: d.fixed_concurrency,
                initial_backoff: d.initial_backoff,
                max_backoff: d.max_backoff,
                jitter: true,
                request_timeout: d.request_timeout,
            },
            metrics,
            recording_failure: Arc::default(),
        })
    }

    /// Why deliveries cannot be recorded now, while they cannot (`/healthz` reads it).
    pub fn recording_failure(&self) -> Arc<RecordingFailure> {
        Arc::clone(&self.recording_failure)
    }

    /// Switches the backoff jitter off, for tests that assert exact delays.
    pub fn without_jitter(mut self) -> Self {
        self.controller.jitter = false;
        self
    }

    fn new_backoff(&self) -> RetrySchedule {
        let c = &self.controller;
        RetrySchedule::new(c.initial_backoff, c.max_backoff, c.jitter)
    }

    /// Runs until `shutdown`; then lets the requests in flight finish, records their outcomes
    /// durably, and returns. `wake` is notified on commits and repairs. Ends early, with an
    /// error, when the thread that records outcomes is gone: nothing could settle any more.
    pub async fn run(
        self: Arc<Self>,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
    ) -> Result<(), DeliveryStopped> {
        self.store.set_request_timeout(self.request_timeout);
        if !self.record_that_delivery_runs(&shutdown).await {
            return Ok(());
        }
        let (settler, mut settled, settler_thread) =
            Settler::start(Arc::clone(&self.store), self.recording_failure());
        let (done_tx, mut done) = mpsc::unbounded_channel::<Finished>();
        let (read_tx, mut reads) = mpsc::unbounded_channel::<Read>();
        let mut state = LoopState {
            queue: Queue::default(),
            controller: Controller::new(self.controller, Instant::now()),
            cursor: 0,
            settling: 0,
            reading: false,
            read_generation: 0,
            out_at_read: HashSet::new(),
            read_retry_at: None,
            changes: Vec::new(),
            retry_stored: HashSet::new(),
            out_at_rewind: HashSet::new(),
            let_go_start_over: None,
            settler,
            logs: Logs::default(),
            last_failure: None,
        };
        let mut stop_by: Option<Instant> = None;
        // Whether the loop stopped with nothing out: requests it gave up on may still be
        // acknowledged, unrecorded.
        let all_recorded: bool;
        let mut settler_gone = false;
        // One timer for the idle tick, moved forward when it fires rather than made anew on
        // every turn of the loop.
        let idle = tokio::time::sleep(IDLE_TICK);
        tokio::pin!(idle);
        loop {
            let stopping = shutdown.is_cancelled();
            let now = Instant::now();
            if !stopping {
                // No put-back or drop can run while requests are started, and one that ran
                // since the last turn is seen before any: an export put back under an older
                // number is never overtaken by a newer one of its profile held here.
                self.store.unless_rewound(|rewound| {
                    // At most once a second: when an outage ends, the profiles let go of
                    // settle one after another, and each start-over reads the window again.
                    let let_go_moved = state.queue.start_over_wanted()
                        && state
                            .let_go_start_over
                            .is_none_or(|at| now.duration_since(at) >= LET_GO_START_OVER_EVERY);
                    if let_go_moved {
                        tracing::debug!("reading again the exports let go of to make room");
                        state.let_go_start_over = Some(now);
                    }
                    if rewound {
                        tracing::debug!(
                            "exports were put back or dropped; reading the outbox again"
                        );
                        state
                            .out_at_rewind
                            .extend(state.queue.out().iter().copied());
                    }
                    if rewound || let_go_moved {
                        state.queue.forget_held();
                        state.cursor = 0;
                        state.read_generation += 1;
                        state.reading = false;
                    }
                    state.queue.wake_due(now);
                    if may_start_requests(
                        self.store.delivery_paused(),
                        self.store.requests_held(),
                        state.settling,
                    ) {
                        // Should starting them panic, a put-back must not take the count
                        // from before for the truth.
                        self.store.set_exports_out(usize::MAX);
                        self.start_requests(&mut state, &done_tx, &shutdown, now);
                    }
                    self.store.set_exports_out(state.queue.out().len());
                });
                self.refill(&mut state, &read_tx, now);
            }
            state.settler.send(std::mem::take(&mut state.changes));
            self.forget_down_when_idle(&mut state);
            self.publish(&state);
            state.logs.say_left_out(now);
            if stopping {
                let deadline = *stop_by.get_or_insert(now + self.request_timeout + STOP_GRACE);
                let done = state.controller.in_flight() == 0 && state.settling == 0;
                if done || now >= deadline {
                    all_recorded = done;
                    if !done {
                        tracing::warn!(
                            in_flight = state.controller.in_flight(),
                            unrecorded = state.settling,
                            "stopping before every outcome was recorded; those exports stay pending"
                        );
                    }
                    break;
                }
            }
            let timer = if stopping {
                stop_by
            } else {
                // While paused or a put-back holds requests, no permit is taken, so none is
                // waited for; nor while too many outcomes wait to be recorded (their group's
                // record wakes the loop). A resume wakes the loop.
                let may_start = may_start_requests(
                    self.store.delivery_paused(),
                    self.store.requests_held(),
                    state.settling,
                );
                let permit_at = if !may_start {
                    None
                } else {
                    let wanted = state.queue.ready().div_ceil(self.max_profiles_per_request);
                    state.controller.next_permit_at(now, wanted)
                };
                [state.queue.next_due(), permit_at, state.read_retry_at]
                    .into_iter()
                    .flatten()
                    .min()
            };
            tokio::select! {
                Some(finished) = done.recv() => {
                    self.finish(&mut state, finished);
                    while let Ok(finished) = done.try_recv() {
                        self.finish(&mut state, finished);
                    }
                }
                Some(read) = reads.recv() => {
                    self.read_done(&mut state, read, Instant::now());
                }
                group = settled.recv() => {
                    // The thread sends until its channel is closed, after this loop: ended
                    // before, it panicked.
                    let Some(group) = group else {
                        settler_gone = true;
                        all_recorded = false;
                        break;
                    };
                    for s in group {
                        if s.vanished {
                            state.queue.remove(&s.profile, s.seq);
                            state.retry_stored.remove(&s.seq);
                        } else {
                            state.settling -= 1;
                            state.queue.settled(&s.profile, s.seq);
                        }
                        // Out when a put-back or drop began, it came back before it settled
                        // or vanished; unless it is out again (a failed export sent again
                        // before its outcome was recorded), nothing is to come back of it.
                        if !state.queue.out().contains(&s.seq) {
                            state.out_at_rewind.remove(&s.seq);
                        }
                        if state.reading {
                            state.out_at_read.insert(s.seq);
                        }
                    }
                }
                _ = wake.notified(), if !stopping => {}
                _ = sleep_until_or_never(timer), if timer.is_some() => {}
                _ = &mut idle, if !stopping => idle.as_mut().reset(Instant::now() + IDLE_TICK),
                _ = shutdown.cancelled(), if !stopping => {}
            }
        }
        // Every change handed over is applied before the agent's last flush, failed attempts
        // too (which the loop does not wait for): a restart keeps their retry times. The
        // settler ends once its channel, closed here, is drained, or at its first write that
        // fails from here on (a full disk); `settled` stays open for it.
        drop(state);
        let joined = tokio::task::spawn_blocking(move || settler_thread.join());
        let joined = tokio::time::timeout(STOP_GRACE, joined).await;
        drop(settled);
        // Nothing is sent any more: a put-back need not wait, unless an export given up on may
        // still be acknowledged (then a put-back keeps waiting, and fails).
        let recorded = all_recorded && matches!(joined, Ok(Ok(Ok(true))));
        self.store
            .set_exports_out(if recorded { 0 } else { usize::MAX });
        if recorded {
            if let Err(e) = self.store.delivery_stopped_recorded() {
                tracing::debug!(error = %e, "not recorded that every outcome was; the next start errs towards refusing put-backs");
            }
        }
        match joined {
            Ok(Ok(Err(panic))) => Err(DeliveryStopped::SettlerGone(panic_message(&*panic))),
            _ if settler_gone => Err(DeliveryStopped::SettlerGone("it ended".into())),
            Err(_) => {
                tracing::warn!("the last failed attempts were not recorded in time; they stay pending as they were");
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Records, durably, that delivery runs before anything is sent (see
    /// `store::unrecorded`), trying again while the store cannot be written. `false` if told
    /// to stop first.
    async fn record_that_delivery_runs(&self, shutdown: &CancellationToken) -> bool {
        let mut said = false;
        loop {
            let store = Arc::clone(&self.store);
            let written = tokio::task::spawn_blocking(move || store.delivery_starting()).await;
            match written {
                Ok(Ok(())) => return true,
                // A compaction under way: written once it is done.
                Ok(Err(e @ StoreError::Reopening(_))) => {
                    tracing::debug!(error = %e, "cannot record that delivery starts yet")
                }
                Ok(Err(e)) if !said => {
                    said = true;
                    tracing::error!(error = %e, "cannot record in the store that delivery starts; nothing is sent until it is")
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "cannot record that delivery starts"),
                Err(e) => panic!("recording that delivery starts: {e}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(READ_RETRY) => {}
                _ = shutdown.cancelled() => return false,
            }
        }
    }

    /// Starts a read of the store when the window runs low (or few profiles are ready) and
    /// there is something to read. The read runs on a blocking thread (the outbox may be cold
    /// on disk) and its result comes back to the loop; sending goes on meanwhile.
    fn refill(&self, state: &mut LoopState, reads: &mpsc::UnboundedSender<Read>, now: Instant) {
        if state.reading || !read_retry_passed(&mut state.read_retry_at, now) {
            return;
        }
        let down = state.controller.is_down();
        let ready = state.queue.ready();
        let full = |queue: &Queue<RetrySchedule>| window_full(queue.held(), queue.held_bytes());
        // Heads let go of whose time came go back while the window has room. While the
        // destination looks down they would only be probes that failed before, so they wait
        // until nothing else is ready.
        if !full(&state.queue) {
            let n = match (down, ready) {
                (false, _) => READ_CHUNK,
                (true, 0) => DOWN_READ_BACK,
                (true, _) => 0,
            };
            let heads = state
                .queue
                .take_heads_to_read(n.min(MAX_HELD - state.queue.held()));
            if !heads.is_empty() {
                self.read_back(state, reads, heads);
                return;
            }
        }
        if state.cursor >= self.store.durable_next_seq() {
            return;
        }
        // While down, exports ready again after failing count as not ready for reading on,
        // since a probe prefers one that did not fail: the window reads on while it has none.
        // It stops at its bound all the same; only then does it let go of exports to read on
        // (below), since reading on through the outbox makes sled's cache grow: letting go
        // of the exports behind failing heads while down took the agent bench's backlog case
        // (destination down) from 102 to 213 MiB at its peak; `heaptrack` of a store of that
        // shape put most of the heap's rise in outbox nodes that sled's cache kept after the
        // window read on through the outbox (README, on the read-ahead).
        let fresh = !down || state.queue.has_fresh_ready();
        let wanted = |queue: &Queue<RetrySchedule>| {
            let held = (queue.held(), queue.held_bytes());
            let ready = if down { usize::from(fresh) } else { ready };
            wants_read(self.window, held, ready, down)
        };
        if !wanted(&state.queue) {
            // Nothing can go and the window is full of exports waiting behind failing ones:
            // those go (read again once their profile moves), so that the exports of other
            // profiles, which may go, are read. While down, failing heads with nothing behind
            // them go too, so that exports that may show the destination back are read.
            if !full(&state.queue) {
                return;
            }
            let mut let_go = 0;
            if ready == 0 {
                let_go += state.queue.let_go_of_blocked(now);
            }
            if !fresh {
                let_go += state.queue.let_go_of_failed_heads(now);
            }
            if let_go == 0 || !wanted(&state.queue) {
                return;
            }
        }
        let (held, held_bytes) = (state.queue.held(), state.queue.held_bytes());
        state.reading = true;
        // An export out now may be read again (after a start-over); by the time the read is
        // back it may have been delivered or put back already, so it is skipped.
        state.out_at_read = state.queue.out().clone();
        let (store, reads) = (Arc::clone(&self.store), reads.clone());
        let (generation, mut cursor) = (state.read_generation, state.cursor);
        // An empty window reads a little first, so that sending starts before a long read of
        // a cold outbox is done.
        let chunk = if held == 0 { FIRST_READ } else { READ_CHUNK };
        let limit = (MAX_HELD - held).min(chunk);
        // The store counts stored sizes, the window its estimate of the memory taken: close
        // enough for a bound that is about a size.
        let max_bytes = MAX_HELD_BYTES - held_bytes;
        tokio::task::spawn_blocking(move || {
            let exports = store.read_pending(&mut cursor, limit, max_bytes);
            let _ = reads.send(Read {
                generation,
                cursor,
                heads: Vec::new(),
                exports,
                heads_looked_up: 0,
            });
        });
    }

    /// Reads back the heads let go of whose retry time came, by their sequence numbers.
    fn read_back(
        &self,
        state: &mut LoopState,
        reads: &mpsc::UnboundedSender<Read>,
        heads: Vec<(Arc<str>, u64)>,
    ) {
        state.reading = true;
        let (store, reads) = (Arc::clone(&self.store), reads.clone());
        let (generation, cursor) = (state.read_generation, state.cursor);
        let max_bytes = MAX_HELD_BYTES - state.queue.held_bytes();
        tokio::task::spawn_blocking(move || {
            let seqs: Vec<u64> = heads.iter().map(|(_, seq)| *seq).collect();
            let (exports, heads_looked_up) = match store.read_pending_by_seq(&seqs, max_bytes) {
                Ok((exports, looked_up)) => (Ok(exports), looked_up),
                Err(e) => (Err(e), 0),
            };
            let _ = reads.send(Read {
                generation,
                cursor,
                heads,
                exports,
                heads_looked_up,
            });
        });
    }

    fn read_done(&self, state: &mut LoopState, read: Read, now: Instant) {
        if read.generation != state.read_generation {
            return; // started before the outbox changed under the window
        }
        state.reading = false;
        if !read.heads.is_empty() {
            self.heads_read(state, read, now);
            return;
        }
        match read.exports {
            Ok(exports) => {
                state.cursor = read.cursor;
                let uptime_ms = self.clock.uptime_ms();
                let longest = self.controller.max_backoff.max(retry::MAX_RETRY_AFTER);
                for export in exports {
                    if !state.out_at_read.contains(&export.id.seq) {
                        let at = retry_instant(export.retry_at_uptime_ms, uptime_ms, now, longest);
                        state.queue.push_waiting(export, at);
                    }
                }
            }
            Err(e) => {
                log_read_error(&e, self.store.is_failed());
                state.read_retry_at = Some(now + READ_RETRY);
            }
        }
        state.out_at_read.clear();
    }

    fn heads_read(&self, state: &mut LoopState, read: Read, now: Instant) {
        let mut heads = read.heads;
        match read.exports {
            Ok(exports) => {
                let later = heads.split_off(read.heads_looked_up);
                let mut read: HashMap<u64, Export> =
                    exports.into_iter().map(|e| (e.id.seq, e)).collect();
                for (profile, seq) in heads {
                    state.queue.read_back(&profile, seq, read.remove(&seq));
                }
                state.queue.read_back_later(later);
            }
            Err(e) => {
                log_read_error(&e, self.store.is_failed());
                state.queue.read_back_later(heads);
                state.read_retry_at = Some(now + READ_RETRY);
            }
        }
    }

    /// Starts as many requests as the controller allows, each with up to
    /// `max_profiles_per_request` ready exports.
    fn start_requests(
        self: &Arc<Self>,
        state: &mut LoopState,
        done: &mpsc::UnboundedSender<Finished>,
        stop: &CancellationToken,
        now: Instant,
    ) {
        loop {
            let wanted = state.queue.ready().div_ceil(self.max_profiles_per_request);
            let permits = state.controller.permits(now, wanted);
            if permits == 0 {
                return;
            }
            for _ in 0..permits {
                let mut batch = if state.controller.is_down() {
                    state.queue.take_probe().into_iter().collect()
                } else {
                    state.queue.take(self.max_profiles_per_request)
                };
                batch.retain(|(profile, export)| {
                    let expired = self.clock.expired(&export.record, self.max_age);
                    if expired {
                        self.expire(state, profile, export);
                    }
                    !expired
                });
                if batch.is_empty() {
                    continue;
                }
                state.controller.started(now);
                let (this, done, stop) = (Arc::clone(self), done.clone(), stop.clone());
                tokio::spawn(async move {
                    // A panic must still report back: the controller counts the request as in
                    // flight and the profile as busy until it does.
                    let mut sent_at = now;
                    let attempted = AssertUnwindSafe(this.attempt(&batch, &mut sent_at, &stop))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|_| Attempted::SendFailed {
                            error: "internal error while sending (see the log)".into(),
                            timeout: false,
                            nothing_sent: false,
                        });
                    let _ = done.send(Finished {
                        batch,
                        started_at: now,
                        sent_at,
                        attempted,
                    });
                });
            }
        }
    }

    fn expire(&self, state: &mut LoopState, profile: &Arc<str>, export: &Export) {
        state.settle(
            profile,
            export,
            ExportChange::Expired {
                max_age_s: self.max_age.as_secs(),
                at_ms: now_ms(),
            },
        );
        self.metrics.record_delivery(DeliveryOutcome::Expired, None);
        if state.logs.expired.admit(Instant::now()) {
            tracing::warn!(export = %export.id, %profile, "export expired; dead-lettered");
        }
    }

    /// Books what a request came to: the controller hears of it once, each export of it moves
    /// on (settles, waits for its retry time, or is split off to go alone).
    fn finish(&self, state: &mut LoopState, finished: Finished) {
        let Finished {
            batch,
            started_at,
            sent_at,
            mut attempted,
        } = finished;
        attempted.cut_error();
        let now = Instant::now();
        let dropped = self.dropped_while_out(state, &batch);
        let mut unanswered = false;
        let (error, retry_after, retry) = match attempted {
            Attempted::NotSent => {
                state.controller.withdrawn(started_at);
                Self::put_back_unsent(state, batch, &dropped);
                return;
            }
            Attempted::Answered {
                status,
                retry_after,
                quota,
                token_dropped_before,
                error,
            } => {
                if let Some(quota) = quota {
                    state.controller.heard_quota(now, sent_at, quota);
                    if let Some(until) = state.controller.quota_spent_until(now) {
                        state.logs.quota_spent(now, until);
                    }
                }
                if status == 429 {
                    if let Some(end) = state.controller.heard_429(now, sent_at, retry_after) {
                        tracing::debug!(
                            wait_ms = end.saturating_duration_since(now).as_millis() as u64,
                            "the endpoint's 429s count down to one time: requests wait for it"
                        );
                    }
                }
                match retry::verdict(status, token_dropped_before, batch.len() > 1) {
                    Verdict::Delivered => {
                        state
                            .controller
                            .answered_after(now, started_at, sent_at, Signal::Healthy);
                        self.delivered(state, &batch, now.saturating_duration_since(sent_at));
                        tracing::debug!(exports = batch.len(), status, "delivered");
                        return;
                    }
                    Verdict::Rejected => {
                        state
                            .controller
                            .answered_after(now, started_at, sent_at, Signal::Neutral);
                        self.reject(state, batch, error, &dropped);
                        return;
                    }
                    // After a 401/403 the request task dropped the token; a new one goes with
                    // the retry, at once the first time, whatever its Retry-After says.
                    Verdict::Retry(retry) if retry.cause == RetryCause::Auth => {
                        (error, None, retry)
                    }
                    Verdict::Retry(retry) => (error, retry_after, retry),
                }
            }
            Attempted::TokenFailed { error, retry_after } => {
                state.controller.unanswered(started_at, false);
                (
                    error,
                    retry_after,
                    retry::retry_without_answer(NoAnswer::Token),
                )
            }
            Attempted::SendFailed {
                error,
                timeout,
                nothing_sent,
            } => {
                // The endpoint may have taken a request it did not answer.
                unanswered = !nothing_sent;
                state.controller.unanswered(started_at, unanswered);
                let why = match timeout {
                    true => NoAnswer::Timeout,
                    false => NoAnswer::Connection,
                };
                (error, None, retry::retry_without_answer(why))
            }
        };
        state
            .controller
            .answered_after(now, started_at, sent_at, retry.signal);
        state.last_failure = Some((retry.cause, error.clone()));
        let failure = Failure {
            error,
            retry_after,
            retry,
            unanswered,
        };
        self.schedule_retries(state, batch, &dropped, failure, now);
    }

    /// Exports whose request never left go back as they were, but those dropped meanwhile.
    fn put_back_unsent(state: &mut LoopState, batch: Batch, dropped: &[u64]) {
        for (profile, export) in batch {
            if dropped.contains(&export.id.seq) {
                state.queue.settled(&profile, export.id.seq);
            } else {
                state.queue.put_back(&profile, export, None);
            }
        }
    }

    fn delivered(&self, state: &mut LoopState, batch: &Batch, latency: Duration) {
        for (profile, export) in batch {
            // Its stored retry time, if any, goes with it.
            let retried =
                export.retry_at_uptime_ms.is_some() || state.retry_stored.contains(&export.id.seq);
            state.settle(profile, export, ExportChange::Delivered { retried });
            self.metrics
                .record_delivery(DeliveryOutcome::Delivered, Some(latency));
        }
    }

    /// Each export of a failed attempt waits for its own retry time, kept in the store too;
    /// after an auth refusal the first retry of a profile goes at once, with a new token.
    fn schedule_retries(
        &self,
        state: &mut LoopState,
        batch: Batch,
        dropped: &[u64],
        failure: Failure,
        now: Instant,
    ) {
        let Failure {
            error,
            retry_after,
            retry,
            unanswered,
        } = failure;
        let at_ms = now_ms();
        let uptime_ms = self.clock.uptime_ms();
        for (profile, export) in batch {
            if dropped.contains(&export.id.seq) {
                state.queue.settled(&profile, export.id.seq);
                continue;
            }
            let delay =
                if retry.cause == RetryCause::Auth && !state.queue.token_refused_again(&profile) {
                    None
                } else {
                    let delay = state
                        .queue
                        .backoff_of(&profile, || {
                            self.new_backoff()
                                .after_failures(retry::failures_before(&export.record))
                        })
                        .map_or(Duration::ZERO, |b| b.next_delay(retry_after));
                    Some(
                        self.clock
                            .retry_before_expiry(&export.record, self.max_age, delay),
                    )
                };
            let retry_at = delay.map(|d| now + d);
            // Kept in the store too, so that a restart does not send it before its time.
            let retry_at_uptime_ms = delay.map(|d| uptime_ms.saturating_add(d.as_millis() as u64));
            if state.logs.failed.admit(now) {
                let retry_in_ms = delay.unwrap_or_default().as_millis() as u64;
                tracing::info!(export = %export.id, %profile, %error, retry_in_ms, "delivery failed; will retry");
            }
            self.metrics.record_delivery(retry.outcome(), None);
            self.metrics.record_retry(retry.cause);
            if unanswered {
                // Before a put-back can see the export no longer out.
                self.store.attempt_unanswered(export.id.seq);
            }
            state.changes.push(Outcome {
                profile: Arc::clone(&profile),
                seq: export.id.seq,
                change: ExportChange::Failed {
                    error: error.clone(),
                    at_ms,
                    retry_at_uptime_ms,
                    unanswered,
                },
            });
            // Even without a retry time, an earlier unanswered attempt keeps an entry.
            state.retry_stored.insert(export.id.seq);
            state.queue.put_back(&profile, export, retry_at);
        }
    }

    /// A non-retryable 4xx: an export refused on its own is dead-lettered; an array is split
    /// and its exports sent alone.
    fn reject(&self, state: &mut LoopState, mut batch: Batch, error: String, dropped: &[u64]) {
        if batch.len() > 1 {
            if state.logs.split.admit(Instant::now()) {
                tracing::info!(exports = batch.len(), %error, "an array was refused; sending its exports one by one");
            }
            self.metrics.record_split();
            for (profile, export) in batch {
                if dropped.contains(&export.id.seq) {
                    state.queue.settled(&profile, export.id.seq);
                    continue;
                }
                state.queue.set_solo(&profile);
                state.queue.put_back(&profile, export, None);
            }
            return;
        }
        let (profile, export) = batch.pop().expect("a request holds an export");
        if state.logs.rejected.admit(Instant::now()) {
            tracing::warn!(export = %export.id, %profile, %error, "export rejected; dead-lettered");
        }
        self.metrics.record_delivery(DeliveryOutcome::Dead, None);
        state.settle(
            &profile,
            &export,
            ExportChange::Rejected {
                error,
                at_ms: now_ms(),
            },
        );
    }

    /// The exports of a finished request that `outbox drop` removed while it was out. Such an
    /// export must not be put back into the window for another attempt: the record of its
    /// outcome would find it gone, but not before the window had sent it again. Only exports
    /// out at the last put-back or drop are looked up in the store.
    fn dropped_while_out(&self, state: &mut LoopState, batch: &Batch) -> Vec<u64> {
        let dropped: Vec<u64> = batch
            .iter()
            .map(|(_, export)| export.id.seq)
            .filter(|seq| state.out_at_rewind.remove(seq))
            .filter(|&seq| {
                // Unknown: kept, and sent again at worst (at least once).
                !self.store.is_pending(seq).unwrap_or(true)
            })
            .collect();
        for seq in &dropped {
            state.retry_stored.remove(seq);
        }
        dropped
    }

    /// While the destination looks down with nothing left to deliver (its last exports
    /// dropped or expired), or with delivery paused, it is not probed, and is no longer
    /// counted as down ([`Controller::forget_down`]): a pause begun during an outage would
    /// otherwise keep `outpost_destination_down` at 1, and its alert firing, until resumed.
    fn forget_down_when_idle(&self, state: &mut LoopState) {
        if !state.controller.is_down() || state.controller.in_flight() != 0 {
            return;
        }
        let why = if self.store.delivery_paused() {
            "delivery is paused while the destination looked down: it no longer counts as down, and the first request after `outpost delivery resume` finds out whether it is"
        } else if state.queue.held() == 0
            && !state.reading
            // The outbox asked last: exports the window let go of are not held, yet wait.
            && self.store.tally().is_ok_and(|tally| tally.pending == 0)
        {
            "nothing is left to deliver while delivery looked down: the destination no longer counts as down, and the next export finds out whether it is"
        } else {
            return;
        };
        state.controller.forget_down();
        self.metrics.destination_down.set(0);
        tracing::warn!("{why}");
    }

    fn publish(&self, state: &LoopState) {
        let m = &self.metrics;
        m.concurrency_limit.set(state.controller.limit() as i64);
        m.in_flight.set(state.controller.in_flight() as i64);
        m.rate_cap
            .set(state.controller.rate_cap().map_or(0, |r| r.round() as i64));
        m.quota_left.set(
            state
                .controller
                .quota_left(Instant::now())
                .map_or(-1, |left| left as i64),
        );
        m.retry_waiting.set(state.queue.waiting() as i64);
        m.window_exports.set(state.queue.held() as i64);
        m.window_bytes.set(state.queue.held_bytes() as i64);
        m.delivery_paused
            .set(i64::from(self.store.delivery_paused()));
        let down = state.controller.is_down();
        // Said once each way: the failures themselves are logged a few at a time.
        // Both at warn: an operator who logs warnings alone sees trouble end as it began.
        let (cause, last_error) = match &state.last_failure {
            Some((cause, error)) => (Some(*cause), error.as_str()),
            None => (None, ""),
        };
        match (m.destination_down.get() == 1, down) {
            (false, true) if cause == Some(RetryCause::Token) => tracing::warn!(
                last_error = %last_error,
                "no token can be had (the token endpoint failed, or said when to ask again): trying one request at a time on the backoff schedule; exports wait in the outbox"
            ),
            (false, true) => tracing::warn!(
                last_error = %last_error,
                "the destination looks down (every request failed for a while): probing it one request at a time on the backoff schedule; exports wait in the outbox"
            ),
            (true, false) => tracing::warn!("the destination answers again; delivery goes on"),
            _ => {}
        }
        m.destination_down.set(i64::from(down));
    }
}

/// The loop's own state; only the loop task touches it.
struct LoopState {
    queue: Queue<RetrySchedule>,
    controller: Controller,
    /// The next sequence number to read from the outbox.
    cursor: u64,
    /// Changes sent to the settler that will come back as settled.
    settling: usize,
    /// A read of the store is under way.
    reading: bool,
    /// Counts the starts-over; a read started before the last one is thrown away.
    read_generation: u64,
    /// What was out when the running read started, and what came back since.
    out_at_read: HashSet<u64>,
    read_retry_at: Option<Instant>,
    /// Changes made in this turn of the loop, sent to the settler together at its end.
    changes: Vec<Outcome>,
    /// Exports with a failed attempt in this run, which may have stored a retry entry, until
    /// they settle: their delivery removes it, also after a re-read of the outbox that did
    /// not see it yet.
    retry_stored: HashSet<u64>,
    /// Exports that were out when exports were last put back or dropped, until they come
    /// back: one dropped meanwhile must not go back into the window (see
    /// [`Deliverer::dropped_while_out`]).
    out_at_rewind: HashSet<u64>,
    /// When the window last started over to read exports it let go of.
    let_go_start_over: Option<Instant>,
    settler: Settler,
    logs: Logs,
    /// Why the last failed attempt failed, and its error: said when the destination comes to
    /// look down, naming the token endpoint when it was the one that failed.
    last_failure: Option<(RetryCause, String)>,
}

/// The lines logged per export, each kind limited (see [`log_limit`]).
#[derive(Debug, Default)]
struct Logs {
    failed: LogLimit,
    rejected: LogLimit,
    expired: LogLimit,
    /// Arrays refused and split: an endpoint that takes no arrays refuses every one.
    split: LogLimit,
    /// When a spent quota was last said ([`Logs::quota_spent`]).
    quota_spent_said: Option<Instant>,
}

/// A wait for an advertised quota is said at most this often: an endpoint whose every answer
/// says its window is spent would otherwise have it said each window.
const QUOTA_SPENT_SAID_EVERY: Duration = Duration::from_secs(600);
/// Shorter waits for a quota are the pacing a quota asks for, not worth a line.
const QUOTA_WAIT_WORTH_SAYING: Duration = Duration::from_secs(1);

/// Whether a wait for a spent quota until `until`, heard `now`, is said, the last one having
/// been said at `said`: only the operator sees nothing else of it (`outbox stats`, `top` and
/// the metrics show the requests left, not why delivery crawls).
fn quota_wait_said(said: Option<Instant>, now: Instant, until: Instant) -> bool {
    until.saturating_duration_since(now) >= QUOTA_WAIT_WORTH_SAYING
        && said.is_none_or(|said| now >= said + QUOTA_SPENT_SAID_EVERY)
}

impl Logs {
    /// The endpoint advertised, in an answer heard `now`, that its window has nothing left
    /// until `until`.
    fn quota_spent(&mut self, now: Instant, until: Instant) {
        if !quota_wait_said(self.quota_spent_said, now, until) {
            return;
        }
        self.quota_spent_said = Some(now);
        let wait_s = until.saturating_duration_since(now).as_secs();
        tracing::info!(
            wait_s,
            "the endpoint advertises its request quota spent (a RateLimit header with remaining 0): requests wait {wait_s} s for its window to start again, and exports wait in the outbox meanwhile (said at most every 10 minutes; delivery.rate_limit_headers = false ignores these headers)"
        );
    }

    /// Says how many lines of each kind the windows over by `now` left out.
    fn say_left_out(&mut self, now: Instant) {
        let window_s = log_limit::WINDOW.as_secs();
        if let Some(n) = self.failed.left_out(now) {
            tracing::info!(
                attempts = n,
                "more failed delivery attempts in the last {window_s} s, not logged one by one (outpost_deliveries_total counts them)"
            );
        }
        if let Some(n) = self.rejected.left_out(now) {
            tracing::warn!(
                exports = n,
                "more exports rejected and dead-lettered in the last {window_s} s, not logged one by one (`outpost outbox list --dead` lists them)"
            );
        }
        if let Some(n) = self.expired.left_out(now) {
            tracing::warn!(
                exports = n,
                "more exports expired and dead-lettered in the last {window_s} s, not logged one by one (`outpost outbox list --dead` lists them)"
            );
        }
        if let Some(n) = self.split.left_out(now) {
            tracing::info!(
                arrays = n,
                "more arrays refused and sent one export at a time in the last {window_s} s, not logged one by one (outpost_delivery_array_splits_total counts them; an endpoint that takes no arrays wants delivery.max_profiles_per_request = 1)"
            );
        }
    }
}

impl LoopState {
    /// Hands a change that ends the export's time in the outbox to the settler; the profile
    /// stays busy until it is durable.
    fn settle(&mut self, profile: &Arc<str>, export: &Export, change: ExportChange) {
        debug_assert!(change.settles());
        self.retry_stored.remove(&export.id.seq);
        self.settling += 1;
        self.changes.push(Outcome {
            profile: Arc::clone(profile),
            seq: export.id.seq,
            change,
        });
    }
}

/// At debug level while the store is failed or reopened: that was logged once already.
fn log_read_error(e: &StoreError, store_failed: bool) {
    if store_failed || matches!(e, StoreError::Reopening(_)) {
        tracing::debug!(error = %e, "cannot read the outbox; trying again shortly");
    } else {
        tracing::error!(error = %e, "cannot read the outbox; trying again shortly");
    }
}

async fn sleep_until_or_never(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_for_a_spent_quota_is_said_when_long_and_not_said_of_late() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        // (last said, heard at, spent until) -> said
        let table = [
            ((None, at(0), at(10)), true),
            ((None, at(0), at(1)), true),
            // The pacing of a quota, not a wait.
            ((None, at(0), start + Duration::from_millis(999)), false),
            ((Some(at(0)), at(10), at(20)), false),
            ((Some(at(0)), at(599), at(700)), false),
            ((Some(at(0)), at(600), at(700)), true),
        ];
        for ((said, now, until), expected) in table {
            assert_eq!(
                quota_wait_said(said, now, until),
                expected,
                "said {said:?}, now {now:?}, until {until:?}"
            );
        }
    }

    #[test]
    fn no_request_starts_while_paused_or_a_put_back_holds_them_or_too_many_outcomes_wait() {
        // (paused, requests held, outcomes settling) -> requests may start. The figures are
        // the bound README states, 65,536.
        let table = [
            ((false, false, 0), true),
            ((false, false, 1), true),
            ((false, false, 65_535), true),
            // A store that refuses to record outcomes: they pile up to the bound, no further.
            ((false, false, 65_536), false),
            ((false, false, 65_537), false),
            ((false, false, usize::MAX), false),
            ((false, true, 0), false),
            ((false, true, 65_535), false),
            ((false, true, 65_536), false),
            // Paused: nothing starts, whatever else holds.
            ((true, false, 0), false),
            ((true, false, 65_535), false),
            ((true, false, 65_536), false),
            ((true, true, 0), false),
        ];
        for ((paused, held, settling), expected) in table {
            assert_eq!(
                may_start_requests(paused, held, settling),
                expected,
                "paused {paused}, requests held {held}, settling {settling}"
            );
        }
    }
}
