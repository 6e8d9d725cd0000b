//! `[source.nats]`: the raw TOML table (unknown keys refused) and its validation into
//! [`NatsSource`]. Every error names its key; credentials are held in [`Secret`].

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::partition::{format_owned, parse_owned};
use crate::config::{KeyError, Secret};

/// `[source]`: the inputs besides the HTTP ingest API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSource {
    #[serde(default)]
    pub nats: Option<RawNats>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNats {
    servers: Vec<String>,
    #[serde(default)]
    creds_file: Option<PathBuf>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    tls_ca_file: Option<PathBuf>,
    #[serde(default)]
    tls_cert_file: Option<PathBuf>,
    #[serde(default)]
    tls_key_file: Option<PathBuf>,
    #[serde(default = "default_stream")]
    stream: String,
    #[serde(default = "default_prefix")]
    subject_prefix: String,
    partitions: u32,
    #[serde(default)]
    owned: Option<String>,
    #[serde(default = "default_replicas")]
    replicas: u32,
    #[serde(default = "default_fetch_batch")]
    fetch_batch: u32,
    #[serde(default = "default_ack_wait_s")]
    ack_wait_s: u64,
    #[serde(default = "default_consumer_prefix")]
    consumer_prefix: String,
    #[serde(default = "default_max_rejected")]
    max_rejected: u64,
}

impl RawNats {
    pub(crate) fn creds_file(&self) -> Option<&PathBuf> {
        self.creds_file.as_ref()
    }

    pub(crate) fn tls_key_file(&self) -> Option<&PathBuf> {
        self.tls_key_file.as_ref()
    }

    /// The keys of the secrets given in the configuration file itself.
    pub(crate) fn inline_secrets(&self) -> Vec<&'static str> {
        [
            (self.token.is_some(), "source.nats.token"),
            (self.password.is_some(), "source.nats.password"),
        ]
        .into_iter()
        .filter_map(|(set, key)| set.then_some(key))
        .collect()
    }
}

fn default_stream() -> String {
    "OUTPOST_UPDATES".into()
}
fn default_prefix() -> String {
    "outpost.updates".into()
}
fn default_replicas() -> u32 {
    1
}
fn default_fetch_batch() -> u32 {
    1000
}
const MAX_ACK_WAIT_S: u64 = 86_400;

fn default_ack_wait_s() -> u64 {
    60
}
fn default_consumer_prefix() -> String {
    "outpost".into()
}
fn default_max_rejected() -> u64 {
    100_000
}
/// Rejected messages keep up to 64 KiB each: a billion of them is past any disk.
const MAX_MAX_REJECTED: u64 = 1_000_000_000;

/// How the agent proves who it is to NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    None,
    CredsFile(PathBuf),
    Token(Secret),
    UserPassword { user: String, password: Secret },
}

impl NatsSource {
    /// Whether the files `[source.nats]` names can be used: the credentials file read and
    /// parsed, the CA file read and holding certificates. Checked when the agent or a NATS command starts, not when the
    /// config is loaded, so that commands that do not use NATS work without them. The error
    /// names the key and the file, never what the file holds.
    pub fn check_files(&self) -> Result<(), String> {
        if let NatsAuth::CredsFile(path) = &self.auth {
            let shown = path.display();
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("source.nats.creds_file: {shown}: {e}"))?;
            super::creds::parse(&text).map_err(|why| {
                format!("source.nats.creds_file: {shown} is not a NATS credentials file (a user JWT and its NKey seed): {why}")
            })?;
        }
        if let Some(path) = &self.tls_ca_file {
            let shown = path.display();
            let file = std::fs::File::open(path)
                .map_err(|e| format!("source.nats.tls_ca_file: {shown}: {e}"))?;
            // The NATS client takes a file without certificates as an empty set of roots
            // (and then trusts none), so it is refused here.
            let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(file))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    format!("source.nats.tls_ca_file: {shown}: not PEM certificates: {e}")
                })?;
            if certs.is_empty() {
                return Err(format!(
                    "source.nats.tls_ca_file: {shown} holds no PEM certificate"
                ));
            }
        }
        if let Some((cert, key)) = &self.tls_client_cert {
            let files = crate::tls_files::CertAndKeyFiles {
                cert: ("source.nats.tls_cert_file", cert.clone()),
                key: ("source.nats.tls_key_file", key.clone()),
            };
            files.check()?;
        }
        Ok(())
    }
}

/// The validated `[source.nats]`.
#[derive(Debug, Clone)]
pub struct NatsSource {
    pub servers: Vec<String>,
    pub auth: NatsAuth,
    pub tls_ca_file: Option<PathBuf>,
    /// The certificate and key presented to servers that ask for one (mutual TLS).
    pub tls_client_cert: Option<(PathBuf, PathBuf)>,
    pub stream: String,
    pub subject_prefix: String,
    /// Fixed when the stream is made: every producer routes with the same number.
    pub partitions: u32,
    /// Sorted, each below `partitions`; all of them when `owned` is not given.
    pub owned: Vec<u32>,
    pub replicas: usize,
    /// Messages fetched (and committed as one group) per partition at a time.
    pub fetch_batch: usize,
    /// How long NATS waits for an ack before it delivers a message again.
    pub ack_wait: Duration,
    /// Durable consumers are named `<consumer_prefix>-p<partition>`: fleets for different
    /// destinations reading one stream need different prefixes.
    pub consumer_prefix: String,
    /// At most this many rejected messages are kept in the store; past it, one is logged
    /// and counted, not kept.
    pub max_rejected: u64,
}

impl NatsSource {
    /// `owned` as ranges, for people.
    pub fn owned_text(&self) -> String {
        format_owned(&self.owned)
    }

    /// Whether the config asks for TLS (a `tls://` server, a CA to trust, or a client
    /// certificate): then every connection must be TLS, to the servers listed and to those the
    /// cluster tells of, so that neither a server that does not ask for it nor one in the path
    /// can have the credentials in clear text.
    pub fn requires_tls(&self) -> bool {
        self.tls_ca_file.is_some()
            || self.tls_client_cert.is_some()
            || self.servers.iter().any(|s| s.starts_with("tls://"))
    }

    /// The warning for a token or password the config would send to a server beyond this
    /// host in clear text (no TLS asked for).
    pub fn clear_text_warning(&self) -> Option<String> {
        let key = match self.auth {
            NatsAuth::Token(_) => "source.nats.token",
            NatsAuth::UserPassword { .. } => "source.nats.password",
            NatsAuth::CredsFile(_) | NatsAuth::None => return None,
        };
        if self.requires_tls() {
            return None;
        }
        let remote: Vec<String> = self
            .servers
            .iter()
            .filter_map(|s| s.parse::<async_nats::ServerAddr>().ok())
            .filter(|addr| !crate::config::names_this_host(addr.host()))
            .map(|addr| format!("{}:{}", addr.host(), addr.port()))
            .collect();
        (!remote.is_empty()).then(|| {
            format!(
                "{key} goes to {} in clear text: give the servers as tls://, or set source.nats.tls_ca_file",
                remote.join(", ")
            )
        })
    }
}

/// A subject token may not be empty, hold spaces or be a wildcard.
fn check_subject_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        return Err("must not be empty".into());
    }
    for token in prefix.split('.') {
        if token.is_empty() {
            return Err(format!(
                "`{prefix}` has an empty token (two dots, or a dot at an end)"
            ));
        }
        if token == "*"
            || token == ">"
            || token.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "`{}` must be plain subject tokens, without wildcards, spaces or control characters",
                prefix.escape_debug()
            ));
        }
    }
    Ok(())
}

fn check_server(server: &str) -> Result<(), String> {
    let shown = crate::config::redacted_address(server);
    // outpost's NATS client is built without WebSocket support.
    if server.starts_with("ws://") || server.starts_with("wss://") {
        return Err(format!(
            "`{shown}`: NATS over WebSocket is not supported; give the server's nats:// or tls:// address"
        ));
    }
    let scheme_ok =
        ["nats://", "tls://"].iter().any(|s| server.starts_with(s)) || !server.contains("://");
    if server.trim().is_empty() || !scheme_ok {
        return Err(format!(
            "`{shown}` is not a server address like nats://10.0.0.5:4222"
        ));
    }
    // The NATS client ignores a user, password or token in a server's address; and the
    // address is printed in errors and logs.
    if server.contains('@') {
        return Err(format!(
            "`{shown}` carries credentials in the address, where they are not used: give them as source.nats.user and password, token or creds_file"
        ));
    }
    // What the client will connect to: a host, and nothing after it (`nats//10.0.0.5:4222`
    // would be host `nats` with a path, tried in the background for ever).
    let not_an_address =
        |why: &str| format!("`{shown}` is not a server address like nats://10.0.0.5:4222: {why}");
    let url = server
        .parse::<async_nats::ServerAddr>()
        .map_err(|e| not_an_address(&e.to_string()))?
        .into_inner();
    if url.host_str().is_none_or(str::is_empty) {
        return Err(not_an_address("it names no host"));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err(not_an_address("it has more after the host and port"));
    }
    Ok(())
}

pub(crate) fn validate_nats(
    raw: RawNats,
    relative: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<NatsSource, KeyError> {
    if raw.servers.is_empty() {
        return Err((
            "source.nats.servers",
            "must name at least one server".into(),
        ));
    }
    for server in &raw.servers {
        check_server(server).map_err(|m| ("source.nats.servers", m))?;
    }
    let auth = match (raw.creds_file, raw.token, raw.user, raw.password) {
        (None, None, None, None) => NatsAuth::None,
        (Some(file), None, None, None) => NatsAuth::CredsFile(relative(file)),
        (None, Some(token), None, None) if !token.is_empty() => NatsAuth::Token(Secret::new(token)),
        (None, Some(_), None, None) => {
            return Err(("source.nats.token", "must not be empty".into()))
        }
        (None, None, Some(user), Some(password)) if password.is_empty() && !user.is_empty() => {
            return Err(("source.nats.password", "must not be empty".into()))
        }
        (None, None, Some(user), Some(password)) if !user.is_empty() => NatsAuth::UserPassword {
            user,
            password: Secret::new(password),
        },
        (None, None, Some(_), Some(_)) => {
            return Err(("source.nats.user", "must not be empty".into()))
        }
        (None, None, Some(_), None) => {
            return Err(("source.nats.password", "is required with user".into()))
        }
        (None, None, None, Some(_)) => {
            return Err(("source.nats.user", "is required with password".into()))
        }
        (Some(_), _, _, _) => {
            return Err((
                "source.nats.creds_file",
                "give one of creds_file, token, or user + password".into(),
            ))
        }
        (None, Some(_), _, _) => {
            return Err((
                "source.nats.token",
                "give one of creds_file, token, or user + password".into(),
            ))
        }
    };
    if raw.stream.is_empty()
        || !raw
            .stream
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err((
            "source.nats.stream",
            format!(
                "`{}` is not a stream name (letters, digits, _ and -)",
                raw.stream.escape_debug()
            ),
        ));
    }
    check_subject_prefix(&raw.subject_prefix).map_err(|m| ("source.nats.subject_prefix", m))?;
    if raw.partitions == 0 || raw.partitions > 4096 {
        return Err((
            "source.nats.partitions",
            "must be between 1 and 4096".into(),
        ));
    }
    let owned = match raw.owned {
        None => (0..raw.partitions).collect(),
        Some(text) => parse_owned(&text, raw.partitions).map_err(|m| ("source.nats.owned", m))?,
    };
    if raw.replicas == 0 || raw.replicas > 5 {
        return Err(("source.nats.replicas", "must be between 1 and 5".into()));
    }
    if raw.fetch_batch == 0 || raw.fetch_batch > 10_000 {
        return Err((
            "source.nats.fetch_batch",
            "must be between 1 and 10000".into(),
        ));
    }
    if raw.consumer_prefix.is_empty()
        || !raw
            .consumer_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err((
            "source.nats.consumer_prefix",
            format!(
                "`{}` is not a consumer name prefix (letters, digits, _ and -)",
                raw.consumer_prefix.escape_debug()
            ),
        ));
    }
    // NATS takes it in nanoseconds as an i64: far larger values wrap around.
    if raw.ack_wait_s == 0 || raw.ack_wait_s > MAX_ACK_WAIT_S {
        return Err((
            "source.nats.ack_wait_s",
            format!("must be between 1 and {MAX_ACK_WAIT_S} (a day)"),
        ));
    }
    if raw.max_rejected == 0 || raw.max_rejected > MAX_MAX_REJECTED {
        return Err((
            "source.nats.max_rejected",
            format!("must be between 1 and {MAX_MAX_REJECTED}"),
        ));
    }
    let tls_client_cert = match (raw.tls_cert_file, raw.tls_key_file) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some((relative(cert), relative(key))),
        (Some(_), None) => {
            return Err((
                "source.nats.tls_key_file",
                "is required with tls_cert_file (the key of the client certificate)".into(),
            ))
        }
        (None, Some(_)) => {
            return Err((
                "source.nats.tls_cert_file",
                "is required with tls_key_file (the client certificate the key is of)".into(),
            ))
        }
    };
    Ok(NatsSource {
        servers: raw.servers,
        auth,
        tls_ca_file: raw.tls_ca_file.map(relative),
        tls_client_cert,
        stream: raw.stream,
        subject_prefix: raw.subject_prefix,
        partitions: raw.partitions,
        owned,
        replicas: raw.replicas as usize,
        fetch_batch: raw.fetch_batch as usize,
        ack_wait: Duration::from_secs(raw.ack_wait_s),
        consumer_prefix: raw.consumer_prefix,
        max_rejected: raw.max_rejected,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    const BASE: &str = r#"
[destination]
http_endpoint = "http://127.0.0.1:1/p"
[destination.auth]
type = "none"
[mapping]
segments = ["s"]
"#;

    fn parse(nats: &str) -> Result<Config, String> {
        let text = format!("{BASE}[source.nats]\n{nats}\n");
        Config::parse(Path::new("/etc/outpost/outpost.toml"), &text).map_err(|e| e.to_string())
    }

    /// TLS is required wherever the config asks for it; a token or password that would go to
    /// another host without it is warned of.
    #[test]
    fn credentials_in_clear_text_beyond_this_host_are_warned_of() {
        // (servers, credentials, TLS required, warned of hosts)
        let cases = [
            (
                "\"nats://10.0.0.5:4222\"",
                "token = \"t0ken\"",
                false,
                Some("10.0.0.5:4222"),
            ),
            (
                "\"10.0.0.5\", \"nats://localhost:4222\"",
                "user = \"u\"\npassword = \"pa55\"",
                false,
                Some("10.0.0.5:4222"),
            ),
            (
                "\"nats://127.0.0.1:4222\", \"[::1]:4222\"",
                "token = \"t0ken\"",
                false,
                None,
            ),
            ("\"tls://10.0.0.5:4222\"", "token = \"t0ken\"", true, None),
            // One tls:// server: every connection is TLS, to the others too.
            (
                "\"nats://10.0.0.6:4222\", \"tls://10.0.0.5:4222\"",
                "token = \"t0ken\"",
                true,
                None,
            ),
            ("\"nats://10.0.0.5:4222\"", "", false, None),
        ];
        for (servers, credentials, tls, warned) in cases {
            let config = parse(&format!(
                "servers = [{servers}]\npartitions = 4\n{credentials}"
            ))
            .unwrap();
            let nats = config.nats.as_ref().unwrap();
            assert_eq!(nats.requires_tls(), tls, "{servers}");
            let warning = nats.clear_text_warning();
            match warned {
                None => assert_eq!(warning, None, "{servers}"),
                Some(host) => {
                    let warning = warning.unwrap();
                    assert!(
                        warning.contains(&format!("goes to {host} in clear text")),
                        "{warning}"
                    );
                    assert!(!warning.contains("t0ken") && !warning.contains("pa55"));
                    assert!(config.warnings.contains(&warning), "{:?}", config.warnings);
                }
            }
        }
        let mut with_ca =
            parse("servers = [\"nats://10.0.0.5:4222\"]\npartitions = 4\ntoken = \"t\"")
                .unwrap()
                .nats
                .unwrap();
        with_ca.tls_ca_file = Some("/etc/outpost/nats-ca.pem".into());
        assert!(with_ca.requires_tls());
        assert_eq!(with_ca.clear_text_warning(), None);
        let with_cert = parse(
            "servers = [\"nats://10.0.0.5:4222\"]\npartitions = 4\ntoken = \"t\"\n\
             tls_cert_file = \"agent.pem\"\ntls_key_file = \"/keys/agent-key.pem\"",
        )
        .unwrap();
        let nats = with_cert.nats.as_ref().unwrap();
        assert_eq!(
            nats.tls_client_cert,
            Some((
                "/etc/outpost/agent.pem".into(),
                "/keys/agent-key.pem".into()
            ))
        );
        assert!(nats.requires_tls());
        assert_eq!(nats.clear_text_warning(), None);
        assert!(
            with_cert
                .secret_files
                .iter()
                .any(|(key, path)| *key == "source.nats.tls_key_file"
                    && path == Path::new("/keys/agent-key.pem")),
            "{:?}",
            with_cert.secret_files
        );
    }

    #[test]
    fn defaults_and_relative_paths() {
        let nats = parse(
            "servers = [\"nats://10.0.0.5:4222\"]\npartitions = 12\ncreds_file = \"agent.creds\"",
        )
        .unwrap()
        .nats
        .unwrap();
        assert_eq!(nats.stream, "OUTPOST_UPDATES");
        assert_eq!(nats.subject_prefix, "outpost.updates");
        assert_eq!(nats.owned, (0..12).collect::<Vec<_>>());
        assert_eq!(nats.replicas, 1);
        assert_eq!(
            nats.auth,
            NatsAuth::CredsFile("/etc/outpost/agent.creds".into())
        );
        let owned = parse("servers = [\"n:4222\"]\npartitions = 12\nowned = \"0-3,7,9-11\"")
            .unwrap()
            .nats
            .unwrap();
        assert_eq!(owned.owned, [0, 1, 2, 3, 7, 9, 10, 11]);
        assert_eq!(owned.owned_text(), "0-3,7,9-11");
        assert!(
            Config::parse(Path::new("x.toml"), BASE)
                .unwrap()
                .nats
                .is_none(),
            "no table, no source"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let servers = "servers = [\"nats://h:4222\"]\n";
        for (nats, key) in [
            ("partitions = 4".to_owned(), "missing field `servers`"),
            (
                format!("{servers}partitions = 4\nbogus = 1"),
                "unknown field `bogus`",
            ),
            (
                "servers = []\npartitions = 4".to_owned(),
                "source.nats.servers",
            ),
            (
                "servers = [\"http://h\"]\npartitions = 4".to_owned(),
                "source.nats.servers",
            ),
            (
                "servers = [\"ws://h:8080\"]\npartitions = 4".to_owned(),
                "source.nats.servers",
            ),
            (
                "servers = [\"nats//10.0.0.5:4222\"]\npartitions = 4".to_owned(),
                "source.nats.servers: `nats//10.0.0.5:4222` is not a server address like nats://10.0.0.5:4222: it has more after the host and port",
            ),
            (
                "servers = [\"nats://\"]\npartitions = 4".to_owned(),
                "source.nats.servers",
            ),
            (
                "servers = [\"h:99999\"]\npartitions = 4".to_owned(),
                "source.nats.servers",
            ),
            (
                "servers = [\"nats://h:4222/x\"]\npartitions = 4".to_owned(),
                "it has more after the host and port",
            ),
            (
                format!("{servers}partitions = 4\nuser = \"u\"\npassword = \"\""),
                "source.nats.password: must not be empty",
            ),
            (format!("{servers}partitions = 0"), "source.nats.partitions"),
            (
                format!("{servers}partitions = 4\nowned = \"0-4\""),
                "source.nats.owned",
            ),
            (
                format!("{servers}partitions = 4\nowned = \"\""),
                "source.nats.owned",
            ),
            (
                format!("{servers}partitions = 4\nsubject_prefix = \"a..b\""),
                "source.nats.subject_prefix",
            ),
            (
                format!("{servers}partitions = 4\nsubject_prefix = \"a\\u0000b\""),
                "source.nats.subject_prefix",
            ),
            (
                format!("{servers}partitions = 4\nsubject_prefix = \"a.*\""),
                "source.nats.subject_prefix",
            ),
            (
                format!("{servers}partitions = 4\nstream = \"a.b\""),
                "source.nats.stream",
            ),
            (
                format!("{servers}partitions = 4\nreplicas = 0"),
                "source.nats.replicas",
            ),
            (
                format!("{servers}partitions = 4\nfetch_batch = 0"),
                "source.nats.fetch_batch",
            ),
            (
                format!("{servers}partitions = 4\nack_wait_s = 10000000000"),
                "source.nats.ack_wait_s",
            ),
            (
                format!("{servers}partitions = 4\nconsumer_prefix = \"a.b\""),
                "source.nats.consumer_prefix",
            ),
            (
                format!("{servers}partitions = 4\nmax_rejected = 0"),
                "source.nats.max_rejected",
            ),
            (
                format!("{servers}partitions = 4\nmax_rejected = 1000000001"),
                "source.nats.max_rejected",
            ),
            (
                format!("{servers}partitions = 4\nuser = \"u\""),
                "source.nats.password",
            ),
            (
                format!("{servers}partitions = 4\npassword = \"hunter2\""),
                "source.nats.user",
            ),
            (
                format!("{servers}partitions = 4\ntoken = \"\""),
                "source.nats.token",
            ),
            (
                format!("{servers}partitions = 4\ntoken = \"t\"\nuser = \"u\"\npassword = \"p\""),
                "source.nats.token",
            ),
            (
                format!("{servers}partitions = 4\ncreds_file = \"c\"\ntoken = \"hunter2\""),
                "source.nats.creds_file",
            ),
            (
                format!("{servers}partitions = 4\ntls_cert_file = \"c.pem\""),
                "source.nats.tls_key_file: is required with tls_cert_file",
            ),
            (
                format!("{servers}partitions = 4\ntls_key_file = \"k.pem\""),
                "source.nats.tls_cert_file: is required with tls_key_file",
            ),
        ] {
            let error = parse(&nats).unwrap_err();
            assert!(error.contains(key), "{nats}: {error}");
            assert!(!error.contains("hunter2"), "a secret in an error: {error}");
        }
    }

    #[test]
    fn credentials_never_show() {
        let config =
            parse("servers = [\"h:4222\"]\npartitions = 4\nuser = \"u\"\npassword = \"hunter2\"")
                .unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
        let config = parse("servers = [\"h:4222\"]\npartitions = 4\ntoken = \"hunter2\"").unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    /// The client would not use them, and addresses are printed.
    #[test]
    fn credentials_in_a_server_address_are_refused_unshown() {
        for server in [
            "nats://alice:hunter2@h:4222",
            "tls://hunter2@h",
            "alice:hunter2@h:4222",
            "hunter2@h:4222",
            "http://alice:hunter2@h:4222",
        ] {
            let error = parse(&format!("servers = [\"{server}\"]\npartitions = 4")).unwrap_err();
            assert!(error.contains("source.nats.servers"), "{server}: {error}");
            assert!(!error.contains("hunter2"), "a secret in an error: {error}");
        }
    }
}
