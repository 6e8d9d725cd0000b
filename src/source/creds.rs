//! `source.nats.creds_file`: a NATS user's JWT and nkey seed, read again at each connection.
//!
//! User JWTs may expire, and are renewed by rewriting the file. The file is read when the
//! agent starts (an unusable one is a configuration error) and again each time the client
//! connects, so a reconnection, such as the one that follows the server closing a connection
//! whose JWT expired, takes the renewed JWT. A file that cannot be read or parsed at a
//! reconnection (rewritten in place, caught half-written) leaves the last good credentials in
//! use, with a warning.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A user JWT and the key pair its nkey seed gives, as a credentials file holds them.
#[derive(Clone)]
pub struct Credentials {
    jwt: String,
    key_pair: Arc<nkeys::KeyPair>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials { .. }")
    }
}

/// The two values a credentials file decorates: `-----BEGIN NATS USER JWT-----`, the JWT,
/// `------END NATS USER JWT------`, then the same around the seed. As the NATS clients read
/// it: a value is a line of letters, digits, `_`, `-`, `.` or `=` between two lines that
/// begin and end with three dashes or more; the first such is the JWT, the second the seed.
fn decorated_values(contents: &str) -> Vec<&str> {
    let fence = |line: &str| line.len() >= 6 && line.starts_with("---") && line.ends_with("---");
    let value = |line: &str| {
        !line.is_empty()
            && line
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '='))
    };
    let lines: Vec<&str> = contents
        .lines()
        .map(|line| line.trim_end_matches('\r'))
        .collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i + 2 < lines.len() {
        let line = lines[i].trim_start();
        if fence(line) && value(lines[i + 1]) && fence(lines[i + 2]) {
            found.push(lines[i + 1]);
            i += 3;
        } else {
            i += 1;
        }
    }
    found
}

/// Reads credentials from the text of a credentials file. The error names what is missing,
/// never a value.
pub fn parse(contents: &str) -> Result<Credentials, String> {
    let values = decorated_values(contents);
    let (Some(jwt), Some(seed)) = (values.first(), values.get(1)) else {
        return Err(match values.len() {
            0 => {
                "no user JWT and no nkey seed between -----BEGIN …----- and ------END …------ lines"
                    .into()
            }
            _ => "a user JWT but no nkey seed after it".into(),
        });
    };
    let key_pair = nkeys::KeyPair::from_seed(seed)
        .map_err(|e| format!("the nkey seed is not one ({})", e.kind()))?;
    Ok(Credentials {
        jwt: (*jwt).to_owned(),
        key_pair: Arc::new(key_pair),
    })
}

/// Reads and parses the credentials file at `path`.
pub fn read(path: &Path) -> Result<Credentials, String> {
    let contents = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    parse(&contents)
}

/// What the client sends when it connects: read from the file again, or the last good
/// credentials if it cannot be.
pub struct CredsFile {
    path: PathBuf,
    last_good: Mutex<Credentials>,
}

impl CredsFile {
    /// The file read once: an unusable file is an error at start.
    pub fn open(path: &Path) -> Result<CredsFile, String> {
        Ok(CredsFile {
            path: path.to_path_buf(),
            last_good: Mutex::new(read(path)?),
        })
    }

    /// The credentials for a new connection: the file as it is now, or as it last read.
    pub fn current(&self) -> Credentials {
        let mut last_good = self.last_good.lock().unwrap_or_else(|e| e.into_inner());
        match read(&self.path) {
            Ok(fresh) => *last_good = fresh,
            Err(error) => tracing::warn!(
                path = %self.path.display(),
                %error,
                "source.nats.creds_file cannot be read again; connecting with the credentials it last held"
            ),
        }
        last_good.clone()
    }

    /// The answer to a server's nonce: the JWT, and the nonce signed with the seed.
    pub fn auth(&self, nonce: &[u8]) -> Result<async_nats::Auth, async_nats::AuthError> {
        let credentials = self.current();
        let signature = credentials
            .key_pair
            .sign(nonce)
            .map_err(async_nats::AuthError::new)?;
        let mut auth = async_nats::Auth::new();
        auth.jwt = Some(credentials.jwt);
        auth.signature = Some(signature);
        Ok(auth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_text(jwt: &str, seed: &str) -> String {
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n"
        )
    }

    #[test]
    fn a_credentials_file_gives_its_jwt_and_a_key_that_signs() {
        let user = nkeys::KeyPair::new_user();
        let seed = user.seed().unwrap();
        for text in [
            file_text("eyJhbGciOi.eyJqdGkiOi.c2lnbmF0dXJl", &seed),
            file_text("eyJhbGciOi.eyJqdGkiOi.c2lnbmF0dXJl", &seed).replace('\n', "\r\n"),
        ] {
            let credentials = parse(&text).unwrap();
            assert_eq!(credentials.jwt, "eyJhbGciOi.eyJqdGkiOi.c2lnbmF0dXJl");
            let signature = credentials.key_pair.sign(b"nonce").unwrap();
            user.verify(b"nonce", &signature).unwrap();
        }
    }

    #[test]
    fn an_unusable_credentials_file_says_what_is_missing_and_shows_no_value() {
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let table = [
            (String::new(), "no user JWT"),
            ("just text\n".to_owned(), "no user JWT"),
            (
                file_text("eyJhbGciOi.x.y", &seed)
                    .split("************************* IMPORTANT")
                    .next()
                    .unwrap()
                    .to_owned(),
                "no nkey seed",
            ),
            (file_text("eyJhbGciOi.x.y", "SUNOTASEED"), "not one"),
        ];
        for (text, expected) in table {
            let error = parse(&text).unwrap_err();
            assert!(error.contains(expected), "{text:?}: {error}");
            assert!(
                !error.contains("SUNOTASEED") && !error.contains(&seed),
                "{error}"
            );
        }
    }

    #[test]
    fn each_connection_reads_the_file_again_and_keeps_the_last_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.creds");
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        std::fs::write(&path, file_text("first.jwt.value", &seed)).unwrap();
        let file = CredsFile::open(&path).unwrap();
        assert_eq!(file.current().jwt, "first.jwt.value");
        std::fs::write(&path, file_text("renewed.jwt.value", &seed)).unwrap();
        assert_eq!(file.current().jwt, "renewed.jwt.value");
        std::fs::write(&path, "-----BEGIN NATS USER JWT-----\nhalf").unwrap();
        assert_eq!(file.current().jwt, "renewed.jwt.value");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(file.current().jwt, "renewed.jwt.value");
        let auth = file.auth(b"nonce").unwrap();
        assert_eq!(auth.jwt.as_deref(), Some("renewed.jwt.value"));
        assert!(auth.signature.is_some());
    }
}
