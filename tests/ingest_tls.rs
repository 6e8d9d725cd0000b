//! The ingest API over HTTPS, with the real binary: a private CA made here, a server
//! certificate it signed, client certificates required or not; a CA certificate used as the
//! server's own is refused at start with what to do; the start-up warnings for an exposed
//! listener and for a config file with secrets that others can read.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::agent_process::{free_port, AgentProcess};
use common::pki::{ring, Ca, Leaf};
use common::*;
use rcgen::ExtendedKeyUsagePurpose;

/// A rustls client that trusts `ca`, presenting `client` if given.
fn client_config(ca: &Ca, client: Option<&Leaf>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    match client {
        None => builder.with_no_client_auth(),
        Some(leaf) => builder
            .with_client_auth_cert(leaf.chain(), leaf.private_key())
            .unwrap(),
    }
}

/// POSTs updates to `https://localhost:port/v1/updates` over HTTP/1.1; the status, or the
/// error as text.
async fn https_post(
    port: u16,
    tls: rustls::ClientConfig,
    body: String,
) -> Result<(u16, String), String> {
    https_post_over(port, tls, body, false)
        .await
        .map(|(status, body, _)| (status, body))
}

/// [`https_post`], offering only HTTP/2 when `http2`; the answer's HTTP version too.
async fn https_post_over(
    port: u16,
    tls: rustls::ClientConfig,
    body: String,
    http2: bool,
) -> Result<(u16, String, hyper::Version), String> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let connector = if http2 {
        connector.enable_http2().build()
    } else {
        connector.enable_http1().build()
    };
    let client: Client<_, Full<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    let request = hyper::Request::post(format!("https://localhost:{port}/v1/updates"))
        .body(Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let status = response.status().as_u16();
        let version = response.version();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{e:?}"))?
            .to_bytes();
        Ok::<_, String>((status, String::from_utf8_lossy(&body).into_owned(), version))
    })
    .await
    .map_err(|_| "timed out".to_string())?;
    answer
}

/// Waits until an HTTPS POST with `tls` gets an answer (the agent's `/healthz` is HTTPS too).
async fn wait_serving(agent: &mut AgentProcess, tls: &rustls::ClientConfig) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // Any answer over HTTPS will do (an empty body is refused with 400).
        if https_post(agent.addr.port(), tls.clone(), String::new())
            .await
            .is_ok()
        {
            return;
        }
        agent.assert_running();
        assert!(Instant::now() < deadline, "never served:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Files {
    dir: tempfile::TempDir,
    port: u16,
}

impl Files {
    fn new() -> Files {
        Files {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
        }
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// The config with `ingest` lines, mode 0600.
    fn config(&self, listen: &str, ingest: &[String]) -> PathBuf {
        let text = agent_config_text("http://127.0.0.1:9", "type = \"none\"", "").replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{listen}:{}\"\n{}", self.port, ingest.join("\n")),
        );
        let path = self.write("outpost.toml", &text);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    fn server_files(&self, ca: &Ca) -> Vec<String> {
        let leaf = ca.sign(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let cert = self.write("server.pem", &leaf.cert.pem());
        let key = self.write("server-key.pem", &leaf.key.serialize_pem());
        vec![
            format!("tls_cert_file = {:?}", cert.display().to_string()),
            format!("tls_key_file = {:?}", key.display().to_string()),
        ]
    }
}

fn one_update() -> String {
    member_update("p1", "Jane", "2026-01-01T00:00:00Z")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_over_https_with_a_private_ca() {
    let files = Files::new();
    let ca = Ca::new("outpost test CA");
    let config = files.config("127.0.0.1", &files.server_files(&ca));
    let mut agent = AgentProcess::spawn_with_env(&config, files.port, &[]);
    let trusting = client_config(&ca, None);
    wait_serving(&mut agent, &trusting).await;

    let (status, body) = https_post(files.port, trusting.clone(), one_update())
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"accepted\":1"), "{body}");
    // HTTP/2, agreed in the handshake (ALPN).
    let (status, body, version) = https_post_over(files.port, trusting, one_update(), true)
        .await
        .unwrap();
    assert_eq!((status, version), (200, hyper::Version::HTTP_2), "{body}");
    // A client that does not trust the CA gets nothing through, nor does plain HTTP.
    let other = Ca::new("another CA");
    let refused = https_post(files.port, client_config(&other, None), one_update()).await;
    assert!(refused.is_err(), "{refused:?}");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], files.port));
    let plain = try_http_post(addr, "/v1/updates", one_update(), &[]).await;
    assert!(
        plain.is_err() || plain.as_ref().unwrap().0 != 200,
        "{plain:?}"
    );
    assert!(agent.log().contains("scheme=\"https\"") || agent.log().contains("scheme=https"));
}

/// The certificate the agent presents to a new TLS connection.
async fn presented_certificate(port: u16, tls: &rustls::ClientConfig) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls.clone()))
        .connect(name, tcp)
        .await
        .unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A server certificate renewed in its files is presented from the next handshake on,
/// without a restart. One renewed halfway (its certificate written, its key not yet) leaves
/// the pair read before in use, so that clients are still served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_renewed_in_its_files_is_presented_without_a_restart() {
    let files = Files::new();
    let ca = Ca::new("outpost test CA");
    let config = files.config("127.0.0.1", &files.server_files(&ca));
    let mut agent = AgentProcess::spawn_with_env(&config, files.port, &[]);
    let trusting = client_config(&ca, None);
    wait_serving(&mut agent, &trusting).await;
    let first = presented_certificate(files.port, &trusting).await;
    let renew = |name: &str, contents: String| {
        let next = files.write(&format!("{name}.next"), &contents);
        std::fs::rename(next, files.dir.path().join(name)).unwrap();
    };
    let presented_within = |what: &'static str, expected: Vec<u8>| {
        let trusting = trusting.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if presented_certificate(files.port, &trusting).await == expected {
                    return;
                }
                assert!(Instant::now() < deadline, "{what} never presented");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    let second = ca.server_leaf();
    renew("server-key.pem", second.key.serialize_pem());
    renew("server.pem", second.cert.pem());
    presented_within("the renewed certificate", second.cert.der().to_vec()).await;
    assert_ne!(first, second.cert.der().to_vec());

    let third = ca.server_leaf();
    renew("server.pem", third.cert.pem());
    // Looked at again with the key left behind.
    agent.wait_for_log("is the key the certificate's?").await;
    for _ in 0..3 {
        assert_eq!(
            presented_certificate(files.port, &trusting).await,
            second.cert.der().to_vec()
        );
    }
    let (status, body) = https_post(files.port, trusting.clone(), one_update())
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    renew("server-key.pem", third.key.serialize_pem());
    presented_within(
        "the certificate once its key came",
        third.cert.der().to_vec(),
    )
    .await;
    assert!(
        agent.log().contains("ingest.tls_cert_file"),
        "{}",
        agent.log()
    );
}

/// A client that trusts `ca` and presents a certificate `issuer` signed.
fn client_of(ca: &Ca, issuer: &Ca) -> rustls::ClientConfig {
    let leaf = issuer.sign(&["edge-producer"], ExtendedKeyUsagePurpose::ClientAuth);
    client_config(ca, Some(&leaf))
}

/// An agent serving over HTTPS with a certificate `ca` signed, that requires client
/// certificates signed by the "clients CA" of `files`' `clients-ca.pem`: the agent once it
/// serves, that CA, and a client it lets in.
async fn agent_requiring_client_certificates(
    files: &Files,
    ca: &Ca,
) -> (AgentProcess, Ca, rustls::ClientConfig) {
    let mut ingest = files.server_files(ca);
    let clients_ca = Ca::new("clients CA");
    let client_ca_file = files.write("clients-ca.pem", &clients_ca.cert.pem());
    ingest.push(format!(
        "client_ca_file = {:?}",
        client_ca_file.display().to_string()
    ));
    let config = files.config("127.0.0.1", &ingest);
    let mut agent = AgentProcess::spawn_with_env(&config, files.port, &[]);
    let client = client_of(ca, &clients_ca);
    wait_serving(&mut agent, &client).await;
    (agent, clients_ca, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_when_a_client_ca_is_set() {
    let files = Files::new();
    let ca = Ca::new("outpost test CA");
    let (_agent, _, with_cert) = agent_requiring_client_certificates(&files, &ca).await;

    let without = https_post(files.port, client_config(&ca, None), one_update()).await;
    assert!(
        without.is_err(),
        "refused without a certificate: {without:?}"
    );
    let stranger = ca.sign(&["stranger"], ExtendedKeyUsagePurpose::ClientAuth);
    let wrong = https_post(
        files.port,
        client_config(&ca, Some(&stranger)),
        one_update(),
    )
    .await;
    assert!(
        wrong.is_err(),
        "refused with another CA's certificate: {wrong:?}"
    );
    let (status, body) = https_post(files.port, with_cert, one_update())
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
}

/// A CA added to `ingest.client_ca_file` (the bundle renamed into place) is trusted from the
/// next handshake on, without a restart; a file that holds no certificate for a moment leaves
/// the CAs read before trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_ca_added_to_its_file_is_trusted_without_a_restart() {
    let files = Files::new();
    let ca = Ca::new("outpost test CA");
    let (agent, first_ca, first_client) = agent_requiring_client_certificates(&files, &ca).await;
    let second_ca = Ca::new("next clients CA");
    let second_client = client_of(&ca, &second_ca);
    let client_ca_file = files.dir.path().join("clients-ca.pem");
    let refused = https_post(files.port, second_client.clone(), one_update()).await;
    assert!(refused.is_err(), "a CA not yet in the file: {refused:?}");
    let replace = |contents: String| {
        let next = files.write("clients-ca.pem.next", &contents);
        std::fs::rename(next, &client_ca_file).unwrap();
    };

    replace("being rotated\n".to_owned());
    agent.wait_for_log("holds no PEM certificate").await;
    let (status, body) = https_post(files.port, first_client.clone(), one_update())
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");

    replace(first_ca.cert.pem() + &second_ca.cert.pem());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match https_post(files.port, second_client.clone(), one_update()).await {
            Ok((status, body)) => {
                assert_eq!(status, 200, "{body}");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "the added CA never trusted: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = https_post(files.port, first_client, one_update())
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let log = agent.log();
    assert!(
        log.contains("ingest.client_ca_file")
            && log.contains("the CAs in it are trusted from now on"),
        "{log}"
    );
}

/// Certificate, key and CA files that hang when read (FIFOs here, as files on a network mount
/// that stopped answering) hold no handshake and no request: the agent goes on serving with
/// what it read before, and stops when asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_that_hang_when_read_hold_no_handshake() {
    let files = Files::new();
    let ca = Ca::new("outpost test CA");
    let (mut agent, _, client) = agent_requiring_client_certificates(&files, &ca).await;
    for name in ["clients-ca.pem", "server.pem", "server-key.pem"] {
        let fifo = files.dir.path().join(format!("{name}.fifo"));
        let fifo_name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo_name.as_ptr(), 0o600) }, 0);
        std::fs::rename(&fifo, files.dir.path().join(name)).unwrap();
    }
    // Past two looks at the files, which wait for a writer that never comes.
    let until = Instant::now() + Duration::from_millis(2_500);
    while Instant::now() < until {
        let posted = tokio::time::timeout(
            Duration::from_secs(5),
            https_post(files.port, client.clone(), one_update()),
        )
        .await
        .expect("a request held for 5 s");
        let (status, body) = posted.unwrap();
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = agent
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(10))
        .await;
    assert_eq!(status.code(), Some(0), "{}", agent.log());
}

#[tokio::test]
async fn a_ca_certificate_as_the_servers_own_is_refused_with_what_to_do() {
    let files = Files::new();
    let ca = Ca::new("self-signed");
    let cert = files.write("ca.pem", &ca.cert.pem());
    let key = files.write("ca-key.pem", &ca.key.serialize_pem());
    let config = files.config(
        "127.0.0.1",
        &[
            format!("tls_cert_file = {:?}", cert.display().to_string()),
            format!("tls_key_file = {:?}", key.display().to_string()),
        ],
    );
    let out = Command::new(binary())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A configuration error: exit status 2.
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("is a CA certificate") && stderr.contains("signed by it"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warnings_for_an_exposed_listener_and_a_readable_secret() {
    // Beyond loopback, no TLS, no token: warned.
    let files = Files::new();
    let config = files.config("0.0.0.0", &[]);
    let mut agent = AgentProcess::start(&config, files.port).await;
    let log = agent.log();
    assert!(log.contains("is not a loopback address"), "{log}");
    assert!(!log.contains("other users can read it"), "{log}");
    agent.terminate().await;

    // The same with a token in a file others can read: the exposure is fine, the file is not.
    let files = Files::new();
    let config = files.config("0.0.0.0", &["token = \"s3cret-ingest\"".into()]);
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut agent = AgentProcess::start(&config, files.port).await;
    let log = agent.log();
    assert!(!log.contains("is not a loopback address"), "{log}");
    assert!(
        log.contains("holds secrets (ingest.token) and other users can read it"),
        "{log}"
    );
    assert!(!log.contains("s3cret-ingest"), "no secret in the log");
    agent.terminate().await;

    // Beyond loopback with TLS but neither a token nor client certificates: TLS encrypts, but
    // anyone may send.
    let files = Files::new();
    let ca = Ca::new("outpost test CA");
    let config = files.config("0.0.0.0", &files.server_files(&ca));
    let mut agent = AgentProcess::spawn_with_env(&config, files.port, &[]);
    wait_serving(&mut agent, &client_config(&ca, None)).await;
    let log = agent.log();
    assert!(
        log.contains("is not a loopback address") && log.contains("TLS encrypts"),
        "{log}"
    );
    agent.terminate().await;

    // Loopback, mode 0600: no warning (but of a disk with less room than a full outbox takes,
    // which depends on the machine).
    let files = Files::new();
    let config = files.config("127.0.0.1", &["token = \"s3cret-ingest\"".into()]);
    let mut agent = AgentProcess::start(&config, files.port).await;
    let log = agent.log();
    let warnings = log
        .lines()
        .filter(|line| line.contains("WARN") && !line.contains("free where the store is"));
    assert_eq!(warnings.count(), 0, "{log}");
    agent.terminate().await;
}
