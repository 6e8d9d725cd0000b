//! The export rules of SPEC ("Input", "Mapping: what the destination receives", "When an update
//! produces an export"), checked through the public API: `apply` of a parsed update to a stored
//! profile, for and against every rule, with hand-written expected payloads.
//!
//! The base profile `tests/fixtures/profile-jane.json` and its payload
//! `tests/fixtures/payload-jane.json` are built from the XDM examples
//! (see `tests/fixtures/README.md`).

use std::path::Path;

use chrono::{DateTime, Utc};
use outpost::config::{MappedAt, Mapping, SegmentDetails};
use outpost::profile::apply::{apply, StoreAction, StoredProfile, UpdateResult};
use outpost::profile::change::{decide, decide_delete};
use outpost::profile::engine::{apply_record, RecordAction};
use outpost::profile::export::{project, project_delete};
use outpost::profile::layout::Layout;
use outpost::profile::prune::KeepTree;
use outpost::profile::record::ProfileRecord;
use outpost::profile::update::{parse_body, Update};
use outpost::profile::Reason;
use serde_json::{json, Value};

// Segments. Jane is `existing` in the first, `realized` in the second, has no entry in the third,
// and is `realized` in the unmapped one.
const SEG_EXISTING: &str = "04a81716-43d6-4e7a-a49c-f1d8b3129ba9";
const SEG_REALIZED: &str = "53cba6b2-a23b-454a-8069-fc41308f1c0f";
const SEG_OTHER: &str = "59bd2fkd-3c48-4b18-bf56-4f5c5e6967ae";
const SEG_UNMAPPED: &str = "0b12f30c-2260-442e-9120-2b12e96c0c40";

const ID: &str = "p-000123";
/// The stored version's timestamp.
const T0: &str = "2026-01-01T00:00:05Z";
/// The timestamp of most updates.
const T1: &str = "2026-01-01T00:10:00Z";
/// When the agent received the update.
const RECEIVED: &str = "2026-02-03T04:05:06.789Z";
/// `RECEIVED` as exports carry it: RFC 3339, UTC, seconds.
const RECEIVED_SECS: &str = "2026-02-03T04:05:06Z";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn mapping() -> Mapping {
    Mapping::new(
        &[
            "person.name.firstName",
            "person.name.lastName",
            "person.birthDate",
            "workEmail.address",
            "mobilePhone",
            "personalEmail.address",
        ],
        &[SEG_EXISTING, SEG_REALIZED, SEG_OTHER],
        &["ECID", "EMAIL"],
    )
}

/// The same mapping with `identities` empty: every namespace is exported.
fn mapping_all_namespaces() -> Mapping {
    Mapping {
        identities: Vec::new(),
        ..mapping()
    }
}

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The base profile: a member of `SEG_EXISTING` and `SEG_REALIZED`.
fn jane() -> Value {
    fixture("profile-jane.json")
}

/// The payload of `jane()` under `mapping()`.
fn jane_payload() -> Value {
    fixture("payload-jane.json")
}

fn time(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .with_timezone(&Utc)
}

/// One step of a JSON pointer: an array index where the node is an array, else an object key
/// (inserted, and a null node made an object, as `serde_json`'s `IndexMut` does).
fn step<'a>(node: &'a mut Value, key: &str) -> &'a mut Value {
    match node {
        Value::Array(items) => {
            let index: usize = key
                .parse()
                .unwrap_or_else(|_| panic!("{key:?} is not an array index"));
            &mut items[index]
        }
        _ => &mut node[key],
    }
}

/// Sets the value at a JSON pointer, creating objects on the way.
fn set(target: &mut Value, pointer: &str, value: Value) {
    let keys: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    let (last, parents) = keys.split_last().expect("a non-empty pointer");
    let mut node = target;
    for key in parents {
        node = step(node, key);
    }
    *step(node, last) = value;
}

/// Removes the key at a JSON pointer, which must be there.
fn del(target: &mut Value, pointer: &str) {
    let (parent, key) = pointer.rsplit_once('/').expect("a pointer");
    target
        .pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .unwrap_or_else(|| panic!("no object at {parent:?}"))
        .remove(key)
        .unwrap_or_else(|| panic!("no key at {pointer:?}"));
}

fn edit(mut value: Value, change: impl FnOnce(&mut Value)) -> Value {
    change(&mut value);
    value
}

fn ups(segment: &str) -> String {
    format!("/segmentMembership/ups/{segment}")
}

/// The entry the payload carries for a mapped segment whose membership ended at `time`.
fn exited(time: &str) -> Value {
    json!({"status": "exited", "lastQualificationTime": time})
}

/// Jane as a member of no mapped segment (she keeps the unmapped one).
fn jane_non_member() -> Value {
    edit(jane(), |p| {
        del(p, &ups(SEG_EXISTING));
        del(p, &ups(SEG_REALIZED));
    })
}

fn stored(profile: Value, timestamp: Option<&str>) -> Option<StoredProfile> {
    Some(StoredProfile {
        timestamp: timestamp.map(time),
        profile,
    })
}

/// Jane as stored at `T0`.
fn stored_jane() -> Option<StoredProfile> {
    stored(jane(), Some(T0))
}

fn update_text(op: Option<&str>, timestamp: Option<&str>, profile: Option<Value>) -> String {
    let mut update = json!({ "id": ID });
    if let Some(op) = op {
        update["op"] = json!(op);
    }
    if let Some(timestamp) = timestamp {
        update["timestamp"] = json!(timestamp);
    }
    if let Some(profile) = profile {
        update["profile"] = profile;
    }
    update.to_string()
}

fn upsert(timestamp: Option<&str>, profile: Value) -> String {
    update_text(None, timestamp, Some(profile))
}

fn merge(timestamp: Option<&str>, patch: Value) -> String {
    update_text(Some("merge"), timestamp, Some(patch))
}

fn delete(timestamp: Option<&str>) -> String {
    update_text(Some("delete"), timestamp, None)
}

fn parse_one(text: &str) -> Update {
    let mut updates =
        parse_body(text.as_bytes()).unwrap_or_else(|e| panic!("update {text} refused: {e}"));
    assert_eq!(updates.len(), 1, "one update in {text}");
    updates.remove(0)
}

/// What the store should be told to do.
enum Store {
    Keep,
    Remove,
    /// The stored timestamp and profile afterwards.
    Put(Option<&'static str>, Value),
}

struct Case {
    name: String,
    mapping: Mapping,
    stored: Option<StoredProfile>,
    /// The update as the producer sends it (one JSON object).
    update: String,
    result: UpdateResult,
    export: Option<(Reason, Value)>,
    store: Store,
}

fn case(
    name: impl Into<String>,
    stored: Option<StoredProfile>,
    update: String,
    result: UpdateResult,
    export: Option<(Reason, Value)>,
    store: Store,
) -> Case {
    Case {
        name: name.into(),
        mapping: mapping(),
        stored,
        update,
        result,
        export,
        store,
    }
}

impl Case {
    fn with_mapping(self, mapping: Mapping) -> Case {
        Case { mapping, ..self }
    }
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).expect("JSON")
}

/// What SPEC says about every payload, whatever the case: every mapped attribute present in the
/// profile is there, at its path, and nothing else; `identityMap` holds only the non-empty arrays
/// of mapped namespaces, as given.
fn payload_invariants(
    name: &str,
    profile: &Value,
    payload: &Value,
    mapping: &Mapping,
) -> Vec<String> {
    let mut failures = Vec::new();
    let mut roots = vec!["segmentMembership".to_owned(), "identityMap".to_owned()];
    for path in &mapping.attributes {
        roots.push(path[0].clone());
        let at = |value: &Value| path.iter().try_fold(value, |v, key| v.get(key)).cloned();
        if at(profile) != at(payload) {
            failures.push(format!(
                "{name}: mapped attribute {} is {:?} in the profile but {:?} in the payload",
                path.join("."),
                at(profile),
                at(payload)
            ));
        }
    }
    for key in payload
        .as_object()
        .expect("the payload is an object")
        .keys()
    {
        if !roots.contains(key) {
            failures.push(format!(
                "{name}: unmapped top-level key {key:?} in the payload"
            ));
        }
    }
    let empty = serde_json::Map::new();
    let given = profile
        .get("identityMap")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let sent = match payload.get("identityMap") {
        None => &empty,
        Some(Value::Object(sent)) => sent,
        Some(other) => {
            failures.push(format!("{name}: identityMap is not an object: {other}"));
            return failures;
        }
    };
    if payload.get("identityMap").is_some() && sent.is_empty() {
        failures.push(format!("{name}: the payload carries an empty identityMap"));
    }
    let mapped =
        |ns: &str| mapping.identities.is_empty() || mapping.identities.iter().any(|m| m == ns);
    for (namespace, identities) in given {
        let non_empty = identities.as_array().is_some_and(|a| !a.is_empty());
        let expected = (mapped(namespace) && non_empty).then_some(identities);
        if sent.get(namespace) != expected {
            failures.push(format!(
                "{name}: identityMap.{namespace} is {:?} in the payload, expected {expected:?}",
                sent.get(namespace)
            ));
        }
    }
    for namespace in sent.keys() {
        if !given.contains_key(namespace) {
            failures.push(format!(
                "{name}: identityMap.{namespace} is not in the profile"
            ));
        }
    }
    failures
}

/// The record engine, which the store runs on pruned updates, gives the case's result and
/// export, and stores the record of the case's expected profile.
fn record_engine_failures(case: &Case, update: &Update) -> Vec<String> {
    let name = case.name.as_str();
    let layout = Layout::new(&case.mapping);
    let record_of = |timestamp: Option<DateTime<Utc>>, profile: &Value| {
        let mut pruned = profile.as_object().expect("profiles are objects").clone();
        KeepTree::for_mapping(&case.mapping).prune(&mut pruned);
        ProfileRecord::from_profile(timestamp.map(|t| t.timestamp_micros()), &pruned, &layout)
    };
    let stored = case
        .stored
        .as_ref()
        .map(|s| record_of(s.timestamp, &s.profile));
    let mut pruned = update.clone();
    KeepTree::for_mapping(&case.mapping).prune(&mut pruned.profile);
    let applied = apply_record(
        stored.as_ref(),
        &pruned,
        &case.mapping,
        &layout,
        time(RECEIVED),
    );
    let mut failures = Vec::new();
    if applied.result != case.result {
        failures.push(format!(
            "{name} (records): result {:?}, expected {:?}",
            applied.result, case.result
        ));
    }
    let export = applied.export.as_ref().map(|(reason, payload)| {
        let payload: Value = serde_json::from_str(payload).expect("payloads are JSON");
        (*reason, payload)
    });
    if export != case.export {
        failures.push(format!(
            "{name} (records): export {export:?}, expected {:?}",
            case.export
        ));
    }
    let kept = match &applied.store {
        RecordAction::Keep => stored.clone(),
        RecordAction::Put(new) => Some(new.clone().into_owned()),
        RecordAction::Remove => None,
    };
    let expected = match &case.store {
        Store::Keep => stored,
        Store::Remove => None,
        Store::Put(timestamp, profile) => Some(record_of(timestamp.map(time), profile)),
    };
    if kept != expected {
        failures.push(format!(
            "{name} (records): stored {kept:?}, expected {expected:?}"
        ));
    }
    failures
}

fn run(cases: Vec<Case>) {
    let count = cases.len();
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.name.as_str();
        let update = parse_one(&case.update);
        failures.extend(record_engine_failures(case, &update));
        let applied = apply(case.stored.as_ref(), &update, &case.mapping, time(RECEIVED));

        if applied.result != case.result {
            failures.push(format!(
                "{name}: result {:?}, expected {:?}",
                applied.result, case.result
            ));
        }
        match (&applied.export, &case.export) {
            (None, None) => {}
            (Some((reason, payload)), Some((want_reason, want_payload))) => {
                if reason != want_reason {
                    failures.push(format!("{name}: reason {reason}, expected {want_reason}"));
                }
                if payload != want_payload {
                    failures.push(format!(
                        "{name}: payload\n{}\nexpected\n{}",
                        pretty(payload),
                        pretty(want_payload)
                    ));
                }
            }
            (got, want) => failures.push(format!(
                "{name}: export {}, expected {}",
                got.as_ref()
                    .map_or("none".into(), |(r, p)| format!("{r} {p}")),
                want.as_ref()
                    .map_or("none".into(), |(r, p)| format!("{r} {p}")),
            )),
        }
        match (&applied.store, &case.store) {
            (StoreAction::Keep, Store::Keep) | (StoreAction::Remove, Store::Remove) => {}
            (StoreAction::Put(got), Store::Put(timestamp, profile)) => {
                let want_time = timestamp.map(time);
                if got.timestamp != want_time {
                    failures.push(format!(
                        "{name}: stored timestamp {:?}, expected {want_time:?}",
                        got.timestamp
                    ));
                }
                if &got.profile != profile {
                    failures.push(format!(
                        "{name}: stored profile\n{}\nexpected\n{}",
                        pretty(&got.profile),
                        pretty(profile)
                    ));
                }
            }
            (got, want) => failures.push(format!(
                "{name}: store action {got:?}, expected {}",
                match want {
                    Store::Keep => "Keep".to_owned(),
                    Store::Remove => "Remove".to_owned(),
                    Store::Put(t, p) => format!("Put({t:?}, {p})"),
                }
            )),
        }
        // Nothing is exported, stored or removed for a stale update.
        if applied.result == UpdateResult::Stale
            && (applied.export.is_some() || applied.store != StoreAction::Keep)
        {
            failures.push(format!(
                "{name}: a stale update changed something: {applied:?}"
            ));
        }
        if let Some((_, payload)) = &applied.export {
            // The profile the payload was made from: the new version, or the deleted one.
            let profile = match &applied.store {
                StoreAction::Put(new) => Some(&new.profile),
                _ => case.stored.as_ref().map(|s| &s.profile),
            };
            if let Some(profile) = profile {
                failures.extend(payload_invariants(name, profile, payload, &case.mapping));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} cases failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

use Store::{Keep, Put, Remove};
use UpdateResult::{Deleted, Exported, Stale, Unchanged};

// ---------------------------------------------------------------------------------------------
// The fixtures
// ---------------------------------------------------------------------------------------------

#[test]
fn fixture_payload_is_the_projection_of_the_fixture_profile() {
    let (old, new) = (json!({}), jane());
    assert_eq!(decide(&old, &new, &mapping()), Some(Reason::Segment));
    let payload = project(&old, &new, &mapping(), T1);
    assert_eq!(payload, jane_payload(), "got\n{}", pretty(&payload));
    // From Jane to Jane nothing changed.
    assert_eq!(decide(&new, &new, &mapping()), None);
    // And the invariants hold for the hand-written fixture itself.
    let failures = payload_invariants("fixture", &new, &jane_payload(), &mapping());
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn fixture_delete_payload() {
    let old = jane();
    assert_eq!(decide_delete(&old, &mapping()), Some(Reason::Delete));
    let want = edit(jane_payload(), |p| {
        set(p, &ups(SEG_EXISTING), exited(T1));
        set(p, &ups(SEG_REALIZED), exited(T1));
    });
    assert_eq!(project_delete(&old, &mapping(), T1), want);
    assert_eq!(decide_delete(&jane_non_member(), &mapping()), None);
    assert_eq!(decide_delete(&json!({}), &mapping()), None);
}

/// `mapping()` with names and times for the two segments Jane is a member of, and the
/// toggles as given.
fn mapping_with_segment_details(names: bool, timestamps: bool) -> Mapping {
    let mut m = mapping();
    m.include_segment_names = names;
    m.include_segment_timestamps = timestamps;
    m.segment_details.insert(
        SEG_EXISTING.into(),
        SegmentDetails {
            name: Some("Loyal customers".into()),
            created_at_ms: Some(1_546_357_945_000),
            updated_at_ms: Some(1_546_444_345_000),
        },
    );
    m.segment_details.insert(
        SEG_REALIZED.into(),
        SegmentDetails {
            name: Some("Lapsed VIPs".into()),
            ..SegmentDetails::default()
        },
    );
    m.mapped_at.insert(
        SEG_EXISTING.into(),
        MappedAt {
            created_ms: 1_759_276_800_000,
            updated_ms: 1_767_607_200_000,
        },
    );
    for segment in [SEG_REALIZED, SEG_OTHER] {
        m.mapped_at.insert(
            segment.into(),
            MappedAt {
                created_ms: 1_767_225_600_000,
                updated_ms: 1_767_225_600_000,
            },
        );
    }
    m
}

#[test]
fn segment_names_and_timestamps_when_the_mapping_asks_for_them() {
    let (old, new) = (json!({}), jane());
    let both = project(&old, &new, &mapping_with_segment_details(true, true), T1);
    let want = fixture("payload-jane-segment-details.json");
    assert_eq!(both, want, "got\n{}", pretty(&both));

    // Off (the default): exactly the plain payload, whatever the config knows.
    let off = project(&old, &new, &mapping_with_segment_details(false, false), T1);
    assert_eq!(off, jane_payload());

    // Names only, timestamps only.
    let names = project(&old, &new, &mapping_with_segment_details(true, false), T1);
    assert_eq!(
        names["segmentMembership"]["ups"][SEG_REALIZED]["name"],
        "Lapsed VIPs"
    );
    assert!(names["segmentMembership"]["ups"][SEG_EXISTING]
        .get("createdAt")
        .is_none());
    let times = project(&old, &new, &mapping_with_segment_details(false, true), T1);
    assert!(times["segmentMembership"]["ups"][SEG_EXISTING]
        .get("name")
        .is_none());
    assert_eq!(
        times["segmentMembership"]["ups"][SEG_EXISTING]["createdAt"],
        1_546_357_945_000i64
    );

    // An exited entry carries them too; a delete's payload as well.
    let detailed = mapping_with_segment_details(true, true);
    let gone = project_delete(&new, &detailed, T1);
    let entry = &gone["segmentMembership"]["ups"][SEG_REALIZED];
    assert_eq!(entry["status"], "exited");
    assert_eq!(entry["name"], "Lapsed VIPs");
    assert_eq!(entry["mappingCreatedAt"], 1_767_225_600_000i64);
    // The decision is the same with or without the details: they are the payload's only.
    assert_eq!(
        decide(&old, &new, &detailed),
        decide(&old, &new, &mapping())
    );
}

// ---------------------------------------------------------------------------------------------
// 1. segment
// ---------------------------------------------------------------------------------------------

#[test]
fn segment_rules() {
    let lost_realized = edit(jane(), |p| del(p, &ups(SEG_REALIZED)));
    let null_realized = edit(jane(), |p| set(p, &ups(SEG_REALIZED), Value::Null));
    let payload_realized_exited_at =
        |t: &str| edit(jane_payload(), |p| set(p, &ups(SEG_REALIZED), exited(t)));
    let exited_entry = json!({"status": "exited", "lastQualificationTime": "2026-01-01T00:09:30Z"});
    let joined_other =
        json!({"status": "existing", "lastQualificationTime": "2026-01-01T00:09:00Z"});

    run(vec![
        // -- qualify
        case(
            "qualify: a never-seen profile realized/existing in mapped segments",
            None,
            upsert(Some(T1), jane()),
            Exported,
            Some((Reason::Segment, jane_payload())),
            Put(Some(T1), jane()),
        ),
        case(
            "qualify: a stored member joins a further mapped segment as existing",
            stored_jane(),
            upsert(
                Some(T1),
                edit(jane(), |p| set(p, &ups(SEG_OTHER), joined_other.clone())),
            ),
            Exported,
            Some((
                Reason::Segment,
                edit(jane_payload(), |p| {
                    set(p, &ups(SEG_OTHER), joined_other.clone())
                }),
            )),
            Put(
                Some(T1),
                edit(jane(), |p| set(p, &ups(SEG_OTHER), joined_other.clone())),
            ),
        ),
        case(
            "qualify: a stored non-member becomes a member",
            stored(jane_non_member(), Some(T0)),
            upsert(Some(T1), jane()),
            Exported,
            Some((Reason::Segment, jane_payload())),
            Put(Some(T1), jane()),
        ),
        case(
            "qualify: re-qualifies after exited",
            stored(
                edit(jane(), |p| set(p, &ups(SEG_REALIZED), exited_entry.clone())),
                Some(T0),
            ),
            upsert(Some(T1), jane()),
            Exported,
            Some((Reason::Segment, jane_payload())),
            Put(Some(T1), jane()),
        ),
        case(
            "against qualify: a never-seen profile only in an unmapped segment",
            None,
            upsert(Some(T1), jane_non_member()),
            Unchanged,
            None,
            Put(Some(T1), jane_non_member()),
        ),
        case(
            "against qualify: a never-seen profile whose mapped segment is exited",
            None,
            upsert(
                Some(T1),
                edit(jane_non_member(), |p| {
                    set(p, &ups(SEG_OTHER), exited_entry.clone())
                }),
            ),
            Unchanged,
            None,
            Put(
                Some(T1),
                edit(jane_non_member(), |p| {
                    set(p, &ups(SEG_OTHER), exited_entry.clone())
                }),
            ),
        ),
        // -- exit
        case(
            "exit: status exited (the entry is carried as given)",
            stored_jane(),
            upsert(
                Some(T1),
                edit(jane(), |p| set(p, &ups(SEG_REALIZED), exited_entry.clone())),
            ),
            Exported,
            Some((
                Reason::Segment,
                edit(jane_payload(), |p| {
                    set(p, &ups(SEG_REALIZED), exited_entry.clone())
                }),
            )),
            Put(
                Some(T1),
                edit(jane(), |p| set(p, &ups(SEG_REALIZED), exited_entry.clone())),
            ),
        ),
        case(
            "exit: vanished entry, T is the update timestamp",
            stored_jane(),
            upsert(Some(T1), lost_realized.clone()),
            Exported,
            Some((Reason::Segment, payload_realized_exited_at(T1))),
            Put(Some(T1), lost_realized.clone()),
        ),
        case(
            "exit: an entry of null is a vanished entry",
            stored_jane(),
            upsert(Some(T1), null_realized.clone()),
            Exported,
            Some((Reason::Segment, payload_realized_exited_at(T1))),
            Put(Some(T1), null_realized.clone()),
        ),
        case(
            "exit: vanished entry, T is the update timestamp normalized to UTC",
            stored_jane(),
            upsert(Some("2026-01-01T01:10:00+01:00"), lost_realized.clone()),
            Exported,
            Some((
                Reason::Segment,
                payload_realized_exited_at("2026-01-01T00:10:00Z"),
            )),
            Put(Some("2026-01-01T00:10:00Z"), lost_realized.clone()),
        ),
        case(
            "exit: vanished entry, T is the update timestamp in whole seconds",
            stored_jane(),
            upsert(Some("2026-01-01T00:10:00.987654Z"), lost_realized.clone()),
            Exported,
            Some((
                Reason::Segment,
                payload_realized_exited_at("2026-01-01T00:10:00Z"),
            )),
            Put(Some("2026-01-01T00:10:00.987654Z"), lost_realized.clone()),
        ),
        case(
            "exit: vanished entry, no timestamp: T is when it was received",
            stored_jane(),
            upsert(None, lost_realized.clone()),
            Exported,
            Some((Reason::Segment, payload_realized_exited_at(RECEIVED_SECS))),
            Put(Some(T0), lost_realized.clone()),
        ),
        case(
            "exit: the whole segmentMembership vanished",
            stored_jane(),
            upsert(Some(T1), edit(jane(), |p| del(p, "/segmentMembership"))),
            Exported,
            Some((
                Reason::Segment,
                edit(jane_payload(), |p| {
                    set(p, &ups(SEG_EXISTING), exited(T1));
                    set(p, &ups(SEG_REALIZED), exited(T1));
                }),
            )),
            Put(Some(T1), edit(jane(), |p| del(p, "/segmentMembership"))),
        ),
        case(
            "exit: an empty profile replaces a member",
            stored_jane(),
            upsert(Some(T1), json!({})),
            Exported,
            Some((
                Reason::Segment,
                json!({"segmentMembership": {"ups": {
                    SEG_EXISTING: exited(T1),
                    SEG_REALIZED: exited(T1),
                }}}),
            )),
            Put(Some(T1), json!({})),
        ),
        case(
            "against exit: realized -> existing is not a change",
            stored_jane(),
            upsert(
                Some(T1),
                edit(jane(), |p| {
                    set(
                        p,
                        &format!("{}/status", ups(SEG_REALIZED)),
                        json!("existing"),
                    )
                }),
            ),
            Unchanged,
            None,
            Put(
                Some(T1),
                edit(jane(), |p| {
                    set(
                        p,
                        &format!("{}/status", ups(SEG_REALIZED)),
                        json!("existing"),
                    )
                }),
            ),
        ),
        case(
            "against exit: existing -> realized is not a change",
            stored_jane(),
            upsert(
                Some(T1),
                edit(jane(), |p| {
                    set(
                        p,
                        &format!("{}/status", ups(SEG_EXISTING)),
                        json!("realized"),
                    )
                }),
            ),
            Unchanged,
            None,
            Put(
                Some(T1),
                edit(jane(), |p| {
                    set(
                        p,
                        &format!("{}/status", ups(SEG_EXISTING)),
                        json!("realized"),
                    )
                }),
            ),
        ),
        case(
            "against exit: an already exited entry vanishes",
            stored(
                edit(jane(), |p| set(p, &ups(SEG_OTHER), exited_entry.clone())),
                Some(T0),
            ),
            upsert(Some(T1), jane()),
            Unchanged,
            None,
            Put(Some(T1), jane()),
        ),
        case(
            "against exit: lastQualificationTime of a member changes",
            stored_jane(),
            upsert(
                Some(T1),
                edit(jane(), |p| {
                    set(
                        p,
                        &format!("{}/lastQualificationTime", ups(SEG_REALIZED)),
                        json!(T1),
                    )
                }),
            ),
            Unchanged,
            None,
            Put(
                Some(T1),
                edit(jane(), |p| {
                    set(
                        p,
                        &format!("{}/lastQualificationTime", ups(SEG_REALIZED)),
                        json!(T1),
                    )
                }),
            ),
        ),
        // -- unmapped segments
        case(
            "against: an unmapped segment exits",
            stored_jane(),
            upsert(
                Some(T1),
                edit(jane(), |p| set(p, &ups(SEG_UNMAPPED), exited_entry.clone())),
            ),
            Unchanged,
            None,
            Put(
                Some(T1),
                edit(jane(), |p| set(p, &ups(SEG_UNMAPPED), exited_entry.clone())),
            ),
        ),
        case(
            "against: an unmapped segment vanishes",
            stored_jane(),
            upsert(Some(T1), edit(jane(), |p| del(p, &ups(SEG_UNMAPPED)))),
            Unchanged,
            None,
            Put(Some(T1), edit(jane(), |p| del(p, &ups(SEG_UNMAPPED)))),
        ),
        case(
            "against: a non-member qualifies for an unmapped segment",
            stored(
                edit(jane_non_member(), |p| del(p, &ups(SEG_UNMAPPED))),
                Some(T0),
            ),
            upsert(Some(T1), jane_non_member()),
            Unchanged,
            None,
            Put(Some(T1), jane_non_member()),
        ),
        case(
            "against: mapping changed, the stored membership is no longer mapped",
            stored_jane(),
            upsert(Some(T1), lost_realized.clone()),
            Unchanged,
            None,
            Put(Some(T1), lost_realized.clone()),
        )
        .with_mapping(Mapping::new(&["person.name.firstName"], &[SEG_OTHER], &[])),
    ]);
}

// ---------------------------------------------------------------------------------------------
// 2. identity
// ---------------------------------------------------------------------------------------------

#[test]
fn identity_rules() {
    let extra = json!({"id": "1233ce17-20e0-4a2c-8198-2a77fd60cf4d"});
    let ecid_added = edit(jane(), |p| {
        p["identityMap"]["ECID"]
            .as_array_mut()
            .unwrap()
            .push(extra.clone());
    });
    let ecid_removed = edit(jane(), |p| {
        p["identityMap"]["ECID"].as_array_mut().unwrap().remove(1);
    });
    let ecid_reordered = edit(jane(), |p| {
        p["identityMap"]["ECID"].as_array_mut().unwrap().reverse()
    });
    let email_authenticated = edit(jane(), |p| {
        set(
            p,
            "/identityMap/EMAIL/0/authenticatedState",
            json!("authenticated"),
        )
    });
    let email_gone = edit(jane(), |p| del(p, "/identityMap/EMAIL"));
    let email_empty = edit(jane(), |p| set(p, "/identityMap/EMAIL", json!([])));
    let crm_changed = edit(jane(), |p| {
        set(
            p,
            "/identityMap/CRM/0/authenticatedState",
            json!("loggedOut"),
        )
    });
    let phone_added = edit(jane(), |p| {
        set(p, "/identityMap/Phone", json!([{"id": "1-408-888-8888"}]))
    });
    let phone_empty = edit(jane(), |p| set(p, "/identityMap/Phone", json!([])));
    let with_crm = |payload: Value| {
        edit(payload, |p| {
            set(
                p,
                "/identityMap/CRM",
                json!([{"id": "2394509340-30453470347", "authenticatedState": "authenticated"}]),
            )
        })
    };
    // The stored identity item has its keys in one order, the update in the other.
    let keys_reordered = format!(
        r#"{{"id":"{ID}","timestamp":"{T1}","profile":{}}}"#,
        jane().to_string().replace(
            r#"{"authenticatedState":"authenticated","id":"2394509340-30453470347"}"#,
            r#"{"id":"2394509340-30453470347","authenticatedState":"authenticated"}"#
        )
    );
    assert!(
        keys_reordered.contains(r#"{"id":"2394509340"#),
        "the replacement happened"
    );

    run(vec![
        case(
            "identity added to a mapped namespace",
            stored_jane(),
            upsert(Some(T1), ecid_added.clone()),
            Exported,
            Some((
                Reason::Identity,
                edit(jane_payload(), |p| {
                    p["identityMap"]["ECID"]
                        .as_array_mut()
                        .unwrap()
                        .push(extra.clone())
                }),
            )),
            Put(Some(T1), ecid_added.clone()),
        ),
        case(
            "identity added: a mapped namespace appears",
            stored(email_gone.clone(), Some(T0)),
            upsert(Some(T1), jane()),
            Exported,
            Some((Reason::Identity, jane_payload())),
            Put(Some(T1), jane()),
        ),
        case(
            "identity removed from a mapped namespace",
            stored_jane(),
            upsert(Some(T1), ecid_removed.clone()),
            Exported,
            Some((
                Reason::Identity,
                edit(jane_payload(), |p| {
                    p["identityMap"]["ECID"].as_array_mut().unwrap().remove(1);
                }),
            )),
            Put(Some(T1), ecid_removed.clone()),
        ),
        case(
            "identity removed: a whole mapped namespace",
            stored_jane(),
            upsert(Some(T1), email_gone.clone()),
            Exported,
            Some((
                Reason::Identity,
                edit(jane_payload(), |p| del(p, "/identityMap/EMAIL")),
            )),
            Put(Some(T1), email_gone.clone()),
        ),
        case(
            "identity changed: an identity object gains a field",
            stored_jane(),
            upsert(Some(T1), email_authenticated.clone()),
            Exported,
            Some((
                Reason::Identity,
                edit(jane_payload(), |p| {
                    set(
                        p,
                        "/identityMap/EMAIL/0/authenticatedState",
                        json!("authenticated"),
                    )
                }),
            )),
            Put(Some(T1), email_authenticated.clone()),
        ),
        case(
            "identity emptied: the empty array is left out of the payload",
            stored_jane(),
            upsert(Some(T1), email_empty.clone()),
            Exported,
            Some((
                Reason::Identity,
                edit(jane_payload(), |p| del(p, "/identityMap/EMAIL")),
            )),
            Put(Some(T1), email_empty.clone()),
        ),
        case(
            "against identity: reordered identities",
            stored_jane(),
            upsert(Some(T1), ecid_reordered.clone()),
            Unchanged,
            None,
            Put(Some(T1), ecid_reordered.clone()),
        ),
        case(
            "against identity: identity objects with keys in another order",
            stored(jane(), Some(T1)),
            keys_reordered,
            Unchanged,
            None,
            Keep,
        ),
        case(
            "against identity: a duplicated identity (compared as sets)",
            stored_jane(),
            upsert(
                Some(T1),
                edit(jane(), |p| {
                    p["identityMap"]["ECID"]
                        .as_array_mut()
                        .unwrap()
                        .push(json!({"id": "92312748749128"}))
                }),
            ),
            Unchanged,
            None,
            Put(
                Some(T1),
                edit(jane(), |p| {
                    p["identityMap"]["ECID"]
                        .as_array_mut()
                        .unwrap()
                        .push(json!({"id": "92312748749128"}))
                }),
            ),
        ),
        case(
            "against identity: absent -> empty array",
            stored(email_gone.clone(), Some(T0)),
            upsert(Some(T1), email_empty.clone()),
            Unchanged,
            None,
            Put(Some(T1), email_empty.clone()),
        ),
        case(
            "against identity: empty array -> absent",
            stored(email_empty.clone(), Some(T0)),
            upsert(Some(T1), email_gone.clone()),
            Unchanged,
            None,
            Put(Some(T1), email_gone.clone()),
        ),
        case(
            "against identity: identityMap removed where every mapped namespace was empty",
            stored(
                edit(jane(), |p| {
                    p["identityMap"] = json!({"ECID": [], "EMAIL": []})
                }),
                Some(T0),
            ),
            upsert(Some(T1), edit(jane(), |p| del(p, "/identityMap"))),
            Unchanged,
            None,
            Put(Some(T1), edit(jane(), |p| del(p, "/identityMap"))),
        ),
        case(
            "against identity: an unmapped namespace changes",
            stored_jane(),
            upsert(Some(T1), crm_changed.clone()),
            Unchanged,
            None,
            Put(Some(T1), crm_changed.clone()),
        ),
        case(
            "against identity: an unmapped namespace appears",
            stored_jane(),
            upsert(Some(T1), phone_added.clone()),
            Unchanged,
            None,
            Put(Some(T1), phone_added.clone()),
        ),
        case(
            "identities empty = all namespaces: a change of CRM exports",
            stored_jane(),
            upsert(Some(T1), crm_changed.clone()),
            Exported,
            Some((
                Reason::Identity,
                edit(with_crm(jane_payload()), |p| {
                    set(
                        p,
                        "/identityMap/CRM/0/authenticatedState",
                        json!("loggedOut"),
                    )
                }),
            )),
            Put(Some(T1), crm_changed.clone()),
        )
        .with_mapping(mapping_all_namespaces()),
        case(
            "identities empty = all namespaces: a new namespace exports",
            stored_jane(),
            upsert(Some(T1), phone_added.clone()),
            Exported,
            Some((
                Reason::Identity,
                edit(with_crm(jane_payload()), |p| {
                    set(p, "/identityMap/Phone", json!([{"id": "1-408-888-8888"}]))
                }),
            )),
            Put(Some(T1), phone_added.clone()),
        )
        .with_mapping(mapping_all_namespaces()),
        case(
            "identities empty = all namespaces: a namespace removed exports",
            stored_jane(),
            upsert(Some(T1), edit(jane(), |p| del(p, "/identityMap/CRM"))),
            Exported,
            Some((Reason::Identity, jane_payload())),
            Put(Some(T1), edit(jane(), |p| del(p, "/identityMap/CRM"))),
        )
        .with_mapping(mapping_all_namespaces()),
        case(
            "against identities empty: a namespace with an empty array appears",
            stored_jane(),
            upsert(Some(T1), phone_empty.clone()),
            Unchanged,
            None,
            Put(Some(T1), phone_empty.clone()),
        )
        .with_mapping(mapping_all_namespaces()),
        case(
            "identities empty: the payload leaves out empty arrays",
            stored_jane(),
            upsert(
                Some(T1),
                edit(phone_empty.clone(), |p| {
                    set(p, "/identityMap/CRM", json!([]))
                }),
            ),
            Exported,
            Some((Reason::Identity, jane_payload())),
            Put(
                Some(T1),
                edit(phone_empty.clone(), |p| {
                    set(p, "/identityMap/CRM", json!([]))
                }),
            ),
        )
        .with_mapping(mapping_all_namespaces()),
        case(
            "against identity: a member of no mapped segment before or after",
            stored(jane_non_member(), Some(T0)),
            upsert(
                Some(T1),
                edit(jane_non_member(), |p| {
                    p["identityMap"]["ECID"]
                        .as_array_mut()
                        .unwrap()
                        .push(extra.clone())
                }),
            ),
            Unchanged,
            None,
            Put(
                Some(T1),
                edit(jane_non_member(), |p| {
                    p["identityMap"]["ECID"]
                        .as_array_mut()
                        .unwrap()
                        .push(extra.clone())
                }),
            ),
        ),
        case(
            "payload: identityMap keeps only non-empty arrays of mapped namespaces",
            stored_jane(),
            upsert(
                Some(T1),
                edit(email_authenticated.clone(), |p| {
                    set(p, "/identityMap/ECID", json!([]))
                }),
            ),
            Exported,
            Some((
                Reason::Identity,
                edit(jane_payload(), |p| {
                    del(p, "/identityMap/ECID");
                    set(
                        p,
                        "/identityMap/EMAIL/0/authenticatedState",
                        json!("authenticated"),
                    );
                }),
            )),
            Put(
                Some(T1),
                edit(email_authenticated.clone(), |p| {
                    set(p, "/identityMap/ECID", json!([]))
                }),
            ),
        ),
        case(
            "payload: no identityMap when no mapped namespace has identities",
            stored_jane(),
            upsert(
                Some(T1),
                edit(jane(), |p| {
                    del(p, "/identityMap/EMAIL");
                    set(p, "/identityMap/ECID", json!([]));
                }),
            ),
            Exported,
            Some((
                Reason::Identity,
                edit(jane_payload(), |p| del(p, "/identityMap")),
            )),
            Put(
                Some(T1),
                edit(jane(), |p| {
                    del(p, "/identityMap/EMAIL");
                    set(p, "/identityMap/ECID", json!([]));
                }),
            ),
        ),
    ]);
}

// ---------------------------------------------------------------------------------------------
// 3. attribute
// ---------------------------------------------------------------------------------------------

#[test]
fn attribute_rules() {
    let personal_email = json!({
        "primary": false,
        "address": "jsmith@xyzinc.com",
        "label": "John Smith",
        "type": "work",
        "status": "active"
    });
    let changed = |pointer: &'static str, value: Value| edit(jane(), |p| set(p, pointer, value));
    let changed_payload =
        |pointer: &'static str, value: Value| edit(jane_payload(), |p| set(p, pointer, value));
    let removed = |pointer: &'static str| edit(jane(), |p| del(p, pointer));
    let removed_payload = |pointer: &'static str| edit(jane_payload(), |p| del(p, pointer));

    run(vec![
        case(
            "attribute changed: firstName (every mapped attribute is still exported)",
            stored_jane(),
            upsert(Some(T1), changed("/person/name/firstName", json!("Janet"))),
            Exported,
            Some((
                Reason::Attribute,
                changed_payload("/person/name/firstName", json!("Janet")),
            )),
            Put(Some(T1), changed("/person/name/firstName", json!("Janet"))),
        ),
        case(
            "attribute changed: a different JSON type",
            stored_jane(),
            upsert(Some(T1), changed("/person/birthDate", json!(19960119))),
            Exported,
            Some((
                Reason::Attribute,
                changed_payload("/person/birthDate", json!(19960119)),
            )),
            Put(Some(T1), changed("/person/birthDate", json!(19960119))),
        ),
        case(
            "attribute added: only the mapped leaf is exported",
            stored_jane(),
            upsert(Some(T1), changed("/personalEmail", personal_email.clone())),
            Exported,
            Some((
                Reason::Attribute,
                changed_payload("/personalEmail", json!({"address": "jsmith@xyzinc.com"})),
            )),
            Put(Some(T1), changed("/personalEmail", personal_email.clone())),
        ),
        case(
            "attribute added: null is present",
            stored(removed("/person/birthDate"), Some(T0)),
            upsert(Some(T1), changed("/person/birthDate", Value::Null)),
            Exported,
            Some((
                Reason::Attribute,
                changed_payload("/person/birthDate", Value::Null),
            )),
            Put(Some(T1), changed("/person/birthDate", Value::Null)),
        ),
        case(
            "attribute removed: birthDate is left out",
            stored_jane(),
            upsert(Some(T1), removed("/person/birthDate")),
            Exported,
            Some((Reason::Attribute, removed_payload("/person/birthDate"))),
            Put(Some(T1), removed("/person/birthDate")),
        ),
        case(
            "attribute removed: the whole person",
            stored_jane(),
            upsert(Some(T1), removed("/person")),
            Exported,
            Some((Reason::Attribute, removed_payload("/person"))),
            Put(Some(T1), removed("/person")),
        ),
        case(
            "attribute removed: a parent on the path is no longer an object",
            stored_jane(),
            upsert(Some(T1), changed("/workEmail", json!("jane@doe.com"))),
            Exported,
            Some((Reason::Attribute, removed_payload("/workEmail"))),
            Put(Some(T1), changed("/workEmail", json!("jane@doe.com"))),
        ),
        case(
            "subtree: a field inside a mapped object changes; the whole subtree is exported",
            stored_jane(),
            upsert(
                Some(T1),
                changed("/mobilePhone/number", json!("1-408-999-9999")),
            ),
            Exported,
            Some((
                Reason::Attribute,
                changed_payload("/mobilePhone/number", json!("1-408-999-9999")),
            )),
            Put(
                Some(T1),
                changed("/mobilePhone/number", json!("1-408-999-9999")),
            ),
        ),
        case(
            "subtree: a field is added inside a mapped object",
            stored_jane(),
            upsert(Some(T1), changed("/mobilePhone/label", json!("work"))),
            Exported,
            Some((
                Reason::Attribute,
                changed_payload("/mobilePhone/label", json!("work")),
            )),
            Put(Some(T1), changed("/mobilePhone/label", json!("work"))),
        ),
        case(
            "subtree: a field is removed inside a mapped object",
            stored_jane(),
            upsert(Some(T1), removed("/mobilePhone/status")),
            Exported,
            Some((Reason::Attribute, removed_payload("/mobilePhone/status"))),
            Put(Some(T1), removed("/mobilePhone/status")),
        ),
        case(
            "against attribute: an unmapped sibling of a mapped leaf",
            stored_jane(),
            upsert(Some(T1), changed("/person/name/middleName", json!("G"))),
            Unchanged,
            None,
            Put(Some(T1), changed("/person/name/middleName", json!("G"))),
        ),
        case(
            "against attribute: an unmapped field of a mapped object's parent",
            stored_jane(),
            upsert(Some(T1), changed("/workEmail/label", json!("Jane Doe"))),
            Unchanged,
            None,
            Put(Some(T1), changed("/workEmail/label", json!("Jane Doe"))),
        ),
        case(
            "against attribute: an unmapped object removed",
            stored_jane(),
            upsert(Some(T1), removed("/workAddress")),
            Unchanged,
            None,
            Put(Some(T1), removed("/workAddress")),
        ),
        case(
            "against attribute: a member of no mapped segment before or after",
            stored(jane_non_member(), Some(T0)),
            upsert(
                Some(T1),
                edit(jane_non_member(), |p| {
                    set(p, "/person/name/firstName", json!("Janet"))
                }),
            ),
            Unchanged,
            None,
            Put(
                Some(T1),
                edit(jane_non_member(), |p| {
                    set(p, "/person/name/firstName", json!("Janet"))
                }),
            ),
        ),
        case(
            "against attribute: a never-seen non-member",
            None,
            upsert(Some(T1), jane_non_member()),
            Unchanged,
            None,
            Put(Some(T1), jane_non_member()),
        ),
    ]);
}

/// Whichever mapped attribute changed, the payload carries every mapped attribute present.
#[test]
fn every_mapped_attribute_is_exported_whichever_changed() {
    let changes: [(&str, Value); 6] = [
        ("/person/name/firstName", json!("Janet")),
        ("/person/name/lastName", json!("Roe")),
        ("/person/birthDate", json!("1996-01-20")),
        ("/workEmail/address", json!("jane@xyzinc.com")),
        ("/mobilePhone", json!({"number": "1-408-000-0000"})),
        ("/personalEmail/address", json!("jane@doe.com")),
    ];
    let mut cases = Vec::new();
    for (pointer, value) in changes {
        let new = edit(jane(), |p| set(p, pointer, value.clone()));
        cases.push(case(
            format!("only {pointer} changed"),
            stored_jane(),
            upsert(Some(T1), new.clone()),
            Exported,
            Some((
                Reason::Attribute,
                edit(jane_payload(), |p| set(p, pointer, value)),
            )),
            Put(Some(T1), new),
        ));
    }
    run(cases);
}

// ---------------------------------------------------------------------------------------------
// Timestamps
// ---------------------------------------------------------------------------------------------

#[test]
fn timestamp_rules() {
    let janet = edit(jane(), |p| set(p, "/person/name/firstName", json!("Janet")));
    let janet_payload = edit(jane_payload(), |p| {
        set(p, "/person/name/firstName", json!("Janet"))
    });
    let janet_left = edit(janet.clone(), |p| del(p, &ups(SEG_REALIZED)));

    run(vec![
        case(
            "stale: an older timestamp changes nothing, whatever the update",
            stored_jane(),
            upsert(Some("2026-01-01T00:00:04Z"), janet_left.clone()),
            Stale,
            None,
            Keep,
        ),
        case(
            "stale: an older instant written in another offset",
            stored_jane(),
            upsert(Some("2026-01-01T01:00:04+01:00"), janet.clone()),
            Stale,
            None,
            Keep,
        ),
        case(
            "stale: older by a fraction of a second",
            stored(jane(), Some("2026-01-01T00:00:05.500Z")),
            upsert(Some(T0), janet.clone()),
            Stale,
            None,
            Keep,
        ),
        case(
            "stale: a merge",
            stored_jane(),
            merge(
                Some("2025-12-31T23:59:59Z"),
                json!({"person": {"name": {"firstName": "Janet"}}}),
            ),
            Stale,
            None,
            Keep,
        ),
        case(
            "stale: a delete",
            stored_jane(),
            delete(Some("2025-12-31T23:59:59Z")),
            Stale,
            None,
            Keep,
        ),
        case(
            "not stale: a later instant written with a negative offset",
            stored_jane(),
            upsert(Some("2025-12-31T23:00:06-01:00"), janet.clone()),
            Exported,
            Some((Reason::Attribute, janet_payload.clone())),
            Put(Some("2026-01-01T00:00:06Z"), janet.clone()),
        ),
        case(
            "equal timestamp: a resend of the same content is unchanged",
            stored_jane(),
            upsert(Some(T0), jane()),
            Unchanged,
            None,
            Keep,
        ),
        case(
            "equal timestamp: is processed",
            stored_jane(),
            upsert(Some(T0), janet.clone()),
            Exported,
            Some((Reason::Attribute, janet_payload.clone())),
            Put(Some(T0), janet.clone()),
        ),
        case(
            "equal instant in another offset: is processed",
            stored_jane(),
            upsert(Some("2026-01-01T02:00:05+02:00"), janet.clone()),
            Exported,
            Some((Reason::Attribute, janet_payload.clone())),
            Put(Some(T0), janet.clone()),
        ),
        case(
            "no timestamp: never stale, the stored timestamp is kept",
            stored_jane(),
            upsert(None, janet.clone()),
            Exported,
            Some((Reason::Attribute, janet_payload.clone())),
            Put(Some(T0), janet.clone()),
        ),
        case(
            "no timestamp: the same content is unchanged and not rewritten",
            stored_jane(),
            upsert(None, jane()),
            Unchanged,
            None,
            Keep,
        ),
        case(
            "no timestamp on either side",
            stored(jane(), None),
            upsert(None, janet.clone()),
            Exported,
            Some((Reason::Attribute, janet_payload.clone())),
            Put(None, janet.clone()),
        ),
        case(
            "newer timestamp, same content: the timestamp advances, nothing is exported",
            stored_jane(),
            upsert(Some(T1), jane()),
            Unchanged,
            None,
            Put(Some(T1), jane()),
        ),
        case(
            "a timestamp given to a profile stored without one",
            stored(jane(), None),
            upsert(Some("2000-01-01T00:00:00Z"), janet.clone()),
            Exported,
            Some((Reason::Attribute, janet_payload.clone())),
            Put(Some("2000-01-01T00:00:00Z"), janet.clone()),
        ),
    ]);
}

// ---------------------------------------------------------------------------------------------
// Merge patches (RFC 7386)
// ---------------------------------------------------------------------------------------------

#[test]
fn merge_rules() {
    let janet = edit(jane(), |p| set(p, "/person/name/firstName", json!("Janet")));
    let joined_other =
        json!({"status": "realized", "lastQualificationTime": "2026-01-01T00:09:00Z"});

    run(vec![
        case(
            "merge: a nested patch keeps the siblings",
            stored_jane(),
            merge(
                Some(T1),
                json!({"person": {"name": {"firstName": "Janet"}}}),
            ),
            Exported,
            Some((
                Reason::Attribute,
                edit(jane_payload(), |p| {
                    set(p, "/person/name/firstName", json!("Janet"))
                }),
            )),
            Put(Some(T1), janet.clone()),
        ),
        case(
            "merge: null deletes a mapped attribute",
            stored_jane(),
            merge(Some(T1), json!({"person": {"birthDate": null}})),
            Exported,
            Some((
                Reason::Attribute,
                edit(jane_payload(), |p| del(p, "/person/birthDate")),
            )),
            Put(Some(T1), edit(jane(), |p| del(p, "/person/birthDate"))),
        ),
        case(
            "merge: null deletes a mapped segment entry (exit by vanishing)",
            stored_jane(),
            merge(
                Some(T1),
                json!({"segmentMembership": {"ups": {SEG_REALIZED: null}}}),
            ),
            Exported,
            Some((
                Reason::Segment,
                edit(jane_payload(), |p| set(p, &ups(SEG_REALIZED), exited(T1))),
            )),
            Put(Some(T1), edit(jane(), |p| del(p, &ups(SEG_REALIZED)))),
        ),
        case(
            "merge: adds a mapped segment (qualify)",
            stored_jane(),
            merge(
                Some(T1),
                json!({"segmentMembership": {"ups": {SEG_OTHER: joined_other.clone()}}}),
            ),
            Exported,
            Some((
                Reason::Segment,
                edit(jane_payload(), |p| {
                    set(p, &ups(SEG_OTHER), joined_other.clone())
                }),
            )),
            Put(
                Some(T1),
                edit(jane(), |p| set(p, &ups(SEG_OTHER), joined_other.clone())),
            ),
        ),
        case(
            "merge: only the status of a member changes realized -> existing",
            stored_jane(),
            merge(
                Some(T1),
                json!({"segmentMembership": {"ups": {SEG_REALIZED: {"status": "existing"}}}}),
            ),
            Unchanged,
            None,
            Put(
                Some(T1),
                edit(jane(), |p| {
                    set(
                        p,
                        &format!("{}/status", ups(SEG_REALIZED)),
                        json!("existing"),
                    )
                }),
            ),
        ),
        case(
            "merge: an array is replaced as a whole",
            stored_jane(),
            merge(
                Some(T1),
                json!({"identityMap": {"ECID": [{"id": "92312748749128"}]}}),
            ),
            Exported,
            Some((
                Reason::Identity,
                edit(jane_payload(), |p| {
                    set(p, "/identityMap/ECID", json!([{"id": "92312748749128"}]))
                }),
            )),
            Put(
                Some(T1),
                edit(jane(), |p| {
                    set(p, "/identityMap/ECID", json!([{"id": "92312748749128"}]))
                }),
            ),
        ),
        case(
            "merge: null deletes a mapped namespace",
            stored_jane(),
            merge(Some(T1), json!({"identityMap": {"EMAIL": null}})),
            Exported,
            Some((
                Reason::Identity,
                edit(jane_payload(), |p| del(p, "/identityMap/EMAIL")),
            )),
            Put(Some(T1), edit(jane(), |p| del(p, "/identityMap/EMAIL"))),
        ),
        case(
            "against merge: null deletes an unmapped object",
            stored_jane(),
            merge(Some(T1), json!({"workAddress": null})),
            Unchanged,
            None,
            Put(Some(T1), edit(jane(), |p| del(p, "/workAddress"))),
        ),
        case(
            "against merge: a nested unmapped change",
            stored_jane(),
            merge(
                None,
                json!({"person": {"name": {"middleName": "G"}, "gender": null}}),
            ),
            Unchanged,
            None,
            Put(
                Some(T0),
                edit(jane(), |p| {
                    set(p, "/person/name/middleName", json!("G"));
                    del(p, "/person/gender");
                }),
            ),
        ),
        case(
            "against merge: an empty patch",
            stored_jane(),
            merge(None, json!({})),
            Unchanged,
            None,
            Keep,
        ),
        case(
            "against merge: null for a key that is not there",
            stored_jane(),
            merge(
                None,
                json!({"personalEmail": null, "person": {"nickName": null}}),
            ),
            Unchanged,
            None,
            Keep,
        ),
        case(
            "against merge: the same values again",
            stored_jane(),
            merge(
                None,
                json!({
                    "person": {"name": {"firstName": "Jane"}},
                    "mobilePhone": {"status": "active"},
                }),
            ),
            Unchanged,
            None,
            Keep,
        ),
        case(
            "merge into a never-seen profile: the patch (without its nulls) is the profile",
            None,
            merge(
                Some(T1),
                edit(jane(), |p| set(p, "/person/nickName", Value::Null)),
            ),
            Exported,
            Some((Reason::Segment, jane_payload())),
            Put(Some(T1), jane()),
        ),
    ]);
}

// ---------------------------------------------------------------------------------------------
// Delete
// ---------------------------------------------------------------------------------------------

#[test]
fn delete_rules() {
    let gone_at = |t: &str| {
        edit(jane_payload(), |p| {
            set(p, &ups(SEG_EXISTING), exited(t));
            set(p, &ups(SEG_REALIZED), exited(t));
        })
    };
    let old_exit = json!({"status": "exited", "lastQualificationTime": "2025-06-01T00:00:00Z"});

    run(vec![
        case(
            "delete of a member: its last payload with its mapped segments exited at T",
            stored_jane(),
            delete(Some(T1)),
            Deleted,
            Some((Reason::Delete, gone_at(T1))),
            Remove,
        ),
        case(
            "delete of a member: T normalized to UTC seconds",
            stored_jane(),
            delete(Some("2026-01-01T01:10:00.999+01:00")),
            Deleted,
            Some((Reason::Delete, gone_at(T1))),
            Remove,
        ),
        case(
            "delete of a member without timestamp: T is when it was received",
            stored_jane(),
            delete(None),
            Deleted,
            Some((Reason::Delete, gone_at(RECEIVED_SECS))),
            Remove,
        ),
        case(
            "delete with an equal timestamp is processed",
            stored_jane(),
            delete(Some(T0)),
            Deleted,
            Some((Reason::Delete, gone_at(T0))),
            Remove,
        ),
        case(
            "delete of a member of one mapped segment",
            stored(edit(jane(), |p| del(p, &ups(SEG_EXISTING))), Some(T0)),
            delete(Some(T1)),
            Deleted,
            Some((
                Reason::Delete,
                edit(jane_payload(), |p| {
                    del(p, &ups(SEG_EXISTING));
                    set(p, &ups(SEG_REALIZED), exited(T1));
                }),
            )),
            Remove,
        ),
        case(
            "delete of a member with an older exit: that entry is carried as it was",
            stored(
                edit(jane(), |p| set(p, &ups(SEG_OTHER), old_exit.clone())),
                Some(T0),
            ),
            delete(Some(T1)),
            Deleted,
            Some((
                Reason::Delete,
                edit(gone_at(T1), |p| set(p, &ups(SEG_OTHER), old_exit.clone())),
            )),
            Remove,
        ),
        case(
            "delete of a member with identities in an unmapped namespace only",
            stored(
                edit(jane(), |p| p["identityMap"] = json!({"CRM": [{"id": "x"}]})),
                Some(T0),
            ),
            delete(Some(T1)),
            Deleted,
            Some((
                Reason::Delete,
                edit(gone_at(T1), |p| del(p, "/identityMap")),
            )),
            Remove,
        ),
        case(
            "delete of a non-member: forgotten, no export",
            stored(jane_non_member(), Some(T0)),
            delete(Some(T1)),
            Deleted,
            None,
            Remove,
        ),
        case(
            "delete of a profile whose mapped segments are all exited: no export",
            stored(
                edit(jane(), |p| {
                    set(p, &ups(SEG_EXISTING), old_exit.clone());
                    set(p, &ups(SEG_REALIZED), old_exit.clone());
                }),
                Some(T0),
            ),
            delete(None),
            Deleted,
            None,
            Remove,
        ),
        case(
            "delete of an unknown profile: unchanged",
            None,
            delete(Some(T1)),
            Unchanged,
            None,
            Keep,
        ),
        case(
            "delete of an unknown profile without timestamp: unchanged",
            None,
            delete(None),
            Unchanged,
            None,
            Keep,
        ),
    ]);
}

// ---------------------------------------------------------------------------------------------
// Resends and the order of reasons
// ---------------------------------------------------------------------------------------------

#[test]
fn resend_and_precedence_rules() {
    let extra = json!({"id": "1233ce17-20e0-4a2c-8198-2a77fd60cf4d"});
    let with_identity = |p: &mut Value| {
        p["identityMap"]["EMAIL"]
            .as_array_mut()
            .unwrap()
            .push(extra.clone())
    };
    let with_attribute = |p: &mut Value| set(p, "/person/name/lastName", json!("Roe"));
    let lost_realized = |p: &mut Value| del(p, &ups(SEG_REALIZED));

    let all_three = edit(jane(), |p| {
        lost_realized(p);
        with_identity(p);
        with_attribute(p);
    });
    let identity_and_attribute = edit(jane(), |p| {
        with_identity(p);
        with_attribute(p);
    });
    let identity_attribute_unmapped = edit(identity_and_attribute.clone(), |p| {
        del(p, &ups(SEG_UNMAPPED))
    });
    let both_payload = edit(jane_payload(), |p| {
        with_identity(p);
        with_attribute(p);
    });

    run(vec![
        case(
            "resend: the identical profile without timestamp",
            stored_jane(),
            upsert(None, jane()),
            Unchanged,
            None,
            Keep,
        ),
        case(
            "resend: the identical profile with the same timestamp",
            stored_jane(),
            upsert(Some(T0), jane()),
            Unchanged,
            None,
            Keep,
        ),
        case(
            "resend: the identical non-member profile",
            stored(jane_non_member(), None),
            upsert(None, jane_non_member()),
            Unchanged,
            None,
            Keep,
        ),
        case(
            "resend: the identical profile as a merge of itself",
            stored_jane(),
            merge(Some(T0), jane()),
            Unchanged,
            None,
            Keep,
        ),
        case(
            "precedence: segment beats identity and attribute",
            stored_jane(),
            upsert(Some(T1), all_three.clone()),
            Exported,
            Some((
                Reason::Segment,
                edit(both_payload.clone(), |p| {
                    set(p, &ups(SEG_REALIZED), exited(T1))
                }),
            )),
            Put(Some(T1), all_three.clone()),
        ),
        case(
            "precedence: qualifying beats identity and attribute",
            stored(all_three.clone(), Some(T0)),
            upsert(Some(T1), jane()),
            Exported,
            Some((Reason::Segment, jane_payload())),
            Put(Some(T1), jane()),
        ),
        case(
            "precedence: identity beats attribute",
            stored_jane(),
            upsert(Some(T1), identity_and_attribute.clone()),
            Exported,
            Some((Reason::Identity, both_payload.clone())),
            Put(Some(T1), identity_and_attribute.clone()),
        ),
        case(
            "precedence: an unmapped segment change does not count",
            stored_jane(),
            upsert(Some(T1), identity_attribute_unmapped.clone()),
            Exported,
            Some((Reason::Identity, both_payload.clone())),
            Put(Some(T1), identity_attribute_unmapped.clone()),
        ),
        case(
            "precedence: an unmapped namespace change does not count",
            stored_jane(),
            upsert(
                Some(T1),
                edit(jane(), |p| {
                    set(p, "/identityMap/CRM", json!([]));
                    with_attribute(p);
                }),
            ),
            Exported,
            Some((Reason::Attribute, edit(jane_payload(), with_attribute))),
            Put(
                Some(T1),
                edit(jane(), |p| {
                    set(p, "/identityMap/CRM", json!([]));
                    with_attribute(p);
                }),
            ),
        ),
        case(
            "precedence: with identities empty, an identity change beats attribute",
            stored_jane(),
            upsert(
                Some(T1),
                edit(jane(), |p| {
                    set(p, "/identityMap/CRM", json!([]));
                    with_attribute(p);
                }),
            ),
            Exported,
            Some((Reason::Identity, edit(jane_payload(), with_attribute))),
            Put(
                Some(T1),
                edit(jane(), |p| {
                    set(p, "/identityMap/CRM", json!([]));
                    with_attribute(p);
                }),
            ),
        )
        .with_mapping(mapping_all_namespaces()),
    ]);
}

/// A profile's history, each update judged against what the one before stored.
#[test]
fn a_history_of_updates() {
    let steps: Vec<(&str, String, UpdateResult, Option<Reason>)> = vec![
        (
            "qualifies",
            upsert(Some("2026-01-01T00:00:01Z"), jane()),
            Exported,
            Some(Reason::Segment),
        ),
        (
            "resent",
            upsert(Some("2026-01-01T00:00:01Z"), jane()),
            Unchanged,
            None,
        ),
        (
            "renamed",
            merge(
                Some("2026-01-01T00:00:02Z"),
                json!({"person": {"name": {"lastName": "Roe"}}}),
            ),
            Exported,
            Some(Reason::Attribute),
        ),
        (
            "late rename is stale",
            merge(
                Some("2026-01-01T00:00:01Z"),
                json!({"person": {"name": {"lastName": "Late"}}}),
            ),
            Stale,
            None,
        ),
        (
            "leaves one segment",
            merge(
                None,
                json!({"segmentMembership": {"ups": {SEG_REALIZED: null}}}),
            ),
            Exported,
            Some(Reason::Segment),
        ),
        (
            "leaves the other",
            merge(
                Some("2026-01-01T00:00:03Z"),
                json!({"segmentMembership": {"ups": {SEG_EXISTING: {"status": "exited"}}}}),
            ),
            Exported,
            Some(Reason::Segment),
        ),
        (
            "renamed as a non-member",
            merge(
                Some("2026-01-01T00:00:04Z"),
                json!({"person": {"name": {"lastName": "Poe"}}}),
            ),
            Unchanged,
            None,
        ),
        (
            "deleted as a non-member",
            delete(Some("2026-01-01T00:00:05Z")),
            Deleted,
            None,
        ),
        (
            "deleted again",
            delete(Some("2026-01-01T00:00:06Z")),
            Unchanged,
            None,
        ),
    ];
    let mut stored: Option<StoredProfile> = None;
    for (name, text, result, reason) in steps {
        let applied = apply(
            stored.as_ref(),
            &parse_one(&text),
            &mapping(),
            time(RECEIVED),
        );
        assert_eq!(applied.result, result, "{name}");
        assert_eq!(
            applied.export.as_ref().map(|(r, _)| *r),
            reason,
            "{name}: {applied:?}"
        );
        match applied.store {
            StoreAction::Keep => {}
            StoreAction::Remove => stored = None,
            StoreAction::Put(new) => stored = Some(new),
        }
        if name == "renamed as a non-member" {
            let profile = &stored.as_ref().expect("stored").profile;
            assert_eq!(profile["person"]["name"]["lastName"], "Poe");
            assert_eq!(
                stored.as_ref().unwrap().timestamp,
                Some(time("2026-01-01T00:00:04Z"))
            );
            // The merge kept the exited entry's other fields (RFC 7386 merges objects).
            assert_eq!(
                profile.pointer(&format!("{}/version", ups(SEG_EXISTING))),
                Some(&json!("15"))
            );
        }
    }
    assert_eq!(stored, None);
}
