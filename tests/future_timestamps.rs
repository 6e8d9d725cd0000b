//! `ingest.max_future_s`: an update whose timestamp is too far ahead of the agent's clock would
//! make every later update of its profile stale, so it is refused like any bad input, naming
//! its line and by how much it is ahead, and nothing of the input is stored. Over HTTP (the
//! real `outpost run`) and from a file or standard input (`outpost ingest`).

mod common;

use chrono::{SecondsFormat, TimeDelta, Utc};
use common::agent_process::{free_port, AgentProcess};
use common::*;
use outpost::receiver::{Receiver, ReceiverOptions};
use serde_json::Value;

/// A member update of `id` whose timestamp is `ahead` from now.
fn update_ahead(id: &str, ahead: TimeDelta) -> String {
    let at = (Utc::now() + ahead).to_rfc3339_opts(SecondsFormat::Secs, true);
    member_update(id, "Jane", &at)
}

fn stats(ws: &Workspace) -> Value {
    serde_json::from_str(ws.run_ok(&["outbox", "stats", "--json"], None).trim()).unwrap()
}

/// An agent's config delivering to `receiver`, listening on `port`, with `ingest` lines added
/// to its `[ingest]` table.
fn config_on_port(receiver: &Receiver, port: u16, ingest: &str) -> String {
    let config = agent_config_text(&receiver.base_url(), "type = \"none\"", "").replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\"\n{ingest}"),
    );
    assert!(config.contains(&format!("127.0.0.1:{port}")), "{config}");
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_http_a_timestamp_too_far_ahead_is_a_400_naming_the_line() {
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
        .await
        .unwrap();
    let ws = Workspace::new();
    let port = free_port();
    std::fs::write(
        ws.config_path(),
        config_on_port(&receiver, port, "max_future_s = 3600"),
    )
    .unwrap();
    let agent = AgentProcess::start(&ws.config_path(), port).await;

    let body = [
        update_ahead("p-1", TimeDelta::zero()),
        update_ahead("p-2", TimeDelta::minutes(-5)),
        update_ahead("p-3", TimeDelta::days(2 * 365)),
    ]
    .join("\n");
    let (status, answer) = http_post(agent.addr, "/v1/updates", body, &[]).await;
    assert_eq!(status, 400, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["line"], 3, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("ahead of the agent's clock"), "{error}");
    assert!(error.contains("ingest.max_future_s (3600)"), "{error}");
    let skew: i64 = error
        .split(" s ahead")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no skew in `{error}`"));
    assert!(
        (2 * 365 * 86_400 - 60..=2 * 365 * 86_400 + 60).contains(&skew),
        "{skew}"
    );
    let s = stats(&ws);
    assert_eq!(
        (s["profiles"].as_u64(), s["pending"].as_u64()),
        (Some(0), Some(0))
    );

    // Within the limit (a producer's clock a little ahead) is fine.
    let (status, answer) = http_post(
        agent.addr,
        "/v1/updates",
        update_ahead("p-4", TimeDelta::minutes(50)),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (_, metrics) = http_get(agent.addr, "/metrics").await;
    assert!(
        metrics.contains("outpost_updates_total{result=\"refused\"} 1"),
        "{metrics}"
    );
}

#[test]
fn from_a_file_a_timestamp_too_far_ahead_fails_naming_the_line() {
    // The default limit: one day.
    let ws = Workspace::new();
    let file = ws.path().join("updates.ndjson");
    let lines = [
        update_ahead("p-1", TimeDelta::zero()),
        update_ahead("p-2", TimeDelta::hours(23)),
        String::new(),
        update_ahead("p-3", TimeDelta::days(5 * 365)),
        update_ahead("p-4", TimeDelta::zero()),
    ];
    std::fs::write(&file, lines.join("\n")).unwrap();
    for input in [Some(file.to_str().unwrap()), None] {
        let out = match input {
            Some(path) => ws.run(&["ingest", path], None),
            None => ws.run(&["ingest", "-"], Some(lines.join("\n").as_bytes())),
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{input:?}: {stderr}");
        assert!(stderr.contains("line 4:"), "{stderr}");
        assert!(stderr.contains("s ahead of the agent's clock"), "{stderr}");
        assert!(stderr.contains("ingest.max_future_s (86400)"), "{stderr}");
        assert!(!ws.store_path().exists(), "nothing stored, no store made");
    }

    // Without the bad line, the file goes in; 23 h ahead is within the default day.
    let good = [&lines[0], &lines[1], &lines[4]];
    std::fs::write(&file, good.map(String::as_str).join("\n")).unwrap();
    ws.run_ok(&["ingest", file.to_str().unwrap()], None);
    assert_eq!(stats(&ws)["profiles"], 3);

    // A smaller limit from the config refuses the 23 h line too.
    let strict = Workspace::with_extra("[ingest]\nmax_future_s = 3600");
    let out = strict.run(&["ingest", file.to_str().unwrap()], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("line 2:") && stderr.contains("ingest.max_future_s (3600)"),
        "{stderr}"
    );
}

#[test]
fn max_future_s_is_validated_naming_the_key() {
    for bad in ["0", "-1", "\"a day\""] {
        let ws = Workspace::with_extra(&format!("[ingest]\nmax_future_s = {bad}"));
        let out = ws.run(&["outbox", "stats"], None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("max_future_s"), "{bad}: {stderr}");
    }
}

/// `outpost ingest` beside a running agent checks the input with its own config, and the
/// agent checks each chunk again with its own: an agent stricter than the CLI's config refuses
/// a chunk after earlier ones were stored. The CLI fails (exit 1), names the update the agent
/// refused and why, and says how much of the input was stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_stricter_than_the_cli_refuses_a_chunk_and_the_cli_says_what_was_stored() {
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
        .await
        .unwrap();
    let ws = Workspace::new();
    let port = free_port();
    let agent_config = config_on_port(&receiver, port, "max_future_s = 3600");
    std::fs::write(ws.config_path(), agent_config).unwrap();
    let _agent = AgentProcess::start(&ws.config_path(), port).await;
    let cli_config_path = ws.path().join("cli.toml");
    std::fs::write(&cli_config_path, config_on_port(&receiver, port, "")).unwrap();

    // The first chunk (1,000 updates) is good; the second holds one 23 h ahead.
    let mut lines: Vec<String> = (0..1_001)
        .map(|i| update_ahead(&format!("p-{i}"), TimeDelta::zero()))
        .collect();
    lines.push(update_ahead("p-ahead", TimeDelta::hours(23)));
    let out = run_with_config(
        &cli_config_path,
        &["ingest", "-"],
        Some(lines.join("\n").as_bytes()),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the agent refused the input's update 1002 (2 of the 2 sent together)"),
        "{stderr}"
    );
    assert!(stderr.contains("ingest.max_future_s (3600)"), "{stderr}");
    assert!(
        stderr.contains("the first 1000 of 1002 updates were stored, the rest not"),
        "{stderr}"
    );
    assert_eq!(stats(&ws)["profiles"], 1_000);
}
