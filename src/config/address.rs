//! Addresses: the destination's HTTP URLs as they are checked, an address shown without
//! what may be secret in it, and whether a host is this one.

use url::Url;

/// Whether a URL's host (as text: `[::1]` with its brackets or without) is this host's
/// loopback (`localhost`, 127.0.0.0/8, `::1`). Text, since the URL parser keeps the host of a
/// scheme it does not know (`nats://127.0.0.1`) as text, an IP address among them.
pub(crate) fn names_this_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    // A name's trailing dot roots it: `localhost.` is `localhost`.
    host.strip_suffix('.')
        .unwrap_or(host)
        .eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// An endpoint of the destination (`destination.http_endpoint` or
/// `destination.auth.auth_endpoint`): an http or https URL with a host, and without a user or
/// password, which the HTTP client would neither send nor keep out of its logs.
pub(super) fn parse_http_url(text: &str) -> Result<Url, String> {
    if text.trim().is_empty() {
        return Err("must not be empty".into());
    }
    let shown = redacted_address(text);
    // `api.example.com/x` fails to parse, and `localhost:8080/x` parses with the scheme
    // `localhost` (a port where the scheme's text would begin): both are an address written
    // without its scheme.
    let without_scheme = || format!("`{shown}` has no scheme: begin it with https:// (or http://)");
    let url = Url::parse(text).map_err(|e| match e {
        url::ParseError::RelativeUrlWithoutBase => without_scheme(),
        e => format!("`{shown}` is not a URL: {e}"),
    })?;
    match url.scheme() {
        "http" | "https" => {}
        scheme if text[scheme.len() + 1..].starts_with(|c: char| c.is_ascii_digit()) => {
            return Err(without_scheme())
        }
        other => return Err(format!("scheme `{other}` is not http or https")),
    }
    // The URL standard takes the first segment of `https:///profiles` for its host
    // (`https://profiles/`): a host left out, which would be looked up as the name `profiles`.
    let after_scheme = text
        .trim_start()
        .get(url.scheme().len() + 1..)
        .unwrap_or("");
    let empty_authority = after_scheme
        .chars()
        .take(3)
        .filter(|&c| c == '/' || c == '\\')
        .count()
        == 3;
    if url.host_str().is_none_or(str::is_empty) || empty_authority {
        return Err(format!("`{shown}` has no host"));
    }
    // The HTTP client sends no credentials from the URL, and would log them (hyper's pool
    // names its connections by scheme and authority).
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "`{shown}` carries a user name or password, which are not sent from the URL; \
             give credentials in destination.auth or destination.custom_headers"
        ));
    }
    if url.fragment().is_some() {
        return Err(format!(
            "`{shown}` has a fragment (after #), which is never sent: leave it out, or write a # \
             the endpoint needs as %23"
        ));
    }
    // What the URL parser takes and HTTP cannot (`{{host}}` left unfilled), refused here
    // rather than when the agent starts, after it opened the store.
    if let Err(e) = url.as_str().parse::<hyper::Uri>() {
        return Err(format!("`{shown}` is not an address HTTP can use: {e}"));
    }
    Ok(url)
}

/// An address as text fit for an error message, without what may be secret: everything
/// before its last `@` but a leading `scheme://` is shown as `***` (a user, password or token
/// may be written in several ways a parser accepts, `https:u:p@h`, `https:///u:p@h` or
/// `token@host:4222` without a scheme, and may hold `/`, `?` or `#`; a path with an `@` in it
/// is hidden too, which errors can afford), and the query and fragment after it are left out,
/// as API keys often travel in a query.
pub(crate) fn redacted_address(text: &str) -> String {
    let query = text.find(['?', '#']);
    let (shown, rest) = match text.rfind('@') {
        // An `@` after a `?` or `#` may be in the query (`?user=ops@corp&key=…`) or in a
        // password holding one: either way nothing after the scheme is shown.
        Some(at) if query.is_some_and(|q| q < at) => (format!("{}***", scheme_of(text)), "?"),
        Some(at) => (format!("{}***", scheme_of(&text[..at])), &text[at..]),
        None => (String::new(), text),
    };
    match rest.find(['?', '#']) {
        // `?…` or `#…`, as the address has it.
        Some(cut) => format!("{shown}{}{}…", &rest[..cut], &rest[cut..cut + 1]),
        None => format!("{shown}{rest}"),
    }
}

/// A leading `scheme://` of `text`, or "".
fn scheme_of(text: &str) -> &str {
    text.find("://")
        .filter(|&i| {
            text[..i]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        })
        .map_or("", |i| &text[..i + 3])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{error_of, VALID};

    #[test]
    fn addresses_in_errors_show_neither_credentials_nor_queries() {
        for (address, shown) in [
            ("s3cret@10.0.0.5:4222", "***@10.0.0.5:4222"),
            (
                "nats://user:s3cret@10.0.0.5:4222",
                "nats://***@10.0.0.5:4222",
            ),
            ("https:id:s3cret@api.example.com/x", "***@api.example.com/x"),
            (
                "https://id:s3c?r#et@api.example.com/x?key=s3cret",
                "https://***?…",
            ),
            ("https://h/p?user=ops@corp.com&key=s3cret", "https://***?…"),
            (
                "https://api.example.com/p?api_key=s3cret",
                "https://api.example.com/p?…",
            ),
            (
                "https://api.example.com/p#s3cret",
                "https://api.example.com/p#…",
            ),
            ("nats://10.0.0.5:4222", "nats://10.0.0.5:4222"),
        ] {
            assert_eq!(redacted_address(address), shown, "{address}");
        }
    }

    #[test]
    fn an_endpoint_that_is_not_a_url_is_named_without_its_query() {
        let text = VALID.replace(
            "https://api.example.com/profiles?source=edge",
            "https://api example.com/profiles?api_key=s3cret",
        );
        assert_ne!(text, VALID);
        let error = error_of(&text);
        assert!(error.contains("destination.http_endpoint"), "{error}");
        assert!(
            error.contains("https://api example.com/profiles?…"),
            "{error}"
        );
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[test]
    fn endpoints_with_credentials_in_them_are_refused_without_showing_them() {
        for (key, line) in [
            (
                "destination.http_endpoint",
                "https://user:pa55word@api.example.com/profiles?source=edge",
            ),
            (
                "destination.http_endpoint",
                "https://pa55word@api.example.com/profiles?source=edge",
            ),
            (
                "destination.auth.auth_endpoint",
                "https://id:pa55word@auth.example.com/oauth/token",
            ),
            ("destination.http_endpoint", "https://id:pa55word@/x"),
            (
                "destination.http_endpoint",
                "https://id:pa55 word@host:99999/x",
            ),
            (
                "destination.http_endpoint",
                "https:id:pa55word@api.example.com/x",
            ),
            (
                "destination.http_endpoint",
                "https:///id:pa55word@api.example.com/x",
            ),
            (
                "destination.http_endpoint",
                "https://id:pa55/word@api.example.com/x",
            ),
            (
                "destination.http_endpoint",
                "https://id:pa55?w#rd@api.example.com/x",
            ),
        ] {
            let text = if key == "destination.http_endpoint" {
                VALID.replace("https://api.example.com/profiles?source=edge", line)
            } else {
                VALID.replace("https://auth.example.com/oauth/token", line)
            };
            assert_ne!(text, VALID);
            let error = error_of(&text);
            assert!(error.contains(key), "{error}");
            assert!(!error.contains("pa55"), "{error}");
            assert!(error.contains("***"), "{error}");
        }
    }

    #[test]
    fn endpoint_errors_say_what_is_wrong() {
        for (text, says) in [
            (
                "api.example.com/profiles",
                "`api.example.com/profiles` has no scheme: begin it with https://",
            ),
            (
                "localhost:8080/profiles",
                "`localhost:8080/profiles` has no scheme: begin it with https://",
            ),
            ("ftp://x/y", "scheme `ftp` is not http or https"),
            ("", "must not be empty"),
            (" ", "must not be empty"),
            (
                "mailto:ops@example.com",
                "scheme `mailto` is not http or https",
            ),
            ("https://", "`https://` is not a URL: empty host"),
            ("https:///profiles", "`https:///profiles` has no host"),
            ("http:\\\\\\profiles", "`http:\\\\\\profiles` has no host"),
            (
                "http://[::1",
                "`http://[::1` is not a URL: invalid IPv6 address",
            ),
            // The URL parser takes these; HTTP cannot use them.
            (
                "http://{{host}}/profiles",
                "`http://{{host}}/profiles` is not an address HTTP can use",
            ),
            (
                "https://a{b}c/profiles",
                "`https://a{b}c/profiles` is not an address HTTP can use",
            ),
            (
                "https://api.example.com/profiles#v2",
                "`https://api.example.com/profiles#…` has a fragment (after #), which is never sent",
            ),
        ] {
            let error = parse_http_url(text).unwrap_err();
            assert!(error.starts_with(says), "{text}: {error}");
        }
        assert!(parse_http_url("https:api.example.com/x").is_ok());
    }

    #[test]
    fn hosts_that_name_this_one() {
        for (host, this) in [
            ("localhost", true),
            ("LocalHost", true),
            ("localhost.", true),
            ("127.0.0.1", true),
            ("127.8.9.10", true),
            ("[::1]", true),
            ("::1", true),
            ("[::ffff:127.0.0.1]", true),
            ("127.0.0.1.example.com", false),
            ("localhost.example.com", false),
            ("10.0.0.5", false),
            ("[::ffff:10.0.0.5]", false),
            ("", false),
        ] {
            assert_eq!(names_this_host(host), this, "{host}");
        }
    }
}
