//! End to end under SIGKILL: the real binary ingests batches over HTTP and delivers them to a
//! faulty receiver with short-lived tokens, and is killed at random instants, over and over:
//! first while ingesting, then while only delivering (where nothing but delivery flushes).
//! The producer resends what was not acknowledged. At the end every export that the
//! acknowledged updates call for arrived with the right payload, no export of a profile arrived
//! after a newer one, and the outbox is empty.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::agent_process::{free_port, AgentProcess};
use common::*;
use outpost::receiver::{Receiver, ReceiverOptions, Reply};
use outpost::store::committer::REQUEST_CHUNK;
use rand::Rng;
use serde_json::json;

/// The shape of one run: profiles × versions updates; kills while ingesting (the endpoint
/// down, so the outbox fills), then while only delivering.
struct Run {
    profiles: usize,
    versions: usize,
    ingest_kills: usize,
    delivery_kills: usize,
}

/// POSTs a batch of update lines to the agent's ingest API.
async fn try_post(addr: std::net::SocketAddr, body: String) -> Result<(u16, String), String> {
    try_http_post(addr, "/v1/updates", body, &[]).await
}

async fn start_agent(config: &std::path::Path, addr: std::net::SocketAddr) -> AgentProcess {
    AgentProcess::start_with_env(config, addr.port(), &[("OUTPOST_LOG", "warn")]).await
}

/// Version `v` of profile `p`: every version changes the first name, so every one exports.
fn version_line(p: usize, v: usize) -> String {
    member_update(
        &format!("p{p}"),
        &format!("p{p}-v{v}"),
        &format!("2026-01-01T00:{:02}:00Z", v),
    )
}

fn expected_payload(p: usize, v: usize) -> serde_json::Value {
    json!({
        "person": {"name": {"firstName": format!("p{p}-v{v}"), "lastName": "Doe"}},
        "segmentMembership": {"ups": {SEGMENT_A: {"status": "realized", "lastQualificationTime": "2026-01-01T00:00:00Z"}}},
        "identityMap": {"ecid": [{"id": format!("ecid-p{p}")}]}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_export_arrives_in_order_across_sigkills() {
    run(Run {
        profiles: 24,
        versions: 12,
        ingest_kills: 14,
        delivery_kills: 10,
    })
    .await;
}

/// The same, 110 SIGKILLs long: `cargo test -- --ignored soak` (about half a minute here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak test: minutes long; run with --ignored soak"]
async fn soak_sigkills_while_ingesting_and_delivering() {
    run(Run {
        profiles: 60,
        versions: 40,
        ingest_kills: 60,
        delivery_kills: 50,
    })
    .await;
}

async fn run(shape: Run) {
    let Run {
        profiles,
        versions,
        ingest_kills,
        delivery_kills,
    } = shape;
    let options = ReceiverOptions {
        token_lifetime: Duration::from_secs(2),
        fail_share: 0.15,
        ..ReceiverOptions::default()
    };
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), options)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let base = receiver.base_url();
    let text = agent_config_text(&base, &oauth_body(&base), "")
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{addr}\""));
    let config = dir.path().join("outpost.toml");
    std::fs::write(&config, text).unwrap();

    // Batches of 2 updates, a few ms apart, so that ingest spans several kills; versions in
    // order per profile.
    let lines: Vec<String> = (0..versions)
        .flat_map(|v| (0..profiles).map(move |p| version_line(p, v)))
        .collect();
    let batches: Vec<String> = lines.chunks(2).map(|c| c.join("\n")).collect();
    let mut next_batch = 0;
    let mut rng = rand::thread_rng();

    receiver.set_export_script(Some(outpost::receiver::down()));
    // Kills that landed with some of this run's batches acknowledged and more to send.
    let mut kills_mid_ingest = 0;
    for _ in 0..ingest_kills {
        let agent = start_agent(&config, addr).await;
        let batch_before = next_batch;
        let kill_at = tokio::time::Instant::now() + Duration::from_millis(rng.gen_range(20..300));
        while next_batch < batches.len() && tokio::time::Instant::now() < kill_at {
            match tokio::time::timeout_at(kill_at, try_post(addr, batches[next_batch].clone()))
                .await
            {
                Ok(Ok((200, _))) => {
                    next_batch += 1;
                    tokio::time::sleep(Duration::from_millis(rng.gen_range(0..8))).await;
                }
                Ok(Ok((status, body))) => panic!("ingest answered {status}: {body}"),
                Ok(Err(_)) | Err(_) => break, // not acknowledged: resent after the restart
            }
        }
        tokio::time::sleep_until(kill_at).await;
        drop(agent); // SIGKILL
        if next_batch > batch_before && next_batch < batches.len() {
            kills_mid_ingest += 1;
        }
    }
    assert!(kills_mid_ingest > 0, "no kill landed while ingesting");
    // Slow answers stretch the delivery over several kills.
    receiver.set_export_script(Some(std::sync::Arc::new(|_, _| {
        Reply::Delay(Duration::from_millis(10))
    })));
    // Kills that landed after some deliveries of their run, with exports still pending. On a
    // busy machine a run may end before its agent delivers anything: up to twice as many
    // more runs then, until one such kill has landed.
    let (mut kills_mid_delivery, mut delivery_rounds) = (0, 0);
    for round in 0..delivery_kills * 3 {
        if round >= delivery_kills && kills_mid_delivery > 0 {
            break;
        }
        delivery_rounds += 1;
        let delivered_before = receiver.delivered().len();
        let agent = start_agent(&config, addr).await;
        // Past the retry times the down phase stored (up to `max_backoff_ms`, 200 ms: the
        // backoff doubles from each export's stored attempts) for some runs.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(20..450))).await;
        drop(agent); // SIGKILL while delivering
        if receiver.delivered().len() > delivered_before
            && outbox_stats(&config)["pending"].as_u64() > Some(0)
        {
            kills_mid_delivery += 1;
        }
    }
    assert!(kills_mid_delivery > 0, "no kill landed while delivering");

    receiver.set_export_script(None);
    let agent = start_agent(&config, addr).await;
    while next_batch < batches.len() {
        let (status, body) = try_post(addr, batches[next_batch].clone()).await.unwrap();
        assert_eq!(status, 200, "{body}");
        next_batch += 1;
    }
    let ws_config = config.clone();
    wait_until(60, "the outbox to drain", || {
        outbox_stats(&ws_config)["pending"] == 0
    })
    .await;
    // SIGTERM: a clean stop.
    let mut agent = agent;
    let status = agent
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(60))
        .await;
    assert!(status.success(), "{status:?}");

    // Every version of every profile arrived with its payload; none after a newer one.
    let mut seen: HashMap<String, Vec<usize>> = HashMap::new();
    for r in receiver.delivered() {
        let payload = r.json().unwrap();
        let name = payload["person"]["name"]["firstName"]
            .as_str()
            .unwrap()
            .to_owned();
        let (profile, version) = name.split_once("-v").unwrap();
        let (p, v): (usize, usize) = (profile[1..].parse().unwrap(), version.parse().unwrap());
        assert_eq!(payload, expected_payload(p, v));
        let arrived = seen.entry(profile.to_owned()).or_default();
        if let Some(&last) = arrived.last() {
            assert!(
                v >= last,
                "{profile}: version {v} arrived after version {last}"
            );
        }
        arrived.push(v);
    }
    for p in 0..profiles {
        let mut arrived = seen.remove(&format!("p{p}")).unwrap_or_default();
        arrived.dedup();
        assert_eq!(arrived, (0..versions).collect::<Vec<_>>(), "profile p{p}");
    }
    let stats = outbox_stats(&config);
    assert_eq!(
        (stats["pending"].as_u64(), stats["dead"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(receiver.tokens_issued() >= 1);
    let delivered = receiver.delivered().len();
    println!(
        "crash run: {} SIGKILLs ({ingest_kills} in the ingest phase, {kills_mid_ingest} of them with batches left to send; {delivery_rounds} in the delivery phase, {kills_mid_delivery} of them after deliveries with exports pending); {} updates acknowledged; {} exports expected, {delivered} deliveries (duplicates after kills included) of {} requests; 0 lost, 0 out of order",
        ingest_kills + delivery_rounds,
        lines.len(),
        profiles * versions,
        receiver.export_requests().len(),
    );
}

/// A request of more than a chunk is committed a chunk at a time, each durable before the next
/// is queued: killed while it is stored, the agent leaves whole chunks from the request's start
/// and nothing after them. The agent is killed at instants growing by 30% until a request is
/// answered, each time with a request of new profiles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_request_killed_partway_leaves_whole_chunks_from_its_start() {
    const UPDATES: usize = 4 * REQUEST_CHUNK;
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
        .await
        .unwrap();
    receiver.set_export_script(Some(outpost::receiver::down()));
    let dir = tempfile::tempdir().unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let base = receiver.base_url();
    let text = agent_config_text(&base, &oauth_body(&base), "")
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{addr}\""));
    let config = dir.path().join("outpost.toml");
    std::fs::write(&config, text).unwrap();
    let store_path = outpost::config::Config::load(&config).unwrap().storage.path;

    let mut delay = Duration::from_millis(50);
    let mut partly = 0;
    for round in 0.. {
        assert!(round < 60, "no request was answered");
        let ids: Vec<String> = (0..UPDATES).map(|i| format!("r{round}-{i}")).collect();
        let body = ids
            .iter()
            .map(|id| member_update(id, "a", "2026-01-01T00:00:00Z"))
            .collect::<Vec<_>>()
            .join("\n");
        let agent = start_agent(&config, addr).await;
        let answered = tokio::time::timeout(delay, try_post(addr, body)).await;
        drop(agent); // SIGKILL
        let store = outpost::store::Store::open(&store_path, 8 << 20).unwrap();
        let stored: Vec<bool> = ids
            .iter()
            .map(|id| store.profile(id).unwrap().is_some())
            .collect();
        drop(store);
        let count = stored.iter().filter(|s| **s).count();
        assert!(
            stored[..count].iter().all(|s| *s),
            "round {round}: {count} stored, not the first {count}"
        );
        if let Ok(Ok((status, answer))) = answered {
            assert_eq!((status, count), (200, UPDATES), "{answer}");
            break;
        }
        assert_eq!(count % REQUEST_CHUNK, 0, "round {round}: {count} stored");
        partly += usize::from(count > 0 && count < UPDATES);
        delay = delay.mul_f64(1.3);
    }
    println!("{partly} kills left part of a request stored");
    assert!(
        partly > 0,
        "no kill came while a request was stored in part"
    );
}
