//! The real `outpost run` under a wall clock that is wrong and then stepped, as on an edge host
//! that boots without a battery-backed clock and is corrected by NTP later.
//!
//! The agent runs with libfaketime preloaded, its wall clock offset by what a file in the test's
//! folder says (re-read every second, so a test steps the clock of a running agent).
//! `FAKETIME_DONT_FAKE_MONOTONIC=1`: libfaketime would otherwise also shift (and, when the file
//! changes, step) CLOCK_MONOTONIC, which no NTP step does; the agent's run time and timers must
//! see the monotonic clock a real host gives them. The receiver (and, where a test needs one,
//! the NATS server) runs on the real clock.
//!
//! Without libfaketime (Debian package `faketime`) these tests say so and skip, except under
//! CI (`CI` set to anything but `false`/`0`), where they fail: `.ci/run` installs it.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::agent_process::{free_port, AgentProcess};
use common::*;
use outpost::receiver::{Receiver, ReceiverOptions, Reply};
use serde_json::Value;

const DAY_S: i64 = 86_400;

/// Where Debian and others put libfaketime's multi-threaded library.
const LIBFAKETIME_PATHS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
    "/usr/local/lib/faketime/libfaketimeMT.so.1",
];

/// The library to preload; `None` (after saying why) when it is missing outside CI.
fn libfaketime() -> Option<PathBuf> {
    let given = std::env::var_os("OUTPOST_TEST_LIBFAKETIME").map(PathBuf::from);
    let found = given
        .into_iter()
        .chain(LIBFAKETIME_PATHS.iter().map(PathBuf::from))
        .find(|p| p.exists());
    if found.is_none() {
        let why = format!(
            "libfaketime is not installed (looked for {LIBFAKETIME_PATHS:?} and \
             $OUTPOST_TEST_LIBFAKETIME); `apt-get install faketime` provides it"
        );
        assert!(!in_ci(), "{why}; CI must run the clock tests");
        eprintln!("skipping: {why}");
    }
    found
}

/// The offset of the agent's wall clock, in a file libfaketime reads.
struct FakeClock {
    library: PathBuf,
    file: PathBuf,
}

impl FakeClock {
    fn new(library: PathBuf, dir: &Path, offset: &str) -> FakeClock {
        let clock = FakeClock {
            library,
            file: dir.join("faketime-offset"),
        };
        clock.set(offset);
        clock
    }

    /// Sets the offset from the real clock: "+0", "-10d", "+9d", ...
    fn set(&self, offset: &str) {
        std::fs::write(&self.file, format!("{offset}\n")).unwrap();
    }

    fn env(&self) -> Vec<(&str, &str)> {
        vec![
            ("LD_PRELOAD", self.library.to_str().unwrap()),
            ("FAKETIME_TIMESTAMP_FILE", self.file.to_str().unwrap()),
            ("FAKETIME_CACHE_DURATION", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ]
    }

    async fn start_agent(&self, ws: &Workspace, port: u16) -> AgentProcess {
        AgentProcess::start_with_env(&ws.config_path(), port, &self.env()).await
    }
}

/// How the receiver's profile endpoint answers.
const UP: u8 = 0;
/// 503 to every export.
const DOWN: u8 = 1;
/// No answer for an hour: the agent's request timeout must fire.
const STALLED: u8 = 2;

/// A receiver whose profile endpoint answers as `mode` says.
async fn receiver(mode: Arc<AtomicU8>) -> Receiver {
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
        .await
        .unwrap();
    receiver.set_export_script(Some(Arc::new(move |_, _| {
        match mode.load(Ordering::SeqCst) {
            DOWN => Reply::Status(503, vec![], "down for maintenance".into()),
            STALLED => Reply::Delay(Duration::from_secs(3600)),
            _ => Reply::Normal,
        }
    })));
    receiver
}

/// A workspace delivering to `receiver` with OAuth, ingest on `port`, and `delivery` lines.
fn workspace(receiver: &Receiver, port: u16, delivery: &str) -> Workspace {
    let ws = Workspace::new();
    let base = receiver.base_url();
    let config = agent_config_text(&base, &oauth_body(&base), delivery).replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    std::fs::write(ws.config_path(), config).unwrap();
    ws
}

/// `count` updates of distinct profiles (`prefix`-0, ...), each making one export.
async fn ingest(agent: &AgentProcess, prefix: &str, count: usize) {
    let body: Vec<String> = (0..count)
        .map(|i| member_update(&format!("{prefix}-{i}"), "Jane", "2020-01-01T00:00:00Z"))
        .collect();
    let (status, answer) = http_post(agent.addr, "/v1/updates", body.join("\n"), &[]).await;
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["exports"], count, "{answer}");
}

/// The value of a metric without labels in `/metrics`.
async fn metric(agent: &AgentProcess, name: &str) -> Option<f64> {
    let (_, text) = http_get(agent.addr, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn wait_for(seconds: u64, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Idempotency keys answered 2xx; asserts that none was delivered twice.
fn delivered_once(receiver: &Receiver) -> usize {
    let mut keys: Vec<String> = receiver
        .delivered()
        .iter()
        .map(|r| r.header("idempotency-key").unwrap().to_owned())
        .collect();
    let all = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), all, "an export was delivered twice");
    all
}

fn assert_jump_near(jump: &Value, by_s: i64) {
    let got = jump["by_s"].as_i64().unwrap_or_else(|| panic!("{jump}"));
    assert!(
        (by_s - 120..=by_s + 120).contains(&got),
        "{jump}, expected about {by_s} s"
    );
}

/// The case: 1,000 updates ingested while the clock was 10 days behind, then the agent
/// started with the clock right. Nothing expires (max_age_s is 1 day here), everything is
/// delivered, and the jump is reported once: log, /metrics, outbox stats, check.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exports_made_ten_days_behind_are_delivered_once_the_clock_is_right() {
    let Some(library) = libfaketime() else { return };
    let mode = Arc::new(AtomicU8::new(DOWN));
    let receiver = receiver(Arc::clone(&mode)).await;
    let port = free_port();
    let ws = workspace(&receiver, port, "max_age_s = 86400");
    let clock = FakeClock::new(library, ws.path(), "-10d");

    let mut agent = clock.start_agent(&ws, port).await;
    ingest(&agent, "p", 1000).await;
    wait_for(
        20,
        "delivery attempts while the destination is down",
        async || receiver.export_requests().len() >= 3,
    )
    .await;
    let s = ws.outbox_stats();
    assert_eq!(
        (s["pending"].as_u64(), s["dead"].as_u64()),
        (Some(1000), Some(0)),
        "{s}"
    );
    assert_eq!(s["clock_jumps"], 0, "{s}");
    agent.terminate().await;

    clock.set("+0");
    mode.store(UP, Ordering::SeqCst);
    let mut agent = clock.start_agent(&ws, port).await;
    wait_for(60, "all 1,000 exports delivered", async || {
        delivered_once(&receiver) >= 1000
    })
    .await;
    // The receiver counts an export when it answers; the agent removes it a moment later.
    wait_for(10, "the outbox emptied", async || {
        ws.outbox_stats()["pending"].as_u64() == Some(0)
    })
    .await;
    let s = ws.outbox_stats();
    assert_eq!(
        (s["pending"].as_u64(), s["dead"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );
    assert_eq!(s["clock_jumps"], 1, "{s}");
    assert_jump_near(&s["last_clock_jump"], 10 * DAY_S);
    assert_eq!(metric(&agent, "outpost_clock_jumps_total").await, Some(1.0));
    assert_eq!(
        metric(&agent, "outpost_deliveries_total{outcome=\"expired\"}").await,
        Some(0.0),
        "nothing expired"
    );

    let human = ws.run_ok(&["outbox", "stats"], None);
    // Ten days, give or take the milliseconds between reading the two clocks.
    assert!(
        human.contains("clock jumps      1 noticed; last: wall clock +10d 0h 0m")
            || human.contains("clock jumps      1 noticed; last: wall clock +9d 23h 59m"),
        "{human}"
    );
    let check = ws.run_ok(&["check"], None);
    assert!(check.contains("wall-clock jumps 1 noticed"), "{check}");
    agent.terminate().await;
    let log = agent.log();
    assert_eq!(log.matches("the wall clock jumped").count(), 1, "{log}");
    assert!(log.contains("since the agent last ran"), "{log}");
}

/// NTP steps the clock of a running agent: forward 10 days while the destination is down
/// (nothing expires, max_age_s being an hour), then back a day while it stalls. Every export
/// is delivered once, none twice, and the token (good for an hour) is not fetched again:
/// token lifetimes, backoff and request timeouts run on the monotonic clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clock_steps_while_running_neither_expire_nor_resend_anything() {
    let Some(library) = libfaketime() else { return };
    let mode = Arc::new(AtomicU8::new(DOWN));
    let receiver = receiver(Arc::clone(&mode)).await;
    let port = free_port();
    let ws = workspace(&receiver, port, "max_age_s = 3600");
    let clock = FakeClock::new(library, ws.path(), "+0");
    let mut agent = clock.start_agent(&ws, port).await;

    ingest(&agent, "a", 100).await;
    wait_for(
        20,
        "delivery attempts while the destination is down",
        async || receiver.export_requests().len() >= 3,
    )
    .await;
    clock.set("+10d");
    wait_for(20, "the forward jump noticed", async || {
        metric(&agent, "outpost_clock_jumps_total").await == Some(1.0)
    })
    .await;
    assert!(
        metric(&agent, "outpost_clock_last_jump_seconds")
            .await
            .unwrap()
            > 9.0 * DAY_S as f64
    );
    // Still retrying on the backoff schedule after the jump.
    let before = receiver.export_requests().len();
    wait_for(20, "retries after the jump", async || {
        receiver.export_requests().len() > before + 2
    })
    .await;
    mode.store(UP, Ordering::SeqCst);
    wait_for(30, "the first 100 delivered", async || {
        delivered_once(&receiver) >= 100
    })
    .await;

    clock.set("+9d");
    wait_for(20, "the backward jump noticed", async || {
        metric(&agent, "outpost_clock_jumps_total").await == Some(2.0)
    })
    .await;
    // A day back, the request timeout (500 ms) and the backoff still fire on time.
    mode.store(STALLED, Ordering::SeqCst);
    ingest(&agent, "b", 100).await;
    wait_for(20, "requests timed out after the step back", async || {
        agent.log().matches("timed out after 500ms").count() >= 2
    })
    .await;
    mode.store(UP, Ordering::SeqCst);
    wait_for(30, "the next 100 delivered", async || {
        delivered_once(&receiver) >= 200
    })
    .await;
    // Nothing more arrives: delivered exports are not sent again after the step back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(delivered_once(&receiver), 200);

    let s = ws.outbox_stats();
    assert_eq!(
        (s["pending"].as_u64(), s["dead"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );
    assert_eq!(s["clock_jumps"], 2, "{s}");
    assert_jump_near(&s["last_clock_jump"], -DAY_S);
    assert_eq!(receiver.tokens_issued(), 1, "one token, good for an hour");
    agent.terminate().await;
    let log = agent.log();
    assert_eq!(log.matches("the wall clock jumped").count(), 2, "{log}");
    assert!(
        log.contains("jumped +10d") && log.contains("jumped -1d"),
        "{log}"
    );
}

/// max_age_s still dead-letters an export that truly waited too long: 10 s of run time, most of
/// it in a first run, the rest after a restart with the clock set back a day (on which a
/// wall-clock age would never grow).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_age_counts_the_wait_across_a_restart() {
    let Some(library) = libfaketime() else { return };
    let receiver = receiver(Arc::new(AtomicU8::new(DOWN))).await;
    let port = free_port();
    let ws = workspace(&receiver, port, "max_age_s = 10");
    let clock = FakeClock::new(library, ws.path(), "+0");

    let mut agent = clock.start_agent(&ws, port).await;
    ingest(&agent, "p", 1).await;
    tokio::time::sleep(Duration::from_millis(7500)).await;
    let s = ws.outbox_stats();
    assert_eq!(
        (s["pending"].as_u64(), s["dead"].as_u64()),
        (Some(1), Some(0)),
        "{s}"
    );
    assert!(s["oldest_pending_waited_s"].as_u64().unwrap() >= 6, "{s}");
    agent.terminate().await;

    clock.set("-1d");
    let restarted = Instant::now();
    let mut agent = clock.start_agent(&ws, port).await;
    wait_for(20, "the export dead-lettered", async || {
        ws.outbox_stats()["dead"] == 1
    })
    .await;
    // About 2.5 s with the first run's wait counted, 10 s without; the margin is for a
    // loaded machine.
    let waited = restarted.elapsed();
    assert!(
        waited < Duration::from_millis(7000),
        "expired {waited:?} after the restart: the first run's wait was not counted"
    );
    let dead = json_lines(&ws.run_ok(&["outbox", "list", "--dead", "--json"], None));
    assert_eq!(dead.len(), 1);
    let error = dead[0]["last_error"].as_str().unwrap();
    assert!(error.contains("undelivered after max_age_s 10"), "{error}");
    let s = ws.outbox_stats();
    assert_eq!(s["clock_jumps"], 1, "the step back is reported: {s}");
    assert_jump_near(&s["last_clock_jump"], -DAY_S);
    agent.terminate().await;
}

/// An agent whose clock is days behind the stream's (an edge host booted without the right
/// time) takes updates stamped with the real time as too far ahead of its clock, but not of
/// the time the stream took them: they wait in the stream, none is rejected (a rejected
/// message is acknowledged and gone), and once NTP sets the clock right they are committed
/// and delivered, without a restart. Meanwhile the partition waits for the clock rather than
/// fetch them again every few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_updates_wait_while_the_agents_clock_is_days_behind() {
    let Some(library) = libfaketime() else { return };
    let Some(server_bin) = nats::nats_server_or_skip("stream_updates_wait_while_behind") else {
        return;
    };
    let server = nats::NatsServer::start(&server_bin);
    let receiver = receiver(Arc::new(AtomicU8::new(UP))).await;
    let port = free_port();
    let ws = workspace(&receiver, port, "");
    let mut config = std::fs::read_to_string(ws.config_path()).unwrap();
    config.push_str(&nats::nats_table(&server.url(), 1, "0", ""));
    std::fs::write(ws.config_path(), config).unwrap();
    ws.run_ok(&["nats", "setup"], None);
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let lines: Vec<String> = (0..3)
        .map(|i| member_update(&format!("p-{i}"), "Jane", &now))
        .collect();
    ws.run_ok(&["publish", "-"], Some(lines.join("\n").as_bytes()));

    let clock = FakeClock::new(library, ws.path(), "-3d");
    let mut agent = clock.start_agent(&ws, port).await;
    wait_for(30, "the partition to hold its updates back", async || {
        agent.log().contains("this host's clock may be behind")
    })
    .await;
    // While it waits, the partition's consumer is not made again (nor a batch fetched) every
    // few seconds on the backoff schedule: it waits for the clock.
    let consumer_made = || async {
        let client = async_nats::connect(server.url()).await.unwrap();
        let stream = async_nats::jetstream::new(client)
            .get_stream("UPDATES")
            .await
            .unwrap();
        stream.consumer_info("outpost-p0").await.unwrap().created
    };
    let made = consumer_made().await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(consumer_made().await, made, "the consumer was made again");
    let rejected = ws.run_ok(&["rejected", "list", "--json"], None);
    assert_eq!(rejected.trim(), "", "none rejected");
    assert_eq!(delivered_once(&receiver), 0);
    assert_eq!(ws.outbox_stats()["pending"], 0);

    clock.set("+0");
    wait_for(30, "the three updates delivered", async || {
        delivered_once(&receiver) == 3
    })
    .await;
    let rejected = ws.run_ok(&["rejected", "list", "--json"], None);
    assert_eq!(rejected.trim(), "", "none rejected");
    agent.terminate().await;
}
