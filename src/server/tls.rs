//! HTTPS for the ingest API: the server's certificate and key, and optionally the CA that
//! client certificates must chain to (`ingest.tls_cert_file`, `.tls_key_file`,
//! `.client_ca_file`). rustls with the ring provider. The files are read again once changed
//! ([`crate::tls_files`]).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::TlsAcceptor;

use crate::config::IngestTls;
use crate::tls_files::{
    roots_with, CertAndKeyFiles, FollowedCertifiedKey, FollowedFiles, CA_FILE_SAID,
};

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Refuses a CA certificate (basicConstraints CA:TRUE) as the server's own: TLS clients
/// (rustls, browsers, curl) refuse it, so the agent would start and no client could connect.
/// What a one-line `openssl req -x509` makes is such a certificate.
fn refuse_ca_certificate(path: &Path, chain: &[CertificateDer<'static>]) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    if roots.add(chain[0].clone()).is_err() {
        return Ok(()); // not a certificate that can anchor itself; nothing to tell
    }
    let Ok(verifier) =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), ring())
            .build()
    else {
        return Ok(());
    };
    let name = ServerName::try_from("outpost.invalid").expect("a valid name");
    match verifier.verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now()) {
        Err(e) if format!("{e:?}").contains("CaUsedAsEndEntity") => Err(format!(
            "ingest.tls_cert_file: {} is a CA certificate (basicConstraints CA:TRUE), which TLS \
             clients refuse as a server's own (CaUsedAsEndEntity). Make a CA, then a server \
             certificate signed by it for this host's name (e.g. with openssl: `req -x509` for \
             the CA, then `req -new` and `x509 -req -CA ca.pem -CAkey ca.key -extfile` with \
             `basicConstraints=CA:FALSE` and `subjectAltName=DNS:host`); give the server \
             certificate (and the CA after it, optionally) here and the CA to the clients",
            path.display()
        )),
        _ => Ok(()),
    }
}

/// What accepts the ingest API's TLS connections: made again once `ingest.client_ca_file`
/// changed (the client CAs are in the server's configuration, as the names it hints at).
pub type IngestAcceptor = FollowedFiles<TlsAcceptor>;

/// The acceptor for the ingest API; errors name the key and say what to do.
pub fn acceptor(tls: &IngestTls) -> Result<Arc<IngestAcceptor>, String> {
    let files = CertAndKeyFiles {
        cert: ("ingest.tls_cert_file", tls.cert_file.clone()),
        key: ("ingest.tls_key_file", tls.key_file.clone()),
    };
    let own = FollowedCertifiedKey::certified_key(files, refuse_ca_certificate)?;
    let client_ca_file = tls.client_ca_file.clone();
    let accept = move |contents: &[Vec<u8>]| {
        let builder = rustls::ServerConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("ingest TLS: {e}"))?;
        let builder = match (&client_ca_file, contents) {
            (None, []) => builder.with_no_client_auth(),
            (Some(path), [pem]) => {
                let roots = roots_with("ingest.client_ca_file", path, &[], pem)?;
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    ring(),
                )
                .build()
                .map_err(|e| format!("ingest.client_ca_file: {}: {e}", path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => unreachable!("one content for ingest.client_ca_file, none without"),
        };
        let mut config = builder.with_cert_resolver(Arc::clone(&own) as _);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    };
    let files = tls
        .client_ca_file
        .iter()
        .map(|path| ("ingest.client_ca_file", path.clone()))
        .collect();
    FollowedFiles::load(files, accept, CA_FILE_SAID)
}
