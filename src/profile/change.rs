//! The export rules: does the destination need to hear about `old` → `new`? (pure)
//!
//! The reasons are checked in the order SPEC gives: segment, identity, attribute.

use serde_json::Value;

use crate::config::Mapping;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    Segment,
    Identity,
    Attribute,
    Delete,
}

impl Reason {
    pub const ALL: [Reason; 4] = [
        Reason::Segment,
        Reason::Identity,
        Reason::Attribute,
        Reason::Delete,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Segment => "segment",
            Reason::Identity => "identity",
            Reason::Attribute => "attribute",
            Reason::Delete => "delete",
        }
    }

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<Reason> {
        Reason::ALL.get(code as usize).copied()
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The entry of segment `segment` in `segmentMembership.ups`, if any; one of `null` is none
/// (SPEC: its entry vanished).
pub fn segment_entry<'a>(profile: &'a Value, segment: &str) -> Option<&'a Value> {
    let entry = profile.get("segmentMembership")?.get("ups")?.get(segment)?;
    (!entry.is_null()).then_some(entry)
}

/// `realized` and `existing` are memberships; `exited` or any other status is not.
pub fn is_member(profile: &Value, segment: &str) -> bool {
    let status = segment_entry(profile, segment)
        .and_then(|entry| entry.get("status"))
        .and_then(Value::as_str);
    matches!(status, Some("realized" | "existing"))
}

pub fn is_member_of_any(profile: &Value, mapping: &Mapping) -> bool {
    mapping.segments.iter().any(|s| is_member(profile, s))
}

/// The value at a dot path of object keys.
pub fn value_at<'a>(profile: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(profile, |value, key| value.get(key))
}

/// The identities of one namespace (not an array: none, as the payload carries only arrays).
fn identities<'a>(profile: &'a Value, namespace: &str) -> &'a [Value] {
    match profile.get("identityMap").and_then(|m| m.get(namespace)) {
        Some(Value::Array(items)) => items,
        _ => &[],
    }
}

/// Whether two lists of identities hold the same set (order and duplicates ignored). Objects
/// compare by content whatever their key order, so equal `Value`s are equal identities; the
/// lists are short, so comparing each with each beats building sets of their texts.
fn same_identities(a: &[Value], b: &[Value]) -> bool {
    a.iter().all(|x| b.contains(x)) && b.iter().all(|y| a.contains(y))
}

fn namespaces(profile: &Value) -> impl Iterator<Item = &String> {
    profile
        .get("identityMap")
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(|map| map.keys())
}

fn identities_differ(old: &Value, new: &Value, mapping: &Mapping) -> bool {
    let differs = |ns: &str| !same_identities(identities(old, ns), identities(new, ns));
    if mapping.identities.is_empty() {
        namespaces(old).chain(namespaces(new)).any(|ns| differs(ns))
    } else {
        mapping.identities.iter().any(|ns| differs(ns))
    }
}

/// Decides whether `old` → `new` must be exported, and why. `{}` stands for a profile never seen.
pub fn decide(old: &Value, new: &Value, mapping: &Mapping) -> Option<Reason> {
    if mapping
        .segments
        .iter()
        .any(|s| is_member(old, s) != is_member(new, s))
    {
        return Some(Reason::Segment);
    }
    if !is_member_of_any(new, mapping) {
        return None;
    }
    if identities_differ(old, new, mapping) {
        return Some(Reason::Identity);
    }
    if mapping
        .attributes
        .iter()
        .any(|path| value_at(old, path) != value_at(new, path))
    {
        return Some(Reason::Attribute);
    }
    None
}

/// A `delete` exports only when the forgotten profile was a member of a mapped segment.
pub fn decide_delete(old: &Value, mapping: &Mapping) -> Option<Reason> {
    is_member_of_any(old, mapping).then_some(Reason::Delete)
}
