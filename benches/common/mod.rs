//! Helpers shared by the benches, each of which includes this file with `mod common;`: the
//! sample data, mappings and configs, store pre-fills, the raw sled baseline, and the formatting
//! of figures. Not every bench uses every helper.
#![allow(dead_code)]

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Map, Value};
use sled::transaction::ConflictableTransactionError;
use sled::Transactional;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use outpost::config::{Config, Mapping};
use outpost::profile::change::is_member_of_any;
use outpost::profile::prune::KeepTree;
use outpost::profile::update::parse_body;
use outpost::profile::{Op, Reason, Update};
use outpost::store::codec;
use outpost::store::committer::Committer;
use outpost::store::{ListFilter, Store};

pub const SEGMENT_A: &str = "7841ba61-23c1-4bb3-a495-00d3g5fe1e93";
pub const SEGMENT_B: &str = "59bd2fkd-3c48-4b18-bf56-4f5c5e6967ae";
/// sled's cache while pre-filling (bigger is faster; the agent opens with its own setting).
pub const PREFILL_CACHE_BYTES: u64 = 256 << 20;

// ---------------------------------------------------------------------------------------------
// Running

/// `cargo bench` passes `--bench`; `cargo test --benches` does not: then a bench only does a
/// tiny smoke run.
pub fn smoke_run() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Figures

pub fn rate(n: usize, time: Duration) -> f64 {
    n as f64 / time.as_secs_f64()
}

/// CPU time (user + system) this process has used so far, all its threads together.
pub fn process_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given, and the zeroed struct is valid anyway.
    let usage = unsafe {
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()), 0);
        usage.assume_init()
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// CPU time (user + system) used so far by each of this process's threads whose name starts
/// with `prefix` (Linux truncates thread names to 15 bytes), by thread id, to the kernel's tick
/// (10 ms here).
pub fn threads_cpu(prefix: &str) -> std::collections::HashMap<u64, Duration> {
    let mut threads = std::collections::HashMap::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(tid) = task.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else {
            continue; // the thread has ended
        };
        if !comm.trim_end().starts_with(prefix) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        threads.insert(tid, stat_cpu(&stat));
    }
    threads
}

/// CPU time (user + system) used so far by process `pid`, all its threads together, to the
/// kernel's tick.
pub fn process_cpu_of(pid: u32) -> Duration {
    stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap())
}

/// utime + stime of a `/proc/…/stat` text.
fn stat_cpu(stat: &str) -> Duration {
    // SAFETY: sysconf only reads a configuration value.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(ticks_per_s > 0, "sysconf(_SC_CLK_TCK) failed");
    // After the name in parentheses: state is field 3, utime 14 and stime 15.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 1000 / ticks_per_s as u64)
}

/// The CPU time the threads of `after` used since `before` (threads that ended meanwhile do
/// not count, threads that started count whole).
pub fn cpu_since(
    before: &std::collections::HashMap<u64, Duration>,
    after: &std::collections::HashMap<u64, Duration>,
) -> Duration {
    after
        .iter()
        .map(|(tid, cpu)| cpu.saturating_sub(before.get(tid).copied().unwrap_or_default()))
        .sum()
}

/// Wall and CPU time since it started: how many cores the process kept busy on average.
pub struct BusyWatch {
    wall: Instant,
    cpu: Duration,
}

impl BusyWatch {
    pub fn start() -> BusyWatch {
        BusyWatch {
            wall: Instant::now(),
            cpu: process_cpu(),
        }
    }

    /// The time since the start, and the cores kept busy meanwhile.
    pub fn read(&self) -> (Duration, f64) {
        let took = self.wall.elapsed();
        let cpu = process_cpu() - self.cpu;
        (took, cpu.as_secs_f64() / took.as_secs_f64())
    }
}

pub fn ms(time: Duration) -> String {
    format!("{:.0} ms", time.as_secs_f64() * 1e3)
}

pub fn best(runs: &[f64]) -> f64 {
    runs.iter().copied().fold(0.0, f64::max)
}

pub fn list(runs: &[f64]) -> String {
    runs.iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn verdict(met: bool) -> &'static str {
    if met {
        "MET"
    } else {
        "NOT MET"
    }
}

// ---------------------------------------------------------------------------------------------
// Sample data and mappings

/// The text of `data/sample-updates.ndjson`.
pub fn sample_text() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/sample-updates.ndjson");
    std::fs::read_to_string(path).expect("reading data/sample-updates.ndjson")
}

/// The sample file cycled to `lines` lines, `p-` ids renamed `p{k}-` on pass k > 0.
pub fn sample_mix(lines: usize) -> String {
    let text = sample_text();
    let sample: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = String::new();
    for (i, line) in sample.iter().cycle().take(lines).enumerate() {
        let pass = i / sample.len();
        if pass == 0 {
            out.push_str(line);
        } else {
            out.push_str(&line.replacen("\"id\":\"p-", &format!("\"id\":\"p{pass}-"), 1));
        }
        out.push('\n');
    }
    out
}

/// The mapping of data/outpost.example.toml (which the sample file is written for) with the
/// attributes `extra` added.
fn example_mapping_with(extra: &[&str]) -> Mapping {
    let attributes: Vec<&str> = [
        "person.name.firstName",
        "person.name.lastName",
        "person.birthDate",
        "personalEmail.address",
    ]
    .iter()
    .chain(extra)
    .copied()
    .collect();
    Mapping::new(
        &attributes,
        &[SEGMENT_A, SEGMENT_B],
        &["ecid", "email_lc_sha256"],
    )
}

/// The mapping of data/outpost.example.toml.
pub fn example_mapping() -> Mapping {
    example_mapping_with(&[])
}

/// The mapping of data/outpost.example.toml plus the home address, so the export is ~600 B.
pub fn full_mapping() -> Mapping {
    example_mapping_with(&["homeAddress"])
}

/// A full-profile sample line of ~1 KB that is a member of a mapped segment.
pub fn template(mapping: &Mapping) -> Map<String, Value> {
    let text = sample_text();
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
pub fn make_update(template: &Map<String, Value>, pool: usize, j: usize) -> Update {
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
        record: None,
        patch_text: None,
    }
}

/// The profile and export values the store writes for a timed update (`make_update` over
/// `pool`), taken from a small real committer run on a store with a cache of `cache_bytes` (so
/// the raw baseline writes the same sizes), and the NDJSON line length of that update.
pub fn value_sizes(
    rt: &tokio::runtime::Runtime,
    template: &Map<String, Value>,
    mapping: &Arc<Mapping>,
    pool: usize,
    cache_bytes: u64,
) -> (Vec<u8>, Vec<u8>, usize) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), cache_bytes).unwrap());
    let (committer, handle) =
        Committer::start(store.clone(), mapping.clone(), Arc::new(Notify::new()));
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
    let stored = store
        .profile_record(&second.id)
        .unwrap()
        .expect("stored profile");
    let profile = codec::encode_profile(&stored);
    let exports = store.list(&ListFilter::default()).unwrap();
    let last = exports.last().expect("an export");
    assert_eq!(last.record.reason(), Reason::Attribute);
    let export = codec::encode_export(&last.record);
    let line_len = serde_json::json!({
        "id": second.id,
        "timestamp": "2026-01-01T00:00:00Z",
        "profile": Value::Object(second.profile.clone()),
    })
    .to_string()
    .len();
    (profile, export, line_len)
}

// ---------------------------------------------------------------------------------------------
// The raw sled baseline

/// A plain `sled::Db` (cache `cache_bytes`, high-throughput mode) with two trees, the profile
/// tree holding `pool` profiles of `profile` bytes before timing.
pub struct RawSled<'a> {
    pub profile: &'a [u8],
    pub export: &'a [u8],
    pub pool: usize,
    pub cache_bytes: u64,
}

impl RawSled<'_> {
    /// Updates/s of `total` updates, `batch` per two-tree transaction: per update a get of the
    /// profile key, an insert of the profile bytes and an insert of the export bytes under a
    /// big-endian u64 key; then `db.flush()` and, with `fsync`, an fsync of `<path>/db` as
    /// `Store::flush` does.
    ///
    /// sled skips a set whose value equals the stored one (`Tree::insert_inner`, 0.34.7: "a
    /// no-op set"), so each profile written has its first 8 bytes XORed with the update's
    /// number + 1: a new value of the same size, as a real update writes, rather than no write.
    pub fn run(&self, batch: usize, total: usize, fsync: bool) -> f64 {
        let (profile, export, pool) = (self.profile, self.export, self.pool);
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path())
            .cache_capacity(self.cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .open()
            .unwrap();
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
        let head = profile
            .get(..8)
            .and_then(|head| head.try_into().ok())
            .map(u64::from_le_bytes)
            .expect("a profile of 8 bytes or more");
        let start = Instant::now();
        let mut done = 0;
        while done < total {
            let n = batch.min(total - done);
            (&profiles, &outbox)
                .transaction(|(p, o)| {
                    let mut value = profile.to_vec();
                    for k in 0..n {
                        let id = ids[(done + k) % pool].as_bytes();
                        std::hint::black_box(p.get(id)?);
                        let stamp = head ^ (done + k + 1) as u64;
                        value[..8].copy_from_slice(&stamp.to_le_bytes());
                        p.insert(id, value.as_slice())?;
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
        let took = start.elapsed();
        if let Some(last) = total.checked_sub(1) {
            let written = profiles.get(ids[last % pool].as_bytes()).unwrap().unwrap();
            let mut expected = profile.to_vec();
            expected[..8].copy_from_slice(&(head ^ total as u64).to_le_bytes());
            assert!(
                *written == *expected,
                "the profiles were not rewritten (sled skips a set of the same value)"
            );
        }
        rate(total, took)
    }
}

// ---------------------------------------------------------------------------------------------
// Agent configs

/// A config whose store is `<dir>/store`; `auth`, `mapping` and `storage` are TOML lines.
pub fn config_text(
    endpoint: &str,
    auth: &str,
    mapping: &str,
    listen: &str,
    storage: &str,
) -> String {
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

pub const AUTH_NONE: &str = "type = \"none\"";

/// OAuth client credentials against the in-process receiver at `base`.
pub fn oauth_auth(base: &str) -> String {
    format!(
        "type = \"oauth2_client_credentials\"\nauth_endpoint = \"{base}/oauth/token\"\nclient_id = \"edge-agent\"\nclient_secret = \"change-me\""
    )
}

/// `full_mapping` as TOML.
pub fn full_mapping_toml() -> String {
    format!(
        r#"attributes = ["person.name.firstName", "person.name.lastName", "person.birthDate", "personalEmail.address", "homeAddress"]
segments = ["{SEGMENT_A}", "{SEGMENT_B}"]
identities = ["ecid", "email_lc_sha256"]"#
    )
}

/// The mapping of the tiny pre-filled profiles (`tiny_update`).
pub fn tiny_mapping_toml() -> String {
    format!(
        r#"attributes = ["person.name.firstName", "person.name.lastName"]
segments = ["{SEGMENT_A}", "{SEGMENT_B}"]
identities = ["ecid"]"#
    )
}

/// Writes `<dir>/<name>` and parses it.
pub fn write_config(dir: &Path, name: &str, text: &str) -> (PathBuf, Config) {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    let config = Config::parse(&path, text).unwrap();
    (path, config)
}

// ---------------------------------------------------------------------------------------------
// Pre-filled stores

/// A tiny first sight of profile `i` with a first name of its own; a member of SEGMENT_A (so it
/// exports) when `member`.
pub fn tiny_update(i: usize, member: bool, keep: &KeepTree) -> Update {
    let id = tiny_id(i);
    let status = if member { "realized" } else { "exited" };
    let Value::Object(mut profile) = json!({
        "person": {"name": {"firstName": format!("Name{i:07}"), "lastName": "Doe"}},
        "identityMap": {"ecid": [{"id": format!("ecid-{id}")}]},
        "segmentMembership": {"ups": {SEGMENT_A: {"status": status, "lastQualificationTime": "2026-01-01T00:00:00Z"}}}
    }) else {
        unreachable!()
    };
    // As the committer does before storing.
    keep.prune(&mut profile);
    Update {
        id,
        op: Op::Upsert,
        profile,
        timestamp: Some(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()),
        record: None,
        patch_text: None,
    }
}

/// The id of tiny profile `i`: distinct for each `i` and in no order, as ECIDs and UUIDs are.
/// Ids numbered in order would keep writing to the same few sled leaves, which stay cached,
/// and hide what a store larger than the cache costs.
pub fn tiny_id(i: usize) -> String {
    format!("p-{:016x}", (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Pre-fills the store at `path` (through `Store::apply_groups`, cache `PREFILL_CACHE_BYTES`)
/// with `profiles` tiny profiles, every `member_every`-th a member with a pending export,
/// `batch` updates per transaction, one flush at the end; the updates are built on another
/// thread meanwhile. Returns the time taken and, when `keep_payloads`, the pending exports as
/// (idempotency key, payload). The store is dropped, not waited for: see `wait_unlocked`.
pub fn prefill(
    path: &Path,
    mapping: &Mapping,
    profiles: usize,
    member_every: usize,
    batch: usize,
    keep_payloads: bool,
) -> (Duration, Vec<(String, Bytes)>) {
    let (took, store) = prefill_updates(path, mapping, profiles, batch, move |i, keep| {
        tiny_update(i, i % member_every == 0, keep)
    });
    assert_eq!(
        store.tally().unwrap().pending as usize,
        profiles.div_ceil(member_every)
    );
    let payloads = if keep_payloads {
        store
            .list(&ListFilter::default())
            .unwrap()
            .into_iter()
            .map(|e| (e.id.to_string(), Bytes::from(e.record.payload)))
            .collect()
    } else {
        Vec::new()
    };
    drop(store);
    (took, payloads)
}

/// Pre-fills the store at `path` with `updates` updates, `backlog_of` profiles each updated in
/// turn with a first name of its own every time, so that every update exports: a backlog of
/// `updates / backlog_of` pending exports a profile, each of about `export_bytes` (a tiny
/// update whose first name is padded). As [`prefill`] otherwise.
pub fn prefill_backlog(
    path: &Path,
    mapping: &Mapping,
    updates: usize,
    backlog_of: usize,
    export_bytes: usize,
    batch: usize,
) -> Duration {
    let (took, store) = prefill_updates(path, mapping, updates, batch, move |i, keep| {
        let mut update = tiny_update(i, true, keep);
        update.id = tiny_id(i % backlog_of);
        let name = &mut update.profile["person"]["name"]["firstName"];
        let padding = export_bytes.saturating_sub(256);
        *name = Value::String(format!("{}{}", name.as_str().unwrap(), "x".repeat(padding)));
        update
    });
    assert_eq!(store.tally().unwrap().pending as usize, updates);
    took
}

/// Applies updates `make(0..updates)`, `batch` to a transaction, built on another thread
/// meanwhile, then flushes; returns the time taken and the open store.
fn prefill_updates(
    path: &Path,
    mapping: &Mapping,
    updates: usize,
    batch: usize,
    make: impl Fn(usize, &KeepTree) -> Update + Send + 'static,
) -> (Duration, Store) {
    let start = Instant::now();
    let (batches, receive) = std::sync::mpsc::sync_channel::<Vec<Update>>(2);
    let builder = {
        let keep = KeepTree::for_mapping(mapping);
        std::thread::spawn(move || {
            let mut done = 0;
            while done < updates {
                let m = batch.min(updates - done);
                let group = (done..done + m).map(|i| make(i, &keep)).collect();
                if batches.send(group).is_err() {
                    return;
                }
                done += m;
            }
        })
    };
    let store = Store::open(path, PREFILL_CACHE_BYTES).unwrap();
    for group in receive {
        store
            .apply_groups(&[group.as_slice()], mapping, Utc::now())
            .unwrap();
    }
    builder.join().unwrap();
    store.flush().unwrap();
    (start.elapsed(), store)
}

/// Waits until no one holds sled's lock on the store (an flock on `<store>/db`): a dropped
/// `sled::Db` (or a stopped agent) releases it a little later, from a background thread.
/// Returns how long it waited.
pub fn wait_unlocked(store: &Path) -> Duration {
    use std::os::fd::AsRawFd;
    let file = File::open(store.join("db")).unwrap();
    let start = Instant::now();
    // SAFETY: flock on a descriptor we own; the lock is released when `file` is closed.
    while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the store at {} stayed locked",
            store.display()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    start.elapsed()
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET /healthz` on a fresh connection; true on a 200.
pub async fn healthz(addr: SocketAddr) -> bool {
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

pub async fn wait_healthy(addr: SocketAddr, start: Instant, child: Option<&mut Child>) -> Duration {
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
pub fn spawn_agent(config: &Path, log: &Path) -> Child {
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
pub fn stop_agent(mut child: Child) {
    // SAFETY: a plain kill(2) of our own child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "the process exited with {status}");
}

/// (VmHWM, VmRSS) of a process, in KiB.
pub fn memory_kib(pid: u32) -> (u64, u64) {
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

// ---------------------------------------------------------------------------------------------
// HTTP

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn http_client() -> HttpClient {
    let mut http = HttpConnector::new();
    // As the agent's client does.
    http.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(http)
}

/// NDJSON request bodies of `batch` updates each.
pub fn ndjson_bodies<'a>(updates: impl Iterator<Item = &'a Update>, batch: usize) -> Vec<Bytes> {
    let updates: Vec<&Update> = updates.collect();
    updates
        .chunks(batch)
        .map(|chunk| {
            let mut body = String::new();
            for update in chunk {
                body.push_str(&update.to_value().to_string());
                body.push('\n');
            }
            Bytes::from(body)
        })
        .collect()
}

/// POSTs one NDJSON body to an ingest API; it must answer 200. Returns the answer's JSON
/// (outpost's summary), or null for an empty answer (as Vector's `http_server` source gives).
pub async fn post_updates(client: &HttpClient, uri: &hyper::Uri, body: Bytes) -> Value {
    let request = hyper::Request::post(uri.clone())
        .header(hyper::header::CONTENT_TYPE, "application/x-ndjson")
        .body(Full::new(body))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    if body.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(&body).unwrap()
}

/// POSTs `bodies` from `clients` concurrent clients (body i from client i mod `clients`);
/// returns the exports the answers reported (0 for an answer without a summary) and how long
/// it took.
pub async fn post_concurrently(
    client: &HttpClient,
    uri: &hyper::Uri,
    bodies: Vec<Bytes>,
    clients: usize,
) -> (u64, Duration) {
    let mut per_client: Vec<Vec<Bytes>> = (0..clients).map(|_| Vec::new()).collect();
    for (i, body) in bodies.into_iter().enumerate() {
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
                    let answer = post_updates(&client, &uri, body).await;
                    exports += answer.get("exports").and_then(Value::as_u64).unwrap_or(0);
                }
                exports
            })
        })
        .collect();
    let mut exports = 0;
    for task in tasks {
        exports += task.await.unwrap();
    }
    (exports, start.elapsed())
}
