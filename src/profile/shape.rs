//! The shape of the parts of a profile the rules read (pure).
//!
//! `segmentMembership.ups` and `identityMap` decide exports, so an update whose parts there do
//! not have XDM's shape is refused rather than read as "no memberships" or "no identities":
//! a producer that sent `ups` as an array would otherwise make every mapped segment of the
//! profile exit at the destination. What is checked, in profiles and merge patches alike:
//!
//! | path | must be |
//! |---|---|
//! | `segmentMembership`, `segmentMembership.ups`, `identityMap` | an object |
//! | `segmentMembership.ups.<segment>` | an object |
//! | `segmentMembership.ups.<segment>.status` | a string |
//! | `identityMap.<namespace>` | an array of objects |
//!
//! `null` is accepted at each of them: in a merge patch it removes the part (RFC 7386); in a
//! profile it is what a producer that writes every nullable field sends, and reads as none (a
//! segment entry of `null`, or without a status, makes no member, as SPEC's rule says).
//!
//! Nor may a key of the profile, of `segmentMembership`, of `identityMap`, of a `ups` entry or
//! of an identity carry an `xdm:` prefix: SPEC takes profiles without them, and a prefixed
//! `identityMap`, `ups` or `status` would be read as absent (an identity's `xdm:id` would go
//! to the destination as it is).
//!
//! A status other than `realized`, `existing` and `exited` is accepted: SPEC makes a profile a
//! member only for the first two, so it is a membership of another kind.
//!
//! The check runs on what parsing kept of the profile (see `prune`): a namespace the mapping
//! does not export is dropped unread, whatever its shape. Parsing that prunes checks the
//! prefixes itself, as it reads the keys ([`prefixed_key`]), since it drops such keys unbuilt.

use serde_json::{Map, Value};

use super::update::json_kind;

/// The objects whose keys may not carry an `xdm:` prefix: the profile's own (path `""`) and
/// these, by their path.
pub const PREFIX_CHECKED: [&str; 2] = ["segmentMembership.", "identityMap."];

/// Checks a profile or merge patch; `Err` says which path is wrong and what it holds. (Every
/// update on its way to the store passes here: paths are only spelled out for an error.)
pub fn check(profile: &Map<String, Value>) -> Result<(), String> {
    check_prefixes(profile, String::new)?;
    if let Some(membership) = object_or_none(profile, "segmentMembership", "")? {
        check_prefixes(membership, || PREFIX_CHECKED[0].to_owned())?;
        if let Some(ups) = object_or_none(membership, "ups", PREFIX_CHECKED[0])? {
            for (segment, entry) in ups {
                let path = || format!("segmentMembership.ups.{segment}");
                match entry {
                    Value::Object(fields) => {
                        check_prefixes(fields, || format!("{}.", path()))?;
                        match fields.get("status") {
                            None | Some(Value::String(_) | Value::Null) => {}
                            Some(other) => {
                                return Err(wrong(&format!("{}.status", path()), "a string", other))
                            }
                        }
                    }
                    Value::Null => {}
                    other => return Err(wrong(&path(), "an object", other)),
                }
            }
        }
    }
    if let Some(identity_map) = object_or_none(profile, "identityMap", "")? {
        check_prefixes(identity_map, || PREFIX_CHECKED[1].to_owned())?;
        for (namespace, identities) in identity_map {
            let path = || format!("identityMap.{namespace}");
            match identities {
                Value::Null => {}
                Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        let Value::Object(fields) = item else {
                            let at = format!("{}[{i}]", path());
                            return Err(wrong(&at, "an identity object", item));
                        };
                        check_prefixes(fields, || format!("{}[{i}].", path()))?;
                    }
                }
                other => return Err(wrong(&path(), "an array of identity objects", other)),
            }
        }
    }
    Ok(())
}

/// Refuses `xdm:`-prefixed keys of `object`, found at `path()`.
fn check_prefixes(object: &Map<String, Value>, path: impl Fn() -> String) -> Result<(), String> {
    match object.keys().find(|key| key.starts_with("xdm:")) {
        Some(key) => Err(prefixed_key(&path(), key).unwrap_or_default()),
        None => Ok(()),
    }
}

/// The error for a key at `path` that carries an `xdm:` prefix.
pub fn prefixed_key(path: &str, key: &str) -> Option<String> {
    let unprefixed = key.strip_prefix("xdm:")?;
    Some(format!(
        "`profile.{path}{key}`: profiles are taken without `xdm:` prefixes (`{unprefixed}`)"
    ))
}

/// The object at `key`, `None` when absent or `null`.
fn object_or_none<'a>(
    parent: &'a Map<String, Value>,
    key: &str,
    prefix: &str,
) -> Result<Option<&'a Map<String, Value>>, String> {
    match parent.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(object)) => Ok(Some(object)),
        Some(other) => Err(wrong(&format!("{prefix}{key}"), "an object", other)),
    }
}

fn wrong(path: &str, expected: &str, found: &Value) -> String {
    format!(
        "`profile.{path}` must be {expected}, not {}",
        json_kind(found)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shapes_table() {
        // (profile or patch, the error, if refused)
        let table = [
            (json!({}), None),
            (
                json!({"segmentMembership": {"ups": {"s": {"status": "realized", "x": 1}}},
                       "identityMap": {"ecid": [{"id": "1"}], "email": []}}),
                None,
            ),
            (json!({"segmentMembership": {"ups": {"s": {}}}}), None),
            (json!({"segmentMembership": {"ups": {"s": {"status": "REALIZED"}}}}), None),
            (json!({"segmentMembership": null, "identityMap": null}), None),
            (json!({"segmentMembership": {"ups": null}}), None),
            (json!({"segmentMembership": {"ups": {"s": null}}}), None),
            (json!({"segmentMembership": {"ups": {"s": {"status": null}}}}), None),
            (json!({"segmentMembership": {"other": [1]}}), None),
            (json!({"identityMap": {"ecid": null}}), None),
            (json!({"person": {"xdm:name": 1}}), None),
            (
                json!({"segmentMembership": [1]}),
                Some("`profile.segmentMembership` must be an object, not an array"),
            ),
            (
                json!({"segmentMembership": {"ups": [{"s": {"status": "realized"}}]}}),
                Some("`profile.segmentMembership.ups` must be an object, not an array"),
            ),
            (
                json!({"segmentMembership": {"ups": {"s": "realized"}}}),
                Some("`profile.segmentMembership.ups.s` must be an object, not a string"),
            ),
            (
                json!({"segmentMembership": {"ups": {"s": {"status": 5}}}}),
                Some("`profile.segmentMembership.ups.s.status` must be a string, not a number"),
            ),
            (
                json!({"identityMap": "x"}),
                Some("`profile.identityMap` must be an object, not a string"),
            ),
            (
                json!({"identityMap": {"ecid": {"id": "e1"}}}),
                Some("`profile.identityMap.ecid` must be an array of identity objects, not an object"),
            ),
            (
                json!({"identityMap": {"ecid": [{"id": "e1"}, "e2"]}}),
                Some("`profile.identityMap.ecid[1]` must be an identity object, not a string"),
            ),
            (
                json!({"xdm:identityMap": {"ecid": [{"id": "1"}]}}),
                Some("`profile.xdm:identityMap`: profiles are taken without `xdm:` prefixes (`identityMap`)"),
            ),
            (
                json!({"segmentMembership": {"xdm:ups": {"s": {"status": "realized"}}}}),
                Some("`profile.segmentMembership.xdm:ups`: profiles are taken without `xdm:` prefixes (`ups`)"),
            ),
            (
                json!({"segmentMembership": {"ups": {"s": {"xdm:status": "realized"}}}}),
                Some("`profile.segmentMembership.ups.s.xdm:status`: profiles are taken without `xdm:` prefixes (`status`)"),
            ),
            (
                json!({"identityMap": {"ecid": [{"id": "1"}, {"xdm:id": "2"}]}}),
                Some("`profile.identityMap.ecid[1].xdm:id`: profiles are taken without `xdm:` prefixes (`id`)"),
            ),
            (
                json!({"identityMap": {"xdm:ecid": [{"id": "1"}]}}),
                Some("`profile.identityMap.xdm:ecid`: profiles are taken without `xdm:` prefixes (`ecid`)"),
            ),
        ];
        for (profile, refused) in table {
            let checked = check(profile.as_object().unwrap());
            assert_eq!(
                checked,
                refused.map_or(Ok(()), |e| Err(e.to_owned())),
                "{profile}"
            );
        }
    }
}
