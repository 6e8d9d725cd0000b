//! Property tests (proptest): random sequences of upserts, merges, deletes, stale and
//! timestamp-less updates over a few profiles, applied by the real store (sled in a temporary
//! folder), checked against a small reference model of SPEC's export rules written here
//! independently (its own RFC 7386 merge, its own membership, identity and attribute rules);
//! arbitrary bytes into the update parser; merge-patch laws.
//!
//! Case counts are fixed below (`cases`); `cargo test --test properties` runs them all in a few
//! seconds on a debug build.

use std::collections::{BTreeSet, HashMap};

use chrono::Utc;
use outpost::config::Mapping;
use outpost::profile::update::parse_body;
use outpost::store::{ListFilter, Store};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const SEGMENT: &str = "S1";
const UNMAPPED_SEGMENT: &str = "S2";

fn mapping() -> Mapping {
    Mapping::new(&["person.firstName"], &[SEGMENT], &["ecid"])
}

// ---- The reference model ----

/// RFC 7386, section 2.
fn merge_patch(target: &Value, patch: &Value) -> Value {
    let Value::Object(patch) = patch else {
        return patch.clone();
    };
    let mut result = match target {
        Value::Object(t) => t.clone(),
        _ => Map::new(),
    };
    for (key, value) in patch {
        if value.is_null() {
            result.remove(key);
        } else {
            let merged = merge_patch(result.get(key).unwrap_or(&Value::Null), value);
            result.insert(key.clone(), merged);
        }
    }
    Value::Object(result)
}

fn member(profile: &Value) -> bool {
    matches!(
        profile["segmentMembership"]["ups"][SEGMENT]["status"].as_str(),
        Some("realized" | "existing")
    )
}

fn identities(profile: &Value) -> BTreeSet<String> {
    profile["identityMap"]["ecid"]
        .as_array()
        .map(|a| a.iter().map(Value::to_string).collect())
        .unwrap_or_default()
}

/// What the store keeps of a profile under `mapping()`: the mapped attribute, every segment
/// entry, and the mapped namespace when it holds identities.
fn kept(profile: &Value) -> Value {
    let mut kept = json!({});
    if let Some(first) = attribute(profile) {
        kept["person"] = json!({ "firstName": first });
    }
    if let Some(ups) = profile["segmentMembership"]["ups"].as_object() {
        if !ups.is_empty() {
            kept["segmentMembership"] = json!({ "ups": ups });
        }
    }
    if let Some(ecid) = profile["identityMap"]["ecid"].as_array() {
        if !ecid.is_empty() {
            kept["identityMap"] = json!({ "ecid": ecid });
        }
    }
    kept
}

fn attribute(profile: &Value) -> Option<&Value> {
    profile.get("person")?.get("firstName")
}

fn reason(old: &Value, new: &Value) -> Option<&'static str> {
    if member(old) != member(new) {
        Some("segment")
    } else if member(new) && identities(old) != identities(new) {
        Some("identity")
    } else if member(new) && attribute(old) != attribute(new) {
        Some("attribute")
    } else {
        None
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    exports: u64,
    unchanged: u64,
    stale: u64,
    deleted: u64,
}

#[derive(Default)]
struct Model {
    /// id → (timestamp in minutes, profile)
    profiles: HashMap<String, (Option<u32>, Value)>,
    exports: Vec<(String, &'static str)>,
    counts: Counts,
}

impl Model {
    fn apply(&mut self, op: &Op) {
        let stored = self.profiles.get(&op.id);
        if let (Some(theirs), Some((Some(ours), _))) = (op.minute, stored) {
            if theirs < *ours {
                self.counts.stale += 1;
                return;
            }
        }
        let empty = json!({});
        let (old_time, old) = match stored {
            Some((t, p)) => (*t, p.clone()),
            None => (None, empty.clone()),
        };
        match &op.kind {
            Kind::Delete => {
                if stored.is_none() {
                    self.counts.unchanged += 1;
                    return;
                }
                self.counts.deleted += 1;
                if member(&old) {
                    self.exports.push((op.id.clone(), "delete"));
                    self.counts.exports += 1;
                }
                self.profiles.remove(&op.id);
            }
            Kind::Upsert(profile) | Kind::Merge(profile) => {
                let new = match &op.kind {
                    Kind::Upsert(_) => profile.clone(),
                    _ => merge_patch(&old, profile),
                };
                match reason(&old, &new) {
                    Some(r) => {
                        self.exports.push((op.id.clone(), r));
                        self.counts.exports += 1;
                    }
                    None => self.counts.unchanged += 1,
                }
                self.profiles
                    .insert(op.id.clone(), (op.minute.or(old_time), new));
            }
        }
    }
}

// ---- Generated updates ----

#[derive(Debug, Clone)]
enum Kind {
    Upsert(Value),
    Merge(Value),
    Delete,
}

#[derive(Debug, Clone)]
struct Op {
    id: String,
    minute: Option<u32>,
    kind: Kind,
}

impl Op {
    fn line(&self) -> String {
        let mut line = json!({ "id": self.id });
        if let Some(m) = self.minute {
            line["timestamp"] = json!(format!("2026-01-01T00:{m:02}:00Z"));
        }
        match &self.kind {
            Kind::Upsert(p) => line["profile"] = p.clone(),
            Kind::Merge(p) => {
                line["op"] = json!("merge");
                line["profile"] = p.clone();
            }
            Kind::Delete => line["op"] = json!("delete"),
        }
        line.to_string()
    }
}

fn status() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["realized", "existing", "exited", "queued"])
}

fn ids() -> impl Strategy<Value = Vec<Value>> {
    prop::sample::subsequence(vec!["e1", "e2", "e3"], 0..=3)
        .prop_shuffle()
        .prop_map(|ids| ids.into_iter().map(|id| json!({ "id": id })).collect())
}

/// A whole profile: mapped and unmapped attributes, segments and namespaces, each maybe absent.
fn profile() -> impl Strategy<Value = Value> {
    (
        prop::option::of(prop::sample::select(vec!["Ann", "Bob"])),
        prop::option::of(prop::sample::select(vec!["x", "y"])),
        prop::option::of(status()),
        prop::option::of(status()),
        prop::option::of(ids()),
        prop::option::of(ids()),
    )
        .prop_map(|(first, nick, s1, s2, ecid, email)| {
            let mut p = json!({});
            let mut person = Map::new();
            if let Some(f) = first {
                person.insert("firstName".into(), json!(f));
            }
            if let Some(n) = nick {
                person.insert("nickname".into(), json!(n));
            }
            if !person.is_empty() {
                p["person"] = Value::Object(person);
            }
            let mut ups = Map::new();
            if let Some(s) = s1 {
                ups.insert(SEGMENT.into(), json!({ "status": s }));
            }
            if let Some(s) = s2 {
                ups.insert(UNMAPPED_SEGMENT.into(), json!({ "status": s }));
            }
            if !ups.is_empty() {
                p["segmentMembership"] = json!({ "ups": ups });
            }
            let mut map = Map::new();
            if let Some(e) = ecid {
                map.insert("ecid".into(), Value::Array(e));
            }
            if let Some(e) = email {
                map.insert("email".into(), Value::Array(e));
            }
            if !map.is_empty() {
                p["identityMap"] = Value::Object(map);
            }
            p
        })
}

/// A merge patch: each part absent, removed (null) or set.
fn patch() -> impl Strategy<Value = Value> {
    fn part<T: Strategy>(s: T) -> impl Strategy<Value = Option<Option<T::Value>>>
    where
        T::Value: Clone,
    {
        prop::option::of(prop::option::of(s))
    }
    (
        part(prop::sample::select(vec!["Ann", "Bob", "Cy"])),
        part(status()),
        part(status()),
        part(ids()),
        any::<bool>(),
    )
        .prop_map(|(first, s1, s2, ecid, drop_person)| {
            let set = |v: Option<Value>| v.unwrap_or(Value::Null);
            let mut p = Map::new();
            if drop_person {
                p.insert("person".into(), Value::Null);
            } else if let Some(f) = first {
                p.insert(
                    "person".into(),
                    json!({ "firstName": set(f.map(|f| json!(f))) }),
                );
            }
            let mut ups = Map::new();
            if let Some(s) = s1 {
                ups.insert(SEGMENT.into(), set(s.map(|s| json!({ "status": s }))));
            }
            if let Some(s) = s2 {
                ups.insert(
                    UNMAPPED_SEGMENT.into(),
                    set(s.map(|s| json!({ "status": s }))),
                );
            }
            if !ups.is_empty() {
                p.insert("segmentMembership".into(), json!({ "ups": ups }));
            }
            if let Some(e) = ecid {
                p.insert(
                    "identityMap".into(),
                    json!({ "ecid": set(e.map(Value::Array)) }),
                );
            }
            Value::Object(p)
        })
}

fn op() -> impl Strategy<Value = Op> {
    let kind = prop_oneof![
        4 => profile().prop_map(Kind::Upsert),
        4 => patch().prop_map(Kind::Merge),
        1 => Just(Kind::Delete),
    ];
    (
        prop::sample::select(vec!["a", "b", "c"]),
        prop::option::of(0u32..6),
        kind,
    )
        .prop_map(|(id, minute, kind)| Op {
            id: id.to_owned(),
            minute,
            kind,
        })
}

/// The line a refusal names as its update's first, when it names one.
fn update_start_named(reason: &str) -> Option<u64> {
    let (_, rest) = reason.rsplit_once("(in the update that starts on line ")?;
    rest.strip_suffix(')')?.parse().ok()
}

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1 << 20).unwrap();
    (dir, store)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// The store's exports (profile, reason, in order), counts, stored versions and number of
    /// profiles are the model's, whether the updates come one a commit or several in one.
    #[test]
    fn the_store_follows_the_reference_model(
        ops in prop::collection::vec(op(), 1..24),
        group_size in 1usize..5,
    ) {
        let mut model = Model::default();
        for op in &ops {
            model.apply(op);
        }
        let (_dir, store) = open();
        let body = ops.iter().map(Op::line).collect::<Vec<_>>().join("\n");
        let updates = parse_body(body.as_bytes()).unwrap();
        let mut counts = Counts::default();
        for chunk in updates.chunks(group_size * 2) {
            let groups: Vec<&[outpost::profile::Update]> = chunk.chunks(group_size).collect();
            for summary in store.apply_groups(&groups, &mapping(), Utc::now()).unwrap() {
                counts.exports += summary.exports;
                counts.unchanged += summary.unchanged;
                counts.stale += summary.stale;
                counts.deleted += summary.deleted;
            }
        }
        prop_assert_eq!(&counts, &model.counts);
        let exports: Vec<(String, &'static str)> = store
            .list(&ListFilter::default())
            .unwrap()
            .iter()
            .map(|e| (e.record.profile_id.clone(), e.record.reason().as_str()))
            .collect();
        prop_assert_eq!(&exports, &model.exports);
        prop_assert_eq!(store.profile_count().unwrap(), model.profiles.len() as u64);
        prop_assert_eq!(store.verify().unwrap(), Vec::<String>::new());
        for id in ["a", "b", "c"] {
            let stored = store.profile(id).unwrap();
            let expected = model.profiles.get(id);
            prop_assert_eq!(stored.is_some(), expected.is_some(), "profile {}", id);
            if let (Some(stored), Some((minute, profile))) = (stored, expected) {
                prop_assert_eq!(&stored.profile, &kept(profile), "profile {}", id);
                let time = minute.map(|m| format!("2026-01-01T00:{m:02}:00+00:00"));
                prop_assert_eq!(stored.timestamp.map(|t| t.to_rfc3339()), time, "profile {}", id);
            }
        }
    }

    /// Arbitrary bytes never panic the parser, and every refusal names a line of the input.
    #[test]
    fn the_parser_never_panics_and_names_the_line(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Err(e) = parse_body(&bytes) {
            let lines = bytes.split(|b| *b == b'\n').count() as u64;
            prop_assert!(e.line >= 1 && e.line <= lines.max(1), "line {} of {}", e.line, lines);
            prop_assert!(!e.reason.is_empty());
        }
    }

    /// Near-JSON input (updates with a byte changed) too.
    #[test]
    fn damaged_updates_are_refused_with_their_line(
        ops in prop::collection::vec(op(), 1..5),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut body = ops.iter().map(Op::line).collect::<Vec<_>>().join("\n").into_bytes();
        let i = at.index(body.len());
        body[i] = byte;
        if let Err(e) = parse_body(&body) {
            let line = body[..i].iter().filter(|b| **b == b'\n').count() as u64 + 1;
            prop_assert!(e.line >= 1 && e.line <= ops.len() as u64 + 1, "{:?}", e);
            // The damage is on its line or makes an earlier line's end unreadable, or it leaves
            // its update unfinished where the next begins, and the update's first line is named.
            let named = update_start_named(&e.reason);
            prop_assert!(named.unwrap_or(e.line) <= line + 1, "refused line {} for damage on line {}: {}", e.line, line, e);
            if named.is_some() {
                // Found no earlier than the damage.
                prop_assert!(e.line >= line, "refused line {} for damage on line {}: {}", e.line, line, e);
            }
        }
    }

    /// A merge applied twice is the merge applied once, and the second one exports nothing.
    #[test]
    fn merging_twice_is_merging_once(start in profile(), p in patch()) {
        let (_dir, store) = open();
        let upsert = Op { id: "a".into(), minute: None, kind: Kind::Upsert(start.clone()) };
        let merge = Op { id: "a".into(), minute: None, kind: Kind::Merge(p.clone()) };
        let body = [upsert.line(), merge.line()].join("\n");
        store.apply_groups(&[&parse_body(body.as_bytes()).unwrap()], &mapping(), Utc::now()).unwrap();
        let once = store.profile("a").unwrap().unwrap().profile;
        prop_assert_eq!(&once, &kept(&merge_patch(&start, &p)));
        let again = parse_body(merge.line().as_bytes()).unwrap();
        let summary = store.apply_groups(&[&again], &mapping(), Utc::now()).unwrap()[0];
        prop_assert_eq!(summary.exports, 0);
        prop_assert_eq!(store.profile("a").unwrap().unwrap().profile, once);
    }
}

/// RFC 7386 appendix A, each example under a mapped key of a stored profile (a profile is an
/// object), through the store's `merge`.
#[test]
fn rfc_7386_examples() {
    let mapping = Mapping::new(&["doc"], &[SEGMENT], &["ecid"]);
    let examples = [
        (r#"{"a":"b"}"#, r#"{"a":"c"}"#, r#"{"a":"c"}"#),
        (r#"{"a":"b"}"#, r#"{"b":"c"}"#, r#"{"a":"b","b":"c"}"#),
        (r#"{"a":"b"}"#, r#"{"a":null}"#, r#"{}"#),
        (r#"{"a":"b","b":"c"}"#, r#"{"a":null}"#, r#"{"b":"c"}"#),
        (r#"{"a":["b"]}"#, r#"{"a":"c"}"#, r#"{"a":"c"}"#),
        (r#"{"a":"c"}"#, r#"{"a":["b"]}"#, r#"{"a":["b"]}"#),
        (
            r#"{"a":{"b":"c"}}"#,
            r#"{"a":{"b":"d","c":null}}"#,
            r#"{"a":{"b":"d"}}"#,
        ),
        (r#"{"a":[{"b":"c"}]}"#, r#"{"a":[1]}"#, r#"{"a":[1]}"#),
        (r#"["a","b"]"#, r#"["c","d"]"#, r#"["c","d"]"#),
        (r#"{"a":"b"}"#, r#"["c"]"#, r#"["c"]"#),
        (r#"{"a":"foo"}"#, r#"null"#, r#"null"#),
        (r#"{"a":"foo"}"#, r#""bar""#, r#""bar""#),
        (r#"{"e":null}"#, r#"{"a":1}"#, r#"{"e":null,"a":1}"#),
        (r#"[1,2]"#, r#"{"a":"b","c":null}"#, r#"{"a":"b"}"#),
        (
            r#"{}"#,
            r#"{"a":{"bb":{"ccc":null}}}"#,
            r#"{"a":{"bb":{}}}"#,
        ),
    ];
    for (original, patch, result) in examples {
        let (original, patch, result): (Value, Value, Value) = (
            serde_json::from_str(original).unwrap(),
            serde_json::from_str(patch).unwrap(),
            serde_json::from_str(result).unwrap(),
        );
        assert_eq!(merge_patch(&original, &patch), result, "the model");
        let (_dir, store) = open();
        let body = [
            json!({"id": "p", "profile": {"doc": original}}).to_string(),
            json!({"id": "p", "op": "merge", "profile": {"doc": patch}}).to_string(),
        ]
        .join("\n");
        let updates = parse_body(body.as_bytes()).unwrap();
        store
            .apply_groups(&[&updates], &mapping, Utc::now())
            .unwrap();
        let stored = store.profile("p").unwrap().unwrap().profile;
        let expected = if result.is_null() {
            json!({})
        } else {
            json!({ "doc": result })
        };
        assert_eq!(stored, expected, "{original} + {patch}");
    }
}
