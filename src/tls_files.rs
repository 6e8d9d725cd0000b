//! Certificates and keys in PEM files, and what follows its files: the ingest API's own
//! certificate and key (`ingest.tls_cert_file`, `.tls_key_file`), the client certificate sent
//! to the destination (`destination.client_cert_file`, `.client_key_file`), and the CAs
//! trusted (`destination.ca_file`, `ingest.client_ca_file`). A certificate renewed in place
//! (by cert-manager, certbot or a Vault agent, often daily), or a CA added to a bundle before
//! the certificates it signs are used, is taken up from the next TLS handshake on, without a
//! restart; connections already open keep what they began with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, TryLockError};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::config::written_just_now;

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
    /// The chain and its key from the files' `contents`; an error names the key at fault and
    /// says what is wrong.
    fn certified(&self, contents: &[Vec<u8>], check: ChainCheck) -> Result<CertifiedKey, String> {
        let ((cert_key, cert), (key_key, key)) = (&self.cert, &self.key);
        let chain = certs_in(cert_key, cert, &contents[0])?;
        check(cert, &chain)?;
        let private_key = key_in(key_key, key, &contents[1])?;
        let provider = rustls::crypto::ring::default_provider();
        CertifiedKey::from_der(chain, private_key, &provider)
            .map_err(|e| format!("{cert_key} / {key_key}: {e} (is the key the certificate's?)"))
    }
}

/// What the log says when changed files were taken up (after "<key>: <path> changed: ") and
/// when they could not be (the warning beside the error).
pub struct Said {
    pub taken_up: &'static str,
    pub kept: &'static str,
}

/// Files read again when any of them changed, and what is made of them: read, at a
/// handshake, at most once a second (files of a few KiB, compared by bytes), and taken up once
/// left alone for a second ([`crate::config::reread::SETTLE`]). Files that
/// cannot be read then, or do not make one (a certificate renewed and its key not yet),
/// leave what was made before in use, with a warning once for each way they fail, and are
/// read again at the next look: a change is taken up once it is whole.
pub struct FollowedFiles<T> {
    /// Each with the key that names it in messages.
    files: Vec<(&'static str, PathBuf)>,
    make: Box<Make<T>>,
    said: Said,
    current: RwLock<Arc<T>>,
    /// Held while the files are looked at: a handshake that finds it held (the files slow to
    /// read, on a network mount that hangs, say) takes `current` rather than wait.
    look: Mutex<Look>,
}

/// What is made of the files' contents, in the order of the files; an error names the key at
/// fault and says what is wrong.
type Make<T> = dyn Fn(&[Vec<u8>]) -> Result<T, String> + Send + Sync;

struct Look {
    /// What the files held when `current` was made of them.
    read_from: Vec<Vec<u8>>,
    looked_at: Instant,
    warned: Option<String>,
}

fn contents(files: &[(&'static str, PathBuf)]) -> Result<Vec<Vec<u8>>, String> {
    files.iter().map(|(key, path)| read(key, path)).collect()
}

impl<T> FollowedFiles<T> {
    /// Reads the files and makes what they give; an error names the key at fault and says
    /// what is wrong.
    pub fn load(
        files: Vec<(&'static str, PathBuf)>,
        make: impl Fn(&[Vec<u8>]) -> Result<T, String> + Send + Sync + 'static,
        said: Said,
    ) -> Result<FollowedFiles<T>, String> {
        let read_from = contents(&files)?;
        let current = Arc::new(make(&read_from)?);
        Ok(FollowedFiles {
            files,
            make: Box::new(make),
            said,
            current: RwLock::new(current),
            look: Mutex::new(Look {
                read_from,
                looked_at: Instant::now(),
                warned: None,
            }),
        })
    }

    /// What to use at a handshake at `now`.
    pub fn current(&self, now: Instant) -> Arc<T> {
        let current = || Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()));
        let mut look = match self.look.try_lock() {
            Ok(look) => look,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return current(),
        };
        if self.files.is_empty() || now.saturating_duration_since(look.looked_at) < LOOK_EVERY {
            return current();
        }
        look.looked_at = now;
        let made = contents(&self.files).and_then(|contents| {
            let written_just_now = || self.files.iter().any(|(_, path)| written_just_now(path));
            if contents == look.read_from || written_just_now() {
                return Ok(None);
            }
            Ok(Some(((self.make)(&contents)?, contents)))
        });
        match made {
            Ok(None) => {}
            Ok(Some((made, contents))) => {
                let (key, path) = &self.files[0];
                tracing::info!("{key}: {} changed: {}", path.display(), self.said.taken_up);
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(made);
                look.read_from = contents;
                look.warned = None;
            }
            Err(error) => {
                if look.warned.as_deref() != Some(error.as_str()) {
                    tracing::warn!(%error, "{}", self.said.kept);
                    look.warned = Some(error);
                }
            }
        }
        current()
    }
}

impl<T> std::fmt::Debug for FollowedFiles<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FollowedFiles")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// A certificate and its key, which follow their files.
pub type FollowedCertifiedKey = FollowedFiles<CertifiedKey>;

impl FollowedCertifiedKey {
    /// Reads the files; an error names the key at fault and says what is wrong.
    pub fn certified_key(
        files: CertAndKeyFiles,
        check: ChainCheck,
    ) -> Result<FollowedCertifiedKey, String> {
        let paths = vec![files.cert.clone(), files.key.clone()];
        FollowedFiles::load(
            paths,
            move |contents| files.certified(contents, check),
            Said {
                taken_up: "its certificate is presented from now on",
                kept: "reading a changed certificate and key failed: the pair read before is presented until both are in place",
            },
        )
    }
}

/// The certificates of a CA file (`key`, at `path`) added to `base` (the system's, or none):
/// the trust anchors to verify peers with. An error names the key and the file.
pub fn roots_with(
    key: &str,
    path: &Path,
    base: &[CertificateDer<'static>],
    pem: &[u8],
) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in base {
        let _ = roots.add(cert.clone());
    }
    for cert in certs_in(key, path, pem)? {
        roots
            .add(cert)
            .map_err(|e| format!("{key}: {}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// What the log says of a CA file (`destination.ca_file`, `ingest.client_ca_file`) changed.
pub const CA_FILE_SAID: Said = Said {
    taken_up: "the CAs in it are trusted from now on",
    kept: "reading a changed CA file failed: the CAs read before are trusted until it holds certificates",
};

impl rustls::server::ResolvesServerCert for FollowedCertifiedKey {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current(Instant::now()))
    }
}

/// The destination's certificate verified against the system's roots and a CA file that
/// follows its file.
impl rustls::client::danger::ServerCertVerifier
    for FollowedFiles<Arc<rustls::client::WebPkiServerVerifier>>
{
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.current(Instant::now()).verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current(Instant::now())
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current(Instant::now())
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.current(Instant::now()).supported_verify_schemes()
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
    use crate::config::write_settled;

    fn pair() -> (String, String, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    /// The files are looked at no more than once a second; a certificate whose key has not
    /// come yet, files gone for a moment, or one written just now, leave the pair read before
    /// in use.
    #[test]
    fn a_followed_pair_changes_only_for_a_whole_pair_and_at_most_once_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let files = CertAndKeyFiles {
            cert: ("cert", dir.path().join("cert.pem")),
            key: ("key", dir.path().join("key.pem")),
        };
        let write = |(cert, key): (&str, &str)| {
            write_settled(&files.cert.1, cert);
            write_settled(&files.key.1, key);
        };
        let (a, b, c) = (pair(), pair(), pair());
        write((&a.0, &a.1));
        let followed = FollowedCertifiedKey::certified_key(files.clone(), |_, _| Ok(())).unwrap();
        let start = Instant::now();
        let presented =
            |ms: u64| followed.current(start + Duration::from_millis(ms)).cert[0].to_vec();
        assert_eq!(presented(1_000), a.2);
        write((&b.0, &b.1));
        assert_eq!(presented(1_999), a.2, "looked at a second ago");
        assert_eq!(presented(2_000), b.2);
        write_settled(&files.cert.1, &c.0);
        assert_eq!(presented(3_000), b.2, "the key is not the certificate's");
        std::fs::remove_file(&files.key.1).unwrap();
        assert_eq!(presented(4_000), b.2, "the key is gone");
        std::fs::write(&files.key.1, &c.1).unwrap();
        assert_eq!(presented(4_500), b.2, "looked at half a second ago");
        assert_eq!(presented(5_000), b.2, "the key written just now");
        write_settled(&files.key.1, &c.1);
        assert_eq!(presented(6_000), c.2);
        assert_eq!(presented(7_000), c.2);
    }

    /// A handshake that comes while the files are being looked at takes what is in use
    /// rather than wait for the look.
    #[test]
    fn a_handshake_during_a_look_does_not_wait_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        write_settled(&path, "first");
        let make = |contents: &[Vec<u8>]| Ok(String::from_utf8(contents[0].clone()).unwrap());
        let followed = FollowedFiles::load(vec![("ca", path.clone())], make, CA_FILE_SAID).unwrap();
        write_settled(&path, "second");
        let later = Instant::now() + Duration::from_secs(2);
        let looking = followed.look.lock().unwrap();
        assert_eq!(*followed.current(later), "first", "while another looks");
        drop(looking);
        assert_eq!(*followed.current(later), "second");
    }
}
