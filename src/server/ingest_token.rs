//! The ingest token a request must carry. One given in `ingest.token_file` is read again at a
//! request, at most once a second: clients given a token rotated in that file are let in, and
//! the token it replaced is refused, without a restart; clients sending requests (or wrong
//! tokens) as fast as they can make the agent read the file no more often than that.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{Rereadable, Secret, SecretFile};

/// How often a request may have the file read again.
const REREAD_EVERY: Duration = Duration::from_secs(1);

pub struct IngestToken {
    token: Rereadable<SecretFile>,
    /// When a request last had the file read again.
    last_read: Mutex<Option<Instant>>,
}

impl IngestToken {
    pub fn new(token: Secret, file: Option<SecretFile>) -> IngestToken {
        IngestToken {
            token: Rereadable::new(token, file),
            last_read: Mutex::new(None),
        }
    }

    /// Whether `given` is the token, as the file holds it at `now`: read again unless it was
    /// read less than [`REREAD_EVERY`] ago.
    pub fn admits(&self, given: &[u8], now: Instant) -> bool {
        if self.token.read_from_a_file() && self.due(now) {
            self.token.reread();
        }
        is_the_token(given, self.token.held().expose().as_bytes())
    }

    fn due(&self, now: Instant) -> bool {
        let mut last_read = self.last_read.lock().unwrap_or_else(|e| e.into_inner());
        if last_read.is_some_and(|at| now.saturating_duration_since(at) < REREAD_EVERY) {
            return false;
        }
        *last_read = Some(now);
        true
    }
}

/// Whether `given` is `token`, in a time that tells neither how much of it matched nor how
/// long the token is: their SHA-256 digests, of one length, are compared without an early exit.
fn is_the_token(given: &[u8], token: &[u8]) -> bool {
    use ring::digest::{digest, SHA256};
    let (a, b) = (digest(&SHA256, given), digest(&SHA256, token));
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request has the file read again, a second or more after the last such read: the
    /// token rotated in the file is let in, and the one it replaced is refused.
    #[test]
    fn a_request_has_the_file_read_again_at_most_once_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ingest-token");
        std::fs::write(&file, "first-token\n").unwrap();
        let text =
            "[destination]\nname = \"crm\"\nhttp_endpoint = \"https://api.example.com/p\"\n\n\
                    [destination.auth]\ntype = \"none\"\n\n[mapping]\nsegments = [\"s\"]\n\n\
                    [storage]\npath = \"store\"\n\n[ingest]\ntoken_file = \"ingest-token\"\n";
        let config = crate::config::Config::parse(&dir.path().join("outpost.toml"), text).unwrap();
        let ingest = config.ingest;
        let token = IngestToken::new(ingest.token.unwrap(), ingest.token_file);
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // (ms after the start, the file rotated to, the token given, whether it is let in)
        let cases: [(u64, Option<&str>, &str, bool); 10] = [
            (0, None, "first-token", true),
            (0, Some("second-token"), "first-token", true),
            (999, None, "second-token", false),
            (1_000, None, "first-token", false),
            (1_001, None, "second-token", true),
            (1_002, Some("third-token"), "third-token", false),
            (1_999, None, "second-token", true),
            (2_000, None, "third-token", true),
            (2_001, None, "wrong-token", false),
            (2_002, None, "second-token", false),
        ];
        for (ms, rotated, given, admitted) in cases {
            if let Some(text) = rotated {
                crate::config::write_settled(&file, format!("{text}\n"));
            }
            assert_eq!(
                token.admits(given.as_bytes(), at(ms)),
                admitted,
                "{given} at {ms} ms"
            );
        }
    }

    #[test]
    fn only_the_token_itself_is_the_token() {
        let token = b"s3cr3t-ingest-token";
        assert!(is_the_token(token, token));
        for given in [
            &b""[..],
            b"s3cr3t-ingest-toke",
            b"s3cr3t-ingest-token ",
            b"s3cr3t-ingest-tokem",
            b"S3cr3t-ingest-token",
            b"s3cr3t-ingest-token-and-more",
        ] {
            assert!(
                !is_the_token(given, token),
                "{:?}",
                String::from_utf8_lossy(given)
            );
        }
    }
}
