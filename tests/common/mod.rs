//! Helpers shared by the integration tests: a config in a temporary folder, the real binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const SEGMENT_A: &str = "7841ba61-23c1-4bb3-a495-00d3g5fe1e93";
pub const SEGMENT_B: &str = "59bd2fkd-3c48-4b18-bf56-4f5c5e6967ae";

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

    pub fn store_path(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Runs `outpost --config <ws> ARGS` with `stdin` as standard input.
    pub fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut child = Command::new(binary())
            .arg("--config")
            .arg(self.config_path())
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
            child.stdin.take().unwrap().write_all(input).unwrap();
        }
        child.wait_with_output().unwrap()
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
}

/// An update line for profile `id`: a member of SEGMENT_A with `first_name`.
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
