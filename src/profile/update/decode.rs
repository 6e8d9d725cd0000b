//! One update from its JSON text or an already parsed value: serde reads the fields (pruning
//! the profile as it reads, when [`Parsing::keep`] is given), then [`validate`] checks what
//! they hold. Refusals name the field and the reason, on the line the caller gives.

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::time::parse_timestamp;
use super::{quoted_ends, InputError, Op, Parsing, Update, MAX_ID_BYTES};
use crate::profile::engine;
use crate::profile::numbers;
use crate::profile::prune::{Allowance, KeepTree, PrunedObject, WeighedObject};
use crate::profile::shape;

/// An update's fields as given, before [`validate`].
struct RawUpdate {
    id: String,
    op: Option<Op>,
    profile: Option<Map<String, Value>>,
    timestamp: Option<String>,
}

const FIELDS: &[&str] = &["id", "op", "profile", "timestamp"];

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Field {
    Id,
    Op,
    Profile,
    Timestamp,
}

/// Reads a [`RawUpdate`], its profile pruned as it is read when `keep` is given. Written out
/// rather than derived only to carry the tree; every error is serde's own (unknown, repeated
/// and missing fields, wrong types), worded as the derived code words it.
struct RawUpdateSeed<'a> {
    keep: Option<&'a KeepTree>,
}

impl<'de> DeserializeSeed<'de> for RawUpdateSeed<'_> {
    type Value = RawUpdate;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<RawUpdate, D::Error> {
        deserializer.deserialize_struct("RawUpdate", FIELDS, self)
    }
}

impl<'de> Visitor<'de> for RawUpdateSeed<'_> {
    type Value = RawUpdate;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("struct RawUpdate")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawUpdate, A::Error> {
        /// A field given twice is refused before its second value is read, as serde's derived
        /// code refuses it: an ill-typed update is then refused at its first ill-typed field.
        fn vacant<T, E: de::Error>(slot: &Option<T>, name: &'static str) -> Result<(), E> {
            match slot {
                Some(_) => Err(E::duplicate_field(name)),
                None => Ok(()),
            }
        }
        let (mut id, mut op, mut profile, mut timestamp) = (None, None, None, None);
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Id => {
                    vacant(&id, "id")?;
                    id = Some(map.next_value::<String>()?);
                }
                Field::Op => {
                    vacant(&op, "op")?;
                    op = Some(map.next_value::<Option<OpName>>()?.map(|name| name.0));
                }
                Field::Profile => {
                    vacant(&profile, "profile")?;
                    let left = std::cell::Cell::new(0);
                    let allowance = Allowance::of_a_profile(&left);
                    profile = Some(map.next_value_seed(OptionalPruned {
                        keep: self.keep,
                        allowance,
                    })?);
                }
                Field::Timestamp => {
                    vacant(&timestamp, "timestamp")?;
                    timestamp = Some(map.next_value::<Option<String>>()?);
                }
            }
        }
        Ok(RawUpdate {
            id: id.ok_or_else(|| de::Error::missing_field("id"))?,
            op: op.flatten(),
            profile: profile.flatten(),
            timestamp: timestamp.flatten(),
        })
    }
}

/// `op` given as its name, and only so: serde's derived enum would also take an object such as
/// `{"delete": null}`.
struct OpName(Op);

impl<'de> Deserialize<'de> for OpName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(OpNameVisitor)
    }
}

struct OpNameVisitor;

impl Visitor<'_> for OpNameVisitor {
    type Value = OpName;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("one of `upsert`, `merge`, `delete`")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<OpName, E> {
        match name {
            "upsert" => Ok(OpName(Op::Upsert)),
            "merge" => Ok(OpName(Op::Merge)),
            "delete" => Ok(OpName(Op::Delete)),
            other => Err(E::custom(format_args!(
                "`op` must be one of `upsert`, `merge`, `delete`, not `{}`",
                quoted_ends(other)
            ))),
        }
    }
}

/// `Option<Map>` (null is no profile), pruned when `keep` is given.
struct OptionalPruned<'a> {
    keep: Option<&'a KeepTree>,
    allowance: Allowance<'a>,
}

impl<'de> DeserializeSeed<'de> for OptionalPruned<'_> {
    type Value = Option<Map<String, Value>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for OptionalPruned<'_> {
    type Value = Option<Map<String, Value>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("option")
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        match self.keep {
            Some(keep) => PrunedObject {
                keep,
                prefixes_at: Some(""),
                allowance: self.allowance,
            }
            .deserialize(deserializer),
            None => WeighedObject(self.allowance).deserialize(deserializer),
        }
        .map(Some)
    }
}

/// What is wrong with input serde_json refuses though it is JSON (a number beyond a double,
/// nesting past its limit), in words that do not call it "not valid JSON".
pub(super) fn beyond_what_is_read(e: &serde_json::Error) -> Option<&'static str> {
    let message = e.to_string();
    if message.starts_with("number out of range") {
        Some(
            "a number is beyond what a double holds (about ±1.8e308), so it cannot be kept: \
             send it as a string",
        )
    } else if message.starts_with("recursion limit exceeded") {
        Some("arrays and objects are nested more than 128 deep, more than outpost reads")
    } else {
        None
    }
}

pub(super) fn strip_serde_position(message: String) -> String {
    // serde_json appends " at line L column C"; the caller names the line itself.
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message,
    }
}

/// Parses and validates one update from its JSON text. Parsing straight into the update's
/// fields (not through a `Value`) also refuses a field given twice.
pub fn update_from_json(text: &[u8], line: u64) -> Result<Update, InputError> {
    update_from_json_with(text, line, &Parsing::default())
}

/// [`update_from_json`] with [`Parsing`]'s checks and pruning (one message of a stream, say).
pub fn update_from_json_with(
    text: &[u8],
    line: u64,
    parsing: &Parsing,
) -> Result<Update, InputError> {
    let seed = RawUpdateSeed { keep: parsing.keep };
    let mut deserializer = serde_json::Deserializer::from_slice(text);
    let parsed = seed
        .deserialize(&mut deserializer)
        .and_then(|raw| deserializer.end().map(|()| raw));
    match parsed {
        Ok(raw) => {
            if let (Some(profile), false) = (&raw.profile, raw.op == Some(Op::Delete)) {
                if let Some((path, literal)) = numbers::inexact_integer(profile, text) {
                    return Err(InputError::new(
                        line,
                        format!(
                            "`profile.{path}` is the integer {}, beyond the 64-bit range outpost keeps exactly (XDM integers stay within ±2^53); it would be stored and sent altered, so the update is refused: send it as a string",
                            quoted_ends(&literal)
                        ),
                    ));
                }
            }
            validate(raw, line, parsing)
        }
        Err(e) => {
            // serde_json's words for either are of a JSON token.
            if is_gzip(text) {
                return Err(InputError::new(line, GZIP_DATA));
            }
            if not_utf8_before(text, &e) {
                return Err(InputError::new(line, NOT_UTF8));
            }
            // Judged by its first byte, so that a deeply nested array is not parsed again.
            let kind = match text.trim_ascii_start().first() {
                Some(b'[') => Some("an array"),
                Some(b'"') => Some("a string"),
                Some(b't' | b'f') => Some("a boolean"),
                Some(b'n') => Some("null"),
                Some(b'-' | b'0'..=b'9') => Some("a number"),
                _ => None,
            };
            if let (Some(kind), false) = (kind, e.is_syntax() || e.is_eof()) {
                return Err(InputError::new(
                    line,
                    format!("an update must be a JSON object, not {kind}"),
                ));
            }
            // serde reports type errors without the field, so the update's fields are read
            // again for their kinds alone (nothing of their values is built, so a bad line of
            // megabytes costs no more memory than its text) to name the ill-typed one.
            if !e.is_eof() {
                if let Ok(TopLevelKinds(kinds)) = serde_json::from_slice(text) {
                    let kind_of =
                        |name: &str| kinds.iter().find(|(n, _)| *n == name).map(|(_, k)| *k);
                    if let Some(reason) = ill_typed_field(kind_of) {
                        return Err(InputError::new(line, reason));
                    }
                }
            }
            if let Some(reason) = beyond_what_is_read(&e) {
                return Err(InputError::new(line, reason));
            }
            let prefix = if e.is_syntax() || e.is_eof() {
                "not valid JSON: "
            } else {
                ""
            };
            Err(InputError::new(
                line,
                format!("{prefix}{}", strip_serde_position(e.to_string())),
            ))
        }
    }
}

/// Said of input that begins as gzip data does, rather than as JSON.
pub(super) const GZIP_DATA: &str =
    "this is gzip-compressed data, not JSON: over HTTP, send it with \
     `Content-Encoding: gzip`; to `outpost ingest`, give it decompressed \
     (`zcat FILE | outpost ingest -`)";

/// Whether `text` begins as gzip data does (no JSON text begins with these bytes).
pub(super) fn is_gzip(text: &[u8]) -> bool {
    text.starts_with(&[0x1f, 0x8b])
}

/// Said of input that holds bytes that are not UTF-8 where serde_json stopped reading it.
pub(super) const NOT_UTF8: &str = "not UTF-8: it holds bytes that are not a UTF-8 character";

/// Whether `text`, which serde_json refused with `e`, holds bytes that are not UTF-8 up to
/// where it stopped: then that, rather than the JSON token serde_json names, is what is wrong.
/// serde_json's column may point into a character that is UTF-8 but not JSON (`“`, a byte
/// order mark), so the text is checked a character's length further.
pub(super) fn not_utf8_before(text: &[u8], e: &serde_json::Error) -> bool {
    let line_start = match e.line() {
        0 | 1 => 0,
        line => text
            .iter()
            .enumerate()
            .filter(|(_, &b)| b == b'\n')
            .nth(line - 2)
            .map_or(text.len(), |(at, _)| at + 1),
    };
    let end = line_start.saturating_add(e.column()).min(text.len());
    let checked_to = end.saturating_add(4).min(text.len());
    match std::str::from_utf8(&text[..checked_to]) {
        Ok(_) => false,
        // A character cut off by `checked_to` is whole, unless the text ends there.
        Err(bad) => {
            bad.valid_up_to() < end && (bad.error_len().is_some() || checked_to == text.len())
        }
    }
}

/// Validates one update already parsed as JSON.
pub fn update_from_value(value: Value, line: u64) -> Result<Update, InputError> {
    update_from_value_with(value, line, &Parsing::default())
}

/// [`update_from_value`] with [`Parsing`]'s checks and pruning.
pub fn update_from_value_with(
    value: Value,
    line: u64,
    parsing: &Parsing,
) -> Result<Update, InputError> {
    if !value.is_object() {
        return Err(InputError::new(
            line,
            format!("an update must be a JSON object, not {}", json_kind(&value)),
        ));
    }
    let kind_of = |name: &str| value.get(name).map(JsonKind::of);
    if let Some(reason) = ill_typed_field(kind_of) {
        return Err(InputError::new(line, reason));
    }
    let raw = RawUpdateSeed { keep: parsing.keep }
        .deserialize(value)
        .map_err(|e| InputError::new(line, strip_serde_position(e.to_string())))?;
    validate(raw, line, parsing)
}

/// The first of the update's fields that has the wrong JSON type, named (serde's own message
/// does not say which field it was reading), from the kind of each field given.
fn ill_typed_field(kind_of: impl Fn(&str) -> Option<JsonKind>) -> Option<String> {
    ["id", "op", "profile", "timestamp"]
        .into_iter()
        .find_map(|name| {
            let kind = kind_of(name)?;
            let expected = match (name, kind) {
                ("id", JsonKind::String) => return None,
                (_, JsonKind::Null) if name != "id" => return None,
                ("op" | "timestamp", JsonKind::String) | ("profile", JsonKind::Object) => {
                    return None
                }
                ("profile", _) => "an object",
                _ => "a string",
            };
            Some(format!(
                "`{name}` must be {expected}, not {}",
                kind.described()
            ))
        })
}

/// What a JSON value is, without its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JsonKind {
    Null,
    Boolean,
    Number,
    String,
    Array,
    Object,
}

impl JsonKind {
    pub(crate) fn of(value: &Value) -> JsonKind {
        match value {
            Value::Null => JsonKind::Null,
            Value::Bool(_) => JsonKind::Boolean,
            Value::Number(_) => JsonKind::Number,
            Value::String(_) => JsonKind::String,
            Value::Array(_) => JsonKind::Array,
            Value::Object(_) => JsonKind::Object,
        }
    }

    /// As error messages say it ("a number").
    pub(crate) fn described(self) -> &'static str {
        match self {
            JsonKind::Null => "null",
            JsonKind::Boolean => "a boolean",
            JsonKind::Number => "a number",
            JsonKind::String => "a string",
            JsonKind::Array => "an array",
            JsonKind::Object => "an object",
        }
    }
}

/// Reads a value's kind and passes over its content without keeping any of it.
impl<'de> Deserialize<'de> for JsonKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KindVisitor;
        impl<'de> Visitor<'de> for KindVisitor {
            type Value = JsonKind;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> Result<JsonKind, E> {
                Ok(JsonKind::Null)
            }
            fn visit_bool<E>(self, _: bool) -> Result<JsonKind, E> {
                Ok(JsonKind::Boolean)
            }
            fn visit_i64<E>(self, _: i64) -> Result<JsonKind, E> {
                Ok(JsonKind::Number)
            }
            fn visit_u64<E>(self, _: u64) -> Result<JsonKind, E> {
                Ok(JsonKind::Number)
            }
            fn visit_f64<E>(self, _: f64) -> Result<JsonKind, E> {
                Ok(JsonKind::Number)
            }
            fn visit_str<E>(self, _: &str) -> Result<JsonKind, E> {
                Ok(JsonKind::String)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<JsonKind, A::Error> {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(JsonKind::Array)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonKind, A::Error> {
                while map
                    .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(JsonKind::Object)
            }
        }
        deserializer.deserialize_any(KindVisitor)
    }
}

/// The update's own fields ([`FIELDS`]) with the kind of their value, the first of a field
/// given twice (the one serde refuses the update at: a type it does not take, or else the
/// duplicate); no other field's name or value is kept.
struct TopLevelKinds(Vec<(&'static str, JsonKind)>);

/// A field's name if it is one of the update's own ([`FIELDS`]), read without copying it.
struct KnownField(Option<&'static str>);

impl<'de> Deserialize<'de> for KnownField {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl Visitor<'_> for NameVisitor {
            type Value = KnownField;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E>(self, name: &str) -> Result<KnownField, E> {
                Ok(KnownField(
                    FIELDS.iter().copied().find(|&known| known == name),
                ))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

impl<'de> Deserialize<'de> for TopLevelKinds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = TopLevelKinds;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TopLevelKinds, A::Error> {
                let mut fields: Vec<(&'static str, JsonKind)> = Vec::new();
                while let Some((KnownField(name), kind)) =
                    map.next_entry::<KnownField, JsonKind>()?
                {
                    let Some(name) = name else { continue };
                    if fields.iter().all(|(given, _)| *given != name) {
                        fields.push((name, kind));
                    }
                }
                Ok(TopLevelKinds(fields))
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// What a JSON value is, as error messages say it ("a number").
pub(crate) fn json_kind(value: &Value) -> &'static str {
    JsonKind::of(value).described()
}

fn validate(raw: RawUpdate, line: u64, parsing: &Parsing) -> Result<Update, InputError> {
    if raw.id.is_empty() {
        return Err(InputError::new(line, "`id` must not be empty"));
    }
    if raw.id.len() > MAX_ID_BYTES {
        return Err(InputError::new(
            line,
            format!("`id` is {} bytes, more than {MAX_ID_BYTES}", raw.id.len()),
        ));
    }
    let op = raw.op.unwrap_or(Op::Upsert);
    // Also a delete's, which is then dropped: parsing that prunes refuses prefixed keys as it
    // reads them, whatever the op.
    if let Some(profile) = &raw.profile {
        shape::check(profile).map_err(|reason| InputError::new(line, reason))?;
    }
    let profile = match (op, raw.profile) {
        (Op::Delete, _) => Map::new(),
        (_, Some(profile)) => profile,
        (_, None) => {
            let op_name = if op == Op::Merge { "merge" } else { "upsert" };
            return Err(InputError::new(
                line,
                format!("`profile` is required for op `{op_name}`"),
            ));
        }
    };
    let timestamp = match raw.timestamp {
        None => None,
        Some(text) => Some(parse_timestamp(&text).map_err(|reason| {
            InputError::new(
                line,
                format!("`timestamp` `{}` {reason}", quoted_ends(&text)),
            )
        })?),
    };
    if let (Some(timestamp), Some(limit)) = (timestamp, &parsing.limit) {
        limit
            .check(timestamp)
            .map_err(|reason| InputError::new(line, reason))?;
    }
    let mut update = Update {
        id: raw.id,
        op,
        profile,
        timestamp,
        record: None,
        patch_text: None,
    };
    if let Some(layout) = parsing.layout {
        engine::prepare(&mut update, layout);
    }
    Ok(update)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::update::tests::error_of;
    use crate::profile::update::{format_time, locate_body, parse_body, parse_body_with, truncate};
    use serde_json::json;

    #[test]
    fn timestamp_is_parsed_to_utc() {
        let body = br#"{"id":"a","profile":{},"timestamp":"2026-01-01T01:00:05+01:00"}"#;
        let update = &parse_body(body).unwrap()[0];
        assert_eq!(
            format_time(update.timestamp.unwrap()),
            "2026-01-01T00:00:05Z"
        );
    }

    #[test]
    fn bad_inputs_name_line_and_reason() {
        let long_id = "x".repeat(513);
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let deep_profile = format!(
            "{{\"id\":\"a\",\"profile\":{{\"x\":{}1{}}}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let cases: Vec<(String, u64, &str)> = vec![
            ("not json".into(), 1, "not valid JSON"),
            (
                "{\"id\":\"a\",\"profile\":{}}\n42\n".into(),
                2,
                "not a number",
            ),
            (
                "{\"id\":\"a\",\"profile\":{},\"extra\":1}".into(),
                1,
                "unknown field `extra`",
            ),
            (
                "{\"id\":5,\"profile\":{}}".into(),
                1,
                "`id` must be a string, not a number",
            ),
            (
                "{\"id\":5,\"id\":\"a\",\"profile\":{}}".into(),
                1,
                "`id` must be a string, not a number",
            ),
            (
                "{\"id\":\"a\",\"id\":5,\"profile\":{}}".into(),
                1,
                "duplicate field `id`",
            ),
            ("{\"profile\":{}}".into(), 1, "missing field `id`"),
            ("{\"id\":\"a\"}".into(), 1, "`profile` is required"),
            (
                "{\"id\":\"a\",\"op\":\"merge\"}".into(),
                1,
                "`profile` is required for op `merge`",
            ),
            (
                "{\"id\":\"a\",\"profile\":[]}".into(),
                1,
                "`profile` must be an object, not an array",
            ),
            (
                "{\"id\":\"\",\"profile\":{}}".into(),
                1,
                "must not be empty",
            ),
            (
                format!("{{\"id\":\"{long_id}\",\"profile\":{{}}}}"),
                1,
                "513 bytes",
            ),
            (
                "{\"id\":\"a\",\"profile\":{},\"timestamp\":\"yesterday\"}".into(),
                1,
                "not RFC 3339",
            ),
            (
                "{\"id\":\"a\",\"profile\":{},\"timestamp\":5}".into(),
                1,
                "`timestamp` must be a string, not a number",
            ),
            (
                "{\"id\":\"a\",\"op\":\"replace\",\"profile\":{}}".into(),
                1,
                "`op` must be one of `upsert`, `merge`, `delete`, not `replace`",
            ),
            ("".into(), 1, "no update"),
            ("  \n ".into(), 1, "no update"),
            ("[]".into(), 1, "no update"),
            (
                "[{\"id\":\"a\",\"profile\":{}}, 7]".into(),
                1,
                "array item 2",
            ),
            (
                "[\n\n{\"id\":\"a\",\"profile\":{}},\n\n{\"id\":\"b\",\n\"zz\":1}\n]".into(),
                5,
                "array item 2: unknown field `zz`",
            ),
            (
                "{\"id\":\"a\",\"op\":{\"delete\":null}}".into(),
                1,
                "`op` must be a string, not an object",
            ),
            (
                "{\"id\":\"a\",\"op\":5,\"profile\":{}}".into(),
                1,
                "`op` must be a string, not a number",
            ),
            (
                "{\"id\":\"a\",\"profile\":{\"segmentMembership\":{\"ups\":[]}}}".into(),
                1,
                "`profile.segmentMembership.ups` must be an object, not an array",
            ),
            (
                "{\"id\":\"a\",\"op\":\"merge\",\"profile\":{\"identityMap\":{\"ecid\":{\"id\":\"1\"}}}}".into(),
                1,
                "`profile.identityMap.ecid` must be an array of identity objects, not an object",
            ),
            (
                "{\n  \"id\": \"a\",\n  \"profile\": {\n    \"b\": tru\n  }\n}\n".into(),
                4,
                "not valid JSON: expected ident (in the update that starts on line 1)",
            ),
            (
                "{\"id\":\"a\",\"profile\":{}}\n{\"id\":\"b\",\"profile\":{\"x\":1}\n{\"id\":\"c\",\"profile\":{}}\n".into(),
                3,
                "expected `,` or `}` (in the update that starts on line 2)",
            ),
            (deep, 1, "must be a JSON object, not an array"),
            (
                deep_profile,
                1,
                "arrays and objects are nested more than 128 deep, more than outpost reads",
            ),
            (
                "{\"id\":\"a\",\"profile\":{}}\n{\"id\":\"b\",\"profile\":{\"x\":-1e400}}\n".into(),
                2,
                "a number is beyond what a double holds (about ±1.8e308), so it cannot be kept",
            ),
            (
                "{\"id\":\"a\",\"profile\":{}}\n{\"id\":\"b\",\n".into(),
                2,
                "not valid JSON",
            ),
        ];
        for (body, line, reason) in cases {
            let error = error_of(body.as_bytes());
            assert_eq!(error.line, line, "{error} for {:?}", truncate(&body, 80));
            assert!(error.reason.contains(reason), "`{error}` lacks `{reason}`");
            let located = locate_body(body.as_bytes(), &Parsing::default(), 1).unwrap_err();
            assert_eq!((located.line, located.reason), (error.line, error.reason));
        }
    }

    /// Input that is not JSON text at all is told for what it is: gzip data, or bytes that
    /// are not UTF-8 where the parser stopped (an error before them is named as it is).
    #[test]
    fn input_that_is_not_json_text_says_what_it_is() {
        let not_utf8 = "not UTF-8: it holds bytes that are not a UTF-8 character";
        let cases: [(&[u8], u64, &str); 11] = [
            (
                b"\x1f\x8b\x08\x00\x00\x00",
                1,
                "this is gzip-compressed data, not JSON",
            ),
            (
                b"{\"id\":\"a\",\"profile\":{}}\n\x1f\x8b\x08\x00",
                2,
                "this is gzip-compressed data, not JSON",
            ),
            (b"{\"id\":\"\xc3\xa9\xff\",\"profile\":{}}", 1, not_utf8),
            (
                b"{\"id\":\"a\",\"profile\":{}}\n{\"id\":\"a\",\"profile\":{\"n\":\"\xff\xfe\"}}",
                2,
                not_utf8,
            ),
            (
                b"[{\"id\":\"a\",\"profile\":{\"n\":\"\xff\"}}]",
                1,
                "not a valid JSON array: not UTF-8",
            ),
            (
                b"{\"id\":\"a\" \"profile\":{\"n\":\"Jos\xe9\"}}",
                1,
                "not valid JSON: expected `,` or `}`",
            ),
            // UTF-8 that is not JSON: quotes from a word processor, a no-break space, a byte
            // order mark that `cat` left at a later line's start.
            (
                "{“id”:“a”,“profile”:{}}".as_bytes(),
                1,
                "not valid JSON: key must be a string",
            ),
            (
                "{\"id\":\"a\",\u{a0}\"profile\":{}}".as_bytes(),
                1,
                "not valid JSON: key must be a string",
            ),
            (
                "{\"id\":\"a\",\"profile\":{}}\n\u{feff}{\"id\":\"b\",\"profile\":{}}".as_bytes(),
                2,
                "not valid JSON: expected value",
            ),
            // Not UTF-8: a character's first bytes followed by another, or the text's end.
            (b"{\"id\":\"a\xe2\x80\",\"profile\":{}}", 1, not_utf8),
            (b"{\"id\":\"a\",\"profile\":{}} \xe2\x80", 1, not_utf8),
        ];
        for (body, line, reason) in cases {
            let error = error_of(body);
            assert_eq!(error.line, line);
            assert!(error.reason.starts_with(reason), "{error}");
            let located = locate_body(body, &Parsing::default(), 1).unwrap_err();
            assert_eq!((located.line, located.reason), (error.line, error.reason));
        }
    }

    #[test]
    fn a_field_given_twice_is_refused() {
        let error = error_of(br#"{"id":"p-1","id":"p-2","profile":{}}"#);
        assert!(error.reason.contains("duplicate field `id`"), "{error}");
    }

    #[test]
    fn a_one_megabyte_string_is_just_data() {
        let big = "y".repeat(1 << 20);
        let body = json!({"id": "a", "profile": {"note": big}}).to_string();
        assert_eq!(
            parse_body(body.as_bytes()).unwrap()[0].profile["note"]
                .as_str()
                .unwrap()
                .len(),
            1 << 20
        );
    }

    /// serde_json's own token key, which a stored text would not read back as written, is
    /// refused in what is kept, wherever it stands in its object.
    #[test]
    fn the_json_parsers_own_key_is_refused_in_what_is_kept() {
        let mapping = crate::config::Mapping::new(&["person"], &["s"], &[]);
        let keep = KeepTree::for_mapping(&mapping);
        let pruned = Parsing {
            keep: Some(&keep),
            ..Parsing::default()
        };
        let token = r#""$serde_json::private::RawValue""#;
        for entry in [
            format!(r#"{{{token}:1}}"#),
            format!(r#"{{{token}:"{{\"a\":1}}"}}"#),
            format!(r#"{{"status":"realized","x":{{"b":2,{token}:"1"}}}}"#),
        ] {
            for profile in [
                format!(r#"{{"segmentMembership":{{"ups":{{"s":{entry}}}}}}}"#),
                format!(r#"{{"person":[{entry}]}}"#),
            ] {
                let body = format!(r#"{{"id":"p","profile":{profile}}}"#);
                for parsing in [&pruned, &Parsing::default()] {
                    let error = parse_body_with(body.as_bytes(), parsing).unwrap_err();
                    assert!(
                        error.reason.contains("the JSON parser's own"),
                        "{body}: {error}"
                    );
                }
            }
        }
        let unkept = format!(r#"{{"id":"p","profile":{{"other":{{{token}:1}}}}}}"#);
        assert!(parse_body_with(unkept.as_bytes(), &pruned).is_ok());
    }

    /// The keep tree of a mapping of `person.name` and segment `s`.
    fn keeping_person_name() -> KeepTree {
        KeepTree::for_mapping(&crate::config::Mapping::new(&["person.name"], &["s"], &[]))
    }

    /// Parses `body` pruned by `keep` and whole: both refuse it on line 1 for a reason that
    /// holds `reason`, but a pruned parse when `dropped` (what is wrong lies in a part pruning
    /// drops unread), which takes it.
    fn refused_but_where_dropped(body: &str, keep: &KeepTree, dropped: bool, reason: &str) {
        let pruned = Parsing {
            keep: Some(keep),
            ..Parsing::default()
        };
        for (parsing, how) in [(&pruned, "pruned"), (&Parsing::default(), "whole")] {
            let parsed = parse_body_with(body.as_bytes(), parsing);
            if dropped && how == "pruned" {
                assert!(parsed.is_ok(), "{how}: {:?}", parsed.err());
                continue;
            }
            let Err(error) = parsed else {
                panic!("{how}: accepted");
            };
            assert_eq!(error.line, 1);
            assert!(error.reason.contains(reason), "{how}: {}", error.reason);
        }
    }

    /// A key given twice in one object of what is kept is refused, naming the key: which value
    /// counts is not for the agent to guess. In a part pruning drops, it is never read.
    #[test]
    fn a_key_given_twice_in_what_is_kept_is_refused() {
        let keep = keeping_person_name();
        let cases = [
            (
                r#"{"person":{"name":{"firstName":"a","firstName":"b"}}}"#,
                "firstName",
                true,
            ),
            (r#"{"person":{"name":{},"name":{}}}"#, "name", true),
            (
                r#"{"segmentMembership":{"ups":{"s":{"status":"realized"},"s":{"status":"exited"}}}}"#,
                "s",
                true,
            ),
            (r#"{"other":{"x":1,"x":2}}"#, "x", false),
        ];
        for (profile, key, kept) in cases {
            let body = format!(r#"{{"id":"p","profile":{profile}}}"#);
            let expected = format!("the key `{key}` is given twice in one object");
            refused_but_where_dropped(&body, &keep, !kept, &expected);
        }
    }

    /// A profile whose parsed tree would take more than the allowance is refused as it is
    /// parsed, pruned or not; what pruning leaves out is never built, so it is not counted;
    /// a large profile of ordinary segment entries is well within it.
    #[test]
    fn a_profile_too_large_once_parsed_is_refused() {
        let keep = keeping_person_name();
        let pruned = Parsing {
            keep: Some(&keep),
            ..Parsing::default()
        };
        let whole = Parsing::default();
        // Some 140 MB as `Value`s from 1.6 MB of text.
        let tiny_objects = format!("[{}{{\"a\":0}}]", "{\"a\":0},".repeat(200_000));
        let update = |at: &str| {
            let profile = match at {
                "segment" => format!(
                    r#"{{"segmentMembership":{{"ups":{{"s":{{"status":"realized","x":{tiny_objects}}}}}}}}}"#
                ),
                "attribute" => format!(r#"{{"person":{{"name":{tiny_objects}}}}}"#),
                _ => format!(r#"{{"unmapped":{tiny_objects}}}"#),
            };
            format!(r#"{{"id":"p","profile":{profile}}}"#)
        };
        for at in ["segment", "attribute", "unmapped"] {
            let reason = "64 MiB of memory once parsed";
            refused_but_where_dropped(&update(at), &keep, at == "unmapped", reason);
        }
        let entries: Vec<String> = (0..20_000)
            .map(|n| {
                format!(
                    r#""segment-{n:05}":{{"status":"realized","lastQualificationTime":"2026-01-01T00:00:00Z"}}"#
                )
            })
            .collect();
        let many_segments = format!(
            r#"{{"id":"p","profile":{{"segmentMembership":{{"ups":{{{}}}}}}}}}"#,
            entries.join(",")
        );
        for parsing in [&pruned, &whole] {
            let updates = parse_body_with(many_segments.as_bytes(), parsing).unwrap();
            let ups = &updates[0].profile["segmentMembership"]["ups"];
            assert_eq!(ups.as_object().unwrap().len(), 20_000);
        }
    }

    #[test]
    fn an_integer_beyond_64_bits_that_would_be_kept_is_refused_naming_it() {
        let big = "123456789012345678901234567890";
        let body = format!(
            "{{\"id\":\"a\",\"profile\":{{}}}}\n{{\"id\":\"b\",\"profile\":{{\"person\":{{\"loyalty\":{big}}},\"other\":{big}}}}}\n"
        );
        let error = error_of(body.as_bytes());
        assert_eq!(error.line, 2);
        assert!(
            error
                .reason
                .contains(&format!("`profile.other` is the integer {big}"))
                || error
                    .reason
                    .contains(&format!("`profile.person.loyalty` is the integer {big}")),
            "{error}"
        );

        // Pruned away, it is never kept nor sent: no concern.
        let mapping = crate::config::Mapping::new(&["person.loyalty"], &["s"], &[]);
        let keep = KeepTree::for_mapping(&mapping);
        let parsing = Parsing {
            keep: Some(&keep),
            ..Parsing::default()
        };
        let unmapped = format!("{{\"id\":\"b\",\"profile\":{{\"other\":{big}}}}}");
        assert!(parse_body_with(unmapped.as_bytes(), &parsing).is_ok());
        let error = parse_body_with(body.as_bytes(), &parsing).unwrap_err();
        assert!(
            error
                .reason
                .starts_with(&format!("`profile.person.loyalty` is the integer {big}")),
            "{error}"
        );
        // A delete's profile is dropped.
        let delete = format!("{{\"id\":\"b\",\"op\":\"delete\",\"profile\":{{\"x\":{big}}}}}");
        assert!(parse_body(delete.as_bytes()).is_ok());
    }
}
