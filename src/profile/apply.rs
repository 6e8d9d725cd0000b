//! Applying one update to the stored version of its profile (pure): the new version, whether
//! it is stale, and the export it causes.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::change::{decide, decide_delete, Reason};
use super::export::{project, project_delete};
use super::update::{format_time, Op, Update};
use crate::config::Mapping;

/// The version of a profile the store keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredProfile {
    pub timestamp: Option<DateTime<Utc>>,
    pub profile: Value,
}

/// How one update was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateResult {
    /// Applied and produced an export.
    Exported,
    /// Applied (or a no-op) without an export.
    Unchanged,
    /// Older than the stored version: ignored.
    Stale,
    /// A `delete` of a stored profile (it may also have produced an export).
    Deleted,
}

/// What to write for one update.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreAction {
    Keep,
    Put(StoredProfile),
    Remove,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub result: UpdateResult,
    pub store: StoreAction,
    pub export: Option<(Reason, Value)>,
}

/// Applies `update` to `stored`. `received_at` stands in for the update's time when it has none.
pub fn apply(
    stored: Option<&StoredProfile>,
    update: &Update,
    mapping: &Mapping,
    received_at: DateTime<Utc>,
) -> Applied {
    let stored_time = stored.and_then(|s| s.timestamp);
    if let (Some(theirs), Some(ours)) = (update.timestamp, stored_time) {
        if theirs < ours {
            return Applied {
                result: UpdateResult::Stale,
                store: StoreAction::Keep,
                export: None,
            };
        }
    }
    let time = format_time(update.timestamp.unwrap_or(received_at));
    let empty = Value::Object(Map::new());
    let old = stored.map_or(&empty, |s| &s.profile);

    if update.op == Op::Delete {
        let Some(_) = stored else {
            return Applied {
                result: UpdateResult::Unchanged,
                store: StoreAction::Keep,
                export: None,
            };
        };
        let export =
            decide_delete(old, mapping).map(|reason| (reason, project_delete(old, mapping, &time)));
        return Applied {
            result: UpdateResult::Deleted,
            store: StoreAction::Remove,
            export,
        };
    }

    let new = match update.op {
        Op::Merge => {
            let mut merged = old.clone();
            merge_object(&mut merged, &update.profile);
            merged
        }
        _ => Value::Object(update.profile.clone()),
    };
    let export =
        decide(old, &new, mapping).map(|reason| (reason, project(old, &new, mapping, &time)));
    let timestamp = update.timestamp.or(stored_time);
    let changed = stored.is_none_or(|s| s.profile != new || s.timestamp != timestamp);
    Applied {
        result: if export.is_some() {
            UpdateResult::Exported
        } else {
            UpdateResult::Unchanged
        },
        store: if changed {
            StoreAction::Put(StoredProfile {
                timestamp,
                profile: new,
            })
        } else {
            StoreAction::Keep
        },
        export,
    }
}

/// RFC 7386 merge of an object patch into `target`, as `json_patch::merge` with the patch
/// wrapped in a `Value`, without copying the patch to wrap it.
fn merge_object(target: &mut Value, patch: &Map<String, Value>) {
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let object = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if value.is_null() {
            object.remove(key);
        } else {
            json_patch::merge(object.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merging_an_object_patch_is_json_patch_merge() {
        let docs = [
            json!({}),
            json!({"a": 1, "b": {"c": 2, "d": 3}}),
            json!("not an object"),
        ];
        let patches = [
            json!({}),
            json!({"a": null}),
            json!({"b": {"c": null, "e": [1]}, "f": {"g": null}}),
            json!({"a": {"x": 1}, "b": 7}),
        ];
        for doc in &docs {
            for patch in &patches {
                let mut expected = doc.clone();
                json_patch::merge(&mut expected, patch);
                let mut merged = doc.clone();
                merge_object(&mut merged, patch.as_object().unwrap());
                assert_eq!(merged, expected, "doc {doc} patch {patch}");
            }
        }
    }
}
