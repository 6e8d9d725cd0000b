//! Parsing an update with the store's `KeepTree` (the profile pruned as it is read, the rest
//! never built) against parsing it whole and pruning it after: random update lines with nested
//! keys, keys written with escapes, and bad JSON tokens placed in kept and in dropped parts
//! must be accepted or refused alike, with the same message, and kept alike (but for the shape
//! of a namespace the mapping drops, which is never read). A key given twice in one object is
//! refused where it is read: anywhere when parsing whole, only in what is kept when pruning.

use outpost::config::Mapping;
use outpost::profile::engine;
use outpost::profile::layout::Layout;
use outpost::profile::prune::KeepTree;
use outpost::profile::update::{
    update_from_json, update_from_json_with, InputError, Parsing, Update,
};
use outpost::profile::Op;
use proptest::prelude::*;
use serde_json::{Map, Value};

/// A JSON document as text, built so that it can hold what a `Value` cannot: repeated keys
/// and tokens serde_json refuses.
#[derive(Debug, Clone)]
enum Doc {
    Token(&'static str),
    Array(Vec<Doc>),
    Object(Vec<(&'static str, Doc)>),
}

impl Doc {
    /// The document with each object's later entries of a key it has already (as the key
    /// reads, escapes undone) left out.
    fn without_repeats(self) -> Doc {
        match self {
            Doc::Token(_) => self,
            Doc::Array(items) => Doc::Array(items.into_iter().map(Doc::without_repeats).collect()),
            Doc::Object(entries) => {
                let mut seen = std::collections::HashSet::new();
                Doc::Object(
                    entries
                        .into_iter()
                        .filter(|(key, _)| {
                            seen.insert(serde_json::from_str::<String>(key).unwrap())
                        })
                        .map(|(key, value)| (key, value.without_repeats()))
                        .collect(),
                )
            }
        }
    }

    fn render(&self, out: &mut String) {
        match self {
            Doc::Token(token) => out.push_str(token),
            Doc::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.render(out);
                }
                out.push(']');
            }
            Doc::Object(entries) => {
                out.push('{');
                for (i, (key, value)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(key);
                    out.push(':');
                    value.render(out);
                }
                out.push('}');
            }
        }
    }
}

const GOOD_TOKENS: &[&str] = &[
    "null",
    "true",
    "1",
    "-2.5e3",
    "18446744073709551615",
    r#""text""#,
    r#""\u00e9\n""#,
    r#""\ud83d\ude00""#,
];

/// Tokens serde_json refuses when it parses a `Value`: a number out of range, a lone
/// surrogate, a bad escape, a leading zero, a control character in a string.
const BAD_TOKENS: &[&str] = &["1e400", r#""\ud800""#, r#""\x""#, "01", "\"a\u{1}b\""];

/// Keys as written in the text: the mapped ones (also through escapes) and others.
const KEYS: &[&str] = &[
    r#""person""#,
    r#""name""#,
    r#""n\u0061me""#,
    r#""firstName""#,
    r#""lastName""#,
    r#""mobilePhone""#,
    r#""segmentMembership""#,
    r#""ups""#,
    r#""s1""#,
    r#""s2""#,
    r#""identityMap""#,
    r#""ecid""#,
    r#""crmid""#,
    r#""other""#,
];

fn doc(bad_tokens: bool) -> impl Strategy<Value = Doc> {
    let mut tokens: Vec<&'static str> = GOOD_TOKENS.to_vec();
    if bad_tokens {
        tokens.extend(BAD_TOKENS);
    }
    let leaf = proptest::sample::select(tokens).prop_map(Doc::Token);
    leaf.prop_recursive(5, 48, 5, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Doc::Array),
            proptest::collection::vec((proptest::sample::select(KEYS), inner), 0..5)
                .prop_map(Doc::Object),
        ]
    })
}

fn profile(bad_tokens: bool) -> impl Strategy<Value = Doc> {
    proptest::collection::vec((proptest::sample::select(KEYS), doc(bad_tokens)), 0..6)
        .prop_map(Doc::Object)
}

fn line_of(profile: &Doc) -> String {
    let mut line = String::from(r#"{"id":"p-1","op":"merge","profile":"#);
    profile.render(&mut line);
    line.push('}');
    line
}

fn mappings() -> [Mapping; 2] {
    [
        Mapping::new(
            &["person.name.firstName", "mobilePhone"],
            &["s1"],
            &["ecid"],
        ),
        Mapping::new(&["person", "person.name"], &["s2"], &[]),
    ]
}

/// Parsing that keeps what `keep` keeps, with no limit on timestamps.
fn pruning(keep: &KeepTree) -> Parsing<'_> {
    Parsing {
        limit: None,
        keep: Some(keep),
        layout: None,
    }
}

/// Parsing `line` as read against parsing it whole: `without_repeats` is the line with each
/// object's repeated keys left out but the first; `bad_tokens`: the line may hold tokens
/// serde_json refuses.
fn assert_same(line: &str, without_repeats: &str, bad_tokens: bool) {
    for mapping in mappings() {
        let keep = KeepTree::for_mapping(&mapping);
        let parsing = pruning(&keep);
        let pruned_after = |line: &str| {
            update_from_json(line.as_bytes(), 1).map(|mut update| {
                keep.prune(&mut update.profile);
                update
            })
        };
        compare(
            update_from_json_with(line.as_bytes(), 1, &parsing),
            pruned_after(line),
            || pruned_after(without_repeats),
            (line, bad_tokens),
            &mapping,
        );
        // As the committer parses: an upsert is made its record as it is read.
        let upsert = |line: &str| line.replacen(r#""op":"merge""#, r#""op":"upsert""#, 1);
        let layout = Layout::new(&mapping);
        let preparing = Parsing {
            layout: Some(&layout),
            ..parsing
        };
        let prepared_after = |line: &str| {
            update_from_json(upsert(line).as_bytes(), 1).map(|mut update| {
                engine::prepare(&mut update, &layout);
                update
            })
        };
        compare(
            update_from_json_with(upsert(line).as_bytes(), 1, &preparing),
            prepared_after(line),
            || prepared_after(without_repeats),
            (&upsert(line), bad_tokens),
            &mapping,
        );
    }
}

/// A line parsed as read against parsed whole: alike, but for a key given twice where pruning
/// drops it, which is never read (the line then reads as it does without its repeats,
/// `whole_without_repeats`), and the shape of a dropped namespace.
fn compare(
    as_read: Result<Update, InputError>,
    whole: Result<Update, InputError>,
    whole_without_repeats: impl FnOnce() -> Result<Update, InputError>,
    (line, bad_tokens): (&str, bool),
    mapping: &Mapping,
) {
    if given_twice(&as_read) {
        assert!(given_twice(&whole), "{line}: {whole:?}");
        return;
    }
    let whole = match given_twice(&whole) {
        // Refused for a bad token the repeats left out may have held: nothing to compare it
        // with.
        true if as_read.is_err() && bad_tokens => return,
        true => whole_without_repeats(),
        false => whole,
    };
    if !shape_error_in_a_dropped_namespace(&as_read, &whole, mapping) {
        assert_eq!(as_read, whole, "{line}");
    }
}

/// Whether `parsed` was refused for a key given twice in one object.
fn given_twice(parsed: &Result<Update, InputError>) -> bool {
    matches!(parsed, Err(e) if e.reason.contains("is given twice in one object"))
}

/// The other way the two may differ: the shape of identities is checked on what parsing kept,
/// and a pruning parse drops a namespace the mapping does not export unread, so where parsing
/// whole names such a namespace, parsing as read accepts or names another.
fn shape_error_in_a_dropped_namespace(
    as_read: &Result<Update, InputError>,
    whole: &Result<Update, InputError>,
    mapping: &Mapping,
) -> bool {
    let Err(error) = whole else {
        return false;
    };
    // Accepted, or refused for a shape it did read.
    if matches!(as_read, Err(e) if !e.reason.starts_with("`profile.")) {
        return false;
    }
    let Some(rest) = error.reason.strip_prefix("`profile.identityMap.") else {
        return false;
    };
    let namespace = rest.split(['`', '[']).next().unwrap_or_default();
    !mapping.identities.is_empty() && !mapping.identities.iter().any(|n| n == namespace)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn valid_profiles_are_kept_alike(profile in profile(false), repeats in any::<bool>()) {
        let without_repeats = line_of(&profile.clone().without_repeats());
        let line = if repeats { line_of(&profile) } else { without_repeats.clone() };
        // Valid JSON is refused only for the shape of memberships or identities (`shape`), or
        // a key given twice.
        let whole = update_from_json(line.as_bytes(), 1);
        if let (Err(e), false) = (&whole, given_twice(&whole)) {
            assert!(e.reason.starts_with("`profile."), "{line}: {e}");
        }
        if !repeats {
            assert!(!given_twice(&whole), "{line}");
        }
        assert_same(&line, &without_repeats, false);
    }

    #[test]
    fn profiles_with_bad_tokens_are_refused_alike(
        profile in profile(true),
        repeats in any::<bool>(),
    ) {
        let without_repeats = line_of(&profile.clone().without_repeats());
        let line = if repeats { line_of(&profile) } else { without_repeats.clone() };
        assert_same(&line, &without_repeats, true);
    }
}

#[test]
fn a_bad_token_in_a_dropped_part_is_refused_as_in_a_kept_one() {
    let keep = KeepTree::for_mapping(&mappings()[0]);
    let parsing = pruning(&keep);
    for token in BAD_TOKENS {
        let line = format!(r#"{{"id":"p-1","profile":{{"other":{{"x":[{token}]}}}}}}"#);
        let error = update_from_json_with(line.as_bytes(), 3, &parsing).unwrap_err();
        assert_eq!(error.line, 3);
        // A number beyond a double is JSON serde_json does not read, and said so.
        assert!(
            error.reason.starts_with("not valid JSON")
                || error
                    .reason
                    .starts_with("a number is beyond what a double holds"),
            "{token}: {error}"
        );
    }
    // What is kept: a key written with an escape is the key it spells.
    let line =
        r#"{"id":"p-1","profile":{"person":{"n\u0061me":{"firstName":"Jane","x":1},"y":2},"z":3}}"#;
    let update = update_from_json_with(line.as_bytes(), 1, &parsing).unwrap();
    assert_eq!(
        serde_json::Value::Object(update.profile),
        serde_json::json!({"person": {"name": {"firstName": "Jane"}}})
    );
}

/// The update's fields as serde's derive reads them: the reference for the hand-written reader.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct DerivedUpdate {
    id: String,
    #[serde(default)]
    op: Option<Op>,
    #[serde(default)]
    profile: Option<Map<String, Value>>,
    #[serde(default)]
    timestamp: Option<String>,
}

#[test]
fn the_top_level_fields_are_refused_as_serde_derive_refuses_them() {
    let keep = KeepTree::for_mapping(&mappings()[0]);
    let parsing = pruning(&keep);
    for line in [
        r#"{"id":"a","id":"b","profile":{}}"#,
        r#"{"id":"a","profile":{},"profile":{}}"#,
        r#"{"id":"a","op":"merge","op":"merge","profile":{}}"#,
        r#"{"id":"a","timestamp":null,"timestamp":null,"profile":{}}"#,
        r#"{"profile":{}}"#,
        r#"{"id":"a","profile":{},"extra":1}"#,
        r#"{"id":"a","profile":{}} x"#,
    ] {
        let derived = serde_json::from_str::<DerivedUpdate>(line).unwrap_err();
        let derived = derived.to_string();
        let derived = &derived[..derived.rfind(" at line ").unwrap()];
        for parsing in [&parsing, &Parsing::default()] {
            let error = update_from_json_with(line.as_bytes(), 1, parsing).unwrap_err();
            assert!(
                error.reason.ends_with(derived),
                "{line}: {error} / {derived}"
            );
        }
    }
    // A field of the wrong type or an unknown `op` is named, which serde's message does not do;
    // so is a profile key with an `xdm:` prefix, which pruning would otherwise drop unread.
    for (line, reason) in [
        (
            r#"{"id":"a","op":"replace","profile":{}}"#,
            "`op` must be one of `upsert`, `merge`, `delete`, not `replace`",
        ),
        (
            r#"{"id":5,"profile":{}}"#,
            "`id` must be a string, not a number",
        ),
        (
            r#"{"id":"a","profile":"text"}"#,
            "`profile` must be an object, not a string",
        ),
        (
            r#"{"id":"a","profile":[1]}"#,
            "`profile` must be an object, not an array",
        ),
        (
            r#"{"id":"a","timestamp":5,"profile":{}}"#,
            "`timestamp` must be a string, not a number",
        ),
        (
            r#"{"id":"a","op":{"delete":null}}"#,
            "`op` must be a string, not an object",
        ),
        (
            r#"{"id":"a","op":["merge"],"profile":{}}"#,
            "`op` must be a string, not an array",
        ),
        (
            r#"{"id":"a","profile":{"xdm:identityMap":{"ecid":[{"id":"1"}]}}}"#,
            "`profile.xdm:identityMap`: profiles are taken without `xdm:` prefixes (`identityMap`)",
        ),
        (
            r#"{"id":"a","profile":{"segmentMembership":{"xdm:ups":{"s1":{"status":"realized"}}}}}"#,
            "`profile.segmentMembership.xdm:ups`: profiles are taken without `xdm:` prefixes (`ups`)",
        ),
        (
            r#"{"id":"a","op":"delete","profile":{"xdm:x":1}}"#,
            "`profile.xdm:x`: profiles are taken without `xdm:` prefixes (`x`)",
        ),
    ] {
        for parsing in [&parsing, &Parsing::default()] {
            let error = update_from_json_with(line.as_bytes(), 1, parsing).unwrap_err();
            assert_eq!(error.reason, reason, "{line}");
        }
    }
    for line in [
        r#"{"id":"a","op":"delete","profile":null}"#,
        r#"{"id":"a","op":null,"profile":{"person":1}}"#,
        r#"{"id":"a","timestamp":null,"profile":{}}"#,
    ] {
        let derived = serde_json::from_str::<DerivedUpdate>(line).unwrap();
        let update = update_from_json_with(line.as_bytes(), 1, &parsing).unwrap();
        assert_eq!(update.id, derived.id);
        assert_eq!(update.op, derived.op.unwrap_or(Op::Upsert));
        let mut profile = derived.profile.unwrap_or_default();
        keep.prune(&mut profile);
        assert_eq!(update.profile, profile);
    }
    // serde's derive would read an array as the fields in order; an update is an object.
    let error = update_from_json_with(br#"["a","upsert",{}]"#, 1, &parsing).unwrap_err();
    assert_eq!(
        error.reason,
        "an update must be a JSON object, not an array"
    );
}
