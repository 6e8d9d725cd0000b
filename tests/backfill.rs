//! Backfill (SPEC "When an update produces an export"): a segment added to the mapping gets
//! one export (reason `segment`) for each stored profile that is a member of it, also when
//! the agent is killed while the backfill runs.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use chrono::Utc;
use common::agent_process::{free_port, AgentProcess};
use common::*;
use outpost::config::Config;
use outpost::profile::Reason;
use outpost::receiver::{Receiver, ReceiverOptions};
use outpost::store::{ListFilter, Store};
use rand::Rng;
use serde_json::json;

/// An update of `id` with these segment statuses (`None`: no entry).
fn line(id: &str, a: Option<&str>, b: Option<&str>) -> String {
    let mut ups = serde_json::Map::new();
    for (segment, status) in [(SEGMENT_A, a), (SEGMENT_B, b)] {
        if let Some(status) = status {
            ups.insert(
                segment.into(),
                json!({"status": status, "lastQualificationTime": "2026-01-01T00:00:00Z"}),
            );
        }
    }
    json!({
        "id": id,
        "timestamp": "2026-01-01T00:00:00Z",
        "profile": {
            "person": {"name": {"firstName": id}},
            "identityMap": {"ecid": [{"id": format!("ecid-{id}")}]},
            "segmentMembership": {"ups": ups}
        }
    })
    .to_string()
}

/// `config_text` with `mapping.segments` set to `segments`.
fn with_segments(config_text: &str, segments: &[&str]) -> String {
    let all = format!("segments = [\"{SEGMENT_A}\", \"{SEGMENT_B}\"]");
    assert!(config_text.contains(&all));
    let list: Vec<String> = segments.iter().map(|s| format!("\"{s}\"")).collect();
    config_text.replace(&all, &format!("segments = [{}]", list.join(", ")))
}

fn load(dir: &std::path::Path, name: &str, text: &str) -> Config {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap()
}

#[tokio::test]
async fn a_newly_mapped_segment_exports_its_stored_members_once() {
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = receiver.base_url();
    let text = agent_config_text(&base, &oauth_body(&base), "");
    let only_a = load(dir.path(), "a.toml", &with_segments(&text, &[SEGMENT_A]));
    let a_and_b = load(dir.path(), "ab.toml", &text);

    // Mapped: A. Stored: memberships of B too.
    let agent = start_agent(&only_a).await;
    let lines = [
        line("both", Some("realized"), Some("realized")),
        line("b-only", None, Some("existing")),
        line("b-exited", Some("realized"), Some("exited")),
        line("a-only", Some("realized"), None),
        line("none", None, None),
    ];
    let (status, body) = http_post(agent.listen_addr, "/v1/updates", lines.join("\n"), &[]).await;
    assert_eq!(status, 200, "{body}");
    wait_drained(&agent, &receiver, 3).await;
    agent.stop().await.unwrap();
    assert_eq!(receiver.delivered().len(), 3);

    // B joins the mapping: its two stored members get one export each.
    let agent = start_agent(&a_and_b).await;
    wait_drained(&agent, &receiver, 5).await;
    wait_until(10, "the backfill to finish", || {
        agent.store.backfill_progress().unwrap().is_none()
    })
    .await;
    let delivered = receiver.delivered();
    let backfilled: HashMap<String, serde_json::Value> = delivered[3..]
        .iter()
        .map(|r| {
            let payload = r.json().unwrap();
            (profile_of(&payload), payload)
        })
        .collect();
    let b_entry =
        |status: &str| json!({"status": status, "lastQualificationTime": "2026-01-01T00:00:00Z"});
    assert_eq!(backfilled.len(), 2, "{backfilled:?}");
    assert_eq!(delivered.len(), 5, "no member twice");
    assert_eq!(
        agent.metrics.exports(Reason::Segment),
        2,
        "/metrics counts the backfill's exports"
    );
    assert_eq!(
        backfilled["b-only"]["segmentMembership"]["ups"],
        json!({ SEGMENT_B: b_entry("existing") })
    );
    assert_eq!(
        backfilled["both"]["segmentMembership"]["ups"],
        json!({ SEGMENT_A: b_entry("realized"), SEGMENT_B: b_entry("realized") })
    );
    assert_eq!(
        agent.store.stats(Utc::now()).unwrap().backfill,
        None,
        "outbox stats shows no backfill once it is done"
    );
    agent.stop().await.unwrap();

    // The same mapping again: nothing to backfill.
    let agent = start_agent(&a_and_b).await;
    assert!(agent.store.backfill_state().unwrap().jobs.is_empty());
    agent.stop().await.unwrap();
    assert_eq!(receiver.delivered().len(), 5);
}

/// Stores `profiles` profiles under `mapping` (every third a member of B, none of A), through
/// the same apply path the committer uses.
fn store_profiles(config: &Config, profiles: usize) -> usize {
    let store = Store::open(&config.storage.path, config.storage.cache_bytes).unwrap();
    let mut mapping = config.mapping.clone();
    store
        .record_mapping(&mut mapping, Utc::now().timestamp_millis())
        .unwrap();
    let mut members = 0;
    for chunk in (0..profiles).collect::<Vec<_>>().chunks(2_000) {
        let body: Vec<String> = chunk
            .iter()
            .map(|&i| {
                let member = i % 3 == 0;
                members += usize::from(member);
                line(&format!("p{i:06}"), None, member.then_some("realized"))
            })
            .collect();
        let updates = pruned_updates(&body, &mapping);
        store
            .apply_groups(&[&updates], &mapping, Utc::now())
            .unwrap();
        store.flush().unwrap();
    }
    assert_eq!(store.tally().unwrap().pending, 0, "B is not mapped yet");
    members
}

/// The exports of each profile in the outbox; every one must be a `segment` export.
fn segment_exports_per_profile(store: &Store) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for export in store.list(&ListFilter::default()).unwrap() {
        assert_eq!(export.record.reason, Reason::Segment.code());
        *counts.entry(export.record.profile_id.clone()).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_killed_at_random_instants_neither_repeats_nor_misses_a_member() {
    let dir = tempfile::tempdir().unwrap();
    // The destination is down (nothing listens there): every export stays in the outbox.
    let port = free_port();
    let text = agent_config_text("http://127.0.0.1:9", "type = \"none\"", "")
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let only_a = load(dir.path(), "a.toml", &with_segments(&text, &[SEGMENT_A]));
    let members = store_profiles(&only_a, 30_000);
    let a_and_b = dir.path().join("ab.toml");
    std::fs::write(&a_and_b, &text).unwrap();

    let mut rng = rand::thread_rng();
    let mut killed_mid_backfill = 0;
    for _ in 0..6 {
        let mut agent =
            AgentProcess::start_with_env(&a_and_b, port, &[("OUTPOST_LOG", "warn")]).await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..250))).await;
        agent
            .signal_and_wait(libc::SIGKILL, Duration::from_secs(5))
            .await;
        drop(agent);
        let store = Store::open(&dir.path().join("store"), 8 << 20).unwrap();
        let progress = store.backfill_progress().unwrap();
        if progress.as_ref().is_some_and(|p| p.scanned > 0) {
            killed_mid_backfill += 1;
        }
        if progress.is_none() {
            break;
        }
    }
    // One last run to the end.
    let mut agent = AgentProcess::start_with_env(&a_and_b, port, &[("OUTPOST_LOG", "warn")]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = std::process::Command::new(binary())
            .args([
                "--config",
                a_and_b.to_str().unwrap(),
                "outbox",
                "stats",
                "--json",
            ])
            .output()
            .unwrap();
        let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if stats.get("backfill").is_none() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "backfill still at {stats}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.terminate().await;
    drop(agent);

    let store = Store::open(&dir.path().join("store"), 8 << 20).unwrap();
    let counts = segment_exports_per_profile(&store);
    assert!(
        killed_mid_backfill > 0,
        "no kill landed while the backfill ran: the test shows nothing"
    );
    assert_eq!(counts.len(), members, "every member of B once");
    assert!(counts.values().all(|&n| n == 1), "no member twice");
    assert!(
        counts
            .keys()
            .all(|id| id[1..].parse::<usize>().unwrap() % 3 == 0),
        "only members"
    );
}

#[tokio::test]
async fn a_full_outbox_pauses_the_backfill_as_it_pauses_ingest() {
    let dir = tempfile::tempdir().unwrap();
    // The destination is down: exports stay; the outbox may hold about 20 KB.
    let text = agent_config_text("http://127.0.0.1:9", "type = \"none\"", "")
        .replace("[storage]\n", "[storage]\nmax_outbox_bytes = 20000\n");
    let only_a = load(dir.path(), "a.toml", &with_segments(&text, &[SEGMENT_A]));
    let members = store_profiles(&only_a, 6_000);
    let a_and_b = load(dir.path(), "ab.toml", &text);

    let agent = start_agent(&a_and_b).await;
    wait_until(10, "the first backfill step", || {
        agent.store.tally().unwrap().pending > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let progress = agent
        .store
        .backfill_progress()
        .unwrap()
        .expect("paused, not done");
    assert_eq!(
        progress.scanned as usize,
        outpost::store::backfill::STEP_PROFILES,
        "one step filled the outbox past its limit; no step after it"
    );
    assert!((progress.exported as usize) < members);
    agent.stop().await.unwrap();
}

/// What a step of the backfill of B over [`store_profiles`]' 6,000 profiles exports, on
/// average: measured on a store of its own, made as the tests make theirs.
fn backfill_step_bytes(text: &str) -> u64 {
    let probe = tempfile::tempdir().unwrap();
    let only_a = load(probe.path(), "a.toml", &with_segments(text, &[SEGMENT_A]));
    store_profiles(&only_a, 6_000);
    let a_and_b = load(probe.path(), "ab.toml", text);
    let store = Store::open(&a_and_b.storage.path, a_and_b.storage.cache_bytes).unwrap();
    let mapping = record(&store, &a_and_b);
    let steps =
        run_backfill_in_steps_of(&store, &mapping, outpost::store::backfill::STEP_PROFILES) as u64;
    assert!(steps >= 5, "{steps} steps");
    store.tally().unwrap().bytes / steps
}

/// A folder with a store of [`store_profiles`]' 6,000 profiles, mapped with A, and the text
/// of a config mapping A and B whose outbox holds about three steps of B's backfill (`limit`
/// bytes): the backfill alone would fill it, and stops at its half after two steps.
fn room_for_three_backfill_steps() -> (tempfile::TempDir, String, u64) {
    let text = agent_config_text("http://127.0.0.1:9", "type = \"none\"", "");
    let limit = 3 * backfill_step_bytes(&text);
    let dir = tempfile::tempdir().unwrap();
    let text = text.replace(
        "[storage]\n",
        &format!("[storage]\nmax_outbox_bytes = {limit}\n"),
    );
    let only_a = load(dir.path(), "a.toml", &with_segments(&text, &[SEGMENT_A]));
    store_profiles(&only_a, 6_000);
    (dir, text, limit)
}

/// `outpost ingest` without an agent stops the backfill at its share of the outbox too, and
/// takes the updates into the rest.
#[test]
fn outpost_ingest_leaves_half_the_outbox_to_the_updates() {
    let (dir, text, limit) = room_for_three_backfill_steps();
    let a_and_b = dir.path().join("ab.toml");
    std::fs::write(&a_and_b, &text).unwrap();
    let update = line("new", None, Some("realized"));
    let out = run_with_config(&a_and_b, &["ingest", "-"], Some(update.as_bytes()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("waits for deliveries"), "{stderr}");
    let store = Store::open(&dir.path().join("store"), 8 << 20).unwrap();
    let progress = store
        .backfill_progress()
        .unwrap()
        .expect("stopped, not done");
    assert!(!progress.done);
    let held = store.tally().unwrap().bytes;
    assert!(held < limit, "{held} of {limit} bytes");
    assert_eq!(
        segment_exports_per_profile(&store).get("new"),
        Some(&1),
        "the update's export"
    );
}

/// A backfill takes the outbox up to half of `storage.max_outbox_bytes`, then waits for
/// deliveries: the rest stays for ingest, which a backfill of many members would otherwise
/// keep refused for as long as delivery takes to drain what it adds.
#[tokio::test]
async fn a_backfill_leaves_half_the_outbox_to_ingest() {
    let (dir, text, limit) = room_for_three_backfill_steps();
    let a_and_b = load(dir.path(), "ab.toml", &text);
    let agent = start_agent(&a_and_b).await;
    wait_until(10, "half the outbox", || {
        agent.store.tally().unwrap().bytes >= limit / 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = agent.store.tally().unwrap().bytes;
    assert!(held < limit, "{held} of {limit} bytes");
    assert!(!agent.store.backfill_progress().unwrap().unwrap().done);
    let update = line("new", None, Some("realized"));
    let (status, body) = http_post(agent.listen_addr, "/v1/updates", update, &[]).await;
    assert_eq!(status, 200, "{body}");
    agent.stop().await.unwrap();
}

/// `outpost ingest` without an agent runs the queued backfill first, and stops it as the agent
/// does once the outbox is full: the command fails as ingest into a full outbox does, and
/// the steps it made are kept.
#[test]
fn outpost_ingest_stops_the_backfill_when_the_outbox_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let text = agent_config_text("http://127.0.0.1:9", "type = \"none\"", "")
        .replace("[storage]\n", "[storage]\nmax_outbox_bytes = 20000\n");
    let only_a = load(dir.path(), "a.toml", &with_segments(&text, &[SEGMENT_A]));
    store_profiles(&only_a, 6_000);
    let a_and_b = dir.path().join("ab.toml");
    std::fs::write(&a_and_b, &text).unwrap();
    let update = line("new", None, Some("realized"));
    let out = run_with_config(&a_and_b, &["ingest", "-"], Some(update.as_bytes()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("outbox is full") && stderr.contains("backfill"),
        "{stderr}"
    );
    let store = Store::open(&dir.path().join("store"), 8 << 20).unwrap();
    let progress = store
        .backfill_progress()
        .unwrap()
        .expect("stopped, not done");
    assert_eq!(
        progress.scanned as usize,
        outpost::store::backfill::STEP_PROFILES,
        "one step filled the outbox past its limit; no step after it"
    );
    assert_eq!(
        store.profile("new").unwrap(),
        None,
        "the update was not taken"
    );
}

/// A backfill begun by an outpost that stored profiles one to a key had walked them in id
/// order, and recorded the last id it scanned: after the upgrade to profile groups it goes on
/// with exactly the members above that id.
#[test]
fn a_backfill_begun_before_profile_groups_goes_on_with_the_members_it_had_not_scanned() {
    let dir = tempfile::tempdir().unwrap();
    let text = agent_config_text("http://127.0.0.1:9", "type = \"none\"", "");
    let only_a = load(dir.path(), "a.toml", &with_segments(&text, &[SEGMENT_A]));
    store_profiles(&only_a, 3_000);
    let a_and_b = load(dir.path(), "ab.toml", &text);
    let store_path = dir.path().join("store");
    {
        let store = Store::open(&store_path, 8 << 20).unwrap();
        let mut mapping = a_and_b.mapping.clone();
        store
            .record_mapping(&mut mapping, Utc::now().timestamp_millis())
            .unwrap();
        assert_eq!(store.backfill_progress().unwrap().unwrap().scanned, 0);
    }
    // As the older outpost left it, half way: through p001499 in id order.
    {
        let db = open_with_sled_alone(&store_path).unwrap();
        let meta = db.open_tree("meta").unwrap();
        let stored = meta.get("backfill").unwrap().unwrap();
        let mut state: serde_json::Value = serde_json::from_slice(&stored[1..]).unwrap();
        state["jobs"][0]["after"] = json!("p001499");
        state["jobs"][0]["scanned"] = json!(1_500);
        let mut value = vec![stored[0]];
        value.extend(state.to_string().into_bytes());
        meta.insert("backfill", value).unwrap();
        db.flush().unwrap();
    }
    let store = Store::open(&store_path, 8 << 20).unwrap();
    let mut mapping = a_and_b.mapping.clone();
    store
        .record_mapping(&mut mapping, Utc::now().timestamp_millis())
        .unwrap();
    let mut steps = 0;
    while let Some(progress) = store.backfill_step(&mapping, 500, Utc::now()).unwrap() {
        steps += 1;
        assert!(steps < 100, "the backfill never ends: {progress:?}");
        if progress.done {
            assert_eq!(progress.scanned, 3_000, "{progress:?}");
            break;
        }
    }
    assert!(steps > 1, "walked in several steps");
    let counts = segment_exports_per_profile(&store);
    let expected: Vec<String> = (1_500..3_000)
        .filter(|i| i % 3 == 0)
        .map(|i| format!("p{i:06}"))
        .collect();
    let mut exported: Vec<String> = counts.keys().cloned().collect();
    exported.sort();
    assert_eq!(exported, expected);
    assert!(counts.values().all(|&n| n == 1), "no member twice");
    assert_eq!(store.backfill_progress().unwrap(), None);
}

/// Runs the queued backfill to its end, in steps of 500 profiles.
fn run_backfill(store: &Store, mapping: &outpost::config::Mapping) {
    run_backfill_in_steps_of(store, mapping, 500);
}

/// [`run_backfill`] with steps of `profiles`; how many steps it took.
fn run_backfill_in_steps_of(
    store: &Store,
    mapping: &outpost::config::Mapping,
    profiles: usize,
) -> usize {
    let mut steps = 0;
    while let Some(progress) = store.backfill_step(mapping, profiles, Utc::now()).unwrap() {
        steps += 1;
        assert!(steps < 100, "the backfill never ends: {progress:?}");
    }
    steps
}

/// The store at `store_path` recording `mapping` as the one it runs with.
fn record(store: &Store, config: &Config) -> outpost::config::Mapping {
    let mut mapping = config.mapping.clone();
    store
        .record_mapping(&mut mapping, Utc::now().timestamp_millis())
        .unwrap();
    mapping
}

/// A segment that leaves the mapping while its backfill is under way, and comes back later,
/// is backfilled once more from the start: its unfinished job does not go on beside the new.
#[test]
fn a_segment_mapped_again_during_its_backfill_exports_each_member_once_more() {
    let dir = tempfile::tempdir().unwrap();
    let text = agent_config_text("http://127.0.0.1:9", "type = \"none\"", "");
    let only_a = load(dir.path(), "a.toml", &with_segments(&text, &[SEGMENT_A]));
    let members = store_profiles(&only_a, 3_000);
    let a_and_b = load(dir.path(), "ab.toml", &text);
    let store = Store::open(&dir.path().join("store"), 8 << 20).unwrap();
    let mapping = record(&store, &a_and_b);
    let first = store.backfill_step(&mapping, 500, Utc::now()).unwrap();
    assert!(first.is_some_and(|p| !p.done && p.exported > 0));
    record(&store, &only_a);
    let mapping = record(&store, &a_and_b);
    let before = segment_exports_per_profile(&store);
    run_backfill(&store, &mapping);
    let after = segment_exports_per_profile(&store);
    let again: Vec<usize> = after
        .iter()
        .map(|(id, n)| n - before.get(id).copied().unwrap_or(0))
        .collect();
    assert_eq!(again.len(), members);
    assert!(again.iter().all(|&n| n == 1), "a member exported twice");
}

/// Segments newly mapped while a backfill is under way join it: a profile that is a member of
/// both its segments and the new ones gets one export, wherever the first job had got to.
#[test]
fn segments_mapped_while_a_backfill_is_under_way_export_each_member_once() {
    let dir = tempfile::tempdir().unwrap();
    let text = agent_config_text("http://127.0.0.1:9", "type = \"none\"", "");
    let only_a = load(dir.path(), "a.toml", &with_segments(&text, &[SEGMENT_A]));
    let a_b = load(dir.path(), "ab.toml", &text);
    let a_b_c = load(
        dir.path(),
        "abc.toml",
        &with_segments(&text, &[SEGMENT_A, SEGMENT_B, SEGMENT_C]),
    );
    // Every third profile a member of B, every second of C.
    let store = store_members(dir.path(), &only_a, |i| {
        let mut segments = Vec::new();
        if i.is_multiple_of(3) {
            segments.push(SEGMENT_B);
        }
        if i.is_multiple_of(2) {
            segments.push(SEGMENT_C);
        }
        segments
    });

    let mapping = record(&store, &a_b);
    let first = store.backfill_step(&mapping, 1_000, Utc::now()).unwrap();
    assert!(first.is_some_and(|p| !p.done && p.exported > 0));
    // Exported for B before C was mapped: without C, so C's backfill exports them again.
    let before_c = segment_exports_per_profile(&store);
    let mapping = record(&store, &a_b_c);
    // The joined job's progress counts from the join; a job for C covers what it scanned.
    let joined = store.backfill_progress().unwrap().unwrap();
    assert_eq!((joined.scanned, joined.exported), (0, 0), "{joined:?}");
    assert_eq!(joined.segments, [SEGMENT_B, SEGMENT_C]);
    assert_eq!(joined.queued_after, 1);
    run_backfill(&store, &mapping);
    let counts = segment_exports_per_profile(&store);
    let mut exported_for_both = 0;
    for i in 0..3_000usize {
        let id = format!("p{i:06}");
        let (b, c, exported_before) = (
            i.is_multiple_of(3),
            i.is_multiple_of(2),
            before_c.contains_key(&id),
        );
        let expected = usize::from(exported_before) + usize::from(c || (b && !exported_before));
        assert_eq!(counts.get(&id).copied().unwrap_or(0), expected, "{id}");
        exported_for_both += usize::from(b && c && !exported_before);
    }
    assert!(exported_for_both > 100, "{exported_for_both}");
}

const SEGMENT_C: &str = "c0ffee00-0000-4000-8000-00000000000c";
const SEGMENT_D: &str = "d0ffee00-0000-4000-8000-00000000000d";

/// A store at `dir`/store running with `mapping`'s config, holding profiles p000000 to
/// p002999, each a member of `segments(i)`.
fn store_members(
    dir: &Path,
    config: &Config,
    segments: impl Fn(usize) -> Vec<&'static str>,
) -> Store {
    let store = Store::open(&dir.join("store"), 8 << 20).unwrap();
    let mapping = record(&store, config);
    let entry = json!({"status": "realized", "lastQualificationTime": "2026-01-01T00:00:00Z"});
    let lines: Vec<String> = (0..3_000)
        .map(|i| {
            let ups: serde_json::Map<String, serde_json::Value> = segments(i)
                .into_iter()
                .map(|s| (s.to_owned(), entry.clone()))
                .collect();
            json!({"id": format!("p{i:06}"), "timestamp": "2026-01-01T00:00:00Z",
                   "profile": {"segmentMembership": {"ups": ups}}})
            .to_string()
        })
        .collect();
    store
        .apply_groups(&[&pruned_updates(&lines, &mapping)], &mapping, Utc::now())
        .unwrap();
    assert_eq!(store.tally().unwrap().pending, 0);
    store
}

/// A third segment mapped while the job made by the second change is part way (a job bounded
/// to the groups the first had scanned): each member of the third gets one export from then
/// on, whichever job scans it.
#[test]
fn a_segment_mapped_while_a_bounded_backfill_is_under_way_exports_each_member_once() {
    let dir = tempfile::tempdir().unwrap();
    let text = agent_config_text("http://127.0.0.1:9", "type = \"none\"", "");
    let config =
        |name: &str, segments: &[&str]| load(dir.path(), name, &with_segments(&text, segments));
    let only_a = config("a.toml", &[SEGMENT_A]);
    let a_b = config("ab.toml", &[SEGMENT_A, SEGMENT_B]);
    let a_b_c = config("abc.toml", &[SEGMENT_A, SEGMENT_B, SEGMENT_C]);
    let a_b_c_d = config("abcd.toml", &[SEGMENT_A, SEGMENT_B, SEGMENT_C, SEGMENT_D]);
    let store = store_members(dir.path(), &only_a, |i| {
        [(3, SEGMENT_B), (2, SEGMENT_C), (5, SEGMENT_D)]
            .into_iter()
            .filter(|&(n, _)| i.is_multiple_of(n))
            .map(|(_, s)| s)
            .collect()
    });
    let mapping = record(&store, &a_b);
    store.backfill_step(&mapping, 1_000, Utc::now()).unwrap();
    // C: the B job goes on with C, a job bounded to what it had scanned covers the rest.
    let mapping = record(&store, &a_b_c);
    let jobs = store.backfill_state().unwrap().jobs;
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    while store.backfill_state().unwrap().jobs.len() == 2 {
        store.backfill_step(&mapping, 500, Utc::now()).unwrap();
    }
    let bounded = store.backfill_step(&mapping, 100, Utc::now()).unwrap();
    assert!(bounded.is_some_and(|p| !p.done), "the bounded job part way");

    let before_d = segment_exports_per_profile(&store);
    let mapping = record(&store, &a_b_c_d);
    run_backfill(&store, &mapping);
    let after = segment_exports_per_profile(&store);
    let mut members = 0;
    for i in (0..3_000usize).filter(|i| i.is_multiple_of(5)) {
        let id = format!("p{i:06}");
        let new = after.get(&id).copied().unwrap_or(0) - before_d.get(&id).copied().unwrap_or(0);
        assert_eq!(new, 1, "{id}");
        members += 1;
    }
    assert_eq!(members, 600);
}

/// The exports of each profile in the outbox, whatever their reason.
fn exports_per_profile(store: &Store) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for export in store.list(&ListFilter::default()).unwrap() {
        *counts.entry(export.record.profile_id).or_insert(0) += 1;
    }
    counts
}

/// Profiles exported by updates while the first queued job is part way: ten members whose
/// groups it has yet to scan and ten whose groups it has passed (a mapped attribute changes),
/// and ten profiles ahead of it that join; profile i is then a member of `segments(i)`.
/// Returns them in that order.
fn exported_while_the_backfill_runs(
    store: &Store,
    mapping: &outpost::config::Mapping,
    member: impl Fn(usize) -> bool,
    segments: impl Fn(usize) -> Vec<&'static str>,
) -> [Vec<String>; 3] {
    let after_group = store.backfill_state().unwrap().jobs[0]
        .after_group
        .clone()
        .expect("a job part way");
    let ahead = |i: &usize| {
        let key = outpost::store::groups::group_key(&format!("p{i:06}"));
        let name: String = key.iter().map(|b| format!("{b:02x}")).collect();
        name > after_group
    };
    let pick = |wanted: &dyn Fn(&usize) -> bool| -> Vec<usize> {
        (0..3_000usize).filter(|i| wanted(i)).take(10).collect()
    };
    let members_ahead = pick(&|i| member(*i) && ahead(i));
    let members_behind = pick(&|i| member(*i) && !ahead(i));
    let joining = pick(&|i| !member(*i) && ahead(i));
    let entry = json!({"status": "realized", "lastQualificationTime": "2026-01-01T00:00:00Z"});
    let update = |i: usize, first_name: Option<&str>| {
        let ups: serde_json::Map<String, serde_json::Value> = segments(i)
            .iter()
            .map(|s| (s.to_string(), entry.clone()))
            .collect();
        let mut profile = json!({"segmentMembership": {"ups": ups}});
        if let Some(name) = first_name {
            profile["person"] = json!({"name": {"firstName": name}});
        }
        json!({"id": format!("p{i:06}"), "timestamp": "2026-01-02T00:00:00Z", "profile": profile})
            .to_string()
    };
    let lines: Vec<String> = members_ahead
        .iter()
        .chain(&members_behind)
        .map(|&i| update(i, Some("Jane")))
        .chain(joining.iter().map(|&i| update(i, None)))
        .collect();
    let summary = store
        .apply_groups(&[&pruned_updates(&lines, mapping)], mapping, Utc::now())
        .unwrap();
    assert_eq!(summary[0].exports, 30, "{:?}", summary[0]);
    store.flush().unwrap();
    let ids = |list: Vec<usize>| list.into_iter().map(|i| format!("p{i:06}")).collect();
    [ids(members_ahead), ids(members_behind), ids(joining)]
}

/// Whether profile `i` of [`every_third_in_b`] is a member of B.
fn in_b(i: usize) -> bool {
    i.is_multiple_of(3)
}

/// A store in `dir` of 3,000 profiles recorded with a mapping of A alone, every third
/// ([`in_b`]) a member of B; with the configs that map A, and A and B.
fn every_third_in_b(dir: &Path) -> (Store, Config, Config) {
    let text = agent_config_text("http://127.0.0.1:9", "type = \"none\"", "");
    let only_a = load(dir, "a.toml", &with_segments(&text, &[SEGMENT_A]));
    let a_b = load(dir, "ab.toml", &text);
    let store = store_members(
        dir,
        &only_a,
        |i| {
            if in_b(i) {
                vec![SEGMENT_B]
            } else {
                vec![]
            }
        },
    );
    (store, only_a, a_b)
}

/// The entries of the store's `backfill_exported` tree, read with sled alone.
fn marks_left(store_path: &Path) -> usize {
    let db = open_with_sled_alone(store_path).unwrap();
    db.open_tree("backfill_exported").unwrap().len()
}

/// A member whose update was exported after its segment was newly mapped, before the
/// backfill reached it, gets no second export from the backfill (the update's carried the
/// segment), also across a reopen; one whose group the backfill had passed gets both.
#[test]
fn a_member_an_update_exported_before_the_backfill_reached_it_is_not_exported_again() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, a_b) = every_third_in_b(dir.path());
    let member = in_b;
    let mapping = record(&store, &a_b);
    store.backfill_step(&mapping, 1_000, Utc::now()).unwrap();
    let [ahead, behind, joining] =
        exported_while_the_backfill_runs(&store, &mapping, member, |_| vec![SEGMENT_B]);
    drop(store);
    let store = Store::open(&dir.path().join("store"), 8 << 20).unwrap();
    let mapping = record(&store, &a_b);
    run_backfill(&store, &mapping);

    let counts = exports_per_profile(&store);
    for i in 0..3_000usize {
        let id = format!("p{i:06}");
        let expected = if behind.contains(&id) {
            2
        } else {
            usize::from(member(i) || joining.contains(&id))
        };
        assert_eq!(counts.get(&id).copied().unwrap_or(0), expected, "{id}");
    }
    assert_eq!(ahead.len() + behind.len() + joining.len(), 30);
    drop(store);
    assert_eq!(marks_left(&dir.path().join("store")), 0);
}

/// A segment newly mapped while a job is part way joins it, and the updates exported before
/// did not carry it: the members of it they exported get their export for it from the
/// backfill; those that are members only of the job's own segment, which the updates carried,
/// get none. Also when the store is opened again in between.
#[test]
fn a_segment_joining_a_job_reaches_the_members_updates_exported_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let text = agent_config_text("http://127.0.0.1:9", "type = \"none\"", "");
    let config =
        |name: &str, segments: &[&str]| load(dir.path(), name, &with_segments(&text, segments));
    let only_a = config("a.toml", &[SEGMENT_A]);
    let a_b = config("ab.toml", &[SEGMENT_A, SEGMENT_B]);
    let a_b_c = config("abc.toml", &[SEGMENT_A, SEGMENT_B, SEGMENT_C]);
    // Members of B; every other one a member of C too.
    let member = |i: usize| i.is_multiple_of(3);
    let segments_of = |i: usize| -> &'static [&'static str] {
        match (member(i), i.is_multiple_of(2)) {
            (true, true) => &[SEGMENT_B, SEGMENT_C],
            (true, false) => &[SEGMENT_B],
            (false, _) => &[],
        }
    };
    let store = store_members(dir.path(), &only_a, |i| segments_of(i).to_vec());
    let mapping = record(&store, &a_b);
    store.backfill_step(&mapping, 1_000, Utc::now()).unwrap();
    let [ahead, _, _] = exported_while_the_backfill_runs(&store, &mapping, member, |i| {
        if member(i) {
            segments_of(i).to_vec()
        } else {
            vec![SEGMENT_B, SEGMENT_C]
        }
    });
    let before_c = exports_per_profile(&store);
    let mapping = record(&store, &a_b_c);
    // The numbers the job counts from are read back from the store.
    drop(store);
    let store = Store::open(&dir.path().join("store"), 8 << 20).unwrap();
    run_backfill(&store, &mapping);
    let counts = exports_per_profile(&store);
    let of_c = |id: &str| id[1..].parse::<usize>().unwrap().is_multiple_of(2);
    assert!(ahead.iter().any(|id| of_c(id)) && ahead.iter().any(|id| !of_c(id)));
    for id in &ahead {
        let expected = usize::from(of_c(id));
        assert_eq!(
            counts[id] - before_c[id],
            expected,
            "{id}: its export for C"
        );
    }
    drop(store);
    assert_eq!(marks_left(&dir.path().join("store")), 0);
}

/// A job dropped when its segment leaves the mapping takes its marks with it: no later job
/// finds a mark it did not make.
#[test]
fn a_job_dropped_with_its_segment_leaves_no_marks() {
    let dir = tempfile::tempdir().unwrap();
    let (store, only_a, a_b) = every_third_in_b(dir.path());
    let member = in_b;
    let mapping = record(&store, &a_b);
    store.backfill_step(&mapping, 1_000, Utc::now()).unwrap();
    exported_while_the_backfill_runs(&store, &mapping, member, |_| vec![SEGMENT_B]);
    drop(store);
    assert!(
        marks_left(&dir.path().join("store")) > 0,
        "marks while it runs"
    );

    let store = Store::open(&dir.path().join("store"), 8 << 20).unwrap();
    record(&store, &only_a);
    assert!(store.backfill_state().unwrap().jobs.is_empty());
    drop(store);
    assert_eq!(marks_left(&dir.path().join("store")), 0);
}

/// Export numbers rebuilt from an unreadable `meta/next_seq` stay above the numbers the
/// backfill recorded, also once the outbox is empty: a mark at or above a job's number makes
/// the job skip its profile.
#[test]
fn export_numbers_rebuilt_stay_above_the_backfills_marks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let (store, _, a_b) = every_third_in_b(dir.path());
    let member = in_b;
    drop(store);
    // Numbers past the gap a rebuild adds, as after an earlier rebuild.
    let high = 3u64 << 32;
    let db = open_with_sled_alone(&path).unwrap();
    db.open_tree("meta")
        .unwrap()
        .insert("next_seq", &high.to_be_bytes())
        .unwrap();
    db.flush().unwrap();
    drop(db);

    let store = Store::open(&path, 8 << 20).unwrap();
    let mapping = record(&store, &a_b);
    store.backfill_step(&mapping, 1_000, Utc::now()).unwrap();
    exported_while_the_backfill_runs(&store, &mapping, member, |_| vec![SEGMENT_B]);
    let delivered: Vec<outpost::store::outbox::Outcome> = store
        .list(&ListFilter::default())
        .unwrap()
        .into_iter()
        .map(|export| outpost::store::outbox::Outcome {
            profile: export.record.profile_id.into(),
            seq: export.id.seq,
            change: outpost::store::outbox::ExportChange::Delivered { retried: false },
        })
        .collect();
    store.apply_export_changes(&delivered).unwrap();
    store.flush().unwrap();
    drop(store);

    let db = open_with_sled_alone(&path).unwrap();
    let highest_mark = db
        .open_tree("backfill_exported")
        .unwrap()
        .iter()
        .values()
        .map(|v| u64::from_be_bytes(v.unwrap().as_ref().try_into().unwrap()))
        .max()
        .expect("marks while the job runs");
    assert!(highest_mark >= high);
    db.open_tree("meta")
        .unwrap()
        .insert("next_seq", "abc")
        .unwrap();
    db.flush().unwrap();
    drop(db);

    let store = Store::open(&path, 8 << 20).unwrap();
    assert!(store.list(&ListFilter::default()).unwrap().is_empty());
    assert!(
        store.durable_next_seq() > highest_mark,
        "rebuilt from {} against a mark at {highest_mark}",
        store.durable_next_seq()
    );
}
