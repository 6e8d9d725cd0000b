//! Keeping only the part of a profile the rules need (pure).
//!
//! The store keeps, for each profile, the mapped attributes, every segment membership (mapped
//! or not: a segment mapped later is backfilled from them, see `store::backfill`) and the
//! mapped identity namespaces (all of `identityMap` when `identities` is empty). Every
//! decision and payload reads only these, so pruning before the committer keeps its work,
//! the store and the memory small. Pruning commutes with RFC 7386 merging, so a pruned merge
//! patch applied to a pruned profile gives the pruned result of the full merge.
//! An attribute or namespace mapped later is judged against what is stored: it counts as
//! absent before (SPEC: "the next update of each profile is judged against what is stored").

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::config::Mapping;
use crate::profile::record::Valid;
use crate::profile::shape;

/// A tree of object keys to keep; a leaf keeps the whole value under it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct KeepTree {
    children: Vec<(String, KeepTree)>,
    whole: bool,
}

impl KeepTree {
    fn insert(&mut self, path: &[&str]) {
        if self.whole {
            return;
        }
        let Some((first, rest)) = path.split_first() else {
            self.whole = true;
            self.children.clear();
            return;
        };
        let child = match self.children.iter().position(|(k, _)| k == first) {
            Some(i) => &mut self.children[i].1,
            None => {
                self.children
                    .push(((*first).to_owned(), KeepTree::default()));
                &mut self.children.last_mut().expect("just pushed").1
            }
        };
        child.insert(rest);
    }

    pub fn for_mapping(mapping: &Mapping) -> KeepTree {
        let mut tree = KeepTree::default();
        for path in &mapping.attributes {
            let keys: Vec<&str> = path.iter().map(String::as_str).collect();
            tree.insert(&keys);
        }
        tree.insert(&["segmentMembership", "ups"]);
        if mapping.identities.is_empty() {
            tree.insert(&["identityMap"]);
        } else {
            for namespace in &mapping.identities {
                tree.insert(&["identityMap", namespace]);
            }
        }
        tree
    }

    /// Removes every key the tree does not keep. A value that is not an object where the tree
    /// goes deeper is kept as it is (in a merge patch, `null` there deletes the whole branch).
    pub fn prune(&self, object: &mut Map<String, Value>) {
        object.retain(
            |key, value| match self.children.iter().find(|(k, _)| k == key) {
                None => false,
                Some((_, child)) => {
                    if !child.whole {
                        if let Value::Object(inner) = value {
                            child.prune(inner);
                        }
                    }
                    true
                }
            },
        );
    }
}

/// The most memory one update's profile may take once parsed, as [`Allowance`] counts it: a
/// `Value` tree takes far more than its text (an object, however small, several hundred
/// bytes: `{"a":0}` is 7 bytes of text), so that one body within `ingest.max_body_bytes` could
/// otherwise take gigabytes.
pub const MAX_PARSED_PROFILE_BYTES: usize = 64 << 20;

/// What a `serde_json::Map` takes for up to [`ENTRIES_A_NODE`] entries (a B-tree node of 11
/// slots, of key and value, about 630 bytes, seldom full), and a `Vec<Value>` for an item
/// (a `Value`, and room to grow).
const NODE_BYTES: usize = 640;
const ENTRIES_A_NODE: usize = 8;
const ITEM_BYTES: usize = 48;

/// What is left of the memory one update's profile may take once parsed; charged as its
/// `Value` tree is built, so that parsing stops as soon as the tree would pass
/// [`MAX_PARSED_PROFILE_BYTES`].
#[derive(Clone, Copy)]
pub struct Allowance<'a>(&'a Cell<usize>);

impl<'a> Allowance<'a> {
    /// The allowance of one profile, kept in `left`.
    pub fn of_a_profile(left: &'a Cell<usize>) -> Allowance<'a> {
        left.set(MAX_PARSED_PROFILE_BYTES);
        Allowance(left)
    }

    fn charge<E: de::Error>(self, bytes: usize) -> Result<(), E> {
        match self.0.get().checked_sub(bytes) {
            Some(left) => {
                self.0.set(left);
                Ok(())
            }
            None => Err(E::custom(format!(
                "the profile would take over {} MiB of memory once parsed (each object in it takes several hundred bytes, however short its text): split it, or leave out what the mapping does not need",
                MAX_PARSED_PROFILE_BYTES >> 20
            ))),
        }
    }

    fn charge_entry<E: de::Error>(self, n: usize, key_len: usize) -> Result<(), E> {
        self.charge(entry_bytes(n, key_len))
    }
}

/// What the `n`th entry of an object (from 0), its key `key_len` bytes long, takes.
fn entry_bytes(n: usize, key_len: usize) -> usize {
    let node = if n.is_multiple_of(ENTRIES_A_NODE) {
        NODE_BYTES
    } else {
        0
    };
    node + key_len
}

/// Whether `object` takes more than `bytes` as [`Allowance`] counts it (it stops counting
/// there).
pub fn takes_more_than(object: &Map<String, Value>, bytes: usize) -> bool {
    fn object_bytes(object: &Map<String, Value>, left: &mut usize) -> bool {
        object.iter().enumerate().any(|(n, (key, value))| {
            spend(left, entry_bytes(n, key.len())) || value_bytes(value, left)
        })
    }
    fn value_bytes(value: &Value, left: &mut usize) -> bool {
        match value {
            Value::Object(object) => object_bytes(object, left),
            Value::Array(items) => items
                .iter()
                .any(|item| spend(left, ITEM_BYTES) || value_bytes(item, left)),
            Value::String(text) => spend(left, text.len()),
            _ => false,
        }
    }
    /// Spends `bytes` of `left`; whether that was more than was left.
    fn spend(left: &mut usize, bytes: usize) -> bool {
        match left.checked_sub(bytes) {
            Some(rest) => {
                *left = rest;
                false
            }
            None => true,
        }
    }
    let mut left = bytes;
    object_bytes(object, &mut left)
}

/// A JSON value parsed into a `Value`, as serde_json parses one but for a key given twice in
/// one object, which is refused ([`insert_once`]), charged to an [`Allowance`] as it is built.
pub struct Weighed<'a>(pub Allowance<'a>);

impl<'de> DeserializeSeed<'de> for Weighed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Weighed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        WeighedObject(self.0).visit_map(map).map(Value::Object)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(Weighed(self.0))? {
            self.0.charge(ITEM_BYTES)?;
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_bool<E>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Bool(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Value, E> {
        Ok(value.into())
    }

    fn visit_u64<E>(self, value: u64) -> Result<Value, E> {
        Ok(value.into())
    }

    fn visit_f64<E>(self, value: f64) -> Result<Value, E> {
        Ok(Number::from_f64(value).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Value, E> {
        self.0.charge(value.len())?;
        Ok(Value::String(value.to_owned()))
    }

    fn visit_string<E: de::Error>(self, value: String) -> Result<Value, E> {
        self.0.charge(value.len())?;
        Ok(Value::String(value))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

/// The key serde_json (with its `raw_value` feature) reads as its own token when an object's
/// first: a `Value` parse takes the object for the JSON text its value holds, or refuses it.
pub const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

/// Puts `value` under `key` in `object`, refusing a key the object holds already: JSON
/// readers differ on which of two values they keep, and keeping the last without a word would
/// send the destination what the sender may not have meant. Only what is kept is checked: a
/// part the mapping drops is never built, its keys never held.
fn insert_once<E: de::Error>(
    object: &mut Map<String, Value>,
    key: String,
    value: Value,
) -> Result<(), E> {
    match object.entry(key) {
        serde_json::map::Entry::Vacant(vacant) => {
            vacant.insert(value);
            Ok(())
        }
        serde_json::map::Entry::Occupied(occupied) => Err(E::custom(format!(
            "the key `{}` is given twice in one object of the profile",
            crate::profile::update::truncate(occupied.key(), 100).escape_debug()
        ))),
    }
}

/// Refuses [`RAW_VALUE_TOKEN`] as a key: kept, it would sort first in the stored text, which
/// would then not read back as it was written.
fn refuse_raw_value_token<E: de::Error>(key: &str) -> Result<(), E> {
    match key == RAW_VALUE_TOKEN {
        true => Err(E::custom(format!(
            "the key `{RAW_VALUE_TOKEN}` is the JSON parser's own and cannot be stored"
        ))),
        false => Ok(()),
    }
}

/// A JSON object parsed into a `Map` as [`Weighed`] parses one; anything else is refused as
/// a `Map` refuses it.
pub struct WeighedObject<'a>(pub Allowance<'a>);

impl<'de> DeserializeSeed<'de> for WeighedObject<'_> {
    type Value = Map<String, Value>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for WeighedObject<'_> {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = Map::new();
        let mut entries = 0;
        while let Some(key) = map.next_key::<String>()? {
            refuse_raw_value_token(&key)?;
            self.0.charge_entry(entries, key.len())?;
            entries += 1;
            let value = map.next_value_seed(Weighed(self.0))?;
            insert_once(&mut object, key, value)?;
        }
        Ok(object)
    }
}

/// Parses a profile object keeping only what `KeepTree::prune` would keep, without building the
/// rest: the parts dropped are checked as strictly as serde_json's `Value` parse checks them
/// (through [`Valid`]), so an input is accepted or refused as parsing it whole and pruning it
/// would, but their keys and values are never allocated: so a key given twice is refused in
/// what is kept ([`insert_once`]), not in what is dropped.
pub struct PrunedObject<'a> {
    pub keep: &'a KeepTree,
    /// Where this object is in the profile when its keys are checked for `xdm:` prefixes
    /// (`Some("")` for the profile itself, see [`shape::PREFIX_CHECKED`]).
    pub prefixes_at: Option<&'static str>,
    /// What the parts kept may take.
    pub allowance: Allowance<'a>,
}

impl<'de> DeserializeSeed<'de> for PrunedObject<'_> {
    type Value = Map<String, Value>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for PrunedObject<'_> {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        // What serde_json's `Map` says, so that errors read the same as without pruning.
        f.write_str("a map")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut kept = Map::new();
        let keys = KeptKey {
            keep: self.keep,
            prefixes_at: self.prefixes_at,
        };
        while let Some(key) = map.next_key_seed(keys)? {
            if let Some((key, _)) = &key {
                self.allowance.charge_entry(kept.len(), key.len())?;
            }
            match key {
                None => {
                    map.next_value::<Valid>()?;
                }
                Some((key, child)) if child.whole => {
                    let value = map.next_value_seed(Weighed(self.allowance))?;
                    insert_once(&mut kept, key, value)?;
                }
                Some((key, child)) => {
                    // Below the profile, the keys of the objects `shape` checks.
                    let prefixes_at = match self.prefixes_at {
                        Some("") => shape::PREFIX_CHECKED
                            .into_iter()
                            .find(|path| path.strip_suffix('.') == Some(key.as_str())),
                        _ => None,
                    };
                    let child = PrunedValue {
                        keep: child,
                        prefixes_at,
                        allowance: self.allowance,
                    };
                    let value = map.next_value_seed(child)?;
                    insert_once(&mut kept, key, value)?;
                }
            }
        }
        Ok(kept)
    }
}

/// An object key: the key and its subtree when the tree keeps it, `None` (nothing allocated)
/// when it does not.
#[derive(Clone, Copy)]
struct KeptKey<'a> {
    keep: &'a KeepTree,
    prefixes_at: Option<&'static str>,
}

impl<'de, 'a> DeserializeSeed<'de> for KeptKey<'a> {
    type Value = Option<(String, &'a KeepTree)>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de, 'a> Visitor<'de> for KeptKey<'a> {
    type Value = Option<(String, &'a KeepTree)>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        if let Some(reason) = self.prefixes_at.and_then(|at| shape::prefixed_key(at, key)) {
            return Err(E::custom(reason));
        }
        Ok(self
            .keep
            .children
            .iter()
            .find(|(k, _)| k == key)
            .map(|(k, child)| (k.clone(), child)))
    }
}

/// The value under a kept key the tree goes deeper into: an object is pruned further, anything
/// else is kept whole (as `KeepTree::prune` keeps it).
struct PrunedValue<'a> {
    keep: &'a KeepTree,
    prefixes_at: Option<&'static str>,
    allowance: Allowance<'a>,
}

impl<'de> DeserializeSeed<'de> for PrunedValue<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PrunedValue<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        PrunedObject {
            keep: self.keep,
            prefixes_at: self.prefixes_at,
            allowance: self.allowance,
        }
        .visit_map(map)
        .map(Value::Object)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Value, A::Error> {
        Weighed(self.allowance).visit_seq(seq)
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<Value, E> {
        Weighed(self.allowance).visit_bool(value)
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Value, E> {
        Weighed(self.allowance).visit_i64(value)
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Value, E> {
        Weighed(self.allowance).visit_u64(value)
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Value, E> {
        Weighed(self.allowance).visit_f64(value)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Value, E> {
        Weighed(self.allowance).visit_str(value)
    }

    fn visit_string<E: de::Error>(self, value: String) -> Result<Value, E> {
        Weighed(self.allowance).visit_string(value)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mapping() -> Mapping {
        Mapping::new(
            &["person.name.firstName", "mobilePhone"],
            &["s1"],
            &["ecid"],
        )
    }

    fn pruned(value: Value, mapping: &Mapping) -> Value {
        let Value::Object(mut object) = value else {
            panic!("not an object")
        };
        KeepTree::for_mapping(mapping).prune(&mut object);
        Value::Object(object)
    }

    #[test]
    fn keeps_mapped_paths_subtrees_namespaces_and_every_segment() {
        let profile = json!({
            "person": {"name": {"firstName": "Jane", "lastName": "Doe"}, "gender": "female"},
            "mobilePhone": {"number": "1-408", "status": "active"},
            "workAddress": {"city": "San Jose"},
            "segmentMembership": {"ups": {"s1": {"status": "realized"}, "s2": {"status": "existing"}}},
            "identityMap": {"ecid": [{"id": "1"}], "crmid": [{"id": "2"}]}
        });
        assert_eq!(
            pruned(profile, &mapping()),
            json!({
                "person": {"name": {"firstName": "Jane"}},
                "mobilePhone": {"number": "1-408", "status": "active"},
                "segmentMembership": {"ups": {"s1": {"status": "realized"}, "s2": {"status": "existing"}}},
                "identityMap": {"ecid": [{"id": "1"}]}
            })
        );
    }

    #[test]
    fn empty_identities_keep_the_whole_identity_map() {
        let mapping = Mapping::new(&[], &["s1"], &[]);
        let profile = json!({"identityMap": {"a": [], "b": [{"id": "x"}]}, "other": 1});
        assert_eq!(
            pruned(profile, &mapping),
            json!({"identityMap": {"a": [], "b": [{"id": "x"}]}})
        );
    }

    #[test]
    fn non_objects_on_a_path_are_kept_for_merge_semantics() {
        let patch = json!({"person": null, "segmentMembership": {"ups": {"s1": null, "s9": null}, "other": 1}, "x": null});
        assert_eq!(
            pruned(patch, &mapping()),
            json!({"person": null, "segmentMembership": {"ups": {"s1": null, "s9": null}}})
        );
    }

    /// prune(merge(a, p)) == merge(prune(a), prune(p)) over a table of documents and patches.
    #[test]
    fn pruning_commutes_with_merging() {
        let docs = [
            json!({}),
            json!({"person": {"name": {"firstName": "A", "lastName": "B"}, "age": 3}, "mobilePhone": {"n": 1}}),
            json!({"person": "not an object", "segmentMembership": {"ups": {"s1": {"status": "realized"}, "s2": {}}}}),
            json!({"identityMap": {"ecid": [{"id": "1"}], "crmid": [{"id": "2"}]}}),
        ];
        let patches = [
            json!({}),
            json!({"person": null}),
            json!({"person": {"name": {"firstName": "Z"}}}),
            json!({"person": {"name": null}, "mobilePhone": {"n": null, "m": 2}}),
            json!({"segmentMembership": {"ups": {"s1": null, "s2": {"status": "exited"}}}}),
            json!({"identityMap": {"ecid": [{"id": "9"}], "crmid": null}}),
            json!({"person": 5, "other": {"x": 1}}),
        ];
        let m = mapping();
        for doc in &docs {
            for patch in &patches {
                let mut full = doc.clone();
                json_patch::merge(&mut full, patch);
                let mut parts = pruned(doc.clone(), &m);
                json_patch::merge(&mut parts, &pruned(patch.clone(), &m));
                assert_eq!(pruned(full, &m), parts, "doc {doc} patch {patch}");
            }
        }
    }
}
