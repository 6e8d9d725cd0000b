//! Unreadable records: bad bytes written straight into a store with sled before the real agent
//! (or CLI) opens it. Nothing panics; an unreadable export becomes a dead letter "unreadable
//! record"; an update of an unreadable profile (or of a profile in an unreadable group) is
//! refused, naming it, until `outpost repair` forgets it; unreadable meta values are rebuilt at
//! open. `outpost check --store` lists them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::agent_process::{free_port, AgentProcess};
use common::*;
use outpost::receiver::{Receiver, ReceiverOptions};
use outpost::store::committer::REQUEST_CHUNK;
use outpost::store::groups::{encode, group_key, GroupView};

struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    store: PathBuf,
    port: u16,
    receiver: Receiver,
}

async fn setup() -> Setup {
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = receiver.base_url();
    let text = agent_config_text(&base, &oauth_body(&base), "").replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    let config = dir.path().join("outpost.toml");
    std::fs::write(&config, text).unwrap();
    Setup {
        store: dir.path().join("store"),
        config,
        port,
        receiver,
        _dir: dir,
    }
}

impl Setup {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write;
        let mut child = Command::new(binary())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let input = stdin.unwrap_or("").to_owned();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    fn ingest(&self, lines: &[String]) -> Output {
        self.run(&["ingest", "-"], Some(&lines.join("\n")))
    }

    async fn agent(&self) -> AgentProcess {
        AgentProcess::start(&self.config, self.port).await
    }

    /// The tree and key of the one record `outpost check --store` lists.
    fn the_one_unreadable(&self) -> (String, String) {
        let out = self.run(&["check", "--store", "--json"], None);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let listed = json_lines(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(listed.len(), 1, "{listed:?}");
        let field = |name: &str| listed[0][name].as_str().unwrap_or_default().to_owned();
        (field("tree"), field("key"))
    }

    /// Runs `outpost repair --yes`, which must succeed; how many keys it deleted as naming
    /// nothing.
    fn repair_deleting_keys(&self) -> usize {
        let out = self.run(&["repair", "--yes"], None);
        assert!(out.status.success(), "{}", text(&out));
        text(&out)
            .matches(": deleted (the key names nothing)")
            .count()
    }

    /// The (tree, key) of every record `outpost check --store` lists, sorted; it must exit 1.
    fn unreadable_listed(&self) -> Vec<(String, String)> {
        let out = self.run(&["check", "--store", "--json"], None);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let mut listed: Vec<(String, String)> = json_lines(&String::from_utf8_lossy(&out.stdout))
            .iter()
            .map(|r| {
                (
                    r["tree"].as_str().unwrap().into(),
                    r["key"].as_str().unwrap().into(),
                )
            })
            .collect();
        listed.sort();
        listed
    }

    /// Writes `value` under `key` in `tree` with sled itself (no agent may run).
    fn corrupt(&self, tree: &str, key: &[u8], value: &[u8]) {
        corrupt(&self.store, tree, key, value)
    }

    /// The sequence number of the `n`th export (from 0) in the outbox, read with sled itself.
    fn outbox_seq(&self, n: usize) -> u64 {
        let db = open_with_sled_alone(&self.store).unwrap();
        let key = db.open_tree("outbox").unwrap().iter().keys().nth(n);
        let key = key.expect("an export that many in").unwrap();
        u64::from_be_bytes(key.as_ref().try_into().unwrap())
    }
}

fn corrupt(store: &Path, tree: &str, key: &[u8], value: &[u8]) {
    let db = open_with_sled_alone(store).unwrap();
    db.open_tree(tree).unwrap().insert(key, value).unwrap();
    db.flush().unwrap();
}

/// Replaces profile `id`'s value inside its group with `value`, with sled itself.
fn corrupt_profile(store: &Path, id: &str, value: &[u8]) {
    let db = open_with_sled_alone(store).unwrap();
    let groups = db.open_tree("profile_groups").unwrap();
    let key = group_key(id);
    let stored = groups
        .get(key)
        .unwrap()
        .expect("the profile's group is stored");
    let view = GroupView::decode(&stored).unwrap();
    assert!(view.get(id).is_some(), "{id} is stored");
    groups
        .insert(key, view.with_changes(&[(id, Some(value))]).unwrap())
        .unwrap();
    db.flush().unwrap();
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stats(s: &Setup) -> serde_json::Value {
    outbox_stats(&s.config)
}

fn update(id: &str, name: &str) -> String {
    member_update(id, name, "2026-01-01T00:00:00Z")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_export_becomes_a_dead_letter_and_the_others_go() {
    let s = setup().await;
    let out = s.ingest(&[update("p0", "a"), update("p1", "b"), update("p2", "c")]);
    assert!(out.status.success(), "{}", text(&out));
    let second = s.outbox_seq(1);
    s.corrupt("outbox", &second.to_be_bytes(), b"\x02not an export");

    let out = s.run(&["check", "--store"], None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("outbox ") && listed.contains(&format!("-{second}: ")),
        "{listed}"
    );

    // The CLI reads the outbox around it.
    let out = s.run(&["outbox", "list", "--json"], None);
    assert!(out.status.success(), "{}", text(&out));
    let listed = json_lines(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed[1]["last_error"]
        .as_str()
        .is_some_and(|e| e.starts_with("unreadable record")));
    assert_eq!(stats(&s)["pending"], 3);

    let mut agent = s.agent().await;
    wait_until(20, "the readable exports delivered", || {
        s.receiver.delivered().len() >= 2
    })
    .await;
    wait_until(20, "the unreadable one dead-lettered", || {
        stats(&s)["dead"] == 1 && stats(&s)["pending"] == 0
    })
    .await;
    let delivered = delivered_profiles(&s.receiver);
    assert_eq!(delivered.len(), 2, "{delivered:?}");
    assert!(delivered.contains(&"p0".into()) && delivered.contains(&"p2".into()));
    let out = s.run(&["outbox", "list", "--dead", "--json"], None);
    let dead = json_lines(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(dead.len(), 1, "{}", text(&out));
    assert!(
        dead[0]["last_error"]
            .as_str()
            .unwrap()
            .starts_with("unreadable record"),
        "{}",
        dead[0]
    );
    let id = dead[0]["id"].as_str().unwrap().to_owned();
    assert!(seq_of(&id) == second, "{id}");
    assert!(agent.log().contains(&id), "the log names the export");

    // Nothing can be sent from it.
    let out = s.run(&["outbox", "retry", &id], None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("unreadable"), "{}", text(&out));
    // Nor when every dead letter is asked for: it is left, and said, with exit 1.
    let out = s.run(&["outbox", "retry", "--all-dead"], None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains(&id), "{}", text(&out));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.receiver.delivered().len(), 2);
    assert_eq!(stats(&s)["dead"], 1);
    agent.terminate().await;

    // A dead letter whose own bytes cannot be read is dropped all the same.
    s.corrupt("dead", &second.to_be_bytes(), b"\x02not an export either");
    let out = s.run(&["outbox", "drop", &id, "--yes"], None);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stats(&s)["dead"], 0);
    assert_eq!(stats(&s)["pending"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_profile_refuses_its_updates_until_repair_forgets_it() {
    let s = setup().await;
    let out = s.ingest(&[update("p0", "a"), update("p1", "b")]);
    assert!(out.status.success(), "{}", text(&out));
    corrupt_profile(&s.store, "p1", b"\x01\xff\xff\xff");

    // The CLI on the store: refused, naming the profile; nothing of the input stored.
    let out = s.ingest(&[update("p0", "a2"), update("p1", "b2")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("profile `p1` is unreadable") && stderr.contains("outpost repair"),
        "{stderr}"
    );
    assert!(
        stderr.contains("nothing of the input was stored"),
        "{stderr}"
    );
    assert_eq!(stats(&s)["pending"], 2);

    let mut agent = s.agent().await;
    let addr = agent.addr;
    let (status, body) = http_post(addr, "/v1/updates", update("p1", "b3"), &[]).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("profile `p1` is unreadable"), "{body}");
    let (status, body) = http_post(addr, "/v1/updates", update("p0", "a3"), &[]).await;
    assert_eq!(status, 200, "other profiles go on: {body}");
    // A request larger than a chunk is committed a chunk at a time: with p1's update last, the
    // chunk before it is stored, and the answer says so.
    let new_ones: Vec<String> = (0..REQUEST_CHUNK)
        .map(|i| update(&format!("n{i}"), "n"))
        .collect();
    let large = format!("{}\n{}", new_ones.join("\n"), update("p1", "b4"));
    let (status, body) = http_post(addr, "/v1/updates", large.clone(), &[]).await;
    assert_eq!(status, 500, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["stored"], REQUEST_CHUNK, "{answer}");
    // Both refused requests count once each as refused; the chunk stored, as exported.
    let refused = metric(addr, r#"outpost_updates_total{result="refused"}"#).await;
    assert_eq!(refused, 2.0);
    let exported = metric(addr, r#"outpost_updates_total{result="exported"}"#).await;
    assert_eq!(exported, 1.0 + REQUEST_CHUNK as f64);
    let said = answer["error"].as_str().unwrap();
    assert!(
        said.contains("profile `p1` is unreadable")
            && said.contains(&format!(
                "the first {REQUEST_CHUNK} of {} updates were stored, the rest not; once this is fixed, send the updates after the first `stored` again",
                REQUEST_CHUNK + 1
            )),
        "{said}"
    );

    // Listed through the running agent, then forgotten on the operator's word.
    assert_eq!(s.the_one_unreadable(), ("profiles".into(), "p1".into()));
    let out = s.run(&["repair"], None);
    assert_eq!(
        out.status.code(),
        Some(2),
        "asks for --yes off a terminal: {}",
        text(&out)
    );
    let out = s.run(&["repair", "--yes"], None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("profile p1: forgotten"),
        "{}",
        text(&out)
    );

    // Sent again, the request's stored updates change nothing.
    let (status, body) = http_post(addr, "/v1/updates", large, &[]).await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["unchanged"], REQUEST_CHUNK, "{answer}");
    assert_eq!(answer["exports"], 1, "p1 is a new profile now: {answer}");
    let out = s.run(&["check", "--store"], None);
    assert!(out.status.success(), "{}", text(&out));
    agent.terminate().await;
}

/// An id is printed as `check --store` shows it, its control characters escaped: it comes from
/// whoever sent the update, and an escape sequence in it would act on the operator's terminal.
#[test]
fn repair_escapes_the_ids_it_names() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let s = runtime.block_on(setup());
    let id = "p\u{1b}]0;owned\u{7}";
    let line = update(id, "a");
    let out = s.ingest(std::slice::from_ref(&line));
    assert!(out.status.success(), "{}", text(&out));
    corrupt_profile(&s.store, id, b"\x01\xff\xff\xff");
    let out = s.run(&["repair", "--yes"], None);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains('\u{1b}') && !stdout.contains('\u{7}'),
        "{stdout:?}"
    );
    assert!(
        stdout.contains("profiles p\\u{1b}]0;owned\\u{7}: ")
            && stdout.contains("profile p\\u{1b}]0;owned\\u{7}: forgotten"),
        "{stdout:?}"
    );
}

#[test]
fn an_unreadable_group_refuses_the_updates_of_its_profiles_until_repair_forgets_them() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let s = runtime.block_on(setup());
    let out = s.ingest(&[update("p0", "a"), update("p1", "b")]);
    assert!(out.status.success(), "{}", text(&out));
    let group = group_key("p1");
    assert_ne!(group, group_key("p0"), "the two profiles share no group");
    s.corrupt("profile_groups", &group, b"\x01\xff\xff\xff");

    let out = s.ingest(&[update("p1", "b2")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let name: String = group.iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        stderr.contains("profile `p1` is unreadable") && stderr.contains(&name),
        "{stderr}"
    );
    let out = s.ingest(&[update("p0", "a2")]);
    assert!(out.status.success(), "other groups go on: {}", text(&out));

    assert_eq!(
        s.the_one_unreadable(),
        ("profile_groups".into(), name.clone())
    );
    assert_eq!(
        stats(&s)["profiles"],
        2,
        "counted as stored until forgotten"
    );
    let out = s.run(&["repair", "--yes"], None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("profile group {name}: its profiles forgotten")),
        "{}",
        text(&out)
    );
    assert_eq!(stats(&s)["profiles"], 1, "recounted by repair");
    let out = s.run(&["ingest", "--json", "-"], Some(&update("p1", "b3")));
    assert!(out.status.success(), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["exports"], 1, "a new profile now: {summary}");
    let out = s.run(&["check", "--store"], None);
    assert!(out.status.success(), "{}", text(&out));
}

/// A readable `meta/next_seq` at or below a stored export's would number new exports over
/// older ones: it is raised past them at open, and said so, also when a damaged key (not an
/// export number) sorts after the last export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_export_number_behind_the_outbox_is_raised_at_open() {
    let s = setup().await;
    let out = s.ingest(&[update("p0", "a"), update("p1", "b")]);
    assert!(out.status.success(), "{}", text(&out));
    s.corrupt("meta", b"next_seq", &0u64.to_be_bytes());
    s.corrupt("outbox", &[0xff; 9], b"damaged");

    let mut agent = s.agent().await;
    let log = agent.log();
    assert!(
        log.contains("meta/next_seq was 0, not past export"),
        "{log}"
    );
    let (status, body) = http_post(agent.addr, "/v1/updates", update("p2", "c"), &[]).await;
    assert_eq!(status, 200, "{body}");
    wait_until(20, "the outbox empty", || stats(&s)["pending"] == 0).await;
    let mut delivered = delivered_profiles(&s.receiver);
    delivered.sort();
    assert_eq!(delivered, ["p0", "p1", "p2"]);
    agent.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_meta_values_are_rebuilt_at_open() {
    let s = setup().await;
    let out = s.ingest(&[update("p0", "a"), update("p1", "b")]);
    assert!(out.status.success(), "{}", text(&out));
    s.corrupt("meta", b"tally", b"xx");
    s.corrupt("meta", b"next_seq", b"abc");
    s.corrupt("meta", b"clock", b"\x09zz");
    s.corrupt("meta", b"profiles", b"x");
    s.corrupt("meta", b"mapping", b"\x01{");
    s.corrupt("meta", b"backfill", b"\x01{\"jobs\"");

    let mut agent = s.agent().await;
    let log = agent.log();
    for key in [
        "meta/tally",
        "meta/next_seq",
        "meta/clock",
        "meta/profiles",
        "meta/mapping",
        "meta/backfill",
    ] {
        assert!(log.contains(&format!("{key} was unreadable")), "{log}");
    }
    let (status, body) = http_post(agent.addr, "/v1/updates", update("p2", "c"), &[]).await;
    assert_eq!(status, 200, "{body}");
    wait_until(20, "three exports delivered", || {
        s.receiver.delivered().len() >= 3
    })
    .await;
    wait_until(20, "the outbox empty", || stats(&s)["pending"] == 0).await;
    let mut keys: Vec<u64> = s
        .receiver
        .delivered()
        .iter()
        .map(|r| seq_of(r.header("idempotency-key").unwrap()))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), 3, "{keys:?}");
    // The new export is numbered 2^32 past the highest held (the numbers of exports
    // delivered or dropped before are not known), not merely past the clock's floor.
    assert!(
        keys[2] - keys[1] > 1 << 32,
        "a new export is numbered far past every old one: {keys:?}"
    );
    let out = s.run(&["check", "--store", "--json"], None);
    assert!(out.status.success(), "{}", text(&out));
    let listed = json_lines(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(listed.len(), 6, "{listed:?}");
    let dropped: Vec<&str> = listed
        .iter()
        .filter(|r| r["action"] == "dropped when the store was opened")
        .filter_map(|r| r["key"].as_str())
        .collect();
    assert_eq!(dropped, ["mapping", "backfill"], "{listed:?}");
    assert!(listed.iter().all(|r| r["tree"] == "meta"), "{listed:?}");
    assert_eq!(stats(&s)["dead"], 0);
    assert_eq!(
        stats(&s)["profiles"],
        3,
        "recounted at open, then counted on"
    );
    agent.terminate().await;
}

/// A store whose exports have no tally (written before there was one) has them counted when
/// it is opened, rather than read as none pending.
#[test]
fn a_missing_tally_is_recounted_at_open() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let s = runtime.block_on(setup());
    let out = s.ingest(&[update("p0", "a"), update("p1", "b")]);
    assert!(out.status.success(), "{}", text(&out));
    let db = open_with_sled_alone(&s.store).unwrap();
    db.open_tree("meta").unwrap().remove(b"tally").unwrap();
    db.flush().unwrap();
    drop(db);
    assert_eq!(stats(&s)["pending"], 2);
}

/// Keys that cannot be what outpost wrote: a profile group whose key is not 4 bytes, a key
/// left in the old profile tree that is not UTF-8. `check` lists them, `repair` deletes them.
#[test]
fn keys_that_are_no_group_or_profile_are_listed_and_deleted() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let s = runtime.block_on(setup());
    let out = s.ingest(&[update("p0", "a")]);
    assert!(out.status.success(), "{}", text(&out));
    s.corrupt("profile_groups", b"\x00\x01\x02", &encode(&[("q", b"x")]));
    s.corrupt("profiles", b"\xffq", b"\x02");
    assert_eq!(stats(&s)["profiles"], 1, "neither is counted as a profile");

    assert_eq!(
        s.unreadable_listed(),
        [
            ("profile_groups".to_owned(), "000102".to_owned()),
            ("profiles".to_owned(), "\\xffq".to_owned())
        ]
    );
    let out = s.run(&["repair", "--yes"], None);
    assert!(out.status.success(), "{}", text(&out));
    let out = s.run(&["check", "--store"], None);
    assert!(out.status.success(), "{}", text(&out));
    let out = s.ingest(&[update("p0", "a")]);
    assert!(out.status.success(), "p0 kept: {}", text(&out));
    assert!(text(&out).contains("1 unchanged"), "{}", text(&out));
}

/// Stream records: an unreadable rejected message is listed, shown by `rejected list|show`
/// with its stored bytes and dropped by `rejected drop --all`; an unreadable position is
/// listed and left as it is by `repair`; keys of either tree that name nothing are listed and
/// deleted by `repair`.
#[test]
fn unreadable_stream_records_are_listed_and_rejected_ones_shown_with_their_bytes() {
    use base64::Engine;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let s = runtime.block_on(setup());
    let out = s.ingest(&[update("p0", "a")]);
    assert!(out.status.success(), "{}", text(&out));
    let mut rejected_key = 3u32.to_be_bytes().to_vec();
    rejected_key.extend(42u64.to_be_bytes());
    s.corrupt("rejected", &rejected_key, b"\x07\xffnot a record");
    s.corrupt("rejected", b"short", b"\x01");
    s.corrupt("positions", &5u32.to_be_bytes(), b"abc");
    s.corrupt("positions", b"\x00\x01", &[0u8; 16]);
    // A key that names no message hides none of the others.
    let out = s.run(&["rejected", "list", "--json"], None);
    assert!(out.status.success(), "{}", text(&out));
    let shown = json_lines(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(shown[0]["id"], "3-42", "{}", shown[0]);

    assert_eq!(
        s.unreadable_listed(),
        [
            ("positions".to_owned(), "5".to_owned()),
            ("positions".to_owned(), "\\x00\\x01".to_owned()),
            ("rejected".to_owned(), "3-42".to_owned()),
            ("rejected".to_owned(), "short".to_owned()),
        ]
    );
    let out = s.run(&["check", "--store"], None);
    assert!(
        text(&out).contains("positions 5: ")
            && text(&out).contains("; repair: left as it is")
            && text(&out).contains("2 unreadable record(s); `outpost repair` acts on them")
            && text(&out).contains("1 unreadable stream position(s)"),
        "{}",
        text(&out)
    );
    assert_eq!(s.repair_deleting_keys(), 2);
    let out = s.run(&["repair", "--yes"], None);
    assert!(
        text(&out).contains("no unreadable records for repair to act on"),
        "what is left is not for repair: {}",
        text(&out)
    );
    assert_eq!(
        s.unreadable_listed(),
        [
            ("positions".to_owned(), "5".to_owned()),
            ("rejected".to_owned(), "3-42".to_owned()),
        ]
    );

    let out = s.run(&["rejected", "list", "--json"], None);
    assert!(out.status.success(), "{}", text(&out));
    let shown = json_lines(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(shown.len(), 1, "{shown:?}");
    let shown = &shown[0];
    assert_eq!(shown["id"], "3-42", "{shown}");
    assert!(
        shown["error"]
            .as_str()
            .unwrap()
            .starts_with("unreadable record"),
        "{shown}"
    );
    assert_eq!(
        shown["raw_base64"],
        base64::engine::general_purpose::STANDARD.encode(b"\x07\xffnot a record"),
        "{shown}"
    );
    let out = s.run(&["rejected", "show", "3-42"], None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("unreadable record"), "{}", text(&out));
    let out = s.run(&["rejected", "drop", "--all"], None);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        s.unreadable_listed(),
        [("positions".to_owned(), "5".to_owned())]
    );

    // Only an unreadable position is set: none is not made, a readable one not changed.
    let out = s.run(&["nats", "set-position", "6", "1"], None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("partition 6 has no stream position"),
        "{}",
        text(&out)
    );
    let out = s.run(&["nats", "set-position", "5", "40"], None);
    assert!(out.status.success(), "{}", text(&out));
    let out = s.run(&["check", "--store", "--json"], None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(json_lines(&String::from_utf8_lossy(&out.stdout)).is_empty());
    let out = s.run(&["nats", "set-position", "5", "41"], None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("partition 5's stream position reads (40)"),
        "{}",
        text(&out)
    );
    // Where NATS cannot be reached, the number is set unchecked, with a warning.
    s.corrupt("positions", &5u32.to_be_bytes(), b"abc");
    let unreachable = s.config.with_file_name("nats-unreachable.toml");
    let config = std::fs::read_to_string(&s.config).unwrap()
        + "\n[source.nats]\nservers = [\"nats://127.0.0.1:1\"]\nstream = \"UPDATES\"\n\
           subject_prefix = \"test.updates\"\npartitions = 8\nowned = \"0-7\"\n";
    std::fs::write(&unreachable, config).unwrap();
    let out = Command::new(binary())
        .arg("--config")
        .arg(&unreachable)
        .args(["nats", "set-position", "5", "40"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("warning: 40 was not checked against the end of stream UPDATES"),
        "{}",
        text(&out)
    );
    let out = s.run(&["check", "--store", "--json"], None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(json_lines(&String::from_utf8_lossy(&out.stdout)).is_empty());
    // Readable now: a position that reads is never changed.
    let out = s.run(&["nats", "set-position", "5", "41"], None);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("partition 5's stream position reads (40)"),
        "{}",
        text(&out)
    );

    // `rejected drop --all` passes over a key that names nothing, too.
    s.corrupt("rejected", &rejected_key, b"\x07\xffnot a record");
    s.corrupt("rejected", b"short", b"\x01");
    let out = s.run(&["rejected", "drop", "--all"], None);
    assert!(out.status.success(), "{}", text(&out));
    // Keys written past the store, as damage is, are not in its count of rejected messages:
    // that is listed too, and `repair` counts them again.
    let meta_count = ("meta".to_owned(), "rejected".to_owned());
    assert_eq!(
        s.unreadable_listed(),
        [
            meta_count.clone(),
            ("rejected".to_owned(), "short".to_owned())
        ]
    );

    // Later messages at one place: a key that says it is the first again names nothing
    // (listed, deleted by `repair`); an unreadable one is shown under its id.
    let later = |n: u32| [rejected_key.clone(), n.to_be_bytes().to_vec()].concat();
    s.corrupt("rejected", &later(1), b"\x01");
    s.corrupt("rejected", &later(2), b"\x07\xffnot a record");
    let rejected = |key: &str| ("rejected".to_owned(), key.to_owned());
    assert_eq!(
        s.unreadable_listed(),
        [
            meta_count,
            rejected("3-42-2"),
            rejected(&later(1).escape_ascii().to_string()),
            rejected("short"),
        ]
    );
    let out = s.run(&["rejected", "show", "3-42-2"], None);
    assert!(text(&out).contains("unreadable record"), "{}", text(&out));
    assert_eq!(s.repair_deleting_keys(), 2);
    let out = s.run(&["check", "--store"], None);
    assert!(
        !text(&out).contains("meta rejected"),
        "counted again: {}",
        text(&out)
    );
    let out = s.run(&["rejected", "list", "--json"], None);
    let ids: Vec<String> = json_lines(&String::from_utf8_lossy(&out.stdout))
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["3-42-2"]);
}

/// `repair` lets the store go while it asks, and goes ahead only if what it would do is still
/// what it showed: a record that became unreadable meanwhile makes it stop, changing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_changes_nothing_when_what_is_unreadable_changed_while_it_asked() {
    use std::io::Write;
    let s = setup().await;
    let out = s.ingest(&[update("p0", "a"), update("p1", "b"), update("p2", "c")]);
    assert!(out.status.success(), "{}", text(&out));
    let (second, third) = (s.outbox_seq(1), s.outbox_seq(2));
    s.corrupt("outbox", &second.to_be_bytes(), b"\x02not an export");
    let (mut master, mut repair) = spawn_on_a_terminal(&s.config, &["repair"]);
    let asked = read_question(repair.stderr.as_mut().unwrap());
    assert!(asked.contains("Do this to 1 record(s)?"), "{asked}");
    // The store is not held while the question waits.
    s.corrupt("outbox", &third.to_be_bytes(), b"\x02not an export either");
    master.write_all(b"y\n").unwrap();
    let out = repair.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("changed while the question waited"),
        "{}",
        text(&out)
    );
    let out = s.run(&["check", "--store", "--json"], None);
    let listed = json_lines(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(listed.len(), 2, "nothing repaired: {listed:?}");
    assert_eq!(stats(&s)["pending"], 3);
}

/// A store whose sled files are damaged (a copy cut short in its second log segment, in
/// `tests/fixtures`) makes sled panic as it opens them. The agent and `check --store` say
/// what is wrong and what to do, in one line (JSON with `--log-format json`), not as a
/// panic's raw text; the agent exits 2, which a service manager does not restart on, the
/// command 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_whose_sled_files_are_damaged_is_said_to_be_so() {
    use std::io::Read;
    let s = setup().await;
    std::fs::create_dir_all(&s.store).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let gz = std::fs::File::open(fixtures.join("damaged-sled-db.gz")).unwrap();
    let mut db = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut db)
        .unwrap();
    std::fs::write(s.store.join("db"), db).unwrap();
    std::fs::copy(fixtures.join("damaged-sled-conf"), s.store.join("conf")).unwrap();
    let damaged = "cannot be opened: sled panicked reading its files (tried to serialize \
                   Uninitialized): they are damaged (or sled met a bug of its own), beyond \
                   what `outpost repair` mends";
    for (args, exit) in [
        (&["--log-format", "json", "check", "--store"][..], 1),
        (&["--log-format", "json", "run"][..], 2),
    ] {
        let out = s.run(args, None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(exit), "{args:?}: {stderr}");
        let lines: Vec<serde_json::Value> = stderr
            .lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{args:?}: {e}: {line}"))
            })
            .collect();
        let messages: Vec<&str> = lines
            .iter()
            .filter_map(|line| line["fields"]["message"].as_str())
            .collect();
        assert_eq!(messages, ["outpost failed"], "{stderr}");
        let error = lines[0]["fields"]["error"].as_str().unwrap();
        assert!(error.contains(damaged), "{args:?}: {error}");
    }
}
