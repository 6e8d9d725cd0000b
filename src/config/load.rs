//! Loading a config: the file read, its TOML parsed into raw tables, each table checked in
//! turn into a [`Config`], and the warnings gathered.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::address::parse_http_url;
use super::auth::validate_auth;
use super::headers::{
    header_can_carry, names_a_credential, parse_custom_headers, CustomHeadersFile,
};
use super::mapping::{missing_segment_details_warnings, validate_mapping};
use super::proxy::parse_proxy;
use super::raw::{
    default_max_concurrency, RawConfig, RawDelivery, RawDestination, RawIngest, RawStorage,
};
use super::secret::{read_optional_secret, secret_source, Secret, SecretFile, Secrets};
use super::toml_error::parse_error_without_values;
use super::warnings::{
    clear_text_credentials_warnings, exposure_warning, long_idempotency_key_warning,
    readable_secret_file_warning, readable_secret_warning, IngestGuards,
};
use super::{Config, ConfigError, Delivery, Destination, Ingest, IngestTls, KeyError, Storage};

/// The longest path a Unix socket can be bound at on Linux (`sun_path` is 108 bytes, with
/// its terminating zero).
const MAX_SOCKET_PATH_BYTES: usize = 107;

/// Far past what one process can hold open (file descriptors), and within a semaphore's range.
const MAX_CONNECTIONS: u64 = 1_000_000;

/// Ten minutes: `ingest.read_timeout_ms`, `delivery.request_timeout_ms`.
const MAX_TIMEOUT_MS: u64 = 600_000;

/// One day: `delivery.initial_backoff_ms`, `delivery.max_backoff_ms`.
const MAX_BACKOFF_MS: u64 = 86_400_000;

/// Ten years of run time: `delivery.max_age_s`.
const MAX_AGE_S: u64 = 315_360_000;

/// `delivery.max_concurrency` (and the deprecated `delivery.concurrency`).
const MAX_CONCURRENCY: u64 = 1024;

/// `delivery.max_profiles_per_request`.
const MAX_PROFILES_PER_REQUEST: u64 = 1000;

/// One MiB: `storage.cache_bytes`.
const MIN_CACHE_BYTES: u64 = 1 << 20;
const MAX_RESERVE_BYTES: u64 = 64 << 30;

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_for(path, Secrets::Required)
    }

    /// [`Config::load`], for a command that needs the destination's secrets or not.
    pub fn load_for(path: &Path, secrets: Secrets) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse_for(path, &text, secrets)?;
        let mode_of = |path: &Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(path)
                .ok()
                .map(|meta| meta.permissions().mode())
        };
        if let Some(mode) = mode_of(path) {
            config
                .warnings
                .extend(readable_secret_warning(path, mode, &config.inline_secrets));
        }
        for (key, file) in &config.secret_files {
            if let Some(mode) = mode_of(file) {
                config
                    .warnings
                    .extend(readable_secret_file_warning(key, file, mode));
            }
        }
        Ok(config)
    }

    /// Parses and validates. A secret the file gives neither inline nor by its `_file` is read
    /// here from the environment: `OUTPOST_CLIENT_SECRET`, `OUTPOST_PASSWORD`, `OUTPOST_TOKEN`
    /// or `OUTPOST_INGEST_TOKEN`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::parse_for(path, text, Secrets::Required)
    }

    /// [`Config::parse`], for a command that needs the destination's secrets or not.
    pub fn parse_for(path: &Path, text: &str, secrets: Secrets) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: parse_error_without_values(text, &e),
        })?;
        Config::validate(path, raw, secrets).map_err(|(key, message)| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        })
    }

    /// Checks the tables in one order (destination, mapping, storage, ingest, delivery,
    /// source.nats), so that of several mistakes the same one is reported first. Paths are
    /// taken relative to the config file's folder.
    fn validate(path: &Path, raw: RawConfig, secrets: Secrets) -> Result<Config, KeyError> {
        let mut inline_secrets = inline_secret_keys(&raw);
        let shadowed_env = shadowed_env_warnings(&raw, |variable| {
            std::env::var_os(variable).is_some_and(|value| !value.is_empty())
        });
        let base_dir = path.parent().unwrap_or(Path::new("."));
        let relative = |p: PathBuf| {
            if p.is_relative() {
                base_dir.join(p)
            } else {
                p
            }
        };
        let secret_files = secret_files(&raw)
            .into_iter()
            .map(|(key, file)| (key, relative(file)))
            .collect();

        let inline_headers = raw.destination.custom_headers.clone();
        let destination = validate_destination(raw.destination, &relative, secrets)?;
        let mapping = validate_mapping(raw.mapping)?;
        let storage = validate_storage(raw.storage, &relative)?;
        let ingest = validate_ingest(raw.ingest, &relative, secrets)?;
        let (delivery, deprecated_concurrency) = validate_delivery(raw.delivery)?;
        let nats = raw
            .source
            .and_then(|source| source.nats)
            .map(|nats| crate::source::config::validate_nats(nats, &relative))
            .transpose()?;

        inline_secrets.extend(destination_inline_secrets(
            &destination,
            inline_headers.as_deref(),
        ));
        let mut warnings = shadowed_env;
        warnings.extend(clear_text_credentials_warnings(
            &destination.http_endpoint,
            &destination.auth,
            carries_custom_authorization(&destination.custom_headers),
            destination.proxy.as_ref(),
        ));
        warnings.extend(exposure_warning(
            ingest.listen,
            IngestGuards {
                tls: ingest.tls.is_some(),
                client_certificates: ingest
                    .tls
                    .as_ref()
                    .is_some_and(|tls| tls.client_ca_file.is_some()),
                token: ingest.token.is_some(),
            },
        ));
        warnings.extend(deprecated_concurrency);
        warnings.extend(long_idempotency_key_warning(
            delivery.max_profiles_per_request as u64,
        ));
        warnings.extend(missing_segment_details_warnings(&mapping));
        warnings.extend(
            nats.as_ref()
                .and_then(crate::source::config::NatsSource::clear_text_warning),
        );

        Ok(Config {
            path: path.to_path_buf(),
            warnings,
            inline_secrets,
            secret_files,
            destination,
            mapping,
            storage,
            ingest,
            delivery,
            nats,
        })
    }
}

/// The secret keys given in the config file itself (not in a file of their own or the
/// environment) that can be told from the raw tables.
fn inline_secret_keys(raw: &RawConfig) -> Vec<&'static str> {
    let auth = raw.destination.auth.as_ref();
    [
        (
            auth.is_some_and(|auth| auth.client_secret.is_some()),
            "destination.auth.client_secret",
        ),
        (
            auth.is_some_and(|auth| auth.password.is_some()),
            "destination.auth.password",
        ),
        (
            auth.is_some_and(|auth| auth.token.is_some()),
            "destination.auth.token",
        ),
        (raw.ingest.token.is_some(), "ingest.token"),
    ]
    .into_iter()
    .filter_map(|(given, key)| given.then_some(key))
    .chain(
        raw.source
            .as_ref()
            .and_then(|source| source.nats.as_ref())
            .map(|nats| nats.inline_secrets())
            .unwrap_or_default(),
    )
    .collect()
}

/// The files a secret is read from, by their keys, as given (not yet relative to the config).
fn secret_files(raw: &RawConfig) -> Vec<(&'static str, PathBuf)> {
    let auth = raw.destination.auth.as_ref();
    let nats = raw.source.as_ref().and_then(|s| s.nats.as_ref());
    [
        (
            "destination.auth.client_secret_file",
            auth.and_then(|a| a.client_secret_file.clone()),
        ),
        (
            "destination.auth.password_file",
            auth.and_then(|a| a.password_file.clone()),
        ),
        (
            "destination.auth.token_file",
            auth.and_then(|a| a.token_file.clone()),
        ),
        (
            "destination.client_key_file",
            raw.destination.client_key_file.clone(),
        ),
        (
            "destination.custom_headers_file",
            raw.destination.custom_headers_file.clone(),
        ),
        ("ingest.token_file", raw.ingest.token_file.clone()),
        ("ingest.tls_key_file", raw.ingest.tls_key_file.clone()),
        (
            "source.nats.creds_file",
            nats.and_then(|n| n.creds_file().cloned()),
        ),
        (
            "source.nats.tls_key_file",
            nats.and_then(|n| n.tls_key_file().cloned()),
        ),
    ]
    .into_iter()
    .filter_map(|(key, file)| Some((key, file?)))
    .collect()
}

/// The destination's values that are secrets in the config file too: an `Authorization` of
/// the endpoint's own, a header or query value named as a credential (the endpoint's answers
/// are cleaned of every long value, a version or a tenant among them, which is no reason to
/// warn of the file), and the proxy's password.
fn destination_inline_secrets(
    destination: &Destination,
    inline_headers: Option<&str>,
) -> Vec<&'static str> {
    // Those of `custom_headers_file` are not in the config file. Already validated.
    let inline_headers = parse_custom_headers(inline_headers, true).unwrap_or_default();
    let custom_headers = inline_headers.iter().any(|(name, value)| {
        name.eq_ignore_ascii_case("authorization")
            || (names_a_credential(name) && !value.is_empty())
    });
    let http_endpoint = destination
        .http_endpoint
        .query_pairs()
        .any(|(name, value)| names_a_credential(&name) && !value.is_empty());
    let proxy = destination
        .proxy
        .as_ref()
        .is_some_and(|proxy| proxy.credentials.is_some());
    [
        (custom_headers, "destination.custom_headers"),
        (http_endpoint, "destination.http_endpoint"),
        (proxy, "destination.proxy"),
    ]
    .into_iter()
    .filter_map(|(given, key)| given.then_some(key))
    .collect()
}

/// Whether `destination.custom_headers` gives the endpoint's own credentials (with
/// `destination.auth.type = "none"`).
fn carries_custom_authorization(custom_headers: &[(String, Secret)]) -> bool {
    custom_headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("authorization"))
}

/// The warnings for secrets' environment variables (`is_set`: set and not empty) that the
/// config file's own secret (or its `_file`) shadows: one rotated there would go unused.
fn shadowed_env_warnings(raw: &RawConfig, is_set: impl Fn(&str) -> bool) -> Vec<String> {
    let auth = raw.destination.auth.as_ref();
    [
        (
            auth.is_some_and(|auth| {
                auth.client_secret.is_some() || auth.client_secret_file.is_some()
            }),
            "OUTPOST_CLIENT_SECRET",
            "destination.auth.client_secret",
        ),
        (
            auth.is_some_and(|auth| auth.password.is_some() || auth.password_file.is_some()),
            "OUTPOST_PASSWORD",
            "destination.auth.password",
        ),
        (
            auth.is_some_and(|auth| auth.token.is_some() || auth.token_file.is_some()),
            "OUTPOST_TOKEN",
            "destination.auth.token",
        ),
        (
            raw.ingest.token.is_some() || raw.ingest.token_file.is_some(),
            "OUTPOST_INGEST_TOKEN",
            "ingest.token",
        ),
    ]
    .into_iter()
    .filter(|(in_file, variable, _)| *in_file && is_set(variable))
    .map(|(_, variable, key)| {
        format!("{variable} is set, but {key} (or its _file) in the config file is what is used")
    })
    .collect()
}

/// A certificate and its key (`keys`: their keys), given together or not at all.
fn both_or_neither(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    (cert_key, key_key): (&'static str, &'static str),
) -> Result<Option<(PathBuf, PathBuf)>, KeyError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some((cert, key))),
        (None, None) => Ok(None),
        (Some(_), None) => Err((key_key, format!("is required with {cert_key}"))),
        (None, Some(_)) => Err((cert_key, format!("is required with {key_key}"))),
    }
}

fn validate_destination(
    raw: RawDestination,
    relative: &dyn Fn(PathBuf) -> PathBuf,
    secrets: Secrets,
) -> Result<Destination, KeyError> {
    let http_endpoint =
        parse_http_url(&raw.http_endpoint).map_err(|m| ("destination.http_endpoint", m))?;
    let auth_is_none = raw.auth.as_ref().is_some_and(|auth| auth.kind == "none");
    let mut custom_headers = parse_custom_headers(raw.custom_headers.as_deref(), auth_is_none)
        .map_err(|m| ("destination.custom_headers", m))?;
    let custom_headers_file = raw
        .custom_headers_file
        .map(|file| CustomHeadersFile::new(relative(file), custom_headers.clone(), auth_is_none));
    if let Some(file) = &custom_headers_file {
        custom_headers = file
            .read(false)
            .map_err(|e| ("destination.custom_headers_file", e))?;
    }
    let custom_headers = custom_headers
        .into_iter()
        .map(|(name, value)| (name, Secret::new(value)))
        .collect();
    let client_cert = both_or_neither(
        raw.client_cert_file,
        raw.client_key_file,
        (
            "destination.client_cert_file",
            "destination.client_key_file",
        ),
    )?
    .map(|(cert, key)| (relative(cert), relative(key)));
    let proxy = parse_proxy(raw.proxy.as_deref(), raw.no_proxy.as_deref())?;
    let auth = validate_auth(raw.auth, relative, secrets)?;
    Ok(Destination {
        name: raw.name,
        description: raw.description,
        http_endpoint,
        custom_headers,
        custom_headers_file,
        ca_file: raw.ca_file.map(relative),
        client_cert,
        proxy,
        auth,
    })
}

fn validate_storage(
    raw: RawStorage,
    relative: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<Storage, KeyError> {
    if raw.path.as_os_str().is_empty() {
        return Err(("storage.path", "must not be empty".into()));
    }
    // The agent's admin socket lives in the store folder, and a Unix socket's path has room
    // for 107 bytes.
    let path = relative(raw.path);
    let socket = path.join(crate::admin::SOCKET_NAME);
    if socket.as_os_str().len() > MAX_SOCKET_PATH_BYTES {
        return Err((
            "storage.path",
            format!(
                "{} is too long: the agent's socket there, {}, would be {} bytes, and a Unix socket's path holds at most {MAX_SOCKET_PATH_BYTES}",
                path.display(),
                crate::admin::SOCKET_NAME,
                socket.as_os_str().len()
            ),
        ));
    }
    if raw.max_outbox_bytes == 0 {
        return Err(("storage.max_outbox_bytes", "must be above 0".into()));
    }
    if raw.cache_bytes < MIN_CACHE_BYTES {
        return Err((
            "storage.cache_bytes",
            format!("must be at least {MIN_CACHE_BYTES}"),
        ));
    }
    let at_least = crate::store::reserve::RESERVE_AT_LEAST;
    if raw.reserve_bytes != 0 && !(at_least..=MAX_RESERVE_BYTES).contains(&raw.reserve_bytes) {
        return Err((
            "storage.reserve_bytes",
            format!(
                "must be 0 (none) or from {at_least} (2 MiB: the reopen that gives it up writes 1 MiB to see that there is room) to {MAX_RESERVE_BYTES} (64 GiB)"
            ),
        ));
    }
    Ok(Storage {
        path,
        max_outbox_bytes: raw.max_outbox_bytes,
        cache_bytes: raw.cache_bytes,
        reserve_bytes: raw.reserve_bytes,
    })
}

fn validate_ingest(
    raw: RawIngest,
    relative: &dyn Fn(PathBuf) -> PathBuf,
    secrets: Secrets,
) -> Result<Ingest, KeyError> {
    let listen = raw.listen.parse().map_err(|_| {
        (
            "ingest.listen",
            format!(
                "`{}` is not an IP address and port like 127.0.0.1:8686 or [::1]:8686 (host names are not looked up)",
                raw.listen
            ),
        )
    })?;
    let token_keys = ("ingest.token", "ingest.token_file", "OUTPOST_INGEST_TOKEN");
    let token_source = secret_source(raw.token.is_some(), raw.token_file.is_some(), token_keys);
    let token_file = raw
        .token_file
        .clone()
        .map(|file| SecretFile::new(relative(file), "ingest.token_file", true));
    let token = read_optional_secret(raw.token, raw.token_file, relative, token_keys, secrets)?;
    // A header value that is read as text holds only visible ASCII, spaces and tabs; a space
    // or tab at its end is not the sender's, and those after `Bearer` are read as the
    // separator: such a token could never be matched.
    if token
        .as_ref()
        .is_some_and(|token| !header_can_carry(token.expose()))
    {
        return Err((
            "ingest.token",
            format!(
                "{token_source}may hold only ASCII letters, digits, punctuation, spaces and \
                 tabs, and must not begin or end with a space or tab: no request's \
                 Authorization header could carry it"
            ),
        ));
    }
    if raw.max_body_bytes == 0 {
        return Err(("ingest.max_body_bytes", "must be above 0".into()));
    }
    if raw.max_future_s == 0 {
        return Err(("ingest.max_future_s", "must be above 0".into()));
    }
    if raw.read_timeout_ms == 0 || raw.read_timeout_ms > MAX_TIMEOUT_MS {
        return Err((
            "ingest.read_timeout_ms",
            format!("must be between 1 and {MAX_TIMEOUT_MS}"),
        ));
    }
    if raw.max_connections == 0 || raw.max_connections > MAX_CONNECTIONS {
        return Err((
            "ingest.max_connections",
            format!("must be between 1 and {MAX_CONNECTIONS}"),
        ));
    }
    let tls = both_or_neither(
        raw.tls_cert_file,
        raw.tls_key_file,
        ("ingest.tls_cert_file", "ingest.tls_key_file"),
    )?;
    if tls.is_none() && raw.client_ca_file.is_some() {
        return Err((
            "ingest.client_ca_file",
            "needs ingest.tls_cert_file and ingest.tls_key_file (client certificates are asked \
             for over TLS)"
                .into(),
        ));
    }
    Ok(Ingest {
        listen,
        token_file,
        token,
        max_body_bytes: raw.max_body_bytes,
        max_future_s: raw.max_future_s,
        read_timeout: Duration::from_millis(raw.read_timeout_ms),
        max_connections: raw.max_connections as usize,
        tls: tls.map(|(cert, key)| IngestTls {
            cert_file: relative(cert),
            key_file: relative(key),
            client_ca_file: raw.client_ca_file.map(relative),
        }),
    })
}

/// `[delivery]`, with the warning for the deprecated `delivery.concurrency` when it is given.
fn validate_delivery(raw: RawDelivery) -> Result<(Delivery, Option<String>), KeyError> {
    let (concurrency_key, max_concurrency, fixed_concurrency) =
        match (raw.concurrency, raw.max_concurrency) {
            (Some(_), Some(_)) => {
                return Err((
                    "delivery.concurrency",
                    "is replaced by delivery.max_concurrency; give only that".into(),
                ))
            }
            (Some(fixed), None) => ("delivery.concurrency", fixed, true),
            (None, max) => (
                "delivery.max_concurrency",
                max.unwrap_or_else(default_max_concurrency),
                false,
            ),
        };
    let deprecation = fixed_concurrency.then(|| {
        format!(
            "delivery.concurrency is deprecated: it fixes the requests in flight at \
             {max_concurrency}; set delivery.max_concurrency instead to let them adapt"
        )
    });
    if max_concurrency == 0 || max_concurrency > MAX_CONCURRENCY {
        return Err((
            concurrency_key,
            format!("must be between 1 and {MAX_CONCURRENCY}"),
        ));
    }
    if raw.max_profiles_per_request == 0 || raw.max_profiles_per_request > MAX_PROFILES_PER_REQUEST
    {
        return Err((
            "delivery.max_profiles_per_request",
            format!("must be between 1 and {MAX_PROFILES_PER_REQUEST}"),
        ));
    }
    // Upper bounds catch a value in the wrong unit, and keep every deadline the agent adds
    // them to (a stop's, a retry's) within what a clock can hold.
    for (key, value, most) in [
        (
            "delivery.request_timeout_ms",
            raw.request_timeout_ms,
            MAX_TIMEOUT_MS,
        ),
        (
            "delivery.initial_backoff_ms",
            raw.initial_backoff_ms,
            MAX_BACKOFF_MS,
        ),
        (
            "delivery.max_backoff_ms",
            raw.max_backoff_ms,
            MAX_BACKOFF_MS,
        ),
        ("delivery.max_age_s", raw.max_age_s, MAX_AGE_S),
    ] {
        if value == 0 || value > most {
            return Err((key, format!("must be between 1 and {most}")));
        }
    }
    if raw.max_backoff_ms < raw.initial_backoff_ms {
        return Err((
            "delivery.max_backoff_ms",
            "must not be below delivery.initial_backoff_ms".into(),
        ));
    }
    let delivery = Delivery {
        max_concurrency: max_concurrency as usize,
        fixed_concurrency,
        max_profiles_per_request: raw.max_profiles_per_request as usize,
        request_timeout: Duration::from_millis(raw.request_timeout_ms),
        initial_backoff: Duration::from_millis(raw.initial_backoff_ms),
        max_backoff: Duration::from_millis(raw.max_backoff_ms),
        max_age: Duration::from_secs(raw.max_age_s),
        rate_limit_headers: raw.rate_limit_headers,
    };
    Ok((delivery, deprecation))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{environment, error_of, parse, VALID};

    #[test]
    fn valid_config_is_parsed_with_defaults() {
        let _environment = environment();
        let config = parse(VALID).unwrap();
        assert_eq!(
            config.destination.http_endpoint.query(),
            Some("source=edge")
        );
        let headers: Vec<(&str, &str)> = config
            .destination
            .custom_headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.expose()))
            .collect();
        assert_eq!(headers, [("x-api-version", "2"), ("x-tenant", "acme")]);
        assert_eq!(config.storage.path, PathBuf::from("/etc/outpost/store"));
        assert_eq!(config.delivery.max_concurrency, 64);
        assert!(!config.delivery.fixed_concurrency);
        assert_eq!(config.delivery.max_profiles_per_request, 1);
        assert!(config.delivery.rate_limit_headers);
        assert!(config.warnings.is_empty());
        assert_eq!(config.delivery.max_backoff, Duration::from_secs(300));
        assert_eq!(
            config.mapping.attributes,
            vec![vec!["person", "name", "firstName"]]
        );
        assert!(config.mapping.identities.is_empty());
        assert_eq!(config.ingest.max_future_s, 86_400);
        assert_eq!(config.ingest.read_timeout, Duration::from_secs(30));
        assert_eq!(config.storage.reserve_bytes, 32 << 20);
    }

    #[test]
    fn errors_name_the_key() {
        // In /etc/outpost/, its socket would be 108 bytes; one less is taken (below).
        let long_store_path = format!("path = \"{}\"", "s".repeat(82));
        let cases: &[(&str, &str, &str)] = &[
            ("unknown key", "[mapping]\n", "[mapping]\ncolour = 1\n"),
            (
                "bad url",
                "https://api.example.com/profiles?source=edge",
                "not a url",
            ),
            (
                "ftp url",
                "https://api.example.com/profiles?source=edge",
                "ftp://x/y",
            ),
            (
                "bad headers",
                "x-api-version:2,x-tenant:acme",
                "x-api-version2",
            ),
            ("empty segments", "segments = [\"seg-a\"]", "segments = []"),
            (
                "wrong type",
                "segments = [\"seg-a\"]",
                "segments = \"seg-a\"",
            ),
            ("bad auth type", "oauth2_client_credentials", "kerberos"),
            (
                "zero max_future_s",
                "[storage]",
                "[ingest]\nmax_future_s = 0\n\n[storage]",
            ),
            (
                "negative max_future_s",
                "[storage]",
                "[ingest]\nmax_future_s = -5\n\n[storage]",
            ),
            (
                "zero read_timeout_ms",
                "[storage]",
                "[ingest]\nread_timeout_ms = 0\n\n[storage]",
            ),
            (
                "zero max_connections",
                "[storage]",
                "[ingest]\nmax_connections = 0\n\n[storage]",
            ),
            (
                "a store path too long for the agent's socket",
                "path = \"store\"",
                &long_store_path,
            ),
            (
                "a reserve over 64 GiB",
                "path = \"store\"",
                "path = \"store\"\nreserve_bytes = 68719476737",
            ),
            (
                "a reserve under the trial write's 1 MiB twice",
                "path = \"store\"",
                "path = \"store\"\nreserve_bytes = 1048576",
            ),
        ];
        let expected_keys = [
            "colour",
            "destination.http_endpoint",
            "destination.http_endpoint",
            "destination.custom_headers",
            "mapping.segments",
            "segments",
            "destination.auth.type",
            "ingest.max_future_s",
            "max_future_s",
            "ingest.read_timeout_ms",
            "ingest.max_connections",
            "storage.path",
            "storage.reserve_bytes",
            "storage.reserve_bytes",
        ];
        for ((name, from, to), key) in cases.iter().zip(expected_keys) {
            let text = VALID.replacen(from, to, 1);
            assert_ne!(text, VALID, "case {name} did not change the config");
            let error = error_of(&text);
            assert!(
                error.contains(key),
                "case {name}: `{error}` does not name {key}"
            );
            assert!(
                !error.contains("s3cr3t-value"),
                "case {name} leaks the secret"
            );
        }
        let longest = format!("path = \"{}\"", "s".repeat(81));
        assert!(parse(&VALID.replacen("path = \"store\"", &longest, 1)).is_ok());
    }

    /// A variable set is warned of only when the file gives its secret, inline or by its
    /// `_file`; what is set is given, not read, so the process environment is not needed.
    #[test]
    fn a_variable_is_shadowed_only_by_its_own_secret_in_the_file() {
        let raw = |auth: &str, ingest: &str| -> RawConfig {
            let text = VALID
                .replace("client_secret = \"s3cr3t-value\"", auth)
                .replacen("[storage]", &format!("[ingest]\n{ingest}\n\n[storage]"), 1);
            toml::from_str(&text).unwrap()
        };
        let every = [
            "OUTPOST_CLIENT_SECRET",
            "OUTPOST_PASSWORD",
            "OUTPOST_TOKEN",
            "OUTPOST_INGEST_TOKEN",
        ];
        // (the auth table's secret lines, the ingest table's, the variables set, those warned of)
        let cases: [(&str, &str, &[&str], &[&str]); 7] = [
            ("client_secret = \"s\"", "", &[], &[]),
            (
                "client_secret = \"s\"",
                "",
                &every,
                &["OUTPOST_CLIENT_SECRET"],
            ),
            (
                "client_secret_file = \"f\"",
                "",
                &["OUTPOST_CLIENT_SECRET", "OUTPOST_TOKEN"],
                &["OUTPOST_CLIENT_SECRET"],
            ),
            ("", "", &every, &[]),
            (
                "password_file = \"p\"",
                "token = \"t\"",
                &every,
                &["OUTPOST_PASSWORD", "OUTPOST_INGEST_TOKEN"],
            ),
            (
                "token = \"t\"",
                "token_file = \"i\"",
                &["OUTPOST_TOKEN", "OUTPOST_INGEST_TOKEN"],
                &["OUTPOST_TOKEN", "OUTPOST_INGEST_TOKEN"],
            ),
            ("", "token_file = \"i\"", &["OUTPOST_TOKEN"], &[]),
        ];
        for (auth, ingest, set, warned) in cases {
            let warnings =
                shadowed_env_warnings(&raw(auth, ingest), |variable| set.contains(&variable));
            let named: Vec<&str> = warnings
                .iter()
                .map(|warning| warning.split(' ').next().unwrap_or_default())
                .collect();
            assert_eq!(named, warned, "{auth} {ingest} {set:?}");
        }
        assert_eq!(
            shadowed_env_warnings(&raw("", "token = \"t\""), |_| true),
            ["OUTPOST_INGEST_TOKEN is set, but ingest.token (or its _file) in the config file is what is used"]
        );
    }

    /// A file a secret is read from that others may read is warned of, as the config file is;
    /// one its group may read (the service's set-up) is not.
    #[test]
    fn secret_files_others_may_read_are_warned_of() {
        use std::os::unix::fs::PermissionsExt;
        let _environment = environment();
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let file = dir.path().join(name);
            std::fs::write(&file, text).unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            file
        };
        let secret = write("secret", "s3cr3t-in-file\n", 0o644);
        let key = write("ingest.key", "not read by load\n", 0o604);
        write("group-token", "t0ken-for-group\n", 0o640);
        let text = VALID
            .replace(
                "client_secret = \"s3cr3t-value\"",
                "client_secret_file = \"secret\"",
            )
            .replacen(
                "[storage]",
                "[ingest]\ntoken_file = \"group-token\"\ntls_cert_file = \"ingest.crt\"\ntls_key_file = \"ingest.key\"\n\n[storage]",
                1,
            );
        let config_path = write("outpost.toml", &text, 0o600);
        let config = Config::load(&config_path).unwrap();
        assert_eq!(
            config.warnings,
            [
                format!(
                    "{} holds a secret (destination.auth.client_secret_file) and other users can read it (mode 644); run chmod o-rwx {0}",
                    secret.display()
                ),
                format!(
                    "{} holds a secret (ingest.tls_key_file) and other users can read it (mode 604); run chmod o-rwx {0}",
                    key.display()
                ),
            ]
        );
        assert!(
            !config.warnings.concat().contains("s3cr3t"),
            "{:?}",
            config.warnings
        );
    }

    /// Secrets of `[source.nats]` given in the file count toward the warning about a file
    /// others may read, as the destination's do.
    #[test]
    fn nats_secrets_in_the_file_are_counted_as_inline_secrets() {
        for (line, key) in [
            ("token = \"t0ken\"", "source.nats.token"),
            (
                "user = \"u\"\npassword = \"hunter2\"",
                "source.nats.password",
            ),
        ] {
            let text =
                format!("{VALID}\n[source.nats]\nservers = [\"nats://127.0.0.1:4222\"]\npartitions = 4\n{line}\n");
            let config = parse(&text).unwrap();
            assert_eq!(
                config.inline_secrets,
                ["destination.auth.client_secret", key],
                "{line}"
            );
        }
    }

    #[test]
    fn rate_limit_headers_are_turned_off_by_false_and_nothing_else() {
        let _environment = environment();
        let config = parse(&format!(
            "{VALID}\n[delivery]\nrate_limit_headers = false\n"
        ))
        .unwrap();
        assert!(!config.delivery.rate_limit_headers);
        let error = error_of(&format!(
            "{VALID}\n[delivery]\nrate_limit_headers = \"no\"\n"
        ));
        assert!(error.contains("rate_limit_headers"), "{error}");
    }

    #[test]
    fn the_deprecated_concurrency_fixes_the_limit_with_a_warning() {
        let _environment = environment();
        let config = parse(&format!("{VALID}\n[delivery]\nconcurrency = 6\n")).unwrap();
        assert_eq!(config.delivery.max_concurrency, 6);
        assert!(config.delivery.fixed_concurrency);
        assert_eq!(config.warnings.len(), 1);
        assert!(config.warnings[0].contains("delivery.max_concurrency"));

        let table = [
            (
                "concurrency = 6\nmax_concurrency = 8",
                "delivery.concurrency",
            ),
            ("concurrency = 0", "delivery.concurrency"),
            ("max_concurrency = 0", "delivery.max_concurrency"),
            ("max_concurrency = 5000", "delivery.max_concurrency"),
            (
                "max_profiles_per_request = 0",
                "delivery.max_profiles_per_request",
            ),
            (
                "max_profiles_per_request = 1001",
                "delivery.max_profiles_per_request",
            ),
        ];
        for (delivery, key) in table {
            let error = error_of(&format!("{VALID}\n[delivery]\n{delivery}\n"));
            assert!(error.contains(key), "{delivery}: {error}");
        }
        let config = parse(&format!(
            "{VALID}\n[delivery]\nmax_concurrency = 3\nmax_profiles_per_request = 10\n"
        ))
        .unwrap();
        assert_eq!(
            (
                config.delivery.max_concurrency,
                config.delivery.max_profiles_per_request
            ),
            (3, 10)
        );
    }

    #[test]
    fn timings_must_lie_between_one_and_their_bound() {
        let _environment = environment();
        // (section, key, most allowed, another key it needs beside it)
        let table = [
            ("delivery", "request_timeout_ms", "600000", ""),
            (
                "delivery",
                "initial_backoff_ms",
                "86400000",
                "max_backoff_ms = 86400000",
            ),
            ("delivery", "max_backoff_ms", "86400000", ""),
            ("delivery", "max_age_s", "315360000", ""),
            ("ingest", "read_timeout_ms", "600000", ""),
        ];
        for (section, key, most, beside) in table {
            let at_most = format!("{VALID}\n[{section}]\n{key} = {most}\n{beside}\n");
            if let Err(error) = parse(&at_most) {
                panic!("{key} = {most}: {error}");
            }
            for value in ["0", &format!("{most}1"), "9223372036854775807"] {
                let error = error_of(&format!("{VALID}\n[{section}]\n{key} = {value}\n"));
                assert!(
                    error.contains(&format!("{section}.{key}"))
                        && error.contains(&format!("between 1 and {most}")),
                    "{key} = {value}: {error}"
                );
            }
        }
    }

    #[test]
    fn the_listen_address_is_an_ip_address_and_port() {
        let with = |listen: &str| {
            VALID.replacen(
                "[storage]",
                &format!("[ingest]\nlisten = {listen:?}\n\n[storage]"),
                1,
            )
        };
        for fine in ["127.0.0.1:8686", "[::1]:0", "0.0.0.0:80"] {
            assert!(parse(&with(fine)).is_ok(), "{fine}");
        }
        for bad in ["localhost:8686", "127.0.0.1", "::1:8686", ""] {
            let error = error_of(&with(bad));
            assert!(
                error.contains("ingest.listen") && error.contains("host names are not looked up"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn an_ingest_token_no_request_could_carry_is_refused() {
        for token in [
            "pässwort",
            "s3cret ",
            "s3cret\t",
            " s3cret",
            "\ts3cret",
            "ünïcode ok?",
        ] {
            let text = VALID.replacen(
                "[storage]",
                &format!("[ingest]\ntoken = {token:?}\n\n[storage]"),
                1,
            );
            assert_ne!(text, VALID);
            let error = error_of(&text);
            assert!(
                error.contains("ingest.token") && error.contains("could carry it"),
                "{token:?}: {error}"
            );
            assert!(!error.contains(token.trim()), "{token:?} shown: {error}");
        }
        // A space inside it is carried: `Bearer s3 cret` is read as `s3 cret`; those before
        // it, as the separator.
        for fine in ["A-z0.9_~+/=!#", "s3 cret"] {
            let text = VALID.replacen(
                "[storage]",
                &format!("[ingest]\ntoken = {fine:?}\n\n[storage]"),
                1,
            );
            assert!(parse(&text).is_ok(), "{fine:?}");
        }
    }
}
