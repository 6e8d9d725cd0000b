//! A TOML error as the config shows it: where it is (line, column, and the table and key
//! when they can be told), never the line's text or the value, which may be a secret.

/// Where a TOML error is and what it says, without the line's text or the value: toml's own
/// message quotes the line, and a type error the value, which may be a secret (a
/// `client_secret` with a bad escape, say).
pub(super) fn parse_error_without_values(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end().lines().collect::<Vec<_>>();
    let message = without_unlikely_key(&without_value(&message.join("; ")));
    let Some(span) = error.span() else {
        return message;
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let Place { table, key } = place_of(text, before.len());
    let place = match (table, key) {
        (Some(table), Some(key)) => format!(" (`{table}.{key}`)"),
        (None, Some(key)) => format!(" (`{key}`)"),
        (Some(table), None) => format!(" (in [{table}])"),
        (None, None) => String::new(),
    };
    format!("line {line}, column {column}{place}: {message}")
}

/// Where an offset of a TOML text is: the table whose header comes last before it (or is on
/// its line), and the key whose value it lies in.
#[derive(Debug, Default, PartialEq)]
struct Place {
    table: Option<String>,
    key: Option<String>,
}

/// The table a line of TOML opens, when it is a table header (`[destination.auth]`, or an
/// entry of an array of tables: `[[mapping.segments]]`).
fn table_header(line: &str) -> Option<String> {
    let line = line.trim();
    let name = match line.strip_prefix("[[") {
        Some(rest) => rest.split("]]").next()?,
        None => line.strip_prefix('[')?.split(']').next()?,
    };
    // Only what TOML reads as a header alone.
    let is_header = toml::from_str::<toml::Table>(line).is_ok();
    is_header.then(|| name.trim().to_owned())
}

/// The table and the key whose value `offset` of the TOML `text` lies in (or that its line
/// sets), when they can be told: read past comments and strings, so that no text of a value (a
/// line of a secret in a multi-line string, say) is taken for a key or a table.
fn place_of(text: &str, offset: usize) -> Place {
    #[derive(Clone, Copy, PartialEq)]
    enum In {
        Code,
        Comment,
        /// A string, ended by this quote, three times for a multi-line one.
        Text(u8, usize),
    }
    let bytes = text.as_bytes();
    let offset = offset.min(bytes.len());
    // Read to the end of the line `offset` is on: its key may be set after it (an unknown
    // key's error points at the key itself).
    let line_end = bytes[offset..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |n| offset + n);
    let mut state = In::Code;
    // Brackets open in a value (a table header's close on its own line).
    let mut depth = 0usize;
    // The key set last at the top level, while its value lasts.
    let mut last_key: Option<String> = None;
    // The table whose header came last, on a line of its own.
    let mut table: Option<String> = None;
    let mut line_start = 0;
    // Where `offset` is: inside a value begun on an earlier line (its key), or not.
    let mut at_offset: Option<Option<String>> = None;
    let mut i = 0;
    while i < line_end {
        if i >= offset && at_offset.is_none() {
            // On a table's header (within its brackets, where a misspelt name is pointed at):
            // that table is the place, not the one before it.
            if state == In::Code && !text[line_start..offset].contains('=') {
                if let Some(header) = table_header(&text[line_start..line_end]) {
                    return Place {
                        table: Some(header),
                        key: None,
                    };
                }
            }
            let inside = state != In::Code || depth > 0;
            at_offset = Some(inside.then(|| last_key.clone()).flatten());
            if inside {
                break;
            }
        }
        let byte = bytes[i];
        let quotes = |quote: u8| {
            bytes[i..]
                .iter()
                .take(5)
                .take_while(|&&b| b == quote)
                .count()
        };
        let mut step = 1;
        match state {
            In::Comment if byte == b'\n' => state = In::Code,
            In::Comment => {}
            In::Text(b'"', _) if byte == b'\\' => step = 2,
            In::Text(quote, 1) if byte == quote => state = In::Code,
            // A multi-line string ends at three quotes, and may end in up to two more.
            In::Text(quote, 3) if quotes(quote) >= 3 => {
                step = quotes(quote);
                state = In::Code;
            }
            In::Text(..) => {}
            In::Code => match byte {
                b'"' | b'\'' => {
                    let multi_line = quotes(byte) >= 3;
                    step = if multi_line { 3 } else { 1 };
                    state = In::Text(byte, step);
                }
                b'#' => state = In::Comment,
                b'[' | b'{' => depth += 1,
                b']' | b'}' => depth = depth.saturating_sub(1),
                b'=' if depth == 0 => last_key = Some(text[line_start..i].trim().to_owned()),
                _ => {}
            },
        }
        let multi_line = matches!(state, In::Text(_, 3));
        if byte == b'\n' && !multi_line {
            if state == In::Code && depth == 0 {
                if let Some(header) = table_header(&text[line_start..i]) {
                    table = Some(header);
                }
            }
            line_start = i + 1;
            if state == In::Code && depth == 0 {
                last_key = None;
            }
        }
        i += step;
    }
    // Not inside a value begun before: the key the line sets, if it sets one.
    let key = match at_offset {
        Some(Some(key)) => Some(key),
        Some(None) | None if line_start <= offset => last_key,
        _ => None,
    };
    // The line `offset` is on, when it is a header (a table that lacks a key is told there).
    let outside_values = state == In::Code && depth == 0;
    if outside_values && line_start <= offset {
        if let Some(header) = table_header(&text[line_start..line_end]) {
            table = Some(header);
        }
    }
    // Only what TOML reads as a key: a line that lost its `=` may have one in its value.
    let key = key.filter(|key| {
        key.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.\" ".contains(c))
            && toml::from_str::<toml::Table>(&format!("{key} = 0")).is_ok()
            && looks_like_a_key(key)
    });
    Place { table, key }
}

/// Whether a key TOML read may be shown: outpost's keys are lower-case words joined by `_`,
/// without digits, none over 26 bytes. A secret pasted on a line of its own reads as a key
/// (`SuperS3cret=` sets the key `SuperS3cret`), and secrets mix cases, hold digits or run
/// long; one of short lower-case letters alone would still show.
fn looks_like_a_key(key: &str) -> bool {
    key.trim_matches(['"', ' ']).split('.').all(|part| {
        !part.is_empty()
            && part.len() <= MAX_KEY_SHOWN
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'-')
    })
}

/// The longest key an error shows: outpost's longest, `include_segment_timestamps`.
const MAX_KEY_SHOWN: usize = 26;

/// serde's "unknown field `X`, expected …" without `X` when it does not look like a key.
fn without_unlikely_key(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_owned();
    };
    match rest.split_once('`') {
        Some((key, after)) if !looks_like_a_key(key) => {
            format!(
                "unknown field (not shown: it does not read as a key, and may be a secret){after}"
            )
        }
        _ => message.to_owned(),
    }
}

/// serde's "invalid type: integer `5`, expected a string" (or `string "…"`) without the value:
/// "invalid type: integer, expected a string".
pub(super) fn without_value(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        let Some(rest) = message.strip_prefix(prefix) else {
            continue;
        };
        let kind = rest.split([' ', ',']).next().unwrap_or_default();
        return match rest.find(", expected") {
            Some(expected) => format!("{prefix}{kind}{}", &rest[expected..]),
            None => format!("{prefix}{kind}"),
        };
    }
    message.to_owned()
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{error_of, VALID};

    /// The key is named for an error on a line of its value that sets no key: in a
    /// multi-line array, or an inline table's value.
    #[test]
    fn an_error_inside_a_value_names_its_key() {
        let cases = [
            (
                "attributes = [\n  \"a.b\",\n  7,\n]",
                "line 16, column 3 (`mapping.attributes`): invalid type: integer, expected a string",
            ),
            (
                "attributes = [\"a.b\"] # a [comment\nidentities = [\n  # \"x\n  [1],\n]",
                "line 17, column 3 (`mapping.identities`): invalid type: sequence, expected a string",
            ),
        ];
        for (lines, expected) in cases {
            let text = VALID.replace(r#"attributes = ["person.name.firstName"]"#, lines);
            assert_ne!(text, VALID);
            let error = error_of(&text);
            assert!(error.contains(expected), "{lines}: {error}");
        }
    }

    /// A key left out is named with its table, at the table's header.
    #[test]
    fn a_missing_key_is_named_with_its_table() {
        let text = VALID.replace("type = \"oauth2_client_credentials\"\n", "");
        assert_ne!(text, VALID);
        let error = error_of(&text);
        assert!(
            error.contains("line 7, column 1 (in [destination.auth]): missing field `type`"),
            "{error}"
        );
        // An entry of an array of tables is its table.
        let text =
            VALID.replace("segments = [\"seg-a\"]\n", "") + "[[mapping.segments]]\nid = \"a\\q\"\n";
        let error = error_of(&text);
        assert!(
            error.contains("(`mapping.segments.id`): invalid escape sequence"),
            "{error}"
        );
    }

    /// A misspelt table's header is placed in that table, not in the one before it.
    #[test]
    fn a_misspelt_table_is_placed_at_its_own_header() {
        let text = VALID.replace("[storage]", "[delivry]\nmax_concurrency = 4\n\n[storage]");
        let error = error_of(&text);
        assert!(
            error.contains("line 17, column 2 (in [delivry]): unknown field `delivry`"),
            "{error}"
        );
    }

    /// A secret pasted on a line of its own reads as a key: one that does not look like
    /// outpost's keys (lower-case words joined by `_`) is not shown, while a mistyped key is.
    #[test]
    fn a_secret_read_as_a_key_is_not_shown() {
        for (line, expected) in [
            (
                "client_secret = \"x\"\nSuperSecretXYZ123=",
                "line 12, column 19 (in [destination.auth]): invalid string",
            ),
            (
                "client_secret = \"x\"\nSuperSecretXYZ123 = 1",
                "(in [destination.auth]): unknown field (not shown: it does not read as a key, and may be a secret), expected one of",
            ),
            (
                "client_secret = \"x\"\nc2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2Vj = 1",
                "unknown field (not shown",
            ),
            // A lower-case hex key, as API keys often are.
            (
                "client_secret = \"x\"\n5f2b9c0e1a7d4e3f5f2b9c0e1a7d4e3f=",
                "line 12, column 34 (in [destination.auth]): invalid string",
            ),
        ] {
            let text = VALID.replace(r#"client_secret = "s3cr3t-value""#, line);
            let error = error_of(&text);
            assert!(error.contains(expected), "{line}: {error}");
            assert!(
                !error.contains("SuperSecret") && !error.contains("c2Vj") && !error.contains("5f2b"),
                "{line}: {error}"
            );
        }
        let text = VALID.replace("client_id = \"edge-agent\"", "clinet_id = \"edge-agent\"");
        let error = error_of(&text);
        assert!(
            error.contains("(`destination.auth.clinet_id`): unknown field `clinet_id`"),
            "{error}"
        );
    }

    #[test]
    fn parse_errors_show_neither_the_line_nor_the_value() {
        // (the secret's line replaced with, what the error says)
        let cases = [
            (
                r#"client_secret = "s3cr3t\q-value""#,
                "line 11, column 26 (`destination.auth.client_secret`): invalid escape sequence",
            ),
            (
                "client_secret = s3cr3t-value",
                "line 11, column 17 (`destination.auth.client_secret`): invalid string",
            ),
            (
                "client_secret = 998877665544",
                "line 11, column 17 (`destination.auth.client_secret`): invalid type: integer, expected a string",
            ),
            // A secret in a multi-line string: no key is taken from its lines, but the one
            // that sets it is named.
            (
                "client_secret = \"\"\"\nc2VjcmV0=s3cr3t\\q\n\"\"\"",
                "line 12, column 18 (`destination.auth.client_secret`): invalid escape sequence",
            ),
            // Also after a comment that holds `"""`, which opens no string.
            (
                "# a multi-line string opens with \"\"\"\nclient_secret = \"\"\"\nc2VjcmV0=s3cr3t\\q\"\"\"",
                "line 13, column 18 (`destination.auth.client_secret`): invalid escape sequence",
            ),
            // And after a multi-line string that ends in more than three quotes.
            (
                "scope = \"\"\"x\"\"\"\"\nclient_secret = \"\"\"\nc2VjcmV0=s3cr3t\\q\"\"\"",
                "line 13, column 18 (`destination.auth.client_secret`): invalid escape sequence",
            ),
            // A `=` left out: the one in the value is not taken for the key's.
            (
                r#"client_secret "s3cr3t==""#,
                "line 11, column 15 (in [destination.auth]): ",
            ),
            (
                "client_secret c2VjcmV0=",
                "line 11, column 15 (in [destination.auth]): ",
            ),
            (
                r#"client_secret "s3cr3t" = x"#,
                "line 11, column 15 (in [destination.auth]): ",
            ),
            // A line of a multi-line string is not taken for a table's header.
            (
                "client_secret = \"\"\"\n[s3cr3t]\n\"\"\"\nscope = 5",
                "line 14, column 9 (`destination.auth.scope`): invalid type: integer, expected a string",
            ),
        ];
        for (line, expected) in cases {
            let text = VALID.replace(r#"client_secret = "s3cr3t-value""#, line);
            assert_ne!(text, VALID);
            let secret = line
                .trim_start_matches("client_secret = ")
                .trim_matches('"');
            let error = error_of(&text);
            assert!(error.contains(expected), "{line}: {error}");
            assert!(!error.contains(secret), "{line}: {error}");
            assert!(!error.contains("s3cr3t"), "{line}: {error}");
            assert!(!error.contains("c2Vj"), "{line}: {error}");
        }
        // A string where a number belongs: serde quotes it with `"`, not backticks.
        let text = VALID.replace(
            "[storage]",
            "[delivery]\nmax_concurrency = \"s3cr3t-value\"\n\n[storage]",
        );
        let error = error_of(&text);
        assert!(error.contains("invalid type: string, expected"), "{error}");
        assert!(!error.contains("s3cr3t"), "{error}");
    }
}
