//! `outpost delivery pause` and `resume` with the real binary: ingest goes on while nothing is
//! sent, the pause holds across a SIGKILL and a restart, is visible in `/metrics`, `/healthz`
//! and `outbox stats`, and a resume delivers everything, each profile's exports in order.

mod common;

use std::time::Duration;

use common::agent_process::{free_port, AgentProcess};
use common::*;
use outpost::receiver::{Receiver, ReceiverOptions, Reply};
use serde_json::{json, Value};

/// How long the tests watch that nothing is delivered while paused.
const QUIET: Duration = Duration::from_secs(2);

async fn receiver() -> Receiver {
    Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
        .await
        .unwrap()
}

/// A workspace whose agent delivers to `receiver` and listens on a fresh port.
fn workspace(receiver: &Receiver) -> (Workspace, u16) {
    let ws = Workspace::new();
    let port = free_port();
    let base = receiver.base_url();
    let text = agent_config_text(&base, &oauth_body(&base), "").replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    std::fs::write(ws.config_path(), text).unwrap();
    (ws, port)
}

/// `versions` updates of each profile, each changing its first name, in time order: one
/// export each.
fn updates(profiles: &[&str], versions: u32) -> Vec<String> {
    (1..=versions)
        .flat_map(|v| {
            profiles.iter().map(move |p| {
                member_update(
                    p,
                    &format!("{p}-v{v}"),
                    &format!("2026-01-01T00:00:{v:02}Z"),
                )
            })
        })
        .collect()
}

fn stats(ws: &Workspace) -> Value {
    serde_json::from_str(ws.run_ok(&["outbox", "stats", "--json"], None).trim()).unwrap()
}

async fn healthz_body(agent: &AgentProcess) -> Value {
    let (status, body) = http_get(agent.addr, "/healthz").await;
    assert_eq!(status, 200, "healthy while paused: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits until every one of `exports` reached the receiver, then checks each profile's order.
async fn assert_all_delivered_in_order(receiver: &Receiver, agent: &AgentProcess, exports: usize) {
    wait_or_show_deliveries(receiver, agent, exports).await;
    assert_per_profile_order(&delivered_pairs(receiver));
}

async fn wait_or_show_deliveries(receiver: &Receiver, agent: &AgentProcess, exports: usize) {
    common::agent_process::wait_or_show(20, "every export delivered", &[agent], async || {
        distinct_delivered(receiver) >= exports
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pause_holds_while_ingest_goes_on_and_across_a_kill_and_a_resume_delivers_in_order() {
    let receiver = receiver().await;
    let (ws, port) = workspace(&receiver);
    let mut agent = AgentProcess::start(&ws.config_path(), port).await;
    assert_eq!(healthz_body(&agent).await, json!({"status": "ok"}));
    assert_eq!(metric(agent.addr, "outpost_delivery_paused").await, 0.0);

    let out = ws.run_ok(&["delivery", "pause"], None);
    assert_eq!(out.trim(), "delivery paused; 0 exports pending");
    assert!(
        agent
            .log()
            .contains("delivery paused by `outpost delivery pause`"),
        "{}",
        agent.log()
    );

    let profiles = ["p1", "p2", "p3", "p4", "p5"];
    let lines = updates(&profiles, 3);
    for chunk in lines.chunks(5) {
        let (status, body) = http_post(agent.addr, "/v1/updates", chunk.join("\n"), &[]).await;
        assert_eq!(status, 200, "{body}");
    }
    tokio::time::sleep(QUIET).await;
    assert_eq!(receiver.export_arrivals(), 0, "sent while paused");
    assert_eq!(metric(agent.addr, "outpost_delivery_paused").await, 1.0);
    assert_eq!(healthz_body(&agent).await["delivery_paused"], true);
    let s = stats(&ws);
    assert_eq!(
        (s["pending"].as_u64(), &s["delivery_paused"]),
        (Some(15), &Value::Bool(true)),
        "{s}"
    );
    let since = s["delivery_paused_since"].as_str().unwrap().to_owned();
    let text = ws.run_ok(&["outbox", "stats"], None);
    assert!(
        text.contains(&format!("delivery paused  since {since}")),
        "{text}"
    );
    let top = ws.run_ok(&["top", "--once"], None);
    assert!(
        top.contains(&format!(
            "delivery    paused             paused since {since}"
        )),
        "{top}"
    );
    let again = ws.run_ok(&["delivery", "pause"], None);
    assert_eq!(
        again.trim(),
        format!("delivery was already paused since {since}")
    );

    // Killed: the pause is in the store.
    agent
        .signal_and_wait(libc::SIGKILL, Duration::from_secs(5))
        .await;
    let mut agent = AgentProcess::start(&ws.config_path(), port).await;
    assert!(
        agent
            .log()
            .contains(&format!("delivery is paused (since {since})")),
        "{}",
        agent.log()
    );
    tokio::time::sleep(QUIET).await;
    assert_eq!(receiver.export_arrivals(), 0, "sent after the restart");
    assert_eq!(metric(agent.addr, "outpost_delivery_paused").await, 1.0);

    let out = ws.run_ok(&["delivery", "resume"], None);
    assert_eq!(
        out.trim(),
        format!("delivery resumed (paused since {since}); 15 exports pending")
    );
    assert_all_delivered_in_order(&receiver, &agent, 15).await;
    assert!(
        agent
            .log()
            .contains("delivery resumed by `outpost delivery resume`"),
        "{}",
        agent.log()
    );
    assert_eq!(metric(agent.addr, "outpost_delivery_paused").await, 0.0);
    assert_eq!(healthz_body(&agent).await, json!({"status": "ok"}));
    let out = ws.run_ok(&["delivery", "resume", "--json"], None);
    let answer: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (&answer["delivery_paused"], &answer["changed"]),
        (&Value::Bool(false), &Value::Bool(false)),
        "{answer}"
    );
    agent.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_paused_while_its_agent_was_stopped_delivers_nothing_until_resumed() {
    let receiver = receiver().await;
    let (ws, port) = workspace(&receiver);
    let file = ws.path().join("updates.ndjson");
    std::fs::write(&file, updates(&["a", "b"], 2).join("\n") + "\n").unwrap();
    ws.run_ok(&["ingest", file.to_str().unwrap()], None);

    // No agent: the command opens the store itself.
    let out = ws.run_ok(&["delivery", "pause", "--json"], None);
    let answer: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (
            &answer["delivery_paused"],
            &answer["changed"],
            &answer["pending"]
        ),
        (&Value::Bool(true), &Value::Bool(true), &Value::from(4)),
        "{answer}"
    );

    let agent = AgentProcess::start(&ws.config_path(), port).await;
    assert!(
        agent.log().contains("delivery is paused (since"),
        "{}",
        agent.log()
    );
    tokio::time::sleep(QUIET).await;
    assert_eq!(receiver.export_arrivals(), 0, "sent while paused");

    ws.run_ok(&["delivery", "resume"], None);
    assert_all_delivered_in_order(&receiver, &agent, 4).await;
}

/// A pause begun while the destination looked down ends its being counted as down: nothing
/// is sent to find out, and the alert on it would otherwise fire for as long as the pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pause_during_an_outage_does_not_keep_the_destination_counted_as_down() {
    let receiver = receiver().await;
    receiver.set_export_script(Some(std::sync::Arc::new(|_, _| Reply::down())));
    let (ws, port) = workspace(&receiver);
    let agent = AgentProcess::start(&ws.config_path(), port).await;
    let (status, body) = http_post(
        agent.addr,
        "/v1/updates",
        updates(&["x"], 1).join("\n"),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let addr = agent.addr;
    common::agent_process::wait_or_show(
        20,
        "the destination counted as down",
        &[&agent],
        async || metric(addr, "outpost_destination_down").await == 1.0,
    )
    .await;

    ws.run_ok(&["delivery", "pause"], None);
    common::agent_process::wait_or_show(
        5,
        "the destination no longer counted as down",
        &[&agent],
        async || metric(addr, "outpost_destination_down").await == 0.0,
    )
    .await;
    let arrivals = receiver.export_arrivals();
    tokio::time::sleep(QUIET).await;
    assert_eq!(metric(addr, "outpost_destination_down").await, 0.0);
    assert!(
        receiver.export_arrivals() <= arrivals + 1,
        "probes went on while paused (one may have been in flight)"
    );

    receiver.set_export_script(None);
    ws.run_ok(&["delivery", "resume"], None);
    wait_or_show_deliveries(&receiver, &agent, 1).await;
}
