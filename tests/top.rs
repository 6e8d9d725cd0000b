//! `outpost top` against the real `outpost run`: `--once` prints the figures `/metrics`
//! serves, without an agent it says what to do and exits 1, and on a terminal it goes on
//! reading keys while the agent does not answer.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::agent_process::{free_port, workspace_with_agent, AgentProcess};
use common::*;
use outpost::receiver::{Receiver, ReceiverOptions, Reply};
use outpost::top::samples::Samples;
use outpost::top::view::{latency, quantile, LATENCY};

/// The value columns of the `--once` line of `group` and `key`.
fn figure<'a>(text: &'a str, group: &str, key: &str) -> Vec<&'a str> {
    let prefix = format!("{group:<11} {key:<18} ");
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?} in:\n{text}"));
    line[prefix.len()..].split_whitespace().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_once_prints_the_figures_of_metrics() {
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
        .await
        .unwrap();
    // Exports of profiles named bad… are refused: dead letters.
    receiver.set_export_script(Some(Arc::new(|_, r| {
        let profile = r.json().map(|p| profile_of(&p)).unwrap_or_default();
        if profile.starts_with("bad") {
            Reply::Status(400, vec![], "{\"error\":\"rejected\"}".into())
        } else {
            Reply::Normal
        }
    })));
    let ws = Workspace::new();
    let port = free_port();
    let base = receiver.base_url();
    let text = agent_config_text(&base, &oauth_body(&base), "")
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    std::fs::write(ws.config_path(), text).unwrap();
    let agent = AgentProcess::start(&ws.config_path(), port).await;

    let mut lines: Vec<String> = (0..12)
        .map(|i| member_update(&format!("p-{i}"), "Jane", "2026-01-01T00:00:01Z"))
        .collect();
    lines.push(member_update("bad-1", "Jane", "2026-01-01T00:00:01Z"));
    lines.push(member_update("bad-2", "Jane", "2026-01-01T00:00:01Z"));
    lines.push(member_update("p-0", "Jane", "2026-01-01T00:00:01Z")); // unchanged
    lines.push(member_update("p-1", "Old", "2025-01-01T00:00:00Z")); // stale
    let (status, body) = http_post(agent.addr, "/v1/updates", lines.join("\n"), &[]).await;
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats: serde_json::Value =
            serde_json::from_str(&ws.run_ok(&["outbox", "stats", "--json"], None)).unwrap();
        if stats["pending"] == 0 && stats["dead"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "never drained: {stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let top = ws.run_ok(&["top", "--once", "--interval", "0.3"], None);
    let (status, metrics) = http_get(agent.addr, "/metrics").await;
    assert_eq!(status, 200);
    let m = Samples::parse(&metrics).unwrap();
    let total = |group, key| figure(&top, group, key)[1].parse::<f64>().unwrap();
    for (group, name, label, value) in [
        ("updates", "outpost_updates_total", "result", "exported"),
        ("updates", "outpost_updates_total", "result", "unchanged"),
        ("updates", "outpost_updates_total", "result", "stale"),
        ("exports", "outpost_exports_total", "reason", "segment"),
        (
            "deliveries",
            "outpost_deliveries_total",
            "outcome",
            "delivered",
        ),
        ("deliveries", "outpost_deliveries_total", "outcome", "dead"),
    ] {
        assert_eq!(
            total(group, value),
            m.labelled(name, label, value),
            "{group} {value}:\n{top}\n{metrics}"
        );
    }
    // The figures themselves, so that a /metrics that lost them fails too.
    assert_eq!(total("updates", "exported"), 14.0, "{top}");
    assert_eq!(total("updates", "unchanged"), 1.0);
    assert_eq!(total("updates", "stale"), 1.0);
    assert_eq!(total("deliveries", "delivered"), 12.0, "{top}");
    assert_eq!(total("deliveries", "dead"), 2.0);
    // Idle: nothing happened between the two readings.
    assert_eq!(figure(&top, "deliveries", "delivered")[0], "0.0", "{top}");
    assert_eq!(
        total("token", "requests"),
        m.value("outpost_token_fetches_total")
    );
    for (key, name) in [
        ("concurrency limit", "outpost_delivery_concurrency_limit"),
        ("in flight", "outpost_delivery_in_flight"),
        ("waiting for retry", "outpost_delivery_retry_waiting"),
    ] {
        assert_eq!(
            figure(&top, "delivery", key)[0].parse::<f64>().unwrap(),
            m.value(name),
            "{key}:\n{top}"
        );
    }
    assert_eq!(figure(&top, "delivery", "rate cap"), ["none"]);
    assert_eq!(m.value("outpost_delivery_rate_cap"), 0.0);
    assert_eq!(figure(&top, "delivery", "destination"), ["up"]);
    assert_eq!(figure(&top, "outbox", "pending"), ["0"]);
    assert_eq!(m.value("outpost_outbox_pending"), 0.0);
    assert_eq!(figure(&top, "outbox", "dead"), ["2"]);
    assert_eq!(m.value("outpost_outbox_dead"), 2.0);
    assert_eq!(
        figure(&top, "store", "profiles"),
        ["14"],
        "p-0 to p-11, bad-1, bad-2"
    );
    assert_eq!(m.value("outpost_profiles_stored"), 14.0);
    // Latency since start, from the same histogram /metrics serves.
    let buckets = m.buckets(LATENCY);
    assert!(m.value("outpost_delivery_latency_seconds_count") >= 12.0);
    let p50 = latency(quantile(0.5, &buckets));
    assert!(
        figure(&top, "latency", "p50")
            .join(" ")
            .ends_with(&format!("{p50} since start")),
        "{p50}:\n{top}"
    );
    // The token the agent holds (the receiver's tokens live an hour).
    let token = figure(&top, "token", "lifetime").join(" ");
    assert!(token.starts_with("expires in 59m"), "{token}");
    drop(agent);
}

#[test]
fn top_without_an_agent_says_what_to_do() {
    let ws = Workspace::new();
    let out = ws.run(&["top", "--once"], None);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "no agent is running on the store at {}",
            ws.store_path().display()
        )) && stderr.contains("start it with `outpost run`"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());

    let out = ws.run(&["top", "--interval", "0"], None);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("--interval must be between 0.1 and 60 seconds"));
}

/// `outpost top` on a pseudo-terminal beside a running agent, its first frame drawn.
struct TopOnATerminal {
    /// Its folder, kept while the test runs.
    _workspace: Workspace,
    agent: AgentProcess,
    /// The terminal's side a person types on; what top draws is read from it into `screen`.
    terminal: std::fs::File,
    /// top's side, kept to read the terminal's settings.
    theirs: std::os::fd::OwnedFd,
    top: KilledOnDrop,
    screen: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl TopOnATerminal {
    async fn start() -> TopOnATerminal {
        use std::io::Read;
        let (ws, agent) = workspace_with_agent().await;
        let (terminal, theirs) = pty();
        let top = KilledOnDrop(
            ws.command(&["top", "--interval", "0.2"])
                .stdin(theirs.try_clone().unwrap())
                .stdout(theirs.try_clone().unwrap())
                .stderr(theirs.try_clone().unwrap())
                .spawn()
                .unwrap(),
        );
        // What top draws, read as it comes so that it never waits to write.
        let screen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut reader = terminal.try_clone().unwrap();
        let drawn = screen.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                drawn.lock().unwrap().extend_from_slice(&buffer[..n]);
            }
        });
        let started = TopOnATerminal {
            _workspace: ws,
            agent,
            terminal,
            theirs,
            top,
            screen,
        };
        wait_until(20, "top's first frame", || started.shows("Outbox")).await;
        started
    }

    fn shows(&self, text: &str) -> bool {
        String::from_utf8_lossy(&self.screen.lock().unwrap()).contains(text)
    }

    /// top's exit status, once it ends within 5 s.
    async fn exit_within_5_s(&mut self, after: &str) -> std::process::ExitStatus {
        let asked = Instant::now();
        loop {
            if let Some(status) = self.top.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                asked.elapsed() < Duration::from_secs(5),
                "top did not end within 5 s of {after}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the terminal reads lines and echoes them again (raw mode turns both off).
    fn in_line_mode(&self) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: tcgetattr fills the termios it is given, from a descriptor this owns.
        let mut settings: libc::termios = unsafe { std::mem::zeroed() };
        assert_eq!(
            unsafe { libc::tcgetattr(self.theirs.as_raw_fd(), &mut settings) },
            0,
            "tcgetattr: {}",
            std::io::Error::last_os_error()
        );
        settings.c_lflag & (libc::ICANON | libc::ECHO) == (libc::ICANON | libc::ECHO)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_says_the_agent_does_not_answer_and_quits_at_once_meanwhile() {
    use std::io::Write;
    let mut on = TopOnATerminal::start().await;
    // A stopped agent accepts the connection but never answers.
    let stopped = i32::try_from(on.agent.pid()).unwrap();
    // SAFETY: plain kill(2) of the agent this test started.
    assert_eq!(unsafe { libc::kill(stopped, libc::SIGSTOP) }, 0);
    wait_until(15, "the notice that the agent does not answer", || {
        on.shows("no answer from the agent")
    })
    .await;
    on.terminal.write_all(b"q").unwrap();
    let status = on
        .exit_within_5_s("`q` while the agent did not answer")
        .await;
    assert!(status.success(), "{status:?}");
    assert!(on.in_line_mode(), "the terminal was left in raw mode");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(stopped, libc::SIGCONT) }, 0);
    on.agent.terminate().await;
}

/// Stopped by a signal (a service manager, `kill`), top gives the terminal back as it found
/// it rather than leave it in raw mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_stopped_by_sigterm_gives_the_terminal_back() {
    // SIGINT as another process sends it: in raw mode Ctrl-C is a key.
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let mut on = TopOnATerminal::start().await;
        assert!(
            !on.in_line_mode(),
            "top should have the terminal in raw mode"
        );
        let top = i32::try_from(on.top.0.id()).unwrap();
        // SAFETY: plain kill(2) of the process this test started.
        assert_eq!(unsafe { libc::kill(top, signal) }, 0);
        let status = on.exit_within_5_s(name).await;
        assert!(
            on.in_line_mode(),
            "{name}: the terminal was left in raw mode ({status:?})"
        );
        assert!(status.success(), "{name}: {status:?}");
        on.agent.terminate().await;
    }
}
