//! Errors a person can act on: what went wrong in outpost's terms (the config key, the
//! certificate and whose it is, the URL) and what to do about it. Pure: the callers keep the
//! underlying error in the debug log.

use std::error::Error;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::Path;

/// `text`, cut to at most `max` bytes at a character boundary, with `…` where it was cut: for
/// text a peer chose (an address it redirects to, an error it answered), kept or logged.
pub fn cut_to(mut text: String, max: usize) -> String {
    let kept = crate::profile::update::truncate(&text, max).len();
    if kept < text.len() {
        text.truncate(kept);
        text.push('…');
    }
    text
}

/// `ingest.listen` (or another listening key) could not be bound.
pub fn listen(key: &str, addr: &SocketAddr, error: &std::io::Error) -> String {
    match error.kind() {
        ErrorKind::AddrInUse => format!(
            "{key} {addr}: the address is already in use: another program (or another outpost) \
             listens there. Stop it, or set {key} to a free address in the config"
        ),
        ErrorKind::PermissionDenied if addr.port() < 1024 => format!(
            "{key} {addr}: not allowed to listen on port {}: ports below 1024 need root or \
             CAP_NET_BIND_SERVICE. Set {key} to a port above 1023",
            addr.port()
        ),
        ErrorKind::PermissionDenied => format!(
            "{key} {addr}: not allowed to listen on port {port} (permission denied), though it \
             is above 1023: a security policy (SELinux, AppArmor, a container's seccomp) \
             refuses it, or net.ipv4.ip_unprivileged_port_start is set above {port}. Allow it \
             there, or set {key} to a port this host lets outpost's user listen on",
            port = addr.port()
        ),
        ErrorKind::AddrNotAvailable => format!(
            "{key} {addr}: {} is not an address of this host. Set {key} to 127.0.0.1 (this host \
             only), 0.0.0.0 (every interface) or one of the host's addresses",
            addr.ip()
        ),
        _ => format!("{key} {addr}: cannot listen there: {error}"),
    }
}

/// The store could not be opened at `storage.path`; `None` when the error is not one of those
/// explained here (the caller shows it as it is).
pub fn store_open(path: &Path, error: &sled::Error) -> Option<String> {
    let sled::Error::Io(io) = error else {
        return None;
    };
    // Whether there is a folder to give away (rather than one to make).
    let exists = std::fs::symlink_metadata(path).is_ok();
    let path = path.display();
    if crate::store::is_no_space(io) {
        return Some(format!(
            "storage.path {path}: no space left on device for the store; make room on that disk"
        ));
    }
    match io.kind() {
        // Made anew, the folder would be made in one the user may not write in: giving that
        // one away (`/var/lib`, say) would be wrong.
        ErrorKind::PermissionDenied if !exists => Some(format!(
            "storage.path {path}: cannot create the store there (permission denied): the \
             user outpost runs as may not make it. Make it for that user (e.g. `mkdir -p \
             {path} && chown USER {path}`), or set storage.path to a folder it can write; with \
             the systemd unit, StateDirectory=outpost provides /var/lib/outpost"
        )),
        ErrorKind::PermissionDenied => Some(format!(
            "storage.path {path}: cannot write the store there (permission denied). Give the \
             user outpost runs as write access to that folder (e.g. `chown -R USER {path}`), \
             or set storage.path to a folder it can write; with the systemd unit, \
             StateDirectory=outpost provides /var/lib/outpost"
        )),
        ErrorKind::ReadOnlyFilesystem => Some(format!(
            "storage.path {path}: the file system is read-only. Set storage.path to a folder on \
             a writable file system (e.g. under /var/lib)"
        )),
        ErrorKind::NotADirectory | ErrorKind::AlreadyExists => Some(format!(
            "storage.path {path}: a part of that path is a file, not a folder. Set storage.path \
             to a folder (outpost creates it if it is missing)"
        )),
        _ => None,
    }
}

/// Bytes for people: "512 B", "3.2 MiB", "41.0 GiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// The warning for a disk with less room than a full outbox may take (`free` bytes left where
/// the store is). A store that fills its own disk refuses updates until room is made outside
/// outpost, and records the deliveries it makes (each a write) only in the space
/// `storage.reserve_bytes` kept (`store::reserve`).
pub fn outbox_room_warning(free: u64, max_outbox_bytes: u64, reserve_bytes: u64) -> Option<String> {
    // sled keeps about four times the data on disk (ARCHITECTURE.md's measurement).
    let needed = max_outbox_bytes.saturating_mul(4);
    let delivery = match reserve_bytes {
        0 => "cannot record its deliveries, and delivery stops until room is made there".to_owned(),
        reserve => format!(
            "refuses updates until room is made there, and records its deliveries only in the \
             {} storage.reserve_bytes keeps (a few hundred bytes each at most)",
            bytes(reserve)
        ),
    };
    (free < needed).then(|| {
        format!(
            "{} free where the store is; a full outbox (storage.max_outbox_bytes {}) can take \
             about {} on disk. A store that fills its disk {delivery}: set \
             storage.max_outbox_bytes to a quarter of the free space or less ({} here)",
            bytes(free),
            bytes(max_outbox_bytes),
            bytes(needed),
            bytes(free / 4)
        )
    })
}

/// A 2xx answer of the token endpoint that is not a JSON token. The body is not shown: it may
/// hold a token in another format.
pub fn token_answer(
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
    error: &serde_json::Error,
) -> String {
    // The endpoint's to choose, and a header may take hundreds of KiB.
    let content_type = cut_to(content_type.unwrap_or("none").to_owned(), 100);
    let start = String::from_utf8_lossy(&body[..body.len().min(64)])
        .trim_start()
        .to_ascii_lowercase();
    let endpoint = "destination.auth.auth_endpoint must be the OAuth 2.0 token endpoint \
                    (it often ends in /token or /oauth2/token; the identity provider's \
                    documentation names it)";
    if content_type.contains("html") || start.starts_with('<') {
        format!(
            "the token endpoint answered {status} with an HTML page (Content-Type {content_type}), \
             not a JSON token: it looks like a login or portal page. {endpoint}"
        )
    } else if error.is_data() {
        // JSON, but not a token answer. serde's text of a wrong type quotes the value, which
        // may be a token: only a missing field is named.
        let text = error.to_string();
        let what = match text.find(" at line") {
            Some(end) if text.starts_with("missing field") => text[..end].to_owned(),
            _ => "a field of the wrong type".to_owned(),
        };
        format!(
            "the token endpoint answered {status} with JSON that is not a token ({what}): \
             {endpoint}, and the grant (destination.auth.type) one it accepts"
        )
    } else {
        format!(
            "the token endpoint answered {status} with a body that is not JSON (Content-Type \
             {content_type}, {} bytes): {endpoint}",
            body.len()
        )
    }
}

/// The first `T` in `error` or its causes for which `wanted` holds, looking inside `io::Error`s
/// too (hyper and tokio-rustls wrap errors in them, whose `source()` skips the wrapped error
/// itself).
pub fn find_cause<'a, T: Error + 'static>(
    error: &'a (dyn Error + 'static),
    wanted: impl Fn(&T) -> bool + Copy,
) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>().filter(|found| wanted(found)) {
            return Some(found);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(found) = find_cause(inner, wanted) {
                return Some(found);
            }
        }
        current = e.source();
    }
    None
}

/// The rustls error in `error` or its causes.
pub fn find_tls_error<'a>(error: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
    find_cause(error, |_| true)
}

/// Said of a connection to `server` (host:port) that was refused.
pub fn refused(server: &str) -> String {
    format!("nothing accepts connections at {server} (connection refused)")
}

/// Whether `error` or one of its causes is a connection refused: nothing listens there, or a
/// firewall rejects it.
pub fn connection_refused(error: &(dyn Error + 'static)) -> bool {
    find_cause::<std::io::Error>(error, |io| {
        io.kind() == std::io::ErrorKind::ConnectionRefused
    })
    .is_some()
}

/// What is wrong with the TLS `server` (host:port) spoke, and what to do: its certificate
/// ([`certificate`]), or no TLS at all; `None` for another TLS error.
pub fn tls_problem(server: &str, host: &str, error: &rustls::Error) -> Option<String> {
    match error {
        rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType) => Some(format!(
            "{server} does not answer in TLS (a server of plain HTTP answers so): if it serves \
             http://, the URL must say http:// (destination.http_endpoint or \
             destination.auth.auth_endpoint)"
        )),
        _ => certificate(server, host, error),
    }
}

/// What is wrong with the certificate `server` (host:port) presented, and what to do; `None`
/// for a TLS error that is not about the server's certificate.
fn certificate(server: &str, host: &str, error: &rustls::Error) -> Option<String> {
    use rustls::CertificateError as C;
    let rustls::Error::InvalidCertificate(problem) = error else {
        return None;
    };
    let whose = format!("the certificate {server} presents");
    let time = |t: rustls::pki_types::UnixTime| {
        chrono::DateTime::from_timestamp(t.as_secs() as i64, 0).map_or_else(
            || "?".to_owned(),
            |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        )
    };
    Some(match problem {
        C::Other(other) if other.to_string().contains("CaUsedAsEndEntity") => format!(
            "{whose} is a CA certificate (CA:TRUE) served as the server's own certificate, which \
             TLS clients refuse (a one-line `openssl req -x509` makes such a certificate). On the \
             server, serve a certificate for {host} signed by that CA instead, and give outpost \
             the CA's certificate in destination.ca_file"
        ),
        C::NotValidForNameContext { presented, .. } => format!(
            "{whose} is not valid for the name {host}: it names {}. Use a name it holds in the \
             URL (destination.http_endpoint or destination.auth.auth_endpoint), or have the \
             certificate reissued with {host} among its subject alternative names",
            if presented.is_empty() {
                "nothing".to_owned()
            } else {
                presented.join(", ")
            }
        ),
        C::NotValidForName => format!(
            "{whose} is not valid for the name {host}. Use a name it holds in the URL, or have \
             the certificate reissued with {host} among its subject alternative names"
        ),
        C::ExpiredContext {
            time: now,
            not_after,
        } => format!(
            "{whose} expired on {} (this host's clock says {}). Renew the server's certificate; \
             if this host's clock is wrong, correct it",
            time(*not_after),
            time(*now)
        ),
        C::Expired => format!(
            "{whose} has expired. Renew the server's certificate; if this host's clock is wrong, \
             correct it"
        ),
        C::NotValidYetContext {
            time: now,
            not_before,
        } => format!(
            "{whose} is valid only from {} (this host's clock says {}). If this host's clock is \
             behind, correct it (e.g. NTP); otherwise the server's certificate was issued for \
             the future",
            time(*not_before),
            time(*now)
        ),
        C::NotValidYet => format!(
            "{whose} is not valid yet: if this host's clock is behind, correct it (e.g. NTP)"
        ),
        C::UnknownIssuer => format!(
            "{whose} is signed by a certificate authority this host does not trust. If it is a \
             private CA, put the CA's certificate (PEM) in destination.ca_file"
        ),
        other => format!("{whose} was refused: {other}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_table() {
        let addr: SocketAddr = "127.0.0.1:8686".parse().unwrap();
        let table = [
            (ErrorKind::AddrInUse, "already in use"),
            (ErrorKind::PermissionDenied, "a security policy"),
            (
                ErrorKind::AddrNotAvailable,
                "127.0.0.1 is not an address of this host",
            ),
            (ErrorKind::Other, "cannot listen there"),
        ];
        for (kind, expected) in table {
            let text = listen("ingest.listen", &addr, &std::io::Error::from(kind));
            assert!(text.starts_with("ingest.listen 127.0.0.1:8686: "), "{text}");
            assert!(text.contains(expected), "{kind:?}: {text}");
        }
        let low: SocketAddr = "0.0.0.0:443".parse().unwrap();
        let text = listen("ingest.listen", &low, &ErrorKind::PermissionDenied.into());
        assert!(text.contains("ports below 1024 need root"), "{text}");
    }

    /// A store that is there is given to the user; one to be made is made for it, never its
    /// parent given away (a `chown -R` of `/var/lib`, say).
    #[test]
    fn a_store_the_user_may_not_write_is_given_to_it_and_one_it_may_not_make_is_made_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let denied = || sled::Error::Io(ErrorKind::PermissionDenied.into());
        let there = store_open(dir.path(), &denied()).unwrap();
        assert!(there.contains("cannot write the store there"), "{there}");
        assert!(there.contains("chown -R USER"), "{there}");
        let missing = dir.path().join("store");
        let made = store_open(&missing, &denied()).unwrap();
        assert!(made.contains("cannot create the store there"), "{made}");
        assert!(
            made.contains(&format!(
                "mkdir -p {0} && chown USER {0}",
                missing.display()
            )),
            "{made}"
        );
        assert!(!made.contains("chown -R"), "{made}");
    }

    #[test]
    fn a_disk_with_less_room_than_a_full_outbox_takes_is_warned_of() {
        assert_eq!(outbox_room_warning(4 << 30, 1 << 30, 32 << 20), None);
        let warning = outbox_room_warning(6 << 20, 1 << 30, 32 << 20).unwrap();
        assert!(
            warning.starts_with(
                "6.0 MiB free where the store is; a full outbox (storage.max_outbox_bytes 1.0 \
                 GiB) can take about 4.0 GiB on disk. A store that fills its disk refuses \
                 updates until room is made there, and records its deliveries only in the 32.0 \
                 MiB storage.reserve_bytes keeps"
            ),
            "{warning}"
        );
        assert!(warning.ends_with("(1.5 MiB here)"), "{warning}");
        let without = outbox_room_warning(6 << 20, 1 << 30, 0).unwrap();
        assert!(
            without.contains("cannot record its deliveries, and delivery stops"),
            "{without}"
        );
    }

    #[test]
    fn store_open_table() {
        let path = Path::new("/var/lib/outpost");
        let table = [
            (ErrorKind::PermissionDenied, Some("permission denied")),
            (ErrorKind::ReadOnlyFilesystem, Some("read-only")),
            (ErrorKind::NotADirectory, Some("is a file, not a folder")),
            (
                ErrorKind::StorageFull,
                Some("no space left on device for the store"),
            ),
            (ErrorKind::Other, None),
        ];
        for (kind, expected) in table {
            let text = store_open(path, &sled::Error::Io(kind.into()));
            match expected {
                None => assert_eq!(text, None, "{kind:?}"),
                Some(expected) => {
                    let text = text.unwrap();
                    assert!(
                        text.starts_with("storage.path /var/lib/outpost: "),
                        "{text}"
                    );
                    assert!(text.contains(expected), "{kind:?}: {text}");
                }
            }
        }
        let enospc = std::io::Error::from_raw_os_error(28);
        assert!(store_open(path, &sled::Error::Io(enospc))
            .is_some_and(|text| text.ends_with("make room on that disk")));
        assert_eq!(
            store_open(path, &sled::Error::Unsupported("x".into())),
            None
        );
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Needs {
        access_token: String,
    }

    #[test]
    fn token_answer_table() {
        let not_json = serde_json::from_slice::<serde_json::Value>(b"<html>").unwrap_err();
        let no_token =
            serde_json::from_str::<std::collections::HashMap<String, u8>>("{\"a\":\"b\"}")
                .unwrap_err();
        let missing = serde_json::from_str::<Needs>("{}").unwrap_err();
        let wrong_type = serde_json::from_str::<Needs>("{\"access_token\": 12345}").unwrap_err();
        let table: [(Option<&str>, &[u8], &serde_json::Error, &str); 6] = [
            (
                Some("text/html; charset=utf-8"),
                b"<!DOCTYPE html>",
                &not_json,
                "an HTML page",
            ),
            (None, b"  <html><body>Sign in", &not_json, "an HTML page"),
            (
                Some("text/plain"),
                b"access_token=abc",
                &not_json,
                "not JSON (Content-Type text/plain, 16 bytes)",
            ),
            (
                Some("application/json"),
                b"{\"a\":\"b\"}",
                &no_token,
                "JSON that is not a token (a field of the wrong type)",
            ),
            (
                Some("application/json"),
                b"{}",
                &missing,
                "(missing field `access_token`)",
            ),
            (
                Some("application/json"),
                b"{\"access_token\": 12345}",
                &wrong_type,
                "(a field of the wrong type)",
            ),
        ];
        for (content_type, body, error, expected) in table {
            let text = token_answer(200, content_type, body, error);
            assert!(text.contains(expected), "{expected}: {text}");
            assert!(text.contains("destination.auth.auth_endpoint"), "{text}");
            assert!(
                !text.contains("abc") && !text.contains("12345") && !text.contains("\"b\""),
                "the body is never shown: {text}"
            );
        }
    }

    #[test]
    fn certificate_table() {
        use rustls::pki_types::UnixTime;
        use rustls::CertificateError as C;
        let at = |s| UnixTime::since_unix_epoch(std::time::Duration::from_secs(s));
        let table = [
            (C::NotValidForNameContext {
                expected: rustls::pki_types::ServerName::try_from("localhost").unwrap().to_owned(),
                presented: vec!["DnsName(\"other.test\")".into()],
            }, "not valid for the name localhost: it names DnsName(\"other.test\")"),
            (C::ExpiredContext { time: at(1_767_225_600), not_after: at(1_735_689_600) },
             "expired on 2025-01-01 00:00:00 UTC (this host's clock says 2026-01-01 00:00:00 UTC)"),
            (C::UnknownIssuer, "destination.ca_file"),
            (C::NotValidYet, "clock is behind"),
        ];
        for (problem, expected) in table {
            let text = certificate(
                "localhost:8443",
                "localhost",
                &rustls::Error::InvalidCertificate(problem),
            )
            .unwrap();
            assert!(
                text.starts_with("the certificate localhost:8443 presents "),
                "{text}"
            );
            assert!(text.contains(expected), "{expected}: {text}");
        }
        assert_eq!(certificate("h:1", "h", &rustls::Error::DecryptError), None);
    }

    #[test]
    fn finds_the_tls_error_inside_io_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(ErrorKind::InvalidData, tls.clone());
        assert_eq!(find_tls_error(&io), Some(&tls));
        let wrapped = std::io::Error::other(io);
        assert_eq!(find_tls_error(&wrapped), Some(&tls));
        assert_eq!(
            find_tls_error(&std::io::Error::from(ErrorKind::Other)),
            None
        );
    }
}
