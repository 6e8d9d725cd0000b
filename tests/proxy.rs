//! `destination.proxy`: deliveries and token requests go through a real HTTP proxy's tunnels
//! (`CONNECT`), with the proxy's credentials; hosts `destination.no_proxy` lists are reached
//! directly; a proxy that refuses the credentials is told as such, without them.

mod common;

use common::connect_proxy::ConnectProxy;
use common::*;
use outpost::receiver::{Receiver, ReceiverOptions};

/// `Proxy-Authorization` of user `ops` and password `pa:ss`.
const CREDENTIALS: &str = "Basic b3BzOnBhOnNz";

/// An agent's config delivering to `receiver` at 127.0.0.1, with its token endpoint named
/// `localhost` (the same receiver), and `lines` added to `[destination]`.
fn config_through(dir: &std::path::Path, receiver: &Receiver, lines: &str) -> std::path::PathBuf {
    let base = receiver.base_url();
    let token_base = base.replace("127.0.0.1", "localhost");
    let text = agent_config_text(&base, &oauth_body(&token_base), "").replace(
        "custom_headers = \"x-api-version:2,x-tenant:acme\"\n",
        &format!("custom_headers = \"x-api-version:2,x-tenant:acme\"\n{lines}\n"),
    );
    let path = dir.join("outpost.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Ingests `profiles` member updates into `agent` and waits until each is delivered.
async fn deliver(agent: &outpost::agent::Agent, receiver: &Receiver, profiles: usize) {
    let body: Vec<String> = (0..profiles)
        .map(|p| member_update(&format!("p{p}"), "Ann", "2026-01-01T00:00:00Z"))
        .collect();
    let (status, answer) = http_post(agent.listen_addr, "/v1/updates", body.join("\n"), &[]).await;
    assert_eq!(status, 200, "{answer}");
    wait_drained(agent, receiver, profiles).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_and_token_requests_go_through_the_proxys_tunnels() {
    let proxy = ConnectProxy::start(Some(CREDENTIALS)).await;
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let line = format!("proxy = \"http://ops:pa%3Ass@{}\"", proxy.addr);
    let config =
        outpost::config::Config::load(&config_through(dir.path(), &receiver, &line)).unwrap();
    let agent = start_agent(&config).await;
    deliver(&agent, &receiver, 20).await;
    agent.stop().await.unwrap();
    let port = receiver.base_url().rsplit(':').next().unwrap().to_owned();
    let tunnels = proxy.tunnels();
    assert!(
        tunnels.contains(&format!("localhost:{port}")),
        "the token request went through the proxy: {tunnels:?}"
    );
    assert!(
        tunnels.contains(&format!("127.0.0.1:{port}")),
        "deliveries went through the proxy: {tunnels:?}"
    );
    assert_eq!(proxy.refused.lock().unwrap().len(), 0);
    assert!(receiver.tokens_issued() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_no_proxy_lists_are_reached_directly() {
    let proxy = ConnectProxy::start(None).await;
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lines = format!(
        "proxy = \"http://{}\"\nno_proxy = \"localhost\"",
        proxy.addr
    );
    let path = config_through(dir.path(), &receiver, &lines);
    let config = outpost::config::Config::load(&path).unwrap();
    let agent = start_agent(&config).await;
    deliver(&agent, &receiver, 5).await;
    agent.stop().await.unwrap();
    let port = receiver.base_url().rsplit(':').next().unwrap().to_owned();
    let tunnels = proxy.tunnels();
    assert!(!tunnels.is_empty(), "deliveries went through the proxy");
    assert!(
        tunnels.iter().all(|t| *t == format!("127.0.0.1:{port}")),
        "the token endpoint (localhost) was reached directly: {tunnels:?}"
    );
    let checked = run_with_config(&path, &["check"], None);
    let said = String::from_utf8_lossy(&checked.stdout);
    assert!(
        said.contains(&format!(
            "proxy            {} (tunnels to the endpoint)\n",
            proxy.addr
        )),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_refuses_the_credentials_is_told_without_them() {
    let proxy = ConnectProxy::start(Some("Basic b3RoZXI6b3RoZXI=")).await;
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let line = format!("proxy = \"http://ops:pa%3Ass@{}\"", proxy.addr);
    let path = config_through(dir.path(), &receiver, &line);
    let out = run_with_config(&path, &["check"], None);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!(
            "proxy            {} (tunnels to the endpoint and the token endpoint, with credentials (set))\n",
            proxy.addr
        )),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "the proxy at {} (destination.proxy) asks for credentials (407)",
            proxy.addr
        )),
        "{said}"
    );
    for secret in ["pa:ss", "pa%3Ass", CREDENTIALS, "b3BzOnBhOnNz"] {
        assert!(!said.contains(secret), "{secret} shown: {said}");
    }
    assert_eq!(
        proxy
            .refused
            .lock()
            .unwrap()
            .first()
            .cloned()
            .flatten()
            .as_deref(),
        Some(CREDENTIALS),
        "the proxy was sent the credentials"
    );
    assert_eq!(receiver.token_arrivals(), 0);

    // A proxy that takes the connection and says nothing: the tunnel is given up within the
    // connect timeout (the request timeout, 500 ms here), naming the proxy.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((connection, _)) = silent.accept().await {
            held.push(connection);
        }
    });
    let line = format!("proxy = \"http://{silent_addr}\"");
    let path = config_through(dir.path(), &receiver, &line);
    let started = std::time::Instant::now();
    let out = run_with_config(&path, &["check"], None);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        // Whichever of the tunnel's timeout and the request's fires first.
        said.contains(&format!(
            "the proxy at {silent_addr} (destination.proxy) did not open a tunnel"
        )) && said.contains("within 500ms"),
        "{said}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    held.abort();

    // Nothing listens where the proxy should be.
    drop(proxy);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = closed.local_addr().unwrap();
    drop(closed);
    let line = format!("proxy = \"http://{nowhere}\"");
    let path = config_through(dir.path(), &receiver, &line);
    let out = run_with_config(&path, &["check"], None);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!(
            "cannot reach the proxy at {nowhere} (destination.proxy): nothing accepts connections at {nowhere}"
        )),
        "{said}"
    );
}
