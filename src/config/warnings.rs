//! Warnings: what a valid config does that a person should know of (credentials in clear
//! text, an ingest API anyone may feed, secrets others may read, ...). They are logged at start
//! and shown by `check`; unlike errors, they never refuse a config.

use std::path::Path;

use url::Url;

use super::address::names_this_host;
use super::auth::Auth;
use super::proxy::Proxy;

/// How clients of the ingest API are told apart: by nothing, by a TLS client certificate,
/// by the ingest token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestGuards {
    pub tls: bool,
    pub client_certificates: bool,
    pub token: bool,
}

/// The warning for an ingest API that anyone on the network could feed: listening beyond
/// loopback with neither a token nor client certificates. TLS alone encrypts, but it lets
/// in every client.
pub fn exposure_warning(listen: std::net::SocketAddr, guards: IngestGuards) -> Option<String> {
    if listen.ip().is_loopback() || guards.token || guards.client_certificates {
        return None;
    }
    Some(if guards.tls {
        format!(
            "ingest.listen {listen} is not a loopback address and the ingest API asks clients \
             for neither a token (ingest.token) nor a certificate (ingest.client_ca_file): TLS \
             encrypts, but anyone who reaches it can send updates"
        )
    } else {
        format!(
            "ingest.listen {listen} is not a loopback address and the ingest API has neither \
             TLS (ingest.tls_cert_file) nor a token (ingest.token): anyone who reaches it can \
             send updates in clear text"
        )
    })
}

/// Whether `url` is `http://` to a host beyond this one: what goes to it crosses the network
/// in clear text.
fn clear_text_beyond_loopback(url: &Url) -> bool {
    url.scheme() == "http" && !names_this_host(url.host_str().unwrap_or_default())
}

/// Warnings for addresses of this host that go through a proxy on another: the proxy opens
/// the tunnel to its own host instead (`CONNECT 127.0.0.1:…` from the proxy).
fn loopback_through_proxy_warnings(
    http_endpoint: &Url,
    auth: &Auth,
    proxy: Option<&Proxy>,
) -> Vec<String> {
    let Some(proxy) = proxy.filter(|p| !names_this_host(p.url.host_str().unwrap_or_default()))
    else {
        return Vec::new();
    };
    let mut named = vec![("destination.http_endpoint", http_endpoint)];
    if let Auth::OAuth2 { auth_endpoint, .. } = auth {
        named.push(("destination.auth.auth_endpoint", auth_endpoint));
    }
    named
        .into_iter()
        .filter(|(_, url)| names_this_host(url.host_str().unwrap_or_default()) && proxy.takes(url))
        .map(|(key, url)| {
            // As no_proxy takes it: an IPv6 address without its brackets.
            let host = match url.host() {
                Some(url::Host::Ipv6(ip)) => ip.to_string(),
                _ => url.host_str().unwrap_or_default().to_owned(),
            };
            // no_proxy takes no trailing dot, and its entry without one does not match it.
            let listed = match host.strip_suffix('.') {
                Some(bare) => format!("write {key}'s host as {bare} and list {bare}"),
                None => format!("list {host}"),
            };
            format!(
                "{key} names this host ({host}) and goes through destination.proxy at {}: a proxy on another host opens the tunnel to its own host instead; if it runs elsewhere, {listed} in destination.no_proxy",
                proxy.address()
            )
        })
        .collect()
}

/// An `Idempotency-Key` line longer than this is refused by common servers' defaults (nginx
/// and Apache answer 400, Node.js 431 past 16 KiB for all headers).
const MAX_HEADER_LINE_BYTES: u64 = 8192;

/// What one export id takes in an array's `Idempotency-Key`: `3fa2c1d0-` and a 16-digit
/// export number (numbers made today), and its comma.
const KEY_BYTES_PER_EXPORT: u64 = 26;

/// A warning when a full array's `Idempotency-Key` would be longer than servers commonly take:
/// such an array is refused, split and its exports sent one by one, so the arrays gain nothing.
pub(super) fn long_idempotency_key_warning(max_profiles_per_request: u64) -> Option<String> {
    let line = "Idempotency-Key: ".len() as u64 + max_profiles_per_request * KEY_BYTES_PER_EXPORT;
    (line > MAX_HEADER_LINE_BYTES).then(|| {
        format!(
            "delivery.max_profiles_per_request = {max_profiles_per_request}: the Idempotency-Key header of a full array (its exports' ids) takes about {} KiB, and many servers refuse a header line over 8 KiB (nginx and Apache answer 400): a refused array is split and its exports sent one by one. At most {} keeps it within 8 KiB",
            line.div_ceil(1024),
            (MAX_HEADER_LINE_BYTES - "Idempotency-Key: ".len() as u64) / KEY_BYTES_PER_EXPORT
        )
    })
}

/// The warnings for credentials the config would send in clear text across the network: the
/// access token (or static token, or an `Authorization` of `custom_headers`) to an `http://`
/// endpoint, the client's secret (and password) to an `http://` token endpoint.
pub fn clear_text_credentials_warnings(
    http_endpoint: &Url,
    auth: &Auth,
    custom_authorization: bool,
    proxy: Option<&Proxy>,
) -> Vec<String> {
    let mut warnings = Vec::new();
    let crosses = |url: &Url| -> Option<&'static str> {
        clear_text_beyond_loopback(url).then(|| match proxy.is_some_and(|p| p.takes(url)) {
            true => ", through destination.proxy (which many proxies also refuse for ports other than 443)",
            false => "",
        })
    };
    let token = !matches!(auth, Auth::None) || custom_authorization;
    if let Some(through) = crosses(http_endpoint).filter(|_| token) {
        warnings.push(format!(
            "destination.http_endpoint is http:// to {}: every export carries its token there in clear text{through}; use https://",
            http_endpoint.host_str().unwrap_or_default()
        ));
    }
    if let Auth::OAuth2 { auth_endpoint, .. } = auth {
        if let Some(through) = crosses(auth_endpoint) {
            warnings.push(format!(
                "destination.auth.auth_endpoint is http:// to {}: the client secret goes there in clear text with every token request{through}; use https://",
                auth_endpoint.host_str().unwrap_or_default()
            ));
        }
    }
    warnings.extend(loopback_through_proxy_warnings(http_endpoint, auth, proxy));
    warnings
}

/// The warning for a config file that holds secrets (`keys`) and that users other than its
/// owner and group can read (`mode`: its Unix permission bits). Its group reading it is the
/// service's set-up (`data/outpost.service`: root's file, the `outpost` group's to read).
pub fn readable_secret_warning(path: &Path, mode: u32, keys: &[&str]) -> Option<String> {
    (mode & 0o004 != 0 && !keys.is_empty()).then(|| {
        // Only these have another place; the others are kept safe by the file's mode alone.
        let elsewhere: Vec<String> = [
            (
                "destination.auth.client_secret",
                "client_secret_file or OUTPOST_CLIENT_SECRET",
            ),
            (
                "destination.auth.password",
                "password_file or OUTPOST_PASSWORD",
            ),
            ("destination.auth.token", "token_file or OUTPOST_TOKEN"),
            ("ingest.token", "ingest.token_file or OUTPOST_INGEST_TOKEN"),
            (
                "destination.custom_headers",
                "destination.custom_headers_file (the headers with credentials)",
            ),
        ]
        .into_iter()
        .filter(|(key, _)| keys.contains(key))
        .map(|(key, place)| format!("{key} by {place}"))
        .collect();
        let or_move = match elsewhere.is_empty() {
            true => String::new(),
            false => format!(", or give {}", elsewhere.join(" and ")),
        };
        format!(
            "{} holds secrets ({}) and other users can read it (mode {:o}); run chmod o-rwx {0}{or_move}",
            path.display(),
            keys.join(", "),
            mode & 0o777
        )
    })
}

/// The warning for a file holding the secret of `key` that users other than its owner and
/// group can read (`mode`: its Unix permission bits), as for the config file.
pub fn readable_secret_file_warning(key: &str, path: &Path, mode: u32) -> Option<String> {
    (mode & 0o004 != 0).then(|| {
        format!(
            "{} holds a secret ({key}) and other users can read it (mode {:o}); run chmod o-rwx {0}",
            path.display(),
            mode & 0o777
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{environment, parse, VALID};
    use crate::config::{CredentialsPlacement, Grant, Secret};

    #[test]
    fn arrays_whose_idempotency_key_servers_refuse_are_warned_of() {
        let _environment = environment();
        for (most, warned) in [
            (1, false),
            (100, false),
            (314, false),
            (315, true),
            (1000, true),
        ] {
            let config = parse(&format!(
                "{VALID}\n[delivery]\nmax_profiles_per_request = {most}\n"
            ))
            .unwrap();
            assert_eq!(
                config.warnings.len(),
                usize::from(warned),
                "{most}: {:?}",
                config.warnings
            );
            if warned {
                let warning = &config.warnings[0];
                assert!(
                    warning.starts_with(&format!("delivery.max_profiles_per_request = {most}: ")),
                    "{warning}"
                );
                assert!(
                    warning.ends_with("At most 314 keeps it within 8 KiB"),
                    "{warning}"
                );
            }
        }
        // The key of 314 ids of today's export numbers, as sent, fits in the line.
        let id = crate::store::ExportId {
            store: u32::MAX,
            seq: 1_800_000_000_000u64 * 1024,
        }
        .to_string();
        assert_eq!(id.len() as u64 + 1, KEY_BYTES_PER_EXPORT, "{id}");
        let key = vec![id; 314].join(",");
        assert!(format!("Idempotency-Key: {key}").len() as u64 <= MAX_HEADER_LINE_BYTES);
    }

    #[test]
    fn clear_text_credentials_table() {
        let oauth = |auth_endpoint: &str| Auth::OAuth2 {
            auth_endpoint: auth_endpoint.parse().unwrap(),
            client_id: "id".into(),
            client_secret: Secret::new("s3cret".to_owned()),
            client_secret_file: None,
            credentials: CredentialsPlacement::Body,
            scope: None,
            grant: Grant::ClientCredentials,
        };
        let bearer = Auth::Bearer {
            token: Secret::new("t0ken".to_owned()),
            token_file: None,
        };
        // (endpoint, auth, warnings naming these keys)
        let cases: [(&str, Auth, &[&str]); 8] = [
            (
                "https://api.example.com/p",
                oauth("https://a.example.com/t"),
                &[],
            ),
            (
                "http://127.0.0.1:8687/p",
                oauth("http://localhost:8687/t"),
                &[],
            ),
            ("http://[::1]/p", bearer.clone(), &[]),
            ("http://10.0.0.5/p", Auth::None, &[]),
            (
                "http://10.0.0.5/p",
                bearer.clone(),
                &["destination.http_endpoint"],
            ),
            (
                "http://api.example.com/p",
                oauth("http://auth.example.com/t"),
                &[
                    "destination.http_endpoint",
                    "destination.auth.auth_endpoint",
                ],
            ),
            (
                "https://api.example.com/p",
                oauth("http://10.1.1.1/t"),
                &["destination.auth.auth_endpoint"],
            ),
            ("http://LOCALHOST/p", bearer, &[]),
        ];
        // An endpoint's own `Authorization` in custom_headers is a token, and a secret in the
        // file, too.
        let text = VALID
            .replace(
                "type = \"oauth2_client_credentials\"\nauth_endpoint = \"https://auth.example.com/oauth/token\"\nclient_id = \"edge-agent\"\nclient_secret = \"s3cr3t-value\"",
                "type = \"none\"",
            )
            .replace("x-tenant:acme", "Authorization:ApiKey k3y");
        assert_eq!(
            parse(&text).unwrap().inline_secrets,
            ["destination.custom_headers"]
        );
        let warnings = clear_text_credentials_warnings(
            &"http://10.0.0.5/p".parse().unwrap(),
            &Auth::None,
            true,
            None,
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");

        for (endpoint, auth, keys) in cases {
            let warnings =
                clear_text_credentials_warnings(&endpoint.parse().unwrap(), &auth, false, None);
            assert_eq!(warnings.len(), keys.len(), "{endpoint}: {warnings:?}");
            for (warning, key) in warnings.iter().zip(keys) {
                assert!(
                    warning.starts_with(key) && warning.contains("clear text"),
                    "{warning}"
                );
                assert!(
                    !warning.contains("s3cret") && !warning.contains("t0ken"),
                    "{warning}"
                );
            }
        }
    }

    #[test]
    fn exposure_warning_table() {
        // (listen, tls, client certificates, token, the warning says)
        let cases = [
            ("127.0.0.1:8686", false, false, false, None),
            ("[::1]:8686", false, false, false, None),
            ("127.0.0.1:8686", true, false, false, None),
            ("0.0.0.0:8686", false, false, false, Some("clear text")),
            ("10.0.0.5:8686", false, false, false, Some("clear text")),
            ("0.0.0.0:8686", true, false, false, Some("TLS encrypts")),
            ("0.0.0.0:8686", true, true, false, None),
            ("0.0.0.0:8686", false, false, true, None),
            ("[::]:8686", true, false, true, None),
        ];
        for (listen, tls, client_certificates, token, says) in cases {
            let addr = listen.parse().unwrap();
            let guards = IngestGuards {
                tls,
                client_certificates,
                token,
            };
            let warning = exposure_warning(addr, guards);
            assert_eq!(
                warning
                    .as_ref()
                    .map(|w| says.is_some_and(|s| w.contains(s))),
                says.map(|_| true),
                "{listen} {guards:?}: {warning:?}"
            );
        }
    }

    #[test]
    fn readable_secret_warning_table() {
        let path = Path::new("/etc/outpost/outpost.toml");
        let cases: [(u32, &[&str], bool); 6] = [
            (0o100600, &["ingest.token"], false),
            // The group reading it is the service's set-up.
            (0o100640, &["ingest.token"], false),
            (0o100604, &["destination.auth.client_secret"], true),
            (0o100644, &[], false),
            (0o100400, &["ingest.token"], false),
            (
                0o100664,
                &["ingest.token", "destination.auth.password"],
                true,
            ),
        ];
        for (mode, keys, warned) in cases {
            let warning = readable_secret_warning(path, mode, keys);
            assert_eq!(warning.is_some(), warned, "{mode:o} {keys:?}");
            if let Some(w) = warning {
                assert!(w.contains("chmod o-rwx /etc/outpost/outpost.toml"), "{w}");
                assert!(w.contains(&keys.join(", ")), "{w}");
            }
        }
        // Where a secret has another place, the warning names it; where none has, it names
        // none.
        let told = |keys: &[&str]| readable_secret_warning(path, 0o100644, keys).unwrap();
        assert!(told(&["source.nats.token", "destination.proxy"])
            .ends_with("run chmod o-rwx /etc/outpost/outpost.toml"));
        assert!(told(&["ingest.token", "destination.auth.token"]).ends_with(
            ", or give destination.auth.token by token_file or OUTPOST_TOKEN and ingest.token by ingest.token_file or OUTPOST_INGEST_TOKEN"
        ));
        assert!(told(&["destination.auth.client_secret", "destination.proxy"]).ends_with(
            "run chmod o-rwx /etc/outpost/outpost.toml, or give destination.auth.client_secret by client_secret_file or OUTPOST_CLIENT_SECRET"
        ));
        assert!(told(&["destination.auth.password"])
            .ends_with(", or give destination.auth.password by password_file or OUTPOST_PASSWORD"));
        assert!(told(&["destination.custom_headers"]).ends_with(
            ", or give destination.custom_headers by destination.custom_headers_file (the headers with credentials)"
        ));
    }
}
