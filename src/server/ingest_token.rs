//! The ingest token a request must carry. One given in `ingest.token_file` is read again
//! every second on a thread of its own: clients given a token rotated in that file are let
//! in, and the token it replaced is refused, without a restart, and no request waits for the
//! file (on a mount that hangs, say) nor has it read more often.

use std::sync::Arc;

use crate::config::{look_every_second, Rereadable, Secret, SecretFile};

pub struct IngestToken {
    token: Rereadable<SecretFile>,
}

impl IngestToken {
    /// The token, followed in its file when it came from one.
    pub fn new(token: Secret, file: Option<SecretFile>) -> Arc<IngestToken> {
        let token = Arc::new(IngestToken {
            token: Rereadable::new(token, file),
        });
        if token.token.read_from_a_file() {
            look_every_second(&token, |token| token.token.reread());
        }
        token
    }

    /// Whether `given` is the token, as last read.
    pub fn admits(&self, given: &[u8]) -> bool {
        is_the_token(given, self.token.held().expose().as_bytes())
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

    /// The token rotated in the file is let in, and the one it replaced refused, from the
    /// first look at the file on (every second, on its thread).
    #[test]
    fn a_token_rotated_in_its_file_is_the_token_from_the_next_look_on() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ingest-token");
        crate::config::write_settled(&file, "first-token\n");
        let text =
            "[destination]\nname = \"crm\"\nhttp_endpoint = \"https://api.example.com/p\"\n\n\
                    [destination.auth]\ntype = \"none\"\n\n[mapping]\nsegments = [\"s\"]\n\n\
                    [storage]\npath = \"store\"\n\n[ingest]\ntoken_file = \"ingest-token\"\n";
        let config = crate::config::Config::parse(&dir.path().join("outpost.toml"), text).unwrap();
        let ingest = config.ingest;
        let token = IngestToken::new(ingest.token.unwrap(), ingest.token_file);
        assert!(token.admits(b"first-token"));
        crate::config::write_settled(&file, "second-token\n");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while token.admits(b"first-token") {
            assert!(std::time::Instant::now() < deadline, "never read again");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(token.admits(b"second-token"));
        assert!(!token.admits(b"wrong-token"));
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
