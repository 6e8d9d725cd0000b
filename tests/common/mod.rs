//! Helpers shared by the integration tests: a config in a temporary folder, the real binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub mod agent_process;
pub mod connect_proxy;
pub mod memory;
pub mod nats;
pub mod pki;
pub mod promql;

pub const SEGMENT_A: &str = "7841ba61-23c1-4bb3-a495-00d3g5fe1e93";
pub const SEGMENT_B: &str = "59bd2fkd-3c48-4b18-bf56-4f5c5e6967ae";

/// Whether the tests run under CI (env `CI` set, and not to `false` or `0`), where a test
/// that needs something missing (nats-server, libfaketime, root for a tmpfs) fails rather
/// than skips.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Whether this test runs as root, as it needs to run a command as another user (under CI it
/// must; elsewhere it is skipped).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        !in_ci(),
        "this test needs root (to run a command as another user)"
    );
    eprintln!("skipped: this test needs root, to run a command as another user");
    false
}

/// Sends SIGINT to `child` (an `outpost ingest` or `outpost publish`, its output piped) and
/// waits for it: it must exit 1 saying it was stopped. How many updates it says went through
/// before it stopped, and its stderr.
pub fn stop_with_sigint(child: std::process::Child) -> (u64, String) {
    // SAFETY: kill(2) with the id of a child not yet waited for.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let said = stderr
        .split("stopped by SIGINT or SIGTERM; the first ")
        .nth(1)
        .unwrap_or_else(|| panic!("{stderr}"));
    let count = said.split(' ').next().unwrap().parse().unwrap();
    (count, stderr)
}

/// Sends SIGINT to `command` (run with its input piped) once it reads `line` of its input and
/// waits for more, and checks that it ends at once, 130, saying that it stored or published
/// nothing: its standard output and error.
pub fn stop_while_it_reads_its_input(
    mut command: std::process::Command,
    line: &str,
) -> (String, String) {
    use std::io::Write;
    use std::time::{Duration, Instant};
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
    // Signalled once it catches SIGINT: before, the signal would end it as its default does.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !catches_sigint(child.id()) {
        assert!(
            Instant::now() < deadline,
            "SIGINT not caught 10 s after start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Read in by now, most likely, and the command waits for more.
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: kill(2) with the id of a child not yet waited for.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still reading its input 10 s after SIGINT: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("stopped by SIGINT or SIGTERM before it stored or published any update"),
        "{stderr}"
    );
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

/// Whether process `pid` has a handler for SIGINT (its `SigCgt` mask in `/proc`).
fn catches_sigint(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (libc::SIGINT - 1)) != 0)
}

/// The first of `dirs` (the `PATH`'s before them) that holds `program`.
pub fn find_program(program: &str, dirs: &[&str]) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(dirs.iter().map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// `found`, or `None` after saying why `test` is skipped: `program` is not installed (the
/// `package` that has it). Under CI it fails the test instead: `.ci/run` installs it.
pub fn installed_or_skip(
    test: &str,
    found: Option<PathBuf>,
    program: &str,
    package: &str,
) -> Option<PathBuf> {
    match found {
        Some(path) => Some(path),
        None if in_ci() => panic!(
            "{test}: {program} is not installed, and CI is set: `apt-get install -y {package}`"
        ),
        None => {
            // Written past the test harness's capture, so that the skip is seen.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: {program} is not installed (apt-get install -y {package}); set CI=true to make this a failure"
            );
            None
        }
    }
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_outpost")
}

/// A temporary folder with `outpost.toml` whose store is `<dir>/store`.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Workspace {
        Workspace::with_extra("")
    }

    /// `extra` is appended to the config (extra sections, e.g. `[delivery]`).
    pub fn with_extra(extra: &str) -> Workspace {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            r#"[destination]
name = "test"
http_endpoint = "http://127.0.0.1:9/profiles?source=edge"

[destination.auth]
type = "none"

[mapping]
attributes = ["person.name.firstName", "person.name.lastName", "personalEmail.address"]
segments = ["{SEGMENT_A}", "{SEGMENT_B}"]
identities = ["ecid", "email_lc_sha256"]

[storage]
path = "store"

{extra}
"#
        );
        std::fs::write(dir.path().join("outpost.toml"), config).unwrap();
        Workspace { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("outpost.toml")
    }

    /// [`outbox_stats`] of this workspace's config.
    pub fn outbox_stats(&self) -> serde_json::Value {
        outbox_stats(&self.config_path())
    }

    pub fn store_path(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// `outpost --config <ws> ARGS`, not started: for a caller that sets its environment or
    /// its pipes.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(binary());
        command.arg("--config").arg(self.config_path()).args(args);
        command
    }

    /// Runs `outpost --config <ws> ARGS` with `stdin` as standard input.
    pub fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        run_with_config(&self.config_path(), args, stdin)
    }

    /// Runs `outpost --config <ws> ARGS` and, once the command says it waits for the store,
    /// `meanwhile` (which lets go of what it waits for), however long the command took to get
    /// there; panics, showing its output, if it ends or takes 30 s without saying so.
    pub fn run_waiting_for_the_store<T>(
        &self,
        args: &[&str],
        meanwhile: impl FnOnce() -> T,
    ) -> (Output, T) {
        use std::io::{BufRead, Read};
        let mut child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            stdout.read_to_end(&mut bytes).unwrap();
            bytes
        });
        let (waiting, told) = std::sync::mpsc::channel();
        let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let stderr = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let mut line = Vec::new();
            while stderr.read_until(b'\n', &mut line).unwrap() > 0 {
                if String::from_utf8_lossy(&line).contains("waiting up to 30 s") {
                    let _ = waiting.send(());
                }
                bytes.append(&mut line);
            }
            bytes
        });
        let said = told.recv_timeout(std::time::Duration::from_secs(30));
        let meant = said.is_ok().then(meanwhile);
        let output = Output {
            status: child.wait().unwrap(),
            stdout: stdout.join().unwrap(),
            stderr: stderr.join().unwrap(),
        };
        match meant {
            Some(meant) => (output, meant),
            None => panic!("the command never said it waits for the store: {output:?}"),
        }
    }

    /// Runs and asserts exit 0; returns stdout.
    pub fn run_ok(&self, args: &[&str], stdin: Option<&[u8]>) -> String {
        let out = self.run(args, stdin);
        assert!(
            out.status.success(),
            "outpost {args:?} failed: {:?}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Makes the store, holding one profile (commands that inspect a store do not make one).
    pub fn make_store(&self) {
        let update = member_update("p-0", "x", "2026-01-01T00:00:01Z");
        self.run_ok(&["ingest", "-"], Some(update.as_bytes()));
    }
}

/// Runs `outpost --config CONFIG ARGS` with `stdin` as standard input.
pub fn run_with_config(config: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    run_wrapped(&[], config, args, stdin)
}

/// [`run_with_config`] started through `wrapper` (a program and its arguments, which then runs
/// outpost's binary with the rest: `setpriv …`, `sh -c '… exec "$0" "$@"'`); none: directly.
pub fn run_wrapped(wrapper: &[&str], config: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut command = match wrapper.split_first() {
        Some((program, wrapper_args)) => {
            let mut command = Command::new(program);
            command.args(wrapper_args).arg(binary());
            command
        }
        None => Command::new(binary()),
    };
    let mut child = command
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        use std::io::Write;
        // The command may exit before reading its input (e.g. on a locked store).
        let _ = child.stdin.take().unwrap().write_all(input);
    }
    child.wait_with_output().unwrap()
}

/// An update line for profile `id`: a member of SEGMENT_A with `first_name`.
/// `lines` parsed and pruned to what `mapping` keeps, as the committer gets them.
pub fn pruned_updates(
    lines: &[String],
    mapping: &outpost::config::Mapping,
) -> Vec<outpost::profile::Update> {
    let keep = outpost::profile::prune::KeepTree::for_mapping(mapping);
    let mut updates = outpost::profile::update::parse_body(lines.join("\n").as_bytes()).unwrap();
    for update in &mut updates {
        keep.prune(&mut update.profile);
    }
    updates
}

/// A store opened with sled alone. sled releases a store's lock from its own threads shortly
/// after the last handle is dropped, so a lock held a moment longer is waited for (10 s).
pub fn open_with_sled_alone(path: &Path) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::open(path) {
            Err(e) if e.to_string().contains("lock") && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            result => return result,
        }
    }
}

pub fn member_update(id: &str, first_name: &str, timestamp: &str) -> String {
    serde_json::json!({
        "id": id,
        "timestamp": timestamp,
        "profile": {
            "person": {"name": {"firstName": first_name, "lastName": "Doe"}},
            "identityMap": {"ecid": [{"id": format!("ecid-{id}")}]},
            "segmentMembership": {"ups": {SEGMENT_A: {"status": "realized", "lastQualificationTime": "2026-01-01T00:00:00Z"}}}
        }
    })
    .to_string()
}

pub fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The config of an agent in `dir` that delivers to `base` (a receiver's base URL).
/// `auth` is the `[destination.auth]` body; `delivery` extra `[delivery]` lines.
pub fn agent_config_text(base: &str, auth: &str, delivery: &str) -> String {
    let concurrency = if delivery.contains("concurrency") {
        ""
    } else {
        "max_concurrency = 4"
    };
    let timeout = if delivery.contains("request_timeout_ms") {
        ""
    } else {
        "request_timeout_ms = 500"
    };
    format!(
        r#"[destination]
name = "test"
http_endpoint = "{base}/profiles?source=edge"
custom_headers = "x-api-version:2,x-tenant:acme"

[destination.auth]
{auth}

[mapping]
attributes = ["person.name.firstName", "person.name.lastName"]
segments = ["{SEGMENT_A}", "{SEGMENT_B}"]
identities = ["ecid"]

[storage]
path = "store"
cache_bytes = 8388608

[ingest]
listen = "127.0.0.1:0"

[delivery]
{concurrency}
{timeout}
initial_backoff_ms = 20
max_backoff_ms = 200
{delivery}
"#
    )
}

pub fn oauth_body(base: &str) -> String {
    format!(
        "type = \"oauth2_client_credentials\"\nauth_endpoint = \"{base}/oauth/token\"\nclient_id = \"edge-agent\"\nclient_secret = \"change-me\""
    )
}

/// The profile an export is about, read from its payload (`identityMap.ecid[0].id` = `ecid-<id>`).
pub fn profile_of(payload: &serde_json::Value) -> String {
    payload["identityMap"]["ecid"][0]["id"]
        .as_str()
        .and_then(|s| s.strip_prefix("ecid-"))
        .unwrap_or("?")
        .to_owned()
}

/// The payloads a request carried: the items of an array body, or its one object.
pub fn payloads_of(request: &outpost::receiver::Received) -> Vec<serde_json::Value> {
    match request.json().unwrap() {
        serde_json::Value::Array(items) => items,
        single => vec![single],
    }
}

/// (profile, export id) of every export answered 2xx, array items included, in arrival order.
pub fn delivered_pairs(receiver: &outpost::receiver::Receiver) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    for request in receiver.delivered() {
        let keys: Vec<String> = request
            .header("idempotency-key")
            .unwrap()
            .split(',')
            .map(str::to_owned)
            .collect();
        let payloads = payloads_of(&request);
        assert_eq!(keys.len(), payloads.len(), "one key per item");
        for (key, payload) in keys.into_iter().zip(payloads) {
            pairs.push((profile_of(&payload), key));
        }
    }
    pairs
}

/// The sequence number in an export id `<store>-<seq>`.
pub fn seq_of(export_id: &str) -> u64 {
    export_id.rsplit('-').next().unwrap().parse().unwrap()
}

/// Asserts that, per profile, no export arrived after a newer one (by sequence number).
pub fn assert_per_profile_order(deliveries: &[(String, String)]) {
    let mut last: std::collections::HashMap<&str, u64> = Default::default();
    for (profile, id) in deliveries {
        let seq = seq_of(id);
        if let Some(&previous) = last.get(profile.as_str()) {
            assert!(
                seq >= previous,
                "profile {profile}: export {id} arrived after export seq {previous}"
            );
        }
        last.insert(profile, seq);
    }
}

/// A metric's value from an agent's `/metrics` text (the first line that starts with `name`),
/// 0 when it has none yet (a labelled sample appears once counted). Panics when the text
/// declares no family of that name: a metric renamed would otherwise read as 0 for good, and
/// a test comparing readings of it pass without measuring anything.
pub async fn metric(addr: std::net::SocketAddr, name: &str) -> f64 {
    let (_, text) = http_get(addr, "/metrics").await;
    assert!(
        declares_family_of(&text, name),
        "/metrics declares no family of `{name}`"
    );
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Whether `text` has a `# TYPE` line for the family `sample` (a name, labels after it or not)
/// is a sample of.
fn declares_family_of(text: &str, sample: &str) -> bool {
    let name = sample.split('{').next().unwrap_or(sample);
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .any(|family| {
            name == family
                || name.strip_prefix(family).is_some_and(|suffix| {
                    ["_total", "_count", "_sum", "_bucket", "_created"].contains(&suffix)
                })
        })
}

/// POSTs `body` to `http://addr{path}` and returns the status and the answer's body.
pub async fn http_post(
    addr: std::net::SocketAddr,
    path: &str,
    body: String,
    headers: &[(&str, &str)],
) -> (u16, String) {
    try_http_post(addr, path, body, headers).await.unwrap()
}

/// [`http_post`], with Err (the error, as text) if no whole answer came.
pub async fn try_http_post(
    addr: std::net::SocketAddr,
    path: &str,
    body: String,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut request = hyper::Request::post(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client
        .request(request.body(Full::new(bytes::Bytes::from(body))).unwrap())
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{e:?}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .get(format!("http://{addr}{path}").parse().unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Polls `check` every 20 ms until it holds, or panics after `seconds`.
pub async fn wait_until(seconds: u64, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The profile of each export the receiver took with a 2xx, in the order they came.
pub fn delivered_profiles(receiver: &outpost::receiver::Receiver) -> Vec<String> {
    receiver
        .delivered()
        .iter()
        .map(|r| profile_of(&r.json().unwrap()))
        .collect()
}

/// How many distinct exports (by `Idempotency-Key`) reached the receiver with a 2xx.
pub fn distinct_delivered(receiver: &outpost::receiver::Receiver) -> usize {
    let mut keys: Vec<String> = receiver
        .delivered()
        .iter()
        .map(|r| r.header("idempotency-key").unwrap().to_owned())
        .collect();
    keys.sort();
    keys.dedup();
    keys.len()
}

/// Waits (at most 30 s) until `exports` distinct exports reached the receiver with a 2xx and
/// the agent's outbox holds nothing pending.
pub async fn wait_drained(
    agent: &outpost::agent::Agent,
    receiver: &outpost::receiver::Receiver,
    exports: usize,
) {
    wait_until(30, "every export delivered", || {
        distinct_delivered(receiver) >= exports && agent.store.tally().unwrap().pending == 0
    })
    .await;
}

/// `outpost outbox stats --json --config CONFIG` (through the agent while one runs on the
/// store); `Null` when the command printed no JSON (its fields then compare as absent).
pub fn outbox_stats(config: &Path) -> serde_json::Value {
    let out = Command::new(binary())
        .args(["outbox", "stats", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// An agent's config in a temporary folder, delivering to a receiver started for it.
pub struct ReceiverSetup {
    pub _dir: tempfile::TempDir,
    pub config: outpost::config::Config,
    pub receiver: outpost::receiver::Receiver,
}

/// Starts a receiver with `options` and writes the agent's config for it: `auth` makes the
/// `[destination.auth]` body from the receiver's base URL, `delivery` adds `[delivery]` lines.
pub async fn receiver_setup(
    options: outpost::receiver::ReceiverOptions,
    auth: impl Fn(&str) -> String,
    delivery: &str,
) -> ReceiverSetup {
    let dir = tempfile::tempdir().unwrap();
    let receiver = outpost::receiver::Receiver::start("127.0.0.1:0".parse().unwrap(), options)
        .await
        .unwrap();
    let base = receiver.base_url();
    let path = dir.path().join("outpost.toml");
    std::fs::write(&path, agent_config_text(&base, &auth(&base), delivery)).unwrap();
    let config = outpost::config::Config::load(&path).unwrap();
    ReceiverSetup {
        _dir: dir,
        config,
        receiver,
    }
}

/// Starts the agent in this process, without backoff jitter (tests assert delays).
/// Runs an admin request on the agent's store as the admin socket does: off the runtime's
/// thread, since a put-back waits for the delivery loop (on this runtime) to have nothing out.
pub async fn admin_request(
    agent: &outpost::agent::Agent,
    request: outpost::admin::AdminRequest,
) -> serde_json::Value {
    let store = std::sync::Arc::clone(&agent.store);
    tokio::task::spawn_blocking(move || outpost::admin::execute(&store, &request))
        .await
        .unwrap()
        .unwrap()
}

pub async fn start_agent(config: &outpost::config::Config) -> outpost::agent::Agent {
    outpost::agent::Agent::start(config, outpost::agent::AgentOptions { jitter: false })
        .await
        .unwrap()
}

/// `VmRSS` of a process in KiB, 0 once it has ended.
pub fn resident_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A child process killed (and reaped) when this is dropped, also when a test fails early.
pub struct KilledOnDrop(pub std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A pseudo-terminal of 40 rows and 160 columns: its master side (what a person types is
/// written there, what the program draws is read there), and its slave side, to give a child
/// process as its terminal so that it asks as it would a person.
pub fn pty() -> (std::fs::File, std::os::fd::OwnedFd) {
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut master, mut slave) = (0, 0);
    let size = libc::winsize {
        ws_row: 40,
        ws_col: 160,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let opened = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(opened, 0, "openpty: {}", std::io::Error::last_os_error());
    unsafe {
        (
            std::fs::File::from(OwnedFd::from_raw_fd(master)),
            OwnedFd::from_raw_fd(slave),
        )
    }
}

/// Starts `outpost --config CONFIG ARGS` with a terminal as standard input (as a person runs
/// it, so that it asks before it acts), its output piped; the terminal's side to type on.
pub fn spawn_on_a_terminal(config: &Path, args: &[&str]) -> (std::fs::File, std::process::Child) {
    let (master, slave) = pty();
    let child = Command::new(binary())
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::from(slave))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (master, child)
}

/// Reads `stream` until what it sent ends with `[y/N] ` (a question waits); what it sent.
pub fn read_question(stream: &mut impl std::io::Read) -> String {
    let mut asked = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&asked).contains("[y/N]") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "{asked:?}");
        asked.push(byte[0]);
    }
    String::from_utf8_lossy(&asked).into_owned()
}

/// Copies folder `from` to `to` (replacing it), as a backup of a store is made or put back.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    if to.exists() {
        std::fs::remove_dir_all(to).unwrap();
    }
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
