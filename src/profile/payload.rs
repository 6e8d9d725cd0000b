//! The export payload written as JSON text straight from records (pure): the same document
//! as [`super::export::project`] builds from JSON values, with keys in the same (sorted)
//! order, without building it as a `Value` first.

use super::export::{describe_segment, segment_extras};
use super::layout::{json_string, push_json_string, Layout, Node};
use super::record::{Membership, ProfileRecord, Rest};
use crate::config::Mapping;

/// Which payload: of an update (`old` → `new`), or of a `delete` of `old`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Update,
    Delete,
}

/// A segment's entry in a payload.
enum Entry<'a> {
    Stored(&'a Membership),
    /// `{"status": "exited", "lastQualificationTime": time}`.
    Exited,
}

/// Writes the payload of `new` (for [`Kind::Delete`], of `old` with each mapped segment it
/// was a member of exited). A mapped segment that `old` was a member of and whose entry has
/// vanished from `new` is carried as exited at `time`.
pub fn write(
    old: &ProfileRecord,
    new: &ProfileRecord,
    kind: Kind,
    mapping: &Mapping,
    layout: &Layout,
    time: &str,
) -> String {
    let mut out = String::with_capacity(512);
    out.push('{');
    let mut first = true;
    let mut wrote_identities = false;
    let mut wrote_segments = false;
    // The attribute roots, `identityMap` and `segmentMembership`, in key order. A mapped
    // attribute named like either gives way to it when it has something to carry.
    let mut roots = layout.roots.iter().peekable();
    loop {
        let next_root = roots.peek().map(|n| n.key.as_str());
        if !wrote_identities && next_root.is_none_or(|k| k >= "identityMap") {
            wrote_identities = true;
            let wrote = member(&mut out, &mut first, |out| {
                write_identities(out, new, layout)
            });
            if wrote && next_root == Some("identityMap") {
                roots.next();
            }
            continue;
        }
        if !wrote_segments && next_root.is_none_or(|k| k >= "segmentMembership") {
            wrote_segments = true;
            let wrote = member(&mut out, &mut first, |out| {
                write_segments(out, old, new, kind, mapping, layout, time)
            });
            if wrote && next_root == Some("segmentMembership") {
                roots.next();
            }
            continue;
        }
        let Some(node) = roots.next() else { break };
        member(&mut out, &mut first, |out| {
            write_node(out, node, new, layout)
        });
    }
    out.push('}');
    out
}

/// Writes one member of an object (after a comma unless it is the first), or nothing when
/// `write` has nothing to write.
fn member(out: &mut String, first: &mut bool, write: impl FnOnce(&mut String) -> bool) -> bool {
    let mark = out.len();
    if !*first {
        out.push(',');
    }
    if write(out) {
        *first = false;
        true
    } else {
        out.truncate(mark);
        false
    }
}

/// Writes `"key":value` for an attribute node, if the profile has anything under it.
fn write_node(out: &mut String, node: &Node, record: &ProfileRecord, layout: &Layout) -> bool {
    if let Some(leaf) = node.leaf {
        let Some(text) = record.attribute(&layout.leaves[leaf]) else {
            return false;
        };
        out.push_str(&node.key_json);
        out.push(':');
        out.push_str(&text);
        return true;
    }
    let start = out.len();
    out.push_str(&node.key_json);
    out.push_str(":{");
    let mut first = true;
    for child in &node.children {
        member(out, &mut first, |out| {
            write_node(out, child, record, layout)
        });
    }
    if first {
        out.truncate(start);
        return false;
    }
    out.push('}');
    true
}

fn write_identities(out: &mut String, record: &ProfileRecord, layout: &Layout) -> bool {
    let start = out.len();
    out.push_str("\"identityMap\":{");
    let mut first = true;
    for namespace in &record.identities {
        if !layout.keeps_namespace(&namespace.namespace) {
            continue;
        }
        member(out, &mut first, |out| {
            push_json_string(out, &namespace.namespace);
            out.push_str(":[");
            for (i, item) in namespace.items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(item);
            }
            out.push(']');
            true
        });
    }
    if first {
        out.truncate(start);
        return false;
    }
    out.push('}');
    true
}

fn write_segments(
    out: &mut String,
    old: &ProfileRecord,
    new: &ProfileRecord,
    kind: Kind,
    mapping: &Mapping,
    layout: &Layout,
    time: &str,
) -> bool {
    let start = out.len();
    out.push_str("\"segmentMembership\":{\"ups\":{");
    let mut first = true;
    for segment in &layout.segments {
        let entry = match (kind, new.membership(segment)) {
            (Kind::Delete, Some(m)) if m.is_member() => Entry::Exited,
            (_, Some(m)) => Entry::Stored(m),
            (Kind::Update, None) if old.is_member(segment) => Entry::Exited,
            _ => continue,
        };
        member(out, &mut first, |out| {
            push_json_string(out, segment);
            out.push(':');
            write_entry(out, &entry, segment, mapping, time);
            true
        });
    }
    if first {
        out.truncate(start);
        return false;
    }
    out.push_str("}}");
    true
}

fn write_entry(out: &mut String, entry: &Entry, segment: &str, mapping: &Mapping, time: &str) {
    let (status, last_time) = match entry {
        Entry::Exited => ("exited", time),
        Entry::Stored(m) => match (&m.rest, &m.status, &m.last_qualification_time) {
            (Rest::Nothing, Some(status), Some(last_time)) => (status.as_str(), last_time.as_str()),
            (Rest::NotObject(text), _, _) => {
                out.push_str(text);
                return;
            }
            // Entries with other fields, or without a status or time, are rare: build them.
            _ => {
                let mut value = m.to_entry();
                describe_segment(&mut value, segment, mapping);
                out.push_str(&value.to_string());
                return;
            }
        },
    };
    // The entry's own two fields and what the mapping adds, in serde_json's (sorted) order.
    let mut fields: Vec<(&str, String)> = segment_extras(segment, mapping)
        .into_iter()
        .map(|(key, value)| (key, value.to_string()))
        .collect();
    fields.push(("lastQualificationTime", json_string(last_time)));
    fields.push(("status", json_string(status)));
    fields.sort_unstable_by_key(|(key, _)| *key);
    out.push('{');
    for (i, (key, text)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_string(out, key);
        out.push(':');
        out.push_str(text);
    }
    out.push('}');
}
