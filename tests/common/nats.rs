//! A real `nats-server -js` for the tests, on a free port with its own store folder.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::agent_process::free_port;

/// Where `nats-server` is, if installed. Env `OUTPOST_TEST_NATS_SERVER` names it instead (a
/// path that does not exist plays a machine without it).
fn nats_server_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("OUTPOST_TEST_NATS_SERVER") {
        let path = PathBuf::from(path);
        return path.is_file().then_some(path);
    }
    super::find_program("nats-server", &["/usr/sbin", "/usr/local/bin", "/usr/bin"])
}

/// `nats-server`, or `None` after saying why the test is skipped. Under CI (env `CI` set) a
/// missing server fails the test instead: CI installs it (`.ci/run`).
pub fn nats_server_or_skip(test: &str) -> Option<PathBuf> {
    super::installed_or_skip(test, nats_server_binary(), "nats-server", "nats-server")
}

/// A running `nats-server -js`; killed when dropped.
pub struct NatsServer {
    binary: PathBuf,
    /// Options besides JetStream, address, port and store (auth, TLS).
    args: Vec<String>,
    child: Option<Child>,
    pub port: u16,
    store: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server with JetStream on a free port; waits until it takes connections.
    pub fn start(binary: &Path) -> NatsServer {
        NatsServer::start_with(binary, &[])
    }

    /// [`NatsServer::start`] with more options (e.g. `--auth TOKEN`, `--tls …`).
    pub fn start_with(binary: &Path, args: &[&str]) -> NatsServer {
        let mut server = NatsServer {
            binary: binary.to_path_buf(),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
            port: free_port(),
            store: tempfile::tempdir().unwrap(),
        };
        server.launch();
        server
    }

    /// A JetStream context on a connection of the test's own.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        let client = async_nats::connect(self.url()).await.unwrap();
        async_nats::jetstream::new(client)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        let child = Command::new(&self.binary)
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(self.store.path())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server with SIGTERM, as a service manager would (its stream stays on disk).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) with the pid of our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `[source.nats]` table for a server.
pub fn nats_table(url: &str, partitions: u32, owned: &str, extra: &str) -> String {
    format!(
        "[source.nats]\nservers = [\"{url}\"]\nstream = \"UPDATES\"\nsubject_prefix = \"test.updates\"\npartitions = {partitions}\nowned = \"{owned}\"\n{extra}\n"
    )
}
