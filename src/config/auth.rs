//! `[destination.auth]`: how outpost proves itself to the destination: not at all, by a
//! static bearer token, or by an OAuth 2.0 grant.

use std::path::PathBuf;

use url::Url;

use super::address::parse_http_url;
use super::headers::header_can_carry;
use super::raw::RawAuth;
use super::secret::{read_rereadable_secret, secret_source, Secret, SecretFile, Secrets};
use super::KeyError;

// One a config: its size is of no matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    None,
    Bearer {
        token: Secret,
        /// Where `token` was read from, when from a file of its own.
        token_file: Option<SecretFile>,
    },
    /// OAuth 2.0: the client's id and secret, and the grant that gets the first token.
    OAuth2 {
        auth_endpoint: Url,
        client_id: String,
        client_secret: Secret,
        client_secret_file: Option<SecretFile>,
        credentials: CredentialsPlacement,
        scope: Option<String>,
        grant: Grant,
    },
}

/// How an OAuth 2.0 token is first obtained (a returned refresh token is used after that).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// `type = "oauth2_client_credentials"`.
    ClientCredentials,
    /// `type = "oauth2_password"` (resource owner password credentials).
    Password {
        username: String,
        password: Secret,
        password_file: Option<SecretFile>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialsPlacement {
    Body,
    Basic,
}

pub(super) fn validate_auth(
    raw: Option<RawAuth>,
    relative: &dyn Fn(PathBuf) -> PathBuf,
    secrets: Secrets,
) -> Result<Auth, KeyError> {
    let Some(raw) = raw else {
        return Err((
            "destination.auth",
            "is required (type = \"oauth2_client_credentials\", \"oauth2_password\", \"bearer\" or \"none\")".into(),
        ));
    };
    let unused = |present: bool, key: &'static str, kind: &str| -> Result<(), KeyError> {
        if present {
            Err((key, format!("is not used with type = \"{kind}\"")))
        } else {
            Ok(())
        }
    };
    // What only the OAuth2 types use: a left-over key after switching type is an error, so
    // that a config does not seem to say what it does not do.
    let oauth_only = [
        (
            raw.auth_endpoint.is_some(),
            "destination.auth.auth_endpoint",
        ),
        (raw.client_id.is_some(), "destination.auth.client_id"),
        (
            raw.client_secret.is_some(),
            "destination.auth.client_secret",
        ),
        (
            raw.client_secret_file.is_some(),
            "destination.auth.client_secret_file",
        ),
        (raw.credentials.is_some(), "destination.auth.credentials"),
        (raw.scope.is_some(), "destination.auth.scope"),
        (raw.username.is_some(), "destination.auth.username"),
        (raw.password.is_some(), "destination.auth.password"),
        (
            raw.password_file.is_some(),
            "destination.auth.password_file",
        ),
    ];
    match raw.kind.as_str() {
        kind @ ("none" | "bearer") => {
            for (present, key) in oauth_only {
                unused(present, key, kind)?;
            }
            if kind == "none" {
                unused(raw.token.is_some(), "destination.auth.token", kind)?;
                unused(raw.token_file.is_some(), "destination.auth.token_file", kind)?;
                return Ok(Auth::None);
            }
            let keys = (
                "destination.auth.token",
                "destination.auth.token_file",
                "OUTPOST_TOKEN",
            );
            let source = secret_source(raw.token.is_some(), raw.token_file.is_some(), keys);
            let (token, token_file) =
                read_rereadable_secret(raw.token, raw.token_file, relative, keys, secrets, true)?;
            // Empty only where the environment would give it and the command needs it not.
            if !token.expose().is_empty() && !header_can_carry(token.expose()) {
                return Err((
                    "destination.auth.token",
                    format!(
                        "{source}may hold only ASCII letters, digits, punctuation, spaces and \
                         tabs, and must not begin or end with a space or tab: an Authorization \
                         header could not carry it as it is"
                    ),
                ));
            }
            Ok(Auth::Bearer { token, token_file })
        }
        "oauth2_client_credentials" | "oauth2_password" => {
            let kind = raw.kind.as_str();
            unused(raw.token.is_some(), "destination.auth.token", kind)?;
            unused(raw.token_file.is_some(), "destination.auth.token_file", kind)?;
            let endpoint = raw
                .auth_endpoint
                .ok_or(("destination.auth.auth_endpoint", "is required".to_owned()))?;
            let auth_endpoint =
                parse_http_url(&endpoint).map_err(|m| ("destination.auth.auth_endpoint", m))?;
            let client_id = match raw.client_id {
                Some(id) if !id.is_empty() => id,
                _ => return Err(("destination.auth.client_id", "is required".into())),
            };
            let (client_secret, client_secret_file) = read_rereadable_secret(
                raw.client_secret,
                raw.client_secret_file,
                relative,
                (
                    "destination.auth.client_secret",
                    "destination.auth.client_secret_file",
                    "OUTPOST_CLIENT_SECRET",
                ),
                secrets,
                false,
            )?;
            let credentials = match raw.credentials.as_deref() {
                None | Some("body") => CredentialsPlacement::Body,
                Some("basic") => CredentialsPlacement::Basic,
                // Not shown: a secret given under the wrong key would be.
                Some(_) => {
                    return Err((
                        "destination.auth.credentials",
                        "must be \"body\" or \"basic\"".into(),
                    ))
                }
            };
            let grant = if kind == "oauth2_password" {
                let username = match raw.username {
                    Some(name) if !name.is_empty() => name,
                    _ => {
                        return Err((
                            "destination.auth.username",
                            "is required with type = \"oauth2_password\"".into(),
                        ))
                    }
                };
                let (password, password_file) = read_rereadable_secret(
                    raw.password,
                    raw.password_file,
                    relative,
                    (
                        "destination.auth.password",
                        "destination.auth.password_file",
                        "OUTPOST_PASSWORD",
                    ),
                    secrets,
                    false,
                )?;
                Grant::Password {
                    username,
                    password,
                    password_file,
                }
            } else {
                unused(raw.username.is_some(), "destination.auth.username", kind)?;
                unused(raw.password.is_some(), "destination.auth.password", kind)?;
                unused(
                    raw.password_file.is_some(),
                    "destination.auth.password_file",
                    kind,
                )?;
                Grant::ClientCredentials
            };
            Ok(Auth::OAuth2 {
                auth_endpoint,
                client_id,
                client_secret,
                client_secret_file,
                credentials,
                scope: raw.scope.filter(|s| !s.is_empty()),
                grant,
            })
        }
        other => Err((
            "destination.auth.type",
            format!("`{other}` is not \"oauth2_client_credentials\", \"oauth2_password\", \"bearer\" or \"none\""),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{error_of, parse, VALID};

    #[test]
    fn a_missing_auth_section_names_every_type() {
        let auth = r#"[destination.auth]
type = "oauth2_client_credentials"
auth_endpoint = "https://auth.example.com/oauth/token"
client_id = "edge-agent"
client_secret = "s3cr3t-value"
"#;
        let text = VALID.replace(auth, "");
        assert_ne!(text, VALID);
        let error = error_of(&text);
        assert!(error.contains("destination.auth"), "{error}");
        for kind in [
            "oauth2_client_credentials",
            "oauth2_password",
            "bearer",
            "none",
        ] {
            assert!(error.contains(&format!("\"{kind}\"")), "{kind}: {error}");
        }
    }

    /// A static bearer token goes into a header as it is: one no header can carry, or that a
    /// receiver would read without its leading or trailing blanks, is refused at start.
    #[test]
    fn a_bearer_token_no_header_carries_as_it_is_is_refused() {
        let bearer = |token: &str| {
            VALID.replace(
                "type = \"oauth2_client_credentials\"\nauth_endpoint = \"https://auth.example.com/oauth/token\"\nclient_id = \"edge-agent\"\nclient_secret = \"s3cr3t-value\"",
                &format!(
                    "type = \"bearer\"\ntoken = {}",
                    serde_json::to_string(token).unwrap()
                ),
            )
        };
        for bad in [
            "abc\n",
            "abc\r",
            " abc",
            "abc ",
            "abc\t",
            "ab\u{e9}c",
            "a\u{1}b",
        ] {
            let error = error_of(&bearer(bad));
            assert!(
                error.contains("destination.auth.token") && error.contains("Authorization header"),
                "{bad:?}: {error}"
            );
        }
        for good in ["abc", "a b.c-d_e~f+g/h=", "eyJhbGciOi.J9.x"] {
            assert!(parse(&bearer(good)).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn auth_variants() {
        let bearer = VALID.replace(
            "type = \"oauth2_client_credentials\"\nauth_endpoint = \"https://auth.example.com/oauth/token\"\nclient_id = \"edge-agent\"\nclient_secret = \"s3cr3t-value\"",
            "type = \"bearer\"\ntoken = \"tok\"",
        );
        assert!(matches!(
            parse(&bearer).unwrap().destination.auth,
            Auth::Bearer { .. }
        ));
        let none = VALID.replace(
            "type = \"oauth2_client_credentials\"\nauth_endpoint = \"https://auth.example.com/oauth/token\"\nclient_id = \"edge-agent\"\nclient_secret = \"s3cr3t-value\"",
            "type = \"none\"",
        );
        assert!(matches!(parse(&none).unwrap().destination.auth, Auth::None));
        // A key only the OAuth2 types use, left over after switching type, is named.
        for (text, kind) in [(&bearer, "bearer"), (&none, "none")] {
            for key in [
                "client_secret_file = \"secret\"",
                "scope = \"profiles.write\"",
                "credentials = \"basic\"",
                "username = \"u\"",
                "password = \"p\"",
                "password_file = \"p\"",
            ] {
                let left_over = text.replacen(
                    &format!("type = \"{kind}\""),
                    &format!("type = \"{kind}\"\n{key}"),
                    1,
                );
                assert_ne!(&left_over, text);
                let name = key.split(' ').next().unwrap();
                let error = error_of(&left_over);
                assert!(
                    error.contains(&format!("destination.auth.{name}"))
                        && error.contains("is not used"),
                    "{kind}, {key}: {error}"
                );
            }
        }
        let basic = VALID.replace(
            "client_id = \"edge-agent\"",
            "client_id = \"edge-agent\"\ncredentials = \"basic\"",
        );
        assert!(matches!(
            parse(&basic).unwrap().destination.auth,
            Auth::OAuth2 {
                credentials: CredentialsPlacement::Basic,
                ..
            }
        ));
        let bad = VALID.replace(
            "client_id = \"edge-agent\"",
            "client_id = \"edge-agent\"\ncredentials = \"header\"",
        );
        assert!(error_of(&bad).contains("destination.auth.credentials"));
    }

    #[test]
    fn the_password_grant_needs_a_username_and_a_password_from_one_place() {
        let password = VALID.replace(
            "type = \"oauth2_client_credentials\"",
            "type = \"oauth2_password\"\nusername = \"ops\"\npassword = \"pw-value\"",
        );
        let config = parse(&password).unwrap();
        let Auth::OAuth2 { grant, .. } = &config.destination.auth else {
            panic!("not OAuth2");
        };
        assert_eq!(
            grant,
            &Grant::Password {
                username: "ops".into(),
                password: Secret::new("pw-value"),
                password_file: None,
            }
        );
        assert!(!format!("{config:?}").contains("pw-value"));

        let table = [
            (
                "type = \"oauth2_password\"\npassword = \"x\"",
                "destination.auth.username",
            ),
            (
                "type = \"oauth2_password\"\nusername = \"ops\"\npassword = \"x\"\npassword_file = \"/p\"",
                "destination.auth.password_file",
            ),
            (
                "type = \"oauth2_client_credentials\"\nusername = \"ops\"",
                "destination.auth.username",
            ),
        ];
        for (auth, key) in table {
            let text = VALID.replace("type = \"oauth2_client_credentials\"", auth);
            let error = error_of(&text);
            assert!(error.contains(key), "{auth}: {error}");
        }
    }
}
