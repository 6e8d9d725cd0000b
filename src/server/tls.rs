//! HTTPS for the ingest API: the server's certificate and key, and optionally the CA that
//! client certificates must chain to (`ingest.tls_cert_file`, `.tls_key_file`,
//! `.client_ca_file`). rustls with the ring provider.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::TlsAcceptor;

use crate::config::IngestTls;

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let file = std::fs::File::open(path)
        .map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut std::io::BufReader::new(file))
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

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let key = "ingest.tls_key_file";
    let file = std::fs::File::open(path)
        .map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))?;
    rustls_pemfile::private_key(&mut std::io::BufReader::new(file))
        .map_err(|e| format!("{key}: {}: {e}", path.display()))?
        .ok_or_else(|| format!("{key}: {} holds no PEM private key", path.display()))
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

/// The acceptor for the ingest API; errors name the key and say what to do.
pub fn acceptor(tls: &IngestTls) -> Result<TlsAcceptor, String> {
    let chain = read_certs("ingest.tls_cert_file", &tls.cert_file)?;
    refuse_ca_certificate(&tls.cert_file, &chain)?;
    let key = read_key(&tls.key_file)?;
    let builder = rustls::ServerConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("ingest TLS: {e}"))?;
    let builder = match &tls.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs("ingest.client_ca_file", path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("ingest.client_ca_file: {}: {e}", path.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                ring(),
            )
            .build()
            .map_err(|e| format!("ingest.client_ca_file: {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        format!("ingest.tls_cert_file / ingest.tls_key_file: {e} (is the key the certificate's?)")
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
