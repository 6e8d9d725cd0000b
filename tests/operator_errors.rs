//! The errors a person gets, each with what is wrong and what to do, from the real binary: an
//! address in use for `ingest.listen`, a store folder that cannot be written, a token endpoint
//! that answers HTML or a body that is not JSON, and destination certificates that are a CA's,
//! for another name, or expired. The underlying error stays in the debug log.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use outpost::receiver::{Receiver, ReceiverOptions};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Runs `outpost ARGS --config <ws> --log-level debug`, killed after 30 s.
fn run(ws: &Workspace, args: &[&str], uid: Option<u32>) -> Output {
    let mut command = Command::new(binary());
    command
        .args(args)
        .arg("--config")
        .arg(ws.config_path())
        .args(["--log-level", "debug"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(uid) = uid {
        command.uid(uid).gid(uid);
    }
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("outpost {args:?} did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// The error line `outpost: …` on standard error (after the debug log), asserting exit 1.
fn error_line(out: &Output) -> String {
    error_line_of_exit(out, 1)
}

/// [`error_line`], asserting exit `code`.
fn error_line_of_exit(out: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("outpost: "))
        .unwrap_or_else(|| panic!("no error line:\n{stderr}"))
        .to_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn ingest_listen_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let ws = Workspace::with_extra(&format!("[ingest]\nlisten = \"127.0.0.1:{port}\"\n"));
    let out = run(&ws, &["run"], None);
    assert_eq!(
        error_line(&out),
        format!(
            "outpost: ingest.listen 127.0.0.1:{port}: the address is already in use: another \
             program (or another outpost) listens there. Stop it, or set ingest.listen to a free \
             address in the config"
        )
    );
    let log = stderr(&out);
    assert!(
        log.contains("binding ingest.listen") && log.contains("AddrInUse"),
        "{log}"
    );
    assert!(
        !ws.store_path().exists(),
        "a start refused for its config made the store"
    );
}

#[test]
fn store_folder_that_cannot_be_written() {
    // The classic case: the folder belongs to root, the agent runs as a service user. Run as
    // root, the test runs the agent as `nobody`; otherwise as itself, the folder read-only.
    let ws = Workspace::new();
    let parent = ws.path().join("owned-by-someone-else");
    std::fs::create_dir(&parent).unwrap();
    let store = parent.join("store");
    let config = std::fs::read_to_string(ws.config_path()).unwrap().replace(
        "path = \"store\"",
        &format!("path = {:?}", store.to_str().unwrap()),
    );
    std::fs::write(ws.config_path(), config).unwrap();
    let root = unsafe { libc::geteuid() } == 0;
    let uid = if root {
        for path in [ws.path(), &ws.config_path(), &parent] {
            let mode = if path.is_dir() { 0o755 } else { 0o644 };
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        Some(65534)
    } else {
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o555)).unwrap();
        None
    };
    let out = run(&ws, &["run"], uid);
    // A restart would not mend it: exit 2.
    let line = error_line_of_exit(&out, 2);
    // The store is to be made, in a folder that is not the user's: it is made for the user,
    // not that folder given away.
    assert!(
        line.starts_with(&format!(
            "outpost: storage.path {0}: cannot create the store there (permission denied): the \
             user outpost runs as may not make it. Make it for that user (e.g. `mkdir -p {0} && \
             chown USER {0}`)",
            store.display()
        )) && line.contains("or set storage.path to a folder it can write"),
        "{line}"
    );
    assert!(
        stderr(&out).contains("creating the store folder"),
        "{}",
        stderr(&out)
    );
    // The same message where the CLI makes the store itself, for input it would store.
    let input = ws.path().join("one.ndjson");
    let update = member_update("p-1", "A", "2026-01-01T00:00:01Z");
    std::fs::write(&input, update).unwrap();
    std::fs::set_permissions(&input, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&ws, &["ingest", input.to_str().unwrap()], uid);
    assert_eq!(error_line_of_exit(&out, 2), line);
}

/// A `storage.path` through a file (`afile/store`, `afile` a file) holds no store: commands
/// that read the store say there is none (exit 2, as for a path mistyped), and those that
/// would make it name the part that is a file; as root (acting as the folder's owner) and
/// as another user alike.
#[test]
fn a_store_path_through_a_file_is_named_as_such() {
    let ws = Workspace::new();
    let file = ws.path().join("afile");
    std::fs::write(&file, b"not a folder").unwrap();
    let store = file.join("store");
    let config = std::fs::read_to_string(ws.config_path()).unwrap().replace(
        "path = \"store\"",
        &format!("path = {:?}", store.to_str().unwrap()),
    );
    std::fs::write(ws.config_path(), config).unwrap();
    let input = ws.path().join("one.ndjson");
    std::fs::write(&input, member_update("p-1", "A", "2026-01-01T00:00:01Z")).unwrap();
    let mut users = vec![None];
    if unsafe { libc::geteuid() } == 0 {
        for path in [ws.path(), &ws.config_path(), &input] {
            let mode = if path.is_dir() { 0o755 } else { 0o644 };
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        users.push(Some(65534));
    }
    // Exit 2 and the last line of standard error.
    let refused_as_a_mistake = |command: &[&str], uid: Option<u32>| {
        let out = run(&ws, command, uid);
        let stderr = stderr(&out);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{command:?} as {uid:?}: {stderr}"
        );
        stderr.lines().last().unwrap_or_default().to_owned()
    };
    for uid in users {
        for command in [
            &["outbox", "stats"][..],
            &["check", "--store"],
            &["repair", "--yes"],
        ] {
            assert_eq!(
                refused_as_a_mistake(command, uid),
                format!(
                    "outpost: there is no store at {} (`storage.path` in the config)",
                    store.display()
                ),
                "{command:?} as {uid:?}"
            );
        }
        // A mistake in the configuration: exit 2, which the systemd unit does not restart on.
        for command in [&["ingest", input.to_str().unwrap()][..], &["run"]] {
            let error_line = refused_as_a_mistake(command, uid);
            assert!(
                error_line.starts_with(&format!(
                    "outpost: storage.path {}: a part of that path is a file, not a folder",
                    store.display()
                )),
                "{command:?} as {uid:?}: {error_line}"
            );
        }
    }
}

/// A token endpoint on loopback that answers every request 200 with this content type and
/// body.
async fn token_endpoint(content_type: &'static str, body: &'static str) -> String {
    token_endpoint_answering("200 OK", content_type, body).await
}

/// A token endpoint on loopback that answers every request with this status line, content
/// type and body.
async fn token_endpoint_answering(
    status: &'static str,
    content_type: &'static str,
    body: &'static str,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request).await;
            let answer = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    });
    format!("http://{addr}/login")
}

fn oauth_workspace(auth_endpoint: &str, destination_lines: &str) -> Workspace {
    let ws = Workspace::new();
    let config = std::fs::read_to_string(ws.config_path()).unwrap().replace(
        "[destination.auth]\ntype = \"none\"",
        &format!(
            "{destination_lines}\n[destination.auth]\ntype = \"oauth2_client_credentials\"\n\
             auth_endpoint = \"{auth_endpoint}\"\nclient_id = \"edge-agent\"\n\
             client_secret = \"s3cret-value\""
        ),
    );
    assert!(config.contains("s3cret-value"));
    std::fs::write(ws.config_path(), config).unwrap();
    ws
}

/// `outpost check` against this token endpoint (on a blocking thread: the endpoint is served
/// by the test's runtime).
async fn check_with_token_endpoint(url: &str) -> Output {
    let ws = oauth_workspace(url, "");
    tokio::task::spawn_blocking(move || run(&ws, &["check"], None))
        .await
        .unwrap()
}

/// An `https://` token endpoint where a server of plain HTTP listens (it answers the TLS
/// handshake with a 400 and closes): `check` says so, every time, rather than die silently of
/// the closed connection (SIGPIPE, exit 141).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_of_an_https_url_served_in_plain_http_says_so() {
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
        .await
        .unwrap();
    let url = format!("{}/oauth/token", receiver.base_url()).replace("http://", "https://");
    for _ in 0..6 {
        let out = check_with_token_endpoint(&url).await;
        let stderr = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("does not answer in TLS"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_answers_html() {
    let url = token_endpoint(
        "text/html; charset=utf-8",
        "<!DOCTYPE html><html><body><form>Sign in</form></body></html>",
    )
    .await;
    let out = check_with_token_endpoint(&url).await;
    assert_eq!(
        error_line(&out),
        "outpost: token: the token endpoint answered 200 with an HTML page (Content-Type \
         text/html; charset=utf-8), not a JSON token: it looks like a login or portal page. \
         destination.auth.auth_endpoint must be the OAuth 2.0 token endpoint (it often ends in \
         /token or /oauth2/token; the identity provider's documentation names it)"
    );
    let log = stderr(&out);
    assert!(log.contains("expected value at line 1 column 1"), "{log}");
    assert!(!log.contains("s3cret-value"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_answers_a_body_that_is_not_json() {
    let url = token_endpoint("text/plain", "access_token=t0ken-in-form&expires_in=3600").await;
    let out = check_with_token_endpoint(&url).await;
    let line = error_line(&out);
    assert_eq!(
        line,
        "outpost: token: the token endpoint answered 200 with a body that is not JSON \
         (Content-Type text/plain, 42 bytes): destination.auth.auth_endpoint must be the OAuth \
         2.0 token endpoint (it often ends in /token or /oauth2/token; the identity provider's \
         documentation names it)"
    );
    assert!(
        !stderr(&out).contains("t0ken-in-form"),
        "the body may hold a token"
    );
}

/// A token answer past what outpost reads (1 MiB, here a token of 2 MB) is said to be too
/// large, not taken for JSON cut short and blamed on the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_answers_more_than_is_read() {
    let huge = format!(
        r#"{{"access_token":"{}","token_type":"Bearer","expires_in":3600}}"#,
        "t".repeat(2_000_000)
    );
    // The endpoint answers for as long as the test runs.
    let url = token_endpoint("application/json", Box::leak(huge.into_boxed_str())).await;
    let out = check_with_token_endpoint(&url).await;
    assert_eq!(
        error_line(&out),
        "outpost: token: the token endpoint answered 200 with a body of 1 MiB or more, which \
         outpost does not read whole: a token answer is never that large, nor a token a \
         request's header could carry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_that_echoes_the_secret_does_not_get_it_printed() {
    let url = token_endpoint_answering(
        "401 Unauthorized",
        "application/json",
        r#"{"error":"invalid_client","error_description":"secret s3cret-value is wrong"}"#,
    )
    .await;
    let out = check_with_token_endpoint(&url).await;
    let line = error_line(&out);
    assert!(
        line.contains("token endpoint answered 401")
            && line.contains("secret *** is wrong")
            && line.contains("invalid_client"),
        "{line}"
    );
    let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(!printed.contains("s3cret"), "{printed}");
}

#[test]
fn a_config_that_does_not_parse_does_not_show_the_secret_in_it() {
    let ws = oauth_workspace("http://127.0.0.1:9/token", "");
    let config = std::fs::read_to_string(ws.config_path())
        .unwrap()
        .replace("\"s3cret-value\"", "\"s3cret\\q-value\"");
    std::fs::write(ws.config_path(), config).unwrap();
    let out = run(&ws, &["check"], None);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("(`destination.auth.client_secret`): invalid escape sequence"),
        "{}",
        stderr(&out)
    );
    let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(!printed.contains("s3cret"), "{printed}");
}

#[test]
fn destination_certificate_files_that_cannot_be_used_are_configuration_errors() {
    let ws = Workspace::new();
    let not_pem = ws.path().join("not-pem.txt");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let missing = ws.path().join("missing.pem");
    let config = std::fs::read_to_string(ws.config_path()).unwrap();
    // (the lines added to [destination], what the error starts with)
    let cases = [
        (
            format!("ca_file = {:?}", missing.display().to_string()),
            format!(
                "outpost: destination.ca_file: cannot read {}",
                missing.display()
            ),
        ),
        (
            format!("ca_file = {:?}", not_pem.display().to_string()),
            format!(
                "outpost: destination.ca_file: {} holds no PEM certificate",
                not_pem.display()
            ),
        ),
        (
            format!(
                "client_cert_file = {:?}\nclient_key_file = {:?}",
                missing.display().to_string(),
                not_pem.display().to_string()
            ),
            format!(
                "outpost: destination.client_cert_file: cannot read {}",
                missing.display()
            ),
        ),
    ];
    for (lines, expected) in cases {
        let with = config.replacen("[destination]\n", &format!("[destination]\n{lines}\n"), 1);
        assert_ne!(with, config);
        std::fs::write(ws.config_path(), &with).unwrap();
        for command in ["run", "check"] {
            let out = run(&ws, &[command], None);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{command} with {lines}: {err}");
            assert!(
                err.lines().any(|l| l.starts_with(&expected)),
                "{command} with {lines}: {err}"
            );
        }
    }
}

// Certificates.

fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.distinguished_name.push(DnType::CommonName, name);
    (params.self_signed(&key).unwrap(), key)
}

/// A server certificate for `names` signed by the CA, valid `from` `to` (years).
fn leaf(
    ca: &(rcgen::Certificate, KeyPair),
    names: &[&str],
    years: (i32, i32),
) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = rcgen::date_time_ymd(years.0, 1, 1);
    params.not_after = rcgen::date_time_ymd(years.1, 1, 1);
    (params.signed_by(&key, &ca.0, &ca.1).unwrap(), key)
}

/// A receiver serving `served` over TLS.
async fn tls_receiver(served: &(rcgen::Certificate, KeyPair)) -> Receiver {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = vec![served.0.der().clone()];
    let key: PrivateKeyDer<'static> = PrivatePkcs8KeyDer::from(served.1.serialize_der()).into();
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    Receiver::start(
        "127.0.0.1:0".parse().unwrap(),
        ReceiverOptions {
            tls: Some(Arc::new(tls)),
            ..ReceiverOptions::default()
        },
    )
    .await
    .unwrap()
}

/// `outpost check` against a receiver serving `served` over TLS, trusting `ca`: its error line.
async fn check_against(served: &(rcgen::Certificate, KeyPair), ca: &rcgen::Certificate) -> String {
    let receiver = tls_receiver(served).await;
    let port = receiver.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let ws = oauth_workspace(
        &format!("https://localhost:{port}/oauth/token"),
        &format!("ca_file = {:?}", ca_file.to_str().unwrap()),
    );
    let out = tokio::task::spawn_blocking(move || run(&ws, &["check"], None))
        .await
        .unwrap();
    let line = error_line(&out);
    assert!(
        stderr(&out).contains(&format!("TLS with localhost:{port} failed")),
        "the whole error is in the debug log: {}",
        stderr(&out)
    );
    line.replace(&port.to_string(), "PORT")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_certificate_served_as_the_servers_own() {
    let ca = ca("self-signed by openssl req -x509");
    let line = check_against(&ca, &ca.0).await;
    assert_eq!(
        line,
        "outpost: token: token endpoint: the certificate localhost:PORT presents is a CA \
         certificate (CA:TRUE) served as the server's own certificate, which TLS clients refuse \
         (a one-line `openssl req -x509` makes such a certificate). On the server, serve a \
         certificate for localhost signed by that CA instead, and give outpost the CA's \
         certificate in destination.ca_file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name() {
    let ca = ca("test CA");
    let served = leaf(&ca, &["edge.example.net"], (2020, 2099));
    let line = check_against(&served, &ca.0).await;
    assert_eq!(
        line,
        "outpost: token: token endpoint: the certificate localhost:PORT presents is not valid \
         for the name localhost: it names DnsName(\"edge.example.net\"). Use a name it holds in \
         the URL (destination.http_endpoint or destination.auth.auth_endpoint), or have the \
         certificate reissued with localhost among its subject alternative names"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate() {
    let ca = ca("test CA");
    let served = leaf(&ca, &["localhost"], (2020, 2021));
    let line = check_against(&served, &ca.0).await;
    let prefix = "outpost: token: token endpoint: the certificate localhost:PORT presents \
                  expired on 2021-01-01 00:00:00 UTC (this host's clock says ";
    assert!(line.starts_with(prefix), "{line}");
    assert!(
        line.ends_with(
            "). Renew the server's certificate; if this host's clock is wrong, correct it"
        ),
        "{line}"
    );
}

/// `check` also shakes hands with an https endpoint (no request sent): a certificate that
/// verifies passes, a CA's certificate served as the server's own is explained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_verifies_the_endpoints_certificate() {
    let ca = ca("test CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.0.pem()).unwrap();
    let good = tls_receiver(&leaf(&ca, &["localhost"], (2020, 2099))).await;
    let bad = tls_receiver(&ca).await;
    for (receiver, ok) in [(&good, true), (&bad, false)] {
        let ws = Workspace::with_extra("[ingest]\nlisten = \"127.0.0.1:0\"\n");
        let config = std::fs::read_to_string(ws.config_path()).unwrap().replace(
            "http_endpoint = \"http://127.0.0.1:9/profiles?source=edge\"",
            &format!(
                "http_endpoint = \"https://localhost:{}/profiles\"\nca_file = {:?}",
                receiver.addr.port(),
                ca_file.to_str().unwrap()
            ),
        );
        std::fs::write(ws.config_path(), config).unwrap();
        let out = tokio::task::spawn_blocking(move || run(&ws, &["check"], None))
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if ok {
            assert!(out.status.success(), "{stdout}{}", stderr(&out));
            assert!(
                stdout.contains("endpoint TLS     certificate verifies (TLSv1_3)"),
                "{stdout}"
            );
        } else {
            assert!(stdout.contains("endpoint TLS     failed"), "{stdout}");
            let line = error_line(&out).replace(&receiver.addr.port().to_string(), "PORT");
            assert!(
                line.starts_with(
                    "outpost: endpoint: the certificate localhost:PORT presents is a CA \
                     certificate (CA:TRUE) served as the server's own certificate"
                ),
                "{line}"
            );
        }
    }
    assert_eq!(
        good.delivered().len() + bad.delivered().len(),
        0,
        "no request is sent"
    );
}

/// A reader that stops early (`outpost outbox stats | head -1`) ends the command quietly:
/// Rust's default is a panic, "failed printing to stdout: Broken pipe", at the next print.
#[test]
fn a_closed_pipe_ends_inspection_commands_quietly() {
    let ws = Workspace::new();
    ws.make_store();
    for args in [&["outbox", "stats"][..], &["completions", "bash"]] {
        let mut child = Command::new(binary())
            .args(args)
            .arg("--config")
            .arg(ws.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Closed before the command prints its first line.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = stderr(&out);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(!stderr.contains("Broken pipe"), "{args:?}: {stderr}");
    }
}

/// A stand-in for the agent on the workspace's socket: probes (connections that send nothing)
/// are passed over, and the n-th request (from 1) gets `answer(n)` as its answer line, or is
/// closed unanswered, which ends it. Fails after 30 s without that.
fn fake_agent(
    ws: &Workspace,
    answer: impl FnMut(u32) -> Option<String> + Send + 'static,
) -> std::thread::JoinHandle<()> {
    fake_agent_at(&ws.store_path().join("outpost.sock"), answer)
}

/// [`fake_agent`] on the socket at `path`.
fn fake_agent_at(
    path: &std::path::Path,
    mut answer: impl FnMut(u32) -> Option<String> + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut requests = 0;
        loop {
            let mut stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "the CLI sent {requests} request(s)"
                    );
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => panic!("{e}"),
            };
            stream.set_nonblocking(false).unwrap();
            let mut request = String::new();
            let _ = std::io::Read::read_to_string(&mut stream, &mut request);
            if request.is_empty() {
                continue;
            }
            requests += 1;
            let Some(line) = answer(requests) else {
                return;
            };
            std::io::Write::write_all(&mut stream, format!("{line}\n").as_bytes()).unwrap();
        }
    })
}

/// An agent holds its store before its socket answers while it starts, and after its socket
/// is gone while it stops: the CLI waits for one or the other rather than fail at once.
#[test]
fn the_cli_waits_for_an_agent_that_holds_the_store_but_does_not_answer_yet() {
    let ws = Workspace::new();
    ws.make_store();
    let held = outpost::store::Store::open(&ws.store_path(), 8 << 20).unwrap();
    let socket = ws.store_path().join("outpost.sock");
    let (out, agent) = ws.run_waiting_for_the_store(&["outbox", "stats", "--json"], || {
        let answer = serde_json::json!({"ok": {"pending": 7, "dead": 0}}).to_string();
        // The CLI's request answered, the test's own (below) ends it.
        fake_agent_at(&socket, move |n| (n == 1).then(|| answer.clone()))
    });
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let mut last = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    std::io::Write::write_all(&mut last, b"{}\n").unwrap();
    last.shutdown(std::net::Shutdown::Write).unwrap();
    agent.join().unwrap();
    drop(held);
    let stats: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(stats["pending"], 7, "{stats}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("waiting up to 30 s"),
        "{out:?}"
    );
}

/// `outpost compact` run while another process holds the store (an agent starting or
/// stopping) waits for it as other commands do, then compacts the store itself.
#[test]
fn compact_waits_for_a_store_held_by_another_process() {
    let ws = Workspace::new();
    ws.make_store();
    let held = outpost::store::Store::open(&ws.store_path(), 8 << 20).unwrap();
    let (out, ()) = ws.run_waiting_for_the_store(&["compact", "--json"], || drop(held));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("waiting up to 30 s"),
        "{out:?}"
    );
    let compacted: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert!(compacted["bytes_after"].is_u64(), "{compacted}");
}

/// An agent that stops before it answers (killed mid-request) is named as such, not as an
/// answer that could not be parsed.
#[test]
fn an_agent_that_closes_without_answering_is_said_so() {
    let ws = Workspace::new();
    ws.make_store();
    let agent = fake_agent(&ws, |_| None);
    let out = ws.run(&["outbox", "stats"], None);
    agent.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let error = error_line(&out);
    assert!(error.contains("closed without an answer"), "{error}");
}

/// Something on the agent's socket that answers `outbox stats` without end (a command run as
/// root calls sockets in folders others own) is given up on once its answer is longer than
/// any agent's, rather than read until memory runs out.
#[test]
fn an_answer_to_stats_that_does_not_end_is_given_up_on() {
    let ws = Workspace::new();
    ws.make_store();
    let listener =
        std::os::unix::net::UnixListener::bind(ws.store_path().join("outpost.sock")).unwrap();
    let endless = std::thread::spawn(move || {
        let mut sent = 0usize;
        // Probes send nothing; the request is the connection that sends a line.
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut request = String::new();
            let _ = std::io::Read::read_to_string(&mut stream, &mut request);
            if request.is_empty() {
                continue;
            }
            let chunk = vec![b' '; 1 << 20];
            while std::io::Write::write_all(&mut stream, &chunk).is_ok() {
                sent += chunk.len();
                assert!(sent < 1 << 30, "the CLI read 1 GiB of an answer");
            }
            return sent;
        }
        unreachable!("the listener ends only with the test")
    });
    let out = ws.run(&["outbox", "stats"], None);
    let sent = endless.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let error = error_line(&out);
    assert!(error.contains("goes on past 16777216 bytes"), "{error}");
    assert!(sent < 64 << 20, "{sent} bytes sent");
}

/// An agent that closes the socket while a command still writes its request (it stopped, say)
/// is an error the command names, not SIGPIPE ending it without a word: `outbox` commands
/// restore SIGPIPE's default action for their piped output, and their requests must go out
/// without raising it (as std's Unix sockets send).
#[test]
fn an_agent_that_closes_the_socket_midway_is_named() {
    let ws = Workspace::new();
    ws.make_store();
    let listener =
        std::os::unix::net::UnixListener::bind(ws.store_path().join("outpost.sock")).unwrap();
    // Each connection is held a moment unread, then closed: the probe before the request goes
    // unnoticed, and the request, far larger than the socket's buffer, stops midway.
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let stream = stream.unwrap();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                drop(stream);
            });
        }
    });
    let ids: Vec<String> = (0..40_000).map(|i| format!("00000001-{i}")).collect();
    let mut args = vec!["outbox", "retry"];
    args.extend(ids.iter().map(String::as_str));
    let out = ws.run(&args, None);
    let error = error_line(&out);
    assert!(
        error.contains("outbox") || error.contains("agent at"),
        "{error}"
    );
    assert!(
        error.contains("Broken pipe") || error.contains("reset"),
        "{error}"
    );
}

/// An agent that stops after it got a chunk of `outpost ingest` but before it answered may
/// have stored that chunk: the message says so, rather than counting it as not stored.
#[test]
fn ingest_counts_the_unanswered_chunk_as_maybe_stored() {
    let ws = Workspace::new();
    ws.make_store();
    // Its statistics (no partition handed over), one chunk answered as stored, then one
    // closed unanswered.
    let agent = fake_agent(&ws, |n| {
        let report = serde_json::json!({"ok": {
            "accepted": 1000, "exports": 0, "unchanged": 1000, "stale": 0, "deleted": 0,
            "exports_by_reason": {"segment": 0, "identity": 0, "attribute": 0, "delete": 0},
        }});
        match n {
            1 => Some(serde_json::json!({"ok": {"store_id": "00000001"}}).to_string()),
            2 => Some(report.to_string()),
            _ => None,
        }
    });
    let lines: Vec<String> = (0..2500)
        .map(|i| member_update(&format!("p{i}"), "Ada", "2026-01-01T00:00:01Z"))
        .collect();
    let input = ws.path().join("updates.ndjson");
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = ws.run(&["ingest", input.to_str().unwrap()], None);
    agent.join().unwrap();
    let error = error_line(&out);
    assert!(
        error.contains("closed without an answer")
            && error.contains(
                "the first 1000 of 2500 updates were stored, the next 1000 may have been, the rest not"
            ),
        "{error}"
    );
}
