//! A soak test, not run by default: `cargo test --test soak -- --ignored soak` (or
//! `cargo test -- --ignored soak`). The real agent runs for `OUTPOST_SOAK_S` seconds (default
//! 300) against a receiver that fails 10% of requests and whose tokens live 2 s, while a
//! producer posts batches of updates to 500 profiles without pause. Every minute-ish it
//! checks the agent's resident memory; at the end, that every acknowledged version arrived,
//! none of a profile after a newer one, the outbox is empty, memory did not keep growing, and
//! SIGTERM exits 0.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::agent_process::{free_port, AgentProcess};
use common::*;
use outpost::receiver::{Receiver, ReceiverOptions};

const PROFILES: usize = 500;
const BATCH: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak test: minutes long; run with --ignored soak"]
async fn soak() {
    let seconds: u64 = std::env::var("OUTPOST_SOAK_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let receiver = Receiver::start(
        "127.0.0.1:0".parse().unwrap(),
        ReceiverOptions {
            token_lifetime: Duration::from_secs(2),
            fail_share: 0.1,
            ..ReceiverOptions::default()
        },
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = receiver.base_url();
    let config = dir.path().join("outpost.toml");
    std::fs::write(
        &config,
        agent_config_text(&base, &oauth_body(&base), "").replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        ),
    )
    .unwrap();
    let mut agent = AgentProcess::start_with_env(&config, port, &[("OUTPOST_LOG", "warn")]).await;

    let started = Instant::now();
    let mut version = 0usize;
    let mut latest: HashMap<String, usize> = HashMap::new();
    let mut samples: Vec<u64> = Vec::new();
    let mut next_sample = Instant::now() + Duration::from_secs(10);
    while started.elapsed() < Duration::from_secs(seconds) {
        let lines: Vec<String> = (0..BATCH)
            .map(|i| {
                let p = (version * BATCH + i) % PROFILES;
                member_update(
                    &format!("p{p}"),
                    &format!("v{version}"),
                    "2026-01-01T00:00:00Z",
                )
            })
            .collect();
        let (status, body) = http_post(agent.addr, "/v1/updates", lines.join("\n"), &[]).await;
        match status {
            200 => {
                for i in 0..BATCH {
                    latest.insert(format!("p{}", (version * BATCH + i) % PROFILES), version);
                }
                version += 1;
            }
            503 => tokio::time::sleep(Duration::from_millis(200)).await,
            other => panic!("ingest answered {other}: {body}"),
        }
        if Instant::now() >= next_sample {
            samples.push(resident_kib(agent.pid()));
            next_sample += Duration::from_secs(30);
        }
    }

    // The backlog drains as fast as this machine delivers, so the wait is not bounded by a
    // time but by progress: when no profile's newest delivered version rises for a minute
    // (a loop stuck, or one sending the same exports again and again), the test fails.
    let mut newest: HashMap<String, usize> = HashMap::new();
    let (mut read, mut deliveries_read, mut last_progress) = (0, 0, Instant::now());
    loop {
        let requests = receiver.export_requests_from(read);
        read += requests.len();
        let mut rose = false;
        for r in requests.iter().filter(|r| (200..300).contains(&r.status)) {
            deliveries_read += 1;
            let payload = r.json().unwrap();
            let name = payload["person"]["name"]["firstName"].as_str().unwrap();
            let v: usize = name.trim_start_matches('v').parse().unwrap();
            let profile = profile_of(&payload);
            if newest.get(&profile).is_none_or(|&known| v > known) {
                newest.insert(profile, v);
                rose = true;
            }
        }
        if rose {
            last_progress = Instant::now();
        }
        let behind: Vec<_> = latest
            .iter()
            .filter(|(p, v)| newest.get(*p) != Some(v))
            .map(|(p, v)| (p, *v, newest.get(p).copied()))
            .collect();
        if behind.is_empty() {
            break;
        }
        assert!(
            last_progress.elapsed() < Duration::from_secs(60),
            "no newer version delivered for 60 s with {} of {} profiles behind, after {version} \
             batches and {deliveries_read} deliveries; for example (profile, latest, newest delivered): {:?}",
            behind.len(),
            latest.len(),
            &behind[..behind.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deliveries: Vec<(String, String)> = receiver
        .delivered()
        .iter()
        .map(|r| {
            (
                profile_of(&r.json().unwrap()),
                r.header("idempotency-key").unwrap().to_owned(),
            )
        })
        .collect();
    assert_per_profile_order(&deliveries);
    let first = samples.iter().copied().take(2).max().unwrap_or(0);
    let last = samples.last().copied().unwrap_or(0);
    eprintln!(
        "soak: {seconds} s, {version} batches of {BATCH}, {} deliveries, RSS samples (KiB) {samples:?}",
        deliveries.len()
    );
    assert!(
        first == 0 || last < first * 2 + 32 * 1024,
        "resident memory kept growing: {samples:?}"
    );
    agent.terminate().await;
}
