//! The CLI beside the real `outpost run`: while the agent runs, every subcommand goes through its
//! Unix socket (the store is locked by the agent); after SIGTERM, the same subcommands open the
//! store themselves. Dead letters are made by a receiver that answers 400 for some profiles.

mod common;

use std::collections::HashSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::agent_process::{free_port, AgentProcess};
use common::*;
use outpost::receiver::{Receiver, ReceiverOptions, Reply};
use outpost::store::{Store, StoreError};
use serde_json::Value;

const CACHE_BYTES: u64 = 8 << 20;

/// A receiver that answers 400 to exports of profiles named `bad…` unless allowed.
struct Destination {
    receiver: Receiver,
    allowed: Arc<Mutex<HashSet<String>>>,
}

impl Destination {
    async fn start() -> Destination {
        let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
            .await
            .unwrap();
        let allowed: Arc<Mutex<HashSet<String>>> = Arc::default();
        let allowed_in_script = Arc::clone(&allowed);
        receiver.set_export_script(Some(Arc::new(move |_, r| {
            let profile = r.json().map(|p| profile_of(&p)).unwrap_or_default();
            if profile.starts_with("bad") && !allowed_in_script.lock().unwrap().contains(&profile) {
                Reply::Status(400, vec![], format!("{{\"error\":\"{profile} rejected\"}}"))
            } else {
                Reply::Normal
            }
        })));
        Destination { receiver, allowed }
    }

    fn allow(&self, profile: &str) {
        self.allowed.lock().unwrap().insert(profile.to_owned());
    }

    /// The Idempotency-Keys of the exports answered 2xx.
    fn delivered_keys(&self) -> Vec<String> {
        self.receiver
            .delivered()
            .iter()
            .map(|r| r.header("idempotency-key").unwrap().to_owned())
            .collect()
    }

    fn delivered_profiles(&self) -> Vec<String> {
        delivered_profiles(&self.receiver)
    }
}

/// A workspace whose agent delivers to `destination` and listens on a fresh port.
fn workspace(destination: &Destination) -> (Workspace, u16) {
    workspace_delivering(destination, "")
}

/// [`workspace`] with these extra `[delivery]` lines.
fn workspace_delivering(destination: &Destination, delivery: &str) -> (Workspace, u16) {
    let ws = Workspace::new();
    let port = free_port();
    let base = destination.receiver.base_url();
    let text = agent_config_text(&base, &oauth_body(&base), delivery);
    let listen = "listen = \"127.0.0.1:0\"";
    assert!(text.contains(listen), "{text}");
    std::fs::write(
        ws.config_path(),
        text.replace(listen, &format!("listen = \"127.0.0.1:{port}\"")),
    )
    .unwrap();
    (ws, port)
}

fn update(id: &str, name: &str) -> String {
    member_update(id, name, "2026-01-01T00:00:01Z")
}

fn write_file(ws: &Workspace, name: &str, lines: &[String]) -> String {
    let path = ws.path().join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path.to_str().unwrap().to_owned()
}

fn stats(ws: &Workspace) -> Value {
    serde_json::from_str(ws.run_ok(&["outbox", "stats", "--json"], None).trim()).unwrap()
}

/// Asserts `outbox stats --json` shows these counts.
fn assert_counts(ws: &Workspace, pending: u64, dead: u64) {
    let s = stats(ws);
    assert_eq!(
        (s["pending"].as_u64(), s["dead"].as_u64()),
        (Some(pending), Some(dead)),
        "{s}"
    );
}

/// Waits (at most 20 s) until `outbox stats --json` shows these counts.
async fn wait_counts(ws: &Workspace, pending: u64, dead: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = stats(ws);
        if s["pending"] == pending && s["dead"] == dead {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "waiting for pending {pending} and dead {dead}: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `outbox list --json` (with `extra` flags) as JSON objects.
fn list(ws: &Workspace, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["outbox", "list", "--json", "--limit", "0"];
    args.extend_from_slice(extra);
    json_lines(&ws.run_ok(&args, None))
}

/// The id of the one export of `profile` listed with `extra` flags.
fn id_of(ws: &Workspace, profile: &str, extra: &[&str]) -> String {
    let mut args = vec!["--profile", profile];
    args.extend_from_slice(extra);
    let found = list(ws, &args);
    assert_eq!(found.len(), 1, "{profile}: {found:?}");
    found[0]["id"].as_str().unwrap().to_owned()
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The store is held by the agent: opening it in this process fails as locked.
fn assert_locked(ws: &Workspace) {
    match Store::open(&ws.store_path(), CACHE_BYTES) {
        Err(StoreError::Locked(_)) => {}
        // What src/ returns today (sled reports the lock as ErrorKind::Other); see
        // `a_locked_store_without_an_agent_is_a_clear_error`.
        Err(e @ StoreError::Open { .. }) if e.to_string().contains("could not acquire lock") => {}
        Err(e) => panic!("expected a locked store, got {e}"),
        Ok(_) => panic!("the store could be opened while the agent runs"),
    }
}

/// Checks the inspection subcommands and their errors; the same whether the agent runs or not.
fn inspect(ws: &Workspace, dead_profiles: &[&str]) {
    let dead = list(ws, &["--dead"]);
    let profiles: Vec<&str> = dead
        .iter()
        .map(|e| e["profile_id"].as_str().unwrap())
        .collect();
    assert_eq!(profiles, dead_profiles, "oldest first");
    for e in &dead {
        assert_eq!(e["dead"], true, "{e}");
        assert_eq!(e["reason"], "segment", "{e}");
        let attempts = e["attempts"].as_u64().unwrap();
        assert!(attempts >= 1, "{e}");
        let error = e["last_error"].as_str().unwrap();
        assert!(
            error.starts_with("HTTP 400: ") && error.contains("rejected"),
            "{e}"
        );
    }
    let first = &dead[0];
    let id = first["id"].as_str().unwrap();
    let shown: Value =
        serde_json::from_str(ws.run_ok(&["outbox", "show", id, "--json"], None).trim()).unwrap();
    assert_eq!(&shown, first);
    let human = ws.run_ok(&["outbox", "show", id], None);
    assert!(
        human.contains(id) && human.contains("HTTP 400") && human.contains("payload"),
        "{human}"
    );
    assert!(!human.contains("next attempt"), "a dead letter: {human}");
    let table = ws.run_ok(&["outbox", "list", "--dead"], None);
    assert_eq!(table.lines().count(), dead.len() + 1, "{table}");
    let pending = ws.run(&["outbox", "list"], None);
    let said = String::from_utf8_lossy(&pending.stderr);
    assert!(
        said.contains(&format!("also holds {} dead letter(s)", dead.len())),
        "{said}"
    );
    let one = json_lines(&ws.run_ok(
        &["outbox", "list", "--dead", "--limit", "1", "--json"],
        None,
    ));
    assert_eq!(one.len(), 1);
    let human_stats = ws.run_ok(&["outbox", "stats"], None);
    assert!(
        human_stats.contains(&format!("dead             {}", dead.len())),
        "{human_stats}"
    );

    let profile: Value = serde_json::from_str(
        ws.run_ok(&["profile", "show", dead_profiles[0], "--json"], None)
            .trim(),
    )
    .unwrap();
    assert_eq!(profile["id"], dead_profiles[0]);
    assert_eq!(profile["timestamp"], "2026-01-01T00:00:01Z");
    assert_eq!(
        profile["profile"]["person"]["name"]["firstName"],
        format!("{}-name", dead_profiles[0])
    );

    // Errors: usage 2, missing things 1.
    let out = ws.run(&["outbox", "show", "not-an-id"], None);
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    let out = ws.run(&["outbox", "show", "00000000-1"], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    let out = ws.run(&["profile", "show", "nobody"], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("nobody"), "{}", stderr_of(&out));
    let out = ws.run(&["outbox", "retry", "00000000-1"], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("not found"), "{}", stderr_of(&out));
    // With --json, the answer for programs on standard output, the failure as ever.
    let out = ws.run(&["outbox", "retry", "00000000-1", "--json"], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        answer["not_found"],
        serde_json::json!(["00000000-1"]),
        "{answer}"
    );
    let out = ws.run(&["outbox", "drop", "00000000-1", "--yes"], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    let out = ws.run(&["outbox", "retry"], None);
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    let out = ws.run(&["outbox", "drop", "--all-dead", id, "--yes"], None);
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));

    // A file with a bad line 3 is refused whole, naming the line.
    let before = stats(ws);
    let bad = write_file(
        ws,
        "bad.ndjson",
        &[
            update("new-1", "x"),
            update("new-2", "x"),
            "{\"id\":\"new-3\",\"profile\":{},\"colour\":\"red\"}".into(),
        ],
    );
    let out = ws.run(&["ingest", &bad], None);
    assert_eq!(out.status.code(), Some(1));
    let stderr = stderr_of(&out);
    assert!(
        stderr.contains("line 3") && stderr.contains("colour"),
        "{stderr}"
    );
    let out = ws.run(&["ingest", "-"], Some(b"{\"id\":\"new-1\"}\n"));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("line 1"), "{}", stderr_of(&out));
    assert_eq!(stats(ws)["profiles"], before["profiles"]);
}

/// Updates for these profiles, each a member with first name `<id>-name`.
fn updates(profiles: &[&str]) -> Vec<String> {
    profiles
        .iter()
        .map(|p| update(p, &format!("{p}-name")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_subcommand_with_the_agent_running_and_stopped() {
    let destination = Destination::start().await;
    let (ws, port) = workspace(&destination);
    let socket = ws.store_path().join("outpost.sock");

    // ---- The agent runs: the CLI goes through its socket. ----
    let mut agent = AgentProcess::start(&ws.config_path(), port).await;
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_locked(&ws);

    let file = write_file(
        &ws,
        "first.ndjson",
        &updates(&["good1", "bad1", "bad2", "bad3"]),
    );
    let out = ws.run_ok(&["ingest", &file], None);
    assert_eq!(
        out.trim(),
        "accepted 4 updates: 4 exports (4 segment), 0 unchanged, 0 stale, 0 deleted"
    );
    let mut stdin = updates(&["bad4", "bad5", "good2"]);
    stdin.push(update("good1", "good1-name")); // a resend: unchanged
    let out = ws.run_ok(
        &["ingest", "--json", "-"],
        Some(stdin.join("\n").as_bytes()),
    );
    let summary: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["accepted"], 4, "{summary}");
    assert_eq!(summary["exports"], 3, "{summary}");
    assert_eq!(summary["unchanged"], 1, "{summary}");

    wait_counts(&ws, 0, 5).await;
    let mut good = destination.delivered_profiles();
    good.sort();
    assert_eq!(good, ["good1", "good2"]);
    assert_eq!(stats(&ws)["profiles"], 7);
    assert!(list(&ws, &[]).is_empty(), "nothing pending");
    inspect(&ws, &["bad1", "bad2", "bad3", "bad4", "bad5"]);
    assert_locked(&ws);

    // retry ID: the endpoint now takes bad1; the same id is delivered.
    destination.allow("bad1");
    let bad1 = id_of(&ws, "bad1", &["--dead"]);
    let out = ws.run_ok(&["outbox", "retry", &bad1], None);
    assert_eq!(out.trim(), "1 export(s) put back in the outbox");
    wait_counts(&ws, 0, 4).await;
    assert!(destination.delivered_keys().contains(&bad1));

    // retry --all-dead: all four are sent again, and rejected again.
    let out = ws.run_ok(&["outbox", "retry", "--all-dead"], None);
    assert_eq!(out.trim(), "4 export(s) put back in the outbox");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dead = list(&ws, &["--dead"]);
        if dead.len() == 4 && dead.iter().all(|e| e["attempts"] == 2) {
            break;
        }
        assert!(Instant::now() < deadline, "not dead again: {dead:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_counts(&ws, 0, 4);

    // drop ID, then drop --all-dead.
    let bad2 = id_of(&ws, "bad2", &["--dead"]);
    let out = ws.run_ok(&["outbox", "drop", &bad2, "--yes"], None);
    assert_eq!(out.trim(), "1 export(s) deleted");
    assert_counts(&ws, 0, 3);
    let out = ws.run(&["outbox", "show", &bad2], None);
    assert_eq!(out.status.code(), Some(1));
    let out = ws.run_ok(&["outbox", "drop", "--all-dead", "--yes", "--json"], None);
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["dropped_count"], 3, "{answer}");
    assert_counts(&ws, 0, 0);

    // More dead letters for the stopped agent.
    let out = ws.run_ok(
        &["ingest", "-"],
        Some(updates(&["bad6", "bad7", "bad8"]).join("\n").as_bytes()),
    );
    assert!(out.starts_with("accepted 3 updates: 3 exports"), "{out}");
    wait_counts(&ws, 0, 3).await;

    agent.terminate().await;
    assert!(!socket.exists(), "the socket is removed on a clean stop");

    // ---- The agent is stopped: the CLI opens the store itself. ----
    drop(Store::open(&ws.store_path(), CACHE_BYTES).expect("the store is free"));
    assert_counts(&ws, 0, 3);
    inspect(&ws, &["bad6", "bad7", "bad8"]);
    let file = write_file(&ws, "second.ndjson", &updates(&["good3", "bad9"]));
    let out = ws.run_ok(&["ingest", "--json", &file], None);
    let summary: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (summary["accepted"].as_u64(), summary["exports"].as_u64()),
        (Some(2), Some(2))
    );
    let out = ws.run_ok(
        &["ingest", "-"],
        Some(updates(&["good4"]).join("\n").as_bytes()),
    );
    assert!(out.starts_with("accepted 1 updates: 1 exports"), "{out}");
    assert_counts(&ws, 3, 3);
    let pending: Vec<String> = list(&ws, &[])
        .iter()
        .map(|e| e["profile_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(pending, ["good3", "bad9", "good4"]);

    let bad6 = id_of(&ws, "bad6", &["--dead"]);
    let out = ws.run_ok(&["outbox", "retry", &bad6], None);
    assert_eq!(out.trim(), "1 export(s) put back in the outbox");
    assert_counts(&ws, 4, 2);
    let retried: Value =
        serde_json::from_str(ws.run_ok(&["outbox", "show", &bad6, "--json"], None).trim()).unwrap();
    assert_eq!(retried["dead"], false, "{retried}");
    assert_eq!(
        retried["retry_in_s"],
        Value::Null,
        "put back: no retry time {retried}"
    );
    let human = ws.run_ok(&["outbox", "show", &bad6], None);
    assert!(
        human.contains("next attempt     when delivery reaches it"),
        "{human}"
    );

    let bad7 = id_of(&ws, "bad7", &["--dead"]);
    let out = ws.run_ok(&["outbox", "drop", &bad7, "--yes"], None);
    assert_eq!(out.trim(), "1 export(s) deleted");
    assert_counts(&ws, 4, 1);

    // A pending export can be dropped by id too.
    let good3 = id_of(&ws, "good3", &[]);
    let out = ws.run_ok(&["outbox", "drop", &good3, "--yes"], None);
    assert_eq!(out.trim(), "1 export(s) deleted");
    assert_counts(&ws, 3, 1);

    let out = ws.run_ok(&["outbox", "retry", "--all-dead"], None);
    assert_eq!(out.trim(), "1 export(s) put back in the outbox");
    assert_counts(&ws, 4, 0);
    let out = ws.run_ok(&["outbox", "drop", "--all-dead", "--yes"], None);
    assert_eq!(out.trim(), "0 export(s) deleted");
    assert_counts(&ws, 4, 0);

    // ---- Running again: what was queued while stopped is delivered or dead-lettered. ----
    let mut agent = AgentProcess::start(&ws.config_path(), port).await;
    assert_locked(&ws);
    wait_counts(&ws, 0, 3).await;
    let mut dead: Vec<String> = list(&ws, &["--dead"])
        .iter()
        .map(|e| e["profile_id"].as_str().unwrap().to_owned())
        .collect();
    dead.sort();
    assert_eq!(dead, ["bad6", "bad8", "bad9"]);
    let delivered = destination.delivered_profiles();
    assert!(delivered.contains(&"good4".to_owned()), "{delivered:?}");
    assert!(
        !delivered.contains(&"good3".to_owned()),
        "dropped, never sent"
    );
    agent.terminate().await;

    // ---- Stopped again: drop --all-dead on the store. ----
    let out = ws.run_ok(&["outbox", "drop", "--all-dead", "--yes"], None);
    assert_eq!(out.trim(), "3 export(s) deleted");
    assert_counts(&ws, 0, 0);
    let out = ws.run_ok(&["outbox", "list", "--dead"], None);
    assert_eq!(out.trim(), "(no exports)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_locked_store_without_an_agent_is_a_clear_error() {
    let ws = Workspace::new();
    let store = Store::open(&ws.store_path(), CACHE_BYTES).unwrap();
    let stdin = update("p-1", "Jane");
    for (args, input) in [
        (vec!["outbox", "stats", "--json"], None),
        (vec!["outbox", "list"], None),
        (vec!["outbox", "retry", "--all-dead"], None),
        (vec!["profile", "show", "p-1"], None),
        (vec!["ingest", "-"], Some(stdin.as_bytes())),
    ] {
        // Waited for 1 s rather than 30 (OUTPOST_STORE_WAIT_S).
        let mut command = std::process::Command::new(binary());
        command
            .arg("--config")
            .arg(ws.config_path())
            .args(&args)
            .env("OUTPOST_STORE_WAIT_S", "1")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let started = Instant::now();
        let mut child = command.spawn().unwrap();
        if let Some(input) = input {
            use std::io::Write;
            // The command may exit before reading its input.
            let _ = child.stdin.as_mut().unwrap().write_all(input);
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = stderr_of(&out);
        assert!(
            stderr.contains("in use")
                && stderr.contains("outpost.sock")
                && stderr.contains("within 1 s"),
            "{args:?}: {stderr}"
        );
        assert!(started.elapsed() >= Duration::from_secs(1), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    assert_eq!(store.tally().unwrap().pending, 0, "nothing was ingested");
    drop(store);
    assert_counts(&ws, 0, 0);
}

/// After `kill -9` the socket file stays behind; the CLI then uses the store, and the next
/// agent replaces the stale socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_socket_after_kill_9_is_no_obstacle() {
    let destination = Destination::start().await;
    let (ws, port) = workspace(&destination);
    let socket = ws.store_path().join("outpost.sock");
    let mut agent = AgentProcess::start(&ws.config_path(), port).await;
    ws.run_ok(
        &["ingest", "-"],
        Some(updates(&["bad1", "good1"]).join("\n").as_bytes()),
    );
    wait_counts(&ws, 0, 1).await;
    // Through the running agent, stats also say what only its delivery loop knows.
    let live = stats(&ws);
    assert_eq!(live["waiting_for_retry"], 0, "{live}");
    assert!(live["concurrency_limit"].as_i64() >= Some(1), "{live}");
    assert_eq!(live["destination_down"], false, "{live}");
    let human = ws.run_ok(&["outbox", "stats"], None);
    assert!(human.contains("in flight, limit"), "{human}");
    let status = agent
        .signal_and_wait(libc::SIGKILL, Duration::from_secs(5))
        .await;
    assert_eq!(status.code(), None, "killed by a signal");
    assert!(socket.exists(), "a killed agent leaves its socket");

    // The delivered export's removal may not have been flushed when the kill came: then it is
    // pending again and will be sent once more (at least once), never lost.
    let s = stats(&ws);
    assert_eq!(s["dead"].as_u64(), Some(1), "{s}");
    assert_eq!(
        s["waiting_for_retry"],
        Value::Null,
        "no agent, no retry queue: {s}"
    );
    assert_eq!(s["agent_running"], false, "{s}");
    assert_eq!(live["agent_running"], true, "{live}");
    let human = ws.run_ok(&["outbox", "stats"], None);
    assert!(
        human.contains("no agent is running on this store"),
        "{human}"
    );
    assert!(s["pending"].as_u64().is_some_and(|p| p <= 1), "{s}");
    inspect_profile(&ws, "good1");
    let out = ws.run_ok(&["outbox", "retry", "--all-dead"], None);
    assert_eq!(out.trim(), "1 export(s) put back in the outbox");

    destination.allow("bad1");
    let mut agent = AgentProcess::start(&ws.config_path(), port).await;
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_locked(&ws);
    wait_counts(&ws, 0, 0).await;
    assert!(destination
        .delivered_profiles()
        .contains(&"bad1".to_owned()));
    agent.terminate().await;
}

fn inspect_profile(ws: &Workspace, id: &str) {
    let profile: Value =
        serde_json::from_str(ws.run_ok(&["profile", "show", id, "--json"], None).trim()).unwrap();
    assert_eq!(profile["id"], id);
}

/// Updates sent through the agent's socket are judged by the agent's mapping. A CLI config
/// that maps less (edited while the agent runs) made an identical resend look as if the
/// attributes only the agent maps were removed: an export without them, and a stored profile
/// that lost them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ingest_through_the_agent_is_judged_by_the_agents_own_mapping() {
    let destination = Destination::start().await;
    let (ws, port) = workspace(&destination);
    let _agent = AgentProcess::start(&ws.config_path(), port).await;
    let file = write_file(&ws, "one.ndjson", &[update("p1", "Ada")]);
    let out = ws.run_ok(&["ingest", &file], None);
    assert!(out.contains("1 exports"), "{out}");

    let mapped = r#"attributes = ["person.name.firstName", "person.name.lastName"]"#;
    let text = std::fs::read_to_string(ws.config_path()).unwrap();
    assert!(text.contains(mapped), "{text}");
    let cli_config = ws.path().join("cli.toml");
    std::fs::write(
        &cli_config,
        text.replace(mapped, r#"attributes = ["person.name.lastName"]"#),
    )
    .unwrap();
    let out = run_with_config(&cli_config, &["ingest", &file], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", stderr_of(&out));
    assert_eq!(
        stdout.trim(),
        "accepted 1 updates: 0 exports, 1 unchanged, 0 stale, 0 deleted"
    );
    let shown = ws.run_ok(&["profile", "show", "p1", "--json"], None);
    assert!(shown.contains("Ada"), "{shown}");
}

/// An update as deeply nested as ingest takes is taken through the agent's socket as well,
/// though the request that carries it nests it deeper, and shown back, though the answer
/// nests it deeper too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_deepest_update_ingest_takes_goes_through_the_agent() {
    let destination = Destination::start().await;
    let (ws, port) = workspace(&destination);
    let _agent = AgentProcess::start(&ws.config_path(), port).await;
    // Under a mapped attribute, so that `profile show` shows it too.
    let nested = |depth: usize| {
        format!(
            "{{\"id\":\"deep\",\"profile\":{{\"person\":{{\"name\":{{\"firstName\":{}1{}}}}}}}}}",
            "[".repeat(depth),
            "]".repeat(depth)
        )
    };
    let deepest = (1..)
        .take_while(|&depth| serde_json::from_str::<Value>(&nested(depth)).is_ok())
        .last()
        .unwrap();
    let too_deep = write_file(&ws, "too-deep.ndjson", &[nested(deepest + 1)]);
    let out = ws.run(&["ingest", &too_deep], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("nested more than 128 deep"),
        "{}",
        stderr_of(&out)
    );
    let deep = write_file(&ws, "deep.ndjson", &[nested(deepest)]);
    let out = ws.run_ok(&["ingest", &deep], None);
    assert!(out.contains("accepted 1 updates"), "{out}");
    let shown = ws.run_ok(&["profile", "show", "deep", "--json"], None);
    assert!(
        shown.contains(&format!("{}1{}", "[".repeat(deepest), "]".repeat(deepest))),
        "{shown}"
    );
}

/// `outbox retry` refuses a dead letter once the endpoint has acknowledged a newer export of
/// its profile, naming that export, through the agent and on the store alike; `outbox show`
/// names it too.
#[tokio::test]
async fn retry_refuses_a_dead_letter_a_newer_export_overtook() {
    let destination = Destination::start().await;
    let (ws, port) = workspace(&destination);
    let mut agent = AgentProcess::start(&ws.config_path(), port).await;
    ws.run_ok(&["ingest", "-"], Some(update("bad1", "v1").as_bytes()));
    wait_counts(&ws, 0, 1).await;
    let older = id_of(&ws, "bad1", &["--dead"]);
    destination.allow("bad1");
    let newer_update = member_update("bad1", "v2", "2026-01-01T00:00:02Z");
    ws.run_ok(&["ingest", "-"], Some(newer_update.as_bytes()));
    wait_counts(&ws, 0, 1).await;
    let newer = destination.delivered_keys();
    assert_eq!(newer.len(), 1, "{newer:?}");
    let refusal = format!("{older} (after {})", newer[0]);

    let out = ws.run(&["outbox", "retry", &older], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0 export(s) put back in the outbox"
    );
    let stderr = stderr_of(&out);
    assert!(
        stderr.contains("acknowledged a newer export of the same profile")
            && stderr.contains(&refusal),
        "{stderr}"
    );
    let shown = ws.run_ok(&["outbox", "show", &older], None);
    assert!(
        shown.contains(&format!("superseded_by    {}", newer[0])),
        "{shown}"
    );
    agent.terminate().await;

    // With --all-dead, every dead letter that may be retried is: the others are counted.
    let out = ws.run_ok(&["outbox", "retry", "--all-dead"], None);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "0 export(s) put back in the outbox",
            "1 dead letter(s) left as they are: the endpoint has acknowledged a newer export of their profile, or it was dropped, which counts the same (`outbox list --dead --json` names it, as superseded_by)"
        ]
    );
    let out = ws.run(&["outbox", "retry", &older], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains(&refusal), "{}", stderr_of(&out));
    assert_counts(&ws, 0, 1);
    assert_eq!(destination.delivered_keys(), newer, "nothing sent again");
}

/// Scripts the endpoint: it refuses first name `v1` (a dead letter) and holds `v2` unanswered
/// while the flag returned is set. The first names that arrived, in order.
fn refuse_v1_hold_v2(
    destination: &Destination,
) -> (Arc<Mutex<Vec<String>>>, Arc<std::sync::atomic::AtomicBool>) {
    let arrivals: Arc<Mutex<Vec<String>>> = Arc::default();
    let hold_newer = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (seen, hold) = (Arc::clone(&arrivals), Arc::clone(&hold_newer));
    destination
        .receiver
        .set_export_script(Some(Arc::new(move |_, r| {
            let name = r
                .json()
                .and_then(|p| Some(p["person"]["name"]["firstName"].as_str()?.to_owned()))
                .unwrap_or_default();
            seen.lock().unwrap().push(name.clone());
            match name.as_str() {
                "v1" => Reply::Status(400, vec![], "refused".into()),
                "v2" if hold.load(std::sync::atomic::Ordering::SeqCst) => {
                    Reply::Delay(Duration::from_secs(60))
                }
                _ => Reply::Normal,
            }
        })));
    (arrivals, hold_newer)
}

/// Ingests `v1` of profile `p1`, waits for it to be a dead letter, then ingests `v2`; the dead
/// letter's id.
async fn dead_v1_then_v2(ws: &Workspace) -> String {
    ws.run_ok(&["ingest", "-"], Some(update("p1", "v1").as_bytes()));
    wait_counts(ws, 0, 1).await;
    let older = id_of(ws, "p1", &["--dead"]);
    let newer_update = member_update("p1", "v2", "2026-01-01T00:00:02Z");
    ws.run_ok(&["ingest", "-"], Some(newer_update.as_bytes()));
    older
}

/// Once the endpoint takes `v2` (`newer`): dead letter `older` is superseded; stops the agent.
/// The endpoint never got the older export after the newer one.
async fn superseded_once_delivered(
    ws: &Workspace,
    mut agent: AgentProcess,
    arrivals: &Mutex<Vec<String>>,
    older: &str,
    newer: &str,
) {
    wait_counts(ws, 0, 1).await;
    let out = ws.run(&["outbox", "retry", older], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains(&format!("{older} (after {newer})")),
        "superseded once the newer export is delivered: {}",
        stderr_of(&out)
    );
    agent.terminate().await;
    let arrivals = arrivals.lock().unwrap().clone();
    assert_eq!(arrivals[..2], ["v1", "v2"]);
    assert!(arrivals[2..].iter().all(|a| a == "v2"), "{arrivals:?}");
}

/// A request that timed out may have been taken by the endpoint all the same: `outbox retry`
/// leaves the profile's older dead letter as it is, through the agent and, after a clean stop,
/// on the store, until the newer export is delivered, which supersedes it.
#[tokio::test]
async fn retry_holds_a_dead_letter_behind_a_newer_export_whose_request_got_no_answer() {
    let destination = Destination::start().await;
    let (arrivals, hold_newer) = refuse_v1_hold_v2(&destination);
    let (ws, port) = workspace_delivering(&destination, "request_timeout_ms = 500");
    let mut agent = AgentProcess::start(&ws.config_path(), port).await;
    let older = dead_v1_then_v2(&ws).await;
    // A second attempt: the first timed out.
    wait_until(10, "the newer export sent twice", || {
        arrivals.lock().unwrap().len() >= 3
    })
    .await;
    let newer = id_of(&ws, "p1", &[]);

    let held = format!("{older} (before {newer})");
    let assert_held = |out: &Output| {
        assert_eq!(out.status.code(), Some(1), "{}", stderr_of(out));
        let stderr = stderr_of(out);
        assert!(
            stderr.contains("a request of it got no answer") && stderr.contains(&held),
            "{stderr}"
        );
    };
    assert_held(&ws.run(&["outbox", "retry", &older], None));
    agent.terminate().await;
    {
        // Held by the mark of the unanswered request, not by an unclean stop.
        let db = open_with_sled_alone(&ws.store_path()).unwrap();
        let meta = db.open_tree("meta").unwrap();
        assert!(!meta.contains_key("delivering").unwrap(), "a clean stop");
        let retry_at = db.open_tree("retry_at").unwrap();
        let marks: Vec<Vec<u8>> = retry_at.iter().map(|e| e.unwrap().1.to_vec()).collect();
        assert!(
            matches!(marks.as_slice(), [mark] if mark.len() == 9 && mark[8] == 1),
            "{marks:?}"
        );
    }
    assert_held(&ws.run(&["outbox", "retry", &older], None));
    assert_counts(&ws, 1, 1);

    let agent = AgentProcess::start(&ws.config_path(), port).await;
    hold_newer.store(false, std::sync::atomic::Ordering::SeqCst);
    superseded_once_delivered(&ws, agent, &arrivals, &older, &newer).await;
}

/// After a `kill -9` with a newer export of a profile in flight (the endpoint may have
/// acknowledged it, unrecorded), `outbox retry` leaves the profile's older dead letter as it is
/// until the newer export is delivered, which supersedes it, on the store and through the agent
/// alike: the endpoint never gets the older export after the newer one.
#[tokio::test]
async fn retry_after_a_crash_holds_a_dead_letter_behind_a_newer_export_maybe_acknowledged() {
    let destination = Destination::start().await;
    let (arrivals, hold_newer) = refuse_v1_hold_v2(&destination);
    let (ws, port) = workspace_delivering(&destination, "request_timeout_ms = 1000");
    let mut agent = AgentProcess::start(&ws.config_path(), port).await;
    let older = dead_v1_then_v2(&ws).await;
    wait_until(10, "the newer export at the endpoint", || {
        arrivals.lock().unwrap().len() == 2
    })
    .await;
    agent
        .signal_and_wait(libc::SIGKILL, Duration::from_secs(5))
        .await;
    let newer = id_of(&ws, "p1", &[]);

    let held = format!("{older} (before {newer})");
    let assert_held = |out: &Output| {
        assert_eq!(out.status.code(), Some(1), "{}", stderr_of(out));
        let stderr = stderr_of(out);
        assert!(
            stderr.contains("may already have been acknowledged by the endpoint")
                && stderr.contains(&held),
            "{stderr}"
        );
    };
    assert_held(&ws.run(&["outbox", "retry", &older], None));
    let out = ws.run_ok(&["outbox", "retry", "--all-dead"], None);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "0 export(s) put back in the outbox", "{out}");
    assert!(
        lines[1].starts_with("1 dead letter(s) left as they are: a newer export")
            && lines[1].ends_with(&held),
        "{out}"
    );
    assert_counts(&ws, 1, 1);

    // Through the agent, which sends the newer export again (held again by the endpoint, so
    // its attempts time out and it stays pending).
    let agent = AgentProcess::start(&ws.config_path(), port).await;
    wait_until(10, "the newer export sent again", || {
        arrivals.lock().unwrap().len() >= 3
    })
    .await;
    assert_held(&ws.run(&["outbox", "retry", &older], None));
    hold_newer.store(false, std::sync::atomic::Ordering::SeqCst);
    superseded_once_delivered(&ws, agent, &arrivals, &older, &newer).await;
}

/// `outbox drop` asks on a terminal before it opens the store, so that an agent started while
/// the question waits for its answer (a service manager restarting it) is not kept from its
/// store; the drop then goes through that agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_starts_while_drop_waits_for_its_answer() {
    use std::io::Write;
    let destination = Destination::start().await;
    let (ws, port) = workspace(&destination);
    ws.run_ok(
        &["ingest", "-"],
        Some(updates(&["bad1"]).join("\n").as_bytes()),
    );
    let (mut master, mut dropping) =
        spawn_on_a_terminal(&ws.config_path(), &["outbox", "drop", "--all-dead"]);
    let asked = read_question(dropping.stderr.as_mut().unwrap());
    assert!(
        asked.contains("Delete every dead letter for good?"),
        "{asked:?}"
    );
    // Panics unless the agent opens its store and answers /healthz while the question waits.
    let agent = AgentProcess::start(&ws.config_path(), port).await;
    wait_counts(&ws, 0, 1).await;
    master.write_all(b"y\n").unwrap();
    let out = dropping.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().next(),
        Some("1 export(s) deleted"),
        "{out:?}"
    );
    assert_counts(&ws, 0, 0);
    drop(agent);
}

/// Off a terminal `outbox drop` without `--yes` deletes nothing: a script that forgot the
/// flag is told to give it, as `repair` tells it, rather than deleting unasked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_off_a_terminal_without_yes_deletes_nothing() {
    let destination = Destination::start().await;
    let (ws, _port) = workspace(&destination);
    ws.run_ok(
        &["ingest", "-"],
        Some(updates(&["p1"]).join("\n").as_bytes()),
    );
    let id = id_of(&ws, "p1", &[]);
    let out = ws.run(&["outbox", "drop", &id], None);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr_of(&out).contains(
            "outbox drop asks for confirmation on a terminal; give --yes to go ahead without"
        ),
        "{out:?}"
    );
    assert_counts(&ws, 1, 0);
    ws.run_ok(&["outbox", "drop", &id, "--yes"], None);
    assert_counts(&ws, 0, 0);
}

/// `outbox drop` on a terminal looks its ids up before it asks: a mistyped one is named at
/// once, nothing is asked and nothing dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_names_an_id_it_cannot_find_before_it_asks() {
    use std::io::Write;
    let destination = Destination::start().await;
    let (ws, _port) = workspace(&destination);
    ws.run_ok(
        &["ingest", "-"],
        Some(updates(&["p1"]).join("\n").as_bytes()),
    );
    let present = id_of(&ws, "p1", &[]);
    let (store, _) = present.split_once('-').unwrap();
    let mistyped = format!("{store}-999999");
    let (mut master, dropping) =
        spawn_on_a_terminal(&ws.config_path(), &["outbox", "drop", &present, &mistyped]);
    // Were it asked, the question would be answered no (and the question seen below).
    master.write_all(b"n\n").unwrap();
    let out = dropping.wait_with_output().unwrap();
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(!stderr.contains("[y/N]"), "{stderr}");
    assert!(
        stderr.contains(&format!("not found: {mistyped}; nothing dropped")),
        "{stderr}"
    );
    assert_counts(&ws, 1, 0);
}

/// An agent started while an outpost command holds the store (one begun while the previous
/// agent stopped, say) waits for it rather than exit 'in use', and says what holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_waits_for_a_store_an_outpost_command_holds() {
    let destination = Destination::start().await;
    let (ws, port) = workspace(&destination);
    ws.make_store();
    let held = Store::open(&ws.store_path(), CACHE_BYTES).unwrap();
    let mut agent = agent_waiting_for_the_store(&ws.config_path(), port).await;
    assert!(
        agent
            .log()
            .contains("in use by another process (an outpost command"),
        "{}",
        agent.log()
    );
    drop(held);
    // Panics unless /healthz answers 200 within 15 s.
    agent.wait_until_healthy().await;

    // A second agent on the store of one that runs says which holds it, and waits as long.
    let second_port = free_port();
    let second_config = ws.path().join("second.toml");
    let text = std::fs::read_to_string(ws.config_path()).unwrap();
    let listen = format!("127.0.0.1:{port}");
    assert!(text.contains(&listen), "{text}");
    let text = text.replace(&listen, &format!("127.0.0.1:{second_port}"));
    std::fs::write(&second_config, text).unwrap();
    let mut second = agent_waiting_for_the_store(&second_config, second_port).await;
    assert!(
        second
            .log()
            .contains("in use by an agent (`outpost run`) that answers on its admin socket"),
        "{}",
        second.log()
    );
    let status = second
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(5))
        .await;
    assert_eq!(status.code(), Some(0), "{}", second.log());
    drop(agent);

    // A SIGTERM while it waits stops it there.
    let held = Store::open(&ws.store_path(), CACHE_BYTES).unwrap();
    let mut waiting = agent_waiting_for_the_store(&ws.config_path(), port).await;
    // Meanwhile its port is bound but not listened on: a connection is refused, not left
    // waiting unserved.
    let connected = std::net::TcpStream::connect(("127.0.0.1", port));
    assert_eq!(
        connected.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionRefused),
        "{}",
        waiting.log()
    );
    let status = waiting
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(5))
        .await;
    assert_eq!(status.code(), Some(0), "{}", waiting.log());
    drop(held);
}

/// Starts an agent on `config` and waits until it says it waits for its store.
async fn agent_waiting_for_the_store(config: &std::path::Path, port: u16) -> AgentProcess {
    let agent = AgentProcess::spawn_with_env(config, port, &[]);
    wait_until(15, "the agent waiting for the store", || {
        agent.log().contains("waiting up to 30 s")
    })
    .await;
    agent
}

/// `outbox drop` through the running agent answers only once the drop is durable: a `kill -9`
/// right after the answer does not bring the dropped export back, ahead of its profile's next.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drop_answered_by_the_agent_survives_kill_9() {
    let destination = Destination::start().await;
    // Exports of `hold…` profiles are answered 503 (retried) until allowed.
    let allowed = Arc::clone(&destination.allowed);
    destination
        .receiver
        .set_export_script(Some(Arc::new(move |_, r| {
            let profile = r.json().map(|p| profile_of(&p)).unwrap_or_default();
            if profile.starts_with("hold") && !allowed.lock().unwrap().contains(&profile) {
                Reply::Status(503, vec![], "busy".into())
            } else {
                Reply::Normal
            }
        })));
    let (ws, port) = workspace(&destination);
    let mut agent = AgentProcess::start(&ws.config_path(), port).await;
    let older = member_update("hold1", "old", "2026-01-01T00:00:01Z");
    let newer = member_update("hold1", "new", "2026-01-01T00:00:02Z");
    ws.run_ok(&["ingest", "-"], Some([older, newer].join("\n").as_bytes()));
    wait_counts(&ws, 2, 0).await;
    let listed = ws.run_ok(&["outbox", "list", "--profile", "hold1", "--json"], None);
    let ids: Vec<String> = listed
        .lines()
        .map(|line| {
            let export: Value = serde_json::from_str(line).unwrap();
            export["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 2, "{listed}");

    let out = ws.run_ok(&["outbox", "drop", &ids[0], "--yes"], None);
    assert_eq!(out.trim(), "1 export(s) deleted");
    let status = agent
        .signal_and_wait(libc::SIGKILL, Duration::from_secs(5))
        .await;
    assert_eq!(status.code(), None, "killed by a signal");

    destination.allow("hold1");
    let mut agent = AgentProcess::start(&ws.config_path(), port).await;
    wait_counts(&ws, 0, 0).await;
    // At least once: the newer may come twice, the dropped one never.
    let delivered = destination.delivered_keys();
    assert!(!delivered.contains(&ids[0]), "{delivered:?}");
    assert!(delivered.contains(&ids[1]), "{delivered:?}");
    agent.terminate().await;
}

/// A user the agent's socket is closed to (it is the agent user's alone) is told so, rather
/// than sent to open the store the agent holds. Needs root, to run the command as another
/// user (`setpriv`): skips without, and fails under CI.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_the_agents_socket_is_closed_to_is_told_so() {
    if !running_as_root() {
        return;
    }
    let destination = Destination::start().await;
    let (ws, port) = workspace(&destination);
    let _agent = AgentProcess::start(&ws.config_path(), port).await;
    open_to_others(&ws);
    let out = as_nobody(&ws, &["outbox", "stats"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is not open to this user"), "{stderr}");
}

/// Run as root on a store folder another user owns, `sudo outpost compact` and `outpost run`
/// act as that user: the files they leave are that user's, whose agent can then open its
/// store again, and a link the user put in the folder does not make root write where it
/// points. `run` reads a key file only root may read before it gives up root, and hands back
/// a store file root made before (an agent of an earlier build kept root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_run_as_root_on_another_users_store_runs_as_that_user() {
    if !running_as_root() {
        return;
    }
    let destination = Destination::start().await;
    let (ws, port) = nobodys_store_of_one_profile(&destination);
    let entries = || -> Vec<(PathBuf, u32, u32)> {
        let mut found = Vec::new();
        let mut folders = vec![ws.store_path()];
        while let Some(folder) = folders.pop() {
            for entry in std::fs::read_dir(&folder).unwrap() {
                let path = entry.unwrap().path();
                let meta = std::fs::symlink_metadata(&path).unwrap();
                if meta.is_dir() {
                    folders.push(path.clone());
                }
                found.push((path, meta.uid(), meta.gid()));
            }
        }
        found
    };

    let compacted = ws.run_ok(&["compact", "--json"], None);
    assert!(compacted.contains("\"bytes_after\""), "{compacted}");
    let all_nobodys = || {
        let entries = entries();
        assert!(entries.len() >= 3, "{entries:?}");
        for (path, uid, gid) in &entries {
            assert_eq!((*uid, *gid), (NOBODY, NOBODY), "{}", path.display());
        }
    };
    all_nobodys();

    let lock = ws.store_path().join("outpost.lock");
    let planted = plant_link_for_root(&ws, &lock);
    let mut refused = AgentProcess::spawn_with_env(&ws.config_path(), port, &[]);
    let status = refused.wait_for_exit(Duration::from_secs(15)).await;
    assert!(
        !planted.exists(),
        "root wrote through the link:\n{}",
        refused.log()
    );
    // Refused, as a store folder the user may not write is: a restart would not mend it.
    assert_eq!(status.code(), Some(2), "{}", refused.log());
    assert!(
        refused.log().contains("permission denied"),
        "{}",
        refused.log()
    );
    std::fs::remove_file(&lock).unwrap();

    // The store's main file as an agent run as root by an earlier build would leave it.
    let db = ws.store_path().join("db");
    std::os::unix::fs::chown(&db, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    // A CA file only root may read.
    let ca_file = ws.path().join("root-only-ca.pem");
    std::fs::write(&ca_file, common::pki::Ca::new("outpost test CA").pem()).unwrap();
    std::fs::set_permissions(&ca_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = std::fs::read_to_string(ws.config_path()).unwrap();
    let config = config.replacen(
        "[destination]\n",
        &format!(
            "[destination]\nca_file = {:?}\n",
            ca_file.display().to_string()
        ),
        1,
    );
    std::fs::write(ws.config_path(), config).unwrap();

    let mut agent = AgentProcess::start(&ws.config_path(), port).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let ids = |field: &str| -> Vec<String> {
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace().skip(1).map(str::to_owned).collect()
    };
    assert_eq!(ids("Uid:"), vec![NOBODY.to_string(); 4], "{status}");
    assert_eq!(ids("Gid:"), vec![NOBODY.to_string(); 4], "{status}");
    assert!(!ids("Groups:").contains(&"0".to_owned()), "{status}");
    let made = std::fs::symlink_metadata(&lock).unwrap();
    assert_eq!((made.uid(), made.gid()), (NOBODY, NOBODY), "made by nobody");
    agent.terminate().await;
    all_nobodys();
    let out = as_nobody(&ws, &["outbox", "stats", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["profiles"], 1, "{stats}");
}

/// The files of `[source.nats]` are read with the rights of the store's owner, whom the agent
/// acts as (the NATS client reads them again at each connection): one only root may read
/// stops the start, and the error says whose rights read it.
#[tokio::test]
async fn an_agent_run_as_root_says_whose_rights_could_not_read_a_nats_file() {
    if !running_as_root() {
        return;
    }
    let destination = Destination::start().await;
    let (ws, port) = nobodys_store_of_one_profile(&destination);
    let ca_file = ws.path().join("root-only-nats-ca.pem");
    std::fs::write(&ca_file, common::pki::Ca::new("outpost test CA").pem()).unwrap();
    std::fs::set_permissions(&ca_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut config = std::fs::read_to_string(ws.config_path()).unwrap();
    config.push_str(&format!(
        "\n[source.nats]\nservers = [\"nats://127.0.0.1:9\"]\nstream = \"UPDATES\"\nsubject_prefix = \"updates\"\npartitions = 1\nowned = \"0\"\ntls_ca_file = {:?}\n",
        ca_file.display().to_string()
    ));
    std::fs::write(ws.config_path(), config).unwrap();

    let mut refused = AgentProcess::spawn_with_env(&ws.config_path(), port, &[]);
    let status = refused.wait_for_exit(Duration::from_secs(15)).await;
    let log = refused.log();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("source.nats.tls_ca_file"), "{log}");
    assert!(log.contains("Permission denied"), "{log}");
    assert!(
        log.contains("(read as uid 65534, the store folder's owner, whose rights the agent takes)"),
        "{log}"
    );
}

/// Securebits that keep capabilities past `setuid` (`no_setuid_fixup`, which a service manager
/// may set) would leave a command acting as the store's owner with root's rights over files:
/// it refuses rather than follow the owner's link with them.
#[tokio::test]
async fn a_command_refuses_to_act_as_the_owner_with_roots_capabilities_kept() {
    if !running_as_root() {
        return;
    }
    let destination = Destination::start().await;
    let (ws, _port) = nobodys_store_of_one_profile(&destination);
    let lock = ws.store_path().join("outpost.lock");
    let planted = plant_link_for_root(&ws, &lock);

    let out = run_wrapped(
        &["setpriv", "--securebits", "+no_setuid_fixup"],
        &ws.config_path(),
        &["outbox", "stats", "--json"],
        None,
    );
    assert!(!planted.exists(), "written through the link: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("capabilities over files remain after taking uid 65534"),
        "{stderr}"
    );
}

/// Puts at `at`, in the store folder (which nobody owns), a link of nobody's to a file in a
/// folder only root may write in; returns where it points.
fn plant_link_for_root(ws: &Workspace, at: &Path) -> PathBuf {
    let root_only = ws.path().join("root-only");
    std::fs::create_dir_all(&root_only).unwrap();
    std::fs::set_permissions(&root_only, std::fs::Permissions::from_mode(0o755)).unwrap();
    let planted = root_only.join("planted");
    let _ = std::fs::remove_file(at);
    std::os::unix::fs::symlink(&planted, at).unwrap();
    std::os::unix::fs::lchown(at, Some(NOBODY), Some(NOBODY)).unwrap();
    planted
}

/// Run as root on a store folder another user owns, a command acts as that user, with that
/// user's groups: a link the user put in the folder in place of the lock file does not make
/// root write where it points.
#[tokio::test]
async fn a_command_run_as_root_on_another_users_store_acts_as_that_user() {
    if !running_as_root() {
        return;
    }
    let destination = Destination::start().await;
    let (ws, _port) = nobodys_store_of_one_profile(&destination);
    // Its group root's, as after `mkdir` and `chown USER`: the command takes the user's own.
    std::os::unix::fs::chown(ws.store_path(), None, Some(0)).unwrap();
    let lock = ws.store_path().join("outpost.lock");
    let planted = plant_link_for_root(&ws, &lock);

    // `check` keeps root's rights (for the key files), so it leaves the store unread.
    let checked = ws.run(&["check"], None);
    assert!(
        !planted.exists(),
        "root wrote through the link: {checked:?}"
    );
    let stdout = String::from_utf8_lossy(&checked.stdout);
    assert!(
        stdout.contains("clock            not read: the store is another user's"),
        "{checked:?}"
    );

    let out = ws.run(&["outbox", "stats", "--json"], None);
    assert!(!planted.exists(), "root wrote through the link: {out:?}");
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("permission denied"), "{stderr}");

    std::fs::remove_file(&lock).unwrap();
    let stats: Value =
        serde_json::from_str(&ws.run_ok(&["outbox", "stats", "--json"], None)).unwrap();
    assert_eq!(stats["pending"], 1, "{stats}");
    let made = std::fs::symlink_metadata(&lock).unwrap();
    assert_eq!((made.uid(), made.gid()), (NOBODY, NOBODY));
}

/// Root takes on the rights of a store's owner only where no one else may change what the path
/// names: in a folder anyone may write in, another could put a store folder of theirs in its
/// place, and in a sticky one (`/tmp`) anyone could have made it first. Such a store is
/// refused, and works once the folder is closed again.
#[tokio::test]
async fn a_command_as_root_refuses_a_users_store_another_may_have_put_there() {
    if !running_as_root() {
        return;
    }
    let destination = Destination::start().await;
    let (ws, _port) = nobodys_store_of_one_profile(&destination);
    let folder = ws.path().canonicalize().unwrap();
    let refused = |expected: &str| {
        let out = ws.run(&["outbox", "stats", "--json"], None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(expected), "{expected:?} not in {stderr}");
    };
    let set_mode = |mode: u32| {
        std::fs::set_permissions(ws.path(), std::fs::Permissions::from_mode(mode)).unwrap()
    };

    set_mode(0o777);
    refused(&format!(
        "but {}, on the way to it, may be written in by anyone",
        folder.display()
    ));
    refused(&format!("chmod go-w {}", folder.display()));

    set_mode(0o1777);
    refused(&format!(
        "{} belongs to uid 65534",
        folder.join("store").display()
    ));
    refused("another could have made it before the store's user did");

    set_mode(0o755);
    let stats: Value =
        serde_json::from_str(&ws.run_ok(&["outbox", "stats", "--json"], None)).unwrap();
    assert_eq!(stats["pending"], 1, "{stats}");
}

/// Root keeps its rights only on a store no one else may change the path to: in a folder of
/// nobody's, nobody could swap root's store folder for one of theirs between the command's look
/// at it and the open, and root would write through its links; in a store folder others may
/// write in, they could put links there. Such a store is refused, and works once the path is
/// root's alone again.
#[tokio::test]
async fn a_command_as_root_refuses_a_store_of_roots_that_another_may_change_the_path_to() {
    if !running_as_root() {
        return;
    }
    let destination = Destination::start().await;
    let (ws, _port) = workspace(&destination);
    ws.run_ok(
        &["ingest", "-"],
        Some(updates(&["p1"]).join("\n").as_bytes()),
    );
    open_to_others(&ws);
    let refused = |expected: &str| {
        let out = ws.run(&["outbox", "stats", "--json"], None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
    };

    std::os::unix::fs::chown(ws.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    // Named as the walk finds it, without links.
    let folder = ws.path().canonicalize().unwrap();
    refused(&format!(
        "but {}, on the way to it, belongs to uid 65534",
        folder.display()
    ));
    refused("give the store to that user (chown -R 65534");

    std::os::unix::fs::chown(ws.path(), Some(0), Some(0)).unwrap();
    std::fs::set_permissions(ws.store_path(), std::fs::Permissions::from_mode(0o757)).unwrap();
    refused("would be opened with root's rights, but it may be written in by anyone");
    refused(&format!("chmod go-w {}", ws.store_path().display()));

    // What another put in it while they could stays after they no longer can.
    std::fs::set_permissions(ws.store_path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let conf = ws.store_path().join("conf");
    std::fs::remove_file(&conf).unwrap();
    let planted = plant_link_for_root(&ws, &conf);
    refused(&format!(
        "is root's, but it holds a link, {}",
        conf.display()
    ));
    assert!(!planted.exists());

    std::fs::remove_file(&conf).unwrap();
    let stats: Value =
        serde_json::from_str(&ws.run_ok(&["outbox", "stats", "--json"], None)).unwrap();
    assert_eq!(stats["pending"], 1, "{stats}");
}

/// A store yet to be made in a folder of another user's is made by that user: root, making it,
/// would be in a place the user may change. Not when that user's folder sits in a sticky
/// folder anyone may write in: anyone could have made it first. One to be made in such a
/// folder itself is made by root, closed to others' writes whatever the umask, and a command
/// that needs a store there makes none.
#[tokio::test]
async fn a_command_as_root_makes_a_new_store_in_another_users_folder_as_that_user() {
    if !running_as_root() {
        return;
    }
    let destination = Destination::start().await;
    let (ws, _port) = workspace(&destination);
    let store_at = |from: &str, to: &str| {
        let config = std::fs::read_to_string(ws.config_path()).unwrap();
        let moved = config.replace(&format!("path = \"{from}\""), &format!("path = \"{to}\""));
        assert_ne!(moved, config);
        std::fs::write(ws.config_path(), moved).unwrap();
    };
    for (path, mode) in [(ws.path().to_path_buf(), 0o755), (ws.config_path(), 0o644)] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let home = ws.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(NOBODY), Some(NOBODY)).unwrap();
    store_at("store", "home/store");

    ws.run_ok(
        &["ingest", "-"],
        Some(updates(&["p1"]).join("\n").as_bytes()),
    );
    let store = std::fs::metadata(home.join("store")).unwrap();
    assert_eq!((store.uid(), store.gid()), (NOBODY, NOBODY));
    for entry in std::fs::read_dir(home.join("store")).unwrap() {
        let made = entry.unwrap().metadata().unwrap();
        assert_eq!(made.uid(), NOBODY, "{made:?}");
    }

    // A folder of nobody's in a sticky folder anyone may write in: refused.
    let sticky = ws.path().join("sticky");
    std::fs::create_dir(&sticky).unwrap();
    std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::create_dir(sticky.join("nobodys")).unwrap();
    std::os::unix::fs::chown(sticky.join("nobodys"), Some(NOBODY), Some(NOBODY)).unwrap();
    store_at("home/store", "sticky/nobodys/store");
    let out = ws.run(
        &["ingest", "-"],
        Some(updates(&["p1"]).join("\n").as_bytes()),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("another could have made it before the store's user did"),
        "{stderr}"
    );
    assert!(!sticky.join("nobodys/store").exists());

    // In a sticky folder anyone may write in (`/tmp`, a fresh tmpfs), root makes the store
    // folder itself first, and keeps it.
    store_at("sticky/nobodys/store", "sticky/store");
    // A command that needs a store there makes none.
    let out = ws.run(&["outbox", "stats"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("there is no store at"), "{stderr}");
    assert!(!sticky.join("store").exists());
    // Under a umask that leaves what it makes open to all, too.
    let input = updates(&["p1"]).join("\n");
    let out = run_wrapped(
        &["sh", "-c", "umask 000 && exec \"$0\" \"$@\""],
        &ws.config_path(),
        &["ingest", "-"],
        Some(input.as_bytes()),
    );
    assert!(out.status.success(), "{out:?}");
    let store = sticky.join("store");
    let mut made = vec![(store.clone(), std::fs::metadata(&store).unwrap())];
    for entry in std::fs::read_dir(&store).unwrap() {
        let path = entry.unwrap().path();
        made.push((path.clone(), std::fs::symlink_metadata(&path).unwrap()));
    }
    for (path, meta) in made {
        assert_eq!(meta.uid(), 0, "{}", path.display());
        assert_eq!(
            meta.mode() & 0o022,
            0,
            "{}: {:o}",
            path.display(),
            meta.mode()
        );
    }
}

/// A workspace whose store, holding one profile, and everything in it are the user nobody's,
/// its config readable by all.
fn nobodys_store_of_one_profile(destination: &Destination) -> (Workspace, u16) {
    let (ws, port) = workspace(destination);
    ws.run_ok(
        &["ingest", "-"],
        Some(updates(&["p1"]).join("\n").as_bytes()),
    );
    open_to_others(&ws);
    give_store_to_nobody(&ws);
    (ws, port)
}

/// Hands the workspace's store folder and everything in it to the user nobody.
fn give_store_to_nobody(ws: &Workspace) {
    let mut folders = vec![ws.store_path()];
    std::os::unix::fs::chown(ws.store_path(), Some(NOBODY), Some(NOBODY)).unwrap();
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                folders.push(path.clone());
            }
            std::os::unix::fs::lchown(path, Some(NOBODY), Some(NOBODY)).unwrap();
        }
    }
}

const NOBODY: u32 = 65534;

/// Lets other users read the config and look into the store's folder.
fn open_to_others(ws: &Workspace) {
    for (path, mode) in [
        (ws.path().to_path_buf(), 0o755),
        (ws.config_path(), 0o644),
        (ws.store_path(), 0o755),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

/// `outpost --config … ARGS` run as the user nobody.
fn as_nobody(ws: &Workspace, args: &[&str]) -> Output {
    run_wrapped(
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
        &ws.config_path(),
        args,
        None,
    )
}

/// SIGINT while `outpost ingest -` reads its input, typed into a terminal or coming down a
/// pipe, ends it at once with nothing stored: it went on reading until the input ended. With
/// `--json`, the error line is printed too, its `stored` counting the `--skip`ped updates.
#[test]
fn an_ingest_stopped_while_it_reads_its_input_ends_at_once_with_nothing_stored() {
    let ws = Workspace::new();
    let line = update("p1", "Ada");
    let (stdout, _) = stop_while_it_reads_its_input(ws.command(&["ingest", "-"]), &line);
    assert_eq!(stdout, "");
    assert!(!ws.store_path().exists(), "a store was made");
    let command = ws.command(&["ingest", "-", "--json", "--skip", "3"]);
    let (stdout, _) = stop_while_it_reads_its_input(command, &line);
    let error: serde_json::Value = serde_json::from_str(&stdout).expect(&stdout);
    assert_eq!(
        error,
        serde_json::json!({
            "error": "stopped by SIGINT or SIGTERM before it stored or published any update",
            "stored": 3,
        })
    );
    assert!(!ws.store_path().exists(), "a store was made");
}

/// A signal stops `outpost ingest` between two requests: it says how many updates of the
/// input were stored and how to store the rest (`--skip`), which stores each once. It ended
/// silently, with nothing to go on from but the input's start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_stopped_by_a_signal_says_how_to_store_the_rest() {
    const UPDATES: u64 = 10_000;
    let destination = Destination::start().await;
    let (ws, port) = workspace(&destination);
    let _agent = AgentProcess::start(&ws.config_path(), port).await;
    let lines: Vec<String> = (0..UPDATES)
        .map(|i| update(&format!("p{i}"), "Ada"))
        .collect();
    let file = write_file(&ws, "many.ndjson", &lines);
    let ingesting = ws
        .command(&["ingest", &file])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats(&ws)["profiles"] == 0 {
        assert!(Instant::now() < deadline, "nothing stored in 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (stored, stderr) = stop_with_sigint(ingesting);
    assert!(
        stored > 0 && stored < UPDATES,
        "stopped after {stored}: {stderr}"
    );
    assert!(
        stderr.contains(&format!("the first {stored} of {UPDATES} updates were stored, the rest not; run the same input again with --skip {stored}")),
        "{stderr}"
    );
    assert_eq!(stats(&ws)["profiles"], stored);
    let rest = ws.run_ok(&["ingest", &file, "--skip", &stored.to_string()], None);
    assert!(
        rest.contains(&format!(
            "accepted {} updates: {} exports",
            UPDATES - stored,
            UPDATES - stored
        )),
        "{rest}"
    );
    assert_eq!(stats(&ws)["profiles"], UPDATES);
}
