//! What the store's unit tests share.

use super::{ListFilter, Store};
use crate::config::Mapping;

/// Stores one export for each `(profile, name)`, in order (each changes the mapped attribute
/// `name` of a member of segment `s`); their sequences.
pub fn export_each(store: &Store, updates: &[(&str, &str)]) -> Vec<u64> {
    let pending = || -> Vec<u64> {
        let listed = store.list(&ListFilter::default()).unwrap();
        listed.iter().map(|e| e.id.seq).collect()
    };
    let before = pending();
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
    store.flush().unwrap();
    let made: Vec<u64> = pending()
        .into_iter()
        .filter(|s| !before.contains(s))
        .collect();
    assert_eq!(made.len(), updates.len());
    made
}
