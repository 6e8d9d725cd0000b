//! The agent as a whole: durable ingest over HTTP, start-up with a big outbox, peak memory.
//!
//! (a) durable ingest over HTTP: `POST /v1/updates` to an in-process `Agent` (destination a
//!     closed port, 127.0.0.1:9, so nothing is delivered and delivery backs off), NDJSON bodies
//!     of 500 updates, one request at a time (and, separately, 4 concurrent clients); each a
//!     ~1 KB full profile (a sample line, member of a mapped segment) whose mapped first name
//!     changes on every update, so every update exports, over a pool of 2,000 profiles written
//!     before timing. Raw: a plain `sled::Db` (same cache, same mode) with two trees; per batch
//!     of 500 one two-tree transaction doing, per update, a get of the profile key and inserts of
//!     the profile and export values the store writes (same byte sizes), then `db.flush()` and
//!     (raw+fsync) an fsync of `<path>/db` as `Store::flush` does. Target: agent >= 0.6 x raw.
//! (b) start to serving with 1,000,000 pending exports: from the `Agent::start` call (or from
//!     spawning `outpost run`) until `GET /healthz` answers 200. sled 0.34 writes its snapshot
//!     only when it opens a store, so the first open after a big write replays the whole log
//!     since the previous open: measured "cold" (first open after the pre-fill; the binary runs
//!     on a copy made before any open) and "warm" (opened before). Target: <= 2 s.
//! (c) peak RSS of `outpost run` with 1,000,000 stored profiles and 100,000 pending exports:
//!     VmHWM (and VmRSS) from /proc/<pid>/status 5 s and 20 s after it served `/healthz` and at
//!     the end of `idle` (45 s), destination down so the exports stay, with `storage.cache_bytes`
//!     32 MiB (the default), 8 MiB, and 32 MiB with `MALLOC_ARENA_MAX=2` (run side by side, each
//!     on its own copy of the pre-filled store); then 10 s while delivering to an in-process
//!     receiver. sled's flusher thread also cleans log segments (it pages in and rewrites old
//!     pages), so the RSS keeps growing for a while after start: hence the long idle.
//!     Target: <= 64 MiB.
//!
//! The stores of (b) and (c) are pre-filled in this process through `Store::apply_groups`
//! (batches of 20,000 tiny profiles), then dropped. The binary is the one cargo builds with the
//! bench (`CARGO_BIN_EXE_outpost`, i.e. target/release/outpost under `cargo bench`).
//!
//! Run: `cargo bench --bench agent`.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use http_body_util::{BodyExt, Full};
use hyper::header::CONTENT_TYPE;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Map, Value};
use sled::transaction::ConflictableTransactionError;
use sled::Transactional;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use outpost::agent::{Agent, AgentOptions};
use outpost::config::{Config, Mapping};
use outpost::profile::change::is_member_of_any;
use outpost::profile::prune::KeepTree;
use outpost::profile::update::parse_body;
use outpost::profile::{Op, Reason, Update};
use outpost::receiver::{Receiver, ReceiverOptions};
use outpost::store::codec::{self, ProfileRecord};
use outpost::store::committer::Committer;
use outpost::store::{ListFilter, Store};

const SEGMENT_A: &str = "7841ba61-23c1-4bb3-a495-00d3g5fe1e93";
const SEGMENT_B: &str = "59bd2fkd-3c48-4b18-bf56-4f5c5e6967ae";
/// The agent's default `storage.cache_bytes`.
const CACHE_BYTES: u64 = 32 << 20;
/// sled's cache while pre-filling (bigger is faster; the agent opens with its own setting).
const PREFILL_CACHE_BYTES: u64 = 256 << 20;
/// Updates per `apply_groups` call in the pre-fills.
const PREFILL_BATCH: usize = 20_000;
/// Updates per ingest request.
const BATCH: usize = 500;
const CLIENTS: usize = 4;
const REPEATS: usize = 2;

/// Sizes of one run; the smoke run (no `--bench`) uses tiny ones.
struct Plan {
    /// (a): distinct profiles, written before timing; updates timed.
    pool: usize,
    timed: usize,
    /// (b): pending exports.
    pending: usize,
    /// (c): stored profiles, of which every `member_every`-th has a pending export.
    profiles: usize,
    member_every: usize,
    /// (c): how long the agent idles before its memory is read.
    idle: Duration,
    repeats: usize,
}

// ---------------------------------------------------------------------------------------------
// Configs and helpers

/// A config in `dir` (store `<dir>/store`); `mapping` and `extra` are TOML lines.
fn config_text(endpoint: &str, auth: &str, mapping: &str, listen: &str, storage: &str) -> String {
    format!(
        r#"[destination]
name = "bench"
http_endpoint = "{endpoint}/profiles?source=edge"

[destination.auth]
{auth}

[mapping]
{mapping}

[storage]
path = "store"
{storage}

[ingest]
listen = "{listen}"
"#
    )
}

/// The mapping of commit.rs: data/outpost.example.toml's plus the home address (exports ~600 B).
fn full_mapping_toml() -> String {
    format!(
        r#"attributes = ["person.name.firstName", "person.name.lastName", "person.birthDate", "personalEmail.address", "homeAddress"]
segments = ["{SEGMENT_A}", "{SEGMENT_B}"]
identities = ["ecid", "email_lc_sha256"]"#
    )
}

/// The mapping of the tiny pre-filled profiles.
fn tiny_mapping_toml() -> String {
    format!(
        r#"attributes = ["person.name.firstName", "person.name.lastName"]
segments = ["{SEGMENT_A}", "{SEGMENT_B}"]
identities = ["ecid"]"#
    )
}

const AUTH_NONE: &str = "type = \"none\"";
/// Nothing listens there: every delivery fails at once and backs off.
const DOWN: &str = "http://127.0.0.1:9";

/// Writes `<dir>/<name>` and parses it.
fn write_config(dir: &Path, name: &str, text: &str) -> (PathBuf, Config) {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    let config = Config::parse(&path, text).unwrap();
    (path, config)
}

fn rate(n: usize, time: Duration) -> f64 {
    n as f64 / time.as_secs_f64()
}

fn ms(time: Duration) -> String {
    format!("{:.0} ms", time.as_secs_f64() * 1e3)
}

fn best(runs: &[f64]) -> f64 {
    runs.iter().copied().fold(0.0, f64::max)
}

fn list(runs: &[f64]) -> String {
    runs.iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn verdict(met: bool) -> &'static str {
    if met {
        "MET"
    } else {
        "NOT MET"
    }
}

/// Waits until no one holds sled's lock on the store (an flock on `<store>/db`): a dropped
/// `sled::Db` (or a stopped agent) releases it a little later, from a background thread.
fn wait_unlocked(store: &Path) {
    use std::os::fd::AsRawFd;
    let file = File::open(store.join("db")).unwrap();
    let start = Instant::now();
    // SAFETY: flock on a descriptor we own; the lock goes when `file` is closed.
    while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the store at {} stayed locked",
            store.display()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A port free right now on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET /healthz` on a fresh connection; true on a 200.
async fn healthz(addr: SocketAddr) -> bool {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        Some(&head == b"HTTP/1.1 200")
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

async fn wait_healthy(addr: SocketAddr, start: Instant, child: Option<&mut Child>) -> Duration {
    let mut child = child;
    loop {
        if healthz(addr).await {
            return start.elapsed();
        }
        if let Some(child) = child.as_deref_mut() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("outpost run exited early: {status}");
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no healthy agent on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `outpost --config <config> run`, logging to `<log>`.
fn spawn_agent(config: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_outpost"))
        .arg("--config")
        .arg(config)
        .arg("run")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// SIGTERM, then waits for the exit.
fn stop_agent(mut child: Child) {
    // SAFETY: a plain kill(2) of our own child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "outpost run exited with {status}");
}

/// (VmHWM, VmRSS) of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn dir_bytes(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                dir_bytes(&e.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Pre-fills for (b) and (c)

/// A tiny first sight of profile `i`; a member of SEGMENT_A (so it exports) when `member`.
fn tiny_update(i: usize, member: bool, keep: &KeepTree) -> Update {
    let id = format!("p-{i:07}");
    let status = if member { "realized" } else { "exited" };
    let Value::Object(mut profile) = json!({
        "person": {"name": {"firstName": format!("Name{i:07}"), "lastName": "Doe"}},
        "identityMap": {"ecid": [{"id": format!("ecid-{id}")}]},
        "segmentMembership": {"ups": {SEGMENT_A: {"status": status, "lastQualificationTime": "2026-01-01T00:00:00Z"}}}
    }) else {
        unreachable!()
    };
    keep.prune(&mut profile);
    Update {
        id,
        op: Op::Upsert,
        profile,
        timestamp: Some(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()),
    }
}

/// Pre-fills the store at `path` with `profiles` profiles, every `member_every`-th a member
/// with a pending export; updates are built on another thread meanwhile. Returns the time.
fn prefill(path: &Path, mapping: &Mapping, profiles: usize, member_every: usize) -> Duration {
    let start = Instant::now();
    let (batches, receive) = std::sync::mpsc::sync_channel::<Vec<Update>>(2);
    let builder = {
        let keep = KeepTree::for_mapping(mapping);
        std::thread::spawn(move || {
            let mut done = 0;
            while done < profiles {
                let m = PREFILL_BATCH.min(profiles - done);
                let updates = (done..done + m)
                    .map(|i| tiny_update(i, i % member_every == 0, &keep))
                    .collect();
                if batches.send(updates).is_err() {
                    return;
                }
                done += m;
            }
        })
    };
    let store = Store::open(path, PREFILL_CACHE_BYTES).unwrap();
    for updates in receive {
        store
            .apply_groups(&[updates.as_slice()], mapping, Utc::now())
            .unwrap();
    }
    builder.join().unwrap();
    store.flush().unwrap();
    let took = start.elapsed();
    assert_eq!(
        store.tally().unwrap().pending as usize,
        profiles.div_ceil(member_every)
    );
    drop(store);
    wait_unlocked(path);
    took
}

// ---------------------------------------------------------------------------------------------
// (a) durable ingest over HTTP vs raw sled

fn full_mapping() -> Mapping {
    Mapping::new(
        &[
            "person.name.firstName",
            "person.name.lastName",
            "person.birthDate",
            "personalEmail.address",
            "homeAddress",
        ],
        &[SEGMENT_A, SEGMENT_B],
        &["ecid", "email_lc_sha256"],
    )
}

/// A full-profile sample line of ~1 KB that is a member of a mapped segment.
fn template(mapping: &Mapping) -> Map<String, Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/sample-updates.ndjson");
    let text = std::fs::read_to_string(path).expect("reading data/sample-updates.ndjson");
    for line in text.lines().filter(|l| (950..=1150).contains(&l.len())) {
        let Ok(mut updates) = parse_body(line.as_bytes()) else {
            continue;
        };
        let update = updates.pop().unwrap();
        let profile = Value::Object(update.profile.clone());
        if update.op == Op::Upsert
            && is_member_of_any(&profile, mapping)
            && profile.pointer("/person/name/firstName").is_some()
            && profile.get("identityMap").is_some()
        {
            return update.profile;
        }
    }
    panic!("no suitable full-profile line in the sample");
}

/// Update number `j`: profile `j % pool`, its first name changed to a value unique to `j`.
fn make_update(template: &Map<String, Value>, pool: usize, j: usize) -> Update {
    let mut profile = template.clone();
    let name = profile
        .get_mut("person")
        .and_then(|p| p.get_mut("name"))
        .and_then(|n| n.get_mut("firstName"))
        .expect("template has person.name.firstName");
    *name = Value::String(format!("Name{j:08}"));
    Update {
        id: format!("c-{:06}", j % pool),
        op: Op::Upsert,
        profile,
        timestamp: Some(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()),
    }
}

/// NDJSON bodies of `BATCH` updates for updates `from..from + total`.
fn bodies(template: &Map<String, Value>, pool: usize, from: usize, total: usize) -> Vec<Bytes> {
    (from..from + total)
        .collect::<Vec<_>>()
        .chunks(BATCH)
        .map(|js| {
            let mut body = String::new();
            for &j in js {
                body.push_str(&make_update(template, pool, j).to_value().to_string());
                body.push('\n');
            }
            Bytes::from(body)
        })
        .collect()
}

/// The profile and export values the store writes for a timed update, from a small real
/// committer run (so the raw baseline writes the same sizes).
fn value_sizes(
    rt: &tokio::runtime::Runtime,
    template: &Map<String, Value>,
    mapping: &Mapping,
    pool: usize,
) -> (Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), CACHE_BYTES).unwrap());
    let (committer, handle) = Committer::start(
        store.clone(),
        Arc::new(mapping.clone()),
        Arc::new(Notify::new()),
    );
    let second = make_update(template, pool, pool);
    rt.block_on(async {
        let first = committer
            .commit(vec![make_update(template, pool, 0)])
            .await
            .unwrap();
        let next = committer.commit(vec![second.clone()]).await.unwrap();
        assert_eq!((first.exports, next.exports), (1, 1));
    });
    drop(committer);
    handle.join().unwrap();
    let stored = store.profile(&second.id).unwrap().expect("stored profile");
    let profile = codec::encode_profile(&ProfileRecord {
        timestamp_micros: stored.timestamp.map(|t| t.timestamp_micros()),
        json: stored.profile.to_string(),
    });
    let exports = store.list(&ListFilter::default()).unwrap();
    let last = exports.last().expect("an export");
    assert_eq!(last.record.reason(), Reason::Attribute);
    (profile, codec::encode_export(&last.record))
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn http_client() -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(http)
}

async fn post_updates(client: &HttpClient, uri: &hyper::Uri, body: Bytes) -> Value {
    let request = hyper::Request::post(uri.clone())
        .header(CONTENT_TYPE, "application/x-ndjson")
        .body(Full::new(body))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// Updates/s of durable ingest over HTTP with `clients` concurrent clients.
async fn run_http(
    template: &Map<String, Value>,
    plan: &Plan,
    clients: usize,
) -> (f64, usize, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        DOWN,
        AUTH_NONE,
        &full_mapping_toml(),
        "127.0.0.1:0",
        &format!("cache_bytes = {CACHE_BYTES}"),
    );
    let (_, config) = write_config(dir.path(), "outpost.toml", &text);
    let started = Instant::now();
    let agent = Agent::start(&config, AgentOptions::default())
        .await
        .unwrap();
    let start_took = started.elapsed();
    let uri: hyper::Uri = format!("http://{}/v1/updates", agent.listen_addr)
        .parse()
        .unwrap();
    let client = http_client();
    for body in bodies(template, plan.pool, 0, plan.pool) {
        post_updates(&client, &uri, body).await;
    }
    let timed = bodies(template, plan.pool, plan.pool, plan.timed);
    let body_bytes: usize = timed.iter().map(Bytes::len).sum();
    let mut per_client: Vec<Vec<Bytes>> = (0..clients).map(|_| Vec::new()).collect();
    for (i, body) in timed.into_iter().enumerate() {
        per_client[i % clients].push(body);
    }
    let start = Instant::now();
    let tasks: Vec<_> = per_client
        .into_iter()
        .map(|mine| {
            let (client, uri) = (client.clone(), uri.clone());
            tokio::spawn(async move {
                let mut exports = 0;
                for body in mine {
                    exports += post_updates(&client, &uri, body).await["exports"]
                        .as_u64()
                        .unwrap();
                }
                exports
            })
        })
        .collect();
    let mut exports = 0;
    for task in tasks {
        exports += task.await.unwrap();
    }
    let elapsed = start.elapsed();
    assert_eq!(
        exports as usize, plan.timed,
        "every timed update should export"
    );
    let store_path = config.storage.path.clone();
    agent.stop().await.unwrap();
    wait_unlocked(&store_path);
    drop(dir);
    (
        rate(plan.timed, elapsed),
        body_bytes / plan.timed,
        start_took,
    )
}

fn open_raw(path: &Path) -> sled::Db {
    sled::Config::new()
        .path(path)
        .cache_capacity(CACHE_BYTES)
        .mode(sled::Mode::HighThroughput)
        .open()
        .unwrap()
}

fn run_raw(profile: &[u8], export: &[u8], pool: usize, total: usize, fsync: bool) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let db = open_raw(dir.path());
    let profiles = db.open_tree("profiles").unwrap();
    let outbox = db.open_tree("outbox").unwrap();
    let ids: Vec<String> = (0..pool).map(|i| format!("c-{i:06}")).collect();
    for id in &ids {
        profiles.insert(id.as_bytes(), profile).unwrap();
    }
    db.flush().unwrap();
    let log = if fsync {
        Some(File::open(dir.path().join("db")).unwrap())
    } else {
        None
    };
    let mut seq = 0u64;
    let start = Instant::now();
    let mut done = 0;
    while done < total {
        let n = BATCH.min(total - done);
        (&profiles, &outbox)
            .transaction(|(p, o)| {
                for k in 0..n {
                    let id = ids[(done + k) % pool].as_bytes();
                    std::hint::black_box(p.get(id)?);
                    p.insert(id, profile)?;
                    o.insert(&(seq + k as u64).to_be_bytes(), export)?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .unwrap();
        db.flush().unwrap();
        if let Some(file) = &log {
            file.sync_data().unwrap();
        }
        seq += n as u64;
        done += n;
    }
    rate(total, start.elapsed())
}

fn bench_ingest(rt: &tokio::runtime::Runtime, plan: &Plan) -> (f64, f64, f64, f64) {
    let mapping = full_mapping();
    let template = template(&mapping);
    let (profile, export) = value_sizes(rt, &template, &mapping, plan.pool);
    let (mut one, mut many, mut raw, mut raw_fsync) = (Vec::new(), Vec::new(), Vec::new(), vec![]);
    let mut line = 0;
    for _ in 0..plan.repeats {
        // Interleaved so that drift in the machine hits every configuration alike.
        let (r, line_len, start_took) = rt.block_on(run_http(&template, plan, 1));
        one.push(r);
        line = line_len;
        raw.push(run_raw(&profile, &export, plan.pool, plan.timed, false));
        raw_fsync.push(run_raw(&profile, &export, plan.pool, plan.timed, true));
        many.push(rt.block_on(run_http(&template, plan, CLIENTS)).0);
        println!(
            "agent[ingest]: run: Agent::start {}, 1 client {:.0}/s, {CLIENTS} clients {:.0}/s, raw {:.0}/s, raw+fsync {:.0}/s",
            ms(start_took),
            one.last().unwrap(),
            many.last().unwrap(),
            raw.last().unwrap(),
            raw_fsync.last().unwrap()
        );
    }
    println!(
        "agent[ingest]: update line ~{line} B, stored profile value {} B, export value {} B, pool {} profiles, {} timed updates in bodies of {BATCH}, cache 32 MiB, best of {}",
        profile.len(),
        export.len(),
        plan.pool,
        plan.timed,
        plan.repeats
    );
    let (o, m, r, rf) = (best(&one), best(&many), best(&raw), best(&raw_fsync));
    println!(
        "agent[ingest, batch={BATCH}]: HTTP 1 client {o:>8.0}/s [{}]  HTTP {CLIENTS} clients {m:>8.0}/s [{}]  raw {r:>8.0}/s [{}]  raw+fsync {rf:>8.0}/s [{}]",
        list(&one),
        list(&many),
        list(&raw),
        list(&raw_fsync)
    );
    (o, m, r, rf)
}

// ---------------------------------------------------------------------------------------------
// (b) start to serving, (c) peak RSS

/// From the `Agent::start` call until `/healthz` answers 200; also the time `Agent::start` took.
async fn start_in_process(config: &Config) -> (Duration, Duration) {
    let start = Instant::now();
    let agent = Agent::start(config, AgentOptions::default()).await.unwrap();
    let started = start.elapsed();
    let healthy = wait_healthy(agent.listen_addr, start, None).await;
    let store = config.storage.path.clone();
    agent.stop().await.unwrap();
    wait_unlocked(&store);
    (healthy, started)
}

/// From spawning `outpost run` until `/healthz` answers 200.
async fn start_binary(dir: &Path, store: &str, cache_bytes: u64) -> Duration {
    let port = free_port();
    let text = config_text(
        DOWN,
        AUTH_NONE,
        &tiny_mapping_toml(),
        &format!("127.0.0.1:{port}"),
        &format!("cache_bytes = {cache_bytes}"),
    )
    .replace("path = \"store\"", &format!("path = \"{store}\""));
    let (config_path, _) = write_config(dir, "run.toml", &text);
    let start = Instant::now();
    let mut child = spawn_agent(&config_path, &dir.join("run.log"));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let healthy = wait_healthy(addr, start, Some(&mut child)).await;
    stop_agent(child);
    wait_unlocked(&dir.join(store));
    healthy
}

fn bench_startup(rt: &tokio::runtime::Runtime, plan: &Plan) -> Vec<(String, Duration)> {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        DOWN,
        AUTH_NONE,
        &tiny_mapping_toml(),
        "127.0.0.1:0",
        &format!("cache_bytes = {CACHE_BYTES}"),
    );
    let (_, config) = write_config(dir.path(), "outpost.toml", &text);
    let took = prefill(&config.storage.path, &config.mapping, plan.pending, 1);
    let bytes = dir_bytes(&config.storage.path);
    let copy_start = Instant::now();
    let status = Command::new("cp")
        .arg("-a")
        .arg(&config.storage.path)
        .arg(dir.path().join("copy"))
        .status()
        .unwrap();
    assert!(status.success());
    println!(
        "agent[start, {} pending]: pre-fill took {} ({:.0} updates/s), store {:.0} MiB on disk, copied in {}",
        plan.pending,
        ms(took),
        rate(plan.pending, took),
        bytes as f64 / (1 << 20) as f64,
        ms(copy_start.elapsed())
    );
    let mut results = Vec::new();
    rt.block_on(async {
        let (healthy, started) = start_in_process(&config).await;
        println!(
            "agent[start, {} pending]: in-process cold: Agent::start {}, /healthz 200 after {}",
            plan.pending,
            ms(started),
            ms(healthy)
        );
        results.push(("in-process cold".to_owned(), healthy));
        let (healthy, started) = start_in_process(&config).await;
        println!(
            "agent[start, {} pending]: in-process warm: Agent::start {}, /healthz 200 after {}",
            plan.pending,
            ms(started),
            ms(healthy)
        );
        results.push(("in-process warm".to_owned(), healthy));
        for (name, store) in [("outpost run cold", "copy"), ("outpost run warm", "copy")] {
            let healthy = start_binary(dir.path(), store, CACHE_BYTES).await;
            println!(
                "agent[start, {} pending]: {name}: /healthz 200 after {} (from spawn)",
                plan.pending,
                ms(healthy)
            );
            results.push((name.to_owned(), healthy));
        }
    });
    results
}

/// One `outpost run` of (c).
struct RssCase {
    name: &'static str,
    cache_bytes: u64,
    /// An environment variable for the process.
    env: Option<(&'static str, &'static str)>,
    /// Deliver to the in-process receiver (else the destination is down).
    deliver: bool,
}

struct RssResult {
    name: &'static str,
    ready: Duration,
    /// (seconds after healthy, VmHWM KiB) at each checkpoint.
    hwm: Vec<(f64, u64)>,
    rss: u64,
    delivered: u64,
}

/// Runs `outpost run` for every case at once, each on its own copy of `pristine` (copied before
/// any open, so every run recovers the store cold), waits until each serves `/healthz`, then
/// idles `idle`, reading VmHWM at each of `checkpoints` (seconds after all were healthy).
/// The runs start side by side, so their times to `/healthz` include waiting for each other.
async fn rss_runs(
    dir: &Path,
    pristine: &Path,
    cases: &[RssCase],
    idle: Duration,
    checkpoints: &[f64],
    receiver: &Receiver,
) -> Vec<RssResult> {
    let mut running = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let home = dir.join(format!("run{i}"));
        std::fs::create_dir_all(&home).unwrap();
        let status = Command::new("cp")
            .arg("-a")
            .arg(pristine)
            .arg(home.join("store"))
            .status()
            .unwrap();
        assert!(status.success());
        let port = free_port();
        let (endpoint, auth) = if case.deliver {
            let base = receiver.base_url();
            let auth = format!(
                "type = \"oauth2_client_credentials\"\nauth_endpoint = \"{base}/oauth/token\"\nclient_id = \"edge-agent\"\nclient_secret = \"change-me\""
            );
            (base, auth)
        } else {
            (DOWN.to_owned(), AUTH_NONE.to_owned())
        };
        let text = config_text(
            &endpoint,
            &auth,
            &tiny_mapping_toml(),
            &format!("127.0.0.1:{port}"),
            &format!("cache_bytes = {}", case.cache_bytes),
        );
        let (config_path, _) = write_config(&home, "outpost.toml", &text);
        let mut command = Command::new(env!("CARGO_BIN_EXE_outpost"));
        command
            .arg("--config")
            .arg(&config_path)
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(home.join("run.log")).unwrap());
        if let Some((name, value)) = case.env {
            command.env(name, value);
        }
        let start = Instant::now();
        let child = command.spawn().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        running.push((home, child, addr, start));
    }
    let mut readies = Vec::new();
    for (_, child, addr, start) in running.iter_mut() {
        readies.push(wait_healthy(*addr, *start, Some(child)).await);
    }
    let before = receiver.export_arrivals();
    let healthy = Instant::now();
    let mut hwms: Vec<Vec<(f64, u64)>> = cases.iter().map(|_| Vec::new()).collect();
    for &at in checkpoints {
        let wait = Duration::from_secs_f64(at).saturating_sub(healthy.elapsed());
        tokio::time::sleep(wait).await;
        for ((_, child, _, _), hwm) in running.iter().zip(hwms.iter_mut()) {
            hwm.push((at, memory_kib(child.id()).0));
        }
    }
    tokio::time::sleep(idle.saturating_sub(healthy.elapsed())).await;
    let delivered = receiver.export_arrivals() - before;
    let mut results = Vec::new();
    for ((case, (home, child, _, _)), (ready, mut hwm)) in
        cases.iter().zip(running).zip(readies.into_iter().zip(hwms))
    {
        let (last_hwm, rss) = memory_kib(child.id());
        hwm.push((idle.as_secs_f64(), last_hwm));
        stop_agent(child);
        wait_unlocked(&home.join("store"));
        results.push(RssResult {
            name: case.name,
            ready,
            hwm,
            rss,
            delivered: if case.deliver { delivered } else { 0 },
        });
    }
    results
}

fn bench_rss(rt: &tokio::runtime::Runtime, plan: &Plan) -> Vec<(String, u64)> {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(DOWN, AUTH_NONE, &tiny_mapping_toml(), "127.0.0.1:0", "");
    let (_, config) = write_config(dir.path(), "outpost.toml", &text);
    let took = prefill(
        &config.storage.path,
        &config.mapping,
        plan.profiles,
        plan.member_every,
    );
    let pending = plan.profiles.div_ceil(plan.member_every);
    let label = format!("{} profiles, {pending} pending", plan.profiles);
    println!(
        "agent[rss, {label}]: pre-fill took {} ({:.0} updates/s), store {:.0} MiB on disk",
        ms(took),
        rate(plan.profiles, took),
        dir_bytes(&config.storage.path) as f64 / (1 << 20) as f64
    );
    let idle_secs = plan.idle.as_secs_f64();
    let mut checkpoints: Vec<f64> = [5.0, 20.0].into_iter().filter(|&s| s < idle_secs).collect();
    let deliver_idle = plan.idle.min(Duration::from_secs(10));
    let mut results = Vec::new();
    rt.block_on(async {
        let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
            .await
            .unwrap();
        let down = [
            RssCase {
                name: "cache 32 MiB (default), destination down",
                cache_bytes: 32 << 20,
                env: None,
                deliver: false,
            },
            RssCase {
                name: "cache 8 MiB, destination down",
                cache_bytes: 8 << 20,
                env: None,
                deliver: false,
            },
            RssCase {
                name: "cache 32 MiB, MALLOC_ARENA_MAX=2, destination down",
                cache_bytes: 32 << 20,
                env: Some(("MALLOC_ARENA_MAX", "2")),
                deliver: false,
            },
        ];
        let delivering = [RssCase {
            name: "cache 32 MiB, delivering to a receiver",
            cache_bytes: 32 << 20,
            env: None,
            deliver: true,
        }];
        let pristine = &config.storage.path;
        let mut all = rss_runs(
            dir.path(),
            pristine,
            &down,
            plan.idle,
            &checkpoints,
            &receiver,
        )
        .await;
        checkpoints.retain(|&s| s < deliver_idle.as_secs_f64());
        all.extend(
            rss_runs(
                dir.path(),
                pristine,
                &delivering,
                deliver_idle,
                &checkpoints,
                &receiver,
            )
            .await,
        );
        for r in all {
            let hwm: Vec<String> = r
                .hwm
                .iter()
                .map(|(at, kib)| format!("{} at {at:.1} s", mib(*kib)))
                .collect();
            let delivered = if r.delivered > 0 {
                format!(", {} delivered meanwhile", r.delivered)
            } else {
                String::new()
            };
            println!(
                "agent[rss, {label}]: {}: healthy after {}; VmHWM {}; VmRSS at end {}{delivered}",
                r.name,
                ms(r.ready),
                hwm.join(", "),
                mib(r.rss)
            );
            let peak = r.hwm.last().map_or(0, |(_, kib)| *kib);
            results.push((r.name.to_owned(), peak));
        }
    });
    results
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then run a tiny smoke test.
    let quick = !std::env::args().any(|a| a == "--bench");
    let plan = if quick {
        Plan {
            pool: 20,
            timed: 1_000,
            pending: 500,
            profiles: 2_000,
            member_every: 10,
            idle: Duration::from_millis(300),
            repeats: 1,
        }
    } else {
        Plan {
            pool: 2_000,
            timed: 50_000,
            pending: 1_000_000,
            profiles: 1_000_000,
            member_every: 10,
            idle: Duration::from_secs(45),
            repeats: REPEATS,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let whole = Instant::now();
    let (one, many, raw, raw_fsync) = bench_ingest(&rt, &plan);
    let section = Instant::now();
    let starts = bench_startup(&rt, &plan);
    println!(
        "agent[start]: section took {:.1} s",
        section.elapsed().as_secs_f64()
    );
    let section = Instant::now();
    let peaks = bench_rss(&rt, &plan);
    println!(
        "agent[rss]: section took {:.1} s",
        section.elapsed().as_secs_f64()
    );
    if quick {
        println!("agent: smoke run done (run with cargo bench to measure)");
        return;
    }
    println!(
        "agent RATIO ingest batch={BATCH}: HTTP/raw = {:.2}, HTTP/raw+fsync = {:.2}, HTTP x{CLIENTS}/raw+fsync = {:.2}  (target >= 0.6 vs raw+fsync: {}, vs raw: {})",
        one / raw,
        one / raw_fsync,
        many / raw_fsync,
        verdict(one / raw_fsync >= 0.6),
        verdict(one / raw >= 0.6)
    );
    for (name, time) in starts {
        println!(
            "agent START {name} with {} pending: {} (target <= 2 s) {}",
            plan.pending,
            ms(time),
            verdict(time <= Duration::from_secs(2))
        );
    }
    for (name, hwm) in peaks {
        println!(
            "agent PEAK RSS {name} ({} profiles, {} pending): {} (target <= 64 MiB) {}",
            plan.profiles,
            plan.profiles.div_ceil(plan.member_every),
            mib(hwm),
            verdict(hwm <= 64 * 1024)
        );
    }
    println!(
        "agent: whole bench took {:.1} s",
        whole.elapsed().as_secs_f64()
    );
}
