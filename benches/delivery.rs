//! Delivery against a local receiver on loopback, all in one run, each figure a ratio:
//!
//! (a) healthy, single-export requests: the agent (default settings: adaptive concurrency up
//!     to 64) vs a durable-relay floor built here (the same pending exports in a sled tree, 8
//!     tasks POST them with hyper, acknowledged keys removed by one writer thread in grouped
//!     `apply_batch`es with one flush per group; request slots never wait for a flush), and vs
//!     a raw hyper POST loop (8 tasks, same bodies and headers, no store). Each run: 20,000
//!     exports pre-filled through `Store::apply_groups`, timed from `Agent::start` until the
//!     receiver answered them all and the outbox is empty.
//!     Each run also prints how many cores the bench process (the agent or the loop, and the
//!     receiver) kept busy.
//! (b) `max_profiles_per_request = 10`: exports/s vs the raw loop's requests/s.
//! (c) a flaky receiver (10% of requests answered 500 at random): exports/s vs a healthy
//!     receiver, both over 200,000 exports, so that exports which failed once come back (after
//!     `initial_backoff_ms`, 1 s) well within the counted span. (Over a run shorter than the
//!     backoff, the 90% mark falls where the first attempts' 90% of successes end, and whether
//!     it waited for a retry was chance.)
//! (d) a rate-limited receiver (token bucket at half the agent's healthy rate, burst of 100 ms,
//!     429 + `Retry-After: 1` above it): accepted exports/s vs the limit, and the share of
//!     requests answered 429.
//! (e) a slow receiver (every answer after 20 ms), default settings: exports/s.
//! (f) the rate of the first deliveries with a small outbox (1,000 and 10,000 pending) and a
//!     large one (1,000,000 pending): time from `Agent::start`'s return (the store open) until
//!     the receiver answered the first 1,000 and 10,000 exports 2xx; also from the call, the
//!     open included. Each the median of five runs, each on its own copy of the pre-filled
//!     store (synced to the disk before the run), in rounds that take each size in turn: the
//!     first thousand take some 30 ms, which one run measures poorly.
//! (g) a fixed window of 2,000 requests a second, its quota advertised in `RateLimit-*`
//!     headers or not: accepted exports/s vs the limit, and the share answered 429.
//!
//! Rates in (c), (d), (e), (g) are counted between the 10% and the 90% marks of the run, so the
//! start (token, first reads) and the tail (exports waiting out a `Retry-After`) do not count.
//!
//! Run: `cargo bench --bench delivery` (`OUTPOST_BENCH_ONLY=healthy` for (a) and (b) alone,
//! `OUTPOST_BENCH_ONLY=flaky` for (c) alone, `OUTPOST_BENCH_ONLY=backlog` for (f) alone,
//! `OUTPOST_BENCH_ONLY=quota` for (g) alone).

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use serde_json::Value;

use outpost::agent::{Agent, AgentOptions};
use outpost::config::Config;
use outpost::receiver::{FixedWindow, RateLimit, Receiver, ReceiverOptions, Reply, Script};

mod common;
use common::{best, http_client, list, ms, prefill, rate, verdict, BusyWatch, HttpClient};

const CONCURRENCY: usize = 8;
/// The agent's `storage.cache_bytes` (the default).
const CACHE_BYTES: u64 = 32 << 20;
/// Updates per `apply_groups` call in the big pre-fill.
const BIG_BATCH: usize = 20_000;
const REPEATS: usize = 2;

/// Writes `<dir>/outpost.toml` and parses it: the agent's config, delivering to `base` with OAuth
/// client credentials and the `[delivery]` lines given (none: the defaults); the store is
/// `<dir>/store`.
fn load_config(dir: &Path, base: &str, delivery: &str) -> Config {
    let text = common::config_text(
        base,
        &common::oauth_auth(base),
        &common::tiny_mapping_toml(),
        "127.0.0.1:0",
        &format!("cache_bytes = {CACHE_BYTES}"),
    ) + &format!("\n[delivery]\n{delivery}\n");
    common::write_config(dir, "outpost.toml", &text).1
}

/// Counts the exports the receiver answered 2xx and notes when the count reached each mark.
#[derive(Default)]
struct Progress {
    count: AtomicU64,
    marks: Mutex<Vec<(u64, Option<Instant>)>>,
}

impl Progress {
    fn reset(&self, marks: &[u64]) {
        *self.marks.lock().unwrap() = marks.iter().map(|&m| (m, None)).collect();
        self.count.store(0, Ordering::SeqCst);
    }

    fn delivered(&self, exports: u64) {
        let n = self.count.fetch_add(exports, Ordering::SeqCst) + exports;
        let mut marks = self.marks.lock().unwrap();
        for (mark, at) in marks.iter_mut() {
            if at.is_none() && *mark <= n {
                *at = Some(Instant::now());
            }
        }
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// When each mark was reached, from `start`.
    fn times(&self, start: Instant) -> Vec<Duration> {
        self.marks
            .lock()
            .unwrap()
            .iter()
            .map(|(mark, at)| {
                at.unwrap_or_else(|| panic!("mark {mark} not reached"))
                    .duration_since(start)
            })
            .collect()
    }
}

/// A receiver counting the exports it accepts; `keep_requests` for runs that read its requests
/// back ([`Receiver::export_requests`]).
async fn start_receiver(keep_requests: bool) -> (Receiver, Arc<Progress>) {
    let options = ReceiverOptions {
        keep_requests,
        ..ReceiverOptions::default()
    };
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), options)
        .await
        .unwrap();
    let progress = Arc::new(Progress::default());
    let hook = Arc::clone(&progress);
    receiver.on_delivered(Arc::new(move |r| {
        // An array body carries several exports, their ids joined by commas in the key.
        let exports = r
            .header("idempotency-key")
            .map_or(1, |key| key.split(',').count());
        hook.delivered(exports as u64)
    }));
    (receiver, progress)
}

/// One agent run on a pre-filled store: times (from just before `Agent::start`) at which the
/// receiver had answered each of `marks` exports, the time `Agent::start` took, and, when
/// `drain`, the time until the outbox was also empty.
struct AgentRun {
    /// The adaptive concurrency limit at the end of the run.
    limit: i64,
    start_took: Duration,
    marks: Vec<Duration>,
    drained: Option<Duration>,
    /// Cores the bench process (agent and receiver) kept busy from the start to the end.
    cores_busy: f64,
}

async fn agent_run(config: &Config, progress: &Progress, marks: &[u64], drain: bool) -> AgentRun {
    let last = *marks.last().unwrap();
    wait_unlocked(&config.storage.path);
    progress.reset(marks);
    let start = Instant::now();
    let watch = BusyWatch::start();
    let agent = Agent::start(
        config,
        AgentOptions {
            // As in production.
            jitter: true,
        },
    )
    .await
    .unwrap();
    let start_took = start.elapsed();
    let deadline = Duration::from_secs(300);
    let drained = loop {
        let reached = progress.count() >= last;
        if reached && !drain {
            break None;
        }
        if reached && agent.store.tally().unwrap().pending == 0 {
            break Some(start.elapsed());
        }
        assert!(
            start.elapsed() < deadline,
            "agent run timed out: {} delivered",
            progress.count()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let (_, cores_busy) = watch.read();
    let marks = progress.times(start);
    let limit = agent.metrics.concurrency_limit.get();
    agent.stop().await.unwrap();
    AgentRun {
        limit,
        start_took,
        marks,
        drained,
        cores_busy,
    }
}

/// Waits until sled released the lock of the store (see `common::wait_unlocked`), saying so when
/// that took a while.
fn wait_unlocked(store: &Path) {
    let waited = common::wait_unlocked(store);
    if waited > Duration::from_millis(5) {
        println!(
            "  (waited {} for sled to release the lock of the dropped store)",
            ms(waited)
        );
    }
}

async fn fetch_token(client: &HttpClient, base: &str) -> String {
    let request = hyper::Request::post(format!("{base}/oauth/token"))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from_static(
            b"grant_type=client_credentials&client_id=edge-agent&client_secret=change-me",
        )))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let value: Value = serde_json::from_slice(&body).unwrap();
    value["access_token"].as_str().unwrap().to_owned()
}

/// POSTs every payload once, `CONCURRENCY` at a time; returns the time taken and the cores the
/// process (this client and the receiver) kept busy meanwhile.
async fn raw_run(base: &str, payloads: &Arc<Vec<(String, Bytes)>>) -> (Duration, f64) {
    let client = http_client();
    let token = fetch_token(&client, base).await;
    let bearer = format!("Bearer {token}");
    let uri: hyper::Uri = format!("{base}/profiles?source=edge").parse().unwrap();
    let user_agent = concat!("outpost/", env!("CARGO_PKG_VERSION"));
    let next = Arc::new(AtomicUsize::new(0));
    let watch = BusyWatch::start();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (client, payloads, next) = (client.clone(), Arc::clone(payloads), next.clone());
            let (uri, bearer) = (uri.clone(), bearer.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((key, payload)) = payloads.get(i) else {
                        break;
                    };
                    let request = hyper::Request::post(uri.clone())
                        .header(CONTENT_TYPE, "application/json")
                        .header(USER_AGENT, user_agent)
                        .header("idempotency-key", key.as_str())
                        .header(AUTHORIZATION, bearer.as_str())
                        .body(Full::new(payload.clone()))
                        .unwrap();
                    let response = client.request(request).await.unwrap();
                    assert_eq!(response.status(), 200);
                    response.into_body().collect().await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    watch.read()
}

/// The durable-relay floor: the same payloads in a plain sled tree; `CONCURRENCY` tasks read
/// and POST them in order; one writer thread removes acknowledged keys in grouped batches with
/// one flush (and an fsync of the log, as the agent does) per group. Returns the time until
/// every removal is durable, and the cores the process kept busy meanwhile.
async fn floor_run(base: &str, payloads: &Arc<Vec<(String, Bytes)>>) -> (Duration, f64) {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path())
        .cache_capacity(CACHE_BYTES)
        .mode(sled::Mode::HighThroughput)
        .open()
        .unwrap();
    let tree = db.open_tree("outbox").unwrap();
    for (i, (_, payload)) in payloads.iter().enumerate() {
        tree.insert((i as u64).to_be_bytes(), payload.as_ref())
            .unwrap();
    }
    db.flush().unwrap();
    let log = std::fs::File::open(dir.path().join("db")).unwrap();
    let client = http_client();
    let bearer = format!("Bearer {}", fetch_token(&client, base).await);
    let uri: hyper::Uri = format!("{base}/profiles?source=edge").parse().unwrap();
    let user_agent = concat!("outpost/", env!("CARGO_PKG_VERSION"));
    let n = payloads.len();
    let watch = BusyWatch::start();
    let (acked, removals) = std::sync::mpsc::channel::<u64>();
    let writer = {
        let (db, tree) = (db.clone(), tree.clone());
        std::thread::spawn(move || {
            let mut removed = 0;
            while removed < n {
                let first = removals.recv().unwrap();
                let mut batch = sled::Batch::default();
                batch.remove(&first.to_be_bytes());
                removed += 1;
                while let Ok(more) = removals.try_recv() {
                    batch.remove(&more.to_be_bytes());
                    removed += 1;
                }
                tree.apply_batch(batch).unwrap();
                db.flush().unwrap();
                log.sync_data().unwrap();
            }
        })
    };
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (client, next, tree, acked) =
                (client.clone(), next.clone(), tree.clone(), acked.clone());
            let (uri, bearer, payloads) = (uri.clone(), bearer.clone(), Arc::clone(payloads));
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let body = tree.get((i as u64).to_be_bytes()).unwrap().unwrap();
                    let request = hyper::Request::post(uri.clone())
                        .header(CONTENT_TYPE, "application/json")
                        .header(USER_AGENT, user_agent)
                        .header("idempotency-key", payloads[i].0.as_str())
                        .header(AUTHORIZATION, bearer.as_str())
                        .body(Full::new(Bytes::copy_from_slice(&body)))
                        .unwrap();
                    let response = client.request(request).await.unwrap();
                    assert_eq!(response.status(), 200);
                    response.into_body().collect().await.unwrap();
                    acked.send(i as u64).unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap();
    let (took, cores) = watch.read();
    assert!(tree.is_empty());
    (took, cores)
}

/// (a) and (b): the agent (single exports, then arrays of 10) vs the floor and the raw loop.
struct Healthy {
    agent: f64,
    /// With `max_concurrency` = the floor's concurrency.
    agent_8: f64,
    batched: f64,
    floor: f64,
    raw: f64,
}

async fn bench_healthy(n: usize, repeats: usize) -> Healthy {
    let (receiver, progress) = start_receiver(false).await;
    let base = receiver.base_url();
    let (mut agent, mut agent_8, mut batched, mut floor, mut raw) =
        (vec![], vec![], vec![], vec![], vec![]);
    let same_concurrency = format!("max_concurrency = {CONCURRENCY}");
    for _ in 0..repeats {
        for (delivery, rates) in [
            ("", &mut agent),
            (same_concurrency.as_str(), &mut agent_8),
            ("max_profiles_per_request = 10", &mut batched),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let config = load_config(dir.path(), &base, delivery);
            let (took, payloads) =
                prefill(&config.storage.path, &config.mapping, n, 1, 1_000, true);
            let run = agent_run(&config, &progress, &[n as u64], true).await;
            let drained = run.drained.unwrap();
            rates.push(rate(n, drained));
            println!(
                "delivery[healthy{}]: pre-fill {n} in {}, avg payload {} B; start {}, {n} delivered and outbox empty after {} ({:.0}/s, {:.2} cores busy), concurrency limit at the end {}",
                if delivery.is_empty() { String::new() } else { format!(", {delivery}") },
                ms(took),
                payloads.iter().map(|(_, p)| p.len()).sum::<usize>() / n,
                ms(run.start_took),
                ms(drained),
                rate(n, drained),
                run.cores_busy,
                run.limit,
            );
            if delivery.is_empty() {
                let payloads = Arc::new(payloads);
                let before = progress.count();
                let (f, floor_busy) = floor_run(&base, &payloads).await;
                let (r, raw_busy) = raw_run(&base, &payloads).await;
                assert_eq!(progress.count() - before, 2 * n as u64);
                floor.push(rate(n, f));
                raw.push(rate(n, r));
                println!(
                    "delivery[healthy]: floor {} ({:.0}/s, {floor_busy:.2} cores busy), raw {} ({:.0}/s, {raw_busy:.2} cores busy)",
                    ms(f),
                    rate(n, f),
                    ms(r),
                    rate(n, r)
                );
            }
        }
    }
    let h = Healthy {
        agent: best(&agent),
        agent_8: best(&agent_8),
        batched: best(&batched),
        floor: best(&floor),
        raw: best(&raw),
    };
    println!(
        "delivery[healthy, {n} exports, best of {repeats}]: agent {:.0}/s [{}], agent with max_concurrency {CONCURRENCY} {:.0}/s [{}], arrays of 10 {:.0} exports/s [{}], floor (sled + hyper, concurrency {CONCURRENCY}) {:.0}/s [{}], raw hyper {:.0} requests/s [{}]",
        h.agent,
        list(&agent),
        h.agent_8,
        list(&agent_8),
        h.batched,
        list(&batched),
        h.floor,
        list(&floor),
        h.raw,
        list(&raw),
    );
    h
}

/// Where a [`scenario`] run ends.
#[derive(Clone, Copy, PartialEq)]
enum End {
    /// When the outbox is empty; the receiver keeps every request, for their statuses.
    Drained,
    /// At the 90% mark, the receiver keeping no request: the tail of exports that failed
    /// several times in a row, each waiting its own backoff, can take minutes.
    NinetyPercent,
}

/// One run against a receiver with `script`: exports/s between the 10% and 90% marks, and the
/// export requests the receiver got with their statuses (none kept for `End::NinetyPercent`).
async fn scenario(
    name: &str,
    n: usize,
    script: Option<Script>,
    delivery: &str,
    end: End,
) -> (f64, Vec<u16>) {
    let drain = end == End::Drained;
    let (receiver, progress) = start_receiver(drain).await;
    receiver.set_export_script(script);
    let dir = tempfile::tempdir().unwrap();
    let config = load_config(dir.path(), &receiver.base_url(), delivery);
    prefill(&config.storage.path, &config.mapping, n, 1, 1_000, false);
    let marks = [n as u64 / 10, n as u64 * 9 / 10, n as u64];
    let marks = if drain { &marks[..] } else { &marks[..2] };
    let run = agent_run(&config, &progress, marks, drain).await;
    let middle = rate(n * 8 / 10, run.marks[1] - run.marks[0]);
    let statuses: Vec<u16> = receiver
        .export_requests()
        .iter()
        .map(|r| r.status)
        .collect();
    let end = match run.drained {
        Some(drained) => format!("drained in {}", ms(drained)),
        None => format!("at the 90% mark after {}", ms(run.marks[1])),
    };
    println!(
        "delivery[{name}]: {n} exports, {end}; {middle:.0} exports/s between the 10% and 90% marks; {} requests; concurrency limit at the end {}",
        statuses.len(),
        run.limit
    );
    (middle, statuses)
}

/// (c): exports/s with 10% of requests answered 500, and with none, over `n` exports each.
async fn bench_flaky(n: usize) -> (f64, f64) {
    let flaky: Script = Arc::new(|_, _| {
        if rand::random::<f64>() < 0.1 {
            Reply::Status(500, vec![], "injected failure".into())
        } else {
            Reply::Normal
        }
    });
    let (healthy, _) = scenario("healthy, as the flaky run", n, None, "", End::NinetyPercent).await;
    let (flaky, _) = scenario("flaky, 10% 500", n, Some(flaky), "", End::NinetyPercent).await;
    (flaky, healthy)
}

fn print_flaky_ratio(flaky: f64, healthy: f64) {
    let ratio = flaky / healthy;
    println!(
        "delivery RATIO flaky/healthy = {flaky:.0}/{healthy:.0} = {ratio:.2} (target >= 0.7) {}",
        verdict(ratio >= 0.7)
    );
}

/// (f) runs of each outbox size, for the median of each (odd, so the median is one run's).
const BACKLOG_RUNS: usize = 5;

/// Median rates of (f) for a small, a middling and a large outbox: (from `Agent::start`,
/// from its return), each by mark.
type Backlogs = [(Vec<f64>, Vec<f64>); 3];

/// One outbox size of (f): its pre-filled store, never opened since, and the rates measured.
struct Backlog {
    dir: tempfile::TempDir,
    pending: usize,
    marks: Vec<u64>,
    from_start: Vec<Vec<f64>>,
    after_start: Vec<Vec<f64>>,
}

impl Backlog {
    fn prefill(base: &str, pending: usize, marks: &[u64]) -> Backlog {
        let dir = tempfile::tempdir().unwrap();
        let pristine = dir.path().join("pristine");
        std::fs::create_dir(&pristine).unwrap();
        let batch = if pending > 100_000 { BIG_BATCH } else { 1_000 };
        let config = load_config(&pristine, base, "");
        let (took, _) = prefill(
            &config.storage.path,
            &config.mapping,
            pending,
            1,
            batch,
            false,
        );
        wait_unlocked(&config.storage.path);
        println!(
            "delivery[{pending} pending]: pre-fill took {} ({:.0} exports/s, batches of {batch})",
            ms(took),
            rate(pending, took),
        );
        Backlog {
            dir,
            pending,
            marks: marks.to_vec(),
            from_start: vec![Vec::new(); marks.len()],
            after_start: vec![Vec::new(); marks.len()],
        }
    }

    /// One run of the agent on a copy of the pre-filled store, synced to the disk first so
    /// that writing it back does not fall in the timed span; the copy is removed after.
    async fn run(&mut self, receiver: &Receiver, progress: &Progress, round: usize) {
        let home = self.dir.path().join(format!("run{round}"));
        std::fs::create_dir(&home).unwrap();
        let config = load_config(&home, &receiver.base_url(), "");
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(self.dir.path().join("pristine").join("store"))
            .arg(&config.storage.path)
            .status()
            .unwrap();
        assert!(copied.success());
        let synced = std::process::Command::new("sync")
            .arg("-f")
            .arg(&config.storage.path)
            .status()
            .unwrap();
        assert!(synced.success());
        let agent = agent_run(&config, progress, &self.marks, false).await;
        let mut figures = Vec::new();
        for (i, (&m, &t)) in self.marks.iter().zip(&agent.marks).enumerate() {
            let (r, a) = (rate(m as usize, t), rate(m as usize, t - agent.start_took));
            self.from_start[i].push(r);
            self.after_start[i].push(a);
            figures.push(format!(
                "first {m} after {} ({r:.0}/s; {a:.0}/s counted from Agent::start's return)",
                ms(t)
            ));
        }
        println!(
            "delivery[{} pending]: run {}: Agent::start {}; {}",
            self.pending,
            round + 1,
            ms(agent.start_took),
            figures.join(", ")
        );
        wait_unlocked(&config.storage.path);
        std::fs::remove_dir_all(&home).unwrap();
    }

    fn medians(self) -> (Vec<f64>, Vec<f64>) {
        (
            self.from_start.into_iter().map(median).collect(),
            self.after_start.into_iter().map(median).collect(),
        )
    }
}

/// (f): the three outbox sizes pre-filled, then `runs` rounds, each running the agent once on
/// a copy of each, so that the machine's drift falls on every size alike.
async fn bench_backlogs(
    small: usize,
    mid: usize,
    large: usize,
    first: &[u64; 2],
    runs: usize,
) -> Backlogs {
    assert!(runs % 2 == 1, "an odd number of runs has a median");
    let (receiver, progress) = start_receiver(false).await;
    let base = receiver.base_url();
    let mut backlogs = [
        Backlog::prefill(&base, small, &first[..1]),
        Backlog::prefill(&base, mid, first),
        Backlog::prefill(&base, large, first),
    ];
    for round in 0..runs {
        for backlog in &mut backlogs {
            backlog.run(&receiver, &progress, round).await;
        }
    }
    backlogs.map(Backlog::medians)
}

fn print_backlog_ratios(backlogs: &Backlogs, sizes: [usize; 3], first: [u64; 2], runs: usize) {
    let [small_rates, mid_rates, large_rates] = backlogs;
    let large = sizes[2];
    let smalls = [(small_rates, 0, sizes[0]), (mid_rates, 1, sizes[1])];
    for (i, ((small_rates, j, name), first)) in smalls.into_iter().zip(first).enumerate() {
        let ratio = large_rates.1[i] / small_rates.1[j];
        println!(
            "delivery RATIO large/small, first {first}, medians of {runs} runs counted from Agent::start's return: {large} pending {:.0}/s / {name} pending {:.0}/s = {ratio:.2} (target >= 0.9) {}; counted from the Agent::start call (the open included): {:.0}/s / {:.0}/s = {:.2}",
            large_rates.1[i],
            small_rates.1[j],
            verdict(ratio >= 0.9),
            large_rates.0[i],
            small_rates.0[j],
            large_rates.0[i] / small_rates.0[j],
        );
    }
}

/// (g): a fixed window of `limit` requests a second, its quota advertised in `RateLimit-*`
/// headers or not: exports/s between the 10% and 90% marks, 429s, requests.
async fn bench_quota(limit: u64, n: usize) -> [(bool, f64, usize, usize); 2] {
    let mut runs = [(true, 0.0, 0, 0), (false, 0.0, 0, 0)];
    for (advertise, rate, refused, requests) in &mut runs {
        let window = Arc::new(FixedWindow::new(limit, Duration::from_secs(1), *advertise));
        let name = format!(
            "fixed window {limit}/s, {}",
            if *advertise {
                "advertised"
            } else {
                "unadvertised"
            }
        );
        let (middle, statuses) = scenario(&name, n, Some(window.script()), "", End::Drained).await;
        *rate = middle;
        *refused = statuses.iter().filter(|&&s| s == 429).count();
        *requests = statuses.len();
    }
    runs
}

fn print_quota(limit: u64, runs: &[(bool, f64, usize, usize); 2]) {
    for (advertise, rate, refused, requests) in runs {
        println!(
            "delivery fixed window of {limit}/s, quota {}: {rate:.0} exports/s = {:.2} of the limit; 429s: {refused} of {requests} requests = {:.1}%",
            if *advertise { "advertised" } else { "not advertised" },
            rate / limit as f64,
            *refused as f64 * 100.0 / *requests as f64
        );
    }
}

/// The median of a few rates.
fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then run a tiny smoke test.
    let quick = common::smoke_run();
    let (n_a, repeats, small, mid, large, first) = if quick {
        (200, 1, 100, 300, 2_000, [100u64, 300])
    } else {
        (
            20_000,
            REPEATS,
            1_000,
            10_000,
            1_000_000,
            [1_000u64, 10_000],
        )
    };
    let backlog_runs = if quick { 1 } else { BACKLOG_RUNS };
    let rt = common::runtime();
    let whole = Instant::now();
    let only = std::env::var("OUTPOST_BENCH_ONLY").ok();
    rt.block_on(async {
        if only.as_deref() == Some("backlog") {
            let backlogs = bench_backlogs(small, mid, large, &first, backlog_runs).await;
            if !quick {
                print_backlog_ratios(&backlogs, [small, mid, large], first, backlog_runs);
            }
            return;
        }
        let (quota_limit, quota_n) = if quick { (200, 400) } else { (2_000, 12_000) };
        if only.as_deref() == Some("quota") {
            let quota = bench_quota(quota_limit, quota_n).await;
            print_quota(quota_limit, &quota);
            return;
        }
        if only.as_deref() == Some("flaky") {
            let (flaky, healthy) = bench_flaky(if quick { 400 } else { 200_000 }).await;
            print_flaky_ratio(flaky, healthy);
            return;
        }
        let healthy = bench_healthy(n_a, repeats).await;
        if only.as_deref() == Some("healthy") {
            println!(
                "delivery RATIO agent/floor = {:.2}; max_concurrency {CONCURRENCY}: {:.2}",
                healthy.agent / healthy.floor,
                healthy.agent_8 / healthy.floor
            );
            return;
        }

        let (flaky_rate, flaky_healthy) = bench_flaky(if quick { 400 } else { 200_000 }).await;

        // (d) a token bucket at half the healthy rate.
        let limit = (healthy.agent / 2.0).max(100.0);
        let limited_n = if quick { 400 } else { (limit * 6.0) as usize };
        let bucket = Arc::new(RateLimit::new(limit, limit / 10.0));
        let (limited_rate, statuses) = scenario(
            &format!("rate limit {limit:.0}/s"),
            limited_n,
            Some(bucket.script()),
            "",
            End::Drained,
        )
        .await;
        let refused = statuses.iter().filter(|&&s| s == 429).count();
        let refused_share = refused as f64 / statuses.len() as f64;

        // (e) every answer after 20 ms.
        let slow: Script = Arc::new(|_, _| Reply::Delay(Duration::from_millis(20)));
        let slow_n = if quick { 200 } else { 10_000 };
        let (slow_rate, _) = scenario("slow, 20 ms answers", slow_n, Some(slow), "", End::Drained).await;

        let quota = bench_quota(quota_limit, quota_n).await;

        let backlogs = bench_backlogs(small, mid, large, &first, backlog_runs).await;
        if quick {
            println!("delivery: smoke run done (run with cargo bench to measure)");
            return;
        }
        let ratio = healthy.agent / healthy.floor;
        println!(
            "delivery RATIO agent/floor = {ratio:.2} (target >= 0.8) {}; agent/raw = {:.2}; with max_concurrency {CONCURRENCY} (the floor's): agent/floor = {:.2}",
            verdict(ratio >= 0.8),
            healthy.agent / healthy.raw,
            healthy.agent_8 / healthy.floor,
        );
        let ratio = healthy.batched / healthy.raw;
        println!(
            "delivery RATIO arrays of 10: exports/s / raw requests/s = {ratio:.2} (target >= 1) {}",
            verdict(ratio >= 1.0)
        );
        print_flaky_ratio(flaky_rate, flaky_healthy);
        let ratio = limited_rate / limit;
        println!(
            "delivery RATIO rate-limited/limit = {limited_rate:.0}/{limit:.0} = {ratio:.2} (target >= 0.9) {}; 429s: {refused} of {} requests = {:.1}% (target <= 5%) {}",
            verdict(ratio >= 0.9),
            statuses.len(),
            refused_share * 100.0,
            verdict(refused_share <= 0.05)
        );
        println!(
            "delivery slow receiver (20 ms answers): {slow_rate:.0} exports/s (target >= 2000) {}",
            verdict(slow_rate >= 2000.0)
        );
        print_quota(quota_limit, &quota);
        print_backlog_ratios(&backlogs, [small, mid, large], first, backlog_runs);
    });
    println!(
        "delivery: whole bench took {:.1} s",
        whole.elapsed().as_secs_f64()
    );
}
