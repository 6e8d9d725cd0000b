//! Segment names and timestamps in payloads, end to end: the agent records when each segment
//! was mapped and when its entry changed, across restarts, and the destination gets them.

mod common;

use common::*;
use outpost::agent::{Agent, AgentOptions};
use outpost::config::Config;
use outpost::receiver::{Receiver, ReceiverOptions};
use serde_json::Value;

/// The agent's config with SEGMENT_A named `name` and both toggles on.
fn config(dir: &std::path::Path, base: &str, name: &str) -> Config {
    let text = agent_config_text(base, &oauth_body(base), "").replace(
        &format!("segments = [\"{SEGMENT_A}\", \"{SEGMENT_B}\"]"),
        &format!(
            "segments = [{{ id = \"{SEGMENT_A}\", name = \"{name}\", created_at = \"2025-10-01T00:00:00Z\" }}, \"{SEGMENT_B}\"]\ninclude_segment_names = true\ninclude_segment_timestamps = true"
        ),
    );
    let path = dir.join("outpost.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap()
}

/// Runs the agent with `config`, ingests one exporting update, and returns the entry of
/// SEGMENT_A in the payload the receiver got.
async fn segment_entry(config: &Config, receiver: &Receiver, round: usize) -> Value {
    let agent = Agent::start(config, AgentOptions { jitter: false })
        .await
        .unwrap();
    let line = member_update(
        "p1",
        &format!("Jane{round}"),
        &format!("2026-01-01T00:00:{:02}Z", round + 1),
    );
    let (status, body) = http_post(agent.listen_addr, "/v1/updates", line, &[]).await;
    assert_eq!(status, 200, "{body}");
    wait_drained(&agent, receiver, round + 1).await;
    agent.stop().await.unwrap();
    let payload = receiver.delivered().last().unwrap().json().unwrap();
    payload["segmentMembership"]["ups"][SEGMENT_A].clone()
}

#[tokio::test]
async fn names_and_mapping_times_reach_the_destination_and_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
        .await
        .unwrap();
    let before = chrono::Utc::now().timestamp_millis();
    let first = segment_entry(
        &config(dir.path(), &receiver.base_url(), "Loyal"),
        &receiver,
        0,
    )
    .await;
    assert_eq!(first["name"], "Loyal", "{first}");
    assert_eq!(first["createdAt"], 1_759_276_800_000i64, "{first}");
    assert!(
        first.get("updatedAt").is_none(),
        "not given, left out: {first}"
    );
    let mapped = first["mappingCreatedAt"].as_i64().unwrap();
    assert!(mapped >= before, "{first}");
    assert_eq!(first["mappingUpdatedAt"].as_i64(), Some(mapped));

    // Same mapping after a restart: the recorded times stay.
    let second = segment_entry(
        &config(dir.path(), &receiver.base_url(), "Loyal"),
        &receiver,
        1,
    )
    .await;
    assert_eq!(second["mappingCreatedAt"].as_i64(), Some(mapped));
    assert_eq!(second["mappingUpdatedAt"].as_i64(), Some(mapped));

    // The segment renamed: its entry changed now, it was mapped when it was.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let third = segment_entry(
        &config(dir.path(), &receiver.base_url(), "Most loyal"),
        &receiver,
        2,
    )
    .await;
    assert_eq!(third["name"], "Most loyal");
    assert_eq!(third["mappingCreatedAt"].as_i64(), Some(mapped));
    assert!(
        third["mappingUpdatedAt"].as_i64().unwrap() > mapped,
        "{third}"
    );
}
