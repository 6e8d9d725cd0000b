//! The HTTP interface of the real `outpost run` binary: the ingest API's answers to bad and good
//! input, its token, its limits, `/healthz`, `/metrics`, a full outbox, and stopping on a signal.
//!
//! Each test starts the binary on a fixed free port (picked by binding port 0 and dropping it),
//! delivering to an in-process [`Receiver`], and kills it when the test ends, whatever happens.

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::agent_process::{free_port, AgentProcess};
use common::*;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};
use outpost::receiver::{Receiver, ReceiverOptions, Reply};
use serde_json::{json, Value};

const TOKEN: &str = "ingest-secret";
const MAX_BODY: usize = 1_048_576;
const AUTH: (&str, &str) = ("authorization", "Bearer ingest-secret");

/// The agent's config: delivering to `base` with OAuth, ingest on `port` with a token and a
/// 1 MiB body limit, and `storage_extra` lines in `[storage]`.
fn config_text(base: &str, port: u16, storage_extra: &str) -> String {
    let text = agent_config_text(base, &oauth_body(base), "");
    let listen = "listen = \"127.0.0.1:0\"";
    let cache = "cache_bytes = 8388608";
    assert!(text.contains(listen) && text.contains(cache), "{text}");
    text.replace(
        listen,
        &format!("listen = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\nmax_body_bytes = {MAX_BODY}"),
    )
    .replace(cache, &format!("{cache}\n{storage_extra}"))
}

/// Starts the binary on the workspace's config, logging at debug level, and checks `/healthz`.
async fn start_agent(ws: &Workspace, port: u16) -> AgentProcess {
    let agent =
        AgentProcess::start_with_env(&ws.config_path(), port, &[("OUTPOST_LOG", "debug")]).await;
    let (status, _, body) = request(agent.addr, "GET", "/healthz", None, &[])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"status": "ok"})
    );
    agent
}

/// A body sent in chunks without a Content-Length (chunked transfer encoding).
struct Chunked(VecDeque<Bytes>);

impl Body for Chunked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

enum Payload {
    /// With a Content-Length.
    Sized(Vec<u8>),
    /// Chunked, in pieces of 64 KiB.
    Chunked(Vec<u8>),
}

/// One request; the status, headers and body of the answer (Err if there was none).
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    payload: Option<Payload>,
    headers: &[(&str, &str)],
) -> Result<(u16, hyper::HeaderMap, String), String> {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client: Client<_, BoxBody<Bytes, Infallible>> =
        Client::builder(TokioExecutor::new()).build_http();
    let body = match payload {
        None => Full::new(Bytes::new()).boxed(),
        Some(Payload::Sized(bytes)) => Full::new(Bytes::from(bytes)).boxed(),
        Some(Payload::Chunked(bytes)) => {
            Chunked(bytes.chunks(64 << 10).map(Bytes::copy_from_slice).collect()).boxed()
        }
    };
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = client
        .request(builder.body(body).unwrap())
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}

/// POSTs `body` to `/v1/updates` with the ingest token.
async fn post(addr: SocketAddr, body: impl Into<Vec<u8>>) -> (u16, hyper::HeaderMap, String) {
    request(
        addr,
        "POST",
        "/v1/updates",
        Some(Payload::Sized(body.into())),
        &[AUTH],
    )
    .await
    .unwrap()
}

/// A workspace whose config delivers to `receiver` and listens on a fresh port.
fn workspace(receiver: &Receiver, storage_extra: &str) -> (Workspace, u16) {
    let ws = Workspace::new();
    let port = free_port();
    std::fs::write(
        ws.config_path(),
        config_text(&receiver.base_url(), port, storage_extra),
    )
    .unwrap();
    (ws, port)
}

/// An agent on a [`workspace`] with a request timeout of 30 s (which no test waits out) that
/// took one update (of `a`).
async fn patient_agent_after_one_update(receiver: &Receiver) -> (Workspace, u16, AgentProcess) {
    let (ws, port) = workspace(receiver, "");
    let config = std::fs::read_to_string(ws.config_path()).unwrap();
    let patient = config.replacen("request_timeout_ms = 500", "request_timeout_ms = 30000", 1);
    assert_ne!(patient, config);
    std::fs::write(ws.config_path(), patient).unwrap();
    let agent = agent_after_one_update(&ws, port).await;
    (ws, port, agent)
}

/// An agent started on `ws` that took one update (of `a`).
async fn agent_after_one_update(ws: &Workspace, port: u16) -> AgentProcess {
    let agent = start_agent(ws, port).await;
    let (status, _, answer) = post(
        agent.addr,
        member_update("a", "Ann", "2026-01-01T00:00:01Z"),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    agent
}

/// [`workspace`] with `line` added to `[ingest]`.
fn workspace_with_ingest(receiver: &Receiver, line: &str) -> (Workspace, u16) {
    let (ws, port) = workspace(receiver, "");
    let limit = format!("max_body_bytes = {MAX_BODY}");
    let text = std::fs::read_to_string(ws.config_path()).unwrap();
    assert!(text.contains(&limit), "{text}");
    std::fs::write(
        ws.config_path(),
        text.replace(&limit, &format!("{limit}\n{line}")),
    )
    .unwrap();
    (ws, port)
}

async fn receiver() -> Receiver {
    Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_with_line_and_reason_and_nothing_is_stored() {
    let receiver = receiver().await;
    let (ws, port) = workspace(&receiver, "");
    let mut agent = start_agent(&ws, port).await;

    let good = |id: &str| member_update(id, "Jane", "2026-01-01T00:00:01Z");
    let deep_array = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_profile = format!(
        "{{\"id\":\"deep\",\"profile\":{{\"x\":{}1{}}}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let deep_objects = format!(
        "{{\"id\":\"deep\",\"profile\":{}1{}}}",
        "{\"a\":".repeat(10_000),
        "}".repeat(10_000)
    );
    let id_600 = "x".repeat(600);
    // (what, body, line, a piece of the reason)
    let cases: Vec<(&str, Vec<u8>, u64, &str)> = vec![
        (
            "not JSON",
            b"this is not json".to_vec(),
            1,
            "not valid JSON",
        ),
        (
            "a JSON number",
            b"42".to_vec(),
            1,
            "must be a JSON object, not a number",
        ),
        ("a JSON string", b"\"p-1\"".to_vec(), 1, "not a string"),
        ("JSON null", b"null".to_vec(), 1, "not null"),
        (
            "an unknown field",
            br#"{"id":"p-1","profile":{},"colour":"red"}"#.to_vec(),
            1,
            "unknown field `colour`",
        ),
        (
            "an id that is a number",
            br#"{"id":5,"profile":{}}"#.to_vec(),
            1,
            "`id` must be a string, not a number",
        ),
        (
            "a profile that is an array",
            br#"{"id":"p-1","profile":[1]}"#.to_vec(),
            1,
            "`profile` must be an object, not an array",
        ),
        (
            "a timestamp that is a number",
            br#"{"id":"p-1","profile":{},"timestamp":1767225600}"#.to_vec(),
            1,
            "`timestamp` must be a string, not a number",
        ),
        (
            "an op that is a boolean",
            br#"{"id":"p-1","op":true,"profile":{}}"#.to_vec(),
            1,
            "`op` must be a string, not a boolean",
        ),
        (
            "a missing profile",
            br#"{"id":"p-1","timestamp":"2026-01-01T00:00:01Z"}"#.to_vec(),
            1,
            "`profile` is required",
        ),
        (
            "a merge without profile",
            br#"{"id":"p-1","op":"merge"}"#.to_vec(),
            1,
            "`profile` is required for op `merge`",
        ),
        (
            "a missing id",
            br#"{"profile":{}}"#.to_vec(),
            1,
            "missing field `id`",
        ),
        (
            "an empty id",
            br#"{"id":"","profile":{}}"#.to_vec(),
            1,
            "`id` must not be empty",
        ),
        (
            "a 600-byte id",
            format!("{{\"id\":\"{id_600}\",\"profile\":{{}}}}").into_bytes(),
            1,
            "600 bytes",
        ),
        (
            "a timestamp that is not RFC 3339",
            br#"{"id":"p-1","profile":{},"timestamp":"yesterday"}"#.to_vec(),
            1,
            "not RFC 3339",
        ),
        (
            "a timestamp without a zone",
            br#"{"id":"p-1","profile":{},"timestamp":"2026-01-01T00:00:01"}"#.to_vec(),
            1,
            "not RFC 3339",
        ),
        (
            "an unknown op",
            br#"{"id":"p-1","op":"replace","profile":{}}"#.to_vec(),
            1,
            "`op` must be one of `upsert`, `merge`, `delete`, not `replace`",
        ),
        (
            "invalid UTF-8",
            b"{\"id\":\"p-1\",\"profile\":{\"n\":\"\xff\xfe\"}}".to_vec(),
            1,
            "not UTF-8: it holds bytes that are not a UTF-8 character",
        ),
        ("an empty body", Vec::new(), 1, "no update"),
        ("a blank body", b"\n  \n".to_vec(), 1, "no update"),
        ("an empty array", b"[]".to_vec(), 1, "no update"),
        (
            "arrays nested 10,000 deep",
            deep_array.into_bytes(),
            1,
            "must be a JSON object, not an array",
        ),
        (
            "a profile nested 10,000 deep (arrays)",
            deep_profile.into_bytes(),
            1,
            "nested more than 128 deep",
        ),
        (
            "a profile nested 10,000 deep (objects)",
            deep_objects.clone().into_bytes(),
            1,
            "nested more than 128 deep",
        ),
        (
            "a bad line 3 after 2 good lines",
            format!(
                "{}\n{}\n{{\"id\":\"p-3\",\"profile\":{{}},\"colour\":\"red\"}}\n{}\n",
                good("p-1"),
                good("p-2"),
                good("p-4")
            )
            .into_bytes(),
            3,
            "unknown field `colour`",
        ),
        (
            "an unfinished line 3 after 2 good lines",
            format!("{}\n{}\n{{\"id\":\"p-3\",\n", good("p-1"), good("p-2")).into_bytes(),
            3,
            "not valid JSON",
        ),
        (
            "a bad line 3 after 2 good lines and CRLF",
            format!("{}\r\n{}\r\n42\r\n", good("p-1"), good("p-2")).into_bytes(),
            3,
            "not a number",
        ),
        (
            "a bad line 3 after a good line and a blank one",
            format!("{}\n\n{{\"id\":\"p-3\"}}\n", good("p-1")).into_bytes(),
            3,
            "`profile` is required",
        ),
        (
            "invalid UTF-8 on line 3 after 2 good lines",
            [
                good("p-1").as_bytes(),
                b"\n",
                good("p-2").as_bytes(),
                b"\n{\"id\":\"p-\xc3\x28\",\"profile\":{}}\n",
            ]
            .concat(),
            3,
            "not UTF-8: it holds bytes that are not a UTF-8 character",
        ),
        (
            "nesting 10,000 deep on line 3 after 2 good lines",
            format!("{}\n{}\n{}\n", good("p-1"), good("p-2"), deep_objects).into_bytes(),
            3,
            "nested more than 128 deep",
        ),
        (
            "a 513-byte id of 2-byte characters",
            format!("{{\"id\":\"a{}\",\"profile\":{{}}}}", "é".repeat(256)).into_bytes(),
            1,
            "513 bytes",
        ),
        (
            "a bad item 2 in an array",
            format!("[\n{},\n7]", good("p-1")).into_bytes(),
            3,
            "array item 2",
        ),
        (
            "segment memberships as an array after a good line (a member's would all exit)",
            format!(
                "{}\n{}\n",
                good("p-1"),
                r#"{"id":"p-2","profile":{"segmentMembership":{"ups":[{"s1":{"status":"realized"}}]}}}"#
            )
            .into_bytes(),
            2,
            "`profile.segmentMembership.ups` must be an object, not an array",
        ),
        (
            "an op given as an object",
            br#"{"id":"p-1","op":{"delete":null}}"#.to_vec(),
            1,
            "`op` must be a string, not an object",
        ),
    ];
    for (what, body, line, reason) in cases {
        let (status, headers, answer) = post(agent.addr, body).await;
        assert_eq!(status, 400, "{what}: {answer}");
        assert_eq!(
            headers.get("content-type").map(|v| v.to_str().unwrap()),
            Some("application/json"),
            "{what}"
        );
        let answer: Value = serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("{what}: the answer is not JSON ({e}): {answer}"));
        assert_eq!(answer["line"], line, "{what}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(reason), "{what}: `{error}` lacks `{reason}`");
    }

    // Over max_body_bytes: 413, declared (Content-Length) or not (chunked).
    let big = json!({"id": "big", "profile": {"note": "z".repeat(MAX_BODY)}}).to_string();
    assert!(big.len() > MAX_BODY);
    for payload in [
        Payload::Sized(big.clone().into_bytes()),
        Payload::Chunked(big.clone().into_bytes()),
    ] {
        let chunked = matches!(payload, Payload::Chunked(_));
        let (status, _, answer) =
            request(agent.addr, "POST", "/v1/updates", Some(payload), &[AUTH])
                .await
                .unwrap_or_else(|e| panic!("no answer to a large body (chunked {chunked}): {e}"));
        assert_eq!(status, 413, "chunked {chunked}: {answer}");
        let answer: Value = serde_json::from_str(&answer).unwrap();
        assert!(
            answer["error"].as_str().unwrap().contains("max_body_bytes"),
            "{answer}"
        );
    }

    // Nothing of any of them is stored.
    let stats = ws.outbox_stats();
    assert_eq!(stats["pending"], 0, "{stats}");
    assert_eq!(stats["dead"], 0, "{stats}");
    assert_eq!(stats["profiles"], 0, "{stats}");
    assert!(receiver.export_requests().is_empty());

    // The agent still takes good input afterwards, also chunked.
    let two = format!("{}\n{}\n", good("p-1"), good("p-2"));
    let (status, _, answer) = request(
        agent.addr,
        "POST",
        "/v1/updates",
        Some(Payload::Chunked(two.into_bytes())),
        &[AUTH],
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{answer}");
    let stats = ws.outbox_stats();
    assert_eq!(stats["profiles"], 2, "{stats}");

    // The limits are inclusive: an id of 512 bytes, and a body of exactly max_body_bytes.
    let id_512 = "é".repeat(256);
    let mut exact = json!({"id": id_512, "profile": {"note": ""}}).to_string();
    let padding = MAX_BODY - exact.len();
    exact = json!({"id": id_512, "profile": {"note": "p".repeat(padding)}}).to_string();
    assert_eq!(exact.len(), MAX_BODY);
    let (status, _, answer) = post(agent.addr, exact).await;
    assert_eq!(status, 200, "{answer}");
    let stats = ws.outbox_stats();
    assert_eq!(stats["profiles"], 3, "{stats}");

    let status = agent
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(5))
        .await;
    assert_eq!(status.code(), Some(0), "{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ingest_token_is_required() {
    let receiver = receiver().await;
    let (ws, port) = workspace(&receiver, "");
    let mut agent = start_agent(&ws, port).await;
    let body = member_update("p-1", "Jane", "2026-01-01T00:00:01Z");
    for headers in [
        vec![],
        vec![("authorization", "Bearer wrong-secret")],
        vec![("authorization", "Bearer ingest-secre")],
        vec![("authorization", "Bearer ingest-secret2")],
        vec![("authorization", "ingest-secret")],
        vec![("authorization", "Basic aW5nZXN0LXNlY3JldA==")],
        vec![("authorization", "Bearer ")],
    ] {
        let (status, www_authenticate, answer) = request(
            agent.addr,
            "POST",
            "/v1/updates",
            Some(Payload::Sized(body.clone().into_bytes())),
            &headers,
        )
        .await
        .unwrap();
        assert_eq!(status, 401, "{headers:?}: {answer}");
        assert_eq!(
            www_authenticate
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap()),
            Some("Bearer")
        );
        let answer: Value = serde_json::from_str(&answer).unwrap();
        assert!(answer["error"].is_string(), "{answer}");
        assert!(
            !answer.to_string().contains(TOKEN),
            "the answer shows the token: {answer}"
        );
    }
    // A refused request is neither parsed nor stored: even a bad body gets 401 first.
    let (status, _, _) = request(
        agent.addr,
        "POST",
        "/v1/updates",
        Some(Payload::Sized(b"not json".to_vec())),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(status, 401);
    let stats = ws.outbox_stats();
    assert_eq!(stats["profiles"], 0, "{stats}");

    let (status, _, answer) = post(agent.addr, body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(ws.outbox_stats()["profiles"], 1);
    // The scheme in any case, and one or more spaces (or tabs) before the token.
    for (n, authorization) in [
        "bearer ingest-secret",
        "Bearer  ingest-secret",
        "BEARER \t ingest-secret",
    ]
    .into_iter()
    .enumerate()
    {
        let update = member_update(&format!("p-{}", n + 2), "Jane", "2026-01-01T00:00:01Z");
        let (status, _, answer) = request(
            agent.addr,
            "POST",
            "/v1/updates",
            Some(Payload::Sized(update.into_bytes())),
            &[("authorization", authorization)],
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{authorization:?}: {answer}");
    }
    assert_eq!(ws.outbox_stats()["profiles"], 4);
    assert!(
        !agent.log().contains(TOKEN),
        "the log shows the ingest token"
    );

    // Only POST /v1/updates, GET (or HEAD) /healthz and /metrics exist; neither needs the
    // token to be refused.
    let (status, headers, _) = request(agent.addr, "GET", "/v1/updates", None, &[])
        .await
        .unwrap();
    assert_eq!(status, 405);
    assert_eq!(headers["allow"], "POST");
    let (status, headers, _) = request(agent.addr, "POST", "/healthz", None, &[])
        .await
        .unwrap();
    assert_eq!(status, 405);
    assert_eq!(headers["allow"], "GET, HEAD");
    // A HEAD is answered as its GET, without the body.
    for path in ["/healthz", "/metrics"] {
        let (status, headers, body) = request(agent.addr, "HEAD", path, None, &[]).await.unwrap();
        assert_eq!((status, body.as_str()), (200, ""), "{path}");
        let length: usize = headers["content-length"].to_str().unwrap().parse().unwrap();
        assert!(length > 0, "{path}: the length of its GET's body");
    }
    let (status, _, _) = request(agent.addr, "GET", "/nowhere", None, &[])
        .await
        .unwrap();
    assert_eq!(status, 404);

    let status = agent
        .signal_and_wait(libc::SIGINT, Duration::from_secs(5))
        .await;
    assert_eq!(status.code(), Some(0), "SIGINT: {}", agent.log());
}

/// An ingest token rotated in `ingest.token_file` lets in the clients given the new token
/// without a restart, and refuses the one it replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_token_rotated_in_its_file_lets_its_clients_in_without_a_restart() {
    let receiver = receiver().await;
    let (ws, port) = workspace(&receiver, "");
    let config = std::fs::read_to_string(ws.config_path()).unwrap();
    let from_file = config.replacen(
        &format!("token = \"{TOKEN}\""),
        "token_file = \"ingest-token\"",
        1,
    );
    assert_ne!(from_file, config);
    std::fs::write(ws.config_path(), from_file).unwrap();
    std::fs::write(ws.path().join("ingest-token"), "first-ingest-token\n").unwrap();
    let mut agent = start_agent(&ws, port).await;
    let addr = agent.addr;
    let post_with = |token: &'static str, profile: &'static str| {
        let authorization = format!("Bearer {token}");
        let body = member_update(profile, "Jane", "2026-01-01T00:00:01Z");
        async move {
            let headers = [("authorization", authorization.as_str())];
            let payload = Some(Payload::Sized(body.into_bytes()));
            let (status, _, answer) = request(addr, "POST", "/v1/updates", payload, &headers)
                .await
                .unwrap();
            (status, answer)
        }
    };
    assert_eq!(post_with("first-ingest-token", "a").await.0, 200);
    let rotated = ws.path().join("ingest-token.next");
    std::fs::write(&rotated, "second-ingest-token\n").unwrap();
    std::fs::rename(&rotated, ws.path().join("ingest-token")).unwrap();
    // Read again every second, and taken up once left alone for one.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, answer) = post_with("first-ingest-token", "a").await;
        if status == 401 {
            break;
        }
        assert_eq!(status, 200, "{answer}");
        assert!(Instant::now() < deadline, "the replaced token still let in");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, answer) = post_with("second-ingest-token", "b").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(ws.outbox_stats()["profiles"], 2);
    let log = agent.log();
    assert!(
        log.contains("ingest.token_file holds another value than the one read before"),
        "{log}"
    );
    assert!(
        !log.contains("first-ingest") && !log.contains("second-ingest"),
        "{log}"
    );
    let status = agent
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(5))
        .await;
    assert_eq!(status.code(), Some(0), "{}", agent.log());
}

/// A SIGHUP (the terminal of a session that started the agent by hand closing) stops it as
/// SIGTERM does, letting its work finish: it killed the agent at once, exit 129.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_stops_the_agent_gracefully() {
    let receiver = receiver().await;
    let (ws, port) = workspace(&receiver, "");
    let mut agent = start_agent(&ws, port).await;
    let status = agent
        .signal_and_wait(libc::SIGHUP, Duration::from_secs(5))
        .await;
    assert_eq!(status.code(), Some(0), "SIGHUP: {}", agent.log());
    assert!(agent.log().contains("stopping"), "{}", agent.log());
}

/// The value of the sample `name` (with labels, as rendered) in Prometheus text.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        (key == name).then(|| value.parse().unwrap())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn accepted_updates_are_counted_delivered_and_measured() {
    let receiver = receiver().await;
    let (ws, port) = workspace(&receiver, "");
    let mut agent = start_agent(&ws, port).await;

    // One refused request first, for the `refused` count.
    let (status, _, _) = post(agent.addr, "{\"id\":\"x\"}").await;
    assert_eq!(status, 400);

    let body = [
        member_update("a", "Ann", "2026-01-01T00:00:01Z"),
        member_update("b", "Bob", "2026-01-01T00:00:01Z"),
        // a resend: unchanged
        member_update("a", "Ann", "2026-01-01T00:00:01Z"),
        // older than what is stored: stale
        member_update("a", "Old", "2026-01-01T00:00:00Z"),
        // an attribute change
        member_update("a", "Anna", "2026-01-01T00:00:02Z"),
        // a member of no mapped segment: stored, no export
        json!({"id": "c", "profile": {"person": {"name": {"firstName": "Cy"}}}}).to_string(),
        // b leaves: deleted, with an export
        json!({"id": "b", "op": "delete", "timestamp": "2026-01-01T00:00:03Z"}).to_string(),
    ]
    .join("\n");
    let (status, headers, answer) = post(agent.addr, body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        headers.get("content-type").unwrap().to_str().unwrap(),
        "application/json"
    );
    let answer: Value = serde_json::from_str(&answer).unwrap();
    for (key, n) in [
        ("accepted", 7),
        ("exports", 4),
        ("unchanged", 2),
        ("stale", 1),
        ("deleted", 1),
    ] {
        assert_eq!(answer[key], n, "{key} in {answer}");
    }

    // A 900 KB string in an otherwise valid update is just data.
    let note = "n".repeat(900 * 1024);
    let mut large: Value =
        serde_json::from_str(&member_update("d", "Dee", "2026-01-01T00:00:01Z")).unwrap();
    // In a mapped attribute, so that it is kept and exported (the store may prune the rest).
    large["profile"]["person"]["name"]["lastName"] = json!(note);
    let large = large.to_string();
    assert!(large.len() < MAX_BODY);
    let (status, _, answer) = post(agent.addr, large).await;
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["accepted"], 1);
    assert_eq!(answer["exports"], 1);
    let shown: Value =
        serde_json::from_str(ws.run_ok(&["profile", "show", "d", "--json"], None).trim()).unwrap();
    assert_eq!(
        shown["profile"]["person"]["name"]["lastName"].as_str(),
        Some(note.as_str())
    );

    // All 5 exports are delivered.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats = ws.outbox_stats();
        if stats["pending"] == 0 && receiver.delivered().len() >= 5 {
            assert_eq!(stats["dead"], 0);
            assert_eq!(stats["profiles"], 3, "a, c, d: {stats}");
            break;
        }
        assert!(Instant::now() < deadline, "not delivered: {stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(receiver.delivered().len(), 5);
    assert!(
        receiver.delivered().iter().any(|r| r
            .json()
            .is_some_and(|p| p["person"]["name"]["lastName"].as_str() == Some(note.as_str()))),
        "the 900 KB attribute was not exported"
    );

    // Prometheus asks for OpenMetrics; a client that does not gets the Prometheus text.
    let prometheus_accept =
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (status, headers, openmetrics) = request(
        agent.addr,
        "GET",
        "/metrics",
        None,
        &[("accept", prometheus_accept)],
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let media_type =
        |headers: &hyper::HeaderMap| headers["content-type"].to_str().unwrap().to_owned();
    assert!(
        media_type(&headers).starts_with("application/openmetrics-text"),
        "{headers:?}"
    );
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    assert!(openmetrics.contains("# TYPE outpost_updates counter\n"));
    let (status, headers, metrics) = request(agent.addr, "GET", "/metrics", None, &[])
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        media_type(&headers),
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert!(!metrics.contains("# EOF"), "{metrics}");
    assert!(metrics.contains("# TYPE outpost_updates_total counter\n"));
    for name in [
        "outpost_updates_total",
        "outpost_exports_total",
        "outpost_deliveries_total",
        "outpost_outbox_pending",
        "outpost_outbox_dead",
        "outpost_token_fetches_total",
        "outpost_delivery_latency_seconds",
    ] {
        assert!(metrics.contains(name), "no {name} in:\n{metrics}");
    }
    for (name, value) in [
        ("outpost_updates_total{result=\"exported\"}", 4.0),
        ("outpost_updates_total{result=\"unchanged\"}", 2.0),
        ("outpost_updates_total{result=\"stale\"}", 1.0),
        ("outpost_updates_total{result=\"deleted\"}", 1.0),
        ("outpost_updates_total{result=\"refused\"}", 1.0),
        ("outpost_exports_total{reason=\"segment\"}", 3.0),
        ("outpost_exports_total{reason=\"attribute\"}", 1.0),
        ("outpost_exports_total{reason=\"identity\"}", 0.0),
        ("outpost_exports_total{reason=\"delete\"}", 1.0),
        ("outpost_deliveries_total{outcome=\"delivered\"}", 5.0),
        ("outpost_outbox_pending", 0.0),
        ("outpost_outbox_dead", 0.0),
        ("outpost_profiles_stored", 3.0),
        ("outpost_token_fetches_total", 1.0),
        ("outpost_delivery_latency_seconds_count", 5.0),
    ] {
        assert_eq!(sample(&metrics, name), Some(value), "{name} in:\n{metrics}");
    }
    let disk = sample(&metrics, "outpost_store_disk_bytes");
    assert!(
        disk.is_some_and(|bytes| bytes > 0.0),
        "{disk:?} in:\n{metrics}"
    );
    assert!(metrics.contains("# TYPE outpost_delivery_latency_seconds histogram"));
    assert!(metrics.contains("outpost_delivery_latency_seconds_bucket{le=\"+Inf\"} 5"));

    let status = agent
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(5))
        .await;
    assert_eq!(status.code(), Some(0), "{}", agent.log());
}

/// `/metrics` reads the outbox's figures from the store at most once a second, however often
/// it is scraped: a scrape within the second of the one that read them shows them as they
/// were then, a later one as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_read_the_outbox_figures_at_most_once_a_second() {
    let receiver = receiver().await;
    // Nothing is delivered: every export taken stays pending.
    receiver.set_export_script(Some(Arc::new(|_, _| {
        Reply::Status(503, vec![], "down for maintenance".into())
    })));
    let (ws, port) = workspace(&receiver, "");
    let mut agent = start_agent(&ws, port).await;
    let addr = agent.addr;
    let pending = async || {
        let (status, _, metrics) = request(addr, "GET", "/metrics", None, &[]).await.unwrap();
        assert_eq!(status, 200, "{metrics}");
        sample(&metrics, "outpost_outbox_pending").unwrap()
    };
    let mut taken = 0;
    let mut shown_as_read = false;
    // Two scrapes within a second, an update taken between them; tried again should a loaded
    // machine take longer than that.
    for attempt in 0..5 {
        // The last read is more than a second old: this scrape reads the figures.
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        let read = Instant::now();
        assert_eq!(pending().await, f64::from(taken), "read anew");
        let update = member_update(&format!("m{attempt}"), "Ann", "2026-01-01T00:00:01Z");
        let (status, _, answer) = post(addr, update).await;
        assert_eq!(status, 200, "{answer}");
        taken += 1;
        let shown = pending().await;
        if read.elapsed() < Duration::from_secs(1) {
            assert_eq!(
                shown,
                f64::from(taken - 1),
                "a scrape within the second of the read"
            );
            shown_as_read = true;
            break;
        }
    }
    assert!(shown_as_read, "no two scrapes came within a second");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(
        pending().await,
        f64::from(taken),
        "a second later, read anew"
    );
    assert_eq!(ws.outbox_stats()["pending"], taken);
    agent.terminate().await;
}

/// An agent with `storage.max_outbox_bytes = 1` whose endpoint answers every export `reply`,
/// after a first request (updates of two new members, `a` and `b`) was taken into its empty
/// outbox, which that fills.
async fn agent_past_a_one_byte_outbox(reply: Reply) -> (Receiver, Workspace, u16, AgentProcess) {
    let receiver = receiver().await;
    receiver.set_export_script(Some(Arc::new(move |_, _| reply.clone())));
    let (ws, port) = workspace(&receiver, "max_outbox_bytes = 1");
    let agent = start_agent(&ws, port).await;
    let first = [
        member_update("a", "Ann", "2026-01-01T00:00:01Z"),
        member_update("b", "Bob", "2026-01-01T00:00:01Z"),
    ]
    .join("\n");
    let (status, _, answer) = post(agent.addr, first).await;
    assert_eq!(status, 200, "{answer}");
    (receiver, ws, port, agent)
}

/// Room again: the agent takes an update (of `c`), then stops on SIGTERM with exit 0.
async fn takes_an_update_then_stops_cleanly(agent: &mut AgentProcess) {
    let (status, _, answer) =
        post(agent.addr, member_update("c", "Cy", "2026-01-01T00:00:01Z")).await;
    assert_eq!(status, 200, "{answer}");
    agent.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_outbox_answers_503_with_retry_after_and_sigterm_still_stops() {
    // The outbox is empty: the first request is taken, and its exports stay (the endpoint
    // fails).
    let (receiver, ws, port, mut agent) =
        agent_past_a_one_byte_outbox(Reply::Status(503, vec![], "down for maintenance".into()))
            .await;
    let stats = ws.outbox_stats();
    assert_eq!(stats["pending"], 2, "{stats}");

    // Now the outbox is over 1 byte: refused, with Retry-After, and nothing stored.
    for _ in 0..2 {
        let (status, headers, answer) =
            post(agent.addr, member_update("c", "Cy", "2026-01-01T00:00:01Z")).await;
        assert_eq!(status, 503, "{answer}");
        let retry_after: u64 = headers
            .get("retry-after")
            .expect("a Retry-After header")
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=3600).contains(&retry_after), "{retry_after}");
        let answer: Value = serde_json::from_str(&answer).unwrap();
        assert!(
            answer["error"].as_str().unwrap().contains("full"),
            "{answer}"
        );
    }
    let stats = ws.outbox_stats();
    assert_eq!(stats["pending"], 2, "{stats}");
    assert_eq!(stats["profiles"], 2, "{stats}");

    // The endpoint keeps failing; deliveries are retried, never dead-lettered.
    let deadline = Instant::now() + Duration::from_secs(10);
    while receiver.export_requests().len() < 3 {
        assert!(Instant::now() < deadline, "no retries");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, _, metrics) = request(agent.addr, "GET", "/metrics", None, &[])
        .await
        .unwrap();
    assert!(
        sample(&metrics, "outpost_deliveries_total{outcome=\"retried\"}").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    assert_eq!(sample(&metrics, "outpost_outbox_pending"), Some(2.0));
    // What an alert on a filling outbox compares: the bytes, as the store counts them, and
    // the limit they reached.
    assert_eq!(sample(&metrics, "outpost_outbox_max_bytes"), Some(1.0));
    let bytes = ws.outbox_stats()["bytes"].as_f64().unwrap();
    assert!(bytes > 1.0, "{bytes}");
    assert_eq!(sample(&metrics, "outpost_outbox_bytes"), Some(bytes));

    // SIGTERM while the destination fails and the loop backs off: exit 0, within 5 s.
    let status = agent
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(5))
        .await;
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    // It stopped taking updates, and what it acknowledged is still there.
    assert!(request(agent.addr, "GET", "/healthz", None, &[])
        .await
        .is_err());
    let stats = ws.outbox_stats();
    assert_eq!(stats["pending"], 2, "{stats}");
    assert_eq!(stats["dead"], 0, "{stats}");

    // Restarted with the endpoint back: the outbox drains, and updates are taken again.
    receiver.set_export_script(None);
    let mut agent = start_agent(&ws, port).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = ws.outbox_stats();
        if stats["pending"] == 0 {
            assert_eq!(stats["bytes"], 0, "{stats}");
            break;
        }
        assert!(Instant::now() < deadline, "not drained: {stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(receiver.delivered().len(), 2);
    takes_an_update_then_stops_cleanly(&mut agent).await;
}

/// Dead letters count toward `storage.max_outbox_bytes` (they take the disk as pending exports
/// do), but no delivery frees them: the refusal says so and names what does, and once they
/// are dropped (through the running agent) updates are taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outbox_filled_by_dead_letters_says_so_and_takes_updates_once_they_are_dropped() {
    let (_receiver, ws, _port, mut agent) =
        agent_past_a_one_byte_outbox(Reply::Status(400, vec![], "refused".into())).await;
    wait_until(10, "the two dead-lettered", || {
        ws.outbox_stats()["dead"] == 2
    })
    .await;

    let refused = || async {
        let (status, _, answer) =
            post(agent.addr, member_update("c", "Cy", "2026-01-01T00:00:01Z")).await;
        assert_eq!(status, 503, "{answer}");
        let answer: Value = serde_json::from_str(&answer).unwrap();
        answer["error"].as_str().unwrap().to_owned()
    };
    let error = refused().await;
    for part in [
        "the outbox is full: 0 pending exports and 2 dead letters",
        "storage.max_outbox_bytes is 1",
        "`outpost outbox retry`",
        "`outpost outbox drop`",
        "deliveries cannot",
    ] {
        assert!(error.contains(part), "{part:?} not in {error:?}");
    }
    // `outpost ingest` through the agent is refused the same way.
    let update = member_update("c", "Cy", "2026-01-01T00:00:01Z");
    let out = ws.run(&["ingest", "-"], Some(update.as_bytes()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("2 dead letters"), "{stderr}");

    ws.run_ok(&["outbox", "drop", "--all-dead", "--yes"], None);
    takes_an_update_then_stops_cleanly(&mut agent).await;
}

/// A stop waits for requests in flight (up to the request timeout and 5 s more); a second
/// SIGTERM cuts it short, exit 1, and what was acknowledged is still there to deliver.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_sigterm_ends_a_stop_that_waits_for_requests_in_flight() {
    let receiver = receiver().await;
    receiver.set_export_script(Some(Arc::new(|_, _| Reply::Delay(Duration::from_secs(60)))));
    let (ws, port, mut agent) = patient_agent_after_one_update(&receiver).await;
    wait_until(10, "a request sent", || receiver.max_in_flight() > 0).await;

    // SAFETY: kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(agent.pid() as i32, libc::SIGTERM) }, 0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        agent.running(),
        "the stop waits for the request in flight:\n{}",
        agent.log()
    );
    let status = agent
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(3))
        .await;
    assert_eq!(status.code(), Some(1), "{}", agent.log());
    assert!(agent.log().contains("a second signal"), "{}", agent.log());
    let stats = ws.outbox_stats();
    assert_eq!(stats["pending"], 1, "{stats}");

    receiver.set_export_script(None);
    let mut agent = start_agent(&ws, port).await;
    wait_until(10, "the delivery after the restart", || {
        ws.outbox_stats()["pending"] == 0
    })
    .await;
    agent.terminate().await;
}

/// A request still waiting for its token when the agent is told to stop is not sent: the stop
/// waits one request timeout for requests already sent, not also for the token endpoint (a
/// fetch may take a request timeout, two when a refresh token is refused first). Its export
/// stays pending and goes after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stop_neither_waits_for_a_token_nor_sends_the_request_that_waited_for_it() {
    let receiver = receiver().await;
    receiver.set_token_script(Some(Arc::new(|n, _| match n {
        0 => Reply::Delay(Duration::from_secs(20)),
        _ => Reply::Normal,
    })));
    let (ws, port, mut agent) = patient_agent_after_one_update(&receiver).await;
    wait_until(10, "a token request", || receiver.token_arrivals() == 1).await;

    let status = agent
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(5))
        .await;
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    assert_eq!(receiver.export_arrivals(), 0);
    assert!(
        !agent.log().contains("before every outcome was recorded"),
        "{}",
        agent.log()
    );
    assert_eq!(ws.outbox_stats()["pending"], 1);

    let mut agent = start_agent(&ws, port).await;
    wait_until(10, "the delivery after the restart", || {
        receiver.export_arrivals() == 1
    })
    .await;
    agent.terminate().await;
    assert_eq!(ws.outbox_stats()["pending"], 0);
}

/// SPEC is silent on duplicate keys; parsing is strict, and an update naming two ids is
/// ambiguous, so it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_update_with_a_duplicate_key_is_refused() {
    let receiver = receiver().await;
    let (ws, port) = workspace(&receiver, "");
    let agent = start_agent(&ws, port).await;
    let (status, _, answer) = post(agent.addr, r#"{"id":"p-1","id":"p-2","profile":{}}"#).await;
    assert_eq!(status, 400, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["line"], 1);
    assert!(answer["error"]
        .as_str()
        .unwrap()
        .contains("duplicate field `id`"));
    assert_eq!(ws.outbox_stats()["profiles"], 0);
}

/// A body whose framing breaks (a chunk size that is not hex) is refused 400, storing
/// nothing, with the line of the body it broke off in, as every 400 names one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_that_breaks_off_is_refused_naming_the_line() {
    let receiver = receiver().await;
    let (ws, port) = workspace(&receiver, "");
    let agent = start_agent(&ws, port).await;
    let lines = format!(
        "{}\n{}\n",
        member_update("p-1", "Jane", "2026-01-01T00:00:01Z"),
        member_update("p-2", "John", "2026-01-01T00:00:01Z")
    );
    let request = format!(
        "POST /v1/updates HTTP/1.1\r\nhost: x\r\n{}: {}\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{lines}\r\nzz\r\n",
        AUTH.0,
        AUTH.1,
        lines.len()
    );
    let answer = exchange_raw(agent.addr, &request, false);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["line"], 3, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("cannot read the body"),
        "{body}"
    );
    assert_eq!(ws.outbox_stats()["profiles"], 0);
}

/// A client that shuts its side down once its request is sent (`nc -N`, `printf … | nc -q0`)
/// gets its answer: hyper closed such a connection at the read's end, with no answer, and the
/// client could not tell whether its updates were stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    let receiver = receiver().await;
    let (ws, port) = workspace(&receiver, "");
    let agent = start_agent(&ws, port).await;
    let line = format!("{}\n", member_update("p-1", "Jane", "2026-01-01T00:00:01Z"));
    let request = format!(
        "POST /v1/updates HTTP/1.1\r\nhost: x\r\n{}: {}\r\ncontent-length: {}\r\n\r\n{line}",
        AUTH.0,
        AUTH.1,
        line.len()
    );
    let answer = exchange_raw(agent.addr, &request, true);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.contains(r#""accepted":1"#), "{answer}");
    assert_eq!(ws.outbox_stats()["profiles"], 1);
}

/// Sends `request` as it is on a connection of its own, shutting the connection's sending
/// side down after it when `half_close`, and reads all that comes back until it is closed.
fn exchange_raw(addr: std::net::SocketAddr, request: &str, half_close: bool) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    if half_close {
        stream.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// Reads one HTTP/1.1 answer's head from `stream` (up to the blank line).
fn read_head(stream: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_waits_for_the_delivery_in_flight_only_up_to_the_request_timeout() {
    use std::io::Write;
    let receiver = receiver().await;
    // The endpoint never answers in time (request_timeout_ms = 500).
    receiver.set_export_script(Some(Arc::new(|_, _| Reply::Delay(Duration::from_secs(30)))));
    let (ws, port) = workspace(&receiver, "");
    let mut agent = agent_after_one_update(&ws, port).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while receiver.export_arrivals() == 0 {
        assert!(Instant::now() < deadline, "no delivery started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // An idle keep-alive connection does not hold the stop up either.
    let mut idle = std::net::TcpStream::connect(agent.addr).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    assert!(read_head(&mut idle).starts_with("HTTP/1.1 200"));

    let started = Instant::now();
    let status = agent
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(5))
        .await;
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    // The request times out after 0.5 s; the stop's own bound is that plus 5 s, and the
    // answer would take 30 s. Room for a busy machine below the first.
    assert!(
        started.elapsed() < Duration::from_millis(4500),
        "{:?}",
        started.elapsed()
    );
    // The export was not acknowledged by the endpoint: it is still pending.
    let stats = ws.outbox_stats();
    assert_eq!(stats["pending"], 1, "{stats}");
    // The stop waited for the request's end, its timeout, and recorded the failed attempt.
    let listed = ws.run_ok(&["outbox", "list", "--json"], None);
    let export: serde_json::Value = serde_json::from_str(listed.trim()).unwrap();
    assert_eq!(export["attempts"], 1, "{export}");
    assert!(
        export["last_error"].as_str().unwrap().contains("timed out"),
        "{export}"
    );
}

/// A request whose body is still arriving when SIGTERM comes is read, stored and answered
/// before the agent stops, and the agent exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_in_flight_at_sigterm_is_answered_before_the_stop() {
    use std::io::Write;
    let receiver = receiver().await;
    let (ws, port) = workspace(&receiver, "");
    let mut agent = start_agent(&ws, port).await;
    let body = format!("{}\n", member_update("p-1", "Jane", "2026-01-01T00:00:01Z"));
    let mut stream = std::net::TcpStream::connect(agent.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let head = format!(
        "POST /v1/updates HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    // Sent once the agent reads the body: the request is open.
    let continued = read_head(&mut stream);
    assert!(continued.starts_with("HTTP/1.1 100"), "{continued:?}");
    let (first, rest) = body.split_at(10);
    stream.write_all(first.as_bytes()).unwrap();
    let rest = rest.to_owned();
    let client = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        stream.write_all(rest.as_bytes()).unwrap();
        read_head(&mut stream)
    });
    let status = agent
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(15))
        .await;
    let answer = client.join().unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{answer:?}\n{}",
        agent.log()
    );
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    let stats = ws.outbox_stats();
    assert_eq!(stats["profiles"], 1, "{stats}");
}

/// A request of many chunks still being stored when SIGTERM comes stops at its next chunk and
/// is answered 503 with how many of its updates were stored, which is what the store holds;
/// the agent exits 0. Such a request could outlast the stop's wait for open requests, and
/// was then cut off unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_request_at_sigterm_stops_at_a_chunk_and_says_what_was_stored() {
    let receiver = receiver().await;
    let (ws, port) = workspace(&receiver, "");
    let config = std::fs::read_to_string(ws.config_path()).unwrap();
    let larger = format!("max_body_bytes = {}", 16 * MAX_BODY);
    let roomy = config.replacen(&format!("max_body_bytes = {MAX_BODY}"), &larger, 1);
    assert_ne!(roomy, config);
    std::fs::write(ws.config_path(), roomy).unwrap();
    let mut agent = start_agent(&ws, port).await;
    // About 400 chunks of 1,000: far more than are stored before the signal.
    let count = 400_000;
    let body: String = (0..count)
        .map(|i| format!("{{\"id\":\"p{i:06}\",\"profile\":{{}}}}\n"))
        .collect();
    assert!(body.len() < 16 * MAX_BODY);
    let addr = agent.addr;
    let answer = tokio::spawn(async move { post(addr, body).await });
    let stored_so_far = async || {
        let (_, _, metrics) = request(addr, "GET", "/metrics", None, &[]).await.unwrap();
        metrics
            .lines()
            .filter(|l| l.starts_with("outpost_updates_total{") && !l.contains("refused"))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
            .sum::<f64>()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while stored_so_far().await == 0.0 {
        assert!(Instant::now() < deadline, "nothing stored: {}", agent.log());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = agent
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(30))
        .await;
    let (code, headers, text) = answer.await.unwrap();
    assert_eq!(code, 503, "{text}\n{}", agent.log());
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    let said: Value = serde_json::from_str(&text).unwrap();
    let stored = said["stored"].as_u64().expect("how many were stored");
    assert!(
        stored > 0 && stored < count && stored.is_multiple_of(1_000),
        "{said}"
    );
    assert!(
        said["error"].as_str().unwrap().starts_with(&format!(
            "the agent is stopping; the first {stored} of {count} updates were stored, the rest not; send the updates after the first `stored` again"
        )),
        "{said}"
    );
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    assert_eq!(ws.outbox_stats()["profiles"], stored, "{said}");
}

/// When the destination comes to look down, and when it answers again, the log says so once
/// each way: the failures themselves are logged only a few at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_log_says_when_the_destination_looks_down_and_when_it_is_back() {
    let receiver = receiver().await;
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let failing = Arc::clone(&down);
    receiver.set_export_script(Some(Arc::new(move |_, _| {
        match failing.load(std::sync::atomic::Ordering::SeqCst) {
            true => Reply::Status(503, vec![], "down for maintenance".into()),
            false => Reply::Normal,
        }
    })));
    let (ws, port) = workspace(&receiver, "");
    let mut agent = agent_after_one_update(&ws, port).await;
    let wait_for = |text: &'static str| {
        let agent = &agent;
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !agent.log().contains(text) {
                assert!(
                    Instant::now() < deadline,
                    "no {text:?} in:\n{}",
                    agent.log()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for("the destination looks down").await;
    assert!(!agent.log().contains("the destination answers again"));
    let line_of = |text: &str| -> String {
        let log = agent.log();
        let line = log.lines().find(|line| line.contains(text));
        line.unwrap_or_else(|| panic!("no {text:?} in {log}"))
            .to_owned()
    };
    // What failed is said with it, and the end of the trouble at the same level.
    let down_line = line_of("the destination looks down");
    assert!(
        down_line.contains("last_error=\"HTTP 503: down for maintenance\""),
        "{down_line}"
    );
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    wait_for("the destination answers again").await;
    assert_eq!(agent.log().matches("the destination looks down").count(), 1);
    let back_line = line_of("the destination answers again");
    assert!(
        down_line.contains(" WARN ") && back_line.contains(" WARN "),
        "{down_line}\n{back_line}"
    );

    // The token endpoint fails, not the destination: the warning says so.
    let tokens_down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let failing = Arc::clone(&tokens_down);
    receiver.set_token_script(Some(Arc::new(move |_, _| {
        match failing.load(std::sync::atomic::Ordering::SeqCst) {
            true => Reply::Status(503, vec![], "identity provider down".into()),
            false => Reply::Normal,
        }
    })));
    receiver.revoke_tokens();
    let (status, _, answer) = post(
        agent.addr,
        member_update("a", "Anna", "2026-01-01T00:00:02Z"),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    wait_for("no token can be had").await;
    assert_eq!(agent.log().matches("the destination looks down").count(), 1);
    tokens_down.store(false, std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.log().matches("the destination answers again").count() < 2 {
        assert!(Instant::now() < deadline, "{}", agent.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.terminate().await;
}

/// A refused request to `/v1/updates` is logged with why, the first 10 of a window of 10 s
/// whole: a producer sending bad updates in a loop is seen in the log without flooding it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_requests_are_logged_with_why_a_few_at_a_time() {
    let receiver = receiver().await;
    let (ws, port) = workspace(&receiver, "");
    let mut agent = start_agent(&ws, port).await;
    for _ in 0..15 {
        let (status, _, answer) = post(agent.addr, "{\"id\": \"p1\", \"op\": ").await;
        assert_eq!(status, 400, "{answer}");
    }
    let log = agent.log();
    let refused: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("a request to /v1/updates was refused"))
        .collect();
    assert_eq!(refused.len(), 10, "{log}");
    assert!(
        refused[0].contains("status=400") && refused[0].contains("error=\"not valid JSON"),
        "{}",
        refused[0]
    );
    // Counted by status, every one, and one without the token under its own.
    let (status, _, _) = request(
        agent.addr,
        "POST",
        "/v1/updates",
        Some(Payload::Sized(b"{}".to_vec())),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(status, 401);
    let (_, _, metrics) = request(agent.addr, "GET", "/metrics", None, &[])
        .await
        .unwrap();
    let refusals = |status: &str| {
        sample(
            &metrics,
            &format!("outpost_ingest_refusals_total{{status=\"{status}\"}}"),
        )
    };
    assert_eq!(refusals("400"), Some(15.0), "{metrics}");
    assert_eq!(refusals("401"), Some(1.0), "{metrics}");
    assert_eq!(refusals("503"), Some(0.0), "{metrics}");
    agent.terminate().await;
}

/// What inputs and endpoints send reaches the log with its control characters escaped: an id
/// and an error body holding a newline and an escape sequence forge no log line and colour
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_characters_from_inputs_are_escaped_in_the_log() {
    let receiver = receiver().await;
    let forged = "\n2026-12-06T07:00:00.000000Z ERROR outpost::agent: FORGED \u{1b}[31mred";
    receiver.set_export_script(Some(Arc::new(move |_, _| {
        Reply::Status(503, vec![], format!("down{forged}"))
    })));
    let (ws, port) = workspace(&receiver, "");
    let mut agent = start_agent(&ws, port).await;
    let id = format!("p-1{forged}");
    let (status, _, answer) = post(
        agent.addr,
        member_update(&id, "Jane", "2026-01-01T00:00:01Z"),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.log().contains("delivery failed; will retry") {
        assert!(Instant::now() < deadline, "{}", agent.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = agent.log();
    assert!(!log.contains('\u{1b}'), "{log}");
    assert!(
        !log.lines()
            .any(|line| line.starts_with("2026-12-06T07:00:00.000000Z ERROR")),
        "{log}"
    );
    // Both the id and the endpoint's body, escaped and quoted whole: the spaces in them
    // start no field of their own.
    let failed = log
        .lines()
        .find(|line| line.contains("delivery failed; will retry"))
        .unwrap();
    assert!(
        failed.contains("profile=\"p-1\\n2026-12-06T07:00:00.000000Z ERROR outpost::agent: FORGED")
            && failed.contains("down\\n2026-12-06"),
        "{failed}"
    );
    assert!(failed.contains("\\u{1b}[31mred"), "{failed}");
    agent.terminate().await;
}

/// A client connection of either HTTP version.
enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    async fn send(
        &mut self,
        request: hyper::Request<Full<Bytes>>,
    ) -> hyper::Result<hyper::Response<hyper::body::Incoming>> {
        match self {
            Sender::Http1(sender) => {
                sender.ready().await?;
                sender.send_request(request).await
            }
            Sender::Http2(sender) => sender.send_request(request).await,
        }
    }
}

/// A connection on which a request was refused for its token is closed once answered, over
/// HTTP/1 and HTTP/2, so that clients without the token cannot hold the places
/// `ingest.max_connections` allows by asking again and again; one with the token keeps its
/// connection for request after request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_refused_for_its_token_is_closed() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let receiver = receiver().await;
    // Idle connections would be closed only after 60 s.
    let (ws, port) = workspace_with_ingest(&receiver, "read_timeout_ms = 60000");
    let mut agent = start_agent(&ws, port).await;
    let post = |token: &str, n: usize| {
        hyper::Request::post("/v1/updates")
            .header("host", "outpost")
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::from(member_update(
                &format!("p-{n}"),
                "Jane",
                "2026-01-01T00:00:01Z",
            ))))
            .unwrap()
    };
    for http2 in [false, true] {
        let io = TokioIo::new(tokio::net::TcpStream::connect(agent.addr).await.unwrap());
        let (mut sender, mut connection) = if http2 {
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
            (
                Sender::Http2(sender),
                tokio::spawn(async move { connection.await.is_ok() }),
            )
        } else {
            let (sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
            (
                Sender::Http1(sender),
                tokio::spawn(async move { connection.await.is_ok() }),
            )
        };
        for n in 0..3 {
            let answer = sender.send(post(TOKEN, n)).await.unwrap();
            assert_eq!(answer.status(), 200, "http2 {http2}, request {n}");
            answer.into_body().collect().await.unwrap();
        }
        assert!(!connection.is_finished(), "http2 {http2}");
        let answer = sender.send(post("wrong", 9)).await.unwrap();
        assert_eq!(answer.status(), 401, "http2 {http2}");
        answer.into_body().collect().await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), &mut connection).await;
        assert!(
            ended.is_ok(),
            "http2 {http2}: still open 10 s after the 401"
        );
    }
    assert_eq!(ws.outbox_stats()["profiles"], 3);
    agent.terminate().await;
}

/// A client without the token is not held by the body it trickles: it gets its answer (or
/// its connection closed) after about one read timeout (1.5 s; up to 5 s is allowed for a busy
/// machine), not the four (6 s) a body may take.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_without_the_token_is_not_held_by_its_trickling_body() {
    use std::io::{Read, Write};
    let receiver = receiver().await;
    let (ws, port) = workspace_with_ingest(&receiver, "read_timeout_ms = 1500");
    let agent = start_agent(&ws, port).await;
    let mut stream = std::net::TcpStream::connect(agent.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream
        .write_all(b"POST /v1/updates HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n")
        .unwrap();
    let started = Instant::now();
    // A byte every 200 ms: never stalled for the read timeout.
    let mut trickle = stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        while started.elapsed() < Duration::from_secs(10) {
            if trickle.write_all(b"x").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let held = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        held < Duration::from_secs(5),
        "held for {held:?} (4 read timeouts: 6 s): {answer:?}"
    );
    // Still read for the read timeout, so that a client sending fast reads the answer.
    assert!(held >= Duration::from_secs(1), "held for only {held:?}");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 401"),
        "{answer:?}"
    );
    drop(stream);
    writer.join().unwrap();
    assert_eq!(ws.outbox_stats()["profiles"], 0);
}

/// A client that stalls in the middle of its upload holds the stop up only for a bounded time
/// (the agent's drain timeout), and the agent still exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_upload_delays_the_stop_only_for_a_bounded_time() {
    use std::io::Write;
    let receiver = receiver().await;
    let (ws, port) = workspace(&receiver, "");
    let mut agent = start_agent(&ws, port).await;
    let mut stalled = std::net::TcpStream::connect(agent.addr).unwrap();
    stalled
        .write_all(
            b"POST /v1/updates HTTP/1.1\r\nhost: x\r\nauthorization: Bearer ingest-secret\r\n\
              content-length: 100\r\n\r\n{\"id\":",
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = agent
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(15))
        .await;
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    let stats = ws.outbox_stats();
    assert_eq!(stats["profiles"], 0, "{stats}");
}

/// Reads what `stream` sends until it closes it; `None` if it is still open after 10 s.
fn read_until_closed(stream: &mut std::net::TcpStream) -> Option<Vec<u8>> {
    use std::io::Read;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).ok().map(|_| rest)
}

/// Slow or silent clients do not hold the ingest API: a connection must begin a request
/// within `ingest.read_timeout_ms` and each request send its headers as fast (so an idle
/// keep-alive connection is closed then too), a body that stalls as long is answered 408, as
/// is one that trickles past four times that, and bodies in flight are held to 4 ×
/// `max_body_bytes`: a request past that waits for room as long, then gets 503 with
/// `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_clients_time_out_and_bodies_in_flight_are_bounded() {
    use std::io::{Read, Write};
    let receiver = receiver().await;
    let (ws, port) = workspace_with_ingest(&receiver, "read_timeout_ms = 2000");
    let agent = start_agent(&ws, port).await;
    let connect = || {
        let stream = std::net::TcpStream::connect(agent.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    };
    let closed_after_sending = |bytes: &[u8]| {
        let mut stream = connect();
        stream.write_all(bytes).unwrap();
        read_until_closed(&mut stream).is_some()
    };
    assert!(
        closed_after_sending(b""),
        "a connection that sends nothing stays open"
    );
    // hyper waits for more to tell HTTP/1 from HTTP/2's preface.
    assert!(
        closed_after_sending(b"PRI * HTTP/2"),
        "a connection that sends part of HTTP/2's preface stays open"
    );
    assert!(
        closed_after_sending(b"POST /v1/updates HTTP/1.1\r\nhost: x\r\n"),
        "a connection whose headers never end stays open"
    );
    let mut idle = connect();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    assert!(read_head(&mut idle).starts_with("HTTP/1.1 200"));
    assert!(
        read_until_closed(&mut idle).is_some(),
        "an idle keep-alive connection stays open"
    );

    let stalled_body = |declared: usize| {
        let mut stream = connect();
        let head = format!(
            "POST /v1/updates HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ncontent-length: {declared}\r\n\r\n{{\"id\":"
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream
    };
    let mut stalled = stalled_body(100);
    let head = read_head(&mut stalled);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");

    // Four bodies of max_body_bytes, a byte every 300 ms until answered, never stalled for
    // the 2 s, fill the room for bodies until their 8 s are up.
    let trickle = |mut stream: std::net::TcpStream| {
        std::thread::spawn(move || {
            stream
                .set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let started = Instant::now();
            let mut answer = Vec::new();
            while started.elapsed() < Duration::from_secs(30)
                && !answer.windows(4).any(|w| w == b"\r\n\r\n")
            {
                let mut buf = [0u8; 512];
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                    Err(_) => {
                        if stream.write_all(b" ").is_err() {
                            break;
                        }
                    }
                }
            }
            (
                String::from_utf8_lossy(&answer).into_owned(),
                started.elapsed(),
            )
        })
    };
    let holders: Vec<_> = (0..4).map(|_| trickle(stalled_body(MAX_BODY))).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let update = member_update("a", "Ann", "2026-01-01T00:00:01Z");
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let (status, headers, answer) =
            tokio::time::timeout(Duration::from_secs(10), post(agent.addr, update.clone()))
                .await
                .expect("a request waited for room past ingest.read_timeout_ms");
        if status == 503 {
            assert!(answer.contains("busy"), "{answer}");
            assert!(headers.contains_key("retry-after"), "{headers:?}");
            break;
        }
        assert_eq!(status, 200, "{answer}");
        assert!(
            Instant::now() < deadline,
            "four bodies of max_body_bytes in flight, and requests still get room"
        );
    }
    for holder in holders {
        let (head, took) = holder.join().unwrap();
        assert!(head.starts_with("HTTP/1.1 408"), "{head:?} after {took:?}");
        assert!(took >= Duration::from_secs(6), "{head} after {took:?}");
    }
    let (status, _, answer) = post(agent.addr, update).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(ws.outbox_stats()["profiles"], 1);
}

/// A body sent without a length (chunked) that goes past `max_body_bytes` is answered 413
/// once the client has sent it (up to 1 MiB past the limit), rather than the connection
/// closed with bytes unread, which a client still sending sees as a reset instead of the
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunked_body_past_the_limit_is_answered_413_not_reset() {
    use std::io::{Read, Write};
    let receiver = receiver().await;
    let (ws, port) = workspace(&receiver, "");
    let agent = start_agent(&ws, port).await;
    let chunk = vec![b' '; 64 << 10];
    let chunks = (MAX_BODY + (512 << 10)) / chunk.len();
    for attempt in 0..3 {
        let mut stream = std::net::TcpStream::connect(agent.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let head = format!(
            "POST /v1/updates HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).unwrap();
        for sent in 0..chunks {
            // Past the limit, a pause: the client is still sending when the agent has seen
            // enough to refuse the body.
            if sent == MAX_BODY / chunk.len() + 1 {
                std::thread::sleep(Duration::from_millis(300));
            }
            stream
                .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .and_then(|()| stream.write_all(&chunk))
                .and_then(|()| stream.write_all(b"\r\n"))
                .unwrap_or_else(|e| panic!("attempt {attempt}: sending the body: {e}"));
        }
        stream
            .write_all(b"0\r\n\r\n")
            .unwrap_or_else(|e| panic!("attempt {attempt}: ending the body: {e}"));
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        let ended = loop {
            match stream.read(&mut buf) {
                Ok(0) => break "closed".to_string(),
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(e) => break e.to_string(),
            }
            if answer.windows(14).any(|w| w == b"max_body_bytes") {
                break "answered".to_string();
            }
        };
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 413") && ended == "answered",
            "attempt {attempt}: {answer:?}, then {ended}"
        );
    }
    assert_eq!(ws.outbox_stats()["profiles"], 0);
}

/// Connections past `ingest.max_connections` are not taken: they wait in the listen backlog
/// until an open one closes, then are served, and the log says the limit was reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_past_the_limit_wait_until_one_closes() {
    use std::io::{ErrorKind, Read, Write};
    let receiver = receiver().await;
    let (ws, port) = workspace_with_ingest(&receiver, "max_connections = 2");
    let agent = start_agent(&ws, port).await;
    let healthz = || {
        let mut stream = std::net::TcpStream::connect(agent.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        stream
    };
    // Two keep-alive connections, answered and left open.
    let mut open: Vec<_> = (0..2).map(|_| healthz()).collect();
    for stream in &mut open {
        let head = read_head(stream);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    let mut waiting = healthz();
    waiting
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut byte = [0u8; 1];
    match waiting.read(&mut byte) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("a third connection was served past max_connections = 2: {other:?}"),
    }
    drop(open.pop());
    waiting
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let head = read_head(&mut waiting);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let warnings = || agent.log().matches("ingest.max_connections").count();
    assert_eq!(warnings(), 1, "{}", agent.log());

    // All closed, then the limit is reached again within the minute: not said again.
    drop(open);
    drop(waiting);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut again: Vec<_> = (0..2).map(|_| healthz()).collect();
    for stream in &mut again {
        let head = read_head(stream);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    let mut third = healthz();
    third
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    assert!(third.read(&mut byte).is_err(), "served past the limit");
    assert_eq!(warnings(), 1, "{}", agent.log());
}

/// An HTTP/2 connection (h2c) that has had no request open for `ingest.read_timeout_ms` is
/// closed (GOAWAY), so that clients' pooled idle connections do not keep their places under
/// `ingest.max_connections`, though they answer the agent's pings; one that sends requests
/// more often stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_http2_connection_is_closed_and_gives_up_its_place() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let receiver = receiver().await;
    let (ws, port) =
        workspace_with_ingest(&receiver, "max_connections = 1\nread_timeout_ms = 2000");
    let agent = start_agent(&ws, port).await;
    let tcp = tokio::net::TcpStream::connect(agent.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let healthz = || {
        hyper::Request::get(format!("http://{}/healthz", agent.addr))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let busy_until = Instant::now() + Duration::from_secs(4);
    let mut idle_from = Instant::now();
    while Instant::now() < busy_until {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let answer = sender
            .send_request(healthz())
            .await
            .expect("an HTTP/2 connection in use was closed");
        assert_eq!(answer.status(), 200);
        idle_from = Instant::now();
    }
    tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("an idle HTTP/2 connection stayed open")
        .unwrap()
        .ok();
    let idle_for = idle_from.elapsed();
    assert!(
        idle_for >= Duration::from_millis(1000),
        "closed after only {idle_for:?} idle"
    );
    // Its place is free: the next connection is served.
    let (status, _, body) = tokio::time::timeout(
        Duration::from_secs(5),
        request(agent.addr, "GET", "/healthz", None, &[]),
    )
    .await
    .expect("no place for a connection after the idle one closed")
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        agent.log().contains("closing an idle ingest connection"),
        "{}",
        agent.log()
    );
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// POSTs `body` with the token and `Content-Encoding: encoding`.
async fn post_encoded(addr: SocketAddr, body: Vec<u8>, encoding: &str) -> (u16, String) {
    let (status, _, answer) = request(
        addr,
        "POST",
        "/v1/updates",
        Some(Payload::Sized(body)),
        &[AUTH, ("content-encoding", encoding)],
    )
    .await
    .unwrap();
    (status, answer)
}

/// A gzip body is taken as its decompressed text (also several gzip members one after
/// another); one that is not gzip (naming the line of its text where it breaks), one that
/// decompresses past `max_body_bytes`, and other codings (gzip twice among them) are refused,
/// storing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gzip_body_is_taken_and_other_encodings_are_refused() {
    let receiver = receiver().await;
    let (ws, port) = workspace(&receiver, "");
    let agent = start_agent(&ws, port).await;

    let (status, answer) = post_encoded(agent.addr, b"{\"id\":".to_vec(), "gzip").await;
    assert_eq!(status, 400, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert!(
        answer["error"].as_str().unwrap().contains("not valid gzip"),
        "{answer}"
    );
    assert_eq!(answer["line"], 1, "{answer}");
    // Broken off after a whole member: the line of the text where it breaks is named.
    let mut broken =
        gzip(format!("{}\n", member_update("p-1", "Jane", "2026-01-01T00:00:01Z")).as_bytes());
    broken.extend(b"\x1f\x8b garbage");
    let (status, answer) = post_encoded(agent.addr, broken, "gzip").await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(
        serde_json::from_str::<Value>(&answer).unwrap()["line"],
        2,
        "{answer}"
    );
    let refused = metric(agent.addr, r#"outpost_updates_total{result="refused"}"#).await;
    assert_eq!(refused, 2.0, "each body that is not gzip counts as refused");
    let (status, answer) = post_encoded(agent.addr, gzip(b"x"), "br").await;
    assert_eq!(status, 415, "{answer}");
    assert!(answer.contains("`br` is not supported"), "{answer}");
    // Coded twice, in two headers: not taken as gzip once.
    let (status, _, answer) = request(
        agent.addr,
        "POST",
        "/v1/updates",
        Some(Payload::Sized(gzip(&gzip(b"x")))),
        &[
            AUTH,
            ("content-encoding", "gzip"),
            ("content-encoding", "gzip"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(status, 415, "{answer}");
    assert!(answer.contains("`gzip, gzip` is not supported"), "{answer}");
    // Small compressed, past the limit decompressed.
    let bomb = gzip(&vec![b' '; MAX_BODY + 1]);
    assert!(bomb.len() < MAX_BODY / 100);
    let (status, answer) = post_encoded(agent.addr, bomb, "gzip").await;
    assert_eq!(status, 413, "{answer}");
    assert!(answer.contains("decompressed"), "{answer}");
    assert_eq!(ws.outbox_stats()["profiles"], 0);
    // gzip as a transfer coding, which the HTTP library leaves on the body once it undoes the
    // chunks: not read as garbage, but refused as not implemented, saying what to send.
    {
        use std::io::{Read, Write};
        let body = gzip(member_update("p-1", "Jane", "2026-01-01T00:00:01Z").as_bytes());
        let mut raw = format!(
            "POST /v1/updates HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n\
             transfer-encoding: gzip, chunked\r\nconnection: close\r\n\r\n{:x}\r\n",
            body.len()
        )
        .into_bytes();
        raw.extend(&body);
        raw.extend(b"\r\n0\r\n\r\n");
        let mut stream = std::net::TcpStream::connect(agent.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(&raw).unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 501"), "{answer}");
        assert!(
            answer.contains("Transfer-Encoding `gzip` is not supported")
                && answer.contains("Content-Encoding: gzip"),
            "{answer}"
        );
    }
    assert_eq!(ws.outbox_stats()["profiles"], 0);

    let first = member_update("p-1", "Jane", "2026-01-01T00:00:01Z");
    let second = member_update("p-2", "John", "2026-01-01T00:00:01Z");
    let mut body = gzip(format!("{first}\n").as_bytes());
    body.extend(gzip(second.as_bytes()));
    let (status, answer) = post_encoded(agent.addr, body, "gzip").await;
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        (answer["accepted"].as_u64(), answer["exports"].as_u64()),
        (Some(2), Some(2)),
        "{answer}"
    );
    assert_eq!(ws.outbox_stats()["profiles"], 2);
}

/// Uploads multiplexed on one HTTP/2 connection, more than the room for bodies admits at once
/// (each body sent without a length reserves the whole limit, so four fill the room): those
/// waiting for room hold no more of the connection's flow-control window than their own
/// stream's, so the ones admitted, whose bodies come slowly, go on receiving them and are
/// answered, rather than stall behind the waiting ones until 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http2_uploads_waiting_for_room_do_not_stall_the_ones_admitted() {
    use futures_util::StreamExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let receiver = receiver().await;
    let (ws, port) = workspace_with_ingest(&receiver, "read_timeout_ms = 3000");
    let agent = start_agent(&ws, port).await;
    let tcp = tokio::net::TcpStream::connect(agent.addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    // Just under the limit, in pieces of 16 KiB; after the first piece, a pause of `pause`.
    let body = |upload: usize, pause: Duration| {
        let mut text = String::new();
        for n in 0.. {
            let id = format!("u{upload}-{n}");
            let line = member_update(&id, &"x".repeat(900), "2026-01-01T00:00:01Z") + "\n";
            if text.len() + line.len() > MAX_BODY {
                break;
            }
            text.push_str(&line);
        }
        let pieces: Vec<Bytes> = text
            .as_bytes()
            .chunks(16 << 10)
            .map(Bytes::copy_from_slice)
            .collect();
        let frames = futures_util::stream::iter(pieces.into_iter().enumerate()).then(
            move |(n, piece)| async move {
                if n == 1 {
                    tokio::time::sleep(pause).await;
                }
                Ok::<_, Infallible>(Frame::data(piece))
            },
        );
        http_body_util::StreamBody::new(Box::pin(frames))
    };
    let upload = |upload: usize, pause: Duration| {
        let mut sender = sender.clone();
        let request = hyper::Request::post(format!("http://{}/v1/updates", agent.addr))
            .header(AUTH.0, AUTH.1)
            .body(body(upload, pause))
            .unwrap();
        tokio::spawn(async move {
            let answer = sender.send_request(request).await.unwrap();
            let status = answer.status().as_u16();
            let text = answer.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&text).into_owned())
        })
    };
    // Four admitted, whose bodies pause after their first piece; meanwhile four more, sent
    // at once, wait for room.
    let mut uploads: Vec<_> = (0..4)
        .map(|n| upload(n, Duration::from_millis(1000)))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    uploads.extend((4..8).map(|n| upload(n, Duration::ZERO)));
    let mut answers = Vec::new();
    for upload in uploads {
        let answered = tokio::time::timeout(Duration::from_secs(60), upload).await;
        answers.push(answered.expect("an upload never answered").unwrap());
    }
    let statuses: Vec<u16> = answers.iter().map(|(status, _)| *status).collect();
    assert_eq!(statuses[..4], [200; 4], "{answers:?}");
    assert!(!statuses.contains(&408), "{answers:?}");
}
