//! `outpost run`: the store, the committer, the delivery loop, the ingest API, the admin
//! socket and (with `[source.nats]`) the stream consumers, started together and stopped together.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use futures_util::FutureExt;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::Watcher;
use crate::config::Config;
use crate::delivery::client::HttpClient;
use crate::delivery::{Deliverer, DeliveryStopped, SetupError};
use crate::logging::panic_message;
use crate::metrics::Metrics;
use crate::server::{admin, ingest, ingest_token::IngestToken, tls::IngestAcceptor};
use crate::source::partition::Ownership;
use crate::store::committer::{CommitError, Committer, Watch};
use crate::store::{backfill, ReserveState, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Setup(#[from] SetupError),
    #[error("{}", crate::explain::listen("ingest.listen", .addr, .source))]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    NatsStart(#[from] crate::source::nats::StartError),
    #[error("{0}")]
    Tls(String),
    /// A file `[source.nats]` names cannot be used.
    #[error("{0}")]
    NatsFiles(String),
    #[error("cannot create the admin socket in {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}; the agent stopped (nothing pending is lost: start it again)")]
    Delivery(#[from] DeliveryStopped),
    #[error("the committer stopped: {0}; the agent stopped (nothing acknowledged is lost: start it again)")]
    Committer(String),
    #[error("{0}; the agent stopped (nothing acknowledged is lost: start it again)")]
    Task(String),
}

impl AgentError {
    /// A mistake in the configuration (a certificate file that cannot be read, say), or a
    /// store that starting again cannot mend (its files damaged): exit status 2, as for the
    /// configuration's other errors, which a service manager does not restart on.
    pub fn is_config(&self) -> bool {
        match self {
            AgentError::Setup(e) => e.is_config(),
            AgentError::Tls(_)
            | AgentError::NatsFiles(_)
            | AgentError::NatsStart(crate::source::nats::StartError::Stream(_)) => true,
            AgentError::Store(e) => e.restart_cannot_mend(),
            _ => false,
        }
    }
}

/// Options that tests and the demo change.
#[derive(Debug, Clone, Copy)]
pub struct AgentOptions {
    pub jitter: bool,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions { jitter: true }
    }
}

/// What `outpost run` readies with root's rights before it acts as the owner of a store folder
/// another user owns (`store::StoreOwner`): the ingest port, which may be one only root may
/// bind, and what reads key files (the ingest TLS acceptor, the delivery client), which may be
/// root's alone.
pub struct Ready {
    client: HttpClient,
    tls: Option<Arc<IngestAcceptor>>,
    /// `ingest.listen`, bound but not listening: a connection made before the store is open is
    /// refused rather than left waiting unserved. A port another program listens on is found
    /// here; one that binds it meanwhile with `SO_REUSEADDR` (Linux lets it, as no one listens
    /// yet) makes listening fail once the store is open.
    socket: TcpSocket,
}

impl Ready {
    pub async fn new(config: &Config) -> Result<Ready, AgentError> {
        let client = HttpClient::new(&config.destination, config.delivery.request_timeout)
            .map_err(SetupError::from)?;
        let tls = match &config.ingest.tls {
            Some(tls) => Some(crate::server::tls::acceptor(tls).map_err(AgentError::Tls)?),
            None => None,
        };
        let addr = config.ingest.listen;
        let listen_error = |source: std::io::Error| {
            tracing::debug!(error = ?source, %addr, "binding ingest.listen");
            AgentError::Listen { addr, source }
        };
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(listen_error)?;
        // As `TcpListener::bind` sets it: a port left in TIME_WAIT by the last run is taken.
        socket.set_reuseaddr(true).map_err(listen_error)?;
        socket.bind(addr).map_err(listen_error)?;
        Ok(Ready {
            client,
            tls,
            socket,
        })
    }

    /// Starts listening on `ingest.listen`.
    fn listen(socket: TcpSocket, addr: SocketAddr) -> Result<TcpListener, AgentError> {
        socket
            .listen(LISTEN_BACKLOG)
            .map_err(|source| AgentError::Listen { addr, source })
    }
}

/// As `TcpListener::bind` asks for.
const LISTEN_BACKLOG: u32 = 1024;

/// A started agent.
pub struct Agent {
    pub listen_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub store: Arc<Store>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<Option<()>>>,
    source: Option<Arc<crate::source::nats::SourceState>>,
    delivery: JoinHandle<Result<(), DeliveryStopped>>,
    clock: JoinHandle<Option<Watcher>>,
    /// What the committer thread panicked with, should it have.
    committer_failure: Arc<OnceLock<String>>,
    /// Which task panicked first, and with what, should one have.
    task_failure: Arc<OnceLock<String>>,
}

impl Agent {
    pub async fn start(config: &Config, options: AgentOptions) -> Result<Agent, AgentError> {
        Agent::start_with(config, options, None).await
    }

    /// [`Agent::start`] with the port bound and the key files read beforehand ([`Ready`]).
    pub async fn start_ready(
        config: &Config,
        options: AgentOptions,
        ready: Ready,
    ) -> Result<Agent, AgentError> {
        Agent::start_with(config, options, Some(ready)).await
    }

    async fn start_with(
        config: &Config,
        options: AgentOptions,
        ready: Option<Ready>,
    ) -> Result<Agent, AgentError> {
        if let Some(nats) = &config.nats {
            nats.check_files().map_err(AgentError::NatsFiles)?;
        }
        // Before the store is opened (made, the first time) and the mapping recorded in it:
        // a key file that cannot be used or a port another program listens on changes
        // nothing there.
        let Ready {
            client,
            tls,
            socket,
        } = match ready {
            Some(ready) => ready,
            None => Ready::new(config).await?,
        };
        let metrics = Arc::new(Metrics::new());
        metrics
            .outbox_max_bytes
            .set(i64::try_from(config.storage.max_outbox_bytes).unwrap_or(i64::MAX));
        let (store, watcher, mapping) = start_store(config, &metrics).await?;
        if let Some(warning) = crate::store::readable_by_others_warning(&config.storage.path) {
            tracing::warn!("{warning}");
        }
        keep_reserve(&store, config.storage.reserve_bytes).await?;
        let free = crate::store::free_bytes(&config.storage.path).ok();
        let max_outbox_bytes = config.storage.max_outbox_bytes;
        if let Some(warning) = free.and_then(|free| {
            crate::explain::outbox_room_warning(free, max_outbox_bytes, store.reserve_kept())
        }) {
            tracing::warn!("{warning}");
        }
        let listener = Ready::listen(socket, config.ingest.listen)?;
        let wake = Arc::new(Notify::new());
        let shutdown = CancellationToken::new();
        // Should starting fail, or be given up (a signal drops this future), what started so
        // far is told to stop: delivery would otherwise go on sending until the process ends.
        let started_so_far = shutdown.clone().drop_guard();
        let committer_failure: Arc<OnceLock<String>> = Arc::default();
        let counted = Arc::clone(&metrics);
        let watch = Watch {
            on_stored: Box::new(move |stored| counted.record_commit(stored)),
            on_panic: stop_on_committer_panic(Arc::clone(&committer_failure), shutdown.clone()),
        };
        // The committer thread ends with the process; every commit it acknowledged was flushed.
        let (mut committer, _committer_thread) = Committer::start_watched(
            Arc::clone(&store),
            Arc::new(mapping),
            Arc::clone(&wake),
            watch,
        );
        if let Some(nats) = &config.nats {
            committer = committer.owning(Ownership::new(nats.partitions, &nats.owned));
        }
        for warning in &config.warnings {
            tracing::warn!("{warning}");
        }
        let mut deliverer =
            Deliverer::new(config, client, Arc::clone(&store), Arc::clone(&metrics))?;
        if !options.jitter {
            deliverer = deliverer.without_jitter();
        }
        let listen_addr = listener.local_addr().map_err(|source| AgentError::Listen {
            addr: config.ingest.listen,
            source,
        })?;
        let admin_listener =
            admin::bind(&config.storage.path).map_err(|source| AgentError::Socket {
                path: config.storage.path.display().to_string(),
                source,
            })?;

        let task_failure: Arc<OnceLock<String>> = Arc::default();
        let clock = stop_if_it_panics(
            "the run-time clock".to_string(),
            tokio::spawn(watcher.run(shutdown.clone())),
            Arc::clone(&task_failure),
            shutdown.clone(),
        );
        let delivery_running = Arc::new(AtomicBool::new(true));
        let mut tasks = vec![(
            "the look-over of stale retry entries and marks".to_string(),
            tokio::spawn(forget_stale_entries(Arc::clone(&store), shutdown.clone())),
        )];
        let recording_failure = deliverer.recording_failure();
        let delivery = {
            let deliverer = Arc::new(deliverer);
            let run = deliverer.run(Arc::clone(&wake), shutdown.clone());
            tokio::spawn(supervise_delivery(
                run,
                Arc::clone(&delivery_running),
                Arc::clone(&store),
                shutdown.clone(),
            ))
        };
        let source = match &config.nats {
            Some(nats) => {
                metrics.expect_source_messages();
                let (state, consumers) = crate::source::nats::start(
                    nats,
                    Arc::clone(&store),
                    committer.clone(),
                    Arc::clone(&metrics),
                    (config.storage.max_outbox_bytes, config.ingest.max_future_s),
                    shutdown.clone(),
                )
                .await?;
                let partitions = nats.owned.iter();
                tasks.extend(
                    consumers
                        .into_iter()
                        .zip(partitions)
                        .map(|(task, partition)| {
                            (format!("the NATS consumer of partition {partition}"), task)
                        }),
                );
                Some(state)
            }
            None => None,
        };
        let ingest_state = Arc::new(ingest::IngestState {
            store: Arc::clone(&store),
            committer: committer.clone(),
            metrics: Arc::clone(&metrics),
            token: config
                .ingest
                .token
                .clone()
                .map(|token| IngestToken::new(token, config.ingest.token_file.clone())),
            max_body_bytes: config.ingest.max_body_bytes,
            max_future_s: config.ingest.max_future_s,
            read_timeout: config.ingest.read_timeout,
            max_connections: config.ingest.max_connections,
            bodies: crate::server::body::BodyBudget::for_max_body_bytes(
                config.ingest.max_body_bytes,
            ),
            max_outbox_bytes: config.storage.max_outbox_bytes,
            delivery_running,
            committer_failure: Arc::clone(&committer_failure),
            recording_failure,
            source: source.clone(),
            outbox_read_at: tokio::sync::Mutex::default(),
            outbox_reading: Arc::default(),
            refusals: std::sync::Mutex::default(),
            stopping: shutdown.clone(),
        });
        let scheme = if tls.is_some() { "https" } else { "http" };
        tasks.push((
            "the ingest server".to_string(),
            tokio::spawn(ingest::serve(listener, tls, ingest_state, shutdown.clone())),
        ));
        tasks.push((
            "the backfill".to_string(),
            tokio::spawn(run_backfill(
                committer.clone(),
                Arc::clone(&store),
                Arc::clone(&metrics),
                config.storage.max_outbox_bytes,
                shutdown.clone(),
            )),
        ));
        let admin_state = Arc::new(admin::AdminState {
            store: Arc::clone(&store),
            committer,
            metrics: Arc::clone(&metrics),
            wake: Arc::clone(&wake),
            max_outbox_bytes: config.storage.max_outbox_bytes,
            max_future_s: config.ingest.max_future_s,
            owned: config
                .nats
                .as_ref()
                .map(|nats| nats.owned.clone())
                .unwrap_or_default(),
            move_terms: config.move_terms(),
            source: source.clone(),
            run: format!("{:016x}", rand::random::<u64>()),
        });
        tasks.push((
            "the admin socket".to_string(),
            tokio::spawn(admin::serve(admin_listener, admin_state, shutdown.clone())),
        ));
        tasks.push((
            "the store's recovery".to_string(),
            tokio::spawn(recover_store(
                Arc::clone(&store),
                Arc::clone(&wake),
                shutdown.clone(),
            )),
        ));
        let tasks = tasks
            .into_iter()
            .map(|(what, task)| {
                stop_if_it_panics(what, task, Arc::clone(&task_failure), shutdown.clone())
            })
            .collect();
        tracing::info!(
            version = crate::cli::VERSION,
            listen = %listen_addr,
            scheme,
            store = %config.storage.path.display(),
            endpoint = %crate::config::redacted_address(config.destination.http_endpoint.as_str()),
            "outpost is running"
        );
        if let Some(since_ms) = store.delivery_paused_since_ms() {
            tracing::warn!(
                "delivery is paused (since {}); `outpost delivery resume` to deliver",
                crate::store::format_ms(since_ms)
            );
        }
        started_so_far.disarm();
        Ok(Agent {
            listen_addr,
            metrics,
            store,
            shutdown,
            tasks,
            source,
            delivery,
            clock,
            committer_failure,
            task_failure,
        })
    }

    /// A token that stops the agent when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the agent was told to stop, then lets in-flight work finish and flushes.
    pub async fn wait(self) -> Result<(), AgentError> {
        for task in self.tasks {
            let _ = task.await;
        }
        if let Some(source) = &self.source {
            source.say_unended_at_stop();
        }
        let delivery = match self.delivery.await {
            Ok(ended) => ended,
            Err(e) => Err(DeliveryStopped::Panicked(e.to_string())),
        };
        // The last checkpoint of the run time, then the flush that makes it durable.
        let store = Arc::clone(&self.store);
        let last_write = async move {
            if store.is_failed() {
                let recovering = Arc::clone(&store);
                let _ = tokio::task::spawn_blocking(move || recovering.recover()).await;
            }
            if let Ok(Some(mut watcher)) = self.clock.await {
                watcher.tick(true)?;
            }
            store.flush()
        };
        match last_write.await {
            Ok(()) => {}
            // Everything acknowledged was flushed when it was acknowledged; only the last
            // seconds of counted run time are not kept (which errs towards not expiring).
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "the last run-time checkpoint was not written; nothing acknowledged is lost");
            }
            Err(e) => return Err(e.into()),
        }
        delivery?;
        if let Some(panic) = self.committer_failure.get() {
            return Err(AgentError::Committer(panic.clone()));
        }
        if let Some(panic) = self.task_failure.get() {
            return Err(AgentError::Task(panic.clone()));
        }
        tracing::info!("outpost stopped");
        Ok(())
    }

    /// Stops the agent and waits for it.
    pub async fn stop(self) -> Result<(), AgentError> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// What the agent does should its committer thread panic: no update could be stored any more,
/// so `/healthz` stops answering 200 (`failure` is set) and the whole agent stops with the
/// error, for a service manager to start it again, rather than answer 503 to every update.
fn stop_on_committer_panic(
    failure: Arc<OnceLock<String>>,
    shutdown: CancellationToken,
) -> crate::store::committer::OnPanic {
    Box::new(move |panic| {
        let message = panic_message(&*panic);
        tracing::error!(error = %message, "the committer stopped; stopping the agent");
        let _ = failure.set(message);
        shutdown.cancel();
    })
}

/// Waits for one of the agent's tasks. Should it panic, the whole agent stops with what it
/// panicked with (the first such panic is kept for `wait` to return), so that a service
/// manager restarts it: the rest running on without it would take updates while, say, a NATS
/// partition was no longer consumed or ingest no longer served.
fn stop_if_it_panics<T: Send + 'static>(
    what: String,
    task: JoinHandle<T>,
    failure: Arc<OnceLock<String>>,
    shutdown: CancellationToken,
) -> JoinHandle<Option<T>> {
    tokio::spawn(async move {
        let ended = match task.await {
            Ok(value) => return Some(value),
            Err(ended) if ended.is_panic() => ended,
            Err(_) => return None,
        };
        let message = format!("{what} panicked: {}", panic_message(&*ended.into_panic()));
        tracing::error!(error = %message, "stopping the agent");
        let _ = failure.set(message);
        shutdown.cancel();
        None
    })
}

/// Runs the delivery loop. Should it end before `shutdown` (a panic, or the thread that records
/// deliveries gone), `/healthz` stops answering 200, a put-back is refused rather than trust
/// what the loop last said it had out, and the whole agent stops with the error, so that a
/// service manager restarts it rather than letting it take updates it will never deliver.
async fn supervise_delivery(
    run: impl std::future::Future<Output = Result<(), DeliveryStopped>>,
    running: Arc<AtomicBool>,
    store: Arc<Store>,
    shutdown: CancellationToken,
) -> Result<(), DeliveryStopped> {
    let ended = AssertUnwindSafe(run)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| Err(DeliveryStopped::Panicked(panic_message(&*panic))));
    running.store(false, Ordering::Relaxed);
    if let Err(e) = &ended {
        store.set_exports_out(usize::MAX);
        tracing::error!(error = %e, "delivery stopped; stopping the agent");
        shutdown.cancel();
    }
    ended
}

/// Looks the store's retry entries, then its `superseded` marks, over for ones that serve
/// nothing, beside the agent's work (`store/stale.rs`); stops at shutdown.
async fn forget_stale_entries(store: Arc<Store>, shutdown: CancellationToken) {
    let looked = tokio::task::spawn_blocking(move || {
        let stop = || shutdown.is_cancelled();
        [
            ("retry entries", store.forget_stale_retry_entries(stop)),
            ("superseded marks", store.forget_stale_marks(stop)),
        ]
    })
    .await;
    let looked = match looked {
        Ok(looked) => looked,
        Err(e) => {
            tracing::error!(error = %e, "looking the retry entries and superseded marks over failed");
            return;
        }
    };
    for (what, result) in looked {
        match result {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "removed {what} that served nothing"),
            Err(e) => tracing::info!(
                error = %e,
                "the {what} were not all looked over; the next start looks them over again"
            ),
        }
    }
}

/// Keeps the disk space for delivery on a full disk (`storage.reserve_bytes`), saying when it
/// cannot, or when it was given up and updates are refused until there is room.
async fn keep_reserve(store: &Arc<Store>, bytes: u64) -> Result<(), AgentError> {
    let keeping = Arc::clone(store);
    let kept = tokio::task::spawn_blocking(move || keeping.keep_reserve(bytes))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
    let (asked, bytes) = (bytes, crate::explain::bytes(bytes));
    match kept {
        ReserveState::Kept | ReserveState::None => {}
        ReserveState::NotMade { free } => tracing::warn!(
            "the space kept for delivery on a full disk (storage.reserve_bytes, {bytes}) is not made: {} free where the store is, and it is made only where it fits twice over (made once there is room); until then a store that fills its disk itself cannot record its deliveries",
            crate::explain::bytes(free)
        ),
        ReserveState::KeptAtItsSize { kept, free } => tracing::warn!(
            "the space kept for delivery stays at {} (storage.reserve_bytes asks for {bytes}): {} free where the store is, and the new size is made only where it fits twice over",
            crate::explain::bytes(kept),
            crate::explain::bytes(free)
        ),
        ReserveState::GivenUp => tracing::warn!(
            reserve_bytes = asked,
            "the space kept for delivery was given up on a full disk: updates are refused until there is room for it twice over ({bytes} each)"
        ),
    }
    Ok(())
}

/// How often a failed store is checked for room to reopen it.
const RECOVER_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Reopens the store after sled reported an I/O error (a full disk), once there is room, and
/// wakes delivery then. Ingest answers 503 with `Retry-After` meanwhile.
async fn recover_store(store: Arc<Store>, wake: Arc<Notify>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(RECOVER_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // An error that stays (damaged files) is said once, not at every try.
    let mut last_error = String::new();
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        // Given up, or not made for lack of room at the start: kept again once there is room.
        if store.reserve_wanted() {
            let keeping = Arc::clone(&store);
            match tokio::task::spawn_blocking(move || keeping.keep_reserve_again()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "the space for delivery cannot be kept again yet")
                }
                Err(e) => tracing::error!(error = %e, "keeping the space for delivery panicked"),
            }
        }
        if !store.is_failed() {
            continue;
        }
        let recovering = Arc::clone(&store);
        match tokio::task::spawn_blocking(move || recovering.recover()).await {
            Ok(Ok(true)) => wake.notify_one(),
            Ok(Ok(false)) => {}
            Ok(Err(e)) if e.is_transient() => {
                tracing::debug!(error = %e, "the store cannot be reopened yet");
            }
            Ok(Err(e)) => {
                let error = e.to_string();
                if error != last_error {
                    tracing::error!(%error, "the store cannot be reopened; trying again every second");
                    last_error = error;
                }
            }
            Err(e) => tracing::error!(error = %e, "reopening the store panicked"),
        }
    }
}

/// Resolves on SIGTERM, SIGINT or SIGHUP (the terminal of a session that started the agent
/// by hand closed: the agent reloads nothing, and HUP's default would kill it mid-delivery).
/// The handlers are installed when this is called, not when the future is first polled: a
/// signal that comes in between (say, just after the agent started serving) is still a
/// graceful stop, not the default death by signal.
pub fn termination_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    let mut hup = signal(SignalKind::hangup()).expect("installing a SIGHUP handler");
    async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {}
        }
    }
}

/// Between progress lines of a backfill in the log.
const BACKFILL_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// How long the agent waits for a store another process holds: an outpost command that has
/// it open (one started while an agent stopped, say) ends in moments.
const LOCKED_STORE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Opens the store and makes the writes a start makes before anything else (the run-time
/// clock's checkpoint, the export numbers' floor, the mapping), and gives the mapping as the
/// store recorded it. On a full disk it waits for room, saying so, rather than exit: a
/// service manager would start it again every few seconds, each start opening the store.
async fn start_store(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<(Arc<Store>, Watcher, crate::config::Mapping), AgentError> {
    let path = &config.storage.path;
    let mut said = false;
    // Room for the trial write may still be too little for the store: each start that fails
    // for it again waits twice as long before the next, up to [`START_AGAIN_MOST`].
    let mut start_again_after = std::time::Duration::ZERO;
    loop {
        let started = async {
            let store = Arc::new(open_store(config).await?);
            store.number_exports_past_the_clock(std::time::SystemTime::now())?;
            let mut mapping = config.mapping.clone();
            store.record_mapping(&mut mapping, chrono::Utc::now().timestamp_millis())?;
            let watcher = Watcher::start(Arc::clone(&store), Arc::clone(metrics))?;
            Ok::<_, StoreError>((store, watcher, mapping))
        };
        let e = match started.await {
            Err(e) if e.is_no_space() => e,
            Ok(started) => {
                if said {
                    // At warn, as its wait was said.
                    tracing::warn!(store = %path.display(), "there is room on the disk again: the store is open");
                }
                return Ok(started);
            }
            Err(e) => return Err(e.into()),
        };
        // A store that filled its disk itself: the space kept for delivery makes room.
        if crate::store::reserve::give_up_at(path).unwrap_or(false) {
            tracing::warn!(
                store = %path.display(),
                "no space left on device for the store: gave up the space kept for delivery (storage.reserve_bytes) to start; updates are refused until there is room for it twice over"
            );
            continue;
        }
        if !std::mem::replace(&mut said, true) {
            tracing::error!(
                store = %path.display(),
                error = %e,
                "no space left on device for the store: waiting for room to start (looked for every {} s)",
                ROOM_LOOK_EVERY.as_secs()
            );
        } else {
            tracing::debug!(store = %path.display(), error = %e, "still no room to start");
        }
        loop {
            tokio::time::sleep(ROOM_LOOK_EVERY).await;
            let dir = path.clone();
            match tokio::task::spawn_blocking(move || Store::room_for(&dir)).await {
                Ok(Err(e)) if crate::store::is_no_space(&e) => continue,
                // Room, or a trial write that fails otherwise: starting again says why.
                _ => break,
            }
        }
        tokio::time::sleep(start_again_after).await;
        start_again_after = next_start_wait(start_again_after);
    }
}

/// How long the next start waits after one that found too little room, `after` the last:
/// none the first time, then [`ROOM_LOOK_EVERY`], doubling up to [`START_AGAIN_MOST`].
fn next_start_wait(after: std::time::Duration) -> std::time::Duration {
    (after * 2).max(ROOM_LOOK_EVERY).min(START_AGAIN_MOST)
}

/// How often an agent waiting for room on a full disk to start looks for it.
const ROOM_LOOK_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// The longest an agent that found room for its trial write, but then too little to start,
/// waits before it starts again.
const START_AGAIN_MOST: std::time::Duration = std::time::Duration::from_secs(60);

/// Opens the store, waiting up to [`LOCKED_STORE_WAIT`] while another process holds it.
async fn open_store(config: &Config) -> Result<Store, StoreError> {
    let deadline = tokio::time::Instant::now() + LOCKED_STORE_WAIT;
    let mut said = false;
    loop {
        let (path, cache) = (config.storage.path.clone(), config.storage.cache_bytes);
        let opened = tokio::task::spawn_blocking(move || Store::open(&path, cache))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        match opened {
            Err(StoreError::Locked(path)) if tokio::time::Instant::now() < deadline => {
                if !said {
                    said = true;
                    // As `probe_socket`, but bounded: a wedged agent's full backlog would
                    // hold the connect.
                    use crate::server::admin::{socket_path, SocketProbe};
                    let probe = tokio::net::UnixStream::connect(socket_path(&config.storage.path));
                    let probed = tokio::time::timeout(std::time::Duration::from_secs(1), probe);
                    let holder = match probed.await.map(|r| SocketProbe::judge(r.map(drop))) {
                        Ok(SocketProbe::Answers) => {
                            "an agent (`outpost run`) that answers on its admin socket"
                        }
                        Ok(SocketProbe::NotThisUsers) => {
                            "an agent of another user (its admin socket is not open to this one)"
                        }
                        _ => "another process (an outpost command, or an agent starting or stopping?)",
                    };
                    tracing::warn!(
                        store = %path.display(),
                        "the store is in use by {holder}; waiting up to {} s for it",
                        LOCKED_STORE_WAIT.as_secs()
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            result => return result,
        }
    }
}

/// Runs the queued backfill (`store::backfill`) step by step through the committer, so that
/// updates go on between steps, and says in the log how far it is. While pending exports
/// take its share of the outbox ([`backfill::waits_for_deliveries`]), it waits for
/// deliveries (a step may pass the share by its own exports), saying so once a wait.
async fn run_backfill(
    committer: Committer,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    max_outbox_bytes: u64,
    shutdown: CancellationToken,
) {
    let mut logged = tokio::time::Instant::now();
    let pause = || async {
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => true,
        }
    };
    let mut waiting = false;
    loop {
        if store
            .tally()
            .is_ok_and(|tally| backfill::waits_for_deliveries(tally, max_outbox_bytes))
        {
            if !std::mem::replace(&mut waiting, true) {
                tracing::info!("the backfill waits for deliveries: pending exports take half the outbox's room (storage.max_outbox_bytes, less what dead letters hold), the rest is ingest's");
            }
            if !pause().await {
                return;
            }
            continue;
        }
        waiting = false;
        let step = tokio::select! {
            () = shutdown.cancelled() => return,
            step = committer.backfill_step() => step,
        };
        if let Ok(Some(progress)) = &step {
            metrics.record_backfill_exports(progress.step_exported);
        }
        match step {
            Ok(None) | Err(CommitError::Stopped) => return,
            Ok(Some(progress)) if progress.done => {
                tracing::info!(
                    segments = ?progress.segments,
                    scanned = progress.scanned,
                    exported = progress.exported,
                    "backfill done"
                );
                logged = tokio::time::Instant::now();
            }
            Ok(Some(progress)) => {
                if logged.elapsed() >= BACKFILL_LOG_EVERY {
                    tracing::info!(
                        segments = ?progress.segments,
                        scanned = progress.scanned,
                        of = progress.profiles,
                        exported = progress.exported,
                        "backfilling"
                    );
                    logged = tokio::time::Instant::now();
                }
            }
            Err(CommitError::Store(e)) => {
                tracing::error!("the backfill stopped ({e}); it goes on at the next start");
                return;
            }
            Err(e) => {
                // A full disk or a store being reopened: the step wrote nothing; try again.
                tracing::debug!(error = %e, "backfill step failed");
                if !pause().await {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn starts_that_find_too_little_room_wait_longer_each_time() {
        let mut wait = Duration::ZERO;
        let mut waits = Vec::new();
        for _ in 0..8 {
            wait = next_start_wait(wait);
            waits.push(wait.as_secs());
        }
        assert_eq!(waits, [2, 4, 8, 16, 32, 60, 60, 60]);
    }

    /// A committer thread that panicked takes `/healthz` down and stops the agent, with the
    /// panic's message for `wait` to return.
    #[test]
    fn a_committer_panic_stops_the_agent_with_its_message() {
        let (failure, shutdown) = (Arc::<OnceLock<String>>::default(), CancellationToken::new());
        let on_panic = stop_on_committer_panic(Arc::clone(&failure), shutdown.clone());
        on_panic(Box::new("a bug in the committer"));
        assert_eq!(
            failure.get().map(String::as_str),
            Some("a bug in the committer")
        );
        assert!(shutdown.is_cancelled());
        let error = AgentError::Committer(failure.get().unwrap().clone()).to_string();
        assert!(
            error.starts_with("the committer stopped: a bug in the committer"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_task_that_panics_stops_the_agent_naming_it() {
        let (failure, shutdown) = (Arc::<OnceLock<String>>::default(), CancellationToken::new());
        let watch = |what: &str, task| {
            stop_if_it_panics(what.into(), task, Arc::clone(&failure), shutdown.clone())
        };
        // Ending, or being aborted at a stop, is no failure.
        let ended = watch("a task", tokio::spawn(async {})).await.unwrap();
        assert_eq!(ended, Some(()), "what the task ended with");
        let aborted = tokio::spawn(std::future::pending::<()>());
        aborted.abort();
        assert_eq!(watch("a task", aborted).await.unwrap(), None);
        assert!(!shutdown.is_cancelled());
        assert_eq!(failure.get(), None);

        let consumer = tokio::spawn(async { panic!("a bug in the consumer") });
        watch("the NATS consumer of partition 3", consumer)
            .await
            .unwrap();
        assert!(shutdown.is_cancelled());
        let message = failure.get().cloned().unwrap();
        assert_eq!(
            message,
            "the NATS consumer of partition 3 panicked: a bug in the consumer"
        );
        let error = AgentError::Task(message).to_string();
        assert!(
            error.ends_with("; the agent stopped (nothing acknowledged is lost: start it again)"),
            "{error}"
        );
    }

    async fn panicking_loop() -> Result<(), DeliveryStopped> {
        panic!("a bug in the loop");
    }

    fn supervised() -> (
        tempfile::TempDir,
        Arc<Store>,
        Arc<AtomicBool>,
        CancellationToken,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 8 << 20).unwrap());
        store.set_exports_out(0);
        (
            dir,
            store,
            Arc::new(AtomicBool::new(true)),
            CancellationToken::new(),
        )
    }

    #[tokio::test]
    async fn a_delivery_loop_that_panics_stops_the_agent_and_put_backs() {
        let (_dir, store, running, shutdown) = supervised();
        let ended = supervise_delivery(
            panicking_loop(),
            Arc::clone(&running),
            Arc::clone(&store),
            shutdown.clone(),
        )
        .await;
        match ended {
            Err(DeliveryStopped::Panicked(message)) => assert_eq!(message, "a bug in the loop"),
            other => panic!("expected the panic, got {other:?}"),
        }
        assert!(
            !running.load(Ordering::Relaxed),
            "/healthz would still say running"
        );
        assert!(
            shutdown.is_cancelled(),
            "the agent goes on without delivery"
        );
        let put_back = store.rewinding_with_nothing_out(Duration::from_secs(10), || ());
        assert_eq!(
            put_back,
            Err(crate::store::NotQuiet::GaveUp),
            "a put-back must not trust what the dead loop published"
        );
    }

    #[tokio::test]
    async fn a_delivery_loop_that_stops_when_told_leaves_the_agent_to_stop_itself() {
        let (_dir, store, running, shutdown) = supervised();
        let ended = supervise_delivery(
            async { Ok(()) },
            Arc::clone(&running),
            Arc::clone(&store),
            shutdown.clone(),
        )
        .await;
        assert!(ended.is_ok());
        assert!(!running.load(Ordering::Relaxed));
        assert!(!shutdown.is_cancelled());
        let put_back = store.rewinding_with_nothing_out(Duration::from_millis(20), || ());
        assert_eq!(put_back, Ok(()), "what the loop published is kept");
    }

    /// The settler thread panics on the first outcome it records: the agent stops with the
    /// error (which `outpost run` exits 1 with), and the acknowledged export stays pending, to
    /// be sent again after a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_whose_settler_panics_stops_with_the_error_and_keeps_the_export() {
        use crate::receiver::{Receiver, ReceiverOptions};
        use http_body_util::{BodyExt, Full};
        use hyper::body::Bytes;
        use hyper_util::client::legacy::Client;
        use hyper_util::rt::TokioExecutor;

        let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("outpost.toml");
        let text = crate::demo::demo_config_text(&receiver.base_url());
        let config = Config::parse(&config_path, &text).unwrap();
        let agent = Agent::start(&config, AgentOptions::default())
            .await
            .unwrap();
        agent.store.panic_when_settling();
        let store = Arc::clone(&agent.store);

        let update = r#"{"id":"p-1","profile":{"person":{"name":{"firstName":"Ada"}},"segmentMembership":{"ups":{"7841ba61-23c1-4bb3-a495-00d3g5fe1e93":{"status":"realized"}}}}}"#;
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let request = hyper::Request::post(format!("http://{}/v1/updates", agent.listen_addr))
            .body(Full::new(Bytes::from(update)))
            .unwrap();
        let response = client.request(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

        let stopped = tokio::time::timeout(Duration::from_secs(30), agent.wait())
            .await
            .expect("the agent stops by itself once the settler is gone");
        match stopped {
            Err(AgentError::Delivery(DeliveryStopped::SettlerGone(message))) => {
                assert_eq!(message, "a fault injected into settling");
            }
            other => panic!("expected the settler's panic, got {other:?}"),
        }
        assert_eq!(receiver.delivered().len(), 1, "the export was acknowledged");
        let pending = store.list(&crate::store::ListFilter::default()).unwrap();
        assert_eq!(
            pending.len(),
            1,
            "the acknowledged export was not recorded, so it stays pending"
        );
    }

    /// A retry entry and a `superseded` mark that serve nothing (as older builds left them) are
    /// removed once the agent has started, beside its work (that opening the store leaves them
    /// is tested in `store`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_forgets_entries_that_serve_nothing_once_started() {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("outpost.toml");
        let text = crate::demo::demo_config_text("http://127.0.0.1:9");
        let config = Config::parse(&config_path, &text).unwrap();
        {
            let store = Store::open(&config.storage.path, 8 << 20).unwrap();
            let trees = store.trees().unwrap();
            let key = crate::store::keys::seq_key(99);
            trees.retry_at.insert(key, &9u64.to_be_bytes()[..]).unwrap();
            trees
                .superseded
                .insert(key, &100u64.to_be_bytes()[..])
                .unwrap();
            store.flush().unwrap();
        }
        let agent = Agent::start(&config, AgentOptions::default())
            .await
            .unwrap();
        let entries = || {
            let trees = agent.store.trees().unwrap();
            (trees.retry_at.len(), trees.superseded.len())
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while entries() != (0, 0) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(entries(), (0, 0));
        agent.stop().await.unwrap();
    }
}
