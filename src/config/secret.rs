//! Secrets: values never shown ([`Secret`]), each read from the config file, a file of its
//! own or an environment variable, and whether a command needs them ([`Secrets`]).

use std::path::{Path, PathBuf};

use super::KeyError;

/// A value that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// The fewest bytes of a custom header's value, a word of it, or a value of the endpoint's
/// query, that count as a secret to hide in the endpoint's answers wherever they are shown.
/// Shorter ones (`v2`, `json`) would hide every such piece of an answer, and guess easily
/// anyway.
pub(crate) const SECRET_LEAST_BYTES: usize = 8;

/// Whether a command needs the destination's secrets. Only `run` and `check` talk to the
/// destination; the commands that work on the store do not, and are often run where a secret
/// given by the environment is not (`sudo -u outpost outpost outbox stats` clears it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    Required,
    /// A secret the environment would give and does not is left empty; one given inline or
    /// in a file is checked as ever.
    IfGiven,
}

/// Where a secret read by [`read_secret`] comes from, to begin a message about its value: ""
/// when inline (the key names it), else the file key or the variable.
pub(super) fn secret_source(
    inline: bool,
    file: bool,
    (_, file_key, env): (&'static str, &'static str, &'static str),
) -> String {
    match (inline, file) {
        (true, _) => String::new(),
        (false, true) => format!("as given in {file_key}, it "),
        (false, false) => format!("as given in env {env}, it "),
    }
}

/// [`read_secret`] for a secret that may be left out: `None` when it is given nowhere (the
/// variable unset, or one the command does without, [`Secrets::IfGiven`]); a variable set but
/// empty is an error where it is needed, as a key would be.
pub(super) fn read_optional_secret(
    inline: Option<String>,
    file: Option<PathBuf>,
    relative: &dyn Fn(PathBuf) -> PathBuf,
    keys: (&'static str, &'static str, &'static str),
    secrets: Secrets,
) -> Result<Option<Secret>, KeyError> {
    if inline.is_none() && file.is_none() && std::env::var_os(keys.2).is_none() {
        return Ok(None);
    }
    let secret = read_secret(inline, file, relative, keys, secrets)?;
    Ok((!secret.expose().is_empty()).then_some(secret))
}

/// A secret given inline, in a file, or in an environment variable (in that order of
/// precedence; inline and file together are an error). `keys` = (inline key, file key, env).
pub(super) fn read_secret(
    inline: Option<String>,
    file: Option<PathBuf>,
    relative: &dyn Fn(PathBuf) -> PathBuf,
    keys: (&'static str, &'static str, &'static str),
    secrets: Secrets,
) -> Result<Secret, KeyError> {
    let (inline_key, file_key, env) = keys;
    let value = match (inline, file) {
        (Some(_), Some(_)) => {
            return Err((
                file_key,
                format!("give {inline_key} or {file_key}, not both"),
            ))
        }
        (Some(secret), None) if secret.is_empty() => {
            return Err((inline_key, "must not be empty".into()))
        }
        (Some(secret), None) => secret,
        (None, Some(file)) => {
            read_secret_file(&relative(file), false).map_err(|e| (file_key, e))?
        }
        (None, None) => match (std::env::var(env), secrets) {
            // A line's end, as a file's is, is not the secret's.
            (Ok(value), _) if !value.trim_end_matches(['\r', '\n']).is_empty() => {
                value.trim_end_matches(['\r', '\n']).to_owned()
            }
            (_, Secrets::IfGiven) => return Ok(Secret::new(String::new())),
            (Err(std::env::VarError::NotUnicode(_)), _) => {
                return Err((inline_key, format!("env {env} is not valid UTF-8")))
            }
            (Ok(_), Secrets::Required) => {
                return Err((
                    inline_key,
                    format!("env {env} is set but empty (give the secret there, in {inline_key} or in {file_key})"),
                ))
            }
            (Err(_), Secrets::Required) => {
                return Err((
                    inline_key,
                    format!("is required (or {file_key}, or env {env})"),
                ))
            }
        },
    };
    Ok(Secret::new(value))
}

/// The secret a file of its own holds: its text without the line's end (nor a byte-order
/// mark, as some editors begin a file with); an error, naming the file but never its text,
/// when it cannot be read or is empty.
pub(super) fn read_secret_file(file: &Path, again: bool) -> Result<String, String> {
    let text = std::fs::read_to_string(file).map_err(|e| super::cannot_read(file, &e, again))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let secret = text.trim_end_matches(['\r', '\n']);
    if secret.is_empty() {
        return Err(format!("{} is empty", file.display()));
    }
    Ok(secret.to_owned())
}

/// The file a secret was read from, to be read again where a secret rotated in it would
/// otherwise be refused until a restart: the destination's token, client secret and password
/// (`delivery::credentials`) and the ingest token (`server::ingest_token`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretFile {
    path: PathBuf,
    /// Its key, as messages about it name it.
    key: &'static str,
    /// Whether the secret goes in a header as it is (a token), which it must be able to carry.
    in_header: bool,
}

impl SecretFile {
    pub(super) fn new(path: PathBuf, key: &'static str, in_header: bool) -> SecretFile {
        SecretFile {
            path,
            key,
            in_header,
        }
    }
}

impl super::FileRead for SecretFile {
    type Value = Secret;

    fn key(&self) -> &'static str {
        self.key
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// What the file holds now, by the rules it was first read by.
    fn read(&self) -> Result<Secret, String> {
        let secret = read_secret_file(&self.path, true)?;
        if self.in_header && !super::header_can_carry(&secret) {
            return Err(format!(
                "{} now holds what no Authorization header can carry as it is (control \
                 characters, non-ASCII, or blanks at either end)",
                self.path.display()
            ));
        }
        Ok(Secret::new(secret))
    }
}

/// [`read_secret`], and the file it was read from when it came from one.
pub(super) fn read_rereadable_secret(
    inline: Option<String>,
    file: Option<PathBuf>,
    relative: &dyn Fn(PathBuf) -> PathBuf,
    keys: (&'static str, &'static str, &'static str),
    secrets: Secrets,
    in_header: bool,
) -> Result<(Secret, Option<SecretFile>), KeyError> {
    let from = file
        .clone()
        .map(|path| SecretFile::new(relative(path), keys.1, in_header));
    let secret = read_secret(inline, file, relative, keys, secrets)?;
    Ok((secret, from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{environment, error_of, parse, VALID};
    use crate::config::{Auth, Config};

    #[test]
    fn secrets_never_show_in_debug_output() {
        let config = parse(VALID).unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3cr3t-value"), "{debug}");
        assert!(debug.contains("Secret(***)"));
        let with_key = VALID.replacen(
            "custom_headers = \"x-api-version:2,x-tenant:acme\"",
            "custom_headers = \"x-api-key:5f2b9c0e1a7d4e3f\"",
            1,
        );
        assert_ne!(with_key, VALID);
        let debug = format!("{:?}", parse(&with_key).unwrap());
        assert!(debug.contains("x-api-key"), "{debug}");
        assert!(!debug.contains("5f2b9c0e1a7d4e3f"), "{debug}");
        // With a headers file too, which keeps the inline ones to put before its own.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("headers"), "x-tenant-key: 9d8c7b6a\n").unwrap();
        let with_file = with_key.replacen(
            "custom_headers = ",
            "custom_headers_file = \"headers\"\ncustom_headers = ",
            1,
        );
        let config = Config::parse(&dir.path().join("outpost.toml"), &with_file).unwrap();
        let debug = format!("{config:?}");
        assert!(debug.contains("CustomHeadersFile"), "{debug}");
        assert!(debug.contains("x-tenant-key"), "{debug}");
        for secret in ["5f2b9c0e1a7d4e3f", "9d8c7b6a"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
    }

    #[test]
    fn client_secret_from_a_file_or_the_environment() {
        let _environment = environment();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "from-file\n").unwrap();
        let config_path = dir.path().join("outpost.toml");
        let with_file = VALID.replace(
            "client_secret = \"s3cr3t-value\"",
            "client_secret_file = \"secret\"",
        );
        let config = Config::parse(&config_path, &with_file).unwrap();
        let Auth::OAuth2 { client_secret, .. } = config.destination.auth else {
            panic!("not oauth2")
        };
        assert_eq!(
            client_secret.expose(),
            "from-file",
            "read relative to the config, newline trimmed"
        );
        // A byte-order mark an editor began the file with is not part of it.
        std::fs::write(dir.path().join("secret"), "\u{feff}from-file\r\n").unwrap();
        let config = Config::parse(&config_path, &with_file).unwrap();
        let Auth::OAuth2 { client_secret, .. } = config.destination.auth else {
            panic!("not oauth2")
        };
        assert_eq!(client_secret.expose(), "from-file");

        let missing = VALID.replace(
            "client_secret = \"s3cr3t-value\"",
            "client_secret_file = \"nope\"",
        );
        assert!(Config::parse(&config_path, &missing)
            .unwrap_err()
            .to_string()
            .contains("destination.auth.client_secret_file"));
        let both = VALID.replace(
            "client_secret = \"s3cr3t-value\"",
            "client_secret = \"a\"\nclient_secret_file = \"secret\"",
        );
        assert!(Config::parse(&config_path, &both).is_err());

        // The environment is read only when the file gives no secret (one test touches it).
        let without = VALID.replace("client_secret = \"s3cr3t-value\"\n", "");
        std::env::remove_var("OUTPOST_CLIENT_SECRET");
        assert!(error_of(&without).contains("OUTPOST_CLIENT_SECRET"));
        std::env::set_var("OUTPOST_CLIENT_SECRET", "from-env");
        let config = parse(&without).unwrap();
        let shadowed = parse(VALID).unwrap();
        std::env::remove_var("OUTPOST_CLIENT_SECRET");
        let Auth::OAuth2 { client_secret, .. } = config.destination.auth else {
            panic!("not oauth2")
        };
        assert_eq!(client_secret.expose(), "from-env");
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
        // Nor is a line's end in the variable, as in the file.
        std::env::set_var("OUTPOST_CLIENT_SECRET", "from-env\r\n");
        let from_a_line = parse(&without);
        std::env::set_var("OUTPOST_CLIENT_SECRET", "\n");
        let only_a_line = parse(&without);
        std::env::remove_var("OUTPOST_CLIENT_SECRET");
        let Auth::OAuth2 { client_secret, .. } = from_a_line.unwrap().destination.auth else {
            panic!("not oauth2")
        };
        assert_eq!(client_secret.expose(), "from-env");
        assert!(only_a_line
            .unwrap_err()
            .to_string()
            .contains("env OUTPOST_CLIENT_SECRET is set but empty"));
        assert_eq!(
            shadowed.warnings,
            ["OUTPOST_CLIENT_SECRET is set, but destination.auth.client_secret (or its _file) in the config file is what is used"]
        );

        // An empty secret is named where it came from: the file, or the environment.
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        let empty_file = VALID.replace(
            "client_secret = \"s3cr3t-value\"",
            "client_secret_file = \"empty\"",
        );
        let error = Config::parse(&config_path, &empty_file)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("destination.auth.client_secret_file") && error.contains("is empty"),
            "{error}"
        );
        std::env::set_var("OUTPOST_CLIENT_SECRET", "");
        let error = error_of(&without);
        let store_only = Config::parse_for(&config_path, &without, Secrets::IfGiven);
        std::env::remove_var("OUTPOST_CLIENT_SECRET");
        assert!(
            error.contains("env OUTPOST_CLIENT_SECRET is set but empty"),
            "{error}"
        );
        assert!(store_only.is_ok(), "{store_only:?}");
    }

    /// The static token and the ingest token, like the client secret, may come from a file
    /// instead of the config file (the environment's forms: `tests/check_preflight.rs`, in
    /// processes of their own, since a variable set here would reach every test's parse).
    #[test]
    fn tokens_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("outpost.toml");
        let bearer = |auth: &str, ingest: &str| {
            let text = VALID.replace(
                "type = \"oauth2_client_credentials\"\nauth_endpoint = \"https://auth.example.com/oauth/token\"\nclient_id = \"edge-agent\"\nclient_secret = \"s3cr3t-value\"",
                &format!("type = \"bearer\"\n{auth}"),
            );
            let text = text.replacen("[storage]", &format!("[ingest]\n{ingest}\n\n[storage]"), 1);
            Config::parse(&config_path, &text)
        };
        std::fs::write(dir.path().join("token"), "t0ken-from-file\n").unwrap();
        std::fs::write(dir.path().join("ingest"), "ingest-from-file\r\n").unwrap();
        let from_files = bearer("token_file = \"token\"", "token_file = \"ingest\"").unwrap();
        let Auth::Bearer { token, .. } = &from_files.destination.auth else {
            panic!("not bearer")
        };
        assert_eq!(token.expose(), "t0ken-from-file");
        assert_eq!(
            from_files.ingest.token.as_ref().map(Secret::expose),
            Some("ingest-from-file")
        );
        assert!(
            from_files.inline_secrets.is_empty(),
            "{:?}",
            from_files.inline_secrets
        );

        // What a header could not carry is refused wherever it came from, saying where, and
        // without showing it.
        std::fs::write(dir.path().join("spaced"), " t0ken\n").unwrap();
        for (auth, ingest, said) in [
            (
                "token_file = \"spaced\"",
                "",
                "destination.auth.token: as given in destination.auth.token_file, it may hold only",
            ),
            (
                "token = \"t\"",
                "token_file = \"spaced\"",
                "ingest.token: as given in ingest.token_file, it may hold only",
            ),
        ] {
            let error = bearer(auth, ingest).unwrap_err().to_string();
            assert!(error.contains(said), "{error}");
            assert!(!error.contains("t0ken"), "{error}");
        }
        let error = bearer("token = \"t\"\ntoken_file = \"token\"", "")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("give destination.auth.token or destination.auth.token_file, not both"),
            "{error}"
        );
        // A key the type does not use.
        let text = VALID.replace(
            "type = \"oauth2_client_credentials\"\nauth_endpoint = \"https://auth.example.com/oauth/token\"\nclient_id = \"edge-agent\"\nclient_secret = \"s3cr3t-value\"",
            "type = \"none\"\ntoken_file = \"token\"",
        );
        assert!(
            error_of(&text).contains("destination.auth.token_file"),
            "{}",
            error_of(&text)
        );
    }
}
