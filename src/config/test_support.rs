//! What the config's unit tests share: a valid config file, its parse, and the one lock on
//! the process environment.

use std::path::Path;

use super::{Config, ConfigError};

pub(super) const VALID: &str = r#"
[destination]
name = "crm"
http_endpoint = "https://api.example.com/profiles?source=edge"
custom_headers = "x-api-version:2,x-tenant:acme"

[destination.auth]
type = "oauth2_client_credentials"
auth_endpoint = "https://auth.example.com/oauth/token"
client_id = "edge-agent"
client_secret = "s3cr3t-value"

[mapping]
attributes = ["person.name.firstName"]
segments = ["seg-a"]

[storage]
path = "store"
"#;

pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("/etc/outpost/outpost.toml"), text)
}

/// Held by the test that sets the secrets' environment variables, and by those that count
/// warnings, which such a variable shadowed by the file's secret would add to.
static ENVIRONMENT: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub(super) fn environment() -> std::sync::MutexGuard<'static, ()> {
    ENVIRONMENT.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn error_of(text: &str) -> String {
    parse(text)
        .expect_err("config should be refused")
        .to_string()
}
