//! The shape of the parts of a profile the rules read (pure).
//!
//! `segmentMembership.ups` and `identityMap` decide exports, so an update whose parts there do
//! not have XDM's shape is refused rather than read as "no memberships" or "no identities":
//! a producer that sent `ups` as an array would otherwise make every mapped segment of the
//! profile exit at the destination. What is checked:
//!
//! | path | must be |
//! |---|---|
//! | `segmentMembership`, `segmentMembership.ups`, `identityMap` | an object (or `null`: none) |
//! | `segmentMembership.ups.<segment>` | an object (`null` only in a merge patch: removed) |
//! | `segmentMembership.ups.<segment>.status` | a string (`null` only in a merge patch) |
//! | `identityMap.<namespace>` | an array of objects (or `null`: none) |
//!
//! Nor may a key of the profile carry an `xdm:` prefix.
//!
//! A status other than `realized`, `existing` and `exited` is accepted: SPEC makes a profile a
//! member only for the first two, so it is a membership of another kind.
//!
//! The check runs on what parsing kept of the profile (see `prune`): a namespace the mapping
//! does not export is dropped unread, whatever its shape.

use serde_json::{Map, Value};

use super::update::Op;

/// Checks the profile (an upsert's) or merge patch (a merge's); `Err` says which path is wrong
/// and what it holds.
pub fn check(profile: &Map<String, Value>, op: Op) -> Result<(), String> {
    let patch = op == Op::Merge;
    if let Some(reason) = profile.keys().find_map(|key| prefixed_key(key)) {
        return Err(reason);
    }
    if let Some(membership) = object_or_none(profile, "segmentMembership", "")? {
        if let Some(ups) = object_or_none(membership, "ups", "segmentMembership.")? {
            for (segment, entry) in ups {
                let path = format!("segmentMembership.ups.{segment}");
                match entry {
                    Value::Object(fields) => match fields.get("status") {
                        None | Some(Value::String(_)) => {}
                        Some(Value::Null) if patch => {}
                        Some(other) => {
                            return Err(wrong(&format!("{path}.status"), "a string", other))
                        }
                    },
                    Value::Null if patch => {}
                    other => return Err(wrong(&path, "an object", other)),
                }
            }
        }
    }
    if let Some(identity_map) = object_or_none(profile, "identityMap", "")? {
        for (namespace, identities) in identity_map {
            let path = format!("identityMap.{namespace}");
            match identities {
                Value::Null => {}
                Value::Array(items) => {
                    if let Some((i, item)) = items.iter().enumerate().find(|(_, v)| !v.is_object())
                    {
                        return Err(wrong(&format!("{path}[{i}]"), "an identity object", item));
                    }
                }
                other => return Err(wrong(&path, "an array of identity objects", other)),
            }
        }
    }
    Ok(())
}

/// A key of the profile itself that carries an `xdm:` prefix: SPEC takes profiles without
/// them, and a prefixed `identityMap` would otherwise be dropped unread, exporting nothing.
/// (Parsing that prunes checks this as it reads the keys, since it drops such keys unbuilt.)
pub fn prefixed_key(key: &str) -> Option<String> {
    let unprefixed = key.strip_prefix("xdm:")?;
    Some(format!(
        "`profile.{key}`: profiles are taken without `xdm:` prefixes (`{unprefixed}`)"
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
    let found = match found {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    format!("`profile.{path}` must be {expected}, not {found}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shapes_table() {
        // (profile, refused as an upsert, refused as a merge patch, the path named)
        let table = [
            (json!({}), None, None),
            (
                json!({"segmentMembership": {"ups": {"s": {"status": "realized", "x": 1}}},
                       "identityMap": {"ecid": [{"id": "1"}], "email": []}}),
                None,
                None,
            ),
            (json!({"segmentMembership": {"ups": {"s": {}}}}), None, None),
            (json!({"segmentMembership": {"ups": {"s": {"status": "REALIZED"}}}}), None, None),
            (json!({"segmentMembership": null, "identityMap": null}), None, None),
            (json!({"segmentMembership": {"ups": null}}), None, None),
            (json!({"segmentMembership": {"other": [1]}}), None, None),
            (json!({"identityMap": {"ecid": null}}), None, None),
            (json!({"person": {"xdm:name": 1}}), None, None),
            (
                json!({"xdm:identityMap": {"ecid": [{"id": "1"}]}}),
                Some("`profile.xdm:identityMap`: profiles are taken without `xdm:` prefixes (`identityMap`)"),
                Some("xdm:identityMap`"),
            ),
            (
                json!({"segmentMembership": [1]}),
                Some("`profile.segmentMembership` must be an object, not an array"),
                Some("segmentMembership`"),
            ),
            (
                json!({"segmentMembership": {"ups": [{"s": {"status": "realized"}}]}}),
                Some("`profile.segmentMembership.ups` must be an object, not an array"),
                Some("segmentMembership.ups`"),
            ),
            (
                json!({"segmentMembership": {"ups": {"s": "realized"}}}),
                Some("`profile.segmentMembership.ups.s` must be an object, not a string"),
                Some("ups.s`"),
            ),
            (
                json!({"segmentMembership": {"ups": {"s": null}}}),
                Some("`profile.segmentMembership.ups.s` must be an object, not null"),
                None,
            ),
            (
                json!({"segmentMembership": {"ups": {"s": {"status": 5}}}}),
                Some("`profile.segmentMembership.ups.s.status` must be a string, not a number"),
                Some("ups.s.status`"),
            ),
            (
                json!({"segmentMembership": {"ups": {"s": {"status": null}}}}),
                Some("`profile.segmentMembership.ups.s.status` must be a string, not null"),
                None,
            ),
            (
                json!({"identityMap": "x"}),
                Some("`profile.identityMap` must be an object, not a string"),
                Some("identityMap`"),
            ),
            (
                json!({"identityMap": {"ecid": {"id": "e1"}}}),
                Some("`profile.identityMap.ecid` must be an array of identity objects, not an object"),
                Some("identityMap.ecid`"),
            ),
            (
                json!({"identityMap": {"ecid": [{"id": "e1"}, "e2"]}}),
                Some("`profile.identityMap.ecid[1]` must be an identity object, not a string"),
                Some("ecid[1]`"),
            ),
        ];
        for (profile, as_upsert, as_patch) in table {
            let profile = profile.as_object().unwrap();
            let upsert = check(profile, Op::Upsert);
            let merge = check(profile, Op::Merge);
            match as_upsert {
                None => assert!(upsert.is_ok(), "{profile:?}: {upsert:?}"),
                Some(text) => assert_eq!(upsert, Err(text.to_owned()), "{profile:?}"),
            }
            match as_patch {
                None => assert!(merge.is_ok(), "{profile:?} as a patch: {merge:?}"),
                Some(path) => {
                    let reason = merge.unwrap_err();
                    assert!(reason.contains(path), "{profile:?} as a patch: {reason}");
                }
            }
        }
    }
}
