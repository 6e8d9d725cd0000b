//! The config file's tables as TOML gives them: unknown keys refused, keys left out given
//! their defaults, nothing checked yet.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) destination: RawDestination,
    pub(super) mapping: RawMapping,
    #[serde(default)]
    pub(super) storage: RawStorage,
    #[serde(default)]
    pub(super) ingest: RawIngest,
    #[serde(default)]
    pub(super) delivery: RawDelivery,
    #[serde(default)]
    pub(super) source: Option<crate::source::config::RawSource>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDestination {
    #[serde(default)]
    pub(super) name: Option<String>,
    #[serde(default)]
    pub(super) description: Option<String>,
    pub(super) http_endpoint: String,
    #[serde(default)]
    pub(super) custom_headers: Option<String>,
    #[serde(default)]
    pub(super) custom_headers_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) ca_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) client_key_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) proxy: Option<String>,
    #[serde(default)]
    pub(super) no_proxy: Option<String>,
    #[serde(default)]
    pub(super) auth: Option<RawAuth>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    #[serde(rename = "type")]
    pub(super) kind: String,
    #[serde(default)]
    pub(super) auth_endpoint: Option<String>,
    #[serde(default)]
    pub(super) client_id: Option<String>,
    #[serde(default)]
    pub(super) client_secret: Option<String>,
    #[serde(default)]
    pub(super) client_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) credentials: Option<String>,
    #[serde(default)]
    pub(super) scope: Option<String>,
    #[serde(default)]
    pub(super) token: Option<String>,
    #[serde(default)]
    pub(super) token_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) username: Option<String>,
    #[serde(default)]
    pub(super) password: Option<String>,
    #[serde(default)]
    pub(super) password_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMapping {
    #[serde(default)]
    pub(super) attributes: Vec<String>,
    /// Ids, or tables read as [`RawSegmentTable`] (so that their errors can name the key).
    pub(super) segments: Vec<toml::Value>,
    #[serde(default)]
    pub(super) identities: Vec<String>,
    #[serde(default)]
    pub(super) include_segment_names: bool,
    #[serde(default)]
    pub(super) include_segment_timestamps: bool,
}

/// A `mapping.segments` entry that is a table: the id and what the payload may carry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSegmentTable {
    pub(super) id: String,
    #[serde(default)]
    pub(super) name: Option<String>,
    /// RFC 3339 text, or TOML's own (unquoted) date-time, read as its text.
    #[serde(default)]
    pub(super) created_at: Option<toml::Value>,
    #[serde(default)]
    pub(super) updated_at: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStorage {
    #[serde(default = "default_storage_path")]
    pub(super) path: PathBuf,
    #[serde(default = "default_max_outbox_bytes")]
    pub(super) max_outbox_bytes: u64,
    #[serde(default = "default_cache_bytes")]
    pub(super) cache_bytes: u64,
    #[serde(default = "default_reserve_bytes")]
    pub(super) reserve_bytes: u64,
}

impl Default for RawStorage {
    fn default() -> Self {
        RawStorage {
            path: default_storage_path(),
            max_outbox_bytes: default_max_outbox_bytes(),
            cache_bytes: default_cache_bytes(),
            reserve_bytes: default_reserve_bytes(),
        }
    }
}

fn default_storage_path() -> PathBuf {
    PathBuf::from("/var/lib/outpost")
}

fn default_max_outbox_bytes() -> u64 {
    1 << 30
}

fn default_reserve_bytes() -> u64 {
    32 << 20
}

fn default_cache_bytes() -> u64 {
    32 << 20
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIngest {
    #[serde(default = "default_listen")]
    pub(super) listen: String,
    #[serde(default)]
    pub(super) token: Option<String>,
    #[serde(default)]
    pub(super) token_file: Option<PathBuf>,
    #[serde(default = "default_max_body_bytes")]
    pub(super) max_body_bytes: u64,
    #[serde(default = "default_max_future_s")]
    pub(super) max_future_s: u64,
    #[serde(default = "default_read_timeout_ms")]
    pub(super) read_timeout_ms: u64,
    #[serde(default = "default_max_connections")]
    pub(super) max_connections: u64,
    #[serde(default)]
    pub(super) tls_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) tls_key_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) client_ca_file: Option<PathBuf>,
}

impl Default for RawIngest {
    fn default() -> Self {
        RawIngest {
            listen: default_listen(),
            token: None,
            token_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            client_ca_file: None,
            max_body_bytes: default_max_body_bytes(),
            max_future_s: default_max_future_s(),
            read_timeout_ms: default_read_timeout_ms(),
            max_connections: default_max_connections(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8686".into()
}

fn default_max_body_bytes() -> u64 {
    16 << 20
}

fn default_max_future_s() -> u64 {
    86_400
}

fn default_read_timeout_ms() -> u64 {
    30_000
}

fn default_max_connections() -> u64 {
    512
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDelivery {
    /// Deprecated: a fixed number of requests in flight.
    #[serde(default)]
    pub(super) concurrency: Option<u64>,
    #[serde(default)]
    pub(super) max_concurrency: Option<u64>,
    #[serde(default = "default_max_profiles_per_request")]
    pub(super) max_profiles_per_request: u64,
    #[serde(default = "default_request_timeout_ms")]
    pub(super) request_timeout_ms: u64,
    #[serde(default = "default_initial_backoff_ms")]
    pub(super) initial_backoff_ms: u64,
    #[serde(default = "default_max_backoff_ms")]
    pub(super) max_backoff_ms: u64,
    #[serde(default = "default_max_age_s")]
    pub(super) max_age_s: u64,
    #[serde(default = "default_rate_limit_headers")]
    pub(super) rate_limit_headers: bool,
}

impl Default for RawDelivery {
    fn default() -> Self {
        RawDelivery {
            concurrency: None,
            max_concurrency: None,
            max_profiles_per_request: default_max_profiles_per_request(),
            request_timeout_ms: default_request_timeout_ms(),
            initial_backoff_ms: default_initial_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
            max_age_s: default_max_age_s(),
            rate_limit_headers: default_rate_limit_headers(),
        }
    }
}

fn default_rate_limit_headers() -> bool {
    true
}

pub(super) fn default_max_concurrency() -> u64 {
    64
}

fn default_max_profiles_per_request() -> u64 {
    1
}

fn default_request_timeout_ms() -> u64 {
    10_000
}

fn default_initial_backoff_ms() -> u64 {
    1_000
}

fn default_max_backoff_ms() -> u64 {
    300_000
}

fn default_max_age_s() -> u64 {
    604_800
}
