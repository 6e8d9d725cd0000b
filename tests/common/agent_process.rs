//! The real `outpost run` as a child process, for the tests that talk to it over HTTP, its
//! socket and signals.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::binary;

/// A free port on 127.0.0.1 (bound, then released for the agent to take), never given out
/// before in this test process, and under Linux's ephemeral range (32768 and up). A test that
/// kills its agent and starts it again on the same port found it taken: the kernel handed it,
/// free meanwhile, to another test asking for a free port (whose agent then answered the
/// first test's health checks), or to an outgoing connection as its local port.
pub fn free_port() -> u16 {
    use rand::Rng;
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut rng = rand::thread_rng();
    loop {
        let port = rng.gen_range(20_000..32_768);
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
}

/// `GET /healthz` over a plain socket: the status code, if anything answered.
pub async fn healthz(addr: SocketAddr) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        Some(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()??;
    String::from_utf8_lossy(&answer)
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

/// A running `outpost run`; killed (SIGKILL) and reaped when dropped.
pub struct AgentProcess {
    child: Child,
    /// Where its ingest API listens.
    pub addr: SocketAddr,
    /// Its standard error.
    log: PathBuf,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl AgentProcess {
    /// Starts the binary on `config` (whose ingest API listens on 127.0.0.1:`port`) and waits
    /// until `GET /healthz` answers 200.
    pub async fn start(config: &Path, port: u16) -> AgentProcess {
        AgentProcess::start_with_env(config, port, &[]).await
    }

    /// Like [`AgentProcess::start`], with these extra environment variables (e.g.
    /// `OUTPOST_LOG`). Its standard error goes to a file beside `config`; [`AgentProcess::log`].
    /// Panics, showing that log, if the agent exits or `/healthz` does not answer 200 within
    /// 15 s.
    pub async fn start_with_env(config: &Path, port: u16, env: &[(&str, &str)]) -> AgentProcess {
        let mut agent = AgentProcess::spawn_with_env(config, port, env);
        agent.wait_until_healthy().await;
        agent
    }

    /// Waits until `GET /healthz` answers 200; panics, showing the log, if the agent exits or
    /// it does not within 15 s.
    pub async fn wait_until_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while healthz(self.addr).await != Some(200) {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "/healthz never answered 200:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the binary as [`AgentProcess::start_with_env`] does, without waiting for it.
    pub fn spawn_with_env(config: &Path, port: u16, env: &[(&str, &str)]) -> AgentProcess {
        let log = config.with_file_name(format!("agent-{port}-{}.log", next_number()));
        let child = Command::new(binary())
            .arg("run")
            .arg("--config")
            .arg(config)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        AgentProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
        }
    }

    /// Panics, showing the log, if the agent has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the agent exited with {status}:\n{}", self.log());
        }
    }

    /// The process id (for /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the agent wrote to standard error so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the agent's log holds `text`, 10 s at most.
    pub async fn wait_for_log(&self, text: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !self.log().contains(text) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {text:?} in the log in 10 s: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `signal` and waits (at most `within`) for the process to exit.
    pub async fn signal_and_wait(&mut self, signal: i32, within: Duration) -> ExitStatus {
        // SAFETY: kill(2) with the pid of our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
        self.wait_for_exit(within).await
    }

    /// Waits (at most `within`) for the process to exit by itself.
    pub async fn wait_for_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit within {within:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the process has not exited yet.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGTERM: the agent must exit 0 within 5 s.
    pub async fn terminate(&mut self) {
        let status = self
            .signal_and_wait(libc::SIGTERM, Duration::from_secs(5))
            .await;
        assert_eq!(status.code(), Some(0), "{}", self.log());
    }
}

/// A number not given out before in this test process (log file names).
fn next_number() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Polls `check` every 20 ms until it holds; after `seconds`, panics naming `what`, with the
/// agents' logs.
pub async fn wait_or_show(
    seconds: u64,
    what: &str,
    agents: &[&AgentProcess],
    mut check: impl AsyncFnMut() -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !check().await {
        if Instant::now() > deadline {
            let logs: Vec<String> = agents.iter().map(|a| a.log()).collect();
            panic!(
                "timed out waiting for {what}; agent logs:\n{}",
                logs.join("\n---\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fresh workspace (see [`super::Workspace::new`]) with its agent started, its ingest API
/// on a free port.
pub async fn workspace_with_agent() -> (super::Workspace, AgentProcess) {
    let port = free_port();
    let ws = super::Workspace::with_extra(&format!("[ingest]\nlisten = \"127.0.0.1:{port}\"\n"));
    let agent = AgentProcess::start(&ws.config_path(), port).await;
    (ws, agent)
}
