//! The record engine (`profile::engine`, what the store runs) against the rules on JSON values
//! (`profile::apply`, the readable statement of SPEC's rules): random sequences of upserts,
//! merges and deletes over awkward profiles (nested and overlapping attribute paths, values
//! that are not objects where the paths go deeper, odd segment entries and identity values,
//! `null`s everywhere in patches) give the same results, the same exports with the same
//! payloads, and the same stored state.

use chrono::{DateTime, TimeZone, Utc};
use outpost::config::{MappedAt, Mapping, SegmentDetails};
use outpost::profile::apply::{apply, StoreAction, StoredProfile, UpdateResult};
use outpost::profile::engine::{self, apply_record, RecordAction};
use outpost::profile::layout::Layout;
use outpost::profile::prune::KeepTree;
use outpost::profile::record::ProfileRecord;
use outpost::profile::{Op, Update};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

fn mapping(all_namespaces: bool) -> Mapping {
    let mut mapping = Mapping::new(
        &["a.b", "a.c.a", "b", "c", "c.a", "d.a.b"],
        &["s1", "s2"],
        if all_namespaces {
            &[]
        } else {
            &["ecid", "email"]
        },
    );
    mapping.include_segment_names = true;
    mapping.include_segment_timestamps = true;
    mapping.segment_details.insert(
        "s1".into(),
        SegmentDetails {
            name: Some("Gold \"VIP\"".into()),
            created_at_ms: Some(1),
            updated_at_ms: None,
        },
    );
    mapping.mapped_at.insert(
        "s2".into(),
        MappedAt {
            created_ms: 5,
            updated_ms: 6,
        },
    );
    mapping
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(1)),
        Just(json!(1.0)),
        Just(json!("x")),
        Just(json!("y\u{e9}\"")),
        Just(json!(true)),
        Just(json!([1, {"b": 2}])),
        Just(json!([])),
    ]
}

/// Values under attribute keys: objects over the keys `a`, `b`, `c`, `d`, scalars and, in
/// patches, `null`s.
fn value(depth: u32, nulls: bool) -> BoxedStrategy<Value> {
    let leaf = if nulls {
        prop_oneof![4 => scalar(), 1 => Just(Value::Null)].boxed()
    } else {
        scalar().boxed()
    };
    if depth == 0 {
        return leaf;
    }
    prop_oneof![
        2 => leaf,
        3 => object(depth - 1, nulls),
    ]
    .boxed()
}

fn object(depth: u32, nulls: bool) -> BoxedStrategy<Value> {
    prop::collection::btree_map(
        prop::sample::select(vec!["a", "b", "c", "d"]),
        value(depth, nulls),
        0..4,
    )
    .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
    .boxed()
}

fn segment_entry(nulls: bool) -> BoxedStrategy<Value> {
    let status = prop::option::of(prop::sample::select(vec![
        json!("realized"),
        json!("existing"),
        json!("exited"),
        json!("queued"),
        json!(7),
    ]));
    let time = prop::option::of(prop::sample::select(vec![
        json!("2026-01-01T00:00:00Z"),
        json!(3),
    ]));
    let extra = prop::option::of(prop::sample::select(vec![
        json!({"version": "15"}),
        json!({"name": "theirs"}),
        json!({"status": null}),
    ]));
    let entry = (status, time, extra).prop_map(|(status, time, extra)| {
        let mut entry = Map::new();
        if let Some(Value::Object(extra)) = extra {
            entry.extend(extra);
        }
        if let Some(status) = status {
            entry.insert("status".into(), status);
        }
        if let Some(time) = time {
            entry.insert("lastQualificationTime".into(), time);
        }
        Value::Object(entry)
    });
    let odd = if nulls {
        prop_oneof![Just(json!("realized")), Just(Value::Null)].boxed()
    } else {
        Just(json!("realized")).boxed()
    };
    prop_oneof![5 => entry, 1 => odd].boxed()
}

fn identity_value(nulls: bool) -> BoxedStrategy<Value> {
    let items = prop::collection::vec(
        prop::sample::select(vec![
            json!({"id": "1"}),
            json!({"id": "2", "primary": true}),
            json!({"primary": true, "id": "2"}),
            json!("3"),
        ]),
        0..3,
    )
    .prop_map(Value::Array);
    let mut odd = vec![json!({"id": "9"})];
    if nulls {
        odd.push(Value::Null);
    }
    prop_oneof![4 => items, 1 => prop::sample::select(odd)].boxed()
}

fn keyed(
    keys: Vec<&'static str>,
    values: BoxedStrategy<Value>,
    non_object: bool,
) -> BoxedStrategy<Value> {
    let map = prop::collection::btree_map(prop::sample::select(keys), values, 0..4)
        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()));
    if non_object {
        prop_oneof![6 => map, 1 => Just(Value::Null), 1 => Just(json!(5))].boxed()
    } else {
        map.boxed()
    }
}

/// A profile (`nulls` false) or a merge patch (`nulls` true).
fn profile(nulls: bool) -> BoxedStrategy<Map<String, Value>> {
    let ups = keyed(vec!["s1", "s2", "s3"], segment_entry(nulls), nulls);
    let membership = prop_oneof![
        4 => ups.prop_map(|ups| json!({ "ups": ups })),
        1 => Just(json!({"other": 1})),
    ];
    let identity_map = keyed(vec!["ecid", "email", "crm"], identity_value(nulls), nulls);
    (
        object(3, nulls),
        prop::option::of(membership),
        prop::option::of(identity_map),
    )
        .prop_map(|(attributes, membership, identity_map)| {
            let Value::Object(mut profile) = attributes else {
                unreachable!("object() makes objects")
            };
            if let Some(membership) = membership {
                profile.insert("segmentMembership".into(), membership);
            }
            if let Some(identity_map) = identity_map {
                profile.insert("identityMap".into(), identity_map);
            }
            profile
        })
        .boxed()
}

fn update() -> impl Strategy<Value = Update> {
    let op = prop::sample::select(vec![Op::Upsert, Op::Merge, Op::Merge, Op::Delete]);
    (op, prop::option::of(0u32..5), any::<bool>()).prop_flat_map(|(op, minute, _)| {
        profile(op == Op::Merge).prop_map(move |profile| Update {
            id: "p".into(),
            op,
            profile: if op == Op::Delete {
                Map::new()
            } else {
                profile
            },
            timestamp: minute.map(|m| at(m * 60)),
            record: None,
            patch_text: None,
        })
    })
}

fn at(seconds: u32) -> DateTime<Utc> {
    Utc.timestamp_opt(1_767_225_600 + i64::from(seconds), 0)
        .unwrap()
}

fn record_of(stored: &StoredProfile, layout: &Layout) -> ProfileRecord {
    ProfileRecord::from_profile(
        stored.timestamp.map(|t| t.timestamp_micros()),
        stored.profile.as_object().expect("profiles are objects"),
        layout,
    )
}

fn parsed(payload: &str) -> Value {
    serde_json::from_str(payload).unwrap_or_else(|e| panic!("payload {payload}: {e}"))
}

/// Does what each said to its stored version; returns whether the record was written.
fn store_both(
    values: &mut Option<StoredProfile>,
    record: &mut Option<ProfileRecord>,
    by_values: StoreAction,
    by_record: RecordAction,
) -> bool {
    match by_values {
        StoreAction::Keep => {}
        StoreAction::Put(new) => *values = Some(new),
        StoreAction::Remove => *values = None,
    }
    match by_record {
        RecordAction::Keep => false,
        RecordAction::Put(new) => {
            *record = Some(new.into_owned());
            true
        }
        RecordAction::Remove => {
            *record = None;
            true
        }
    }
}

/// Runs `updates` through both, starting from `start` (a JSON profile for the values, its
/// record for the engine), and returns the first disagreement.
fn disagreement(
    start: Option<(StoredProfile, ProfileRecord)>,
    updates: &[Update],
    mapping: &Mapping,
) -> Option<String> {
    let layout = Layout::new(mapping);
    let keep = KeepTree::for_mapping(mapping);
    // A record upgraded from JSON holds values at the old mapping's paths until rewritten.
    let mut rewritten = start.is_none();
    let (mut values, mut record) = match start {
        Some((values, record)) => (Some(values), Some(record)),
        None => (None, None),
    };
    let received = at(10_000);
    for (step, update) in updates.iter().enumerate() {
        let mut pruned = update.clone();
        keep.prune(&mut pruned.profile);
        let by_values = apply(values.as_ref(), &pruned, mapping, received);
        let by_record = apply_record(record.as_ref(), &pruned, mapping, &layout, received);
        let context = format!("step {step}: {update:?}\nstored {values:?}\nrecord {record:?}");
        // An update whose record was built ahead (as the committer's callers do) is applied
        // exactly as one built when applied.
        let mut prepared = pruned.clone();
        engine::prepare(&mut prepared, &layout);
        if prepared.op == Op::Upsert && prepared.record.is_none() {
            return Some(format!("{context}\nan upsert was not prepared"));
        }
        // `Committer::commit` makes records of whole profiles too (callers that did not parse
        // them pruned): the record is the same.
        let mut whole = update.clone();
        engine::prepare(&mut whole, &layout);
        if whole.record != prepared.record {
            return Some(format!(
                "{context}\nrecord of the whole profile {:?}\nvs of the pruned one {:?}",
                whole.record, prepared.record
            ));
        }
        let by_prepared = apply_record(record.as_ref(), &prepared, mapping, &layout, received);
        if by_prepared != by_record {
            return Some(format!(
                "{context}\nprepared {by_prepared:?}\nvs {by_record:?}"
            ));
        }
        if by_values.result != by_record.result {
            return Some(format!(
                "{}\nresult {:?} vs {:?}",
                context, by_values.result, by_record.result
            ));
        }
        let exports = (
            by_values.export.as_ref().map(|(r, p)| (*r, p.clone())),
            by_record.export.as_ref().map(|(r, p)| (*r, parsed(p))),
        );
        if exports.0 != exports.1 {
            return Some(format!(
                "{}\nexport {:?}\nvs     {:?}",
                context, exports.0, exports.1
            ));
        }
        if let Some((_, text)) = &by_record.export {
            // Byte for byte what serde_json prints for the same document.
            let printed = exports.0.as_ref().map(|(_, p)| p.to_string());
            if printed.as_deref() != Some(text.as_str()) {
                return Some(format!("{}\npayload text {text}\nvs {printed:?}", context));
            }
        }
        rewritten |= store_both(&mut values, &mut record, by_values.store, by_record.store);
        let expected = values.as_ref().map(|v| record_of(v, &layout));
        if rewritten && expected != record {
            return Some(format!(
                "{context}\nstored record {record:?}\nexpected {expected:?}"
            ));
        }
    }
    None
}

/// Mappings whose attribute paths are, pairwise, the same or unrelated (neither under the
/// other): across such changes the engine keeps what the stored JSON profile kept.
fn changing_mappings() -> [Mapping; 3] {
    [
        Mapping::new(&["a.b", "c"], &["s1"], &["ecid"]),
        Mapping::new(&["a.b", "d"], &["s1", "s2"], &[]),
        Mapping::new(&["b"], &["s2"], &["email"]),
    ]
}

/// The results and exports of both, with the mapping of each step chosen by `runs`; the first
/// difference.
fn disagreement_across_mappings(updates: &[Update], runs: &[usize]) -> Option<String> {
    let mappings = changing_mappings();
    let (mut values, mut record): (Option<StoredProfile>, Option<ProfileRecord>) = (None, None);
    for (step, (update, run)) in updates.iter().zip(runs).enumerate() {
        let mapping = &mappings[*run];
        let mut pruned = update.clone();
        KeepTree::for_mapping(mapping).prune(&mut pruned.profile);
        let by_values = apply(values.as_ref(), &pruned, mapping, at(10_000));
        let by_record = apply_record(
            record.as_ref(),
            &pruned,
            mapping,
            &Layout::new(mapping),
            at(10_000),
        );
        let exports = (
            by_values.export.as_ref().map(|(r, p)| (*r, p.clone())),
            by_record.export.as_ref().map(|(r, p)| (*r, parsed(p))),
        );
        if by_values.result != by_record.result || exports.0 != exports.1 {
            return Some(format!(
                "step {step} (mapping {run}): {update:?}\nstored {values:?}\nrecord {record:?}\n\
                 {:?} {:?}\nvs {:?} {:?}",
                by_values.result, exports.0, by_record.result, exports.1
            ));
        }
        let applied = by_values.result != UpdateResult::Stale;
        store_both(&mut values, &mut record, by_values.store, by_record.store);
        // The store keeps what this mapping reaches (and every segment): what an applied
        // merge leaves at other paths goes, as the engine leaves it.
        if let (true, Some(stored)) = (applied, values.as_mut()) {
            KeepTree::for_mapping(mapping).prune(stored.profile.as_object_mut().unwrap());
        }
    }
    None
}

/// `update` pruned to `mapping` (as parsing prunes it), applied by the engine to `record`,
/// which then holds what the engine stored: the result and the export's payload.
fn apply_step(
    record: &mut Option<ProfileRecord>,
    update: &Update,
    mapping: &Mapping,
    received: DateTime<Utc>,
) -> (UpdateResult, Option<String>) {
    let mut pruned = update.clone();
    KeepTree::for_mapping(mapping).prune(&mut pruned.profile);
    let applied = apply_record(
        record.as_ref(),
        &pruned,
        mapping,
        &Layout::new(mapping),
        received,
    );
    let stored = match applied.store {
        RecordAction::Keep => None,
        RecordAction::Put(new) => Some(Some(new.into_owned())),
        RecordAction::Remove => Some(None),
    };
    let outcome = (applied.result, applied.export.map(|(_, payload)| payload));
    if let Some(stored) = stored {
        *record = stored;
    }
    outcome
}

/// What the store can know of the value at one mapped path, as the updates went by.
#[derive(Debug, Clone, PartialEq)]
enum Known {
    /// Nothing: no mapping reached the path when an update last changed the profile, so its
    /// value may be anything (a merge patch pruned to another mapping cannot say).
    Nothing,
    /// The value there (`None`: absent), or what the patches since it was unknown made of it
    /// (a merge into an unknown object gives what the patch holds).
    Value(Option<Value>),
}

/// The value at a dot path of a JSON value, if there is one.
fn at_path<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(value, |node, key| node.as_object()?.get(key))
}

/// What a merge patch leaves at `path` from `known` (RFC 7386, per path).
fn merged_at(known: &Known, patch: &Map<String, Value>, path: &str) -> Known {
    let keys: Vec<&str> = path.split('.').collect();
    let (last, parents) = keys.split_last().unwrap();
    let mut node = patch;
    for key in parents {
        match node.get(*key) {
            None => return known.clone(),
            Some(Value::Object(inner)) => node = inner,
            Some(_) => return Known::Value(None),
        }
    }
    let before = match known {
        Known::Value(v) => v.clone(),
        Known::Nothing => None,
    };
    match node.get(*last) {
        None => known.clone(),
        Some(Value::Null) => Known::Value(None),
        Some(value) => {
            let mut merged = before.unwrap_or(Value::Null);
            json_patch::merge(&mut merged, value);
            Known::Value(Some(merged))
        }
    }
}

/// The engine alone, with the mapping of each step chosen by `runs`, against what the store can
/// know of each attribute path: the first export that sends, at a mapped path, a value the
/// store cannot know is still there (a stale one), or leaves out one it knows.
fn stale_value_across_mappings(updates: &[Update], runs: &[usize]) -> Option<String> {
    let mappings = changing_mappings();
    let paths: Vec<String> = {
        let mut all: Vec<String> = mappings
            .iter()
            .flat_map(|m| m.attributes.iter().map(|p| p.join(".")))
            .collect();
        all.sort();
        all.dedup();
        all
    };
    let mut known: Vec<Known> = vec![Known::Value(None); paths.len()];
    let mut record: Option<ProfileRecord> = None;
    for (step, (update, run)) in updates.iter().zip(runs).enumerate() {
        let mapping = &mappings[*run];
        let (result, export) = apply_step(&mut record, update, mapping, at(10_000));
        if result == UpdateResult::Stale {
            continue;
        }
        let before = known.clone();
        for (path, known) in paths.iter().zip(known.iter_mut()) {
            let mapped = mapping.attributes.iter().any(|p| p.join(".") == *path);
            *known = match (update.op, mapped) {
                (Op::Delete, _) => Known::Value(None),
                (_, false) => Known::Nothing,
                (Op::Upsert, true) => {
                    Known::Value(at_path(&Value::Object(update.profile.clone()), path).cloned())
                }
                (Op::Merge, true) => merged_at(known, &update.profile, path),
            };
        }
        if let Some(payload) = &export {
            let payload = parsed(payload);
            // A delete's export is the last payload: the profile as it was.
            let known = if update.op == Op::Delete {
                &before
            } else {
                &known
            };
            for (path, known) in paths.iter().zip(known) {
                if !mapping.attributes.iter().any(|p| p.join(".") == *path) {
                    continue;
                }
                let sent = at_path(&payload, path);
                let fine = match known {
                    Known::Nothing => sent.is_none(),
                    Known::Value(value) => sent == value.as_ref(),
                };
                if !fine {
                    return Some(format!(
                        "step {step} (mapping {run}): {update:?}\nsent {path} = {sent:?}, \
                         the store can know {known:?}\npayload {payload}"
                    ));
                }
            }
        }
    }
    None
}

/// An update of profile `p` without a timestamp.
fn update_of_p(op: Op, profile: Value) -> Update {
    Update {
        id: "p".into(),
        op,
        profile: profile.as_object().unwrap().clone(),
        timestamp: None,
        record: None,
        patch_text: None,
    }
}

/// The case that showed it: an address mapped, changed while no mapping reached it, then
/// mapped again.
#[test]
fn a_value_changed_while_unmapped_is_not_exported_stale() {
    let both = Mapping::new(&["name", "email.address"], &["s"], &[]);
    let name_only = Mapping::new(&["name"], &["s"], &[]);
    let member = json!({"status": "realized"});
    let updates = [
        update_of_p(
            Op::Upsert,
            json!({"name": "Jane", "email": {"address": "a@x"},
                   "segmentMembership": {"ups": {"s": member}}}),
        ),
        update_of_p(Op::Merge, json!({"email": {"address": "b@x"}})),
        update_of_p(Op::Merge, json!({"name": "Janet"})),
    ];
    let mut record: Option<ProfileRecord> = None;
    let mut last_payload = None;
    for (update, mapping) in updates.iter().zip([&both, &name_only, &both]) {
        let (_, export) = apply_step(&mut record, update, mapping, at(0));
        last_payload = export.map(|p| parsed(&p));
    }
    let payload = last_payload.expect("the name change is exported");
    assert_eq!(payload["name"], "Janet");
    assert_eq!(at_path(&payload, "email.address"), None, "{payload}");
}

/// A merge whose patch is large as a tree is kept as its text once parsed, and applies as
/// the tree does: the same record and the same export; a small one stays a tree.
#[test]
fn a_heavy_merge_kept_as_text_applies_as_its_tree() {
    let mapping = mapping(false);
    let layout = Layout::new(&mapping);
    let tiny_objects: Vec<Value> = (0..2_000).map(|n| json!({ "n": n })).collect();
    let stored = update_of_p(
        Op::Upsert,
        json!({"a": {"b": 1}, "segmentMembership": {"ups": {"s1": {"status": "realized", "x": 1}}},
               "identityMap": {"ecid": [{"id": "1"}]}}),
    );
    let heavy = update_of_p(
        Op::Merge,
        json!({"a": {"b": tiny_objects, "c": null},
               "segmentMembership": {"ups": {"s1": {"x": tiny_objects, "y": 1.5}, "s2": {"status": "realized"}}},
               "identityMap": {"email": [{"id": "e"}]}}),
    );
    let light = update_of_p(Op::Merge, json!({"b": 2}));
    let mut prepared_light = light.clone();
    engine::prepare(&mut prepared_light, &layout);
    assert_eq!(prepared_light, light, "a small patch stays a tree");

    let mut record = None;
    apply_step(&mut record, &stored, &mapping, at(0));
    let mut as_tree = record.clone();
    let from_tree = apply_step(&mut as_tree, &heavy, &mapping, at(1));
    let mut prepared = heavy.clone();
    engine::prepare(&mut prepared, &layout);
    assert!(prepared.profile.is_empty() && prepared.patch_text.is_some());
    let mut as_text = record.clone();
    let from_text = apply_step(&mut as_text, &prepared, &mapping, at(1));
    assert_eq!(from_text, from_tree);
    assert_eq!(as_text, as_tree);
    assert!(from_tree.1.is_some(), "s2 qualified: exported");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// No export carries a stale value, whatever the mappings of the updates before it.
    #[test]
    fn no_export_carries_a_value_the_profile_no_longer_holds(
        updates in prop::collection::vec(update(), 2..8),
        runs in prop::collection::vec(0usize..3, 8),
    ) {
        let found = stale_value_across_mappings(&updates, &runs);
        prop_assert!(found.is_none(), "{}", found.unwrap_or_default());
    }

    /// Attributes, segments and namespaces mapped, dropped and mapped again between updates.
    #[test]
    fn the_engine_decides_as_the_rules_on_values_across_mapping_changes(
        updates in prop::collection::vec(update(), 2..8),
        runs in prop::collection::vec(0usize..3, 8),
    ) {
        let found = disagreement_across_mappings(&updates, &runs);
        prop_assert!(found.is_none(), "{}", found.unwrap_or_default());
    }

    #[test]
    fn the_engine_decides_and_stores_as_the_rules_on_values(
        updates in prop::collection::vec(update(), 1..6),
        all_namespaces in any::<bool>(),
    ) {
        let found = disagreement(None, &updates, &mapping(all_namespaces));
        prop_assert!(found.is_none(), "{}", found.unwrap_or_default());
    }

    /// A profile stored as JSON by an older outpost under another mapping, upgraded to a
    /// record, is judged as the JSON profile would have been.
    #[test]
    fn an_upgraded_json_profile_is_judged_as_before(
        first in profile(false),
        updates in prop::collection::vec(update(), 1..4),
        all_namespaces in any::<bool>(),
    ) {
        let before = Mapping::new(&["a", "c.a.b", "d"], &["s1"], &["ecid"]);
        let mut stored = Value::Object(first);
        KeepTree::for_mapping(&before).prune(stored.as_object_mut().unwrap());
        let timestamp = Some(at(0));
        let record = ProfileRecord::from_json_profile(
            timestamp.map(|t| t.timestamp_micros()),
            &stored,
        );
        let values = StoredProfile { timestamp, profile: stored };
        let mapping = mapping(all_namespaces);
        let found = disagreement(Some((values, record)), &updates, &mapping);
        prop_assert!(found.is_none(), "{}", found.unwrap_or_default());
    }
}

/// A number is sent as it was given: full-precision floats, which serde_json's default float
/// parsing may round to a neighbour, come through digit for digit.
#[test]
fn full_precision_floats_reach_the_payload_unchanged() {
    let mapping = Mapping::new(&["score"], &["s"], &[]);
    for score in [
        "0.9215686321258545",
        "10587.436593658977",
        "10587.436593658975",
        "2.2250738585072014e-308",
        "0.30000000000000004",
    ] {
        let line = format!(
            r#"{{"id":"p","profile":{{"score":{score},"segmentMembership":{{"ups":{{"s":{{"status":"realized"}}}}}}}}}}"#
        );
        let updates = outpost::profile::update::parse_body(line.as_bytes()).unwrap();
        let applied = apply_record(None, &updates[0], &mapping, &Layout::new(&mapping), at(0));
        let (_, payload) = applied.export.expect("a new member is exported");
        let sent = parsed(&payload)["score"].clone();
        let given: Value = serde_json::from_str(score).unwrap();
        assert_eq!(sent, given, "{score}: {payload}");
        assert_eq!(
            sent.as_f64().unwrap().to_bits(),
            score.parse::<f64>().unwrap().to_bits(),
            "{score} was read as {sent}: {payload}"
        );
    }
}
