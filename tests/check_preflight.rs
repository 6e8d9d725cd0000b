//! `outpost check` checks this host before a run: the store folder can be written (and how much
//! space is left there), and `ingest.listen` is free. Every problem found is reported, with
//! what to do, and check exits 1.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};

use common::*;

fn check(ws: &Workspace, uid: Option<u32>) -> Output {
    let mut command = Command::new(binary());
    command
        .arg("check")
        .arg("--config")
        .arg(ws.config_path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(uid) = uid {
        command.uid(uid).gid(uid);
    }
    command.output().unwrap()
}

fn line<'a>(stdout: &'a str, key: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.starts_with(&format!("{key:<17}")))
        .unwrap_or_else(|| panic!("no {key} line:\n{stdout}"))
}

#[test]
fn a_writable_store_and_a_free_address() {
    let port = common::agent_process::free_port();
    let ws = Workspace::with_extra(&format!("[ingest]\nlisten = \"127.0.0.1:{port}\"\n"));
    let out = check(&ws, None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = line(&stdout, "store");
    let expected = format!("store            {} (writable, ", ws.store_path().display());
    assert!(store.starts_with(&expected), "{store}");
    assert!(
        store.contains(
            " free, created at the first run; 32.0 MiB for delivery, made at the next start)"
        ),
        "{store}"
    );
    assert!(!ws.store_path().exists(), "check created the store");
    assert_eq!(
        line(&stdout, "ingest"),
        format!("ingest           127.0.0.1:{port} (free)")
    );
    assert!(stdout.contains("check            ok"), "{stdout}");
    // The endpoint (port 9, nothing there) is looked for, and its absence said, though it
    // fails nothing: exports wait until it is there.
    assert!(
        stdout.contains(
            "warning          endpoint: nothing accepts connections at 127.0.0.1:9 (connection refused); exports wait in the outbox until it accepts them"
        ),
        "{stdout}"
    );
    // Once something listens there, so it says.
    let listening = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = std::fs::read_to_string(ws.config_path()).unwrap();
    let there = config.replace(
        "http://127.0.0.1:9/",
        &format!("http://{}/", listening.local_addr().unwrap()),
    );
    assert_ne!(there, config);
    std::fs::write(ws.config_path(), there).unwrap();
    let out = check(&ws, None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        line(&stdout, "endpoint TCP"),
        "endpoint TCP     accepts connections (no export sent)"
    );
    std::fs::write(ws.config_path(), config).unwrap();
    // Nothing is left behind in the folder it wrote to.
    let left: Vec<_> = std::fs::read_dir(ws.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".outpost-check"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn every_problem_is_reported_with_what_to_do() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let ws = Workspace::with_extra(&format!("[ingest]\nlisten = \"127.0.0.1:{port}\"\n"));
    // A store folder the agent's user cannot write: run as `nobody` when the test runs as
    // root, else make the folder read-only.
    let store = ws.store_path();
    std::fs::create_dir(&store).unwrap();
    let uid = if unsafe { libc::geteuid() } == 0 {
        std::fs::set_permissions(ws.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(ws.config_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        Some(65534)
    } else {
        std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o555)).unwrap();
        None
    };
    let out = check(&ws, uid);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert_eq!(
        line(&stdout, "store"),
        format!("store            {} (cannot be written)", store.display())
    );
    assert_eq!(
        line(&stdout, "ingest"),
        format!("ingest           127.0.0.1:{port} (cannot listen)")
    );
    assert!(!stdout.contains("check            ok"));
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("outpost: "))
        .collect();
    assert_eq!(errors.len(), 2, "{stderr}");
    assert!(
        errors[0].starts_with(&format!(
            "outpost: storage.path {}: cannot write the store there (permission denied)",
            store.display()
        )),
        "{stderr}"
    );
    assert!(
        errors[1].starts_with(&format!(
            "outpost: ingest.listen 127.0.0.1:{port}: the address is already in use"
        )),
        "{stderr}"
    );
}

/// The store's folder, made by outpost, is its owner's alone: it holds customers' profiles. One
/// that other users may read (made by hand, or chmod-ed) is warned of by `check` and at the
/// agent's start, with what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_other_users_may_read_is_warned_of() {
    let port = common::agent_process::free_port();
    let ws = Workspace::with_extra(&format!("[ingest]\nlisten = \"127.0.0.1:{port}\"\n"));
    let update = member_update("p-1", "A", "2026-01-01T00:00:01Z");
    ws.run_ok(&["ingest", "-"], Some(update.as_bytes()));
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&ws.store_path()), 0o700);
    let warned = "other users may read the store (its folder's mode is 755)";
    let out = check(&ws, None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("other users may read"), "{stdout}");

    std::fs::set_permissions(ws.store_path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = check(&ws, None);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        line(&stdout, "warning").contains(warned)
            && stdout.contains(&format!("chmod o-rwx {}", ws.store_path().display())),
        "{stdout}{stderr}"
    );
    let agent = common::agent_process::AgentProcess::start(&ws.config_path(), port).await;
    assert!(agent.log().contains(warned), "{}", agent.log());
    // A folder that is there is left as it is.
    assert_eq!(mode(&ws.store_path()), 0o755);
    drop(agent);
}

/// `outpost ARGS --config <ws>` with `env` set (and the tokens' variables cleared otherwise).
fn run_with_env(ws: &Workspace, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(binary());
    command
        .args(args)
        .arg("--config")
        .arg(ws.config_path())
        .env_remove("OUTPOST_TOKEN")
        .env_remove("OUTPOST_INGEST_TOKEN")
        .stdin(Stdio::null());
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

/// The static token and the ingest token may come from the environment (OUTPOST_TOKEN,
/// OUTPOST_INGEST_TOKEN), as the client secret may; set but empty is refused where needed,
/// and one the file gives too is warned of. Never shown.
#[test]
fn tokens_from_the_environment() {
    let port = common::agent_process::free_port();
    let ws = Workspace::with_extra(&format!("[ingest]\nlisten = \"127.0.0.1:{port}\"\n"));
    let config = std::fs::read_to_string(ws.config_path()).unwrap();
    let bearer = config.replace("type = \"none\"", "type = \"bearer\"");
    assert_ne!(bearer, config);
    std::fs::write(ws.config_path(), &bearer).unwrap();
    let texts = |out: &Output| {
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let out = run_with_env(&ws, &["check"], &[]);
    let (_, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("env OUTPOST_TOKEN"), "{stderr}");

    let out = run_with_env(&ws, &["check"], &[("OUTPOST_TOKEN", "t0ken-from-env")]);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        !line(&stdout, "ingest").contains("token required"),
        "{stdout}"
    );

    let both = [
        ("OUTPOST_TOKEN", "t0ken-from-env"),
        ("OUTPOST_INGEST_TOKEN", "ingest-from-env"),
    ];
    let out = run_with_env(&ws, &["check"], &both);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        line(&stdout, "ingest").contains("(token required)"),
        "{stdout}"
    );
    for secret in ["t0ken-from-env", "ingest-from-env"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{stdout}{stderr}"
        );
    }

    let empty = [
        ("OUTPOST_TOKEN", "t0ken-from-env"),
        ("OUTPOST_INGEST_TOKEN", ""),
    ];
    let out = run_with_env(&ws, &["check"], &empty);
    let (_, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("ingest.token: env OUTPOST_INGEST_TOKEN is set but empty"),
        "{stderr}"
    );
    // A command on the store needs neither token.
    let input = ws.path().join("one.ndjson");
    std::fs::write(&input, member_update("p-1", "A", "2026-01-01T00:00:01Z")).unwrap();
    let out = run_with_env(
        &ws,
        &["ingest", input.to_str().unwrap()],
        &[("OUTPOST_INGEST_TOKEN", "")],
    );
    assert!(out.status.success(), "{}", texts(&out).1);

    // Given in the file as well: the file's is used, and the variable's said to be unused.
    let inline = bearer.replace(
        "type = \"bearer\"",
        "type = \"bearer\"\ntoken = \"t0ken-in-file\"",
    );
    let inline = inline.replace("[ingest]\n", "[ingest]\ntoken = \"ingest-in-file\"\n");
    std::fs::write(ws.config_path(), &inline).unwrap();
    let out = run_with_env(&ws, &["check"], &both);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    for variable in ["OUTPOST_TOKEN", "OUTPOST_INGEST_TOKEN"] {
        assert!(
            stdout.contains(&format!("{variable} is set, but")),
            "{stdout}"
        );
    }
}

/// A file where the store folder would be is a problem `check` names, with the exit the
/// agent's start refuses it with: a configuration mistake, 2. The destination is checked all
/// the same.
#[test]
fn a_file_in_the_store_path_is_a_problem() {
    let ws = Workspace::new();
    std::fs::write(ws.store_path(), b"not a folder").unwrap();
    let out = check(&ws, None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(!stdout.contains("check            ok"), "{stdout}");
    assert!(stdout.contains("auth             none"), "{stdout}");
    assert!(
        stderr.contains(&format!(
            "storage.path {0}: a part of that path, {0}, is a file, not a folder",
            ws.store_path().display()
        )),
        "{stderr}"
    );
}

/// A NATS source that cannot be reached is one problem among the others, not the end of the
/// check.
#[test]
fn an_unreachable_nats_server_is_reported_with_the_other_problems() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let closed = common::agent_process::free_port();
    let ws = Workspace::with_extra(&format!(
        "[ingest]\nlisten = \"127.0.0.1:{port}\"\n\n[source.nats]\nservers = [\"nats://127.0.0.1:{closed}\"]\npartitions = 4\n"
    ));
    let out = check(&ws, None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert_eq!(
        line(&stdout, "stream"),
        "stream           not usable (the error below says why)"
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("outpost: "))
        .collect();
    assert_eq!(errors.len(), 2, "{stderr}");
    assert!(errors[0].contains("ingest.listen"), "{stderr}");
    assert!(
        errors[1].contains(&format!("127.0.0.1:{closed}")),
        "{stderr}"
    );
}

/// Files the config names that the agent could not use (the ingest API's certificate, the
/// destination's CA) are problems `check` names with the others, and exit 2, as the agent's
/// start would refuse them.
#[test]
fn files_the_agent_could_not_use_are_reported_with_the_other_problems() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let ws = Workspace::with_extra(&format!(
        "[ingest]\nlisten = \"127.0.0.1:{port}\"\ntls_cert_file = \"nope.pem\"\ntls_key_file = \"nope-key.pem\"\n"
    ));
    let config = std::fs::read_to_string(ws.config_path()).unwrap();
    let with_ca = config.replacen(
        "[destination]\n",
        "[destination]\nca_file = \"missing-ca.pem\"\n",
        1,
    );
    assert_ne!(with_ca, config);
    std::fs::write(ws.config_path(), with_ca).unwrap();
    let out = check(&ws, None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert_eq!(
        line(&stdout, "ingest TLS"),
        "ingest TLS       cannot be used"
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("outpost: "))
        .collect();
    assert_eq!(errors.len(), 3, "{stderr}");
    assert!(errors[0].contains("ingest.tls_cert_file: "), "{stderr}");
    assert!(errors[1].contains("destination.ca_file: "), "{stderr}");
    assert!(
        errors[2].contains(&format!("ingest.listen 127.0.0.1:{port}")),
        "{stderr}"
    );
    assert!(!ws.store_path().exists(), "check created the store");
}

/// What the config names is shown one line each, its control characters escaped: a
/// `destination.name` holding an escape sequence and a newline cleared the terminal and
/// forged a line of the report.
#[test]
fn control_characters_in_what_the_config_names_are_escaped() {
    let ws = Workspace::new();
    let config = std::fs::read_to_string(ws.config_path()).unwrap();
    let forged = config.replace(
        "name = \"test\"",
        "name = \"edge\\u001b[2J\\ncheck            ok\"",
    );
    assert_ne!(forged, config);
    std::fs::write(ws.config_path(), forged).unwrap();
    let out = check(&ws, None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains('\u{1b}'), "{stdout:?}");
    assert!(
        stdout.contains(r"edge\u{1b}[2J\ncheck            ok"),
        "{stdout}"
    );
    // The check's own verdict, and no other.
    assert_eq!(
        stdout
            .lines()
            .filter(|line| *line == "check            ok")
            .count(),
        1,
        "{stdout}"
    );
}

/// A mapping changed since the store last ran is told by `check`, with what the next start
/// does: a segment new to the store is backfilled, one left out is no longer exported.
#[test]
fn check_tells_what_a_changed_mapping_does_at_the_next_start() {
    let ws = Workspace::new();
    ws.run_ok(
        &["ingest", "-"],
        Some(member_update("p-1", "Jane", "2026-01-01T00:00:01Z").as_bytes()),
    );
    let unchanged = check(&ws, None);
    assert!(
        !String::from_utf8_lossy(&unchanged.stdout).contains("mapping change"),
        "{unchanged:?}"
    );
    let config = std::fs::read_to_string(ws.config_path()).unwrap();
    let changed = config.replace(&format!("\"{SEGMENT_B}\"]"), "\"seg-new\"]");
    assert_ne!(changed, config);
    std::fs::write(ws.config_path(), changed).unwrap();
    let out = check(&ws, None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "mapping change   segments newly mapped: \"seg-new\"; the next start exports each of their stored members once (backfill); segments no longer mapped: \"{SEGMENT_B}\""
        )),
        "{stdout}"
    );
}
