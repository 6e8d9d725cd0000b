//! Integers outpost cannot keep exactly (pure).
//!
//! serde_json reads an integer literal beyond the 64-bit range as an `f64` (near it, not always
//! the nearest): `123456789012345678901234567890` would be stored, compared and sent as
//! `1.2345678901234568e29`, a value the sender never gave. XDM's integers stay within ±2^53, so
//! such an integer is refused, naming where it is, rather than passed on altered. Only values
//! the profile keeps count (an unmapped attribute is dropped whole), and a float literal
//! (`1e30`, `5.0`) is a float as given.

use serde_json::{Map, Value};

/// The first value of `profile` that was read from an integer literal beyond 64 bits, as
/// (its dot path, the literal); `text` is the JSON the profile was parsed from. Walks only
/// the profile's values unless one of them is an `f64` that such a literal could have become;
/// only then is `text` scanned for the literal.
pub fn inexact_integer(profile: &Map<String, Value>, text: &[u8]) -> Option<(String, String)> {
    // Paths are made only for a profile that has a suspect: most have none.
    if !profile.values().any(has_suspect) {
        return None;
    }
    // By value (the first path of each): a line may hold many such literals and many
    // suspects, and each literal is looked up once.
    let mut suspects = Vec::new();
    for (key, value) in profile {
        collect_suspects(value, key.clone(), &mut suspects);
    }
    let mut by_value = std::collections::HashMap::with_capacity(suspects.len());
    for (path, value) in suspects {
        by_value.entry(value.to_bits()).or_insert(path);
    }
    integer_literals_beyond_64_bits(text).find_map(|literal| {
        // As serde_json read it, which is not always the nearest float.
        let read_as: f64 = serde_json::from_str(literal).ok()?;
        let path = by_value.get(&read_as.to_bits())?;
        Some((path.clone(), literal.to_owned()))
    })
}

/// Whether `value` is an `f64` with no fraction outside the range of `i64` and `u64`: what an
/// integer literal beyond 64 bits reads as (one within it reads as an integer).
fn suspect(value: &Value) -> Option<f64> {
    const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;
    let v = value.as_number().filter(|n| n.is_f64())?.as_f64()?;
    (v.fract() == 0.0 && (v >= 2.0 * TWO_POW_63 || v <= -TWO_POW_63)).then_some(v)
}

fn has_suspect(value: &Value) -> bool {
    match value {
        Value::Array(items) => items.iter().any(has_suspect),
        Value::Object(map) => map.values().any(has_suspect),
        _ => suspect(value).is_some(),
    }
}

/// The suspects in `value`, with their paths.
fn collect_suspects(value: &Value, path: String, out: &mut Vec<(String, f64)>) {
    match value {
        Value::Number(_) => {
            if let Some(v) = suspect(value) {
                out.push((path, v));
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                collect_suspects(item, format!("{path}[{i}]"), out);
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                collect_suspects(item, format!("{path}.{key}"), out);
            }
        }
        _ => {}
    }
}

/// The integer literals (digits, maybe a leading `-`; no fraction or exponent) of a JSON
/// text that fit neither `i64` nor `u64`. Strings are skipped.
fn integer_literals_beyond_64_bits(text: &[u8]) -> impl Iterator<Item = &str> {
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < text.len() {
            match text[i] {
                b'"' => {
                    i += 1;
                    while i < text.len() && text[i] != b'"' {
                        i += if text[i] == b'\\' { 2 } else { 1 };
                    }
                    i += 1;
                }
                b'-' | b'0'..=b'9' => {
                    let start = i;
                    while i < text.len()
                        && matches!(text[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                    {
                        i += 1;
                    }
                    let token = std::str::from_utf8(&text[start..i]).unwrap_or("");
                    let integer = token.bytes().skip(1).all(|b| b.is_ascii_digit());
                    if integer && token.parse::<i64>().is_err() && token.parse::<u64>().is_err() {
                        return Some(token);
                    }
                }
                _ => i += 1,
            }
        }
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(profile: &str) -> Option<(String, String)> {
        let value: Value = serde_json::from_str(profile).unwrap();
        inexact_integer(value.as_object().unwrap(), profile.as_bytes())
    }

    #[test]
    fn integers_beyond_64_bits_are_found_with_their_path() {
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            (
                r#"{"a":{"b":123456789012345678901234567890}}"#,
                Some(("a.b", "123456789012345678901234567890")),
            ),
            (
                r#"{"a":[1,-9223372036854775809]}"#,
                Some(("a[1]", "-9223372036854775809")),
            ),
            (
                r#"{"a":18446744073709551616}"#,
                Some(("a", "18446744073709551616")),
            ),
            // serde_json reads this one a step away from the nearest float.
            (
                r#"{"a":24177763170669074391500}"#,
                Some(("a", "24177763170669074391500")),
            ),
            (
                r#"{"s":"99999999999999999999999","a":{"b":99999999999999999999999}}"#,
                Some(("a.b", "99999999999999999999999")),
            ),
            // Within 64 bits: kept exactly.
            (
                r#"{"a":18446744073709551615,"b":-9223372036854775808}"#,
                None,
            ),
            // Float literals are floats as given.
            (
                r#"{"a":1e30,"b":123456789012345678901234567890.0,"c":-5.0}"#,
                None,
            ),
            // A long run of digits in a string (an ECID) is no number.
            (
                r#"{"ecid":"12345678901234567890123456789012345678","a":1e22}"#,
                None,
            ),
            (r#"{"k\"":"\"12345678901234567890123","a":1e22}"#, None),
            (
                r#"{"k":"\\","a":12345678901234567890123}"#,
                Some(("a", "12345678901234567890123")),
            ),
        ];
        for (profile, expected) in cases {
            let expected = expected.map(|(p, l)| (p.to_owned(), l.to_owned()));
            assert_eq!(found(profile), expected, "{profile}");
        }
    }

    #[test]
    fn a_big_integer_that_was_not_kept_is_no_concern() {
        let text = r#"{"kept":1e22,"dropped":123456789012345678901234567890}"#;
        let kept: Value = serde_json::from_str(r#"{"kept":1e22}"#).unwrap();
        assert_eq!(
            inexact_integer(kept.as_object().unwrap(), text.as_bytes()),
            None
        );
    }
}
