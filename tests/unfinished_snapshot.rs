//! A kill while the store is being opened can leave sled's snapshot half written
//! (`snap.<lsn>.generating`, renamed to `snap.<lsn>` only once complete). sled 0.34 would then
//! refuse the store as corrupt at every later open; outpost removes the unfinished file first,
//! under sled's lock, and the store opens with everything in it.

mod common;

use std::path::{Path, PathBuf};

use chrono::Utc;
use outpost::config::Mapping;
use outpost::profile::update::parse_body;
use outpost::store::Store;

use common::open_with_sled_alone;

fn snapshots(store: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(store)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("snap.")
        })
        .collect();
    found.sort();
    found
}

/// A store holding `profiles` profiles, each with a pending export, closed again; then a second
/// open and close, so that sled has written a finished snapshot.
fn store_with_profiles(path: &Path, profiles: usize) -> Mapping {
    let mapping = Mapping::new(&["person.name.firstName"], &["seg-a"], &[]);
    {
        let store = Store::open(path, 8 << 20).unwrap();
        let body: Vec<String> = (0..profiles)
            .map(|i| {
                format!(
                    r#"{{"id":"p-{i}","profile":{{"person":{{"name":{{"firstName":"n{i}"}}}},"segmentMembership":{{"ups":{{"seg-a":{{"status":"realized"}}}}}}}}}}"#
                )
            })
            .collect();
        let updates = parse_body(body.join("\n").as_bytes()).unwrap();
        store
            .apply_groups(&[&updates], &mapping, Utc::now())
            .unwrap();
        store.flush().unwrap();
    }
    drop(Store::open(path, 8 << 20).unwrap());
    mapping
}

/// What a kill during sled's snapshot writing leaves: the newest snapshot, cut short, under
/// the name of one not yet finished and numbered past the finished one.
fn leave_unfinished_snapshot(store: &Path) -> PathBuf {
    let finished = snapshots(store)
        .into_iter()
        .find(|p| !p.to_string_lossy().ends_with(".generating"))
        .expect("sled wrote a snapshot");
    let bytes = std::fs::read(&finished).unwrap();
    let unfinished = store.join("snap.FFFFFFFFFFFFFFF0.generating");
    std::fs::write(&unfinished, &bytes[..bytes.len() / 2]).unwrap();
    unfinished
}

#[test]
fn a_snapshot_left_unfinished_by_a_kill_is_removed_and_the_store_opens_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    store_with_profiles(&path, 50);
    let unfinished = leave_unfinished_snapshot(&path);

    // What sled does with it on its own: the store is refused.
    let refused = open_with_sled_alone(&path).map(|_| ()).unwrap_err();
    assert!(
        matches!(refused, sled::Error::Corruption { .. }),
        "{refused:?}"
    );

    let store = Store::open(&path, 8 << 20).unwrap();
    assert!(!unfinished.exists(), "{:?}", snapshots(&path));
    for i in 0..50 {
        assert!(store.profile(&format!("p-{i}")).unwrap().is_some(), "p-{i}");
    }
    assert_eq!(store.stats(Utc::now()).unwrap().pending, 50);
}

#[test]
fn the_snapshot_of_a_process_holding_the_store_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    store_with_profiles(&path, 5);
    let holder = Store::open(&path, 8 << 20).unwrap();
    // As if `holder` were writing its snapshot right now.
    let in_progress = path.join("snap.FFFFFFFFFFFFFFF0.generating");
    std::fs::write(&in_progress, b"being written").unwrap();

    let locked = Store::open(&path, 8 << 20).map(|_| ()).unwrap_err();
    assert!(locked.to_string().contains("in use"), "{locked}");
    assert!(in_progress.exists(), "removed while another held the store");
    drop(holder);
}
