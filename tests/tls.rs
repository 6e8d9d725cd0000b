//! Delivery over HTTPS: a private CA made in the test, a receiver serving TLS with a certificate
//! it signed, and an agent that trusts it through `ca_file` (or does not, and keeps retrying).
//! Also mutual TLS: the receiver requires a client certificate signed by the same CA.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::pki::{ring, Ca, Leaf};
use common::*;
use outpost::agent::{Agent, AgentOptions};
use outpost::config::Config;
use outpost::receiver::{Receiver, ReceiverOptions};
use outpost::store::ListFilter;

/// The receiver's TLS configuration; with `client_roots`, it requires a client certificate
/// that chains to them.
fn server_config(
    server: &Leaf,
    client_roots: Option<Arc<rustls::RootCertStore>>,
) -> Arc<rustls::ServerConfig> {
    let builder = rustls::ServerConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_roots {
        None => builder.with_no_client_auth(),
        Some(roots) => {
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots, ring())
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    Arc::new(
        builder
            .with_single_cert(server.chain(), server.private_key())
            .unwrap(),
    )
}

async fn tls_receiver(config: Arc<rustls::ServerConfig>) -> Receiver {
    let receiver = Receiver::start(
        "127.0.0.1:0".parse().unwrap(),
        ReceiverOptions {
            tls: Some(config),
            ..ReceiverOptions::default()
        },
    )
    .await
    .unwrap();
    assert!(receiver.base_url().starts_with("https://127.0.0.1:"));
    receiver
}

/// Writes the agent's config in `dir`: OAuth and exports to `https://localhost:<port>`, with
/// `destination_lines` (e.g. `ca_file = ...`) added to `[destination]`.
fn agent_config(dir: &Path, receiver: &Receiver, destination_lines: &[String]) -> Config {
    let base = format!("https://localhost:{}", receiver.addr.port());
    let text = agent_config_text(&base, &oauth_body(&base), "");
    let mut lines: Vec<String> = Vec::new();
    for line in text.lines() {
        lines.push(line.to_owned());
        if line.starts_with("http_endpoint = ") {
            lines.extend(destination_lines.iter().cloned());
        }
    }
    assert!(
        lines.len() == text.lines().count() + destination_lines.len(),
        "no http_endpoint line in the config"
    );
    let path = dir.join("outpost.toml");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    Config::load(&path).unwrap()
}

/// A `key = "path"` line, with the path written as a TOML basic string.
fn path_line(key: &str, path: &Path) -> String {
    format!(
        "{key} = {}",
        toml_string(path.to_str().expect("a UTF-8 temporary path"))
    )
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// A config that trusts `ca` and presents `client`'s certificate (mutual TLS).
fn mtls_config(dir: &Path, receiver: &Receiver, ca: &Ca, client: &Leaf) -> Config {
    let ca_file = write_file(dir, "ca.pem", &ca.pem());
    let cert_file = write_file(dir, "client.pem", &client.cert.pem());
    let key_file = write_file(dir, "client-key.pem", &client.key.serialize_pem());
    agent_config(
        dir,
        receiver,
        &[
            path_line("ca_file", &ca_file),
            path_line("client_cert_file", &cert_file),
            path_line("client_key_file", &key_file),
        ],
    )
}

fn write_file(dir: &Path, name: &str, contents: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

async fn start(config: &Config) -> Agent {
    Agent::start(config, AgentOptions { jitter: false })
        .await
        .unwrap()
}

fn updates() -> Vec<String> {
    vec![
        member_update("a", "Ada", "2026-01-01T00:00:01Z"),
        member_update("b", "Bo", "2026-01-01T00:00:01Z"),
        member_update("a", "Ada2", "2026-01-01T00:00:02Z"),
    ]
}

/// Posts the updates to the agent's ingest API; returns how many exports they made.
async fn ingest(agent: &Agent, lines: &[String]) -> usize {
    let (status, body) = http_post(agent.listen_addr, "/v1/updates", lines.join("\n"), &[]).await;
    assert_eq!(status, 200, "{body}");
    let summary: serde_json::Value = serde_json::from_str(&body).unwrap();
    summary["exports"].as_u64().unwrap() as usize
}

/// Waits until `exports` distinct exports were delivered and the outbox is empty.
async fn drained(agent: &Agent, receiver: &Receiver, exports: usize) {
    wait_drained(agent, receiver, exports).await;
    assert_eq!(agent.store.tally().unwrap().dead, 0);
}

/// Checks, for ~2 s, that nothing gets through; then that every export is still pending with a
/// recorded error, none dead-lettered. Returns the errors.
async fn nothing_gets_through(agent: &Agent, receiver: &Receiver, exports: usize) -> Vec<String> {
    // While the destination fails, one export at a time probes it (see the delivery gate).
    wait_until(10, "a failed attempt recorded", || {
        assert!(
            receiver.delivered().is_empty(),
            "delivered without trust: {:?}",
            receiver.delivered()
        );
        let pending = agent.store.list(&ListFilter::default()).unwrap();
        pending.iter().any(|e| e.record.attempts > 0)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        receiver.delivered().is_empty(),
        "delivered without trust: {:?}",
        receiver.delivered()
    );
    let tally = agent.store.tally().unwrap();
    assert_eq!(tally.pending as usize, exports, "{tally:?}");
    assert_eq!(tally.dead, 0, "TLS failures are retried, not dead-lettered");
    let pending = agent.store.list(&ListFilter::default()).unwrap();
    assert_eq!(pending.len(), exports);
    assert!(pending.iter().all(|e| e.record.dead_at_ms.is_none()));
    assert!(
        pending.iter().any(|e| e.record.attempts >= 2),
        "the failure was retried"
    );
    let errors: Vec<String> = pending
        .iter()
        .filter(|e| e.record.attempts > 0)
        .map(|e| e.record.last_error.clone().expect("an error is recorded"))
        .collect();
    assert!(!errors.is_empty());
    errors
}

#[tokio::test]
async fn delivers_over_https_to_a_private_ca() {
    let ca = Ca::new("outpost test CA");
    let server = ca.server_leaf();
    let receiver = tls_receiver(server_config(&server, None)).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write_file(dir.path(), "ca.pem", &ca.pem());
    let config = agent_config(dir.path(), &receiver, &[path_line("ca_file", &ca_file)]);
    assert_eq!(
        config.destination.ca_file.as_deref(),
        Some(ca_file.as_path())
    );

    let agent = start(&config).await;
    let exports = ingest(&agent, &updates()).await;
    assert_eq!(exports, 3);
    drained(&agent, &receiver, exports).await;
    assert_eq!(
        receiver.tokens_issued(),
        1,
        "the token was fetched over TLS"
    );
    let mut profiles = delivered_profiles(&receiver);
    profiles.sort();
    assert_eq!(profiles, ["a", "a", "b"]);
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn an_untrusted_certificate_is_retried_not_delivered() {
    let ca = Ca::new("outpost test CA");
    let server = ca.server_leaf();
    let receiver = tls_receiver(server_config(&server, None)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(dir.path(), &receiver, &[]);
    assert!(config.destination.ca_file.is_none());

    let agent = start(&config).await;
    let exports = ingest(&agent, &updates()).await;
    assert_eq!(exports, 3);
    let errors = nothing_gets_through(&agent, &receiver, exports).await;
    assert_eq!(
        receiver.tokens_issued(),
        0,
        "no token over an untrusted TLS link"
    );
    assert!(receiver.token_requests().is_empty());
    assert_eq!(receiver.export_arrivals(), 0);
    for error in &errors {
        let lower = error.to_lowercase();
        assert!(
            lower.contains("certificate") || lower.contains("unknownissuer"),
            "not a certificate error: {error}"
        );
    }
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_not_trusted() {
    let ca = Ca::new("outpost test CA");
    let other = Ca::new("some other CA");
    let server = ca.server_leaf();
    let receiver = tls_receiver(server_config(&server, None)).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write_file(dir.path(), "other-ca.pem", &other.pem());
    let config = agent_config(dir.path(), &receiver, &[path_line("ca_file", &ca_file)]);

    let agent = start(&config).await;
    let exports = ingest(&agent, &updates()).await;
    let errors = nothing_gets_through(&agent, &receiver, exports).await;
    assert_eq!(receiver.tokens_issued(), 0);
    for error in &errors {
        assert!(
            error.to_lowercase().contains("certificate"),
            "not a certificate error: {error}"
        );
    }
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn mutual_tls_with_a_client_certificate() {
    let ca = Ca::new("outpost test CA");
    let server = ca.server_leaf();
    let client = ca.client_leaf();
    let receiver = tls_receiver(server_config(&server, Some(ca.roots()))).await;
    let dir = tempfile::tempdir().unwrap();
    let config = mtls_config(dir.path(), &receiver, &ca, &client);
    assert!(config.destination.client_cert.is_some());

    let agent = start(&config).await;
    let exports = ingest(&agent, &updates()).await;
    drained(&agent, &receiver, exports).await;
    assert_eq!(receiver.tokens_issued(), 1);
    agent.stop().await.unwrap();
}

/// Through an HTTP proxy's tunnel, TLS (mutual here) runs end to end with the endpoint: the
/// proxy is asked for `localhost:<port>` and relays bytes; `outpost check`'s handshake goes
/// through it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_through_a_proxys_tunnel() {
    let proxy = common::connect_proxy::ConnectProxy::start(None).await;
    let ca = Ca::new("outpost test CA");
    let server = ca.server_leaf();
    let client = ca.client_leaf();
    let receiver = tls_receiver(server_config(&server, Some(ca.roots()))).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write_file(dir.path(), "ca.pem", &ca.pem());
    let cert_file = write_file(dir.path(), "client.pem", &client.cert.pem());
    let key_file = write_file(dir.path(), "client-key.pem", &client.key.serialize_pem());
    let config = agent_config(
        dir.path(),
        &receiver,
        &[
            path_line("ca_file", &ca_file),
            path_line("client_cert_file", &cert_file),
            path_line("client_key_file", &key_file),
            format!("proxy = \"http://{}\"", proxy.addr),
        ],
    );
    let agent = start(&config).await;
    let exports = ingest(&agent, &updates()).await;
    drained(&agent, &receiver, exports).await;
    assert_eq!(receiver.tokens_issued(), 1);
    agent.stop().await.unwrap();
    let target = format!("localhost:{}", receiver.addr.port());
    let tunnels = proxy.tunnels();
    assert!(
        !tunnels.is_empty() && tunnels.iter().all(|t| *t == target),
        "{tunnels:?}"
    );

    let checked = run_with_config(&config.path, &["check"], None);
    let said = String::from_utf8_lossy(&checked.stdout);
    assert!(
        said.contains("endpoint TLS     certificate verifies"),
        "{said}"
    );
    // One tunnel for the handshake, one for the token request.
    assert_eq!(
        proxy.tunnels().len(),
        tunnels.len() + 2,
        "check went around the proxy"
    );
}

#[tokio::test]
async fn mutual_tls_without_a_client_certificate_fails() {
    let ca = Ca::new("outpost test CA");
    let server = ca.server_leaf();
    let receiver = tls_receiver(server_config(&server, Some(ca.roots()))).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write_file(dir.path(), "ca.pem", &ca.pem());
    let config = agent_config(dir.path(), &receiver, &[path_line("ca_file", &ca_file)]);
    assert!(config.destination.client_cert.is_none());

    let agent = start(&config).await;
    let exports = ingest(&agent, &updates()).await;
    let errors = nothing_gets_through(&agent, &receiver, exports).await;
    assert_eq!(receiver.tokens_issued(), 0);
    assert_eq!(receiver.export_arrivals(), 0);
    for error in &errors {
        // The server's alert (CertificateRequired under TLS 1.3), on the token request.
        assert!(error.starts_with("token endpoint"), "{error}");
        assert!(
            error.to_lowercase().contains("certificate"),
            "not a certificate error: {error}"
        );
    }
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn mutual_tls_with_a_client_certificate_from_another_ca_fails() {
    let ca = Ca::new("outpost test CA");
    let other = Ca::new("some other CA");
    let server = ca.server_leaf();
    let client = other.client_leaf();
    let receiver = tls_receiver(server_config(&server, Some(ca.roots()))).await;
    let dir = tempfile::tempdir().unwrap();
    let config = mtls_config(dir.path(), &receiver, &ca, &client);

    let agent = start(&config).await;
    let exports = ingest(&agent, &updates()).await;
    let errors = nothing_gets_through(&agent, &receiver, exports).await;
    assert_eq!(receiver.tokens_issued(), 0);
    assert_eq!(receiver.export_arrivals(), 0);
    for error in &errors {
        // The server's alert: UnknownCA.
        let lower = error.to_lowercase();
        assert!(
            lower.contains("unknownca") || lower.contains("certificate"),
            "not a certificate error: {error}"
        );
    }
    agent.stop().await.unwrap();
}

/// Starts the agent and ingests [`updates`], whose exports the endpoint's handshake refuses:
/// the agent and how many exports wait, once a refusal is recorded.
async fn started_and_refused(config: &Config, receiver: &Receiver) -> (Agent, usize) {
    let agent = start(config).await;
    let exports = ingest(&agent, &updates()).await;
    wait_until(10, "a refused handshake recorded", || {
        let pending = agent.store.list(&ListFilter::default()).unwrap();
        pending.iter().any(|e| e.record.attempts > 0)
    })
    .await;
    assert!(receiver.delivered().is_empty());
    (agent, exports)
}

/// Writes `contents` beside `name` in `dir` and renames it over `name`, as renewal tools do.
fn rename_into_place(dir: &Path, name: &str, contents: &str) {
    let next = write_file(dir, &format!("{name}.next"), contents);
    std::fs::rename(next, dir.join(name)).unwrap();
}

/// A client certificate renewed in its files (the new key and certificate renamed into
/// place, as renewal tools write them) is presented from the next handshake on: the agent
/// began with one the endpoint refuses, and delivers once the one it takes is in place,
/// without a restart.
#[tokio::test]
async fn a_client_certificate_renewed_in_its_files_is_presented_without_a_restart() {
    let ca = Ca::new("outpost test CA");
    let other = Ca::new("some other CA");
    let server = ca.server_leaf();
    let receiver = tls_receiver(server_config(&server, Some(ca.roots()))).await;
    let dir = tempfile::tempdir().unwrap();
    let config = mtls_config(dir.path(), &receiver, &ca, &other.client_leaf());
    let (agent, exports) = started_and_refused(&config, &receiver).await;
    let renewed = ca.client_leaf();
    rename_into_place(dir.path(), "client-key.pem", &renewed.key.serialize_pem());
    rename_into_place(dir.path(), "client.pem", &renewed.cert.pem());
    drained(&agent, &receiver, exports).await;
    agent.stop().await.unwrap();
}

/// A CA put in `ca_file` (renamed into place) is trusted from the next handshake on: the
/// agent began without the CA that signed the endpoint's certificate, and delivers once it is
/// in the file, without a restart.
#[tokio::test]
async fn a_ca_put_in_the_ca_file_is_trusted_without_a_restart() {
    let (ca, other) = (Ca::new("outpost test CA"), Ca::new("some other CA"));
    let receiver = tls_receiver(server_config(&ca.server_leaf(), None)).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write_file(dir.path(), "ca.pem", &other.pem());
    let config = agent_config(dir.path(), &receiver, &[path_line("ca_file", &ca_file)]);
    let (agent, exports) = started_and_refused(&config, &receiver).await;
    rename_into_place(dir.path(), "ca.pem", &(other.pem() + &ca.pem()));
    drained(&agent, &receiver, exports).await;
    agent.stop().await.unwrap();
}

/// An endpoint over HTTP/2 whose first connection goes silent after its first answer (as a
/// path through a firewall that drops packets, or a hung proxy, does) and whose later
/// connections answer. Answered 200 `"connection N"`.
async fn h2_endpoint_silent_after_one_answer(server: &Leaf) -> std::net::SocketAddr {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut config = (*server_config(server, None)).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let connection = connections.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let tls = acceptor.accept(tcp).await.unwrap();
                let answered = Arc::new(AtomicUsize::new(0));
                let service = hyper::service::service_fn(move |_request| {
                    let before = answered.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if connection == 0 && before > 0 {
                            std::future::pending::<()>().await;
                        }
                        let body = format!("connection {connection}");
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(hyper::body::Bytes::from(body)),
                        ))
                    }
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
            });
        }
    });
    addr
}

/// A request that timed out on a shared HTTP/2 connection retires it: the next request takes
/// a new connection rather than time out on the silent one again, for as long as its socket
/// lives.
#[tokio::test]
async fn a_timed_out_http2_connection_is_not_used_again() {
    use outpost::delivery::client::{ClientError, HttpClient};
    let ca = Ca::new("outpost test CA");
    let addr = h2_endpoint_silent_after_one_answer(&ca.server_leaf()).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write_file(dir.path(), "ca.pem", &ca.pem());
    let base = format!("https://localhost:{}", addr.port());
    let text = agent_config_text(&base, &oauth_body(&base), "").replace(
        "[destination]\n",
        &format!("[destination]\n{}\n", path_line("ca_file", &ca_file)),
    );
    let path = write_file(dir.path(), "outpost.toml", &text);
    let config = Config::load(&path).unwrap();
    let client = HttpClient::new(&config.destination, Duration::from_millis(500)).unwrap();
    let post = || {
        hyper::Request::post(format!("{base}/profiles"))
            .body(http_body_util::Full::new(hyper::body::Bytes::from("{}")))
            .unwrap()
    };
    let body = |answer: outpost::delivery::client::Answer| {
        String::from_utf8_lossy(&answer.body).into_owned()
    };
    assert_eq!(body(client.send(post()).await.unwrap()), "connection 0");
    let timed_out = client.send(post()).await.unwrap_err();
    assert!(
        matches!(timed_out, ClientError::Timeout(_)),
        "{timed_out:?}"
    );
    let next = client.send(post()).await;
    assert_eq!(body(next.unwrap()), "connection 1");
}
