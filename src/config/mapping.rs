//! `[mapping]`: which parts of a profile reach the destination (attributes, segments,
//! identity namespaces), and what each segment's entry of a payload carries.

use std::collections::BTreeMap;

use super::raw::{RawMapping, RawSegmentTable};
use super::toml_error::without_value;
use super::KeyError;

/// Which parts of a profile reach the destination.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mapping {
    /// Dot paths of object keys, each split into its keys.
    pub attributes: Vec<Vec<String>>,
    pub segments: Vec<String>,
    /// Empty means every namespace.
    pub identities: Vec<String>,
    /// What the config says of a segment besides its id (name, its own times), by id.
    pub segment_details: BTreeMap<String, SegmentDetails>,
    /// Each mapped segment entry of a payload gets its `name` (when known).
    pub include_segment_names: bool,
    /// Each gets `createdAt`, `updatedAt` (when given) and `mappingCreatedAt`,
    /// `mappingUpdatedAt` (from [`Mapping::mapped_at`]), in Unix epoch milliseconds.
    pub include_segment_timestamps: bool,
    /// When each segment was first mapped and when its entry last changed (or it was mapped
    /// again), as the store recorded them (`Store::record_mapping`); empty until then.
    pub mapped_at: BTreeMap<String, MappedAt>,
}

/// A segment's name and times, from its `mapping.segments` table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SegmentDetails {
    pub name: Option<String>,
    /// Unix epoch milliseconds.
    pub created_at_ms: Option<i64>,
    pub updated_at_ms: Option<i64>,
}

/// When a segment was first mapped and when its mapping entry last changed, or it was mapped
/// again after leaving the mapping (epoch ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct MappedAt {
    pub created_ms: i64,
    pub updated_ms: i64,
}

impl Mapping {
    /// What decides which parts of a profile are stored, and which segments are exported, in
    /// one line: two stores hand profiles over only when theirs are the same
    /// ([`crate::store::handover`]).
    pub fn fingerprint(&self) -> String {
        let mut attributes: Vec<String> = self.attributes.iter().map(|p| p.join(".")).collect();
        attributes.sort();
        let mut identities = self.identities.clone();
        identities.sort();
        let mut segments = self.segments.clone();
        segments.sort();
        format!(
            "attributes [{}], identities [{}], segments [{}]",
            attributes.join(", "),
            if identities.is_empty() {
                "all".to_string()
            } else {
                identities.join(", ")
            },
            segments.join(", ")
        )
    }

    /// Builds a mapping from dot paths, without a config file; used by tests, benches and the
    /// fuzz target `apply_update`.
    pub fn new(attributes: &[&str], segments: &[&str], identities: &[&str]) -> Mapping {
        Mapping {
            attributes: attributes
                .iter()
                .map(|path| path.split('.').map(str::to_owned).collect())
                .collect(),
            segments: segments.iter().map(|s| (*s).to_owned()).collect(),
            identities: identities.iter().map(|s| (*s).to_owned()).collect(),
            ..Mapping::default()
        }
    }
}

/// What a payload's segment entries will lack although the mapping asks for it: a name
/// (`include_segment_names`) or the segment's own times (`include_segment_timestamps`) that
/// `mapping.segments` does not give. The agent has no other source for them, so an entry
/// without them goes out without those fields.
pub(super) fn missing_segment_details_warnings(mapping: &Mapping) -> Vec<String> {
    let lacking = |lacks: &dyn Fn(&SegmentDetails) -> bool| -> Vec<&str> {
        let none = SegmentDetails::default();
        mapping
            .segments
            .iter()
            .filter(|id| lacks(mapping.segment_details.get(*id).unwrap_or(&none)))
            .map(String::as_str)
            .collect()
    };
    let listed = |ids: &[&str]| {
        const SHOWN: usize = 5;
        let mut text = ids
            .iter()
            .take(SHOWN)
            .map(|id| format!("`{id}`"))
            .collect::<Vec<_>>()
            .join(", ");
        if ids.len() > SHOWN {
            text.push_str(&format!(" and {} more", ids.len() - SHOWN));
        }
        text
    };
    let mut warnings = Vec::new();
    if mapping.include_segment_names {
        let unnamed = lacking(&|d| d.name.is_none());
        if !unnamed.is_empty() {
            warnings.push(format!(
                "mapping.include_segment_names is true, but {} of the mapped segments have no name ({}): their entries go without `name`; give each as a table, {{ id = \"…\", name = \"…\" }}",
                unnamed.len(),
                listed(&unnamed)
            ));
        }
    }
    if mapping.include_segment_timestamps {
        let untimed = lacking(&|d| d.created_at_ms.is_none() || d.updated_at_ms.is_none());
        if !untimed.is_empty() {
            warnings.push(format!(
                "mapping.include_segment_timestamps is true, but {} of the mapped segments lack created_at or updated_at ({}): their entries go without `createdAt` or `updatedAt` (`mappingCreatedAt` and `mappingUpdatedAt` are the agent's own); give them in each segment's table",
                untimed.len(),
                listed(&untimed)
            ));
        }
    }
    warnings
}

pub(super) fn validate_mapping(raw: RawMapping) -> Result<Mapping, KeyError> {
    use crate::profile::prune::RAW_VALUE_TOKEN;
    if raw.segments.is_empty() {
        return Err(("mapping.segments", "must name at least one segment".into()));
    }
    let mut segments = Vec::with_capacity(raw.segments.len());
    let mut segment_details = BTreeMap::new();
    for (n, segment) in raw.segments.into_iter().enumerate() {
        let (id, details) = match segment {
            toml::Value::String(id) => (id, None),
            toml::Value::Table(table) => {
                let table: RawSegmentTable = table.try_into().map_err(|e| {
                    let message: Vec<String> = e
                        .to_string()
                        .trim_end()
                        .lines()
                        .map(without_value)
                        .collect();
                    (
                        "mapping.segments",
                        format!("entry {}: {}", n + 1, message.join("; ")),
                    )
                })?;
                let time = |value: Option<toml::Value>, key: &str| {
                    value
                        .map(|value| match value {
                            toml::Value::String(text) => Ok(text),
                            toml::Value::Datetime(time) => Ok(time.to_string()),
                            other => Err((
                                "mapping.segments",
                                format!(
                                    "segment `{}`: {key} must be an RFC 3339 time, not {}",
                                    table.id,
                                    other.type_str()
                                ),
                            )),
                        })
                        .transpose()?
                        .map(|t| {
                            chrono::DateTime::parse_from_rfc3339(&t)
                                .map(|t| t.timestamp_millis())
                                .map_err(|e| {
                                    (
                                        "mapping.segments",
                                        format!(
                                        "segment `{}`: {key} `{t}` is not an RFC 3339 time: {e}",
                                        table.id
                                    ),
                                    )
                                })
                        })
                        .transpose()
                };
                let details = SegmentDetails {
                    name: table.name.clone().filter(|n| !n.is_empty()),
                    created_at_ms: time(table.created_at.clone(), "created_at")?,
                    updated_at_ms: time(table.updated_at.clone(), "updated_at")?,
                };
                (table.id, Some(details))
            }
            other => {
                return Err((
                    "mapping.segments",
                    format!(
                        "entry {}: `{other}` is neither a segment id nor a table with `id`",
                        n + 1
                    ),
                ))
            }
        };
        if id.trim().is_empty() {
            return Err(("mapping.segments", format!("`{id}` is not a segment id")));
        }
        if id.trim() != id {
            return Err(("mapping.segments", padded(&id)));
        }
        if segments.contains(&id) {
            return Err((
                "mapping.segments",
                format!("segment `{id}` is listed twice"),
            ));
        }
        if let Some(details) = details {
            segment_details.insert(id.clone(), details);
        }
        segments.push(id);
    }
    let mut attributes = Vec::with_capacity(raw.attributes.len());
    for path in &raw.attributes {
        let keys: Vec<String> = path.split('.').map(str::to_owned).collect();
        if keys.iter().any(String::is_empty) {
            return Err((
                "mapping.attributes",
                format!("`{path}` is not a dot path of object keys"),
            ));
        }
        if keys.iter().any(|key| key.trim() != key) {
            return Err(("mapping.attributes", padded(path)));
        }
        // The payload writes these two parts from the identity and segment mappings, so an
        // attribute inside them could export a change the payload does not carry.
        let instead = match keys[0].as_str() {
            "identityMap" => Some("list the namespace in mapping.identities"),
            "segmentMembership" => Some("list the segment id in mapping.segments"),
            _ => None,
        };
        if let Some(instead) = instead {
            return Err((
                "mapping.attributes",
                format!(
                    "`{path}` is inside {}, which the payload carries as the identity and \
                     segment mappings decide, not as an attribute: {instead}",
                    keys[0]
                ),
            ));
        }
        // Listed twice, it would count twice in the mapping's fingerprint, which a take-over
        // compares with the giving agent's.
        if attributes.contains(&keys) {
            return Err(("mapping.attributes", format!("`{path}` is listed twice")));
        }
        if keys.iter().any(|key| key == RAW_VALUE_TOKEN) {
            return Err((
                "mapping.attributes",
                format!("`{path}` holds the JSON parser's own key `{RAW_VALUE_TOKEN}`"),
            ));
        }
        attributes.push(keys);
    }
    if let Some(ns) = raw
        .identities
        .iter()
        .find(|s| s.trim().is_empty() || *s == RAW_VALUE_TOKEN)
    {
        return Err(("mapping.identities", format!("`{ns}` is not a namespace")));
    }
    if let Some(ns) = raw.identities.iter().find(|ns| ns.trim() != *ns) {
        return Err(("mapping.identities", padded(ns)));
    }
    let twice =
        (1..raw.identities.len()).find(|&n| raw.identities[..n].contains(&raw.identities[n]));
    if let Some(n) = twice {
        let ns = &raw.identities[n];
        return Err(("mapping.identities", format!("`{ns}` is listed twice")));
    }
    Ok(Mapping {
        attributes,
        segments,
        identities: raw.identities,
        segment_details,
        include_segment_names: raw.include_segment_names,
        include_segment_timestamps: raw.include_segment_timestamps,
        mapped_at: BTreeMap::new(),
    })
}

/// The refusal of a name with a space (or tab) at an end, which no profile's would match.
fn padded(name: &str) -> String {
    format!(
        "`{}` has a space at the start or end of a name, which no profile's would match; remove it",
        name.escape_debug()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{environment, error_of, parse, VALID};

    #[test]
    fn attributes_inside_the_identity_or_segment_parts_are_refused() {
        let with = |paths: &str| {
            VALID.replacen(
                "attributes = [\"person.name.firstName\"]",
                &format!("attributes = [{paths}]"),
                1,
            )
        };
        for (paths, part) in [
            ("\"identityMap.CRM\"", "identityMap"),
            (
                "\"person.name.firstName\", \"segmentMembership.ups.S\"",
                "segmentMembership",
            ),
            ("\"identityMap\"", "identityMap"),
        ] {
            let error = error_of(&with(paths));
            assert!(
                error.contains("mapping.attributes") && error.contains(part),
                "{paths}: {error}"
            );
        }
        let config = parse(&with("\"identityMapping.x\", \"person.segmentMembership\""))
            .expect("paths that only look alike are attributes");
        assert_eq!(config.mapping.attributes.len(), 2);
    }

    /// A stored object may not hold serde_json's own token key, so no mapping names it.
    #[test]
    fn the_json_parsers_own_key_is_no_attribute_or_namespace() {
        let token = "$serde_json::private::RawValue";
        let attribute = VALID.replacen(
            "attributes = [\"person.name.firstName\"]",
            &format!("attributes = [\"person.{token}\"]"),
            1,
        );
        let error = error_of(&attribute);
        assert!(
            error.contains("mapping.attributes") && error.contains("JSON parser's own key"),
            "{error}"
        );
        let namespace = VALID.replacen(
            "segments = [\"seg-a\"]",
            &format!("segments = [\"seg-a\"]\nidentities = [\"{token}\"]"),
            1,
        );
        let error = error_of(&namespace);
        assert!(
            error.contains("mapping.identities") && error.contains("is not a namespace"),
            "{error}"
        );
    }

    /// As a segment is: each would count twice in the mapping's fingerprint.
    #[test]
    fn an_attribute_or_namespace_listed_twice_is_refused() {
        let text = VALID.replacen(
            "attributes = [\"person.name.firstName\"]",
            "attributes = [\"a.b\", \"a\", \"a.b\"]",
            1,
        );
        let error = error_of(&text);
        assert!(
            error.contains("mapping.attributes: `a.b` is listed twice"),
            "{error}"
        );
        let text = VALID.replacen(
            "segments = [\"seg-a\"]",
            "segments = [\"seg-a\"]\nidentities = [\"ecid\", \"email\", \"ecid\"]",
            1,
        );
        let error = error_of(&text);
        assert!(
            error.contains("mapping.identities: `ecid` is listed twice"),
            "{error}"
        );
    }

    /// A name with a space at an end never matches a profile's, so it is a mistake to say; a
    /// segment table's error is one line, without the value.
    #[test]
    fn names_padded_with_spaces_and_bad_segment_tables_are_refused_on_one_line() {
        for (from, to, says) in [
            (
                "segments = [\"seg-a\"]",
                "segments = [\"seg-a\", \"seg-b \"]",
                "mapping.segments: `seg-b ` has a space at the start or end of a name",
            ),
            (
                "attributes = [\"person.name.firstName\"]",
                "attributes = [\"person. name\"]",
                "mapping.attributes: `person. name` has a space",
            ),
            (
                "segments = [\"seg-a\"]",
                "segments = [\"seg-a\"]\nidentities = [\"\\tecid\"]",
                "mapping.identities: `\\tecid` has a space",
            ),
            (
                "segments = [\"seg-a\"]",
                "segments = [\"seg-a\", { id = 5 }]",
                "mapping.segments: entry 2: invalid type: integer, expected a string; in `id`",
            ),
        ] {
            let text = VALID.replacen(from, to, 1);
            assert_ne!(text, VALID);
            let error = error_of(&text);
            assert!(error.contains(says), "{to}: {error}");
            assert!(!error.contains('\n'), "{to}: {error}");
        }
    }

    /// The agent has nothing but the config to name a segment or date it, so asking for what
    /// the config does not give is warned of, listing the segments that go without.
    #[test]
    fn asking_for_segment_details_the_config_does_not_give_is_warned_of() {
        // The environment's secrets would add warnings (one test sets them).
        let _environment = environment();
        let with = |segments: &str, switches: &str| {
            parse(&VALID.replace(
                "segments = [\"seg-a\"]",
                &format!("segments = [{segments}]\n{switches}"),
            ))
            .unwrap()
            .warnings
        };
        let whole = "{ id = \"seg-b\", name = \"VIPs\", created_at = 2025-10-01T00:00:00Z, updated_at = 2026-01-05T10:00:00Z }";
        let both = "include_segment_names = true\ninclude_segment_timestamps = true";
        assert_eq!(with(whole, both), Vec::<String>::new());
        // Nothing asked for, nothing to warn of.
        assert_eq!(with("\"seg-a\", \"seg-c\"", ""), Vec::<String>::new());

        let warned = with(
            &format!("\"seg-a\", {whole}, {{ id = \"seg-c\", name = \"Lapsed\" }}"),
            both,
        );
        assert_eq!(warned.len(), 2, "{warned:?}");
        assert!(
            warned[0].starts_with("mapping.include_segment_names")
                && warned[0].contains("1 of the mapped segments have no name (`seg-a`)"),
            "{warned:?}"
        );
        assert!(
            warned[1].starts_with("mapping.include_segment_timestamps")
                && warned[1].contains(
                    "2 of the mapped segments lack created_at or updated_at (`seg-a`, `seg-c`)"
                ),
            "{warned:?}"
        );
        assert_eq!(
            with("\"seg-a\"", "include_segment_timestamps = true").len(),
            1
        );

        let many: Vec<String> = (1..=7).map(|n| format!("\"s{n}\"")).collect();
        let warned = with(&many.join(", "), "include_segment_names = true");
        assert!(
            warned[0].contains(
                "7 of the mapped segments have no name (`s1`, `s2`, `s3`, `s4`, `s5` and 2 more)"
            ),
            "{warned:?}"
        );
    }

    #[test]
    fn segments_as_tables_with_names_and_times() {
        let text = VALID.replace(
            "segments = [\"seg-a\"]",
            "segments = [\"seg-a\", { id = \"seg-b\", name = \"Lapsed VIPs\", created_at = \"2025-10-01T00:00:00Z\", updated_at = \"2026-01-05T10:00:00+00:00\" }, { id = \"seg-c\" }]\ninclude_segment_names = true\ninclude_segment_timestamps = true",
        );
        let mapping = parse(&text).unwrap().mapping;
        assert_eq!(mapping.segments, ["seg-a", "seg-b", "seg-c"]);
        assert!(mapping.include_segment_names && mapping.include_segment_timestamps);
        assert_eq!(
            mapping.segment_details["seg-b"],
            SegmentDetails {
                name: Some("Lapsed VIPs".into()),
                created_at_ms: Some(1_759_276_800_000),
                updated_at_ms: Some(1_767_607_200_000),
            }
        );
        assert_eq!(mapping.segment_details["seg-c"], SegmentDetails::default());
        assert!(!mapping.segment_details.contains_key("seg-a"));
        // TOML's own date-times, unquoted, say the same.
        let unquoted = text
            .replace("\"2025-10-01T00:00:00Z\"", "2025-10-01T00:00:00Z")
            .replace("\"2026-01-05T10:00:00+00:00\"", "2026-01-05T10:00:00+00:00");
        assert_ne!(unquoted, text);
        assert_eq!(
            parse(&unquoted).unwrap().mapping.segment_details,
            mapping.segment_details
        );

        let defaults = parse(VALID).unwrap().mapping;
        assert!(!defaults.include_segment_names && !defaults.include_segment_timestamps);

        let table = [
            (
                "{ id = \"seg-b\", created_at = \"yesterday\" }",
                "created_at `yesterday`",
            ),
            (
                "{ id = \"seg-b\", created_at = 2025-10-01T00:00:00 }",
                "created_at `2025-10-01T00:00:00` is not an RFC 3339 time",
            ),
            (
                "{ id = \"seg-b\", updated_at = 5 }",
                "updated_at must be an RFC 3339 time, not integer",
            ),
            ("{ id = \"seg-b\", colour = \"red\" }", "mapping.segments"),
            ("{ name = \"no id\" }", "mapping.segments"),
            ("\"seg-a\"", "listed twice"),
        ];
        for (entry, expected) in table {
            let text = VALID.replace(
                "segments = [\"seg-a\"]",
                &format!("segments = [\"seg-a\", {entry}]"),
            );
            let error = error_of(&text);
            assert!(error.contains(expected), "{entry}: {error}");
        }
    }
}
