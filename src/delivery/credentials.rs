//! The destination's secrets as outpost holds them now. One read from a file of its own is
//! read again where a secret rotated in that file would otherwise be refused until a
//! restart: a static token when the destination refuses it, the client secret and the
//! password at each request to the token endpoint that carries them; the custom headers of
//! `destination.custom_headers_file` (an API key) when the destination refuses them.

use std::sync::Arc;

use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION};

use crate::config::{Auth, CustomHeadersFile, FileRead, Grant, Rereadable, Secret, SecretFile};

/// The secrets of one destination's auth: the static token, or the client secret and, with
/// the password grant, the password.
pub struct Credentials {
    pub token: Option<Rereadable<SecretFile>>,
    pub client_secret: Option<Rereadable<SecretFile>>,
    pub password: Option<Rereadable<SecretFile>>,
}

impl Credentials {
    pub fn of(auth: &Auth) -> Credentials {
        let rereadable = |secret: &Secret, file: &Option<SecretFile>| {
            Some(Rereadable::new(secret.clone(), file.clone()))
        };
        match auth {
            Auth::None => Credentials {
                token: None,
                client_secret: None,
                password: None,
            },
            Auth::Bearer { token, token_file } => Credentials {
                token: rereadable(token, token_file),
                client_secret: None,
                password: None,
            },
            Auth::OAuth2 {
                client_secret,
                client_secret_file,
                grant,
                ..
            } => Credentials {
                token: None,
                client_secret: rereadable(client_secret, client_secret_file),
                password: match grant {
                    Grant::Password {
                        password,
                        password_file,
                        ..
                    } => rereadable(password, password_file),
                    Grant::ClientCredentials => None,
                },
            },
        }
    }

    /// The secrets held now that came from files: those the config held at the start are
    /// hidden from answers already, these may have changed since.
    pub fn read_from_files(&self) -> Vec<Secret> {
        [&self.token, &self.client_secret, &self.password]
            .into_iter()
            .flatten()
            .filter(|secret| secret.read_from_a_file())
            .map(|secret| Secret::clone(&secret.held()))
            .collect()
    }
}

pub type Headers = Arc<Vec<(HeaderName, HeaderValue)>>;

/// The custom headers sent with every export: `destination.custom_headers`' and those of
/// `destination.custom_headers_file`, read again when the destination refuses a request
/// (`401`/`403`).
pub type CustomHeaders = Rereadable<HeadersFile>;

pub fn custom_headers(
    headers: &[(String, Secret)],
    file: Option<CustomHeadersFile>,
) -> CustomHeaders {
    let pairs = headers
        .iter()
        .map(|(name, value)| (name.as_str(), value.expose()));
    Rereadable::new(header_pairs(pairs), file.map(HeadersFile))
}

pub struct HeadersFile(CustomHeadersFile);

impl FileRead for HeadersFile {
    type Value = Vec<(HeaderName, HeaderValue)>;

    fn key(&self) -> &'static str {
        "destination.custom_headers_file"
    }

    fn path(&self) -> &std::path::Path {
        self.0.path()
    }

    fn read(&self) -> Result<Self::Value, String> {
        let headers = self.0.read(true)?;
        Ok(header_pairs(
            headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        ))
    }
}

/// Headers validated with the same types when the config was loaded (or the file read again).
fn header_pairs<'a>(
    headers: impl Iterator<Item = (&'a str, &'a str)>,
) -> Vec<(HeaderName, HeaderValue)> {
    headers
        .map(|(name, value)| {
            let name = HeaderName::from_bytes(name.as_bytes()).expect("validated header name");
            let mut value = HeaderValue::from_str(value).expect("validated header value");
            // An endpoint's own credentials (`destination.auth.type = "none"`).
            value.set_sensitive(name == AUTHORIZATION);
            (name, value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{write_settled, Config};

    fn credentials(dir: &std::path::Path, auth: &str) -> Credentials {
        let text = format!(
            "[destination]\nname = \"crm\"\nhttp_endpoint = \"https://api.example.com/p\"\n\n\
             [destination.auth]\n{auth}\n\n[mapping]\nsegments = [\"seg-a\"]\n\n\
             [storage]\npath = \"store\"\n"
        );
        let config = Config::parse(&dir.join("outpost.toml"), &text).unwrap();
        Credentials::of(&config.destination.auth)
    }

    /// A rotation that writes the file in place may be read between its truncation and its
    /// write, and one by rename may find it gone for a moment: the secret held serves on.
    #[test]
    fn a_secret_read_again_keeps_the_one_held_while_its_file_cannot_serve() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "first-token\n").unwrap();
        let held = credentials(dir.path(), "type = \"bearer\"\ntoken_file = \"token\"");
        let token = held.token.as_ref().unwrap();
        // (what the file holds, or nothing when it is gone; the token held after a reread)
        let cases: [(Option<&str>, &str); 6] = [
            (Some("second-token\n"), "second-token"),
            (Some(""), "second-token"),
            (None, "second-token"),
            (Some(" spaced-token\n"), "second-token"),
            (Some("caf\u{e9}-token\n"), "second-token"),
            (Some("\u{feff}third-token\r\n"), "third-token"),
        ];
        for (holds, expected) in cases {
            match holds {
                Some(text) => write_settled(&file, text),
                None => std::fs::remove_file(&file).unwrap(),
            }
            token.reread();
            assert_eq!(token.held().expose(), expected, "{holds:?}");
        }
        let read: Vec<String> = held
            .read_from_files()
            .iter()
            .map(|s| s.expose().to_owned())
            .collect();
        assert_eq!(read, ["third-token"]);
    }

    /// Only a secret from a file of its own is read again; one given inline stays as given.
    #[test]
    fn which_secrets_are_read_again() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "client-secret\n").unwrap();
        std::fs::write(dir.path().join("password"), "pass-word\n").unwrap();
        let oauth = "type = \"oauth2_password\"\nauth_endpoint = \"https://a.example.com/t\"\n\
                     client_id = \"edge\"\nusername = \"ops\"\n";
        let read_again = |auth: &str| -> Vec<String> {
            let held = credentials(dir.path(), &format!("{oauth}{auth}"));
            write_settled(&dir.path().join("secret"), "client-secret-2\n");
            write_settled(&dir.path().join("password"), "pass-word-2\n");
            for secret in [&held.client_secret, &held.password].into_iter().flatten() {
                secret.reread();
            }
            std::fs::write(dir.path().join("secret"), "client-secret\n").unwrap();
            std::fs::write(dir.path().join("password"), "pass-word\n").unwrap();
            [&held.client_secret, &held.password]
                .into_iter()
                .flatten()
                .map(|secret| secret.held().expose().to_owned())
                .collect()
        };
        assert_eq!(
            read_again("client_secret_file = \"secret\"\npassword_file = \"password\""),
            ["client-secret-2", "pass-word-2"]
        );
        assert_eq!(
            read_again("client_secret = \"inline\"\npassword_file = \"password\""),
            ["inline", "pass-word-2"]
        );
        assert_eq!(
            read_again("client_secret_file = \"secret\"\npassword = \"inline-pw\""),
            ["client-secret-2", "inline-pw"]
        );
    }
}
