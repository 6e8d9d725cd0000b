//! Delivery throughput of the agent, against a raw hyper client and across outbox sizes.
//!
//! (a) agent vs raw, same receiver, same concurrency (8), same payload bytes: a store is
//!     pre-filled through `Store::apply_groups` (batches of 1,000) with 20,000 pending exports,
//!     one per profile (first sights of members of a mapped segment, distinct first names), and
//!     dropped; then the timer starts, `Agent::start` opens that store and delivers to an
//!     in-process `Receiver` (OAuth client credentials), and the timer stops when the receiver
//!     answered 20,000 exports 2xx and `tally().pending` is 0. Raw: a hyper-util legacy client
//!     with 8 tasks POSTs the same 20,000 payloads (with a Bearer token got from `/oauth/token`
//!     beforehand, and the same headers as the agent) to the same receiver.
//! (b) the rate of the first deliveries with a small outbox (1,000 and 10,000 pending) and a
//!     large one (1,000,000 pending, pre-filled in batches of 20,000): time from `Agent::start`
//!     (store open included) until the receiver answered the first 1,000 and the first 10,000
//!     exports 2xx. The large store is opened for the first time since it was written, so sled
//!     (0.34, which writes its snapshot only when it opens a store) replays the whole log: the
//!     "restart after a big ingest" case. Also shown: the rate counted from `Agent::start`'s
//!     return.
//!
//! Prints exports/s for each and the RATIOs agent/raw (target >= 0.8) and large/small
//! (target >= 0.9), and how long the 1,000,000-export pre-fill took.
//!
//! Run: `cargo bench --bench delivery`.

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
use outpost::receiver::{Receiver, ReceiverOptions};

mod common;
use common::{best, http_client, list, ms, prefill, rate, verdict, HttpClient};

const CONCURRENCY: usize = 8;
/// The agent's `storage.cache_bytes` (the default).
const CACHE_BYTES: u64 = 32 << 20;
/// Updates per `apply_groups` call in the big pre-fill.
const BIG_BATCH: usize = 20_000;
const REPEATS: usize = 2;

/// Writes `<dir>/outpost.toml` and parses it: the agent's config, delivering to `base` with OAuth
/// client credentials, 8 at a time; the store is `<dir>/store`.
fn load_config(dir: &Path, base: &str) -> Config {
    let text = common::config_text(
        base,
        &common::oauth_auth(base),
        &common::tiny_mapping_toml(),
        "127.0.0.1:0",
        &format!("cache_bytes = {CACHE_BYTES}"),
    ) + &format!("\n[delivery]\nconcurrency = {CONCURRENCY}\n");
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

    fn delivered(&self) {
        let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        let mut marks = self.marks.lock().unwrap();
        for (mark, at) in marks.iter_mut() {
            if *mark == n {
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

async fn start_receiver() -> (Receiver, Arc<Progress>) {
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
        .await
        .unwrap();
    let progress = Arc::new(Progress::default());
    let hook = Arc::clone(&progress);
    receiver.on_delivered(Arc::new(move |_| hook.delivered()));
    (receiver, progress)
}

/// One agent run on a pre-filled store: times (from just before `Agent::start`) at which the
/// receiver had answered each of `marks` exports, the time `Agent::start` took, and, when
/// `drain`, the time until the outbox was also empty.
struct AgentRun {
    start_took: Duration,
    marks: Vec<Duration>,
    drained: Option<Duration>,
}

async fn agent_run(config: &Config, progress: &Progress, marks: &[u64], drain: bool) -> AgentRun {
    let last = *marks.last().unwrap();
    wait_unlocked(&config.storage.path);
    progress.reset(marks);
    let start = Instant::now();
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
    let marks = progress.times(start);
    agent.stop().await.unwrap();
    AgentRun {
        start_took,
        marks,
        drained,
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

/// POSTs every payload once, `CONCURRENCY` at a time; returns the time taken.
async fn raw_run(base: &str, payloads: &Arc<Vec<(String, Bytes)>>) -> Duration {
    let client = http_client();
    let token = fetch_token(&client, base).await;
    let bearer = format!("Bearer {token}");
    let uri: hyper::Uri = format!("{base}/profiles?source=edge").parse().unwrap();
    let user_agent = concat!("outpost/", env!("CARGO_PKG_VERSION"));
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
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
    start.elapsed()
}

/// (a): agent vs raw client, same receiver, same payloads.
async fn bench_vs_raw(n: usize, repeats: usize) -> (f64, f64) {
    let (receiver, progress) = start_receiver().await;
    let base = receiver.base_url();
    let mut agent_rates = Vec::new();
    let mut raw_rates = Vec::new();
    for _ in 0..repeats {
        let dir = tempfile::tempdir().unwrap();
        let config = load_config(dir.path(), &base);
        let (took, payloads) = prefill(&config.storage.path, &config.mapping, n, 1, 1_000, true);
        let bytes: usize = payloads.iter().map(|(_, p)| p.len()).sum();
        let run = agent_run(&config, &progress, &[n as u64], true).await;
        let drained = run.drained.unwrap();
        agent_rates.push(rate(n, drained));
        let payloads = Arc::new(payloads);
        let before = progress.count();
        let raw = raw_run(&base, &payloads).await;
        assert_eq!(progress.count() - before, n as u64);
        raw_rates.push(rate(n, raw));
        println!(
            "delivery[vs raw]: pre-fill {n} in {}, avg payload {} B; agent: start {}, {n} delivered and outbox empty after {} ({:.0}/s); raw: {} ({:.0}/s)",
            ms(took),
            bytes / n,
            ms(run.start_took),
            ms(drained),
            rate(n, drained),
            ms(raw),
            rate(n, raw),
        );
    }
    let (a, r) = (best(&agent_rates), best(&raw_rates));
    println!(
        "delivery[vs raw, {n} exports, concurrency {CONCURRENCY}]: agent {a:.0} exports/s [{}]  raw hyper {r:.0} exports/s [{}]  (best of {repeats})",
        list(&agent_rates),
        list(&raw_rates)
    );
    (a, r)
}

/// (b): the rate of the first `marks` deliveries with `pending` exports in the store.
async fn bench_first(
    receiver: &Receiver,
    progress: &Progress,
    pending: usize,
    marks: &[u64],
) -> (Vec<f64>, Vec<f64>) {
    let dir = tempfile::tempdir().unwrap();
    let config = load_config(dir.path(), &receiver.base_url());
    let batch = if pending > 100_000 { BIG_BATCH } else { 1_000 };
    let (took, _) = prefill(
        &config.storage.path,
        &config.mapping,
        pending,
        1,
        batch,
        false,
    );
    let run = agent_run(&config, progress, marks, false).await;
    let rates: Vec<f64> = marks
        .iter()
        .zip(&run.marks)
        .map(|(&m, &t)| rate(m as usize, t))
        .collect();
    let after_start: Vec<f64> = marks
        .iter()
        .zip(&run.marks)
        .map(|(&m, &t)| rate(m as usize, t - run.start_took))
        .collect();
    let figures: Vec<String> = marks
        .iter()
        .zip(&run.marks)
        .zip(&rates)
        .zip(&after_start)
        .map(|(((&m, &t), r), a)| {
            format!(
                "first {m} after {} ({r:.0}/s; {a:.0}/s counted from Agent::start's return)",
                ms(t)
            )
        })
        .collect();
    println!(
        "delivery[{pending} pending]: pre-fill took {} ({:.0} exports/s, batches of {batch}); Agent::start {}; {}",
        ms(took),
        rate(pending, took),
        ms(run.start_took),
        figures.join(", ")
    );
    drop(config);
    let start = Instant::now();
    drop(dir);
    if pending > 100_000 {
        println!(
            "delivery[{pending} pending]: removing the store took {}",
            ms(start.elapsed())
        );
    }
    (rates, after_start)
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
    let rt = common::runtime();
    let whole = Instant::now();
    rt.block_on(async {
        let (agent, raw) = bench_vs_raw(n_a, repeats).await;

        let (receiver, progress) = start_receiver().await;
        let small_rates = bench_first(&receiver, &progress, small, &first[..1]).await;
        let mid_rates = bench_first(&receiver, &progress, mid, &first).await;
        let large_rates = bench_first(&receiver, &progress, large, &first).await;
        if quick {
            println!("delivery: smoke run done (run with cargo bench to measure)");
            return;
        }
        println!(
            "delivery RATIO agent/raw = {:.2} (target >= 0.8) {}",
            agent / raw,
            verdict(agent / raw >= 0.8)
        );
        let smalls = [(&small_rates, 0, small), (&mid_rates, 1, mid)];
        for (i, ((small_rates, j, name), first)) in smalls.into_iter().zip(first).enumerate() {
            let ratio = large_rates.0[i] / small_rates.0[j];
            println!(
                "delivery RATIO large/small, first {first}: {large} pending {:.0}/s / {name} pending {:.0}/s = {ratio:.2} (target >= 0.9) {}; counted from Agent::start's return: {:.0}/s / {:.0}/s = {:.2}",
                large_rates.0[i],
                small_rates.0[j],
                verdict(ratio >= 0.9),
                large_rates.1[i],
                small_rates.1[j],
                large_rates.1[i] / small_rates.1[j],
            );
        }
    });
    println!(
        "delivery: whole bench took {:.1} s",
        whole.elapsed().as_secs_f64()
    );
}
