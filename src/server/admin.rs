//! The agent's admin API on a Unix socket in the store folder (mode 0600): one JSON request
//! line in, one JSON answer line out, per connection. The CLI uses it while the agent runs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use super::accept;
use crate::admin::{
    execute_with, unreadable_request, AdminAnswer, AdminError, AdminRequest, SOCKET_NAME,
};
use crate::metrics::Metrics;
use crate::profile::update::{update_from_value_with, FutureLimit};
use crate::store::committer::{CommitError, Committer};
use crate::store::handover_file::Terms;
use crate::store::Store;

pub struct AdminState {
    pub store: Arc<Store>,
    pub committer: Committer,
    pub metrics: Arc<Metrics>,
    /// Notified after a repair, so the delivery loop sees exports put back at once.
    pub wake: Arc<Notify>,
    pub max_outbox_bytes: u64,
    /// `ingest.max_future_s`, checked again on the agent's clock.
    pub max_future_s: u64,
    /// The stream partitions this agent owns (consumes): none of them may be handed or taken
    /// over.
    pub owned: Vec<u32>,
    /// The terms of moves, from the config the agent runs with: the store holds what it
    /// decided under them, whatever the command's config file says now.
    pub move_terms: Option<Terms>,
    /// The NATS source, when `[source.nats]` is configured: `outpost top` shows its lag.
    pub source: Option<Arc<crate::source::nats::SourceState>>,
    /// Drawn at each start: `outpost top` tells a restarted agent, whose counters began
    /// again at 0.
    pub run: String,
}

/// The longest request line read, its newline included. The largest a command sends is part
/// of an ingest chunk: updates whose JSON takes up to 64 MiB, or one update alone, up to this
/// (`outpost ingest` refuses a larger one while the agent runs).
pub const MAX_REQUEST_BYTES: usize = 256 << 20;
/// How long a connection may take to send its request line, and to take its answer: a client
/// that connects and sends nothing (or stops reading) would hold a task, a descriptor and the
/// answer for good.
const IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Connections served at once; more wait to be accepted. Descriptors are shared with ingest
/// and the store.
const MAX_CONNECTIONS: usize = 64;

pub fn socket_path(store_path: &Path) -> PathBuf {
    store_path.join(SOCKET_NAME)
}

/// Who answers on a store's admin socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketProbe {
    /// A running agent: its socket answers from its start until its stop begins.
    Answers,
    /// An agent of another user: the socket is not open to this one.
    NotThisUsers,
    /// No agent (an outpost command has no socket).
    Nothing,
}

impl SocketProbe {
    /// Who answers, by how a connection to the socket went.
    pub fn judge(connected: std::io::Result<()>) -> SocketProbe {
        match connected {
            Ok(()) => SocketProbe::Answers,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => SocketProbe::NotThisUsers,
            Err(_) => SocketProbe::Nothing,
        }
    }
}

/// Connects to the admin socket of the store at `store_path` to see who answers. Blocks until
/// the connection is made or refused: a wedged agent's full backlog holds it.
pub fn probe_socket(store_path: &Path) -> SocketProbe {
    SocketProbe::judge(std::os::unix::net::UnixStream::connect(socket_path(store_path)).map(drop))
}

/// Where the socket is made before it is moved to its place: a folder only the owner may
/// enter, so that nobody else can connect in the moment between binding the socket (with the
/// umask's mode) and narrowing its mode. Short, so that its path is no longer than the
/// socket's own.
const BINDING_DIR: &str = ".admin";

/// The admin socket, bound and in its place.
pub struct AdminListener {
    listener: UnixListener,
    path: PathBuf,
}

/// Binds the socket, replacing a stale one (this process holds the store's lock, so no other
/// agent can be using it), readable and writable by the owner only from the start.
pub fn bind(store_path: &Path) -> std::io::Result<AdminListener> {
    use std::os::unix::fs::DirBuilderExt;
    let path = socket_path(store_path);
    let binding_dir = store_path.join(BINDING_DIR);
    let ignore_missing = |result: std::io::Result<()>| match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    };
    ignore_missing(std::fs::remove_file(&path))?;
    // Left by an agent killed while binding.
    ignore_missing(std::fs::remove_dir_all(&binding_dir))?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&binding_dir)?;
    let bound: std::io::Result<UnixListener> = (|| {
        let binding = binding_dir.join("s");
        let listener = UnixListener::bind(&binding)?;
        std::fs::set_permissions(&binding, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&binding, &path)?;
        Ok(listener)
    })();
    let removed = std::fs::remove_dir_all(&binding_dir);
    let listener = bound?;
    removed?;
    Ok(AdminListener { listener, path })
}

pub async fn serve(admin: AdminListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    let AdminListener { listener, path } = admin;
    accept_within(&listener, MAX_CONNECTIONS, &shutdown, |stream| {
        let state = Arc::clone(&state);
        async move {
            if let Err(e) = answer(stream, &state).await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        }
    })
    .await;
    let _ = std::fs::remove_file(path);
}

/// Accepts connections until `shutdown`, each served on a task of its own by `serve`, at most
/// `max` at once: more wait to be accepted until one of those ends.
async fn accept_within<Serving>(
    listener: &UnixListener,
    max: usize,
    shutdown: &CancellationToken,
    serve: impl Fn(UnixStream) -> Serving,
) where
    Serving: std::future::Future<Output = ()> + Send + 'static,
{
    let connections = Arc::new(Semaphore::new(max));
    let mut accept_failures = accept::AcceptFailures::new("admin");
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&connections).acquire_owned() => permit.expect("never closed"),
            _ = shutdown.cancelled() => break,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let serving = serve(stream);
                    tokio::spawn(async move {
                        serving.await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    let _ = accept_failures.failed(&e, tokio::time::Instant::now());
                    tokio::time::sleep(accept::RETRY_AFTER).await;
                }
            },
            _ = shutdown.cancelled() => break,
        }
    }
}

async fn answer(stream: UnixStream, state: &Arc<AdminState>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let result = match read_request(read, MAX_REQUEST_BYTES, IO_TIMEOUT).await? {
        Request::Probe => return Ok(()), // the CLI checking that the agent answers
        Request::TooLarge => Err(AdminError::Failed(format!(
            "the request is larger than the {} MiB the agent reads",
            MAX_REQUEST_BYTES >> 20
        ))),
        Request::Line(line) => respond(&line, state).await,
    };
    let mut text =
        serde_json::to_string(&AdminAnswer::from_result(result)).expect("answers serialize");
    text.push('\n');
    tokio::time::timeout(IO_TIMEOUT, async {
        write.write_all(text.as_bytes()).await?;
        write.shutdown().await
    })
    .await
    .map_err(|_| timed_out("the answer was not taken in time"))?
}

#[derive(Debug, PartialEq)]
enum Request {
    /// The connection closed without a byte.
    Probe,
    /// Its line ran past the most that is read.
    TooLarge,
    Line(String),
}

/// The request line, of at most `max_bytes`, if it comes within `timeout`.
async fn read_request(
    read: impl tokio::io::AsyncRead + Unpin,
    max_bytes: usize,
    timeout: std::time::Duration,
) -> std::io::Result<Request> {
    let mut line = String::new();
    let mut reading = BufReader::new(read.take(max_bytes as u64 + 1));
    let read = tokio::time::timeout(timeout, reading.read_line(&mut line))
        .await
        .map_err(|_| timed_out("no request in time"))??;
    Ok(match read {
        0 => Request::Probe,
        _ if line.len() > max_bytes => Request::TooLarge,
        _ => Request::Line(line),
    })
}

fn timed_out(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, what)
}

async fn respond(line: &str, state: &Arc<AdminState>) -> Result<serde_json::Value, AdminError> {
    let request = crate::admin::read_line(line.as_bytes(), crate::admin::MAX_REQUEST_DEPTH);
    match request {
        Err(e) => Err(unreadable_request(&e)),
        Ok(AdminRequest::Ingest { updates, first }) => ingest(state, updates, first).await,
        Ok(AdminRequest::Snapshot) => snapshot(state).await,
        Ok(mut request) => {
            if let (
                AdminRequest::HandOver { terms, .. }
                | AdminRequest::TakeOver { terms, .. }
                | AdminRequest::CheckTakeOver { terms, .. },
                Some(running),
            ) = (&mut request, &state.move_terms)
            {
                *terms = running.clone();
            }
            let wakes_delivery = request.wakes_delivery();
            let stats = request == AdminRequest::Stats;
            let pause_or_resume = matches!(
                request,
                AdminRequest::PauseDelivery | AdminRequest::ResumeDelivery
            );
            let state = Arc::clone(state);
            let metrics = Arc::clone(&state.metrics);
            let result = tokio::task::spawn_blocking(move || {
                let mut result = execute_with(&state.store, &request, &state.owned);
                if let (AdminRequest::Stats, Ok(stats)) = (&request, &mut result) {
                    // What `outpost ingest` checks an input against: the agent refuses updates
                    // of the partitions it does not own by its own config, whatever the
                    // command's says.
                    if let Some(terms) = &state.move_terms {
                        stats["owned"] = serde_json::json!({
                            "partition_count": terms.partition_count,
                            "partitions": state.owned,
                        });
                    }
                }
                if wakes_delivery {
                    state.wake.notify_one();
                }
                result
            })
            .await
            .unwrap_or_else(|e| Err(AdminError::Failed(e.to_string())));
            match result {
                Ok(mut value) if stats => {
                    add_delivery_state(&mut value, &metrics);
                    Ok(value)
                }
                Ok(value) if pause_or_resume => {
                    log_pause_or_resume(&value);
                    Ok(value)
                }
                other => other,
            }
        }
    }
}

/// Says at warn that delivery was paused or resumed, when it was: a pause stops every export,
/// and an operator who logs warnings alone must see why, and that it ended.
fn log_pause_or_resume(answer: &serde_json::Value) {
    if answer["changed"] != true {
        return;
    }
    let pending = answer["pending"].as_u64().unwrap_or(0);
    if answer["delivery_paused"] == true {
        tracing::warn!(
            pending,
            "delivery paused by `outpost delivery pause`: nothing is sent until `outpost delivery resume`; updates are still taken, within storage.max_outbox_bytes"
        );
    } else {
        let paused_since = answer["paused_since"].as_str().unwrap_or("-");
        tracing::warn!(
            pending,
            paused_since,
            "delivery resumed by `outpost delivery resume`"
        );
    }
}

/// What only the running delivery loop knows, added to `outbox stats`.
fn add_delivery_state(stats: &mut serde_json::Value, metrics: &Metrics) {
    stats["waiting_for_retry"] = metrics.retry_waiting.get().into();
    stats["in_flight"] = metrics.in_flight.get().into();
    stats["concurrency_limit"] = metrics.concurrency_limit.get().into();
    stats["rate_cap_per_s"] = metrics.rate_cap.get().into();
    let quota_left = metrics.quota_left.get();
    stats["quota_left"] = (quota_left >= 0).then_some(quota_left).into();
    stats["destination_down"] = (metrics.destination_down.get() == 1).into();
    stats["agent_running"] = true.into();
}

/// The figures of `outpost top`: the `/metrics` text (outbox gauges set first, as a scrape
/// does), the outbox stats with the delivery state, and the token's remaining lifetime.
async fn snapshot(state: &Arc<AdminState>) -> Result<serde_json::Value, AdminError> {
    let store = Arc::clone(&state.store);
    let stats = tokio::task::spawn_blocking(move || store.outbox_stats(chrono::Utc::now()))
        .await
        .map_err(|e| AdminError::Failed(e.to_string()))??;
    state.metrics.set_outbox(&stats);
    if let Some(source) = &state.source {
        source.set_gauges(&state.metrics);
    }
    let mut stats = serde_json::to_value(&stats).expect("stats serialize");
    add_delivery_state(&mut stats, &state.metrics);
    Ok(serde_json::json!({
        "metrics": state.metrics.render(),
        "stats": stats,
        "token_expires_in_s": state.metrics.token_expiry.remaining_s(),
        "agent_run": state.run,
    }))
}

async fn ingest(
    state: &AdminState,
    values: Vec<serde_json::Value>,
    first: Option<u64>,
) -> Result<serde_json::Value, AdminError> {
    let limit = FutureLimit {
        now: chrono::Utc::now(),
        max_future_s: state.max_future_s,
    };
    let parsing = state.committer.parsing(limit);
    let sent = values.len();
    // The CLI checked every update with its own config first: one refused here is judged
    // differently by the agent (a stricter `ingest.max_future_s`, a clock stepped back), and
    // the CLI may have stored earlier chunks, which it says.
    let updates = values
        .into_iter()
        .enumerate()
        .map(|(i, value)| update_from_value_with(value, i as u64 + 1, &parsing))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            let which = match first {
                Some(first) => format!(
                    "the input's update {} ({} of the {sent} sent together)",
                    first.saturating_add(e.line - 1),
                    e.line
                ),
                None => format!("update {} of the {sent} sent together", e.line),
            };
            AdminError::Failed(format!("the agent refused {which}: {}", e.reason))
        })?;
    if let Some(full) = state.store.outbox_full(state.max_outbox_bytes)? {
        return Err(AdminError::Failed(full.to_string()));
    }
    let summary = state.committer.commit(updates).await.map_err(|e| match e {
        // Said in the message too, for a command of an older build, which reads this answer's
        // kind as a plain failure.
        CommitError::InDoubt(_) => AdminError::InDoubt(e.to_string()),
        CommitError::Elsewhere(_) => AdminError::Refused(e.to_string()),
        e => AdminError::Failed(e.to_string()),
    })?;
    Ok(summary.report())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stats_have_the_same_keys_with_a_running_agent_as_without() {
        let folder = tempfile::tempdir().unwrap();
        let store = Store::open(folder.path(), 8 << 20).unwrap();
        let without = crate::admin::execute(&store, &AdminRequest::Stats).unwrap();
        let mut with = without.clone();
        add_delivery_state(&mut with, &Metrics::new());
        let keys = |stats: &serde_json::Value| -> Vec<String> {
            stats.as_object().unwrap().keys().cloned().collect()
        };
        assert_eq!(keys(&without), keys(&with));
        assert_eq!(without["agent_running"], false);
        assert_eq!(with["agent_running"], true);
        for key in crate::admin::DELIVERY_STATE_KEYS {
            assert_eq!(without[key], serde_json::Value::Null, "{key}");
        }
        assert_eq!(with["concurrency_limit"], 0);
        assert_eq!(with["destination_down"], false);
    }

    #[tokio::test]
    async fn a_request_is_a_line_of_bounded_size_that_comes_in_time() {
        let timeout = std::time::Duration::from_millis(200);
        let cases: &[(&[u8], bool, Result<Request, std::io::ErrorKind>)] = &[
            (
                b"{\"op\":\"stats\"}\n",
                true,
                Ok(Request::Line("{\"op\":\"stats\"}\n".into())),
            ),
            (b"", false, Ok(Request::Probe)),
            (&[b'x'; 16], false, Ok(Request::Line("x".repeat(16)))),
            (&[b'x'; 17], false, Ok(Request::TooLarge)),
            (b"{\"op\":", true, Err(std::io::ErrorKind::TimedOut)),
            (b"", true, Err(std::io::ErrorKind::TimedOut)),
        ];
        for (sent, stays_open, expected) in cases {
            let (mut client, server) = UnixStream::pair().unwrap();
            client.write_all(sent).await.unwrap();
            if !stays_open {
                client.shutdown().await.unwrap();
            }
            let read = read_request(server, 16, timeout).await;
            let read = read.map_err(|e| e.kind());
            assert_eq!(&read, expected, "{:?}", String::from_utf8_lossy(sent));
        }
    }

    /// Two connections that send nothing hold both places; a third is answered once one of
    /// them goes.
    #[tokio::test]
    async fn connections_past_the_most_served_at_once_wait_for_a_place() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("s");
        let listener = UnixListener::bind(&path).unwrap();
        let shutdown = CancellationToken::new();
        let serving = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                accept_within(&listener, 2, &shutdown, |stream| async move {
                    let (read, mut write) = stream.into_split();
                    let mut line = String::new();
                    let _ = BufReader::new(read).read_line(&mut line).await;
                    let _ = write.write_all(line.as_bytes()).await;
                })
                .await
            })
        };
        let first = UnixStream::connect(&path).await.unwrap();
        let _second = UnixStream::connect(&path).await.unwrap();
        let mut third = UnixStream::connect(&path).await.unwrap();
        third.write_all(b"third\n").await.unwrap();
        let mut answer = [0u8; 6];
        let waited = std::time::Duration::from_millis(300);
        let early = tokio::time::timeout(waited, third.read_exact(&mut answer)).await;
        assert!(
            early.is_err(),
            "the third connection was served beside two others"
        );
        drop(first);
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            third.read_exact(&mut answer),
        )
        .await
        .expect("the third connection was served once the first went")
        .unwrap();
        assert_eq!(&answer, b"third\n");
        shutdown.cancel();
        serving.await.unwrap();
    }

    /// The socket is in its place with mode 0600, connections reach it, and the folder it is
    /// made in, also one left by an agent killed while binding, is gone.
    #[tokio::test]
    async fn the_socket_is_bound_in_a_private_folder_and_moved_to_its_place() {
        let store = tempfile::tempdir().unwrap();
        let leftover = store.path().join(BINDING_DIR);
        std::fs::create_dir(&leftover).unwrap();
        std::fs::write(leftover.join("s"), b"stale").unwrap();
        std::fs::write(socket_path(store.path()), b"stale").unwrap();
        let admin = bind(store.path()).unwrap();
        assert_eq!(admin.path, socket_path(store.path()));
        let mode = std::fs::metadata(&admin.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!leftover.exists());
        let (connected, accepted) =
            tokio::join!(UnixStream::connect(&admin.path), admin.listener.accept());
        connected.unwrap();
        accepted.unwrap();
    }
}
