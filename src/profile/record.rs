//! The stored version of a profile as a typed record: what the rules read, with each value
//! the payload carries kept as JSON text, so that deciding compares strings and building the
//! payload copies text instead of building and printing `serde_json::Value` trees.
//!
//! JSON text here is always *canonical*: as serde_json prints a `Value` (object keys sorted,
//! no spaces). Two values are then equal exactly when their texts are, with one exception
//! that no profile field meets in practice: `-0.0` and `0.0` are equal numbers.
//!
//! What is kept (the rest is what the rules never read, see `prune`):
//! - every `segmentMembership.ups` entry, mapped or not (a segment mapped later is backfilled
//!   from them);
//! - the non-empty identity arrays of the kept namespaces (a namespace whose value is not a
//!   non-empty array counts as having no identities, for the rules and the payload alike);
//! - the value at each attribute leaf of the mapping ([`Layout`]). A record written under
//!   another mapping, or upgraded from a JSON record, may hold values at other paths; the
//!   value at a leaf is then found through them ([`ProfileRecord::attribute`]).

use std::borrow::Cow;

use bincode::{Decode, Encode};
use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Map, Value};

use super::export::insert_at;
use super::layout::{Layout, Leaf};

#[derive(Debug, Clone, PartialEq, Eq, Default, Encode, Decode)]
pub struct ProfileRecord {
    /// The update time, microseconds since the Unix epoch.
    pub timestamp_micros: Option<i64>,
    /// Sorted by segment id.
    pub segments: Vec<Membership>,
    /// Sorted by namespace.
    pub identities: Vec<Namespace>,
    /// Sorted by path.
    pub attributes: Vec<Attribute>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Membership {
    pub segment: String,
    /// `status`, when the entry is an object and its status a string.
    pub status: Option<Status>,
    /// `lastQualificationTime`, when the entry is an object and it is a string.
    pub last_qualification_time: Option<String>,
    pub rest: Rest,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Status {
    Realized,
    Existing,
    Exited,
    Other(String),
}

/// The part of a segment entry that is neither its status nor its qualification time.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Rest {
    /// An object with no other fields.
    Nothing,
    /// An object's other fields, as the canonical text of an object.
    Fields(String),
    /// An entry that is not an object, as canonical text.
    NotObject(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Namespace {
    pub namespace: String,
    /// Never empty; each identity as canonical text.
    pub items: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Attribute {
    /// Object keys joined with `.`.
    pub path: String,
    pub json: String,
}

pub(crate) fn canonical(value: &Value) -> String {
    // `to_string` (through `Display`) prints the same text, slower.
    serde_json::to_string(value).expect("a Value serializes")
}

/// A record's JSON text as a value. [`ProfileRecord::check`], run on every record decoded,
/// refuses any text this would fail on.
pub(crate) fn parse(text: &str) -> Value {
    serde_json::from_str(text).expect("a checked record holds valid JSON text")
}

/// Accepts exactly the JSON that parses as a `serde_json::Value` (numbers in range, escapes
/// that are characters, nesting within serde_json's limit), without building it: serde's
/// `IgnoredAny` skips such text unchecked.
pub(crate) struct Valid;

impl<'de> serde::Deserialize<'de> for Valid {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Valid, D::Error> {
        deserializer.deserialize_any(ValidVisitor)
    }
}

struct ValidVisitor;

impl<'de> serde::de::Visitor<'de> for ValidVisitor {
    type Value = Valid;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Valid, E> {
        Ok(Valid)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Valid, E> {
        Ok(Valid)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Valid, E> {
        Ok(Valid)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Valid, E> {
        Ok(Valid)
    }
    fn visit_str<E>(self, _: &str) -> Result<Valid, E> {
        Ok(Valid)
    }
    fn visit_unit<E>(self) -> Result<Valid, E> {
        Ok(Valid)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Valid, A::Error> {
        while seq.next_element::<Valid>()?.is_some() {}
        Ok(Valid)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Valid, A::Error> {
        while map.next_entry::<Valid, Valid>()?.is_some() {}
        Ok(Valid)
    }
}

impl Status {
    fn of(text: &str) -> Status {
        match text {
            "realized" => Status::Realized,
            "existing" => Status::Existing,
            "exited" => Status::Exited,
            other => Status::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Status::Realized => "realized",
            Status::Existing => "existing",
            Status::Exited => "exited",
            Status::Other(other) => other,
        }
    }
}

impl Membership {
    pub fn from_entry(segment: &str, entry: &Value) -> Membership {
        let Value::Object(fields) = entry else {
            return Membership {
                segment: segment.to_owned(),
                status: None,
                last_qualification_time: None,
                rest: Rest::NotObject(canonical(entry)),
            };
        };
        let status = fields.get("status").and_then(Value::as_str).map(Status::of);
        let time = fields
            .get("lastQualificationTime")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let taken = usize::from(status.is_some()) + usize::from(time.is_some());
        let rest = if fields.len() == taken {
            Rest::Nothing
        } else {
            let others: Map<String, Value> = fields
                .iter()
                .filter(|(key, _)| {
                    !(key.as_str() == "status" && status.is_some()
                        || key.as_str() == "lastQualificationTime" && time.is_some())
                })
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect();
            Rest::Fields(canonical(&Value::Object(others)))
        };
        Membership {
            segment: segment.to_owned(),
            status,
            last_qualification_time: time,
            rest,
        }
    }

    pub fn to_entry(&self) -> Value {
        let mut fields = match &self.rest {
            Rest::NotObject(text) => return parse(text),
            Rest::Nothing => Map::new(),
            Rest::Fields(text) => match parse(text) {
                Value::Object(fields) => fields,
                _ => Map::new(),
            },
        };
        if let Some(status) = &self.status {
            fields.insert("status".into(), status.as_str().into());
        }
        if let Some(time) = &self.last_qualification_time {
            fields.insert("lastQualificationTime".into(), time.as_str().into());
        }
        Value::Object(fields)
    }

    /// `realized` and `existing` are memberships; `exited` or any other status is not.
    pub fn is_member(&self) -> bool {
        matches!(self.status, Some(Status::Realized | Status::Existing))
    }
}

impl Namespace {
    /// The namespace's identities, when `value` is a non-empty array.
    pub fn from_value(namespace: &str, value: &Value) -> Option<Namespace> {
        match value {
            Value::Array(items) if !items.is_empty() => Some(Namespace {
                namespace: namespace.to_owned(),
                items: items.iter().map(canonical).collect(),
            }),
            _ => None,
        }
    }
}

fn object_at<'a>(value: Option<&'a Value>, key: &str) -> Option<&'a Map<String, Value>> {
    value?.get(key)?.as_object()
}

/// `b` is a path under `a`.
fn is_under(b: &str, a: &str) -> bool {
    b.len() > a.len() && b.starts_with(a) && b.as_bytes()[a.len()] == b'.'
}

/// Two paths are the same, or one is under the other.
pub(crate) fn related(a: &str, b: &str) -> bool {
    a == b || is_under(a, b) || is_under(b, a)
}

impl ProfileRecord {
    /// The record of a whole profile (an `upsert`), keeping what `layout` keeps.
    pub fn from_profile(
        timestamp_micros: Option<i64>,
        profile: &Map<String, Value>,
        layout: &Layout,
    ) -> ProfileRecord {
        let attributes = layout
            .leaves
            .iter()
            .filter_map(|leaf| {
                let (first, rest) = leaf.keys.split_first()?;
                let value = rest
                    .iter()
                    .try_fold(profile.get(first)?, |value, key| value.get(key))?;
                Some(Attribute {
                    path: leaf.joined.clone(),
                    json: canonical(value),
                })
            })
            .collect();
        ProfileRecord {
            timestamp_micros,
            segments: segments_of(profile),
            identities: identities_of(profile, |namespace| layout.keeps_namespace(namespace)),
            attributes,
        }
    }

    /// The record of a profile stored as JSON by an older outpost (already pruned by the
    /// mapping it ran with, which is not known here): every segment entry and non-empty
    /// identity array, and each other top-level field as an attribute.
    pub fn from_json_profile(timestamp_micros: Option<i64>, profile: &Value) -> ProfileRecord {
        let Some(object) = profile.as_object() else {
            return ProfileRecord {
                timestamp_micros,
                ..ProfileRecord::default()
            };
        };
        let attributes = object
            .iter()
            .filter(|(key, _)| {
                key.as_str() != "segmentMembership"
                    && key.as_str() != "identityMap"
                    && !key.contains('.')
            })
            .map(|(key, value)| Attribute {
                path: key.clone(),
                json: canonical(value),
            })
            .collect();
        ProfileRecord {
            timestamp_micros,
            segments: segments_of(object),
            identities: identities_of(object, |_| true),
            attributes,
        }
    }

    /// Checks what decoding bytes cannot: that each JSON text parses as a JSON value (of the
    /// right kind) and each list is in order. A record that fails this is unreadable: its
    /// texts would otherwise go into payloads as they are, or fail to parse when merged.
    /// (Text that is JSON but not canonical passes: it only makes equal values compare
    /// unequal, which exports once more than needed.)
    pub fn check(&self) -> Result<(), String> {
        fn json(text: &str, what: &str) -> Result<(), String> {
            serde_json::from_str::<Valid>(text).map_err(|e| format!("{what}: {e}"))?;
            // serde_json's own token key (stored by earlier builds, which did not refuse it)
            // reads back as another value, or not at all: the text must read as it is.
            if text.contains(crate::profile::prune::RAW_VALUE_TOKEN) {
                let reads_back = serde_json::from_str::<Value>(text)
                    .is_ok_and(|value| canonical(&value) == text);
                if !reads_back {
                    return Err(format!(
                        "{what}: holds the key `{}`, which does not read back as stored",
                        crate::profile::prune::RAW_VALUE_TOKEN
                    ));
                }
            }
            Ok(())
        }
        fn sorted<T>(items: &[T], key: impl Fn(&T) -> &str, what: &str) -> Result<(), String> {
            match items.windows(2).all(|w| key(&w[0]) < key(&w[1])) {
                true => Ok(()),
                false => Err(format!("{what} out of order")),
            }
        }
        if self.timestamp_micros.is_some() && self.timestamp().is_none() {
            return Err("timestamp out of range".into());
        }
        sorted(&self.segments, |m| &m.segment, "segments")?;
        sorted(&self.identities, |n| &n.namespace, "namespaces")?;
        sorted(&self.attributes, |a| &a.path, "attributes")?;
        for m in &self.segments {
            match &m.rest {
                Rest::Nothing => {}
                Rest::Fields(text) if text.starts_with('{') => json(text, &m.segment)?,
                Rest::NotObject(text) if !text.starts_with('{') => json(text, &m.segment)?,
                _ => return Err(format!("segment {}: entry of the wrong kind", m.segment)),
            }
        }
        for n in &self.identities {
            for item in &n.items {
                json(item, &n.namespace)?;
            }
        }
        for a in &self.attributes {
            json(&a.json, &a.path)?;
        }
        Ok(())
    }

    /// The update time (`None` also when out of range, which `check` refuses).
    pub fn timestamp(&self) -> Option<DateTime<Utc>> {
        Utc.timestamp_micros(self.timestamp_micros?).single()
    }

    /// The record as a JSON profile (for people: `outpost profile`, errors).
    pub fn to_value(&self) -> Value {
        let mut profile = self.attributes_value();
        if !self.segments.is_empty() {
            let ups: Map<String, Value> = self
                .segments
                .iter()
                .map(|m| (m.segment.clone(), m.to_entry()))
                .collect();
            let mut membership = Map::new();
            membership.insert("ups".into(), Value::Object(ups));
            profile.insert("segmentMembership".into(), Value::Object(membership));
        }
        if !self.identities.is_empty() {
            let map: Map<String, Value> = self
                .identities
                .iter()
                .map(|n| {
                    let items = n.items.iter().map(|i| parse(i)).collect();
                    (n.namespace.clone(), Value::Array(items))
                })
                .collect();
            profile.insert("identityMap".into(), Value::Object(map));
        }
        Value::Object(profile)
    }

    fn attributes_value(&self) -> Map<String, Value> {
        let mut object = Map::new();
        for attribute in &self.attributes {
            let path: Vec<&str> = attribute.path.split('.').collect();
            insert_at(&mut object, &path, parse(&attribute.json));
        }
        object
    }

    /// The segment's entry; an entry of `null`, which records of earlier builds may hold, is
    /// none.
    pub fn membership(&self, segment: &str) -> Option<&Membership> {
        self.segments
            .binary_search_by(|m| m.segment.as_str().cmp(segment))
            .ok()
            .map(|i| &self.segments[i])
            .filter(|m| !matches!(&m.rest, Rest::NotObject(text) if text == "null"))
    }

    pub fn is_member(&self, segment: &str) -> bool {
        self.membership(segment).is_some_and(Membership::is_member)
    }

    /// The identities of `namespace` (none when it has none).
    pub fn identities(&self, namespace: &str) -> &[String] {
        self.identities
            .binary_search_by(|n| n.namespace.as_str().cmp(namespace))
            .map_or(&[], |i| &self.identities[i].items)
    }

    /// The canonical text of the value at `leaf`, if the profile has one there.
    pub fn attribute(&self, leaf: &Leaf) -> Option<Cow<'_, str>> {
        match self
            .attributes
            .binary_search_by(|a| a.path.as_str().cmp(&leaf.joined))
        {
            Ok(i) => Some(Cow::Borrowed(&self.attributes[i].json)),
            Err(_) => self.attribute_through_other_paths(leaf),
        }
    }

    /// A record written under another mapping may hold the leaf's value inside a shorter
    /// path's value, or spread over longer paths.
    fn attribute_through_other_paths(&self, leaf: &Leaf) -> Option<Cow<'_, str>> {
        if !self
            .attributes
            .iter()
            .any(|a| related(&leaf.joined, &a.path))
        {
            return None;
        }
        let object = Value::Object(self.attributes_value());
        let value = leaf.keys.iter().try_fold(&object, |v, key| v.get(key))?;
        Some(Cow::Owned(canonical(value)))
    }
}

/// The identities of the namespaces `keep` keeps (sorted, as the map is).
fn identities_of(profile: &Map<String, Value>, keep: impl Fn(&str) -> bool) -> Vec<Namespace> {
    profile
        .get("identityMap")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter(|(namespace, _)| keep(namespace))
        .filter_map(|(namespace, value)| Namespace::from_value(namespace, value))
        .collect()
}

/// An entry of `null` is no entry (SPEC: its entry vanished), so none is kept.
fn segments_of(profile: &Map<String, Value>) -> Vec<Membership> {
    object_at(profile.get("segmentMembership"), "ups")
        .into_iter()
        .flatten()
        .filter(|(_, entry)| !entry.is_null())
        .map(|(segment, entry)| Membership::from_entry(segment, entry))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mapping;
    use serde_json::json;

    #[test]
    fn a_profile_becomes_a_record_and_back() {
        let layout = Layout::new(&Mapping::new(
            &["person.name.firstName", "mobilePhone"],
            &["s1"],
            &["ecid"],
        ));
        let profile = json!({
            "person": {"name": {"firstName": "Jane", "lastName": "Doe"}},
            "mobilePhone": {"number": "1-408", "status": "active"},
            "segmentMembership": {"ups": {
                "s1": {"status": "realized", "lastQualificationTime": "2026-01-01T00:00:00Z"},
                "s2": {"status": "existing", "version": "15", "payload": {"a": 1}},
                "s3": "odd",
                "s4": {"status": 7}
            }},
            "identityMap": {"ecid": [{"primary": true, "id": "1"}], "crmid": [{"id": "2"}], "empty": []}
        });
        let record = ProfileRecord::from_profile(Some(5), profile.as_object().unwrap(), &layout);
        assert_eq!(record.attributes.len(), 2);
        assert!(record.is_member("s1") && record.is_member("s2"));
        assert!(!record.is_member("s3") && !record.is_member("s4"));
        assert_eq!(record.identities("ecid"), [r#"{"id":"1","primary":true}"#]);
        assert!(record.identities("crmid").is_empty());
        assert_eq!(
            record.to_value(),
            json!({
                "person": {"name": {"firstName": "Jane"}},
                "mobilePhone": {"number": "1-408", "status": "active"},
                "segmentMembership": {"ups": {
                    "s1": {"status": "realized", "lastQualificationTime": "2026-01-01T00:00:00Z"},
                    "s2": {"status": "existing", "version": "15", "payload": {"a": 1}},
                    "s3": "odd",
                    "s4": {"status": 7}
                }},
                "identityMap": {"ecid": [{"primary": true, "id": "1"}]}
            })
        );
    }

    #[test]
    fn an_entry_of_null_is_no_membership_also_in_an_older_record() {
        let layout = Layout::new(&Mapping::new(&[], &["s1"], &[]));
        let profile = json!({"segmentMembership": {"ups": {"s1": null}}});
        let record = ProfileRecord::from_profile(None, profile.as_object().unwrap(), &layout);
        assert!(record.segments.is_empty());
        let older = ProfileRecord {
            segments: vec![Membership::from_entry("s1", &Value::Null)],
            ..record
        };
        assert_eq!(older.membership("s1"), None);
    }

    #[test]
    fn check_refuses_text_that_does_not_parse_as_a_value() {
        let with_attribute = |json: &str| ProfileRecord {
            attributes: vec![Attribute {
                path: "a".into(),
                json: json.into(),
            }],
            ..ProfileRecord::default()
        };
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for bad in ["{", "1e400", r#""\udc00""#, deep.as_str(), "1 2"] {
            assert!(with_attribute(bad).check().is_err(), "{bad}");
            assert!(serde_json::from_str::<Value>(bad).is_err(), "{bad}");
        }
        for good in ["1e300", r#""\ud83d\ude00""#, r#"{"a":[null,true,-1,1.5]}"#] {
            assert_eq!(with_attribute(good).check(), Ok(()), "{good}");
        }
        // serde_json's own token key, as earlier builds stored it: the text must read back as
        // it is (as a string value it does).
        let token = crate::profile::prune::RAW_VALUE_TOKEN;
        for bad in [
            format!(r#"{{"{token}":1}}"#),
            format!(r#"{{"{token}":"[2]"}}"#),
            format!(r#"{{"x":{{"{token}":1,"y":2}}}}"#),
        ] {
            assert!(with_attribute(&bad).check().is_err(), "{bad}");
        }
        let as_text = format!(r#"{{"a":"{token}"}}"#);
        assert_eq!(with_attribute(&as_text).check(), Ok(()));
    }

    #[test]
    fn a_leaf_is_found_through_the_paths_of_an_older_record() {
        let json =
            json!({"person": {"name": {"firstName": "Jane"}}, "mobilePhone": {"number": "1"}});
        let old = ProfileRecord::from_json_profile(None, &json);
        let layout = Layout::new(&Mapping::new(
            &["person.name.firstName", "mobilePhone", "workEmail"],
            &[],
            &[],
        ));
        let texts: Vec<Option<String>> = layout
            .leaves
            .iter()
            .map(|leaf| old.attribute(leaf).map(Cow::into_owned))
            .collect();
        assert_eq!(
            texts,
            [
                Some(r#"{"number":"1"}"#.to_owned()),
                Some(r#""Jane""#.to_owned()),
                None
            ]
        );
        // And the other way: a leaf above the stored paths gathers them.
        let wide = Layout::new(&Mapping::new(&["person"], &[], &[]));
        let narrow = ProfileRecord::from_profile(
            None,
            json.as_object().unwrap(),
            &Layout::new(&Mapping::new(&["person.name.firstName"], &[], &[])),
        );
        assert_eq!(
            narrow.attribute(&wide.leaves[0]).as_deref(),
            Some(r#"{"name":{"firstName":"Jane"}}"#)
        );
    }
}
