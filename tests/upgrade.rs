//! A store whose profiles are one to a key (formats 1 to 3: JSON text in 1 and 2, typed
//! records in 3) is upgraded in place when it is opened: every profile moves into its group as
//! a typed record judged as before, and a kill at any instant of the upgrade leaves a store
//! that opens and finishes it.
//!
//! The old stores are made by this outpost (real updates through the store), then their
//! profiles are written back one to a key, as an older outpost wrote them.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use chrono::Utc;
use common::*;
use outpost::config::Config;
use outpost::profile::record::ProfileRecord;
use outpost::store::codec::{self, ProfileJson};
use outpost::store::groups::{group_key, GroupView};
use outpost::store::{Store, FORMAT_VERSION};
use rand::Rng;
use serde_json::Value;

/// The store's sled database, read with sled alone. A store killed while its rebuilt copy was
/// being swapped in (`rebuild.swap`; the upgrade had finished before the rebuild) is opened by
/// outpost first, which finishes the swap: sled alone would see the folder half swapped, an
/// empty database where the old one was deleted, and make one there.
fn open_sled(path: &std::path::Path) -> sled::Db {
    if path.join("rebuild.swap").exists() {
        drop(Store::open(path, 8 << 20).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
    }
    open_with_sled_alone(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[derive(Clone, Copy, PartialEq)]
enum OldFormat {
    /// Formats 1 and 2: JSON text, one profile to a key.
    Json,
    /// Format 3: typed records, one profile to a key.
    Records,
}

/// Every profile in the groups of `db`, read with sled alone.
fn grouped(db: &sled::Db) -> Vec<(String, Vec<u8>)> {
    let mut found = Vec::new();
    for item in db.open_tree("profile_groups").unwrap().iter() {
        let (_, value) = item.unwrap();
        let view = GroupView::decode(&value).unwrap();
        for &(id, value) in view.entries() {
            found.push((id.to_owned(), value.to_vec()));
        }
    }
    found
}

/// Stores `profiles` members of A through the store, then rewrites the store as an older
/// outpost left it: profiles one to a key in `profiles`, no groups. Returns the record each
/// profile must read as after the upgrade.
fn old_store(
    workspace: &Workspace,
    profiles: usize,
    old: OldFormat,
) -> BTreeMap<String, ProfileRecord> {
    let config = Config::load(&workspace.config_path()).unwrap();
    let store_path = workspace.path().join("store");
    {
        let store = Store::open(&store_path, 8 << 20).unwrap();
        let mut mapping = config.mapping.clone();
        store
            .record_mapping(&mut mapping, Utc::now().timestamp_millis())
            .unwrap();
        for chunk in (0..profiles).collect::<Vec<_>>().chunks(2_000) {
            let body: Vec<String> = chunk
                .iter()
                .map(|i| member_update(&format!("p{i:06}"), "Jane", "2026-01-01T00:00:00Z"))
                .collect();
            let updates = pruned_updates(&body, &mapping);
            store
                .apply_groups(&[&updates], &mapping, Utc::now())
                .unwrap();
        }
        store.flush().unwrap();
    }
    let db = open_sled(&store_path);
    let mut expected = BTreeMap::new();
    let mut batch = sled::Batch::default();
    for (id, value) in grouped(&db) {
        let record = codec::decode_profile(&value).unwrap();
        let (value, record) = match old {
            OldFormat::Json => {
                let json = record.to_value();
                let value = codec::encode_profile_json(&ProfileJson {
                    timestamp_micros: record.timestamp_micros,
                    json: json.to_string(),
                });
                (
                    value,
                    ProfileRecord::from_json_profile(record.timestamp_micros, &json),
                )
            }
            OldFormat::Records => (value, record),
        };
        batch.insert(id.as_bytes(), value);
        expected.insert(id, record);
    }
    db.open_tree("profiles")
        .unwrap()
        .apply_batch(batch)
        .unwrap();
    db.open_tree("profile_groups").unwrap().clear().unwrap();
    let format: u64 = match old {
        OldFormat::Json => 2,
        OldFormat::Records => 3,
    };
    db.open_tree("meta")
        .unwrap()
        .insert("format", &format.to_be_bytes())
        .unwrap();
    db.flush().unwrap();
    assert_eq!(expected.len(), profiles);
    expected
}

/// How many profiles are still one to a key and how many are in groups, read with sled alone.
fn formats(workspace: &Workspace) -> (usize, usize) {
    let db = open_sled(&workspace.path().join("store"));
    let left = db.open_tree("profiles").unwrap().len();
    let grouped = grouped(&db);
    for (id, value) in &grouped {
        assert!(!codec::is_profile_json(value), "{id} moved as JSON");
    }
    (left, grouped.len())
}

fn meta_value(workspace: &Workspace, key: &str) -> Option<Vec<u8>> {
    let db = open_sled(&workspace.path().join("store"));
    let value = db.open_tree("meta").unwrap().get(key).unwrap();
    value.map(|v| v.to_vec())
}

fn outbox_stats_command(workspace: &Workspace) -> Command {
    let mut command = Command::new(binary());
    command
        .args(["--config", workspace.config_path().to_str().unwrap()])
        .args(["outbox", "stats", "--json"])
        .env("OUTPOST_LOG", "info");
    command
}

fn assert_upgraded(workspace: &Workspace, expected: &BTreeMap<String, ProfileRecord>) {
    assert_eq!(formats(workspace), (0, expected.len()));
    assert_eq!(meta_value(workspace, "upgrade"), None);
    assert_eq!(
        meta_value(workspace, "format"),
        Some(FORMAT_VERSION.to_be_bytes().to_vec())
    );
    let store = Store::open(&workspace.path().join("store"), 8 << 20).unwrap();
    assert_eq!(store.profile_count().unwrap(), expected.len() as u64);
    assert_eq!(store.verify().unwrap(), Vec::<String>::new());
    for (id, record) in expected {
        assert_eq!(
            store.profile_record(id).unwrap().as_ref(),
            Some(record),
            "{id}"
        );
    }
}

#[test]
fn an_old_store_is_upgraded_on_open_and_its_profiles_are_judged_as_before() {
    for old in [OldFormat::Json, OldFormat::Records] {
        upgraded_and_judged_as_before(old);
    }
}

fn upgraded_and_judged_as_before(old: OldFormat) {
    let workspace = Workspace::new();
    let expected = old_store(&workspace, 300, old);
    assert_eq!(formats(&workspace), (300, 0));

    let out = outbox_stats_command(&workspace).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("upgrading the stored profiles"), "{log}");
    assert!(
        log.contains("upgraded the stored profiles: 300 rewritten of 300"),
        "{log}"
    );
    assert!(log.contains("the rebuilt store is in place"), "{log}");
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        stats["pending"], 300,
        "the exports of the old store stay: {stats}"
    );
    assert_upgraded(&workspace, &expected);

    // Judged as before: the same content is no change, a new first name is one.
    let config = Config::load(&workspace.config_path()).unwrap();
    let store = Store::open(&workspace.path().join("store"), 8 << 20).unwrap();
    let body = [
        member_update("p000001", "Jane", "2026-01-01T00:01:00Z"),
        member_update("p000002", "Janet", "2026-01-01T00:01:00Z"),
    ];
    let updates = pruned_updates(&body, &config.mapping);
    let summary = store
        .apply_groups(&[&updates[..1], &updates[1..]], &config.mapping, Utc::now())
        .unwrap();
    assert_eq!((summary[0].exports, summary[0].unchanged), (0, 1));
    assert_eq!(
        summary[1].exports_for(outpost::profile::Reason::Attribute),
        1
    );

    // Opening again upgrades nothing.
    drop(store);
    let out = outbox_stats_command(&workspace).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("upgrad"));
}

/// Spawns `outpost outbox stats` and waits for the upgrade's first log line; `false` when the
/// command exited without starting an upgrade.
fn spawn_until_upgrade_begins(workspace: &Workspace) -> (std::process::Child, bool) {
    spawn_until_logged(
        outbox_stats_command(workspace),
        "upgrading the stored profiles",
    )
}

/// Spawns `command` and waits until it logs `line`; `false` when it exited without. The rest
/// of its log is read (and dropped) by a thread of its own, so the command never writes to a
/// closed pipe.
fn spawn_until_logged(mut command: Command, line: &str) -> (std::process::Child, bool) {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let began = lines.any(|logged| logged.unwrap().contains(line));
    std::thread::spawn(move || lines.for_each(drop));
    (child, began)
}

#[test]
fn an_upgrade_killed_at_random_instants_finishes_on_the_next_open() {
    let workspace = Workspace::new();
    let store_path = workspace.path().join("store");
    let pristine = workspace.path().join("pristine-store");
    let expected = old_store(&workspace, 30_000, OldFormat::Json);
    let _ = open_sled(&store_path); // waits until sled has let go of the store
    copy_dir(&store_path, &pristine);

    // How long a whole upgrade takes on this machine, so that the kills land inside it
    // however fast or slow the machine is.
    let (mut child, began) = spawn_until_upgrade_begins(&workspace);
    let begun_at = std::time::Instant::now();
    assert!(began, "no upgrade began");
    assert!(child.wait().unwrap().success());
    // Measured while other tests may load the machine: kills that land after the upgrade
    // finished shorten it, and kills before it moved anything lengthen it.
    let mut whole_upgrade = begun_at.elapsed();
    assert_eq!(formats(&workspace), (0, expected.len()));

    let mut rng = rand::thread_rng();
    let mut killed_mid_upgrade = 0;
    for _attempt in 0..5 {
        copy_dir(&pristine, &store_path);
        for _ in 0..8 {
            let (left_before, _) = formats(&workspace);
            let (mut child, began) = spawn_until_upgrade_begins(&workspace);
            // Kill at a random instant of what is left of the upgrade.
            let left = whole_upgrade.mul_f64(left_before as f64 / expected.len() as f64);
            std::thread::sleep(left.mul_f64(rng.gen_range(0.0..1.0)));
            child.kill().unwrap();
            child.wait().unwrap();
            let (left, moved) = formats(&workspace);
            assert_eq!(left + moved, expected.len(), "no profile lost or doubled");
            if left == 0 {
                whole_upgrade = whole_upgrade.mul_f64(0.5);
                break;
            }
            if left == left_before {
                whole_upgrade = whole_upgrade.mul_f64(1.5);
            }
            assert!(
                began,
                "the store still holds profiles one to a key but no upgrade began"
            );
            if moved > 0 {
                killed_mid_upgrade += 1;
                assert!(meta_value(&workspace, "upgrade").is_some());
                if killed_mid_upgrade == 3 {
                    break;
                }
            }
        }
        if killed_mid_upgrade > 0 {
            break;
        }
    }
    assert!(
        killed_mid_upgrade > 0,
        "no kill landed while the upgrade ran (a whole upgrade took {whole_upgrade:?}): the test shows nothing"
    );
    let out = outbox_stats_command(&workspace).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_upgraded(&workspace, &expected);
}

/// Asks for the store to be rebuilt at its next open, as an upgrade does.
fn want_rebuild(workspace: &Workspace) {
    let db = open_sled(&workspace.path().join("store"));
    db.open_tree("meta")
        .unwrap()
        .insert("rebuild", &[])
        .unwrap();
    db.flush().unwrap();
}

/// `outpost compact`, which rebuilds the store whether it wants it or not.
fn compact_command(workspace: &Workspace) -> Command {
    let mut command = Command::new(binary());
    command
        .args(["--config", workspace.config_path().to_str().unwrap()])
        .arg("compact")
        .env("OUTPOST_LOG", "info");
    command
}

/// A command that rebuilds the store: the open after an upgrade (`outbox stats` on a store
/// that wants a rebuild) on even attempts, `outpost compact` on odd ones.
fn rebuild_command(workspace: &Workspace, attempt: usize) -> Command {
    if attempt.is_multiple_of(2) {
        want_rebuild(workspace);
        outbox_stats_command(workspace)
    } else {
        compact_command(workspace)
    }
}

/// The rebuild that follows an upgrade, and `outpost compact` (a copy into a fresh database,
/// swapped in), killed at random instants: every next open finishes the swap or deletes the
/// copy and finds the store whole, as it was or as the copy.
#[test]
fn a_rebuild_killed_at_random_instants_leaves_the_store_whole() {
    let workspace = Workspace::new();
    let store_path = workspace.path().join("store");
    let expected = old_store(&workspace, 30_000, OldFormat::Records);
    let out = outbox_stats_command(&workspace).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_upgraded(&workspace, &expected);

    // How long a whole rebuild takes on this machine.
    let (mut child, began) =
        spawn_until_logged(rebuild_command(&workspace, 0), "rebuilding the store");
    let begun_at = std::time::Instant::now();
    assert!(began, "no rebuild began");
    assert!(child.wait().unwrap().success());
    let whole_rebuild = begun_at.elapsed();
    assert_upgraded(&workspace, &expected);
    let out = compact_command(&workspace).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_upgraded(&workspace, &expected);

    let mut rng = rand::thread_rng();
    let (mut mid_copy, mut after_copy) = ([0; 2], 0);
    for attempt in 0..16 {
        let (mut child, began) =
            spawn_until_logged(rebuild_command(&workspace, attempt), "rebuilding the store");
        assert!(began, "no rebuild began");
        std::thread::sleep(whole_rebuild.mul_f64(rng.gen_range(0.0..1.0)));
        child.kill().unwrap();
        child.wait().unwrap();
        let swapping = store_path.join("rebuild.swap").exists();
        if swapping {
            after_copy += 1;
        } else if store_path.join("rebuild").exists() {
            mid_copy[attempt % 2] += 1;
        }
        // The next open finishes what the kill stopped (or rebuilds again).
        let store = Store::open(&store_path, 8 << 20).unwrap();
        assert_eq!(store.profile_count().unwrap(), expected.len() as u64);
        drop(store);
        assert_upgraded(&workspace, &expected);
        assert!(!store_path.join("rebuild").exists() && !store_path.join("rebuild.swap").exists());
        if mid_copy.iter().all(|&kills| kills >= 2) {
            break;
        }
    }
    eprintln!("a whole rebuild took {whole_rebuild:?}; kills while copying (after an upgrade, compacting): {mid_copy:?}, after: {after_copy}");
    assert!(
        mid_copy.iter().all(|&kills| kills > 0),
        "no kill landed while the copy was made, after an upgrade or compacting ({mid_copy:?}; a whole rebuild took {whole_rebuild:?}): the test shows nothing"
    );
    let out = outbox_stats_command(&workspace).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["pending"], expected.len());
    assert_eq!(stats["profiles"], expected.len());
}

/// A profile whose group cannot be read when the upgrade moves it stays where it was, refused
/// like the group's own profiles; `outpost repair` forgets the group and moves it in. The
/// upgrade is finished all the same, so a backfill does not wait for it.
#[test]
fn a_profile_whose_group_is_unreadable_waits_for_repair_and_then_moves_in() {
    let workspace = Workspace::new();
    // JSON profiles: the ones repair moves in are made typed records too (`formats` checks).
    let expected = old_store(&workspace, 300, OldFormat::Json);
    let group = group_key("p000007");
    let stuck: Vec<&String> = expected
        .keys()
        .filter(|id| group_key(id) == group)
        .collect();
    {
        let db = open_sled(&workspace.path().join("store"));
        db.open_tree("profile_groups")
            .unwrap()
            .insert(group, &b"\x01\xff\xff\xff"[..])
            .unwrap();
        db.flush().unwrap();
    }
    let out = outbox_stats_command(&workspace).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    let moved = expected.len() - stuck.len();
    assert!(
        log.contains(&format!(
            "upgraded the stored profiles: {moved} rewritten of 300"
        )) && log.contains(&format!("{} left where they were", stuck.len())),
        "{log}"
    );
    assert_eq!(
        meta_value(&workspace, "upgrade"),
        None,
        "the upgrade is done"
    );

    let name: String = group.iter().map(|b| format!("{b:02x}")).collect();
    let out = workspace.run(&["check", "--store", "--json"], None);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let listed = json_lines(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["tree"], "profile_groups");
    assert_eq!(listed[0]["key"], name.as_str());

    // Meanwhile: the stuck profile is refused, the others read, and a backfill runs.
    {
        let store = Store::open(&workspace.path().join("store"), 8 << 20).unwrap();
        let error = store.profile_record("p000007").unwrap_err().to_string();
        assert!(error.contains(&name), "{error}");
        assert_eq!(
            store.profile_record("p000008").unwrap().as_ref(),
            expected.get("p000008")
        );
        let config = Config::load(&workspace.config_path()).unwrap();
        let mut mapping = config.mapping.clone();
        mapping.segments.push("a-segment-mapped-later".into());
        store
            .record_mapping(&mut mapping, Utc::now().timestamp_millis())
            .unwrap();
        let progress = store.backfill_step(&mapping, 1_000, Utc::now()).unwrap();
        assert!(
            progress.is_some_and(|p| p.scanned as usize == moved),
            "the backfill runs over the moved profiles"
        );
    }

    let out = workspace.run(&["repair", "--yes"], None);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!(
            "{} profiles the upgrade could not move into it moved in",
            stuck.len()
        )),
        "{said}"
    );
    let out = workspace.run(&["check", "--store"], None);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(formats(&workspace), (0, expected.len()));
    let store = Store::open(&workspace.path().join("store"), 8 << 20).unwrap();
    for id in stuck {
        assert_eq!(store.profile_record(id).unwrap().as_ref(), expected.get(id));
    }
}
