//! The HTTP interface of `outpost run`: `POST /v1/updates`, `GET /healthz`, `GET /metrics`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    ACCEPT, ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::accept;
use super::body::{
    body_encoding, discard_body, gunzip, read_body, unsupported_transfer_coding, BodyBudget,
    BodyError, Encoding, GunzipError, BODY_DEADLINE_TIMEOUTS,
};
use super::connection::{drive, Activity};
use super::ingest_token::IngestToken;
use super::tls::IngestAcceptor;
use crate::log_limit::{AtMostEvery, LogLimit};
use crate::metrics::{self, Metrics};
use crate::profile::update::{locate_body, FutureLimit};
use crate::store::committer::{
    what_was_stored, CommitError, Committer, PartlyCommitted, REQUEST_CHUNK,
};
use crate::store::Store;

/// How long a client is told to wait when the outbox or the disk is full.
const FULL_RETRY_AFTER_S: u64 = 5;
/// How long a graceful stop waits for open requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the log may say that connections are at `ingest.max_connections`.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(60);
/// Requests in flight on one HTTP/2 connection, and the flow-control windows: a request's
/// stream holds at most its window of body not yet read, and the connection's window bounds
/// what all of them hold. A request that waits for room for its body does not read it, so
/// the streams' windows together must fit in the connection's: else those waiting fill it,
/// and the requests admitted get no more of their bodies and stall until 408.
const MAX_STREAMS: u32 = 16;
const STREAM_WINDOW: u32 = 64 << 10;
const CONNECTION_WINDOW: u32 = MAX_STREAMS * STREAM_WINDOW;

pub struct IngestState {
    pub store: Arc<Store>,
    pub committer: Committer,
    pub metrics: Arc<Metrics>,
    pub token: Option<Arc<IngestToken>>,
    pub max_body_bytes: u64,
    /// `ingest.max_future_s`.
    pub max_future_s: u64,
    /// `ingest.read_timeout_ms`.
    pub read_timeout: Duration,
    /// `ingest.max_connections`.
    pub max_connections: usize,
    pub bodies: BodyBudget,
    pub max_outbox_bytes: u64,
    /// Set while the delivery loop runs; `/healthz` reports it.
    pub delivery_running: Arc<AtomicBool>,
    /// What the committer thread panicked with, should it have: no update can be stored.
    pub committer_failure: Arc<std::sync::OnceLock<String>>,
    /// Why deliveries cannot be recorded now, while they cannot.
    pub recording_failure: Arc<crate::delivery::RecordingFailure>,
    /// The NATS source, when `[source.nats]` is configured.
    pub source: Option<Arc<crate::source::nats::SourceState>>,
    /// When `/metrics` last read the outbox's figures from the store (see
    /// [`OUTBOX_FIGURES_EVERY`]).
    pub outbox_read_at: tokio::sync::Mutex<Option<std::time::Instant>>,
    /// Set while such a read runs: one that takes longer than the interval is not joined by
    /// another each interval.
    pub outbox_reading: Arc<AtomicBool>,
    /// Requests to `/v1/updates` refused, logged a few a window ([`log_refusal`]).
    pub refusals: std::sync::Mutex<Refusals>,
    /// Cancelled when the agent stops: a request of many chunks then stops at the next one
    /// ([`Committer::commit_located`]).
    pub stopping: CancellationToken,
}

/// `/metrics` reads the outbox's figures from the store at most this often, on a blocking
/// thread: reading them looks at up to 1,000 exports and walks the store's folder, and
/// `/metrics` takes no token, so scrapes as fast as a client can send them would otherwise
/// keep the threads that serve ingest busy.
const OUTBOX_FIGURES_EVERY: Duration = Duration::from_secs(1);

type Answer = Response<Full<Bytes>>;

fn json_answer(status: StatusCode, body: serde_json::Value) -> Answer {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static parts are valid")
}

fn error_answer(status: StatusCode, message: &str) -> Answer {
    json_answer(status, json!({ "error": message }))
}

/// The lines said of refused requests, each kind limited ([`LogLimit`]): those of the
/// request (4xx, at info) and those of the store or the agent (5xx, at warn), so that a
/// producer sending bad updates in a loop does not use up the lines of a full outbox.
#[derive(Debug, Default)]
pub struct Refusals {
    of_the_request: LogLimit,
    of_the_agent: LogLimit,
}

/// Counts a refused request to `/v1/updates` by its status, and says why it was refused, a few
/// a window ([`Refusals`]): the client heard it, and the operator saw only
/// `outpost_updates_total{result="refused"}` (which counts neither a wrong token nor a full
/// outbox), not for what.
fn log_refusal(state: &IngestState, answer: &Answer) {
    let status = answer.status();
    if status.is_success() {
        return;
    }
    state.metrics.record_ingest_refusal(status.as_u16());
    let of_the_agent = status.is_server_error();
    let now = tokio::time::Instant::now();
    let mut refusals = state.refusals.lock().unwrap_or_else(|e| e.into_inner());
    let limit = match of_the_agent {
        true => &mut refusals.of_the_agent,
        false => &mut refusals.of_the_request,
    };
    let window_s = crate::log_limit::WINDOW.as_secs();
    let said = "not logged one by one (outpost_ingest_refusals_total counts them)";
    match (limit.left_out(now), of_the_agent) {
        (Some(n), true) => tracing::warn!(
            requests = n,
            "more requests to /v1/updates refused with a 5xx in a window of {window_s} s, {said}"
        ),
        (Some(n), false) => tracing::info!(
            requests = n,
            "more requests to /v1/updates refused with a 4xx in a window of {window_s} s, {said}"
        ),
        (None, _) => {}
    }
    if !limit.admit(now) {
        return;
    }
    drop(refusals);
    // The answer's body is whole in memory: taken at once.
    let body = http_body_util::BodyExt::collect(answer.body().clone())
        .now_or_never()
        .and_then(Result::ok)
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
    let error = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|answer| answer["error"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let status = status.as_u16();
    if of_the_agent {
        tracing::warn!(status, %error, "a request to /v1/updates was refused");
    } else {
        tracing::info!(status, %error, "a request to /v1/updates was refused");
    }
}

/// 503 with `Retry-After`: the request can be sent again (`message` says whether it may have
/// been stored).
fn unavailable(message: &str) -> Answer {
    retry_later(error_answer(StatusCode::SERVICE_UNAVAILABLE, message))
}

fn retry_later(mut answer: Answer) -> Answer {
    answer
        .headers_mut()
        .insert(RETRY_AFTER, FULL_RETRY_AFTER_S.into());
    answer
}

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until `shutdown`, then lets open requests finish (bounded) and returns. With `tls`,
/// over HTTPS (connections that fail the handshake, e.g. without a required client
/// certificate, are closed and logged at debug level).
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<IngestAcceptor>>,
    state: Arc<IngestState>,
    shutdown: CancellationToken,
) {
    // Cancelled at shutdown: every connection is then closed gracefully.
    let closing = CancellationToken::new();
    let connections_open = TaskTracker::new();
    // A connection holds one until it ends; without one, nothing is accepted, and new
    // connections wait in the kernel's listen backlog rather than take memory and descriptors.
    let connections = Arc::new(Semaphore::new(state.max_connections));
    let mut at_the_limit_said = AtMostEvery::new(FULL_WARNING_EVERY);
    let mut accept_failures = accept::AcceptFailures::new("ingest");
    loop {
        let slot = match Arc::clone(&connections).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if at_the_limit_said.due(tokio::time::Instant::now()).is_some() {
                    tracing::warn!(
                        max_connections = state.max_connections,
                        "ingest connections at ingest.max_connections; new ones wait until one closes"
                    );
                }
                tokio::select! {
                    slot = Arc::clone(&connections).acquire_owned() => {
                        slot.expect("the semaphore is never closed")
                    }
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        let _ = accept_failures.failed(&e, tokio::time::Instant::now());
                        tokio::time::sleep(accept::RETRY_AFTER).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let connection = serve_one(stream, tls.as_deref().map(IngestAcceptor::current), Arc::clone(&state), closing.clone());
                connections_open.spawn(async move {
                    let _slot = slot;
                    connection.await;
                });
            }
            _ = shutdown.cancelled() => break,
        }
    }
    drop(listener);
    closing.cancel();
    connections_open.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, connections_open.wait())
        .await
        .is_err()
    {
        tracing::warn!("open ingest requests did not finish in time");
    }
}

/// Serves one accepted connection, over TLS after its handshake when `tls`.
async fn serve_one(
    stream: TcpStream,
    tls: Option<Arc<tokio_rustls::TlsAcceptor>>,
    state: Arc<IngestState>,
    closing: CancellationToken,
) {
    let builder = connection_builder(state.read_timeout);
    let served = match tls {
        None => serve_http(TokioIo::new(stream), builder, state, &closing).await,
        Some(acceptor) => {
            let stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "ingest TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("ingest TLS handshake timed out");
                        return;
                    }
                };
            // The protocol agreed in the handshake: nothing to read to tell.
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            let builder = if h2 {
                builder.http2_only()
            } else {
                builder.http1_only()
            };
            serve_http(TokioIo::new(stream), builder, state, &closing).await
        }
    };
    if let Err(e) = served {
        tracing::debug!(error = %e, "ingest connection ended with an error");
    }
}

/// Serves HTTP on `io`; the connection's time for its first request starts now.
async fn serve_http<I>(
    io: I,
    builder: auto::Builder<TokioExecutor>,
    state: Arc<IngestState>,
    closing: &CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let read_timeout = state.read_timeout;
    let activity = Activity::new();
    let service = service_fn({
        let activity = Arc::clone(&activity);
        move |request| {
            let open = activity.request_started();
            let state = Arc::clone(&state);
            let activity = Arc::clone(&activity);
            async move {
                let answer = handle(&state, request).await;
                // A client without the token must not keep a place under
                // `ingest.max_connections` by asking again and again.
                if answer.status() == StatusCode::UNAUTHORIZED {
                    activity.close_when_answered();
                }
                drop(open);
                Ok::<_, Infallible>(answer)
            }
        }
    });
    let connection = builder.serve_connection(io, service);
    drive(
        connection,
        |c| c.graceful_shutdown(),
        &activity,
        read_timeout,
        closing,
    )
    .await
}

/// Without a timer hyper applies no timeout at all: a client could hold a connection open
/// forever without sending a request. With it, HTTP/1 headers must arrive within
/// `read_timeout` of the connection waiting for a request, which also closes idle keep-alive
/// connections then; an HTTP/2 connection is pinged as often, and closed when a ping goes
/// unanswered as long (an idle one that answers is closed by `connection::drive`). A client
/// that shuts its side down once its request is sent (`nc -N`) is answered: hyper would
/// otherwise close the connection at the read's end, unanswered.
fn connection_builder(read_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout)
        .half_close(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .keep_alive_interval(read_timeout)
        .keep_alive_timeout(read_timeout);
    builder
}

async fn handle(state: &IngestState, request: Request<Incoming>) -> Answer {
    // A HEAD is answered as its GET is, without the body: monitors and load balancers probe
    // with it.
    let head = request.method() == Method::HEAD;
    let mut answer = route(state, request).await;
    if head {
        let length = hyper::body::Body::size_hint(answer.body()).exact();
        *answer.body_mut() = Full::new(Bytes::new());
        if let Some(length) = length {
            answer.headers_mut().insert(CONTENT_LENGTH, length.into());
        }
    }
    answer
}

async fn route(state: &IngestState, request: Request<Incoming>) -> Answer {
    match (request.method(), request.uri().path()) {
        (&Method::POST, "/v1/updates") => {
            let answer = post_updates(state, request).await;
            log_refusal(state, &answer);
            answer
        }
        (&Method::GET | &Method::HEAD, "/healthz") => {
            if !state.delivery_running.load(Ordering::Relaxed) {
                return error_answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the delivery loop is not running",
                );
            }
            if state.committer_failure.get().is_some() {
                return error_answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the committer is not running: no update can be stored",
                );
            }
            // SPEC: healthy while the store is open; one that refuses writes for now (a full
            // disk, a compaction) answers 503 until it takes them again by itself.
            if let Some(refused) = state.store.refusing_writes() {
                return unavailable(&refused.to_string());
            }
            if let Some(failure) = state.recording_failure.get() {
                return error_answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("deliveries cannot be recorded in the store (retried every 0.2 s; the profiles they are of wait meanwhile): {failure}"),
                );
            }
            // Paused by an operator, the agent is healthy: ingest goes on, and the pause is
            // said here, in `outpost_delivery_paused` and in `outbox stats`. Only while
            // paused: the body is `{"status":"ok"}` otherwise, as it always was.
            let mut body = json!({"status": "ok"});
            if state.store.delivery_paused() {
                body["delivery_paused"] = true.into();
            }
            if let Some(source) = &state.source {
                body["nats"] = source.to_json();
            }
            json_answer(StatusCode::OK, body)
        }
        (&Method::GET | &Method::HEAD, "/metrics") => {
            let mut read_at = state.outbox_read_at.lock().await;
            let due = read_at.is_none_or(|at| at.elapsed() >= OUTBOX_FIGURES_EVERY);
            if due && !state.outbox_reading.swap(true, Ordering::AcqRel) {
                // Noted before the read, which sets the figures itself: a scrape that goes
                // away meanwhile (its stream reset) leaves the read to finish, and the next
                // scrapes do not start one each.
                *read_at = Some(std::time::Instant::now());
                let (store, metrics) = (Arc::clone(&state.store), Arc::clone(&state.metrics));
                /// Clears the flag however the read ends.
                struct Reading(Arc<AtomicBool>);
                impl Drop for Reading {
                    fn drop(&mut self) {
                        self.0.store(false, Ordering::Release);
                    }
                }
                let reading = Reading(Arc::clone(&state.outbox_reading));
                let read = tokio::task::spawn_blocking(move || {
                    let _reading = reading;
                    if let Ok(stats) = store.outbox_stats(chrono::Utc::now()) {
                        metrics.set_outbox(&stats);
                    }
                });
                let _ = read.await;
            }
            drop(read_at);
            if let Some(source) = &state.source {
                source.set_gauges(&state.metrics);
            }
            let accept = request.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
            let openmetrics = state.metrics.render();
            let (media_type, text) = if metrics::accepts_openmetrics(accept) {
                (metrics::OPENMETRICS_TYPE, openmetrics)
            } else {
                (
                    metrics::PROMETHEUS_TYPE,
                    metrics::to_prometheus_text(&openmetrics),
                )
            };
            Response::builder()
                .header(CONTENT_TYPE, media_type)
                .body(Full::new(Bytes::from(text)))
                .expect("static parts are valid")
        }
        (_, path @ ("/v1/updates" | "/healthz" | "/metrics")) => {
            let allowed = if path == "/v1/updates" {
                "POST"
            } else {
                "GET, HEAD"
            };
            let mut answer = error_answer(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("method not allowed: {path} takes {allowed}"),
            );
            answer
                .headers_mut()
                .insert(ALLOW, hyper::header::HeaderValue::from_static(allowed));
            answer
        }
        _ => error_answer(StatusCode::NOT_FOUND, "not found"),
    }
}

fn authorized(state: &IngestState, request: &Request<Incoming>) -> bool {
    let Some(token) = &state.token else {
        return true;
    };
    let given = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once([' ', '\t']))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        // One or more spaces separate the scheme from the token (RFC 9110 §11.4); tabs too.
        .map(|(_, token)| token.trim_start_matches([' ', '\t']));
    given.is_some_and(|given| token.admits(given.as_bytes()))
}

fn too_large(state: &IngestState) -> Answer {
    error_answer(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!(
            "the body is larger than ingest.max_body_bytes ({})",
            state.max_body_bytes
        ),
    )
}

/// What a request that may be read was found to send, and the room reserved for its body.
struct Admitted {
    encoding: Encoding,
    declared: Option<u64>,
    room: tokio::sync::OwnedSemaphorePermit,
}

/// Whether a request's body may be read; else the answer.
async fn admit(state: &IngestState, request: &Request<Incoming>) -> Result<Admitted, Box<Answer>> {
    if !authorized(state, request) {
        let mut answer = error_answer(StatusCode::UNAUTHORIZED, "missing or wrong ingest token");
        answer.headers_mut().insert(
            WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer"),
        );
        return Err(Box::new(answer));
    }
    if let Some(refused) = unsupported_transfer_coding(request.headers()) {
        return Err(Box::new(error_answer(
            StatusCode::NOT_IMPLEMENTED,
            &refused,
        )));
    }
    let encoding = body_encoding(request.headers())
        .map_err(|refused| error_answer(StatusCode::UNSUPPORTED_MEDIA_TYPE, &refused))?;
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.max_body_bytes) {
        return Err(Box::new(too_large(state)));
    }
    if state.store.is_failed() {
        // Taken again by itself once the disk has room (`Store::recover`).
        return Err(Box::new(unavailable(&state.store.failure().to_string())));
    }
    match state.store.outbox_full(state.max_outbox_bytes) {
        Ok(Some(full)) => return Err(Box::new(unavailable(&full.to_string()))),
        Ok(None) => {}
        Err(e) if e.is_transient() => return Err(Box::new(unavailable(&e.to_string()))),
        Err(e) => {
            return Err(Box::new(error_answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                &e.to_string(),
            )))
        }
    }
    // A gzip body may grow to max_body_bytes once decompressed.
    let room = match encoding {
        Encoding::Identity => declared.unwrap_or(state.max_body_bytes),
        Encoding::Gzip => state.max_body_bytes,
    };
    let Some(room) = state.bodies.room_for(room, state.read_timeout).await else {
        return Err(Box::new(unavailable(
            "busy: the bodies of other requests fill the room for them; not stored, send it again",
        )));
    };
    Ok(Admitted {
        encoding,
        declared,
        room,
    })
}

async fn post_updates(state: &IngestState, request: Request<Incoming>) -> Answer {
    let admitted = match admit(state, &request).await {
        Ok(admitted) => admitted,
        Err(refused) => {
            // A client that asked to hear first (`Expect: 100-continue`) sends nothing more.
            if !request.headers().contains_key(hyper::header::EXPECT) {
                // A request without the token holds its connection no longer than one whose
                // headers trickle: what it sends is dropped for one read timeout at most.
                let within = if refused.status() == StatusCode::UNAUTHORIZED {
                    state.read_timeout
                } else {
                    state.read_timeout * BODY_DEADLINE_TIMEOUTS
                };
                discard_body(
                    request.into_body(),
                    state.max_body_bytes,
                    state.read_timeout,
                    within,
                )
                .await;
            }
            return *refused;
        }
    };
    let (encoding, declared) = (admitted.encoding, admitted.declared);
    // Held by the request's jobs too, until they are committed (see `committer::Room`).
    let room = Some(Arc::new(admitted.room));
    let body = match read_body(
        request.into_body(),
        declared,
        state.max_body_bytes,
        state.read_timeout,
    )
    .await
    {
        Ok(body) => body,
        Err(BodyError::TooLarge) => return too_large(state),
        Err(BodyError::Stalled) => {
            return error_answer(
                StatusCode::REQUEST_TIMEOUT,
                &format!(
                    "the body stalled for {} ms (ingest.read_timeout_ms), or did not arrive whole within {} times that",
                    state.read_timeout.as_millis(),
                    BODY_DEADLINE_TIMEOUTS
                ),
            )
        }
        Err(BodyError::Unreadable { reason, lines_read }) => {
            // The line it broke off in; a gzip body's bytes are not its lines.
            let line = match encoding {
                Encoding::Identity => lines_read + 1,
                Encoding::Gzip => 1,
            };
            return json_answer(
                StatusCode::BAD_REQUEST,
                json!({
                    "error": format!("cannot read the body (it broke off in line {line}): {reason}"),
                    "line": line,
                }),
            );
        }
    };
    let body = match encoding {
        Encoding::Identity => body,
        Encoding::Gzip => match gunzip(body, state.max_body_bytes) {
            Ok(body) => body,
            Err(GunzipError::TooLarge) => {
                return error_answer(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!(
                        "the body, decompressed, is larger than ingest.max_body_bytes ({})",
                        state.max_body_bytes
                    ),
                )
            }
            Err(GunzipError::NotGzip { line, reason }) => {
                // Refused for what the body holds, as a line that is not JSON is.
                state.metrics.record_refused(1);
                return json_answer(
                    StatusCode::BAD_REQUEST,
                    json!({
                        "error": format!("the body is not valid gzip (Content-Encoding: gzip) from its line {line} on: {reason}"),
                        "line": line,
                    }),
                );
            }
        },
    };
    let limit = FutureLimit {
        now: chrono::Utc::now(),
        max_future_s: state.max_future_s,
    };
    let parsing = state.committer.parsing(limit);
    // Every update is checked before any is stored; past the first chunk, each is parsed
    // again as its chunk is committed.
    let located = match locate_body(&body, &parsing, REQUEST_CHUNK) {
        Ok(located) => located,
        Err(e) => {
            state.metrics.record_refused(1);
            return json_answer(
                StatusCode::BAD_REQUEST,
                json!({"error": e.reason, "line": e.line}),
            );
        }
    };
    let count = located.count() as u64;
    let committed = match located.all_parsed() {
        Ok(updates) => {
            drop(body);
            state.committer.commit_parsed(updates, room).await
        }
        Err(located) => {
            state
                .committer
                .commit_located(located, &parsing, room, &state.stopping)
                .await
        }
    };
    match committed {
        Ok(summary) => json_answer(
            StatusCode::OK,
            serde_json::to_value(summary).expect("summary serializes"),
        ),
        Err(partly) => {
            // Refused for what it holds, as a 400 is; a 503 is sent again.
            if let CommitError::Refused(_) | CommitError::Elsewhere(_) = partly.error {
                state.metrics.record_refused(1);
            }
            commit_failure(partly, count)
        }
    }
}

/// The answer to a request of `count` updates whose commit stopped at an error (logged by the
/// committer, and with the answer by [`log_refusal`]).
fn commit_failure(partly: PartlyCommitted, count: u64) -> Answer {
    let (status, body) = failure_body(&partly, count);
    let answer = json_answer(status, body);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        return retry_later(answer);
    }
    answer
}

/// What a request stored in part is told to do.
const SEND_AGAIN: &str = "send the updates after the first `stored` again (sent whole, those \
                          stored would be applied again: an update without a timestamp, or of a \
                          profile the request later deletes, would count as new)";

/// The status and body of [`commit_failure`]'s answer. One stored in part (only a request of
/// more than `REQUEST_CHUNK` updates can be) says which part, and `stored` (and `in_doubt`)
/// give how many updates from its start were (and, after them, may have been).
fn failure_body(partly: &PartlyCommitted, count: u64) -> (StatusCode, serde_json::Value) {
    let PartlyCommitted {
        stored,
        in_doubt,
        error,
    } = partly;
    let (status, reason) = match error {
        CommitError::Unavailable(e) | CommitError::InDoubt(e) => {
            (StatusCode::SERVICE_UNAVAILABLE, e.clone())
        }
        CommitError::Refused(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.clone()),
        // Sent here by mistake: the profile's partition was handed over; sending it again is
        // no use.
        CommitError::Elsewhere(e) => (StatusCode::CONFLICT, e.clone()),
        // Nothing was stored; after a restart the same request may be: a 503 like the others,
        // with `Retry-After`.
        e => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    if !partly.stored_in_part(count) {
        let message = match error {
            CommitError::InDoubt(_) => format!("{error}; send the same request again"),
            _ => format!("not stored: {reason}"),
        };
        return (status, json!({ "error": message }));
    }
    let what = what_was_stored(stored.accepted, *in_doubt, count);
    let message = match error {
        CommitError::Elsewhere(_) => format!("{reason}; {what}"),
        CommitError::Refused(_) => format!("{reason}; {what}; once this is fixed, {SEND_AGAIN}"),
        _ => format!("{reason}; {what}; {SEND_AGAIN}"),
    };
    let mut body = json!({ "error": message, "stored": stored.accepted });
    if *in_doubt > 0 {
        body["in_doubt"] = (*in_doubt).into();
    }
    (status, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::BatchSummary;

    #[test]
    fn a_failed_commit_is_answered_with_what_of_the_request_was_stored() {
        let stored = |accepted| BatchSummary {
            accepted,
            ..BatchSummary::default()
        };
        let full = || CommitError::Unavailable("no space left".into());
        let in_doubt = || CommitError::InDoubt("no space left".into());
        let moved = || CommitError::Elsewhere("profile p is in partition 3".into());
        let again = format!("; {SEND_AGAIN}");
        // (stored, in doubt, error) of a request of 2,500 updates, or 500 for one chunk
        let cases = [
            (0, 0, full(), 2500, 503, "not stored: no space left".to_string(), None),
            (
                0,
                500,
                in_doubt(),
                500,
                503,
                "may have been stored or not: no space left; send the same request again".into(),
                None,
            ),
            (
                0,
                1000,
                in_doubt(),
                2500,
                503,
                format!("no space left; the first 1000 of 2500 updates may have been stored, the rest not{again}"),
                Some((0, Some(1000))),
            ),
            (
                2000,
                0,
                full(),
                2500,
                503,
                format!("no space left; the first 2000 of 2500 updates were stored, the rest not{again}"),
                Some((2000, None)),
            ),
            (
                1000,
                1000,
                in_doubt(),
                2500,
                503,
                format!("no space left; the first 1000 of 2500 updates were stored, the next 1000 may have been, the rest not{again}"),
                Some((1000, Some(1000))),
            ),
            (
                0,
                0,
                moved(),
                2500,
                409,
                "not stored: profile p is in partition 3".into(),
                None,
            ),
            (
                1000,
                0,
                moved(),
                2500,
                409,
                "profile p is in partition 3; the first 1000 of 2500 updates were stored, the rest not".into(),
                Some((1000, None)),
            ),
        ];
        for (accepted, doubt, error, count, status, said, parts) in cases {
            let partly = PartlyCommitted {
                stored: stored(accepted),
                in_doubt: doubt,
                error,
            };
            let (got_status, body) = failure_body(&partly, count);
            assert_eq!(got_status.as_u16(), status, "{body}");
            assert_eq!(body["error"], said, "{body}");
            let (stored_field, doubt_field) = match parts {
                Some((s, d)) => (Some(s), d),
                None => (None, None),
            };
            assert_eq!(body["stored"].as_u64(), stored_field, "{body}");
            assert_eq!(body["in_doubt"].as_u64(), doubt_field, "{body}");
        }
    }
}
