//! The export payload: the mapped part of a profile, as the destination receives it (pure).

use serde_json::{json, Map, Value};

use super::change::{is_member, segment_entry, value_at};
use crate::config::Mapping;

fn exited(time: &str) -> Value {
    json!({"status": "exited", "lastQualificationTime": time})
}

/// Puts `value` at `path` of object keys, making (or replacing by) objects on the way.
pub(crate) fn insert_at(target: &mut Map<String, Value>, path: &[impl AsRef<str>], value: Value) {
    let (last, parents) = path.split_last().expect("mapping paths are never empty");
    let mut node = target;
    for key in parents {
        let entry = node
            .entry(key.as_ref())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        node = entry.as_object_mut().expect("made an object above");
    }
    node.insert(last.as_ref().to_owned(), value);
}

/// Builds the payload for `new`. A mapped segment that `old` was a member of and whose entry has
/// vanished from `new` is carried as exited at `time` (RFC 3339, UTC, seconds).
pub fn project(old: &Value, new: &Value, mapping: &Mapping, time: &str) -> Value {
    let mut payload = Map::new();
    for path in &mapping.attributes {
        if let Some(value) = value_at(new, path) {
            insert_at(&mut payload, path, value.clone());
        }
    }

    let mut ups = Map::new();
    for segment in &mapping.segments {
        let mut entry = match segment_entry(new, segment) {
            Some(entry) => entry.clone(),
            None if is_member(old, segment) => exited(time),
            None => continue,
        };
        describe_segment(&mut entry, segment, mapping);
        ups.insert(segment.clone(), entry);
    }
    if !ups.is_empty() {
        payload.insert("segmentMembership".into(), json!({ "ups": ups }));
    }

    let mut identity_map = Map::new();
    if let Some(map) = new.get("identityMap").and_then(Value::as_object) {
        for (namespace, identities) in map {
            let mapped = mapping.identities.is_empty() || mapping.identities.contains(namespace);
            let non_empty = identities.as_array().is_some_and(|a| !a.is_empty());
            if mapped && non_empty {
                identity_map.insert(namespace.clone(), identities.clone());
            }
        }
    }
    if !identity_map.is_empty() {
        payload.insert("identityMap".into(), Value::Object(identity_map));
    }
    Value::Object(payload)
}

/// Adds to a mapped segment's entry what the mapping asks for (Adobe's "Include Segment Names"
/// and "Include Segment Timestamps"): `name`; `createdAt`, `updatedAt`, `mappingCreatedAt`,
/// `mappingUpdatedAt` in Unix epoch milliseconds; each only when known.
pub(crate) fn describe_segment(entry: &mut Value, segment: &str, mapping: &Mapping) {
    if let Some(entry) = entry.as_object_mut() {
        for (key, value) in segment_extras(segment, mapping) {
            entry.insert(key.into(), value);
        }
    }
}

/// The fields [`describe_segment`] adds to a mapped segment's entry, by key.
pub(crate) fn segment_extras(segment: &str, mapping: &Mapping) -> Vec<(&'static str, Value)> {
    let mut extras = Vec::new();
    let details = mapping.segment_details.get(segment);
    if mapping.include_segment_names {
        if let Some(name) = details.and_then(|d| d.name.as_ref()) {
            extras.push(("name", name.clone().into()));
        }
    }
    if mapping.include_segment_timestamps {
        let mapped = mapping.mapped_at.get(segment);
        for (key, ms) in [
            ("createdAt", details.and_then(|d| d.created_at_ms)),
            ("updatedAt", details.and_then(|d| d.updated_at_ms)),
            ("mappingCreatedAt", mapped.map(|m| m.created_ms)),
            ("mappingUpdatedAt", mapped.map(|m| m.updated_ms)),
        ] {
            if let Some(ms) = ms {
                extras.push((key, ms.into()));
            }
        }
    }
    extras
}

/// The payload for a `delete`: the last payload of `old` with every mapped segment it was a
/// member of set to exited at `time`.
pub fn project_delete(old: &Value, mapping: &Mapping, time: &str) -> Value {
    let mut gone = old.clone();
    for segment in &mapping.segments {
        if is_member(old, segment) {
            if let Some(ups) = gone
                .get_mut("segmentMembership")
                .and_then(|m| m.get_mut("ups"))
                .and_then(Value::as_object_mut)
            {
                ups.insert(segment.clone(), exited(time));
            }
        }
    }
    project(old, &gone, mapping, time)
}
