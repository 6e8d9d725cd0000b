//! Numbers outpost cannot keep as given (pure).
//!
//! serde_json reads an integer literal beyond the 64-bit range as an `f64` (near it, not always
//! the nearest): `123456789012345678901234567890` would be stored, compared and sent as
//! `1.2345678901234568e29`, a value the sender never gave. XDM's integers stay within ±2^53, so
//! such an integer is refused, naming where it is, rather than passed on altered. Only values
//! the profile keeps count (an unmapped attribute is dropped whole), and a float literal
//! (`1e30`, `5.0`) is a float as given. So is a float too small for a double (`2.5e-400`),
//! which serde_json reads as zero: refused too.

use serde_json::{Map, Value};

/// The first value of `profile` that was read from an integer literal beyond 64 bits, as
/// (its dot path, the literal); `text` is the JSON the profile was parsed from. Walks only
/// the profile's values unless one of them is an `f64` that such a literal could have become;
/// only then is `text` scanned for the literal.
pub fn inexact_integer(profile: &Map<String, Value>, text: &[u8]) -> Option<(String, String)> {
    // Paths are made only for a profile that has a suspect: most have none.
    if !profile.values().any(|value| holds(value, suspect)) {
        return None;
    }
    // By value (the first path of each): a line may hold many such literals and many
    // suspects, and each literal is looked up once.
    let mut suspects = Vec::new();
    for (key, value) in profile {
        collect(value, key.clone(), suspect, &mut suspects);
    }
    let mut by_value = std::collections::HashMap::with_capacity(suspects.len());
    for (path, value) in suspects {
        by_value.entry(value.to_bits()).or_insert(path);
    }
    let beyond_64_bits = |token: &str| {
        let integer = token.bytes().skip(1).all(|b| b.is_ascii_digit());
        integer && token.parse::<i64>().is_err() && token.parse::<u64>().is_err()
    };
    number_literals(text)
        .filter(|token| beyond_64_bits(token))
        .find_map(|literal| {
            // As serde_json read it, which is not always the nearest float.
            let read_as: f64 = serde_json::from_str(literal).ok()?;
            let path = by_value.get(&read_as.to_bits())?;
            Some((path.clone(), literal.to_owned()))
        })
}

/// The first float literal of `text` whose digits are not all zeros that a value `profile`
/// keeps was read as (a signed) zero from: it lies under the smallest double (about 5e-324).
/// As (its dot path, unless another zero the profile keeps has its sign; the literal).
pub fn vanished_float(
    profile: &Map<String, Value>,
    text: &[u8],
) -> Option<(Option<String>, String)> {
    if !profile.values().any(|value| holds(value, float_zero)) {
        return None;
    }
    let mut zeros = Vec::new();
    for (key, value) in profile {
        collect(value, key.clone(), float_zero, &mut zeros);
    }
    let vanished = |token: &str| {
        let mantissa = token.split(['e', 'E']).next().unwrap_or("");
        token.contains(['.', 'e', 'E'])
            && mantissa.bytes().any(|b| matches!(b, b'1'..=b'9'))
            && token.parse::<f64>().is_ok_and(|v| v == 0.0)
    };
    number_literals(text)
        .filter(|token| vanished(token))
        .find_map(|literal| {
            let negative = literal.starts_with('-');
            let mut paths = zeros
                .iter()
                .filter(|(_, zero)| zero.is_sign_negative() == negative);
            let first = paths.next()?;
            let path = paths.next().is_none().then(|| first.0.clone());
            Some((path, literal.to_owned()))
        })
}

fn float_zero(value: &Value) -> Option<f64> {
    let v = value.as_number().filter(|n| n.is_f64())?.as_f64()?;
    (v == 0.0).then_some(v)
}

/// Whether `value` is an `f64` with no fraction outside the range of `i64` and `u64`: what an
/// integer literal beyond 64 bits reads as (one within it reads as an integer).
fn suspect(value: &Value) -> Option<f64> {
    const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;
    let v = value.as_number().filter(|n| n.is_f64())?.as_f64()?;
    (v.fract() == 0.0 && (v >= 2.0 * TWO_POW_63 || v <= -TWO_POW_63)).then_some(v)
}

/// Whether `value` is or holds a number `pick` picks.
fn holds(value: &Value, pick: fn(&Value) -> Option<f64>) -> bool {
    match value {
        Value::Array(items) => items.iter().any(|item| holds(item, pick)),
        Value::Object(map) => map.values().any(|item| holds(item, pick)),
        _ => pick(value).is_some(),
    }
}

/// The numbers in `value` that `pick` picks, with their paths.
fn collect(
    value: &Value,
    path: String,
    pick: fn(&Value) -> Option<f64>,
    out: &mut Vec<(String, f64)>,
) {
    match value {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                collect(item, format!("{path}[{i}]"), pick, out);
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                collect(item, format!("{path}.{key}"), pick, out);
            }
        }
        _ => out.extend(pick(value).map(|v| (path, v))),
    }
}

/// The number literals of a JSON text. Strings are skipped.
fn number_literals(text: &[u8]) -> impl Iterator<Item = &str> {
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
                    return Some(std::str::from_utf8(&text[start..i]).unwrap_or(""));
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
    fn floats_under_the_smallest_double_are_found_with_their_path() {
        let found = |profile: &str| {
            let value: Value = serde_json::from_str(profile).unwrap();
            vanished_float(value.as_object().unwrap(), profile.as_bytes())
        };
        // The profile; the path named (if any) and the literal found.
        type Found<'a> = Option<(Option<&'a str>, &'a str)>;
        let cases: &[(&str, Found)] = &[
            (r#"{"a":{"b":2.5e-400}}"#, Some((Some("a.b"), "2.5e-400"))),
            (r#"{"a":[0,-1E-999]}"#, Some((Some("a[1]"), "-1E-999"))),
            // Another kept zero of its sign: which one is not known.
            (r#"{"a":0.0,"b":1e-400}"#, Some((None, "1e-400"))),
            // ... but one of the other sign is no other candidate.
            (r#"{"a":-0.0,"b":1e-400}"#, Some((Some("b"), "1e-400"))),
            // Zeros written as zeros, the smallest double, and floats that are zero.
            (
                r#"{"a":0.0,"b":-0e5,"c":0.000e-999,"d":5e-324,"e":0}"#,
                None,
            ),
            (r#"{"s":"1e-400","a":0.0}"#, None),
        ];
        for (profile, expected) in cases {
            let expected = expected.map(|(p, l)| (p.map(str::to_owned), l.to_owned()));
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
