//! `destination.proxy`: the HTTP proxy the endpoint and the token endpoint are reached
//! through, its credentials kept secret, and the hosts `destination.no_proxy` keeps off it.

use url::Url;

use super::address::redacted_address;
use super::secret::Secret;
use super::KeyError;

/// An HTTP proxy that opens a tunnel (`CONNECT`) to each host it is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    /// `http://host:port`, without credentials.
    pub url: Url,
    /// The user and password of the proxy URL, sent to the proxy alone (`Proxy-Authorization`).
    pub credentials: Option<(String, Secret)>,
    /// `destination.no_proxy`: hosts, domains (with their subdomains) and networks reached
    /// directly, as curl's `NO_PROXY` lists them.
    pub no_proxy: String,
}

impl Proxy {
    /// Whether `no_proxy` lists `*`: every host is reached directly.
    fn all_direct(&self) -> bool {
        self.no_proxy.split(',').any(|entry| entry.trim() == "*")
    }

    /// What decides, for a host, whether it goes through the proxy (a host it intercepts
    /// does); `None` when no host does. (hyper-util's matcher reads `no_proxy`'s `*` for names
    /// only, not for IP addresses, so `*` is read here.)
    pub fn matcher(&self) -> Option<hyper_util::client::proxy::matcher::Matcher> {
        (!self.all_direct()).then(|| {
            hyper_util::client::proxy::matcher::Matcher::builder()
                .all(self.url.as_str())
                .no(self.no_proxy.as_str())
                .build()
        })
    }

    /// Whether connections to `url` go through the proxy.
    pub fn takes(&self, url: &Url) -> bool {
        let Ok(uri) = url.as_str().parse::<hyper::Uri>() else {
            return false;
        };
        self.matcher()
            .is_some_and(|matcher| matcher.intercept(&uri).is_some())
    }

    /// The proxy as people read it: its host and port, never its credentials.
    pub fn address(&self) -> String {
        // An IPv6 host keeps its brackets.
        let host = self.url.host_str().unwrap_or("?");
        let port = self.url.port_or_known_default().unwrap_or(80);
        format!("{host}:{port}")
    }
}

/// Parses `destination.proxy` (and `destination.no_proxy`, which needs it).
pub(super) fn parse_proxy(
    proxy: Option<&str>,
    no_proxy: Option<&str>,
) -> Result<Option<Proxy>, KeyError> {
    let Some(text) = proxy else {
        return match no_proxy {
            Some(_) => Err((
                "destination.no_proxy",
                "is given without destination.proxy, which it makes exceptions to".into(),
            )),
            None => Ok(None),
        };
    };
    let key = "destination.proxy";
    let shown = redacted_address(text);
    let mut url = Url::parse(text).map_err(|e| (key, format!("`{shown}` is not a URL: {e}")))?;
    if url.scheme() != "http" {
        return Err((key, format!(
            "`{shown}`: the scheme must be http (outpost speaks to the proxy in plain HTTP, and through its tunnel to the endpoint over TLS when the endpoint is https)"
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err((key, format!("`{shown}` has no host")));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err((
            key,
            format!("`{shown}` must be the proxy's address alone, like http://proxy.example:3128"),
        ));
    }
    let decoded = |part: &str| {
        percent_encoding::percent_decode_str(part)
            .decode_utf8()
            .map(|p| p.into_owned())
            .map_err(|_| {
                (
                    key,
                    format!("`{shown}`: the user or password is not UTF-8 once percent-decoded"),
                )
            })
    };
    let credentials = match (url.username(), url.password()) {
        ("", None) => None,
        (user, password) => Some((
            decoded(user)?,
            Secret::new(decoded(password.unwrap_or(""))?),
        )),
    };
    if credentials
        .as_ref()
        .is_some_and(|(user, _)| user.contains(':'))
    {
        return Err((
            key,
            format!("`{shown}`: a user name with `:` cannot be sent in Basic credentials"),
        ));
    }
    let _ = url.set_username("");
    let _ = url.set_password(None);
    // What the HTTP client connects to: a host the URL parser takes but HTTP does not
    // (`{{host}}` of a template left unfilled) is refused here, not met at start.
    if let Err(e) = url.as_str().parse::<hyper::Uri>() {
        return Err((
            key,
            format!("`{shown}` is not an address HTTP can use: {e}"),
        ));
    }
    let no_proxy = match no_proxy {
        Some(list) => parse_no_proxy(list).map_err(|m| ("destination.no_proxy", m))?,
        None => String::new(),
    };
    Ok(Some(Proxy {
        url,
        credentials,
        no_proxy,
    }))
}

/// Checks `destination.no_proxy`, as curl's `NO_PROXY` reads: host names (each with its
/// subdomains, a leading `.` the same), IP addresses, networks (`10.0.0.0/8`), or `*`.
/// What the matcher would take for a name and never match (`*.corp`, `host:8443`, `[::1]`,
/// `https://host`) is refused.
fn parse_no_proxy(list: &str) -> Result<String, String> {
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        // As the matcher reads an entry: a network, else an address, else a name.
        let is_network =
            entry.parse::<ipnet::IpNet>().is_ok() || entry.parse::<std::net::IpAddr>().is_ok();
        let name = entry.strip_prefix('.').unwrap_or(entry);
        // Labels between dots, none empty (`a..b`), none a hyphen's end (`-`).
        let is_name = name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
        if !(entry == "*" || is_network || is_name) {
            return Err(format!(
                "`{entry}` is not a host name, an IP address, a network (10.0.0.0/8) or `*`: list names without wildcards, ports, schemes, a trailing dot, empty labels (`a..b`) or a label that begins or ends with `-` (`.corp.example` covers its subdomains), separated by commas"
            ));
        }
    }
    Ok(list.to_owned())
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{environment, error_of, parse, VALID};

    #[test]
    fn a_proxy_is_an_http_address_whose_credentials_stay_secret() {
        // The environment's secrets would add warnings (one test sets them).
        let _environment = environment();
        let with = |lines: &str| {
            VALID.replace(
                "custom_headers = \"x-api-version:2,x-tenant:acme\"\n",
                &format!("custom_headers = \"x-api-version:2,x-tenant:acme\"\n{lines}\n"),
            )
        };
        let config = parse(&with(
            "proxy = \"http://ops%40corp:pa%3Ass@proxy.internal:3128/\"\nno_proxy = \"localhost,.corp\"",
        ))
        .unwrap();
        let proxy = config.destination.proxy.clone().unwrap();
        assert_eq!(proxy.url.as_str(), "http://proxy.internal:3128/");
        assert_eq!(proxy.address(), "proxy.internal:3128");
        let (user, password) = proxy.credentials.clone().unwrap();
        assert_eq!((user.as_str(), password.expose()), ("ops@corp", "pa:ss"));
        assert_eq!(proxy.no_proxy, "localhost,.corp");
        assert!(!format!("{config:?}").contains("pa:ss"));
        assert_eq!(
            config.inline_secrets,
            ["destination.auth.client_secret", "destination.proxy"]
        );
        let listed = parse(&with(
            "proxy = \"http://proxy.internal:3128\"\nno_proxy = \"*, localhost, .corp, a-b.example, A_B.Example, 10.0.0.0/8, 10.0.0.0/08, 192.168.1.7, ::1, fd00::/8, fd00::/064,\"",
        ))
        .unwrap();
        assert!(listed.destination.proxy.unwrap().all_direct());
        // `*` anywhere in the list takes IP addresses off the proxy too.
        let star = parse(&with(
            "proxy = \"http://proxy.internal:3128\"\nno_proxy = \"localhost, *\"",
        ))
        .unwrap()
        .destination
        .proxy
        .unwrap();
        assert!(!star.takes(&"https://10.0.0.5/".parse().unwrap()));
        // An endpoint on this host through a proxy on another reaches the proxy's host; an
        // http:// one beyond this host goes in clear text through the proxy.
        let local = with("proxy = \"http://proxy.internal:3128\"")
            .replace("https://api.example.com", "http://127.0.0.1:8687");
        let warned = parse(&local).unwrap().warnings;
        assert_eq!(
            warned,
            ["destination.http_endpoint names this host (127.0.0.1) and goes through destination.proxy at proxy.internal:3128: a proxy on another host opens the tunnel to its own host instead; if it runs elsewhere, list 127.0.0.1 in destination.no_proxy"]
        );
        let listed = local.replace(
            "proxy = \"http://proxy.internal:3128\"",
            "proxy = \"http://proxy.internal:3128\"\nno_proxy = \"127.0.0.1\"",
        );
        assert_eq!(parse(&listed).unwrap().warnings, Vec::<String>::new());
        // The advice for an IPv6 address is an entry no_proxy takes.
        let six = local.replace("127.0.0.1:8687", "[::1]:8687");
        let warned = parse(&six).unwrap().warnings;
        assert!(
            warned[0].ends_with("list ::1 in destination.no_proxy"),
            "{warned:?}"
        );
        let listed = six.replace(
            "proxy = \"http://proxy.internal:3128\"",
            "proxy = \"http://proxy.internal:3128\"\nno_proxy = \"::1\"",
        );
        assert_eq!(parse(&listed).unwrap().warnings, Vec::<String>::new());
        // A name with its trailing dot, which no_proxy cannot list: written without it.
        let dotted = local.replace("127.0.0.1:8687", "localhost.:8687");
        let warned = parse(&dotted).unwrap().warnings;
        assert!(
            warned[0].ends_with(
                "write destination.http_endpoint's host as localhost and list localhost in destination.no_proxy"
            ),
            "{warned:?}"
        );
        let local_proxy = local.replace("proxy.internal", "127.0.0.1");
        assert_eq!(parse(&local_proxy).unwrap().warnings, Vec::<String>::new());
        let remote = with("proxy = \"http://proxy.internal:3128\"")
            .replace("https://api.example.com", "http://api.example.com");
        let warned = parse(&remote).unwrap().warnings;
        assert_eq!(
            warned,
            ["destination.http_endpoint is http:// to api.example.com: every export carries its token there in clear text, through destination.proxy (which many proxies also refuse for ports other than 443); use https://"]
        );
        let plain = parse(&with("proxy = \"http://[::1]\"")).unwrap();
        let proxy = plain.destination.proxy.unwrap();
        assert_eq!(
            (proxy.address(), proxy.credentials),
            ("[::1]:80".into(), None)
        );
        assert_eq!(parse(VALID).unwrap().destination.proxy, None);

        for (lines, key, says) in [
            (
                "proxy = \"https://proxy.internal:3128\"",
                "destination.proxy",
                "the scheme must be http",
            ),
            (
                "proxy = \"socks5://proxy.internal:1080\"",
                "destination.proxy",
                "the scheme must be http",
            ),
            (
                "proxy = \"proxy.internal:3128\"",
                "destination.proxy",
                "the scheme must be http",
            ),
            (
                "proxy = \"http://:3128\"",
                "destination.proxy",
                "is not a URL",
            ),
            (
                "proxy = \"http://proxy.internal:3128/path\"",
                "destination.proxy",
                "must be the proxy's address alone",
            ),
            (
                "proxy = \"http://u:s3cr3t@proxy.internal:3128?x=1\"",
                "destination.proxy",
                "must be the proxy's address alone",
            ),
            (
                "no_proxy = \"localhost\"",
                "destination.no_proxy",
                "without destination.proxy",
            ),
            (
                "proxy = \"http://{{proxy_host}}:3128\"",
                "destination.proxy",
                "is not an address HTTP can use",
            ),
            (
                "proxy = \"http://a%3Ab:s3cr3t@proxy.internal:3128\"",
                "destination.proxy",
                "a user name with `:`",
            ),
        ]
        .into_iter()
        .chain(
            [
                "*.corp.example",
                "corp.example.",
                "10.0.0.0/+8",
                "10.0.0.0/008",
                "fd00::/129",
                "api.internal:8443",
                "[::1]",
                "https://x",
                "10.0.0.0/33",
                "a b",
                "..corp",
                "a..b",
                "-",
                "-corp.example",
            ]
            .map(|entry| -> (&str, &str, &str) {
                let line = format!(
                    "proxy = \"http://proxy.internal:3128\"\nno_proxy = \"localhost, {entry}\""
                );
                (line.leak(), "destination.no_proxy", entry)
            }),
        ) {
            let error = error_of(&with(lines));
            assert!(
                error.contains(key) && error.contains(says),
                "{lines}: {error}"
            );
            assert!(!error.contains("s3cr3t"), "{error}");
        }
    }
}
