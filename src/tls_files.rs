//! Certificates and keys in PEM files, and a certificate with its key that follows its files:
//! the ingest API's own (`ingest.tls_cert_file`, `.tls_key_file`) and the client certificate
//! sent to the destination (`destination.client_cert_file`, `.client_key_file`). A
//! certificate renewed in place (by cert-manager, certbot or a Vault agent, often daily) is
//! presented from the next TLS handshake on, without a restart; connections already open
//! keep the one they began with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// How often a handshake may have the files read again.
const LOOK_EVERY: Duration = Duration::from_secs(1);

pub fn read_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    certs_in(key, path, &read(key, path)?)
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))
}

fn certs_in(key: &str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{key}: {} is not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{key}: {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

fn key_in(key: &str, path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| format!("{key}: {}: {e}", path.display()))?
        .ok_or_else(|| format!("{key}: {} holds no PEM private key", path.display()))
}

/// A certificate chain's file and its key's, each with the key that names it in messages.
#[derive(Debug, Clone)]
pub struct CertAndKeyFiles {
    pub cert: (&'static str, PathBuf),
    pub key: (&'static str, PathBuf),
}

/// What a chain must pass besides matching its key (the ingest API refuses a CA certificate
/// as its own): the cert file's path and the chain, to an error that says what to do.
pub type ChainCheck = fn(&Path, &[CertificateDer<'static>]) -> Result<(), String>;

impl CertAndKeyFiles {
    /// The files' bytes, to tell whether they changed since they were last read.
    fn contents(&self) -> Result<[Vec<u8>; 2], String> {
        let ((cert_key, cert), (key_key, key)) = (&self.cert, &self.key);
        Ok([read(cert_key, cert)?, read(key_key, key)?])
    }

    /// The chain and its key from the files' `contents`; an error names the key at fault and
    /// says what is wrong.
    fn certified(
        &self,
        contents: &[Vec<u8>; 2],
        check: ChainCheck,
    ) -> Result<CertifiedKey, String> {
        let ((cert_key, cert), (key_key, key)) = (&self.cert, &self.key);
        let chain = certs_in(cert_key, cert, &contents[0])?;
        check(cert, &chain)?;
        let private_key = key_in(key_key, key, &contents[1])?;
        let provider = rustls::crypto::ring::default_provider();
        CertifiedKey::from_der(chain, private_key, &provider)
            .map_err(|e| format!("{cert_key} / {key_key}: {e} (is the key the certificate's?)"))
    }
}

/// A certificate and its key, read again from their files when either changed (read, at a
/// handshake, at most once a second: two files of a few KiB). Files that cannot be read then, or do not make a
/// certificate and its key (the certificate renewed and its key not yet), leave the pair read
/// before in use, with a warning once for each way they fail, and are read again at the next
/// look: the pair is taken up once both are written.
pub struct FollowedCertifiedKey {
    files: CertAndKeyFiles,
    check: ChainCheck,
    state: Mutex<Followed>,
}

struct Followed {
    current: Arc<CertifiedKey>,
    /// What the files held when `current` was read from them.
    read_from: [Vec<u8>; 2],
    looked_at: Instant,
    warned: Option<String>,
}

impl FollowedCertifiedKey {
    /// Reads the files; an error names the key at fault and says what is wrong.
    pub fn load(files: CertAndKeyFiles, check: ChainCheck) -> Result<FollowedCertifiedKey, String> {
        let read_from = files.contents()?;
        let current = Arc::new(files.certified(&read_from, check)?);
        Ok(FollowedCertifiedKey {
            files,
            check,
            state: Mutex::new(Followed {
                current,
                read_from,
                looked_at: Instant::now(),
                warned: None,
            }),
        })
    }

    /// The pair to present at a handshake at `now`.
    pub fn current(&self, now: Instant) -> Arc<CertifiedKey> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_duration_since(state.looked_at) < LOOK_EVERY {
            return Arc::clone(&state.current);
        }
        state.looked_at = now;
        let read = self.files.contents().and_then(|contents| {
            if contents == state.read_from {
                return Ok(None);
            }
            let pair = self.files.certified(&contents, self.check)?;
            Ok(Some((pair, contents)))
        });
        match read {
            Ok(None) => {}
            Ok(Some((pair, contents))) => {
                let (cert_key, cert) = &self.files.cert;
                tracing::info!(
                    "{cert_key}: {} changed: its certificate is presented from now on",
                    cert.display()
                );
                state.current = Arc::new(pair);
                state.read_from = contents;
                state.warned = None;
            }
            Err(error) => {
                if state.warned.as_deref() != Some(error.as_str()) {
                    tracing::warn!(
                        %error,
                        "reading a changed certificate and key failed: the pair read before is presented until both are in place"
                    );
                    state.warned = Some(error);
                }
            }
        }
        Arc::clone(&state.current)
    }
}

impl std::fmt::Debug for FollowedCertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FollowedCertifiedKey")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl rustls::server::ResolvesServerCert for FollowedCertifiedKey {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current(Instant::now()))
    }
}

/// Sent whatever CAs the server hints at, as rustls' single client certificate is.
impl rustls::client::ResolvesClientCert for FollowedCertifiedKey {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current(Instant::now()))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (String, String, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    /// The files are looked at no more than once a second; a certificate whose key has not
    /// come yet, or files gone for a moment, leave the pair read before in use.
    #[test]
    fn a_followed_pair_changes_only_for_a_whole_pair_and_at_most_once_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let files = CertAndKeyFiles {
            cert: ("cert", dir.path().join("cert.pem")),
            key: ("key", dir.path().join("key.pem")),
        };
        let write = |(cert, key): (&str, &str)| {
            std::fs::write(&files.cert.1, cert).unwrap();
            std::fs::write(&files.key.1, key).unwrap();
        };
        let (a, b, c) = (pair(), pair(), pair());
        write((&a.0, &a.1));
        let followed = FollowedCertifiedKey::load(files.clone(), |_, _| Ok(())).unwrap();
        let start = Instant::now();
        let presented =
            |ms: u64| followed.current(start + Duration::from_millis(ms)).cert[0].to_vec();
        assert_eq!(presented(1_000), a.2);
        write((&b.0, &b.1));
        assert_eq!(presented(1_999), a.2, "looked at a second ago");
        assert_eq!(presented(2_000), b.2);
        std::fs::write(&files.cert.1, &c.0).unwrap();
        assert_eq!(presented(3_000), b.2, "the key is not the certificate's");
        std::fs::remove_file(&files.key.1).unwrap();
        assert_eq!(presented(4_000), b.2, "the key is gone");
        std::fs::write(&files.key.1, &c.1).unwrap();
        assert_eq!(presented(4_500), b.2, "looked at half a second ago");
        assert_eq!(presented(5_000), c.2);
        assert_eq!(presented(6_000), c.2);
    }
}
