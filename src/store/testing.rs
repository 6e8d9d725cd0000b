//! What the store's unit tests share.

use super::{ListFilter, Store, StoreError};
use crate::config::Mapping;

/// Writes one update for each `(profile, name)`, in order (each changes the mapped attribute
/// `name` of a member of segment `s`), without flushing.
pub fn write_each(store: &Store, updates: &[(&str, &str)]) {
    let mapping = Mapping::new(&["name"], &["s"], &[]);
    let body: Vec<String> = updates
        .iter()
        .map(|(id, name)| {
            format!(
                r#"{{"id":"{id}","profile":{{"name":"{name}","segmentMembership":{{"ups":{{"s":{{"status":"realized"}}}}}}}}}}"#
            )
        })
        .collect();
    let updates = crate::profile::update::parse_body(body.join("\n").as_bytes()).unwrap();
    store
        .apply_groups(&[&updates], &mapping, chrono::Utc::now())
        .unwrap();
}

/// Marks the store failed as an `fsync` that got `EIO` would.
pub fn fail_as_after_eio(store: &Store) {
    let generation = store.trees().unwrap().generation;
    let eio = std::io::Error::from_raw_os_error(5);
    store.classify(StoreError::Sync(eio), generation);
}

/// Stores one export for each `(profile, name)`, in order (see [`write_each`]), durably;
/// their sequences.
pub fn export_each(store: &Store, updates: &[(&str, &str)]) -> Vec<u64> {
    let pending = || -> Vec<u64> {
        let listed = store.list(&ListFilter::default()).unwrap();
        listed.iter().map(|e| e.id.seq).collect()
    };
    let before = pending();
    write_each(store, updates);
    store.flush().unwrap();
    let made: Vec<u64> = pending()
        .into_iter()
        .filter(|s| !before.contains(s))
        .collect();
    assert_eq!(made.len(), updates.len());
    made
}
