//! The export rules on typed records (pure): what the store runs for every update.
//!
//! It decides as the rules on JSON values ([`super::apply`], [`super::change`],
//! [`super::export`]) do on the pruned profile, which stay as the readable statement of the
//! rules and the reference this engine is tested against (`tests/record_engine.rs`; README
//! "Where SPEC is silent" names the edges where the two differ). Merging an RFC 7386 patch is
//! done per kept part: each attribute leaf, each segment entry and each identity namespace is
//! what merging the whole profile would leave there; values at paths the mapping no longer
//! reaches are not carried (see `merged_attributes`).

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::apply::UpdateResult;
use super::change::Reason;
use super::layout::Layout;
use super::payload::{self, Kind};
use super::prune::takes_more_than;
use super::record::{canonical, parse, Attribute, Membership, Namespace, ProfileRecord};
use super::update::{format_time, Op, Update};
use crate::config::Mapping;

/// What to write for one update. An upsert's new record borrows the record prepared with
/// it ([`prepare`]) where it is that record unchanged: copying it took 5-6% of the committer
/// thread's samples, and freeing the copy more.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordAction<'a> {
    Keep,
    Put(Cow<'a, ProfileRecord>),
    Remove,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AppliedRecord<'a> {
    pub result: UpdateResult,
    pub store: RecordAction<'a>,
    /// The reason and the payload as JSON text.
    pub export: Option<(Reason, String)>,
}

/// Applies `update` to `stored`. `received_at` stands in for the update's time when it has none.
pub fn apply_record<'a>(
    stored: Option<&ProfileRecord>,
    update: &'a Update,
    mapping: &Mapping,
    layout: &Layout,
    received_at: DateTime<Utc>,
) -> AppliedRecord<'a> {
    let stored_micros = stored.and_then(|s| s.timestamp_micros);
    if let (Some(theirs), Some(ours)) = (update.timestamp, stored.and_then(|s| s.timestamp())) {
        if theirs < ours {
            return AppliedRecord {
                result: UpdateResult::Stale,
                store: RecordAction::Keep,
                export: None,
            };
        }
    }
    let time = || format_time(update.timestamp.unwrap_or(received_at));
    let empty = ProfileRecord::default();
    let old = stored.unwrap_or(&empty);

    if update.op == Op::Delete {
        if stored.is_none() {
            return AppliedRecord {
                result: UpdateResult::Unchanged,
                store: RecordAction::Keep,
                export: None,
            };
        }
        let export = is_member_of_any(old, layout).then(|| {
            let payload = payload::write(old, old, Kind::Delete, mapping, layout, &time());
            (Reason::Delete, payload)
        });
        return AppliedRecord {
            result: UpdateResult::Deleted,
            store: RecordAction::Remove,
            export,
        };
    }

    let timestamp_micros = update
        .timestamp
        .map(|t| t.timestamp_micros())
        .or(stored_micros);
    let new: Cow<'a, ProfileRecord> = match (update.op, &update.record) {
        (Op::Merge, _) => Cow::Owned(merged(old, &update.patch(), layout, timestamp_micros)),
        (_, Some(prepared)) if prepared.timestamp_micros == timestamp_micros => {
            Cow::Borrowed(&**prepared)
        }
        (_, Some(prepared)) => Cow::Owned(ProfileRecord {
            timestamp_micros,
            ..(**prepared).clone()
        }),
        (_, None) => Cow::Owned(ProfileRecord::from_profile(
            timestamp_micros,
            &update.profile,
            layout,
        )),
    };
    let export = decide(old, &new, layout).map(|reason| {
        let payload = payload::write(old, &new, Kind::Update, mapping, layout, &time());
        (reason, payload)
    });
    let changed = stored.is_none_or(|s| *s != *new);
    AppliedRecord {
        result: if export.is_some() {
            UpdateResult::Exported
        } else {
            UpdateResult::Unchanged
        },
        store: if changed {
            RecordAction::Put(new)
        } else {
            RecordAction::Keep
        },
        export,
    }
}

/// Builds an upsert's record ahead (see [`Update::record`]) and drops its profile, on the
/// caller's thread: the record depends on the update and the mapping's layout alone, and is
/// built best right after parsing, while the profile is still in the cache. `layout` must be
/// the one the update will be applied with (a mapping's segment dates do not change it).
/// A merge whose patch takes more than [`HEAVY_PATCH_BYTES`] as a tree is kept as text
/// ([`Update::patch_text`]): held with up to two chunks of a request, such patches took a
/// request of 15 MB to 1.4 GB.
pub fn prepare(update: &mut Update, layout: &Layout) {
    if update.op == Op::Upsert && update.record.is_none() {
        let timestamp_micros = update.timestamp.map(|t| t.timestamp_micros());
        let record = ProfileRecord::from_profile(timestamp_micros, &update.profile, layout);
        update.record = Some(Box::new(record));
        update.profile = Map::new();
    } else if update.op == Op::Merge
        && update.patch_text.is_none()
        && takes_more_than(&update.profile, HEAVY_PATCH_BYTES)
    {
        let patch = Value::Object(std::mem::take(&mut update.profile));
        update.patch_text = Some(canonical(&patch).into());
    }
}

/// See [`prepare`].
pub const HEAVY_PATCH_BYTES: usize = 64 << 10;

pub fn is_member_of_any(record: &ProfileRecord, layout: &Layout) -> bool {
    layout.segments.iter().any(|s| record.is_member(s))
}

/// Whether two lists of identities hold the same set (order and repeats ignored). Short lists
/// are compared each with each, which beats sorting them; long ones (a profile may hold tens
/// of thousands) are sorted, since each with each would take the committer minutes.
fn same_identities(a: &[String], b: &[String]) -> bool {
    if a.len().saturating_mul(b.len()) <= 1024 {
        return a.iter().all(|x| b.contains(x)) && b.iter().all(|y| a.contains(y));
    }
    fn set(items: &[String]) -> Vec<&str> {
        let mut sorted: Vec<&str> = items.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        sorted.dedup();
        sorted
    }
    set(a) == set(b)
}

fn identities_differ(old: &ProfileRecord, new: &ProfileRecord, layout: &Layout) -> bool {
    let differs = |ns: &str| !same_identities(old.identities(ns), new.identities(ns));
    match &layout.namespaces {
        Some(kept) => kept.iter().any(|ns| differs(ns)),
        None => old
            .identities
            .iter()
            .chain(&new.identities)
            .any(|n| differs(&n.namespace)),
    }
}

/// Decides whether `old` → `new` must be exported, and why (SPEC's order: segment,
/// identity, attribute). An empty record stands for a profile never seen.
pub fn decide(old: &ProfileRecord, new: &ProfileRecord, layout: &Layout) -> Option<Reason> {
    if layout
        .segments
        .iter()
        .any(|s| old.is_member(s) != new.is_member(s))
    {
        return Some(Reason::Segment);
    }
    if !is_member_of_any(new, layout) {
        return None;
    }
    if identities_differ(old, new, layout) {
        return Some(Reason::Identity);
    }
    if layout
        .leaves
        .iter()
        .any(|leaf| old.attribute(leaf) != new.attribute(leaf))
    {
        return Some(Reason::Attribute);
    }
    None
}

/// What a merge patch holds at a path.
enum PatchAt<'a> {
    /// Nothing: the value there stays as it is.
    Untouched,
    /// A `null`, or a value that is not an object above the path: nothing is left there.
    Removed,
    /// This value is merged into the value there.
    Merge(&'a Value),
}

fn patch_at<'a>(patch: &'a Map<String, Value>, keys: &[String]) -> PatchAt<'a> {
    let (last, parents) = keys.split_last().expect("mapping paths are never empty");
    let mut node = patch;
    for key in parents {
        match node.get(key) {
            None => return PatchAt::Untouched,
            Some(Value::Object(inner)) => node = inner,
            Some(_) => return PatchAt::Removed,
        }
    }
    match node.get(last) {
        None => PatchAt::Untouched,
        Some(Value::Null) => PatchAt::Removed,
        Some(value) => PatchAt::Merge(value),
    }
}

/// RFC 7386: `patch` merged into `target` (absent: `None`).
fn merge_value(target: Option<Value>, patch: &Value) -> Value {
    let mut value = target.unwrap_or(Value::Null);
    json_patch::merge(&mut value, patch);
    value
}

/// The text at a path after merging `patch`, from the text there before.
fn merged_text(
    before: Option<Cow<'_, str>>,
    patch: &Map<String, Value>,
    keys: &[String],
) -> Option<String> {
    match patch_at(patch, keys) {
        PatchAt::Untouched => before.map(Cow::into_owned),
        PatchAt::Removed => None,
        PatchAt::Merge(value @ Value::Object(_)) => Some(canonical(&merge_value(
            before.map(|text| parse(&text)),
            value,
        ))),
        PatchAt::Merge(value) => Some(canonical(value)),
    }
}

/// The attributes after merging `patch`: each leaf's value. Values the record holds at paths
/// the mapping no longer reaches (kept from a run with another mapping) are not carried: the
/// patch was pruned to this mapping, so it cannot say whether it changed them, and one carried
/// unchanged could be exported stale once a mapping reaches it again. Without them, such a
/// path counts as absent before, as an upsert leaves it.
fn merged_attributes(
    old: &ProfileRecord,
    patch: &Map<String, Value>,
    layout: &Layout,
) -> Vec<Attribute> {
    layout
        .leaves
        .iter()
        .filter_map(|leaf| {
            merged_text(old.attribute(leaf), patch, &leaf.keys).map(|json| Attribute {
                path: leaf.joined.clone(),
                json,
            })
        })
        .collect()
}

fn merged_segments(old: &ProfileRecord, patch: &Map<String, Value>) -> Vec<Membership> {
    let ups = match patch.get("segmentMembership") {
        None => return old.segments.clone(),
        Some(Value::Object(membership)) => match membership.get("ups") {
            None => return old.segments.clone(),
            Some(Value::Object(ups)) => ups,
            Some(_) => return Vec::new(),
        },
        Some(_) => return Vec::new(),
    };
    // Both in the order of their segment ids: merged in one pass, as a profile may hold
    // tens of thousands (an insertion each would move the rest each time).
    let mut segments = Vec::with_capacity(old.segments.len() + ups.len());
    let mut before = old.segments.iter().peekable();
    for (segment, change) in ups {
        while let Some(kept) = before.next_if(|m| m.segment.as_str() < segment.as_str()) {
            segments.push(kept.clone());
        }
        let stored = before.next_if(|m| m.segment == *segment);
        if !change.is_null() {
            let entry = merge_value(stored.map(Membership::to_entry), change);
            segments.push(Membership::from_entry(segment, &entry));
        }
    }
    segments.extend(before.cloned());
    segments
}

/// The mapped namespaces after merging `patch`; as with attributes (`merged_attributes`),
/// namespaces the mapping no longer reaches are not carried.
fn merged_identities(
    old: &ProfileRecord,
    patch: &Map<String, Value>,
    layout: &Layout,
) -> Vec<Namespace> {
    let kept = old
        .identities
        .iter()
        .filter(|n| layout.keeps_namespace(&n.namespace));
    let map = match patch.get("identityMap") {
        None => return kept.cloned().collect(),
        Some(Value::Object(map)) => map,
        Some(_) => return Vec::new(),
    };
    // Both in the order of their namespaces: merged in one pass (see `merged_segments`).
    let mut identities = Vec::with_capacity(old.identities.len() + map.len());
    let mut before = kept.peekable();
    for (namespace, change) in map {
        if !layout.keeps_namespace(namespace) {
            continue;
        }
        while let Some(kept) = before.next_if(|n| n.namespace.as_str() < namespace.as_str()) {
            identities.push(kept.clone());
        }
        // Arrays replace; anything else leaves no identities (an object merged into an
        // array makes an object).
        before.next_if(|n| n.namespace == *namespace);
        identities.extend(Namespace::from_value(namespace, change));
    }
    identities.extend(before.cloned());
    identities
}

/// `patch` merged into `old`, keeping what `layout` keeps.
fn merged(
    old: &ProfileRecord,
    patch: &Map<String, Value>,
    layout: &Layout,
    timestamp_micros: Option<i64>,
) -> ProfileRecord {
    ProfileRecord {
        timestamp_micros,
        segments: merged_segments(old, patch),
        identities: merged_identities(old, patch, layout),
        attributes: merged_attributes(old, patch, layout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Short lists and long ones (compared sorted) alike: the same set in any order and with
    /// repeats is the same; one identity more or other is not.
    #[test]
    fn identities_are_compared_as_sets() {
        let ids = |range: std::ops::Range<u32>| -> Vec<String> {
            range.map(|n| format!(r#"{{"id":"{n}"}}"#)).collect()
        };
        for n in [3, 40, 5_000] {
            let a = ids(0..n);
            let mut shuffled: Vec<String> = a.iter().rev().cloned().collect();
            shuffled.push(a[0].clone());
            assert!(same_identities(&a, &shuffled), "{n}");
            assert!(same_identities(&shuffled, &a), "{n}");
            let more = ids(0..n + 1);
            assert!(!same_identities(&a, &more), "{n}");
            assert!(!same_identities(&more, &a), "{n}");
            let other = ids(1..n + 1);
            assert!(!same_identities(&a, &other), "{n}");
        }
        assert!(same_identities(&[], &[]));
        assert!(!same_identities(&ids(0..1), &[]));
    }
}
