//! A destination to test against: an OAuth 2.0 token endpoint (`POST /oauth/token`) and a
//! profile endpoint (`POST /profiles`) on one listener, with faults on demand.
//!
//! It issues tokens for one client id and secret with a given lifetime, answers profile
//! exports that carry a live token, and records what it got. `outpost receiver`, `outpost
//! demo` and the integration tests use it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub const TOKEN_PATH: &str = "/oauth/token";
pub const PROFILES_PATH: &str = "/profiles";
/// The longest lifetime a token is given.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// What the receiver answers to one request, chosen by a [`Script`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The normal answer (200 with a token, or 200/401 for an export).
    Normal,
    /// The normal answer, with these headers too.
    NormalWith(Vec<(String, String)>),
    /// This status, with these headers and body.
    Status(u16, Vec<(String, String)>, String),
    /// Wait this long, then answer normally.
    Delay(Duration),
    /// Wait this long, then answer as the inner reply says.
    After(Duration, Box<Reply>),
}

/// Chooses the reply to the n-th request (0-based) of its endpoint.
pub type Script = Arc<dyn Fn(u64, &Received) -> Reply + Send + Sync>;

impl Reply {
    /// 503: the destination is down.
    pub fn down() -> Reply {
        Reply::Status(503, vec![], "down".into())
    }

    /// 429 with `Retry-After: 1`: over the rate limit.
    pub fn rate_limited() -> Reply {
        Reply::Status(
            429,
            vec![("retry-after".into(), "1".into())],
            "rate limited".into(),
        )
    }
}

/// A script that answers every export [`Reply::down`].
pub fn down() -> Script {
    Arc::new(|_, _| Reply::down())
}

/// Called with every export answered 2xx.
pub type DeliveredHook = Arc<dyn Fn(&Received) + Send + Sync>;

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The status it was answered with.
    pub status: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

pub struct ReceiverOptions {
    pub client_id: String,
    pub client_secret: String,
    /// Accept the password grant for this user and password (besides client credentials).
    pub user: Option<(String, String)>,
    /// Issue a refresh token with every access token, and accept it once for a new one.
    pub refresh_tokens: bool,
    pub token_lifetime: Duration,
    /// The share (0 to 1) of export requests answered 503 at random.
    pub fail_share: f64,
    /// The share (0 to 1) of export requests answered 400 at random (the export refused).
    pub reject_share: f64,
    /// Serve TLS with this configuration instead of plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Keep every request it gets, for [`Receiver::export_requests`],
    /// [`Receiver::token_requests`] and [`Receiver::delivered`] (tests and the demo read them
    /// back). Off, those stay empty and the receiver only counts requests, so its memory stays
    /// flat however long it runs, as `outpost receiver` needs.
    pub keep_requests: bool,
}

impl Default for ReceiverOptions {
    fn default() -> Self {
        ReceiverOptions {
            client_id: "edge-agent".into(),
            client_secret: "change-me".into(),
            user: None,
            refresh_tokens: false,
            token_lifetime: Duration::from_secs(3600),
            fail_share: 0.0,
            reject_share: 0.0,
            tls: None,
            keep_requests: true,
        }
    }
}

struct State {
    options: ReceiverOptions,
    tokens: Mutex<HashMap<String, Instant>>,
    token_requests: Mutex<Vec<Received>>,
    exports: Mutex<Vec<Received>>,
    token_script: Mutex<Option<Script>>,
    export_script: Mutex<Option<Script>>,
    /// Called with every export answered 2xx (the `receiver` command prints them).
    on_delivered: Mutex<Option<DeliveredHook>>,
    issued: Mutex<u64>,
    /// Requests that arrived, per endpoint (a request dropped by its client is never logged).
    token_arrivals: std::sync::atomic::AtomicU64,
    export_arrivals: std::sync::atomic::AtomicU64,
    /// Refresh tokens issued and not yet used.
    refresh_tokens: Mutex<std::collections::HashSet<String>>,
    /// Export requests being handled now, and the most there were at once.
    in_flight: std::sync::atomic::AtomicU64,
    max_in_flight: std::sync::atomic::AtomicU64,
}

/// A running receiver; it stops when dropped.
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Receiver {
    pub async fn start(addr: SocketAddr, options: ReceiverOptions) -> std::io::Result<Receiver> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Receiver::serve(listener, options))
    }

    /// Serves on an already bound listener (tests bind first, to know the port in advance).
    pub fn serve(listener: TcpListener, options: ReceiverOptions) -> Receiver {
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let tls = options.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        let state = Arc::new(State {
            options,
            tokens: Mutex::new(HashMap::new()),
            token_requests: Mutex::new(Vec::new()),
            exports: Mutex::new(Vec::new()),
            token_script: Mutex::new(None),
            export_script: Mutex::new(None),
            on_delivered: Mutex::new(None),
            issued: Mutex::new(0),
            token_arrivals: Default::default(),
            export_arrivals: Default::default(),
            refresh_tokens: Default::default(),
            in_flight: Default::default(),
            max_in_flight: Default::default(),
        });
        let stop = CancellationToken::new();
        let (serve_state, serve_stop) = (Arc::clone(&state), stop.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => {
                            // Out of file descriptors, say: what waits to be accepted stays,
                            // so trying again at once would spin.
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = serve_stop.cancelled() => break,
                };
                let state = Arc::clone(&serve_state);
                let tls = tls.clone();
                let stop = serve_stop.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(handle(&state, request).await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(stream).await else {
                                return;
                            };
                            tokio::select! {
                                _ = builder.serve_connection(TokioIo::new(stream), service) => {}
                                _ = stop.cancelled() => {}
                            }
                        }
                        None => {
                            tokio::select! {
                                _ = builder.serve_connection(TokioIo::new(stream), service) => {}
                                _ = stop.cancelled() => {}
                            }
                        }
                    }
                });
            }
        });
        Receiver { addr, state, stop }
    }

    pub fn base_url(&self) -> String {
        let scheme = if self.state.options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    pub fn set_token_script(&self, script: Option<Script>) {
        *self.state.token_script.lock().unwrap() = script;
    }

    pub fn set_export_script(&self, script: Option<Script>) {
        *self.state.export_script.lock().unwrap() = script;
    }

    pub fn on_delivered(&self, callback: DeliveredHook) {
        *self.state.on_delivered.lock().unwrap() = Some(callback);
    }

    /// Invalidates every token issued so far (as if revoked).
    pub fn revoke_tokens(&self) {
        self.state.tokens.lock().unwrap().clear();
    }

    pub fn token_requests(&self) -> Vec<Received> {
        self.state.token_requests.lock().unwrap().clone()
    }

    /// Every export request, in arrival order, with the status it got (none unless
    /// [`ReceiverOptions::keep_requests`]).
    pub fn export_requests(&self) -> Vec<Received> {
        self.state.exports.lock().unwrap().clone()
    }

    /// The export requests from the `from`th on ([`Receiver::export_requests`] without
    /// copying those already seen: the log only grows, a request joining it once answered).
    pub fn export_requests_from(&self, from: usize) -> Vec<Received> {
        let log = self.state.exports.lock().unwrap();
        log.get(from..).map_or_else(Vec::new, <[Received]>::to_vec)
    }

    /// Exports answered 2xx, in arrival order.
    pub fn delivered(&self) -> Vec<Received> {
        self.export_requests()
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .collect()
    }

    /// Export requests that arrived, answered or not (a client that timed out is never answered).
    pub fn export_arrivals(&self) -> u64 {
        self.state
            .export_arrivals
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Token requests that arrived, answered or not.
    pub fn token_arrivals(&self) -> u64 {
        self.state
            .token_arrivals
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn tokens_issued(&self) -> u64 {
        *self.state.issued.lock().unwrap()
    }

    /// Forgets every refresh token issued so far (the next refresh with one is refused).
    pub fn revoke_refresh_tokens(&self) {
        self.state.refresh_tokens.lock().unwrap().clear();
    }

    /// The most export requests handled at once since the last [`Receiver::reset_max_in_flight`].
    pub fn max_in_flight(&self) -> u64 {
        self.state
            .max_in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn reset_max_in_flight(&self) {
        let now = self
            .state
            .in_flight
            .load(std::sync::atomic::Ordering::SeqCst);
        self.state
            .max_in_flight
            .store(now, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A token bucket: `per_second` requests a second, up to `burst` at once. As a [`Script`],
/// it answers 429 with `Retry-After: 1` above the rate.
pub struct RateLimit {
    per_second: f64,
    burst: f64,
    bucket: Mutex<(f64, Instant)>,
}

impl RateLimit {
    pub fn new(per_second: f64, burst: f64) -> RateLimit {
        RateLimit {
            per_second,
            burst,
            bucket: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes a token if there is one.
    pub fn admit(&self) -> bool {
        let mut bucket = self.bucket.lock().unwrap();
        let now = Instant::now();
        let (tokens, at) = *bucket;
        let tokens =
            (tokens + now.duration_since(at).as_secs_f64() * self.per_second).min(self.burst);
        let admitted = tokens >= 1.0;
        *bucket = (if admitted { tokens - 1.0 } else { tokens }, now);
        admitted
    }

    pub fn script(self: Arc<Self>) -> Script {
        Arc::new(move |_, _| {
            if self.admit() {
                Reply::Normal
            } else {
                Reply::rate_limited()
            }
        })
    }
}

/// A fixed window: `limit` requests each `window`, the windows one after another from the
/// first request (as a limiter whose windows follow the clock). As a
/// [`Script`], it answers 429 past the limit with `Retry-After` the rest of the window and,
/// when `advertise`, every answer says what the window has left (`RateLimit-Remaining`,
/// `RateLimit-Reset` in whole seconds, rounded up, as the IETF draft has them).
pub struct FixedWindow {
    limit: u64,
    window: Duration,
    advertise: bool,
    /// (requests counted in the current window, when it started).
    counted: Mutex<(u64, Option<Instant>)>,
}

impl FixedWindow {
    pub fn new(limit: u64, window: Duration, advertise: bool) -> FixedWindow {
        FixedWindow {
            limit,
            window,
            advertise,
            counted: Mutex::new((0, None)),
        }
    }

    /// Counts a request: whether it is within the limit, what the window has left, and the
    /// time until it starts again.
    fn count(&self) -> (bool, u64, Duration) {
        let mut counted = self.counted.lock().unwrap();
        let now = Instant::now();
        let first = *counted.1.get_or_insert(now);
        let windows = (now - first).as_nanos() / self.window.as_nanos().max(1);
        let started = first + self.window * windows as u32;
        if counted.1 != Some(started) {
            *counted = (0, Some(started));
        }
        let admitted = counted.0 < self.limit;
        if admitted {
            counted.0 += 1;
        }
        (
            admitted,
            self.limit - counted.0,
            started + self.window - now,
        )
    }

    pub fn script(self: Arc<Self>) -> Script {
        Arc::new(move |_, _| {
            let (admitted, remaining, resets_in) = self.count();
            let seconds = resets_in.as_secs_f64().ceil().max(1.0).to_string();
            let mut headers = Vec::new();
            if self.advertise {
                headers.push(("ratelimit-remaining".to_string(), remaining.to_string()));
                headers.push(("ratelimit-reset".to_string(), seconds.clone()));
            }
            if admitted {
                Reply::NormalWith(headers)
            } else {
                headers.push(("retry-after".to_string(), seconds));
                Reply::Status(429, headers, "rate limited".into())
            }
        })
    }
}

fn answer(
    status: u16,
    headers: &[(String, String)],
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::builder().status(status);
    for (name, value) in headers {
        response = response.header(name.as_str(), value.as_str());
    }
    response
        .body(Full::new(body.into()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// The largest request body the receiver reads: an array of exports takes some MiB at most.
const MAX_BODY_BYTES: usize = 64 << 20;

async fn handle(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = match http_body_util::Limited::new(body, MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return answer(413, &[], "the body is larger than the receiver reads");
        }
        Err(_) => Bytes::new(),
    };
    let mut received = Received {
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers,
        body,
        status: 0,
    };
    let (log, script, arrivals) = match (&parts.method, received.path.as_str()) {
        (&Method::POST, TOKEN_PATH) => (
            &state.token_requests,
            state.token_script.lock().unwrap().clone(),
            &state.token_arrivals,
        ),
        (&Method::POST, PROFILES_PATH) => (
            &state.exports,
            state.export_script.lock().unwrap().clone(),
            &state.export_arrivals,
        ),
        _ => return answer(404, &[], "not found"),
    };
    let n = arrivals.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let _in_flight = (received.path == PROFILES_PATH).then(|| InFlight::enter(state));
    let mut reply = script.map_or(Reply::Normal, |script| script(n, &received));
    let mut response = loop {
        match reply {
            Reply::Status(status, headers, body) => break answer(status, &headers, body),
            Reply::Delay(wait) => reply = Reply::After(wait, Box::new(Reply::Normal)),
            Reply::After(wait, then) => {
                tokio::time::sleep(wait).await;
                reply = *then;
            }
            Reply::Normal => break normal(state, &received),
            Reply::NormalWith(headers) => {
                let mut response = normal(state, &received);
                for (name, value) in headers {
                    if let (Ok(name), Ok(value)) = (
                        hyper::header::HeaderName::from_bytes(name.as_bytes()),
                        hyper::header::HeaderValue::from_str(&value),
                    ) {
                        response.headers_mut().insert(name, value);
                    }
                }
                break response;
            }
        }
    };
    if received.path == PROFILES_PATH && response.status() == StatusCode::OK {
        // One draw for both, so that each share is of all requests.
        let draw = rand::random::<f64>();
        let (fail, reject) = (state.options.fail_share, state.options.reject_share);
        if draw < fail {
            response = answer(503, &[], "injected failure");
        } else if draw < fail + reject {
            response = answer(400, &[], "injected refusal: this export is refused");
        }
    }
    received.status = response.status().as_u16();
    if received.path == PROFILES_PATH && (200..300).contains(&received.status) {
        // Taken out of the lock first: a callback that panics (a print to a closed pipe) must
        // not poison it for every later export.
        let callback = state.on_delivered.lock().unwrap().clone();
        if let Some(callback) = callback {
            callback(&received);
        }
    }
    if state.options.keep_requests {
        log.lock().unwrap().push(received);
    }
    response
}

/// Counts an export request as in flight while it lives.
struct InFlight<'a>(&'a State);

impl<'a> InFlight<'a> {
    fn enter(state: &'a State) -> InFlight<'a> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = state.in_flight.fetch_add(1, SeqCst) + 1;
        state.max_in_flight.fetch_max(now, SeqCst);
        InFlight(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

fn normal(state: &State, received: &Received) -> Response<Full<Bytes>> {
    if received.path == TOKEN_PATH {
        issue_token(state, received)
    } else {
        accept_export(state, received)
    }
}

/// The client's id and secret, from the form body or a Basic header.
fn client_credentials(received: &Received) -> (Option<String>, Option<String>) {
    if let Some(basic) = received
        .header("authorization")
        .and_then(|v| v.strip_prefix("Basic "))
    {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(basic)
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&decoded).into_owned();
        if let Some((id, secret)) = text.split_once(':') {
            let decode = |s: &str| {
                url::form_urlencoded::parse(format!("x={s}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
            };
            return (decode(id), decode(secret));
        }
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(&received.body)
        .into_owned()
        .collect();
    (
        form.get("client_id").cloned(),
        form.get("client_secret").cloned(),
    )
}

fn issue_token(state: &State, received: &Received) -> Response<Full<Bytes>> {
    let form: HashMap<String, String> = url::form_urlencoded::parse(&received.body)
        .into_owned()
        .collect();
    let (id, secret) = client_credentials(received);
    if id.as_deref() != Some(&state.options.client_id)
        || secret.as_deref() != Some(&state.options.client_secret)
    {
        return answer(401, &[], json!({"error": "invalid_client"}).to_string());
    }
    let field = |name: &str| form.get(name).map(String::as_str);
    let invalid_grant = || answer(400, &[], json!({"error": "invalid_grant"}).to_string());
    match field("grant_type") {
        Some("client_credentials") => {}
        Some("password") => {
            let user = state.options.user.as_ref();
            if user.is_none_or(|(name, password)| {
                field("username") != Some(name) || field("password") != Some(password)
            }) {
                return invalid_grant();
            }
        }
        Some("refresh_token") => {
            let known = field("refresh_token")
                .is_some_and(|t| state.refresh_tokens.lock().unwrap().remove(t));
            if !known {
                return invalid_grant();
            }
        }
        _ => {
            return answer(
                400,
                &[],
                json!({"error": "unsupported_grant_type"}).to_string(),
            )
        }
    }
    let token = format!("tok-{:032x}", rand::random::<u128>());
    // Held to a century, so that the expiry can be counted (`--token-lifetime-s` takes any u64).
    let lifetime = state.options.token_lifetime.min(MAX_TOKEN_LIFETIME);
    let now = Instant::now();
    let mut tokens = state.tokens.lock().unwrap();
    // Expired tokens are refused as unknown ones are: forgetting them keeps a long run's memory
    // flat.
    tokens.retain(|_, expiry| now < *expiry);
    tokens.insert(token.clone(), now + lifetime);
    drop(tokens);
    *state.issued.lock().unwrap() += 1;
    let mut body =
        json!({"access_token": token, "token_type": "Bearer", "expires_in": lifetime.as_secs()});
    if state.options.refresh_tokens {
        let refresh = format!("ref-{:032x}", rand::random::<u128>());
        state.refresh_tokens.lock().unwrap().insert(refresh.clone());
        body["refresh_token"] = refresh.into();
    }
    answer(
        200,
        &[(CONTENT_TYPE.to_string(), "application/json".into())],
        body.to_string(),
    )
}

fn accept_export(state: &State, received: &Received) -> Response<Full<Bytes>> {
    let token = received
        .header(AUTHORIZATION.as_str())
        .and_then(|v| v.strip_prefix("Bearer "));
    let live = token.is_some_and(|t| {
        state
            .tokens
            .lock()
            .unwrap()
            .get(t)
            .is_some_and(|expiry| Instant::now() < *expiry)
    });
    if !live {
        return answer(401, &[], json!({"error": "invalid_token"}).to_string());
    }
    // Checked as strictly as a `Value` parse, without building the tree.
    if serde_json::from_slice::<crate::profile::record::Valid>(&received.body).is_err() {
        return answer(
            400,
            &[],
            json!({"error": "the body is not JSON"}).to_string(),
        );
    }
    answer(
        200,
        &[(CONTENT_TYPE.to_string(), "application/json".into())],
        json!({"status": "accepted"}).to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// `outpost receiver --token-lifetime-s` takes any u64: a lifetime whose expiry cannot be
    /// counted is held to a century rather than panicking with the token table locked, which
    /// would fail every later token request too.
    #[tokio::test]
    async fn a_token_lifetime_too_long_to_count_is_held_to_a_century() {
        let options = ReceiverOptions {
            token_lifetime: Duration::from_secs(u64::MAX),
            ..ReceiverOptions::default()
        };
        let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), options)
            .await
            .unwrap();
        let addr = receiver.base_url().trim_start_matches("http://").to_owned();
        let body = "grant_type=client_credentials&client_id=edge-agent&client_secret=change-me";
        for _ in 0..2 {
            let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let request = format!(
                "POST {TOKEN_PATH} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: \
                 application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            assert!(answer.contains("\"expires_in\":3153600000"), "{answer}");
        }
    }
}
