//! The configuration: the TOML file, read once into a validated [`Config`].
//!
//! - A [`Config`] is only ever made validated: every key checked, paths taken relative to the
//!   file's folder, secrets read. What uses it checks nothing again.
//! - An error refuses the config and names the key it is about; the tables are checked in one
//!   order, so of several mistakes the same is reported first. A warning
//!   ([`Config::warnings`]) leaves the config valid, and is logged at start and shown by
//!   `check`.
//! - No error, warning or `Debug` output shows a secret: secrets are held in [`Secret`], TOML
//!   errors are told without their values, and addresses without credentials or queries.
//!
//! `raw` has the tables as serde reads them and `load` checks them in turn, with a file for
//! each part of the config: `auth`, `proxy`, `mapping`, `headers`, `address`, `secret`,
//! `warnings`, and `toml_error` for the file's syntax.

use std::path::{Path, PathBuf};
use std::time::Duration;

use url::Url;

use crate::source::config::NatsAuth;

mod address;
mod auth;
mod headers;
mod load;
mod mapping;
mod proxy;
mod raw;
mod reread;
mod secret;
#[cfg(test)]
mod test_support;
mod toml_error;
mod warnings;

pub(crate) use address::{names_this_host, redacted_address};
pub use auth::{Auth, CredentialsPlacement, Grant};
pub(crate) use headers::header_can_carry;
pub use headers::{parse_custom_headers, CustomHeadersFile};
pub use mapping::{MappedAt, Mapping, SegmentDetails};
pub use proxy::Proxy;
pub use reread::{cannot_read, look_every_second, written_just_now, FileRead, Rereadable};
#[cfg(test)]
pub use reread::{fifo_in_place_of, write_settled};
pub(crate) use secret::SECRET_LEAST_BYTES;
pub use secret::{Secret, SecretFile, Secrets};
pub use warnings::{
    clear_text_credentials_warnings, exposure_warning, readable_secret_file_warning,
    readable_secret_warning, IngestGuards,
};

/// A config error not yet placed in its file: the key it is about, and what is wrong with
/// it (never a secret's value). It becomes a [`ConfigError::Invalid`] in one place.
pub(crate) type KeyError = (&'static str, String);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}{}", missing_config_hint(source))]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

/// What to do about a config file that is not there: where outpost looks, and where to start.
fn missing_config_hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::NotFound => {
            " (give --config PATH or set OUTPOST_CONFIG; without either, outpost.toml in the \
             working folder is read. To start one: cp data/outpost.example.toml outpost.toml)"
        }
        _ => "",
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    /// What a person should know or change, though the config is valid: credentials sent in
    /// clear text, an ingest API anyone on the network may feed, arrays whose `Idempotency-Key`
    /// servers refuse, segment details the mapping asks for and lacks, environment variables a
    /// secret of the file shadows, deprecated keys, and (from [`Config::load`]) files others
    /// may read that hold secrets. Logged at start and shown by `check`.
    pub warnings: Vec<String>,
    /// The secret keys given in the file itself (for the warning on its permissions).
    pub inline_secrets: Vec<&'static str>,
    /// The files that hold a secret, with their keys (for the warning on their permissions).
    pub secret_files: Vec<(&'static str, PathBuf)>,
    pub destination: Destination,
    pub mapping: Mapping,
    pub storage: Storage,
    pub ingest: Ingest,
    pub delivery: Delivery,
    /// `[source.nats]`: a JetStream stream the agent consumes besides the ingest API.
    pub nats: Option<crate::source::config::NatsSource>,
}

#[derive(Debug, Clone)]
pub struct Destination {
    pub name: Option<String>,
    pub description: Option<String>,
    pub http_endpoint: Url,
    /// Names and values; a value may be a credential, so it never shows in `Debug` output.
    pub custom_headers: Vec<(String, Secret)>,
    /// Where some of `custom_headers` were read from.
    pub custom_headers_file: Option<CustomHeadersFile>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// `destination.proxy`: the endpoint and the token endpoint are reached through it.
    pub proxy: Option<Proxy>,
    pub auth: Auth,
}

impl Config {
    /// Every secret value the config holds, in no order: the destination's credentials, the
    /// proxy's password, the ingest token, NATS's token or password. Most are never sent to
    /// the endpoint (a static bearer token is), yet one that knows them (a gateway in front of
    /// the token endpoint too) may echo them in an answer, which is hidden before it is logged
    /// or stored.
    pub fn secrets_held(&self) -> Vec<&str> {
        let mut held: Vec<&Secret> = Vec::new();
        match &self.destination.auth {
            Auth::None => {}
            Auth::Bearer { token, .. } => held.push(token),
            Auth::OAuth2 {
                client_secret,
                grant,
                ..
            } => {
                held.push(client_secret);
                if let Grant::Password { password, .. } = grant {
                    held.push(password);
                }
            }
        }
        let proxy = self.destination.proxy.as_ref();
        held.extend(
            proxy
                .and_then(|p| p.credentials.as_ref())
                .map(|(_, password)| password),
        );
        held.extend(self.ingest.token.as_ref());
        match self.nats.as_ref().map(|nats| &nats.auth) {
            Some(NatsAuth::Token(token)) => held.push(token),
            Some(NatsAuth::UserPassword { password, .. }) => held.push(password),
            _ => {}
        }
        held.into_iter().map(Secret::expose).collect()
    }

    /// What another agent's config must agree on for partitions to move between their stores
    /// ([`crate::store::handover`]); `None` without `[source.nats]`.
    pub fn move_terms(&self) -> Option<crate::store::handover_file::Terms> {
        let nats = self.nats.as_ref()?;
        Some(crate::store::handover_file::Terms {
            partition_count: nats.partitions,
            mapping: self.mapping.fingerprint(),
            fleet: format!(
                "stream {}, consumer prefix {}",
                nats.stream, nats.consumer_prefix
            ),
            segments: self.mapping.segments.clone(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct Storage {
    pub path: PathBuf,
    pub max_outbox_bytes: u64,
    pub cache_bytes: u64,
    /// Disk space the agent keeps allocated beside the store, given up for delivery when the
    /// disk is full (`store::reserve`); 0: none.
    pub reserve_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct Ingest {
    pub listen: std::net::SocketAddr,
    pub token: Option<Secret>,
    /// Where `token` was read from, when from a file of its own.
    pub token_file: Option<SecretFile>,
    pub max_body_bytes: u64,
    /// An update's timestamp may be at most this far ahead of the agent's clock.
    pub max_future_s: u64,
    /// How long a connection may wait for its first byte, a request's headers may take to
    /// arrive once the connection waits for one (so also how long an idle HTTP/1 connection
    /// stays open), a body may stall, and a request may wait for room for its body.
    pub read_timeout: Duration,
    /// Connections open at once; past it, new ones wait in the listen backlog.
    pub max_connections: usize,
    /// Serve the ingest API over HTTPS.
    pub tls: Option<IngestTls>,
}

#[derive(Debug, Clone)]
pub struct IngestTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Require client certificates that chain to these roots.
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Delivery {
    /// Requests in flight adapt between 1 and this.
    pub max_concurrency: usize,
    /// Set by the deprecated `delivery.concurrency`: the limit does not adapt.
    pub fixed_concurrency: bool,
    pub max_profiles_per_request: usize,
    pub request_timeout: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub max_age: Duration,
    /// Whether an endpoint's `RateLimit` headers (its advertised quota) are believed.
    pub rate_limit_headers: bool,
}

/// Where the config comes from: `--config`, else `$OUTPOST_CONFIG`, else `outpost.toml`.
pub fn resolve_path(flag: Option<&Path>) -> PathBuf {
    if let Some(path) = flag {
        return path.to_path_buf();
    }
    match std::env::var_os("OUTPOST_CONFIG") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from("outpost.toml"),
    }
}
