//! A full disk, on a real small filesystem: the store on a tmpfs mounted for the test (needs
//! root; without it the test says why and passes, except under `CI`, where it fails).
//!
//! The real agent, its destination down, takes updates until the disk is full; then ingest
//! answers 503 with `Retry-After` and a plain message, and once a filler file on the tmpfs is
//! deleted it takes updates again and delivers everything, each export once, without a
//! restart, also when the disk filled as sled wrote a large profile to a file of its own;
//! SIGTERM exits 0. Then `outpost ingest` on a full disk fails with a clear message,
//! says how much it stored, and a second run stores the rest; a listing whose temporary
//! folder is full says so. Fed by NATS instead (needs
//! `nats-server`, as `tests/nats_fleet.rs`), a full disk loses no message either.

mod common;

use std::collections::HashMap;
use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::agent_process::{free_port, healthz, wait_or_show, AgentProcess};
use common::nats::{nats_server_or_skip, nats_table, NatsServer};
use common::*;
use outpost::receiver::{Receiver, ReceiverOptions};

/// A tmpfs mounted on a folder for the life of the value.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` on `dir`; `Err` says why not.
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }

    fn available_bytes(&self) -> u64 {
        let path = CString::new(self.dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: statvfs(3) fills the struct we pass; the path is NUL-terminated.
        unsafe {
            let mut stat: libc::statvfs = std::mem::zeroed();
            assert_eq!(libc::statvfs(path.as_ptr(), &mut stat), 0);
            stat.f_bavail as u64 * stat.f_frsize as u64
        }
    }

    /// Fills the filesystem with `filler` until `leave` bytes are left (or it is full).
    fn fill(&self, leave: u64) -> PathBuf {
        let path = self.dir.join("filler");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let chunk = vec![7u8; 64 << 10];
        while self.available_bytes() > leave + chunk.len() as u64 {
            if file.write_all(&chunk).is_err() {
                break;
            }
            file.flush().unwrap();
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Said, not asserted: a panic here, while a failed test unwinds, would abort.
        match Command::new("umount").arg(&self.dir).status() {
            Ok(status) if status.success() => {}
            other => eprintln!(
                "umount {} failed ({other:?}): the tmpfs is left mounted",
                self.dir.display()
            ),
        }
    }
}

/// Mounts the tmpfs, or says why it cannot and returns `None` (panics under `CI`).
fn tmpfs_or_skip(dir: &Path, size: &str) -> Option<Tmpfs> {
    match Tmpfs::mount(dir, size) {
        Ok(fs) => Some(fs),
        Err(why) if in_ci() => {
            panic!("the disk-full test needs a tmpfs (run as root): {why}")
        }
        Err(why) => {
            eprintln!("skipped: the disk-full test needs to mount a tmpfs (run as root): {why}");
            None
        }
    }
}

/// Update of profile `id`, with a long first name so the disk fills in a few hundred updates.
fn update(id: &str) -> String {
    member_update(
        id,
        &format!("{id}-{}", "x".repeat(1500)),
        "2026-01-01T00:00:00Z",
    )
}

fn config_text(base: &str, listen: &str, store: &Path) -> String {
    agent_config_text(base, &oauth_body(base), "")
        .replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{listen}\""),
        )
        .replace(
            "path = \"store\"",
            &format!("path = {:?}", store.display().to_string()),
        )
}

fn assert_plain_no_space(text: &str, store: &Path) {
    let expected = format!(
        "no space left on device for the store at {}",
        store.display()
    );
    assert!(text.contains(&expected), "{text}");
    assert!(!text.contains("Os {"), "a debug string: {text}");
}

/// An agent whose store is on a fresh 24 MiB tmpfs, filled up to 3 MiB left by `filler`, and
/// whose destination answers 503. Fields drop in order: the agent is killed before the
/// tmpfs is unmounted.
struct FullDisk {
    agent: AgentProcess,
    receiver: Receiver,
    config: PathBuf,
    store: PathBuf,
    filler: PathBuf,
    _fs: Tmpfs,
    _dir: tempfile::TempDir,
}

/// [`FullDisk`], or `None` when no tmpfs can be mounted (see [`tmpfs_or_skip`]).
async fn agent_on_a_small_disk() -> Option<FullDisk> {
    let dir = tempfile::tempdir().unwrap();
    let fs = tmpfs_or_skip(&dir.path().join("fs"), "24m")?;
    let store = fs.dir.join("store");
    let (receiver, port, config) = a_destination_down(dir.path(), &store, "").await;
    let agent = AgentProcess::start(&config, port).await;
    let filler = fs.fill(3 << 20);
    Some(FullDisk {
        agent,
        receiver,
        config,
        store,
        filler,
        _fs: fs,
        _dir: dir,
    })
}

/// A receiver that answers 503, and the config of an agent delivering to it, listening on the
/// port returned, with its store at `store` and `storage_lines` added to `[storage]`.
async fn a_destination_down(
    dir: &Path,
    store: &Path,
    storage_lines: &str,
) -> (Receiver, u16, PathBuf) {
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
        .await
        .unwrap();
    receiver.set_export_script(Some(outpost::receiver::down()));
    let port = free_port();
    let config = dir.join("outpost.toml");
    let text = config_text(&receiver.base_url(), &format!("127.0.0.1:{port}"), store);
    let path_line = format!("path = {:?}", store.display().to_string());
    let with_lines = text.replace(&path_line, &format!("{path_line}\n{storage_lines}"));
    assert_ne!(with_lines, text, "the store's path line is where it was");
    std::fs::write(&config, with_lines).unwrap();
    (receiver, port, config)
}

/// Batch `n` of 10 updates (profiles `p{10n}` to `p{10n+9}`).
fn batch(n: usize) -> String {
    (n * 10..n * 10 + 10)
        .map(|i| update(&format!("p{i}")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Update `n` alone, of profile `p{n}`, whose first name is longer than a quarter of sled's
/// 512 KiB log segment: sled writes it to a blob file of its own.
fn large_update(n: usize) -> String {
    let id = format!("p{n}");
    member_update(
        &id,
        &format!("{id}-{}", "x".repeat(300_000)),
        "2026-01-01T00:00:00Z",
    )
}

/// Posts batches until ingest answers 503; returns how many were acknowledged and the 503's
/// `Retry-After` and body.
async fn post_until_full(agent: &AgentProcess) -> (usize, (Option<String>, String)) {
    post_until_full_with(agent, batch).await
}

/// [`post_until_full`], request `n` made by `request(n)`.
async fn post_until_full_with(
    agent: &AgentProcess,
    request: fn(usize) -> String,
) -> (usize, (Option<String>, String)) {
    let mut acked = 0;
    loop {
        let (status, body) = http_post_full(agent.addr, request(acked)).await;
        match status {
            200 => acked += 1,
            503 => return (acked, body),
            other => panic!("ingest answered {other}: {}", body.1),
        }
        assert!(acked < 2000, "the disk never filled:\n{}", agent.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_updates_then_recovers_without_a_restart() {
    // Bound whole: the fields not used here (the tmpfs) must live until the end.
    let Some(mut disk) = agent_on_a_small_disk().await else {
        return;
    };
    let FullDisk {
        agent,
        receiver,
        store,
        filler,
        ..
    } = &mut disk;
    let addr = agent.addr;
    let (acked, refused) = post_until_full(agent).await;
    assert!(acked > 0, "the disk was full before the first update");
    let (retry_after, message) = refused;
    assert_eq!(retry_after.as_deref(), Some("5"), "{message}");
    assert_plain_no_space(&message, store);
    // Still refused while full, with the same answer.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (status, (retry_after, message)) = http_post_full(addr, batch(acked)).await;
        assert_eq!(
            (status, retry_after.as_deref()),
            (503, Some("5")),
            "{message}"
        );
        assert_plain_no_space(&message, store);
    }
    assert_eq!(healthz(addr).await, Some(503), "not healthy while full");
    std::fs::remove_file(&filler).unwrap();
    takes_updates_again_and_delivers_each_once(agent, receiver, acked, batch, 10).await;
}

/// sled writes a large value to a blob file of its own, and one that found the disk full
/// left the log waiting for it for good: the agent's reopen, which closes the old handles,
/// waited with it, so the store was never reopened, updates were refused and deliveries
/// went unrecorded until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_met_writing_a_large_profile_is_reopened_once_there_is_room() {
    let Some(mut disk) = agent_on_a_small_disk().await else {
        return;
    };
    let FullDisk {
        agent,
        receiver,
        filler,
        ..
    } = &mut disk;
    let (acked, _) = post_until_full_with(agent, large_update).await;
    assert!(acked > 0, "the disk was full before the first update");
    std::fs::remove_file(&filler).unwrap();
    takes_updates_again_and_delivers_each_once(agent, receiver, acked, large_update, 1).await;
}

/// Once room was made on the full disk, with `acked` requests taken before it filled (request
/// `n` made by `request(n)`, `profiles_each` profiles a request, `p0` onwards): the agent
/// takes updates again by itself, and once its destination is back delivers every
/// acknowledged update, each export once; then it is stopped.
async fn takes_updates_again_and_delivers_each_once(
    agent: &mut AgentProcess,
    receiver: &Receiver,
    mut acked: usize,
    request: fn(usize) -> String,
    profiles_each: usize,
) {
    let addr = agent.addr;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, (_, message)) = http_post_full(addr, request(acked)).await;
        if status == 200 {
            acked += 1;
            break;
        }
        assert_eq!(status, 503, "{message}");
        assert!(
            Instant::now() < deadline,
            "ingest did not resume once there was room:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..3 {
        let (status, (_, message)) = http_post_full(addr, request(acked)).await;
        assert_eq!(status, 200, "{message}");
        acked += 1;
    }
    assert_eq!(healthz(addr).await, Some(200), "healthy once reopened");

    // The destination is back: every acknowledged update arrives, each export once.
    receiver.set_export_script(None);
    let profiles = acked * profiles_each;
    let deadline = Instant::now() + Duration::from_secs(60);
    while receiver.delivered().len() < profiles {
        assert!(
            Instant::now() < deadline,
            "{} of {profiles} delivered:\n{}",
            receiver.delivered().len(),
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut per_profile: HashMap<String, usize> = HashMap::new();
    for r in receiver.delivered() {
        *per_profile
            .entry(profile_of(&r.json().unwrap()))
            .or_default() += 1;
    }
    for i in 0..profiles {
        assert_eq!(
            per_profile.get(&format!("p{i}")).copied(),
            Some(1),
            "profile p{i}: deliveries"
        );
    }
    assert_eq!(per_profile.len(), profiles, "{per_profile:?}");
    agent.terminate().await;
    let log = agent.log();
    assert!(log.contains("the store was reopened"), "{log}");
}

/// Fed by a NATS stream, a full disk loses no message: a partition whose commit failed starts
/// again from the position on the disk once the store is reopened, not from the one the
/// failed write left in sled's memory (a consumer started there skipped the messages of the
/// failed commit for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_a_nats_feed_loses_no_message() {
    let Some(server_bin) = nats_server_or_skip("a_full_disk_under_a_nats_feed") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = tmpfs_or_skip(&dir.path().join("fs"), "24m") else {
        return;
    };
    let server = NatsServer::start(&server_bin);
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
        .await
        .unwrap();
    let port = free_port();
    let config = dir.path().join("outpost.toml");
    let text = config_text(
        &receiver.base_url(),
        &format!("127.0.0.1:{port}"),
        &fs.dir.join("store"),
    );
    let nats = nats_table(&server.url(), 4, "0-3", "");
    std::fs::write(&config, format!("{text}\n{nats}")).unwrap();
    let cli = |args: &[&str]| {
        let out = run_with_config(&config, args, None);
        assert!(
            out.status.success(),
            "outpost {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let publish = |profiles: std::ops::Range<usize>| {
        let file = dir.path().join("updates.ndjson");
        let lines: Vec<String> = profiles.map(|i| update(&format!("p{i}"))).collect();
        std::fs::write(&file, lines.join("\n")).unwrap();
        cli(&["publish", file.to_str().unwrap()]);
    };
    cli(&["nats", "setup"]);
    let agent = AgentProcess::start(&config, port).await;
    const BATCH: usize = 40;
    publish(0..BATCH);
    all_delivered(&receiver, &agent, BATCH, "before the disk filled").await;

    // Nothing else writes now, so the commit of the next messages is what meets the full disk.
    let filler = fs.fill(0);
    publish(BATCH..2 * BATCH);
    wait_until_healthz(&agent, 503, "the store to fail on the full disk").await;
    // The partitions whose commit failed start over while the store is failed; then they
    // have no message left to take until the reopen.
    tokio::time::sleep(Duration::from_secs(2)).await;
    std::fs::remove_file(&filler).unwrap();
    wait_until_healthz(&agent, 200, "the store to be reopened").await;
    publish(2 * BATCH..3 * BATCH);
    all_delivered(&receiver, &agent, 3 * BATCH, "after the reopen").await;
}

/// Waits (at most 60 s) until profiles `p0` to `p{profiles - 1}` each had an export delivered.
async fn all_delivered(receiver: &Receiver, agent: &AgentProcess, profiles: usize, what: &str) {
    let what = format!("{what}: profiles p0 to p{} delivered", profiles - 1);
    wait_or_show(60, &what, &[agent], async || {
        let delivered: std::collections::HashSet<String> =
            delivered_profiles(receiver).into_iter().collect();
        (0..profiles).all(|i| delivered.contains(&format!("p{i}")))
    })
    .await;
}

async fn wait_until_healthz(agent: &AgentProcess, status: u16, what: &str) {
    wait_or_show(60, what, &[agent], async || {
        healthz(agent.addr).await == Some(status)
    })
    .await;
}

/// SIGTERM while the disk is still full: exit 0 (everything acknowledged was flushed when it
/// was acknowledged). Started again on the full disk, the agent waits for room, and once there
/// is room it starts and finds every acknowledged update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_disk_is_full_exits_0() {
    let Some(mut disk) = agent_on_a_small_disk().await else {
        return;
    };
    let FullDisk {
        agent,
        config,
        filler,
        ..
    } = &mut disk;
    let (acked, _) = post_until_full(agent).await;
    agent.terminate().await;
    let log = agent.log();
    assert!(log.contains("nothing acknowledged is lost"), "{log}");

    // Started again on the full disk, it waits for room rather than exit (a SIGTERM meanwhile
    // stops it, exit 0), and starts once there is room.
    let waiting_for_room = async |again: &AgentProcess| {
        wait_or_show(30, "the agent to wait for room", &[again], async || {
            again.log().contains("waiting for room to start")
        })
        .await;
    };
    let mut stopped = AgentProcess::spawn_with_env(config, agent.addr.port(), &[]);
    waiting_for_room(&stopped).await;
    let status = stopped
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(10))
        .await;
    assert_eq!(status.code(), Some(0), "{}", stopped.log());
    let mut again = AgentProcess::spawn_with_env(config, agent.addr.port(), &[]);
    waiting_for_room(&again).await;
    again.assert_running();
    assert_eq!(healthz(again.addr).await, None, "serving before it started");
    assert!(
        again
            .log()
            .contains("no space left on device for the store"),
        "{}",
        again.log()
    );
    std::fs::remove_file(&filler).unwrap();
    again.wait_until_healthy().await;
    assert!(again
        .log()
        .contains("there is room on the disk again: the store is open"));
    again.terminate().await;

    let stats = outbox_stats(config);
    assert!(
        stats["pending"].as_u64().unwrap() >= acked as u64 * 10,
        "every acknowledged update kept its export: {stats}, {acked} batches"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outpost_ingest_on_a_full_disk_says_what_was_stored() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = tmpfs_or_skip(&dir.path().join("fs"), "64m") else {
        return;
    };
    let store = fs.dir.join("store");
    let config = dir.path().join("outpost.toml");
    std::fs::write(
        &config,
        config_text("http://127.0.0.1:9", "127.0.0.1:0", &store),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(binary())
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .unwrap()
    };
    let count = 2500;
    let input = dir.path().join("updates.ndjson");
    let lines: Vec<String> = (0..count).map(|i| update(&format!("p{i}"))).collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    // The store made before the disk fills.
    drop(outpost::store::Store::open(&store, 8 << 20).unwrap());
    let filler = fs.fill(3 << 20);

    let out = run(&["ingest", input.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("outpost: "), "{stderr}");
    assert_plain_no_space(last, &store);
    // The chunk whose write met the full disk may be on it all the same.
    assert!(
        stderr.contains("may have been") && stderr.contains("the rest not"),
        "{stderr}"
    );

    std::fs::remove_file(&filler).unwrap();
    let out = run(&["ingest", input.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["outbox", "stats", "--json"]);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        stats["pending"], count,
        "each update exported once: {stats}"
    );
    assert_eq!(stats["profiles"], count, "{stats}");
}

/// POSTs updates; the status, `Retry-After` and the body.
async fn http_post_full(
    addr: std::net::SocketAddr,
    body: String,
) -> (u16, (Option<String>, String)) {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = hyper::Request::post(format!("http://{addr}/v1/updates"))
        .body(Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        (retry_after, String::from_utf8_lossy(&body).into_owned()),
    )
}

/// `outbox list` on the store spools its rows to a temporary file: a full temporary folder is
/// named as such, not taken for the output's disk.
#[test]
fn a_listing_whose_temporary_folder_is_full_says_which_disk_is() {
    let ws = Workspace::new();
    let input: Vec<String> = (0..200).map(|n| update(&format!("p-{n}"))).collect();
    ws.run_ok(&["ingest", "-"], Some(input.join("\n").as_bytes()));
    let tmp = tempfile::tempdir().unwrap();
    let Some(_fs) = tmpfs_or_skip(tmp.path(), "64k") else {
        return;
    };
    let out = ws
        .command(&["outbox", "list", "--json", "--limit", "0"])
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot write the listing's temporary file in {}: No space left on device (os error 28); free space there, or set TMPDIR",
            tmp.path().display()
        )),
        "{stderr}"
    );
}

/// The space a store on [`a_disk_with_a_reserve`] keeps for delivery.
const RESERVE: u64 = 4 << 20;

/// A store on a fresh 32 MiB tmpfs that keeps [`RESERVE`] for delivery, and a destination
/// that answers 503. Fields drop in order: the tmpfs is unmounted after the receiver stops.
struct ReservedDisk {
    receiver: Receiver,
    config: PathBuf,
    port: u16,
    store: PathBuf,
    fs: Tmpfs,
    _dir: tempfile::TempDir,
}

/// [`ReservedDisk`], or `None` when no tmpfs can be mounted (see [`tmpfs_or_skip`]).
async fn a_disk_with_a_reserve() -> Option<ReservedDisk> {
    let dir = tempfile::tempdir().unwrap();
    let fs = tmpfs_or_skip(&dir.path().join("fs"), "32m")?;
    let store = fs.dir.join("store");
    let (receiver, port, config) =
        a_destination_down(dir.path(), &store, &format!("reserve_bytes = {RESERVE}")).await;
    Some(ReservedDisk {
        receiver,
        config,
        port,
        store,
        fs,
        _dir: dir,
    })
}

/// A store that fills its disk itself (its destination down while updates keep coming) still
/// delivers everything it took once the destination is back: recording a delivery is a write,
/// and the space kept for delivery (`storage.reserve_bytes`) is given up for it. Updates stay
/// refused until there is room for that space again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_fills_its_disk_itself_delivers_all_it_took() {
    let Some(disk) = a_disk_with_a_reserve().await else {
        return;
    };
    let (fs, store, receiver) = (&disk.fs, &disk.store, &disk.receiver);
    let mut agent = AgentProcess::start(&disk.config, disk.port).await;
    // Other files leave the store 3 MiB, which its updates fill.
    let filler = fs.fill(3 << 20);
    let (acked, (_, message)) = post_until_full(&agent).await;
    assert!(acked > 0, "the disk was full before the first update");
    assert_plain_no_space(&message, store);

    // The destination is back: everything acknowledged arrives, though the disk stays full.
    receiver.set_export_script(None);
    let profiles = acked * 10;
    let deadline = Instant::now() + Duration::from_secs(60);
    let delivered = || -> std::collections::HashSet<String> {
        receiver
            .delivered()
            .iter()
            .map(|r| profile_of(&r.json().unwrap()))
            .collect()
    };
    while delivered().len() < profiles {
        assert!(
            Instant::now() < deadline,
            "{} of {profiles} profiles delivered:\n{}",
            delivered().len(),
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, (_, message)) = http_post_full(agent.addr, batch(acked)).await;
    assert_eq!(
        status, 503,
        "updates are refused while the disk is full: {message}"
    );
    assert_plain_no_space(&message, store);
    assert!(message.contains("storage.reserve_bytes"), "{message}");
    assert!(
        agent.log().contains("gave up the space kept for delivery"),
        "{}",
        agent.log()
    );

    // `outpost ingest` with no agent running refuses them too: they would take the room
    // delivery records in.
    agent.terminate().await;
    let file = disk.config.with_file_name("more.ndjson");
    std::fs::write(&file, batch(acked)).unwrap();
    let out = Command::new(binary())
        .args(["ingest", "--config"])
        .arg(&disk.config)
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("storage.reserve_bytes"), "{stderr}");
    let mut agent = AgentProcess::spawn_with_env(&disk.config, disk.port, &[]);
    wait_until_healthz(&agent, 503, "the agent started again on the full disk").await;
    assert_eq!(reserve_given_up(&disk.config), Some(true));

    // Room again: the space is kept again and updates are taken.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, (_, message)) = http_post_full(agent.addr, batch(acked)).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{message}");
        assert!(
            Instant::now() < deadline,
            "updates were not taken again:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        std::fs::metadata(store.join("reserve")).unwrap().len(),
        RESERVE
    );
    assert_eq!(reserve_given_up(&disk.config), Some(false));
    agent.terminate().await;
}

/// `reserve_given_up` of `outpost outbox stats --json`.
fn reserve_given_up(config: &Path) -> Option<bool> {
    let out = Command::new(binary())
        .args(["outbox", "stats", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    stats["reserve_given_up"].as_bool()
}

/// An agent started on a disk that filled while it was stopped gives up the space kept for
/// delivery to open its store, and delivers what the store holds; updates are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_on_a_full_disk_gives_up_its_reserve_and_delivers() {
    let Some(disk) = a_disk_with_a_reserve().await else {
        return;
    };
    let (fs, store, receiver) = (&disk.fs, &disk.store, &disk.receiver);
    let mut agent = AgentProcess::start(&disk.config, disk.port).await;
    for n in 0..5 {
        let (status, (_, message)) = http_post_full(agent.addr, batch(n)).await;
        assert_eq!(status, 200, "{message}");
    }
    agent.terminate().await;
    assert_eq!(
        std::fs::metadata(store.join("reserve")).unwrap().len(),
        RESERVE
    );
    fs.fill(0);

    receiver.set_export_script(None);
    let mut agent = AgentProcess::spawn_with_env(&disk.config, disk.port, &[]);
    wait_until_healthz(&agent, 503, "a full disk").await;
    all_delivered(receiver, &agent, 50, "from a full disk").await;
    let (status, (_, message)) = http_post_full(agent.addr, batch(5)).await;
    assert_eq!(status, 503, "{message}");
    assert_plain_no_space(&message, store);
    assert!(
        agent.log().contains("gave up the space kept for delivery"),
        "{}",
        agent.log()
    );
    agent.terminate().await;
}

/// A reserve too large for the room at the agent's start is made once there is room, in the
/// same run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_not_made_for_lack_of_room_is_made_once_there_is_room() {
    let Some(disk) = a_disk_with_a_reserve().await else {
        return;
    };
    // Under twice the reserve left.
    let filler = disk.fs.fill(6 << 20);
    let mut agent = AgentProcess::start(&disk.config, disk.port).await;
    let reserve = disk.store.join("reserve");
    assert!(!reserve.exists());
    assert!(agent.log().contains("is not made"), "{}", agent.log());
    std::fs::remove_file(&filler).unwrap();
    wait_or_show(20, "the reserve to be made", &[&agent], async || {
        std::fs::metadata(&reserve).is_ok_and(|m| m.len() == RESERVE)
    })
    .await;
    agent.terminate().await;
}
