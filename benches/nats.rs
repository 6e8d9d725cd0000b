//! Updates consumed from NATS JetStream and committed, against the same updates over HTTP.
//!
//! The updates: `make_update` over a pool of 2,000 profiles (~1 KB full profiles, the mapped
//! first name changes every time, so every update exports), destination a closed port
//! (127.0.0.1:9) so nothing is delivered. Every run gets a fresh store.
//! (a) HTTP: `POST /v1/updates` to an in-process `Agent`, NDJSON bodies of 500, 4 clients at
//!     once, timed until the last one is acknowledged (durable).
//! (b) NATS, one agent: the updates are first published (timed on its own: `outpost publish`'s
//!     path, acknowledged, de-duplicated) into a stream of 8 partitions on a local
//!     `nats-server -js`; then an in-process `Agent` owning all 8 is started, timed until every
//!     update is committed (`outpost_source_messages_total{result="committed"}`).
//! (c) NATS, two agents in this process, owning 0-3 and 4-7, timed until both are done.
//! Target: (b) >= 0.8 x (a).
//!
//! Needs `nats-server` (Debian: apt-get install nats-server); without it the bench says so and
//! stops. Run: `cargo bench --bench nats`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use outpost::agent::{Agent, AgentOptions};
use outpost::config::Config;
use outpost::profile::Update;

mod common;
use common::{
    config_text, full_mapping, full_mapping_toml, http_client, make_update, ndjson_bodies,
    post_concurrently, rate, template, verdict, write_config, AUTH_NONE,
};

const DOWN: &str = "http://127.0.0.1:9";
const BATCH: usize = 500;
const CLIENTS: usize = 4;
const POOL: usize = 2_000;
const PARTITIONS: u32 = 8;

struct NatsServer {
    child: Child,
    port: u16,
    _store: tempfile::TempDir,
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nats_server_binary() -> Option<PathBuf> {
    ["/usr/sbin", "/usr/local/bin", "/usr/bin"]
        .iter()
        .map(|d| Path::new(d).join("nats-server"))
        .find(|p| p.is_file())
}

fn start_nats(binary: &Path) -> NatsServer {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = tempfile::tempdir().unwrap();
    let child = Command::new(binary)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    NatsServer {
        child,
        port,
        _store: store,
    }
}

/// An agent config in `dir` delivering nowhere; with `nats`, a `[source.nats]` table.
fn agent_config(dir: &Path, nats: Option<(u16, &str, &str)>) -> Config {
    let mut text = config_text(DOWN, AUTH_NONE, &full_mapping_toml(), "127.0.0.1:0", "");
    if let Some((port, stream, owned)) = nats {
        text.push_str(&format!(
            "\n[source.nats]\nservers = [\"nats://127.0.0.1:{port}\"]\nstream = \"{stream}\"\nsubject_prefix = \"bench.{stream}\"\npartitions = {PARTITIONS}\nowned = \"{owned}\"\n"
        ));
    }
    write_config(dir, "outpost.toml", &text).1
}

/// (a): updates/s over HTTP.
async fn run_http(updates: &[Update]) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(dir.path(), None);
    let agent = Agent::start(&config, AgentOptions::default())
        .await
        .unwrap();
    let uri: hyper::Uri = format!("http://{}/v1/updates", agent.listen_addr)
        .parse()
        .unwrap();
    let bodies = ndjson_bodies(updates.iter(), BATCH);
    let (_, elapsed) = post_concurrently(&http_client(), &uri, bodies, CLIENTS).await;
    agent.stop().await.unwrap();
    rate(updates.len(), elapsed)
}

/// Publishes `updates` into a fresh stream `stream`; returns updates/s published.
async fn publish(port: u16, stream: &str, updates: &[Update]) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(dir.path(), Some((port, stream, "0-7")));
    let nats = config.nats.unwrap();
    outpost::source::nats::setup(&nats, false).await.unwrap();
    let planned =
        outpost::source::publish::plan(updates, &nats, outpost::source::publish::fresh_nonce());
    let start = Instant::now();
    let report = outpost::source::publish::publish(&nats, planned, None, 256, |_| {})
        .await
        .unwrap();
    assert_eq!(report.published as usize, updates.len());
    rate(updates.len(), start.elapsed())
}

/// (b), (c): updates/s consumed and committed by agents owning `owned` each.
async fn run_nats(port: u16, stream: &str, owned: &[&str], total: usize) -> f64 {
    let dirs: Vec<tempfile::TempDir> = owned.iter().map(|_| tempfile::tempdir().unwrap()).collect();
    let configs: Vec<Config> = dirs
        .iter()
        .zip(owned)
        .map(|(dir, owned)| agent_config(dir.path(), Some((port, stream, owned))))
        .collect();
    let start = Instant::now();
    let mut agents = Vec::new();
    for config in &configs {
        agents.push(Agent::start(config, AgentOptions::default()).await.unwrap());
    }
    loop {
        let committed: u64 = agents
            .iter()
            .map(|a| a.metrics.source_messages("committed"))
            .sum();
        if committed as usize >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed();
    for agent in agents {
        agent.stop().await.unwrap();
    }
    rate(total, elapsed)
}

fn main() {
    let quick = common::smoke_run();
    let Some(binary) = nats_server_binary() else {
        println!("nats: SKIPPED: nats-server is not installed (apt-get install -y nats-server)");
        return;
    };
    let total = if quick { 2_000 } else { 100_000 };
    let template: Map<String, Value> = template(&full_mapping());
    let updates: Vec<Update> = (0..total)
        .map(|j| make_update(&template, POOL, j))
        .collect();
    let rt = common::runtime();
    let server = start_nats(&binary);
    rt.block_on(async {
        let http = run_http(&updates).await;
        println!("nats[a] HTTP ingest, {CLIENTS} clients, batches of {BATCH}: {http:.0} updates/s");
        let published = publish(server.port, "ONE", &updates).await;
        println!("nats[b] publish (acknowledged, de-duplicated): {published:.0} updates/s");
        let one = run_nats(server.port, "ONE", &["0-7"], total).await;
        println!("nats[b] one agent, {PARTITIONS} partitions: {one:.0} updates/s consumed and committed");
        publish(server.port, "TWO", &updates).await;
        let two = run_nats(server.port, "TWO", &["0-3", "4-7"], total).await;
        println!("nats[c] two agents in one process, 4 partitions each: {two:.0} updates/s");
        if quick {
            println!("nats: smoke run done (run with cargo bench to measure)");
            return;
        }
        println!(
            "nats RATIO {total} updates: NATS/HTTP = {:.2} (target >= 0.8) {}; two agents/one = {:.2}",
            one / http,
            verdict(one / http >= 0.8),
            two / one
        );
    });
}
