//! HTTP headers in the config: `destination.custom_headers`, whether a header carries a
//! token as it is, and which names say a value is a credential.

/// Whether a header's or query parameter's name says it carries a credential (`X-Api-Key`,
/// `access_token`, `Cookie`, `sig`, …): one of its words (split at `-`, `_` and `.`) begins
/// with a credential's word, so that `X-Assignment-Id` or `design` do not count.
pub(super) fn names_a_credential(name: &str) -> bool {
    const WORDS: [&str; 12] = [
        "key",
        "apikey",
        "token",
        "secret",
        "pass",
        "pwd",
        "auth",
        "sig",
        "credential",
        "cookie",
        "session",
        "jwt",
    ];
    name.to_ascii_lowercase()
        .split(['-', '_', '.'])
        .any(|word| WORDS.iter().any(|credential| word.starts_with(credential)))
}

/// `name1:value1,name2:value2`; names must be valid HTTP header names, values visible ASCII.
/// `Authorization` may be given only when outpost sends none itself (`auth_is_none`: an API
/// key scheme of the endpoint's own).
pub fn parse_custom_headers(
    text: Option<&str>,
    auth_is_none: bool,
) -> Result<Vec<(String, String)>, String> {
    let Some(text) = text else {
        return Ok(Vec::new());
    };
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    text.split(',')
        .enumerate()
        .map(|(i, pair)| {
            let n = i + 1;
            // What was written is not shown: a value may be a secret, and a `,` in one
            // makes its tail look like a header of its own.
            let (name, value) = pair.split_once(':').ok_or_else(|| {
                format!("header {n} has no `:` between name and value (format name1:value1,name2:value2; a value may not hold a `,`)")
            })?;
            let name = name.trim();
            let value = value.trim();
            if name.is_empty() {
                return Err(format!("header {n} has an empty name"));
            }
            hyper::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("header {n}: its name is not a valid header name"))?;
            hyper::header::HeaderValue::from_str(value).map_err(|_| {
                format!("header {n} ({name}): the value has characters not allowed in a header")
            })?;
            let reserved = [
                "content-type",
                "idempotency-key",
                "content-length",
                "host",
                // SPEC: `outpost/<version>`; a second one would make the endpoint see two.
                "user-agent",
            ];
            // About the connection or how the body is sent, which the HTTP client decides:
            // given here, the endpoint would misread the body (or HTTP/2 drop them).
            let connection_level = [
                "connection",
                "keep-alive",
                "proxy-connection",
                "transfer-encoding",
                "te",
                "trailer",
                "upgrade",
                "expect",
                "content-encoding",
            ];
            let lower = name.to_ascii_lowercase();
            if reserved.contains(&lower.as_str()) || (lower == "authorization" && !auth_is_none) {
                return Err(format!(
                    "header {n}: `{name}` is set by outpost and cannot be overridden{}",
                    if lower == "authorization" {
                        " (it may be given with destination.auth.type = \"none\")"
                    } else {
                        ""
                    }
                ));
            }
            if connection_level.contains(&lower.as_str()) {
                return Err(format!(
                    "header {n}: `{name}` is about the connection or how the body is sent, which outpost's HTTP client decides"
                ));
            }
            // Would go to the endpoint, never to a proxy.
            if lower == "proxy-authorization" {
                return Err(format!(
                    "header {n}: `{name}` would be sent to the endpoint, not to a proxy; give the \
                     proxy's credentials in destination.proxy (http://user:password@host:port)"
                ));
            }
            Ok((name.to_owned(), value.to_owned()))
        })
        .collect::<Result<Vec<_>, String>>()
        .and_then(|headers| match credential_given_twice(&headers) {
            Some(i) => Err(format!(
                "header {}: `{}` is given twice; give it once",
                i + 1,
                headers[i].0
            )),
            None => Ok(headers),
        })
}

/// The first header of `headers` that gives a credential (`Authorization`, a key, a cookie)
/// given before it: two reach the endpoint as a list, which a credential is not, and it may
/// read either, or refuse every export. Other names may repeat, as a list-valued header's
/// values, which may not hold a `,` here, must.
fn credential_given_twice(headers: &[(String, String)]) -> Option<usize> {
    let mut credentials = std::collections::HashSet::new();
    headers.iter().position(|(name, _)| {
        let name = name.to_ascii_lowercase();
        (name == "authorization" || names_a_credential(&name)) && !credentials.insert(name)
    })
}

/// `destination.custom_headers_file`, to be read again when the destination refuses what was
/// sent (`401`/`403`): an API key rotated in it would otherwise be refused until a restart.
#[derive(Clone, PartialEq, Eq)]
pub struct CustomHeadersFile {
    path: std::path::PathBuf,
    /// `destination.custom_headers`'s, which come first.
    inline: Vec<(String, String)>,
    auth_is_none: bool,
}

/// The values may be credentials: only the names show.
impl std::fmt::Debug for CustomHeadersFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.inline.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("CustomHeadersFile")
            .field("path", &self.path)
            .field("inline", &names)
            .field("auth_is_none", &self.auth_is_none)
            .finish()
    }
}

impl CustomHeadersFile {
    pub(super) fn new(
        path: std::path::PathBuf,
        inline: Vec<(String, String)>,
        auth_is_none: bool,
    ) -> CustomHeadersFile {
        CustomHeadersFile {
            path,
            inline,
            auth_is_none,
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Every custom header, `destination.custom_headers`'s and the file's as it reads now; an
    /// error names the file, never a value.
    pub fn read(&self, again: bool) -> Result<Vec<(String, String)>, String> {
        let text = super::secret::read_secret_file(&self.path, again)?;
        add_custom_headers_file(self.inline.clone(), &text, self.auth_is_none)
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }
}

/// `destination.custom_headers_file`'s headers (`text`, as read), after `inline`'s
/// (`destination.custom_headers`): as that key's, one a line or `,` between them, blank lines
/// left out. A credential given in both is refused, as one given twice in either. An error
/// names the line of the file at fault (and the header, when the line holds several).
fn add_custom_headers_file(
    inline: Vec<(String, String)>,
    text: &str,
    auth_is_none: bool,
) -> Result<Vec<(String, String)>, String> {
    let mut from_file = Vec::new();
    // The line of the file each of `from_file` is on.
    let mut lines = Vec::new();
    for (index, line) in text.split('\n').enumerate() {
        let line_number = index + 1;
        let pieces: Vec<&str> = line
            .trim_end_matches('\r')
            .split(',')
            .filter(|piece| !piece.trim().is_empty())
            .collect();
        let on_the_line = |error: String| match (pieces.len(), error.strip_prefix("header 1")) {
            (1, Some(rest)) => format!("line {line_number}{rest}"),
            _ => format!("line {line_number}, {error}"),
        };
        let headers =
            parse_custom_headers(Some(&pieces.join(",")), auth_is_none).map_err(on_the_line)?;
        lines.extend(std::iter::repeat_n(line_number, headers.len()));
        from_file.extend(headers);
    }
    if let Some(i) = credential_given_twice(&from_file) {
        return Err(format!(
            "line {}: `{}` is given twice; give it once",
            lines[i], from_file[i].0
        ));
    }
    let given_inline = inline.len();
    let headers: Vec<(String, String)> = inline.into_iter().chain(from_file).collect();
    match credential_given_twice(&headers) {
        Some(i) => Err(format!(
            "line {}: `{}` is given in destination.custom_headers too; give it once",
            lines[i - given_inline],
            headers[i].0
        )),
        None => Ok(headers),
    }
}

/// Whether `Authorization: Bearer <token>` carries `token` as it is: a header value read as
/// text holds only visible ASCII, spaces and tabs; one at its end is not the sender's, and
/// those after `Bearer` separate the token from it (RFC 9110 §11.4), as most receivers read
/// them, the ingest API among them.
pub(crate) fn header_can_carry(token: &str) -> bool {
    let carried = |b: u8| b.is_ascii_graphic() || b == b' ' || b == b'\t';
    token.bytes().all(carried) && !token.starts_with([' ', '\t']) && !token.ends_with([' ', '\t'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{environment, parse, VALID};

    #[test]
    fn custom_headers_parse_table() {
        assert_eq!(parse_custom_headers(None, false).unwrap(), vec![]);
        assert_eq!(parse_custom_headers(Some(""), false).unwrap(), vec![]);
        assert_eq!(
            parse_custom_headers(Some("a:1"), false).unwrap(),
            vec![("a".to_owned(), "1".to_owned())]
        );
        assert_eq!(
            parse_custom_headers(Some("a: x:y , b:2"), false).unwrap(),
            vec![
                ("a".to_owned(), "x:y".to_owned()),
                ("b".to_owned(), "2".to_owned())
            ]
        );
        for bad in [
            "a",
            "a:1,",
            ":1",
            "bad name:1",
            "Proxy-Authorization:Basic dTpw",
            "authorization:x",
            "User-Agent:acme/1",
            "a:b\u{1}c",
            "transfer-encoding:gzip",
            "Content-Encoding:gzip",
            "connection:close",
            "TE:trailers",
            "expect:100-continue",
        ] {
            assert!(
                parse_custom_headers(Some(bad), false).is_err(),
                "{bad:?} was accepted"
            );
        }
        // With no auth of outpost's own, the endpoint's scheme may go in Authorization.
        assert_eq!(
            parse_custom_headers(Some("Authorization:ApiKey k3y"), true).unwrap(),
            vec![("Authorization".to_owned(), "ApiKey k3y".to_owned())]
        );
        assert!(parse_custom_headers(Some("user-agent:x"), true).is_err());
        let twice = parse_custom_headers(Some("Authorization:ApiKey k3y,authorization:x"), true);
        assert_eq!(
            twice.unwrap_err(),
            "header 2: `authorization` is given twice; give it once"
        );
        let twice = parse_custom_headers(Some("x-api-key:k1,x-tenant:a,X-Api-Key:k2"), false);
        assert_eq!(
            twice.unwrap_err(),
            "header 3: `X-Api-Key` is given twice; give it once"
        );
        // A list-valued header's values, which may not hold a `,`, go as repeats.
        assert_eq!(
            parse_custom_headers(Some("x-scope:a,X-Scope:b"), false)
                .unwrap()
                .len(),
            2
        );
        // Values may be secrets: a mistyped separator, or a `,` inside a value, shows none.
        for (bad, secret) in [
            ("x-api-key=5f2b9c0e1a7d4e3f", "5f2b9c0e1a7d4e3f"),
            ("x-sig:abc,defghijk123", "defghijk123"),
            ("x-sig:abc,de fg:hijk123", "de fg"),
        ] {
            let error = parse_custom_headers(Some(bad), false).unwrap_err();
            assert!(!error.contains(secret), "{bad:?}: {error}");
        }
    }

    /// A custom header or query value named as a credential counts as a secret in the file,
    /// for the warning about a file others may read; others do not, however long.
    #[test]
    fn header_and_query_values_named_as_credentials_count_as_secrets_in_the_file() {
        let _environment = environment();
        for (headers, endpoint_query, counted) in [
            ("x-api-version:2,x-tenant:acme", "source=edge", &[][..]),
            // Long values, but no credentials by their names.
            (
                "x-api-version:2024-06-01,x-tenant:acme-corporation",
                "source=production-edge",
                &[][..],
            ),
            (
                "x-api-version:2,X-Api-Key:0123",
                "source=edge",
                &["destination.custom_headers"][..],
            ),
            (
                "x-api-version:2",
                "source=edge&access_token=abc&sig=f00",
                &["destination.http_endpoint"][..],
            ),
            (
                "Cookie:sid=1,X-Assignment-Id:7",
                "design=flat&format=json",
                &["destination.custom_headers"][..],
            ),
            ("X-Assignment-Id:7,X-Request-Id:9", "design=flat", &[][..]),
        ] {
            let text = VALID
                .replace("x-api-version:2,x-tenant:acme", headers)
                .replace("source=edge", endpoint_query);
            let secrets = parse(&text).unwrap().inline_secrets;
            let expected: Vec<&str> = ["destination.auth.client_secret"]
                .into_iter()
                .chain(counted.iter().copied())
                .collect();
            assert_eq!(secrets, expected, "{headers} {endpoint_query}");
        }
    }

    /// `custom_headers_file`'s headers come after `custom_headers`'s, one a line or `,`
    /// between them, and are checked as those are; a credential may be given in one of the
    /// two only.
    #[test]
    fn custom_headers_file_table() {
        let inline = || parse_custom_headers(Some("x-api-version:2"), false).unwrap();
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect()
        };
        type Sent<'a> = &'a [(&'a str, &'a str)];
        // (the file's text, the headers sent, or the start of the error)
        let cases: [(&str, Result<Sent, &str>); 8] = [
            (
                "X-Api-Key:5f2b9c0e1a7d",
                Ok(&[("x-api-version", "2"), ("X-Api-Key", "5f2b9c0e1a7d")]),
            ),
            (
                "\r\nX-Api-Key: 5f2b9c0e1a7d\r\n\r\nx-tenant:acme,x-region:eu\n",
                Ok(&[
                    ("x-api-version", "2"),
                    ("X-Api-Key", "5f2b9c0e1a7d"),
                    ("x-tenant", "acme"),
                    ("x-region", "eu"),
                ]),
            ),
            // A list-valued header may repeat; a credential may not.
            (
                "x-api-version:3",
                Ok(&[("x-api-version", "2"), ("x-api-version", "3")]),
            ),
            (
                "X-Api-Key:a\nx-api-key:b",
                Err("line 2: `x-api-key` is given twice"),
            ),
            ("api-key-only", Err("line 1 has no `:`")),
            ("Host:example.com", Err("line 1: `Host` is set by outpost")),
            (
                "x-tenant:acme\nx-bad name:1",
                Err("line 2: its name is not a valid header name"),
            ),
            // Lines, blank ones too, are counted, and headers on a line of several.
            (
                "\r\nx-tenant:acme\r\n\r\nx-region:eu, x-bad name:1",
                Err("line 4, header 2: its name is not a valid header name"),
            ),
        ];
        for (text, expected) in cases {
            let got = add_custom_headers_file(inline(), text, false);
            match expected {
                Ok(headers) => assert_eq!(got.unwrap(), pairs(headers), "{text:?}"),
                Err(start) => {
                    let error = got.unwrap_err();
                    assert!(error.starts_with(start), "{text:?}: {error}");
                    assert!(!error.contains("5f2b9c0e1a7d"), "{error}");
                }
            }
        }
        let with_key = parse_custom_headers(Some("X-Api-Key:a"), false).unwrap();
        assert_eq!(
            add_custom_headers_file(with_key, "x-api-key:b", false).unwrap_err(),
            "line 1: `x-api-key` is given in destination.custom_headers too; give it once"
        );
    }

    /// Headers read from `custom_headers_file` are sent, and are not secrets in the config
    /// file: only the file is warned of when others may read it.
    #[test]
    fn headers_from_a_file_are_sent_and_kept_out_of_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("headers"), "X-Api-Key:5f2b9c0e1a7d\n").unwrap();
        let text = VALID.replace(
            "custom_headers = \"x-api-version:2,x-tenant:acme\"",
            "custom_headers = \"x-api-version:2\"\ncustom_headers_file = \"headers\"",
        );
        assert_ne!(text, VALID);
        let config = super::super::Config::parse(&dir.path().join("outpost.toml"), &text).unwrap();
        let sent: Vec<(&str, &str)> = config
            .destination
            .custom_headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.expose()))
            .collect();
        assert_eq!(
            sent,
            [("x-api-version", "2"), ("X-Api-Key", "5f2b9c0e1a7d")]
        );
        assert_eq!(config.inline_secrets, ["destination.auth.client_secret"]);
        assert!(config
            .secret_files
            .iter()
            .any(|(key, _)| *key == "destination.custom_headers_file"));
        let missing = text.replace(
            "custom_headers_file = \"headers\"",
            "custom_headers_file = \"nope\"",
        );
        let error = super::super::Config::parse(&dir.path().join("outpost.toml"), &missing)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("destination.custom_headers_file: cannot read"),
            "{error}"
        );
    }
}
