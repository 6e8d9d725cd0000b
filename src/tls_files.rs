//! Certificates and keys in PEM files, and what follows its files: the ingest API's own
//! certificate and key (`ingest.tls_cert_file`, `.tls_key_file`), the client certificate sent
//! to the destination (`destination.client_cert_file`, `.client_key_file`), and the CAs
//! trusted (`destination.ca_file`, `ingest.client_ca_file`). A certificate renewed in place
//! (by cert-manager, certbot or a Vault agent, often daily), or a CA added to a bundle before
//! the certificates it signs are used, is taken up from the next TLS handshake on, without a
//! restart; connections already open keep what they began with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::config::{cannot_read, look_every_second, written_just_now};

/// The file `key` names; `again`, after the start ([`cannot_read`]).
fn read(key: &str, path: &Path, again: bool) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{key}: {}", cannot_read(path, &e, again)))
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
    /// Whether the files make a certificate and its key, read once (for a client that reads
    /// them itself, as the NATS client does at each connection); an error names the key at
    /// fault and says what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let contents = contents(&[self.cert.clone(), self.key.clone()], false)?;
        self.certified(&contents, |_, _| Ok(())).map(|_| ())
    }

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

/// Files read again when any of them changed, and what is made of them: looked at every
/// second on a thread of their own ([`look_every_second`]: handshakes never wait for a file),
/// compared by bytes (files of a few KiB), and taken up once left alone for a second
/// (by its modification time). Files that cannot be read then, or do not make one (a
/// certificate renewed and its key not yet), leave what was made before in use, with a
/// warning once for each way they fail, and are read again at the next look: a change is
/// taken up once it is whole.
pub struct FollowedFiles<T> {
    /// Each with the key that names it in messages.
    files: Vec<(&'static str, PathBuf)>,
    make: Box<Make<T>>,
    said: Said,
    current: RwLock<Arc<T>>,
    look: Mutex<Look>,
}

/// What is made of the files' contents, in the order of the files; an error names the key at
/// fault and says what is wrong.
type Make<T> = dyn Fn(&[Vec<u8>]) -> Result<T, String> + Send + Sync;

struct Look {
    /// What the files held when `current` was made of them.
    read_from: Vec<Vec<u8>>,
    warned: Option<String>,
}

fn contents(files: &[(&'static str, PathBuf)], again: bool) -> Result<Vec<Vec<u8>>, String> {
    files
        .iter()
        .map(|(key, path)| read(key, path, again))
        .collect()
}

impl<T: Send + Sync + 'static> FollowedFiles<T> {
    /// Reads the files and makes what they give, then follows them; an error names the key
    /// at fault and says what is wrong.
    pub fn load(
        files: Vec<(&'static str, PathBuf)>,
        make: impl Fn(&[Vec<u8>]) -> Result<T, String> + Send + Sync + 'static,
        said: Said,
    ) -> Result<Arc<FollowedFiles<T>>, String> {
        Ok(FollowedFiles::read(files, make, said)?.follow())
    }

    fn follow(self) -> Arc<FollowedFiles<T>> {
        let followed = Arc::new(self);
        if !followed.files.is_empty() {
            look_every_second(&followed, FollowedFiles::look);
        }
        followed
    }
}

impl<T> FollowedFiles<T> {
    /// [`FollowedFiles::load`] without following the files: [`FollowedFiles::look`] reads
    /// them again.
    fn read(
        files: Vec<(&'static str, PathBuf)>,
        make: impl Fn(&[Vec<u8>]) -> Result<T, String> + Send + Sync + 'static,
        said: Said,
    ) -> Result<FollowedFiles<T>, String> {
        let read_from = contents(&files, false)?;
        let current = Arc::new(make(&read_from)?);
        Ok(FollowedFiles {
            files,
            make: Box::new(make),
            said,
            current: RwLock::new(current),
            look: Mutex::new(Look {
                read_from,
                warned: None,
            }),
        })
    }

    /// What to use at a handshake.
    pub fn current(&self) -> Arc<T> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reads the files, and takes up what they make when they changed.
    fn look(&self) {
        let mut look = self.look.lock().unwrap_or_else(|e| e.into_inner());
        let made = contents(&self.files, true).and_then(|contents| {
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
    /// Reads the files, then follows them; an error names the key at fault and says what is
    /// wrong.
    pub fn certified_key(
        files: CertAndKeyFiles,
        check: ChainCheck,
    ) -> Result<Arc<FollowedCertifiedKey>, String> {
        Ok(unfollowed_pair(files, check)?.follow())
    }
}

/// A certificate and its key read from their files, which [`FollowedFiles::look`] reads again.
fn unfollowed_pair(
    files: CertAndKeyFiles,
    check: ChainCheck,
) -> Result<FollowedCertifiedKey, String> {
    let paths = vec![files.cert.clone(), files.key.clone()];
    let said = Said {
        taken_up: "its certificate is presented from now on",
        kept: "reading the certificate and key again failed: the pair read before is presented until both can be read and hold together",
    };
    FollowedFiles::read(
        paths,
        move |contents| files.certified(contents, check),
        said,
    )
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
    kept: "reading the CA file again failed: the CAs read before are trusted until it can be read and holds certificates",
};

impl rustls::server::ResolvesServerCert for FollowedCertifiedKey {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
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
        self.current().verify_server_cert(
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
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// Sent whatever CAs the server hints at, as rustls' single client certificate is.
impl rustls::client::ResolvesClientCert for FollowedCertifiedKey {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::write_settled;

    fn pair_pems() -> (String, String, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    /// A look takes up a whole new pair; a certificate whose key has not come yet, files
    /// gone for a moment, or one written just now, leave the pair read before in use.
    #[test]
    fn a_followed_pair_changes_only_for_a_whole_pair() {
        let dir = tempfile::tempdir().unwrap();
        let files = CertAndKeyFiles {
            cert: ("cert", dir.path().join("cert.pem")),
            key: ("key", dir.path().join("key.pem")),
        };
        let write = |(cert, key): (&str, &str)| {
            write_settled(&files.cert.1, cert);
            write_settled(&files.key.1, key);
        };
        let (a, b, c) = (pair_pems(), pair_pems(), pair_pems());
        write((&a.0, &a.1));
        let followed = unfollowed_pair(files.clone(), |_, _| Ok(())).unwrap();
        let presented = || {
            followed.look();
            followed.current().cert[0].to_vec()
        };
        assert_eq!(presented(), a.2);
        write((&b.0, &b.1));
        assert_eq!(presented(), b.2);
        write_settled(&files.cert.1, &c.0);
        assert_eq!(presented(), b.2, "the key is not the certificate's");
        std::fs::remove_file(&files.key.1).unwrap();
        assert_eq!(presented(), b.2, "the key is gone");
        std::fs::write(&files.key.1, &c.1).unwrap();
        assert_eq!(presented(), b.2, "the key written just now");
        write_settled(&files.key.1, &c.1);
        assert_eq!(presented(), c.2);
    }

    /// A file that hangs when read (a FIFO here, as a file on a network mount that stopped
    /// answering) holds the look, not what a handshake takes.
    #[test]
    fn a_file_that_hangs_holds_its_look_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        write_settled(&path, "first");
        let make = |contents: &[Vec<u8>]| Ok(String::from_utf8(contents[0].clone()).unwrap());
        let files = vec![("ca", path.clone())];
        let followed = Arc::new(FollowedFiles::read(files, make, CA_FILE_SAID).unwrap());
        crate::config::fifo_in_place_of(&path);
        let looking = std::thread::spawn({
            let followed = Arc::clone(&followed);
            move || followed.look()
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!looking.is_finished(), "the FIFO has no writer yet");
        assert_eq!(*followed.current(), "first");
        std::fs::write(&path, "second").unwrap();
        looking.join().unwrap();
    }
}
