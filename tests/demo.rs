//! The first run: the demo's summary matches what its receiver got; `--help` lists every
//! subcommand; the example config in `data/` is valid and passes `outpost check`.

mod common;

use common::*;
use outpost::demo::{run, DemoOptions};
use outpost::receiver::{Receiver, ReceiverOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_summary_matches_what_the_receiver_got() {
    let options = DemoOptions {
        fail_share: 0.1,
        show_progress: false,
        ..DemoOptions::default()
    };
    let report = run(&options).await.unwrap();
    let i = &report.ingested;
    assert_eq!(
        (i.accepted, i.exports, i.unchanged, i.stale, i.deleted),
        (1529, 823, 662, 30, 26)
    );
    assert_eq!(i.by_reason, [487, 142, 182, 12]);
    assert_eq!(
        report.receiver_exports, i.exports,
        "every export reached the receiver"
    );
    assert_eq!(report.delivered, i.exports);
    assert_eq!(report.dead, 0);
    assert_eq!(
        (report.receiver_out_of_order, report.receiver_unknown),
        (0, 0),
        "each export the receiver took was in the store, and each profile's came in order"
    );
    assert!(
        report.receiver_looked_up >= i.exports,
        "{}",
        report.receiver_looked_up
    );
    assert!(
        report.retried >= 4,
        "the scripted outage and injected failures were retried: {}",
        report.retried
    );
    assert_eq!(
        report.receiver_requests,
        report.delivered + report.retried + report.auth_rejected,
        "every request the receiver answered is counted once"
    );
    assert_eq!(report.token_fetches, report.receiver_tokens);
    assert!(
        report.token_fetches >= 2,
        "tokens of one second were refreshed"
    );
    assert_eq!(report.samples.len(), 3);
    let a = &report.adaptive;
    assert!(
        a.down_for > std::time::Duration::ZERO,
        "the outage at the start made the destination count as down"
    );
    assert!(
        a.limit_min >= 1 && a.limit_max > a.limit_min,
        "the concurrency limit adapted, as the loop set it (never below 1): {a:?}"
    );
    assert!(
        report.receiver_refused > 0,
        "the receiver's rate limit answered 429"
    );
}

/// With an ingest token in the environment, the demo's agent asks for it, and its client
/// sends it: the first command still works where the environment was set for `outpost run`.
#[test]
fn the_demo_runs_where_the_environment_gives_an_ingest_token() {
    let out = std::process::Command::new(binary())
        .arg("demo")
        .env("OUTPOST_INGEST_TOKEN", "demo-t0ken")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("updates   1529 accepted") && stdout.contains("0 dead"),
        "{stdout}"
    );
    assert!(!stdout.contains("demo-t0ken") && !stderr.contains("demo-t0ken"));
}

/// The paths of every command that does work (those without subcommands of their own).
fn leaf_commands(command: &clap::Command, path: Vec<String>, into: &mut Vec<Vec<String>>) {
    let subcommands: Vec<_> = command
        .get_subcommands()
        .filter(|c| c.get_name() != "help")
        .collect();
    if subcommands.is_empty() {
        into.push(path);
        return;
    }
    for sub in subcommands {
        let mut longer = path.clone();
        longer.push(sub.get_name().to_owned());
        leaf_commands(sub, longer, into);
    }
}

#[test]
fn help_lists_every_subcommand_with_an_example() {
    use clap::CommandFactory;
    let cli = outpost::cli::Cli::command();
    let out = std::process::Command::new(binary())
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for command in cli.get_subcommands().map(|c| c.get_name()) {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(command)),
            "--help lacks {command}:\n{help}"
        );
    }
    let mut leaves = Vec::new();
    leaf_commands(&cli, Vec::new(), &mut leaves);
    assert!(leaves.len() >= 20, "{leaves:?}");
    for sub in leaves {
        let out = std::process::Command::new(binary())
            .args(&sub)
            .arg("--help")
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.contains("Example: outpost"),
            "{sub:?} --help has no example:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_config_passes_check() {
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
        .await
        .unwrap();
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(manifest.join("data/outpost.example.toml")).unwrap();
    assert!(text.contains("127.0.0.1:8687"));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("outpost.toml");
    std::fs::write(
        &config,
        // Any free port for the ingest API: check binds it for a moment.
        text.replace("127.0.0.1:8687", &receiver.addr.to_string())
            .replace("127.0.0.1:8686", "127.0.0.1:0"),
    )
    .unwrap();
    let out = tokio::process::Command::new(binary())
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("token            obtained"), "{stdout}");
    assert!(
        !stdout.contains("change-me"),
        "check printed the client secret"
    );
    assert!(!stdout.contains("tok-"), "check printed the token");
    assert_eq!(receiver.tokens_issued(), 1);

    // A wrong secret: the token request fails and check exits 1, still without the secret.
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("change-me", "wrong-secret"),
    )
    .unwrap();
    let out = tokio::process::Command::new(binary())
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("401"), "{all}");
    assert!(!all.contains("wrong-secret"), "{all}");
}

/// `outpost receiver` on a free port with `--client-secret s3cret`, its exports appended to a
/// file of its own; killed when dropped, also when a test fails early.
struct ReceiverCommand {
    process: KilledOnDrop,
    addr: std::net::SocketAddr,
    /// A token it issued.
    token: String,
    out: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl ReceiverCommand {
    /// Starts it and waits until it issues a token.
    async fn start() -> ReceiverCommand {
        ReceiverCommand::start_with(&[]).await
    }

    /// [`ReceiverCommand::start`] with more arguments.
    async fn start_with(args: &[&str]) -> ReceiverCommand {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("exports.ndjson");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let process = KilledOnDrop(
            std::process::Command::new(binary())
                .args([
                    "receiver",
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                    "--client-secret",
                    "s3cret",
                    "--out",
                ])
                .arg(&out)
                .args(args)
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                let form =
                    "grant_type=client_credentials&client_id=edge-agent&client_secret=s3cret";
                let (status, body) = http_post(
                    addr,
                    "/oauth/token",
                    form.to_owned(),
                    &[("content-type", "application/x-www-form-urlencoded")],
                )
                .await;
                assert_eq!(status, 200, "{body}");
                let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
                let token = answer["access_token"].as_str().unwrap().to_owned();
                return ReceiverCommand {
                    process,
                    addr,
                    token,
                    out,
                    _dir: dir,
                };
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the receiver never answered");
    }

    /// Stops it with SIGTERM (it must exit 0) and returns what it wrote to its file.
    async fn stop(mut self) -> String {
        // SAFETY: kill only sends a signal to the child's pid, which is still ours to reap.
        let pid = self.process.0.id() as i32;
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        loop {
            if let Some(status) = self.process.0.try_wait().unwrap() {
                assert!(status.success(), "the receiver exited with {status}");
                return std::fs::read_to_string(&self.out).unwrap();
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

/// Runs a receiver test, failing it (and so killing its receiver) if it takes over a minute.
async fn within_a_minute(test: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(std::time::Duration::from_secs(60), test)
        .await
        .expect("the test took over a minute");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_command_issues_tokens_and_writes_exports() {
    within_a_minute(async {
        let receiver = ReceiverCommand::start().await;
        let addr = receiver.addr;
        let (status, _) = http_post(
            addr,
            "/oauth/token",
            "grant_type=client_credentials&client_id=edge-agent&client_secret=bad".into(),
            &[],
        )
        .await;
        assert_eq!(status, 401, "a wrong secret gets no token");
        let (status, _) = http_post(addr, "/profiles?x=1", "{\"a\":1}".into(), &[]).await;
        assert_eq!(status, 401, "no token, no export");
        let bearer = format!("Bearer {}", receiver.token);
        let headers = [
            ("authorization", bearer.as_str()),
            ("idempotency-key", "k-1"),
        ];
        let (status, _) = http_post(addr, "/profiles?x=1", "{\"a\":1}".into(), &headers).await;
        assert_eq!(status, 200);
        // Pretty-printed JSON still makes one line of the file.
        let pretty = "{\n  \"b\": [\r\n    \"x\\ny\"\n  ]\n}";
        let (status, _) = http_post(addr, "/profiles", pretty.into(), &headers).await;
        assert_eq!(status, 200);
        let written = receiver.stop().await;
        assert_eq!(
            json_lines(&written),
            vec![
                serde_json::json!({"idempotency_key": "k-1", "query": "x=1", "payload": {"a": 1}}),
                serde_json::json!({"idempotency_key": "k-1", "query": null, "payload": {"b": ["x\ny"]}}),
            ]
        );
    })
    .await;
}

/// `--reject-share` refuses exports with 400, as an endpoint refuses what they hold, so that
/// dead letters can be tried; with `--fail-share` the two cannot take more than every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_command_refuses_a_share_of_exports() {
    within_a_minute(async {
        let receiver = ReceiverCommand::start_with(&["--reject-share", "1"]).await;
        let bearer = format!("Bearer {}", receiver.token);
        let headers = [
            ("authorization", bearer.as_str()),
            ("idempotency-key", "k-1"),
        ];
        for _ in 0..3 {
            let (status, body) =
                http_post(receiver.addr, "/profiles", "{\"a\":1}".into(), &headers).await;
            assert_eq!(status, 400, "{body}");
        }
        assert_eq!(receiver.stop().await, "", "nothing refused is written");
    })
    .await;
    let out = std::process::Command::new(binary())
        .args([
            "receiver",
            "--listen",
            "127.0.0.1:0",
            "--fail-share",
            "0.6",
            "--reject-share",
            "0.6",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("must not add up to more than 1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn completions_are_printed() {
    let out = std::process::Command::new(binary())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(
        script.contains("outpost") && script.contains("outbox"),
        "{script}"
    );
}

/// A receiver left running for a soak must not keep what it received: 3,000 exports of 8 KB
/// (24 MB) leave its resident memory within a few MiB of where it was. It still refuses what
/// a `Value` parse refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_command_refuses_bad_json_and_its_memory_stays_flat() {
    use http_body_util::{BodyExt, Full};
    within_a_minute(async {
        let receiver = ReceiverCommand::start().await;
        let pid = receiver.process.0.id();
        let client: hyper_util::client::legacy::Client<_, Full<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let payload =
            bytes::Bytes::from(serde_json::json!({"filler": "x".repeat(8 << 10)}).to_string());
        let (addr, bearer) = (receiver.addr, format!("Bearer {}", receiver.token));
        let post = |body: bytes::Bytes| {
            let request = hyper::Request::post(format!("http://{addr}/profiles"))
                .header("authorization", &bearer)
                .header("content-type", "application/json")
                .body(Full::new(body))
                .unwrap();
            let client = client.clone();
            async move {
                let response = client.request(request).await.unwrap();
                let status = response.status().as_u16();
                response.into_body().collect().await.unwrap();
                status
            }
        };
        for bad in [
            &b"{not json"[..],
            b"{\"a\":\"\xff\xfe\"}",
            b"{\"a\":\"\\ud800\"}",
            b"[1e999]",
        ] {
            let refused = post(bytes::Bytes::from_static(bad)).await;
            assert_eq!(refused, 400, "{}", String::from_utf8_lossy(bad));
        }
        let exports = |n: usize| {
            let (post, payload) = (&post, payload.clone());
            async move {
                for _ in 0..n {
                    assert_eq!(post(payload.clone()).await, 200);
                }
            }
        };
        exports(300).await;
        let before = resident_kib(pid);
        assert!(before > 0);
        exports(3_000).await;
        let after = resident_kib(pid);
        assert_eq!(receiver.stop().await.lines().count(), 3_300);
        assert!(
            after < before + 8 * 1024,
            "resident memory grew from {before} KiB to {after} KiB over 3,000 exports of 8 KB"
        );
    })
    .await;
}
