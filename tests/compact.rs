//! `outpost compact`: the store rebuilt into a fresh database after a delivered backlog keeps
//! everything as it was: pending exports and dead letters (ids, payloads, attempts), profiles,
//! counts, and the numbering of exports; it reports the store's size on disk. A running agent
//! compacts its own store while updates arrive and exports are delivered. A folder with no
//! store is refused. What it gives back is measured by `cargo bench --bench agent` (section
//! (d)). Kills during a compaction are in `upgrade.rs`
//! (`a_rebuild_killed_at_random_instants_leaves_the_store_whole`).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::agent_process::{free_port, AgentProcess};
use common::*;
use outpost::receiver::{ReceiverOptions, Reply};
use serde_json::Value;

/// `outbox list --json --limit 0` with `extra` flags.
fn list(config: &std::path::Path, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["outbox", "list", "--json", "--limit", "0"];
    args.extend_from_slice(extra);
    json_lines(&outpost_ok(config, &args, ""))
}

fn outpost(config: &std::path::Path, args: &[&str], stdin: &str) -> std::process::Output {
    run_with_config(config, args, Some(stdin.as_bytes()))
}

fn outpost_ok(config: &std::path::Path, args: &[&str], stdin: &str) -> String {
    let out = outpost(config, args, stdin);
    assert!(out.status.success(), "outpost {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Each tree's name and its (key, value) pairs.
type Trees = std::collections::BTreeMap<String, Vec<(Vec<u8>, Vec<u8>)>>;

/// Every tree of the sled database at `store`.
fn every_tree(store: &std::path::Path) -> Trees {
    let db = open_with_sled_alone(store).unwrap();
    let trees = db
        .tree_names()
        .into_iter()
        .map(|name| {
            let entries = db
                .open_tree(&name)
                .unwrap()
                .iter()
                .map(|item| {
                    let (key, value) = item.unwrap();
                    (key.to_vec(), value.to_vec())
                })
                .collect();
            (String::from_utf8_lossy(&name).into_owned(), entries)
        })
        .collect();
    drop(db);
    trees
}

/// Bytes on the disk (allocated blocks) of the sled files in the store folder `store`.
fn sled_files_bytes(store: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fn under(path: &std::path::Path) -> u64 {
        let metadata = std::fs::symlink_metadata(path).unwrap();
        if metadata.is_dir() {
            std::fs::read_dir(path)
                .unwrap()
                .map(|entry| under(&entry.unwrap().path()))
                .sum()
        } else {
            metadata.blocks() * 512
        }
    }
    std::fs::read_dir(store)
        .unwrap()
        .map(|entry| entry.unwrap())
        .filter(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            matches!(name.as_str(), "conf" | "db" | "blobs") || name.starts_with("snap.")
        })
        .map(|entry| under(&entry.path()))
        .sum()
}

fn member_lines(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| member_update(&format!("{prefix}-{i:05}"), "Ann", "2026-01-01T00:00:01Z"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_after_a_delivered_backlog_keeps_everything_else() {
    const DELIVERED: usize = 6_000;
    let setup = receiver_setup(ReceiverOptions::default(), oauth_body, "").await;
    // Dead letters too: the receiver refuses the exports of profiles named `bad-…`.
    setup.receiver.set_export_script(Some(Arc::new(|_, r| {
        let profile = r.json().map(|p| profile_of(&p)).unwrap_or_default();
        if profile.starts_with("bad") {
            Reply::Status(400, vec![], "{\"error\":\"rejected\"}".into())
        } else {
            Reply::Normal
        }
    })));
    let config = setup._dir.path().join("outpost.toml");
    let backlog = format!(
        "{}\n{}",
        member_lines("p", DELIVERED),
        member_lines("bad", 3)
    );
    outpost_ok(&config, &["ingest", "-"], &backlog);
    let agent = start_agent(&setup.config).await;
    wait_until(60, "the backlog delivered, the bad ones dead", || {
        let tally = agent.store.tally().unwrap();
        tally.pending == 0 && tally.dead == 3
    })
    .await;
    agent.stop().await.unwrap();
    // Pending again, with the agent stopped: 50 changed profiles and 20 new ones.
    let pending_lines = format!(
        "{}\n{}",
        (0..50)
            .map(|i| member_update(&format!("p-{i:05}"), "Bea", "2026-01-01T00:00:02Z"))
            .collect::<Vec<_>>()
            .join("\n"),
        member_lines("q", 20)
    );
    outpost_ok(&config, &["ingest", "-"], &pending_lines);

    let pending_before = list(&config, &[]);
    let dead_before = list(&config, &["--dead"]);
    let stats_before = outbox_stats(&config);
    let profiles_before: Vec<String> = ["p-00000", "p-05999", "bad-00001", "q-00019"]
        .iter()
        .map(|id| outpost_ok(&config, &["profile", "show", id, "--json"], ""))
        .collect();
    assert_eq!(pending_before.len(), 70);
    assert_eq!(dead_before.len(), 3);
    assert_eq!(stats_before["profiles"], DELIVERED + 3 + 20);

    let trees_before = every_tree(&setup._dir.path().join("store"));
    let out = outpost_ok(&config, &["compact", "--json"], "");
    let compacted: Value = serde_json::from_str(out.trim()).unwrap();
    eprintln!("compacted: {compacted}");
    // How much a store this small gives back depends on how far sled's own cleaning got
    // (`cargo bench --bench agent` measures a large one); the figures must be the store's.
    let store = setup._dir.path().join("store");
    assert_eq!(compacted["bytes_after"], sled_files_bytes(&store));
    assert!(compacted["bytes_before"].as_u64().unwrap() > 0);
    assert_eq!(compacted["profiles"], DELIVERED + 3 + 20);
    assert_eq!(compacted["path"], store.to_str().unwrap());
    // Every key of every tree, byte for byte: positions, the mapping, the clock, counts.
    let trees_after = every_tree(&store);
    assert_eq!(
        trees_after.keys().collect::<Vec<_>>(),
        trees_before.keys().collect::<Vec<_>>()
    );
    for (name, entries) in &trees_before {
        assert!(trees_after[name] == *entries, "tree {name} differs");
    }
    assert!(trees_before["meta"].len() > 4 && trees_before["outbox"].len() == 70);

    assert_eq!(list(&config, &[]), pending_before);
    assert_eq!(list(&config, &["--dead"]), dead_before);
    let stats_after = outbox_stats(&config);
    for field in ["pending", "dead", "bytes", "profiles", "store_id"] {
        assert_eq!(stats_after[field], stats_before[field], "{field}");
    }
    // `outbox stats` shows the store's size on disk (opening it may have written some since).
    let shown = stats_after["store_disk_bytes"].as_u64().unwrap();
    let measured = sled_files_bytes(&store);
    assert!(
        shown > measured / 2 && shown < measured * 2,
        "outbox stats shows {shown} bytes on disk, the folder's sled files take {measured}"
    );
    let profiles_after: Vec<String> = ["p-00000", "p-05999", "bad-00001", "q-00019"]
        .iter()
        .map(|id| outpost_ok(&config, &["profile", "show", id, "--json"], ""))
        .collect();
    assert_eq!(profiles_after, profiles_before);
    outpost_ok(&config, &["check", "--store"], "");

    // An export made after the compaction goes with the others. (That its number is past
    // every earlier one follows from `meta/next_seq`, compared byte for byte above.)
    outpost_ok(
        &config,
        &["ingest", "-"],
        &member_update("r-1", "Cy", "2026-01-01T00:00:03Z"),
    );
    let newest = list(&config, &["--profile", "r-1"]);
    assert_eq!(newest.len(), 1);

    // The agent delivers what was pending from the compacted store.
    let agent = start_agent(&setup.config).await;
    wait_until(60, "the pending exports delivered", || {
        agent.store.tally().unwrap().pending == 0
    })
    .await;
    agent.stop().await.unwrap();
    let delivered_after: std::collections::HashSet<String> = setup
        .receiver
        .delivered()
        .iter()
        .map(|r| r.header("idempotency-key").unwrap().to_owned())
        .collect();
    for export in pending_before.iter().chain(&newest) {
        assert!(delivered_after.contains(export["id"].as_str().unwrap()));
    }
}

#[test]
fn compact_refuses_a_folder_without_a_store_and_makes_none() {
    let ws = Workspace::new();
    let out = ws.run(&["compact"], None);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(error.contains("there is no store at"), "{error}");
    assert!(!ws.store_path().exists(), "compact made a store folder");
}

/// The agent compacts its store when asked over its socket, while a client keeps sending
/// updates and exports are delivered: each update is acknowledged or refused with 503, every
/// acknowledged one is delivered, none of the refused ones is stored, and the agent takes
/// updates and delivers again after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_agent_compacts_its_store_while_updates_arrive() {
    const BEFORE: usize = 3_000;
    let setup = receiver_setup(ReceiverOptions::default(), oauth_body, "").await;
    let config = setup._dir.path().join("outpost.toml");
    let port = free_port();
    let text = std::fs::read_to_string(&config).unwrap();
    let listen = "listen = \"127.0.0.1:0\"";
    assert!(text.contains(listen), "{text}");
    std::fs::write(
        &config,
        text.replace(listen, &format!("listen = \"127.0.0.1:{port}\"")),
    )
    .unwrap();
    outpost_ok(&config, &["ingest", "-"], &member_lines("p", BEFORE));
    let mut agent = AgentProcess::start(&config, port).await;
    let addr = agent.addr;
    let stop_sending = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked_count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sender = tokio::spawn({
        let stop_sending = Arc::clone(&stop_sending);
        let acked_count = Arc::clone(&acked_count);
        async move {
            let (mut acked, mut refused) = (Vec::new(), Vec::new());
            for i in 0.. {
                if stop_sending.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let id = format!("live-{i:05}");
                let line = member_update(&id, "Liv", "2026-01-01T00:00:05Z");
                match http_post(addr, "/v1/updates", line, &[]).await {
                    (200, _) => {
                        acked.push(id);
                        acked_count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    (503, _) => refused.push(id),
                    other => panic!("ingest answered {other:?} while compacting"),
                }
            }
            (acked, refused)
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Store commands through the agent go on meanwhile, `outpost ingest` among them: refused
    // while the store is reopened, each is made again until it is open. Each in a loop of its
    // own, so that either may be the one the reopening meets.
    let stop_asking = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ask = |kind: &'static str| {
        let (config, stop_asking) = (config.clone(), Arc::clone(&stop_asking));
        std::thread::spawn(move || {
            let (mut failed, mut ingested) = (Vec::new(), Vec::new());
            while !stop_asking.load(std::sync::atomic::Ordering::SeqCst) {
                let out = if kind == "ingest" {
                    let id = format!("cli-{:05}", ingested.len());
                    let line = member_update(&id, "Cli", "2026-01-01T00:00:05Z");
                    ingested.push(id);
                    outpost(&config, &["ingest", "-"], &line)
                } else {
                    outpost(&config, &["outbox", "stats", "--json"], "")
                };
                if !out.status.success() {
                    failed.push(String::from_utf8_lossy(&out.stderr).into_owned());
                }
            }
            (failed, ingested)
        })
    };
    let asking = [ask("stats"), ask("ingest")];
    let compact = tokio::task::spawn_blocking({
        let config = config.clone();
        move || outpost(&config, &["compact", "--json"], "")
    });
    let out = compact.await.unwrap();
    stop_asking.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut failed, mut ingested) = (Vec::new(), Vec::new());
    for thread in asking {
        let (f, i) = thread.join().unwrap();
        failed.extend(f);
        ingested.extend(i);
    }
    assert!(failed.is_empty(), "{failed:#?}");
    let acked_when_compacted = acked_count.load(std::sync::atomic::Ordering::SeqCst);
    assert!(out.status.success(), "{out:?}\n{}", agent.log());
    let compacted: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        compacted["profiles"].as_u64().unwrap() >= BEFORE as u64,
        "{compacted}"
    );
    let acked_by_then = {
        // Updates are taken again after: wait for one more acknowledgement, however long
        // the first commit after the reopen takes.
        wait_until(30, "an update acknowledged after compacting", || {
            acked_count.load(std::sync::atomic::Ordering::SeqCst) > acked_when_compacted
        })
        .await;
        stop_sending.store(true, std::sync::atomic::Ordering::SeqCst);
        sender.await.unwrap()
    };
    let (mut acked, refused) = acked_by_then;
    eprintln!(
        "compacted: {compacted}; {} updates acknowledged, {} refused with 503",
        acked.len(),
        refused.len()
    );
    agent.assert_running();
    assert!(
        !refused.is_empty(),
        "no update came while the store was compacted: the test shows nothing"
    );
    assert!(
        acked.len() > acked_when_compacted,
        "no update was acknowledged after compacting"
    );
    // What `outpost ingest` stored is delivered as what HTTP acknowledged is.
    acked.extend(ingested);
    // Every acknowledged update is stored, and its export delivered.
    let delivered = || -> std::collections::HashSet<String> {
        delivered_profiles(&setup.receiver).into_iter().collect()
    };
    wait_until(60, "every export delivered", || {
        delivered().len() >= BEFORE + acked.len() && outbox_stats(&config)["pending"] == 0
    })
    .await;
    // Give a refused update that was stored all the same the time to show.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deliveries: Vec<(String, String)> = setup
        .receiver
        .delivered()
        .iter()
        .map(|r| {
            let key = r.header("idempotency-key").unwrap().to_owned();
            (profile_of(&r.json().unwrap()), key)
        })
        .collect();
    assert_per_profile_order(&deliveries);
    let delivered = delivered();
    for id in &acked {
        assert!(delivered.contains(id), "{id} acknowledged, not delivered");
    }
    for id in &delivered {
        assert!(
            id.starts_with("p-") || acked.contains(id),
            "{id} delivered, never acknowledged{}",
            if refused.contains(id) {
                " (refused with 503, stored all the same)"
            } else {
                ""
            }
        );
    }
    assert_eq!(delivered.len(), BEFORE + acked.len());
    assert_eq!(outbox_stats(&config)["profiles"], delivered.len());
    agent.terminate().await;
    outpost_ok(&config, &["check", "--store"], "");
}
