//! End to end, against the relay a user would otherwise pick: updates POSTed over HTTP, kept on
//! disk, relayed to an HTTP endpoint.
//!
//! Each relay runs as a process of its own on a fresh folder: `outpost run` (the binary cargo
//! builds with the bench), with one export a request (the default) and with
//! `delivery.max_profiles_per_request = 100`; and, when `OUTPOST_BENCH_VECTOR` names a Vector
//! binary, Vector with an `http_server` source (NDJSON decoded as JSON), a disk buffer
//! (`when_full = "block"`) and an `http` sink with acknowledgements on (its defaults otherwise:
//! JSON array bodies of up to 10 MB or 1 s, adaptive concurrency). outpost answers a POST once
//! its updates are flushed and fsynced; Vector once they are in its disk buffer's write buffer,
//! which reaches the disk later (it syncs the buffer's file at most every 500 ms, on a later
//! write). No auth on either side.
//!
//! The clients (4, each POSTing NDJSON bodies of 500 updates one after another) and the
//! receiver run in the bench process, the same for every relay. The receiver answers 200 to
//! every request and counts the records in each body: the elements of a JSON array, or the
//! JSON values one after another (outpost's single payload, NDJSON), each read in full.
//!
//! Inputs, each after a warm-up that is relayed before the timing starts:
//! - every update exports, each of a new profile: `UPDATES` ~1 KB updates of as many new
//!   profiles, each a member of a mapped segment, so outpost delivers one export an update as
//!   Vector relays one event an update (warm-up: 5% as many updates of other new profiles);
//! - every update exports, each of a stored profile: the same updates sent first (the
//!   warm-up), then as many again, each changing its profile's mapped first name;
//! - the sample mix (`data/sample-updates.ndjson` cycled with fresh ids, as `cargo bench
//!   --bench commit` ingests it): Vector relays every line, outpost only the exports the rules
//!   decide on (45–48% in the runs the README shows; the share varies from run to run, as
//!   the 4 clients' requests, some with updates of the same profiles, are committed in
//!   different orders) (warm-up: the new profiles' warm-up).
//!
//! Figures per run: ingest (updates acknowledged per second, from the first POST to the last
//! answer), end to end (updates per second from the first POST until the receiver holds the
//! last record), the relay process's CPU per update over that time (utime + stime), and its
//! peak RSS. The relays run in turn, the order reversed every round.
//!
//! Run: `cargo bench --bench relay`, or with Vector:
//! `OUTPOST_BENCH_VECTOR=/path/to/vector cargo bench --bench relay`; `OUTPOST_BENCH_ONLY=new`
//! (or `stored`, `mix`) runs the inputs whose name holds it; `OUTPOST_BENCH_CACHE_BYTES` sets
//! outpost's `storage.cache_bytes` (default 32 MiB).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde::de::IgnoredAny;

mod common;
use common::{
    config_text, free_port, full_mapping, full_mapping_toml, http_client, make_update, memory_kib,
    ndjson_bodies, post_concurrently, process_cpu_of, rate, sample_mix, spawn_agent, stop_agent,
    template, wait_healthy, write_config, AUTH_NONE,
};

const UPDATES: usize = 100_000;
const BATCH: usize = 500;
const CLIENTS: usize = 4;
const REPEATS: usize = 2;
/// How long the receiver may take to get every record after the last answer.
const DRAIN_LIMIT: Duration = Duration::from_secs(300);

enum Relay {
    Outpost { per_request: usize },
    Vector { binary: PathBuf },
}

impl Relay {
    fn name(&self) -> String {
        match self {
            Relay::Outpost { per_request: 1 } => "outpost, one export a request".into(),
            Relay::Outpost { per_request } => format!("outpost, arrays of {per_request}"),
            Relay::Vector { .. } => "Vector, disk buffer".into(),
        }
    }
}

struct Figures {
    ingest: f64,
    end_to_end: f64,
    relayed: u64,
    cpu_per_update: Duration,
    peak_rss_kib: u64,
}

// ---------------------------------------------------------------------------------------------
// The receiver

#[derive(Default)]
struct Counts {
    records: AtomicU64,
    requests: AtomicU64,
    /// The first body that was not JSON, if any (the run then stops with it).
    refused: std::sync::Mutex<Option<String>>,
}

impl Counts {
    fn count(&self, body: &[u8]) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        match records_in(body) {
            Ok(records) => {
                self.records.fetch_add(records, Ordering::Relaxed);
            }
            Err(e) => {
                let mut refused = self.refused.lock().unwrap();
                refused.get_or_insert_with(|| {
                    format!(
                        "the receiver got a body that is not JSON ({e}): {}",
                        String::from_utf8_lossy(&body[..body.len().min(200)])
                    )
                });
            }
        }
    }

    fn check(&self) {
        if let Some(refused) = self.refused.lock().unwrap().as_ref() {
            panic!("{refused}");
        }
    }
}

/// Records in a body: a JSON array's elements, or the JSON values one after another.
fn records_in(body: &[u8]) -> Result<u64, serde_json::Error> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => serde_json::from_slice::<Vec<IgnoredAny>>(body).map(|r| r.len() as u64),
        _ => serde_json::Deserializer::from_slice(body)
            .into_iter::<IgnoredAny>()
            .map(|record| record.map(|_| 1))
            .sum(),
    }
}

/// A receiver on 127.0.0.1 that answers 200 to every request and counts what it gets.
async fn start_receiver() -> (SocketAddr, Arc<Counts>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let served = counts.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            let counts = served.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let counts = counts.clone();
                    async move {
                        let body = request.into_body().collect().await?.to_bytes();
                        counts.count(&body);
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, counts)
}

// ---------------------------------------------------------------------------------------------
// The relays

/// Starts `relay` on `dir`, sending to `receiver`; returns the process and its ingest URI once
/// it takes updates.
async fn start_relay(relay: &Relay, dir: &Path, receiver: SocketAddr) -> (Child, hyper::Uri) {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    match relay {
        Relay::Outpost { per_request } => {
            let text = config_text(
                &format!("http://{receiver}"),
                AUTH_NONE,
                &full_mapping_toml(),
                &addr.to_string(),
                &std::env::var("OUTPOST_BENCH_CACHE_BYTES")
                    .map(|bytes| format!("cache_bytes = {bytes}"))
                    .unwrap_or_default(),
            ) + &format!("\n[delivery]\nmax_profiles_per_request = {per_request}\n");
            let (config, _) = write_config(dir, "outpost.toml", &text);
            let start = Instant::now();
            let mut child = spawn_agent(&config, &dir.join("outpost.log"));
            wait_healthy(addr, start, Some(&mut child)).await;
            let uri = format!("http://{addr}/v1/updates").parse().unwrap();
            (child, uri)
        }
        Relay::Vector { binary } => {
            let data = dir.join("data");
            std::fs::create_dir(&data).unwrap();
            let text = format!(
                r#"data_dir = "{data}"

[sources.updates]
type = "http_server"
address = "{addr}"
path = "/v1/updates"
decoding.codec = "json"
framing.method = "newline_delimited"

[sinks.destination]
type = "http"
inputs = ["updates"]
uri = "http://{receiver}/profiles?source=edge"
encoding.codec = "json"
healthcheck.enabled = false
acknowledgements.enabled = true
buffer.type = "disk"
buffer.max_size = 1073741824
buffer.when_full = "block"
"#,
                data = data.display()
            );
            let config = dir.join("vector.toml");
            std::fs::write(&config, text).unwrap();
            let mut child = Command::new(binary)
                .arg("--config")
                .arg(&config)
                .env("VECTOR_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("vector.log")).unwrap())
                .spawn()
                .unwrap();
            let start = Instant::now();
            while tokio::net::TcpStream::connect(addr).await.is_err() {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!(
                        "vector exited early ({status}): {}",
                        std::fs::read_to_string(dir.join("vector.log")).unwrap_or_default()
                    );
                }
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "vector did not listen"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let uri = format!("http://{addr}/v1/updates").parse().unwrap();
            (child, uri)
        }
    }
}

/// What the clients send: `untimed` (the run waits until it is relayed), then `timed`, in
/// NDJSON bodies.
struct Input {
    name: &'static str,
    untimed: Vec<Bytes>,
    untimed_updates: usize,
    timed: Vec<Bytes>,
    updates: usize,
    /// outpost must export every timed update.
    every_update_exports: bool,
}

/// POSTs `bodies` to `uri` and waits until the receiver holds every record `relay` relays for
/// them. Returns how long the POSTs took, how long until the last record arrived, and how
/// many records it took.
async fn relay_all(
    relay: &Relay,
    uri: &hyper::Uri,
    bodies: &[Bytes],
    updates: usize,
    counts: &Counts,
) -> (Duration, Duration, u64) {
    let client = http_client();
    let records_before = counts.records.load(Ordering::Relaxed);
    let start = Instant::now();
    let (exports, ingest_took) = post_concurrently(&client, uri, bodies.to_vec(), CLIENTS).await;
    let expected = match relay {
        Relay::Outpost { .. } => exports,
        Relay::Vector { .. } => updates as u64,
    };
    let received = || counts.records.load(Ordering::Relaxed) - records_before;
    while received() < expected {
        counts.check();
        assert!(
            start.elapsed() < ingest_took + DRAIN_LIMIT,
            "{}: {} of {expected} records received",
            relay.name(),
            received()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let end_to_end_took = start.elapsed();
    // Anything more would be a record relayed twice.
    tokio::time::sleep(Duration::from_millis(100)).await;
    counts.check();
    assert_eq!(
        received(),
        expected,
        "{}: more records than were relayed",
        relay.name()
    );
    (ingest_took, end_to_end_took, expected)
}

/// One run of `input` through a fresh `relay`.
async fn run(relay: &Relay, input: &Input, receiver: SocketAddr, counts: &Counts) -> Figures {
    let dir = tempfile::tempdir().unwrap();
    let (child, uri) = start_relay(relay, dir.path(), receiver).await;
    relay_all(relay, &uri, &input.untimed, input.untimed_updates, counts).await;
    let cpu_before = process_cpu_of(child.id());
    let (ingest_took, end_to_end_took, relayed) =
        relay_all(relay, &uri, &input.timed, input.updates, counts).await;
    if input.every_update_exports && matches!(relay, Relay::Outpost { .. }) {
        assert_eq!(
            relayed, input.updates as u64,
            "every timed update should export"
        );
    }
    let cpu = process_cpu_of(child.id()) - cpu_before;
    let (peak_rss_kib, _) = memory_kib(child.id());
    stop_agent(child);
    Figures {
        ingest: rate(input.updates, ingest_took),
        end_to_end: rate(input.updates, end_to_end_took),
        relayed,
        cpu_per_update: cpu / input.updates as u32,
        peak_rss_kib,
    }
}

fn vector_version(binary: &Path) -> String {
    let out = Command::new(binary).arg("--version").output().unwrap();
    assert!(
        out.status.success(),
        "{} --version: {out:?}",
        binary.display()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn main() {
    let smoke = common::smoke_run();
    let (updates, repeats) = if smoke {
        (1_000, 1)
    } else {
        (UPDATES, REPEATS)
    };
    let mut relays = vec![
        Relay::Outpost { per_request: 1 },
        Relay::Outpost { per_request: 100 },
    ];
    match std::env::var_os("OUTPOST_BENCH_VECTOR") {
        Some(binary) => {
            let binary = PathBuf::from(binary);
            println!("peer: {}", vector_version(&binary));
            relays.push(Relay::Vector { binary });
        }
        None => println!("no peer: set OUTPOST_BENCH_VECTOR to a Vector binary to run it too"),
    }

    let template = template(&full_mapping());
    let updates_of = |from: usize| {
        let updates: Vec<_> = (from..from + updates)
            .map(|j| make_update(&template, updates, j))
            .collect();
        ndjson_bodies(updates.iter(), BATCH)
    };
    let mix = sample_mix(updates);
    let lines: Vec<&str> = mix.lines().collect();
    // Profiles of their own (ids from 5 × `updates` on), so that the warm-up leaves the
    // timed updates' profiles unknown.
    let warm_up_updates = updates / 20;
    let warm_up = ndjson_bodies(
        (0..warm_up_updates)
            .map(|j| make_update(&template, 10 * updates, 5 * updates + j))
            .collect::<Vec<_>>()
            .iter(),
        BATCH,
    );
    let inputs = [
        Input {
            name: "every update exports, each of a new profile",
            untimed: warm_up.clone(),
            untimed_updates: warm_up_updates,
            timed: updates_of(0),
            updates,
            every_update_exports: true,
        },
        Input {
            name: "every update exports, each of a stored profile (its first name changed)",
            untimed: updates_of(0),
            untimed_updates: updates,
            timed: updates_of(updates),
            updates,
            every_update_exports: true,
        },
        Input {
            name: "the sample mix",
            untimed: warm_up,
            untimed_updates: warm_up_updates,
            timed: lines
                .chunks(BATCH)
                .map(|chunk| Bytes::from(chunk.join("\n") + "\n"))
                .collect(),
            updates,
            every_update_exports: false,
        },
    ];

    let rt = common::runtime();
    rt.block_on(async {
        let (receiver, counts) = start_receiver().await;
        let only = std::env::var("OUTPOST_BENCH_ONLY").unwrap_or_default();
        for input in &inputs {
            if !input.name.contains(only.as_str()) {
                continue;
            }
            println!(
                "\n{}: {} updates, {CLIENTS} clients, NDJSON bodies of {BATCH}",
                input.name, input.updates
            );
            let mut best: Vec<f64> = vec![0.0; relays.len()];
            for round in 0..repeats {
                let mut order: Vec<usize> = (0..relays.len()).collect();
                if round % 2 == 1 {
                    order.reverse();
                }
                for i in order {
                    let relay = &relays[i];
                    let figures = run(relay, input, receiver, &counts).await;
                    println!(
                        "  {:<32} ingest {:>7.0}/s, end to end {:>7.0}/s ({} relayed), relay CPU {:.1} µs an update, peak RSS {:.1} MiB",
                        relay.name(),
                        figures.ingest,
                        figures.end_to_end,
                        figures.relayed,
                        figures.cpu_per_update.as_secs_f64() * 1e6,
                        figures.peak_rss_kib as f64 / 1024.0,
                    );
                    best[i] = best[i].max(figures.end_to_end);
                }
            }
            if let Some(vector) = relays
                .iter()
                .position(|r| matches!(r, Relay::Vector { .. }))
            {
                for (i, relay) in relays.iter().enumerate().filter(|(i, _)| *i != vector) {
                    println!(
                        "  {}: end to end {:.2} × Vector's (best runs)",
                        relay.name(),
                        best[i] / best[vector]
                    );
                }
            }
        }
        println!(
            "\nreceiver: {} requests, {} records in all",
            counts.requests.load(Ordering::Relaxed),
            counts.records.load(Ordering::Relaxed)
        );
    });
}
