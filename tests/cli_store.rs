//! The CLI straight on the store (no agent running): ingest, outbox inspection, profile show,
//! exit codes.

mod common;

use common::*;
use serde_json::json;
use std::io::Write;

#[test]
fn ingest_then_inspect_outbox_and_profile() {
    let ws = Workspace::new();
    let input = [
        member_update("p-1", "Jane", "2026-01-01T00:00:01Z"),
        member_update("p-2", "John", "2026-01-01T00:00:01Z"),
        member_update("p-1", "Janet", "2026-01-01T00:00:02Z"),
        // resend: unchanged
        member_update("p-1", "Janet", "2026-01-01T00:00:02Z"),
        // stale
        member_update("p-1", "Old", "2026-01-01T00:00:00Z"),
        r#"{"id":"p-2","op":"delete","timestamp":"2026-01-01T00:00:03Z"}"#.to_owned(),
    ]
    .join("\n");
    let out = ws.run_ok(&["ingest", "--json", "-"], Some(input.as_bytes()));
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["accepted"], 6);
    assert_eq!(summary["exports"], 4, "{summary}");
    assert_eq!(summary["unchanged"], 1);
    assert_eq!(summary["stale"], 1);
    assert_eq!(summary["deleted"], 1);
    assert_eq!(summary["exports_by_reason"]["segment"], 2);
    assert_eq!(summary["exports_by_reason"]["attribute"], 1);
    assert_eq!(summary["exports_by_reason"]["delete"], 1);

    let stats = ws.outbox_stats();
    assert_eq!(stats["pending"], 4);
    assert_eq!(stats["dead"], 0);
    assert_eq!(stats["profiles"], 1);

    let list = json_lines(&ws.run_ok(&["outbox", "list", "--json"], None));
    let reasons: Vec<_> = list.iter().map(|e| e["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["segment", "segment", "attribute", "delete"]);
    for export in &list {
        for key in [
            "id",
            "profile_id",
            "reason",
            "payload",
            "attempts",
            "created_at",
            "last_error",
            "dead",
        ] {
            assert!(export.get(key).is_some(), "{key} missing in {export}");
        }
        assert_eq!(export["dead"], false);
        assert_eq!(export["attempts"], 0);
    }
    assert_eq!(list[2]["payload"]["person"]["name"]["firstName"], "Janet");
    assert_eq!(
        list[3]["payload"]["segmentMembership"]["ups"][SEGMENT_A],
        json!({"status": "exited", "lastQualificationTime": "2026-01-01T00:00:03Z"})
    );

    let only_p1 = json_lines(&ws.run_ok(&["outbox", "list", "--json", "--profile", "p-1"], None));
    assert_eq!(only_p1.len(), 2);
    for (limit, listed, cut) in [("1", 1, true), ("4", 4, false)] {
        let out = ws.run(&["outbox", "list", "--json", "--limit", limit], None);
        assert!(out.status.success());
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(json_lines(&stdout).len(), listed, "{stdout}");
        let said = stderr.contains(&format!("the first {limit} shown; --limit 0 lists all"));
        assert_eq!(said, cut, "--limit {limit}: {stderr}");
    }
    let all = json_lines(&ws.run_ok(&["outbox", "list", "--json", "--limit", "0"], None));
    assert_eq!(all.len(), 4);

    // Retrying an export that is pending, not dead, changes nothing and is no failure.
    let pending_id = list[0]["id"].as_str().unwrap();
    let out = ws.run_ok(&["outbox", "retry", pending_id], None);
    assert_eq!(
        out.trim(),
        format!(
            "0 export(s) put back in the outbox\nalready pending (not dead letters), left as they are: {pending_id}"
        )
    );
    assert_eq!(ws.outbox_stats()["pending"], 4);

    let id = list[2]["id"].as_str().unwrap();
    let shown: serde_json::Value =
        serde_json::from_str(ws.run_ok(&["outbox", "show", id, "--json"], None).trim()).unwrap();
    assert_eq!(shown, list[2]);
    let human = ws.run_ok(&["outbox", "show", id], None);
    assert!(
        human.contains("attribute") && human.contains("Janet"),
        "{human}"
    );
    let table = ws.run_ok(&["outbox", "list"], None);
    assert_eq!(table.lines().count(), 5, "{table}");

    let profile: serde_json::Value = serde_json::from_str(
        ws.run_ok(&["profile", "show", "p-1", "--json"], None)
            .trim(),
    )
    .unwrap();
    assert_eq!(profile["timestamp"], "2026-01-01T00:00:02Z");
    assert_eq!(profile["profile"]["person"]["name"]["firstName"], "Janet");

    // Shown as precisely as it is judged: an update at 05.1 would be stale.
    let update = member_update("p-3", "Jo", "2026-01-01T00:00:05.25Z");
    ws.run_ok(&["ingest", "-"], Some(update.as_bytes()));
    let shown = ws.run_ok(&["profile", "show", "p-3", "--json"], None);
    let profile: serde_json::Value = serde_json::from_str(shown.trim()).unwrap();
    assert_eq!(profile["timestamp"], "2026-01-01T00:00:05.250Z");
}

/// A run that stops partway (here at a full outbox) says how many updates it stored, and
/// `--skip` that many stores the rest without applying the stored ones again: run whole, a
/// profile the input deletes would be made again by its earlier updates.
#[test]
fn a_run_stopped_partway_goes_on_with_skip() {
    let ws = Workspace::new();
    let config = std::fs::read_to_string(ws.config_path()).unwrap();
    let limited = config.replace("path = \"store\"", "path = \"store\"\nmax_outbox_bytes = 1");
    assert_ne!(limited, config);
    std::fs::write(ws.config_path(), &limited).unwrap();
    let mut lines = vec![
        member_update("gone", "Gina", "2026-01-01T00:00:01Z"),
        r#"{"id":"gone","op":"delete","timestamp":"2026-01-01T00:00:02Z"}"#.to_owned(),
    ];
    lines.extend((0..2498).map(|n| member_update(&format!("p-{n}"), "A", "2026-01-01T00:00:01Z")));
    let input = ws.path().join("updates.ndjson");
    std::fs::write(&input, lines.join("\n")).unwrap();
    let input = input.to_str().unwrap();

    let out = ws.run(&["ingest", "--json", input], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the first 1000 of 2500 updates were stored, the rest not")
            && stderr.contains("run the same input again with --skip 1000"),
        "{stderr}"
    );
    // With --json, a script reads the same on standard output.
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&said["stored"], &said["in_doubt"], &said["updates"]),
        (&json!(1000), &json!(0), &json!(2500)),
        "{said}"
    );
    assert!(stderr.contains(said["error"].as_str().unwrap()), "{said}");
    assert_eq!(ws.outbox_stats()["profiles"], 998);

    std::fs::write(ws.config_path(), &config).unwrap();
    // Past the end, with a store (and without: none is made).
    let elsewhere = Workspace::new();
    let out = elsewhere.run(&["ingest", "--skip", "2501", input], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(!elsewhere.store_path().exists());
    let out = ws.run(&["ingest", "--skip", "2501", input], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("--skip 2501: the input holds 2500 updates; nothing was stored"));
    // For a script: the input's updates, all of them taken for stored, not the skip.
    let out = ws.run(&["ingest", "--skip", "2501", "--json", input], None);
    assert_eq!(out.status.code(), Some(2));
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(said["stored"], 2500, "{said}");
    let summary: serde_json::Value =
        serde_json::from_str(&ws.run_ok(&["ingest", "--skip", "1000", "--json", input], None))
            .unwrap();
    assert_eq!(
        (summary["accepted"].as_u64(), summary["exports"].as_u64()),
        (Some(1500), Some(1500)),
        "{summary}"
    );
    assert_eq!(ws.outbox_stats()["profiles"], 2498);
    // The deleted profile was not made again: its two exports, the upsert and the delete.
    let gone = json_lines(&ws.run_ok(&["outbox", "list", "--profile", "gone", "--json"], None));
    let reasons: Vec<&str> = gone.iter().map(|e| e["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["segment", "delete"]);
}

#[test]
fn a_bad_line_refuses_the_whole_file_and_stores_nothing() {
    let ws = Workspace::new();
    let input = format!(
        "{}\n{}\n{{\"id\":\"p-3\",\"profile\":{{}},\"colour\":\"red\"}}\n",
        member_update("p-1", "A", "2026-01-01T00:00:01Z"),
        member_update("p-2", "B", "2026-01-01T00:00:01Z")
    );
    let path = ws.path().join("bad.ndjson");
    std::fs::write(&path, input).unwrap();
    let out = ws.run(&["ingest", "--json", path.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 3") && stderr.contains("colour"),
        "{stderr}"
    );
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(said["stored"], 0, "{said}");
    assert!(said["error"].as_str().unwrap().contains("line 3"), "{said}");
    assert!(
        !ws.store_path().exists(),
        "refused input made no store where there was none"
    );
    ws.make_store();
    let before = ws.outbox_stats();
    let out = ws.run(&["ingest", path.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    let stats = ws.outbox_stats();
    assert_eq!(stats["pending"], before["pending"]);
    assert_eq!(stats["profiles"], 1);
}

#[test]
fn exit_codes_for_usage_config_and_missing_things() {
    let ws = Workspace::new();
    // Inspecting a store that was never made (a mistyped storage.path) does not make one.
    for args in [
        &["outbox", "stats"][..],
        &["outbox", "list"],
        &["outbox", "retry", "--all-dead"],
        &["profile", "show", "nobody"],
        &["rejected", "list"],
        &["check", "--store"],
    ] {
        let out = ws.run(args, None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("no store at"), "{args:?}: {stderr}");
    }
    assert!(!ws.store_path().exists());
    ws.make_store();
    assert_eq!(
        ws.run(&["outbox", "frobnicate"], None).status.code(),
        Some(2)
    );
    assert_eq!(
        ws.run(&["outbox", "show", "not-an-id"], None).status.code(),
        Some(2)
    );
    assert_eq!(
        ws.run(&["outbox", "show", "00000000-1"], None)
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        ws.run(&["profile", "show", "nobody"], None).status.code(),
        Some(1)
    );

    // No config where it is looked for: said, with where outpost looks and how to start one.
    let out = std::process::Command::new(binary())
        .args(["outbox", "stats", "--config"])
        .arg(ws.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("missing.toml: No such file or directory")
            && stderr.contains("give --config PATH or set OUTPOST_CONFIG")
            && stderr.contains("cp data/outpost.example.toml outpost.toml"),
        "{stderr}"
    );

    std::fs::write(
        ws.config_path(),
        "[destination]\nhttp_endpoint = \"nope\"\n",
    )
    .unwrap();
    let out = ws.run(&["outbox", "stats"], None);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("mapping") || stderr.contains("http_endpoint"),
        "{stderr}"
    );

    let bad = Workspace::with_extra("[delivery]\nconcurrency = 0\n");
    let out = bad.run(&["outbox", "stats"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("delivery.concurrency"));
}

#[test]
fn config_path_is_accepted_after_the_subcommand_and_from_env() {
    let ws = Workspace::new();
    ws.make_store();
    let out = std::process::Command::new(binary())
        .args(["outbox", "stats", "--json", "--config"])
        .arg(ws.config_path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(binary())
        .args(["outbox", "stats", "--json"])
        .env("OUTPOST_CONFIG", ws.config_path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// 100,000 updates from a file are all stored and decided, with memory bounded: the file is
/// larger than the resident memory the ingest may use.
#[test]
fn ingest_of_100k_updates_is_streamed() {
    let ws = Workspace::new();
    let path = ws.path().join("big.ndjson");
    let padding = "x".repeat(2_000);
    {
        use std::io::Write;
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        for i in 0..100_000u32 {
            let mut line: serde_json::Value = serde_json::from_str(&member_update(
                &format!("p-{}", i % 20_000),
                &format!("n{i}"),
                "2026-01-01T00:00:01Z",
            ))
            .unwrap();
            line["profile"]["note"] = json!(padding);
            writeln!(file, "{line}").unwrap();
        }
    }
    let file_bytes = std::fs::metadata(&path).unwrap().len();
    assert!(file_bytes > 200 << 20, "{file_bytes}");
    let (out, peak) = run_measured(&ws, &["ingest", "--json", path.to_str().unwrap()]);
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["accepted"], 100_000);
    // 20,000 first sights qualify, then 4 attribute changes each.
    assert_eq!(summary["exports_by_reason"]["segment"], 20_000);
    assert_eq!(summary["exports_by_reason"]["attribute"], 80_000);
    eprintln!("peak RSS of the ingest: {peak} bytes, file {file_bytes} bytes");
    assert!(peak > 16 << 20, "{peak} bytes cannot be the ingest's peak");
    assert!(
        peak < file_bytes,
        "peak RSS {peak} is not below the file size {file_bytes}"
    );
}

/// Runs `outpost ARGS` in `ws`, asserts exit 0, and returns its stdout and its own peak
/// resident set: taken from wait4(2) for this child alone, so that children of other tests
/// running meanwhile in this process do not count.
#[allow(clippy::zombie_processes)] // reaped by wait4, which `Child` does not know of
fn run_measured(ws: &Workspace, args: &[&str]) -> (String, u64) {
    use std::io::Read;
    let mut child = ws
        .command(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read on threads, so that a full pipe cannot keep the child from exiting.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            pipe.read_to_string(&mut text).unwrap();
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: wait4 on our own child, filling the status and the struct it is given.
    let usage = unsafe {
        assert_eq!(libc::wait4(pid, &mut status, 0, usage.as_mut_ptr()), pid);
        usage.assume_init()
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "outpost {args:?} failed ({status}): {stderr}"
    );
    (stdout, usage.ru_maxrss as u64 * 1024)
}

/// The sample data and the example config in `data/` go together: the counts are the ones
/// `data/make_samples.py` derives from SPEC's rules line by line.
#[test]
fn sample_updates_give_the_documented_counts() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = dir.path().join("outpost.toml");
    std::fs::copy(manifest.join("data/outpost.example.toml"), &config).unwrap();
    let out = std::process::Command::new(binary())
        .arg("--config")
        .arg(&config)
        .args(["ingest", "--json"])
        .arg(manifest.join("data/sample-updates.ndjson"))
        .output()
        .unwrap();
    let summary = json_of_success(&out);
    assert_eq!(
        summary,
        json!({"accepted": 1529, "exports": 823, "unchanged": 662, "stale": 30, "deleted": 26,
               "exports_by_reason": {"segment": 487, "identity": 142, "attribute": 182, "delete": 12}})
    );
    assert!(
        dir.path().join("outpost-data").is_dir(),
        "the store path is relative to the config"
    );
}

/// Ingests updates of `n` new profiles `p-0`, `p-1`, …, each a member of a mapped segment:
/// `n` exports, in that order.
fn ingest_new_members(ws: &Workspace, n: usize) {
    let lines: Vec<String> = (0..n)
        .map(|i| member_update(&format!("p-{i}"), "x", "2026-01-01T00:00:01Z"))
        .collect();
    ws.run_ok(&["ingest", "-"], Some(lines.join("\n").as_bytes()));
}

/// A long list comes page by page (1,000 exports a request), so neither the agent nor the
/// CLI holds it whole; in order, each export once, cut where asked.
#[test]
fn a_long_outbox_lists_whole_and_in_order_across_pages() {
    let ws = Workspace::new();
    ingest_new_members(&ws, 2_500);
    let all = json_lines(&ws.run_ok(&["outbox", "list", "--json", "--limit", "0"], None));
    let profiles: Vec<String> = all
        .iter()
        .map(|e| e["profile_id"].as_str().unwrap().to_owned())
        .collect();
    let expected: Vec<String> = (0..2_500).map(|i| format!("p-{i}")).collect();
    assert_eq!(profiles, expected);
    let seqs: Vec<u64> = all
        .iter()
        .map(|e| seq_of(e["id"].as_str().unwrap()))
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "oldest first, each once"
    );
    for (limit, listed, cut) in [
        ("1000", 1_000, true),
        ("1500", 1_500, true),
        ("2500", 2_500, false),
    ] {
        let out = ws.run(&["outbox", "list", "--json", "--limit", limit], None);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(json_lines(&stdout).len(), listed, "--limit {limit}");
        assert_eq!(
            stderr.contains("--limit 0 lists all"),
            cut,
            "--limit {limit}: {stderr}"
        );
    }
    let table = ws.run_ok(&["outbox", "list", "--limit", "0"], None);
    assert_eq!(table.lines().count(), 2_501, "one header");
    assert_eq!(table.lines().filter(|l| l.starts_with("ID ")).count(), 1);
}

/// A secret given by the environment is often not there when an operator runs a command on
/// the store (`sudo` clears the environment): the commands that never talk to the destination
/// do without it; `check`, which does, still names it.
#[test]
fn store_commands_do_without_a_destination_secret_only_the_environment_would_give() {
    let ws = Workspace::new();
    ws.make_store();
    let config = std::fs::read_to_string(ws.config_path()).unwrap();
    let oauth = "type = \"oauth2_client_credentials\"\n\
                 auth_endpoint = \"http://127.0.0.1:9/token\"\n\
                 client_id = \"edge\"";
    let without_secret = config.replacen("type = \"none\"", oauth, 1);
    assert_ne!(without_secret, config);
    std::fs::write(ws.config_path(), without_secret).unwrap();
    let run = |args: &[&str]| {
        ws.command(args)
            .env_remove("OUTPOST_CLIENT_SECRET")
            .output()
            .unwrap()
    };

    let stats = run(&["outbox", "stats", "--json"]);
    let stderr = String::from_utf8_lossy(&stats.stderr);
    assert!(stats.status.success(), "{stderr}");
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["pending"], 1, "{stats}");
    let shown = run(&["profile", "show", "p-0", "--json"]);
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );

    let check = run(&["check"]);
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("destination.auth.client_secret")
            && stderr.contains("OUTPOST_CLIENT_SECRET"),
        "{stderr}"
    );
}

/// A FILE that cannot be read twice (a pipe: `<(zcat updates.gz)`, `/dev/stdin`) is spooled
/// like `-`, rather than failing when the second pass rewinds it.
#[test]
fn ingest_reads_a_file_that_is_a_pipe() {
    let ws = Workspace::new();
    let input = [
        member_update("p-1", "Jane", "2026-01-01T00:00:01Z"),
        member_update("p-2", "John", "2026-01-01T00:00:01Z"),
    ]
    .join("\n");
    let out = ws.run_ok(&["ingest", "--json", "/dev/stdin"], Some(input.as_bytes()));
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["accepted"], 2, "{summary}");
    assert_eq!(ws.outbox_stats()["pending"], 2);
}

/// `OUTPOST_STORE_WAIT_S` takes any whole number: one too large to count is no limit, not a
/// panic.
#[test]
fn a_store_wait_too_long_to_count_is_no_limit() {
    let ws = Workspace::new();
    ws.make_store();
    let out = ws
        .command(&["outbox", "stats", "--json"])
        .env("OUTPOST_STORE_WAIT_S", u64::MAX.to_string())
        .output()
        .unwrap();
    let stats = json_of_success(&out);
    assert_eq!(stats["pending"], 1, "{stats}");
}

/// A listing of a store this process opened is printed once the store is closed: a reader who
/// stops reading (a pager) does not keep the store from the agent, which could not start.
#[test]
fn a_listing_nobody_reads_does_not_hold_the_store() {
    let ws = Workspace::new();
    // Far more than a pipe's buffer (64 KiB) of listing.
    ingest_new_members(&ws, 1000);
    let printed =
        printed_while_the_store_is_free(&ws, &["outbox", "list", "--json", "--limit", "0"]);
    assert_eq!(printed.lines().count(), 1000);
    assert!(printed.starts_with('{'), "{printed:.100}");
}

/// As a listing, an export larger than a pipe's buffer is printed once the store is closed.
#[test]
fn an_export_nobody_reads_does_not_hold_the_store() {
    let ws = Workspace::new();
    let name = "n".repeat(200_000);
    let update = member_update("big", &name, "2026-01-01T00:00:01Z");
    ws.run_ok(&["ingest", "-"], Some(update.as_bytes()));
    let listed = json_lines(&ws.run_ok(&["outbox", "list", "--json"], None));
    let id = listed[0]["id"].as_str().unwrap().to_owned();
    for args in [
        vec!["outbox", "show", &id],
        vec!["outbox", "show", "--json", &id],
    ] {
        let printed = printed_while_the_store_is_free(&ws, &args);
        assert!(printed.contains(&name), "{args:?} printed {printed:.200}");
    }
}

/// What `args` prints, read only after another command opened the store while the first
/// waited for its reader.
fn printed_while_the_store_is_free(ws: &Workspace, args: &[&str]) -> String {
    use std::io::Read;
    use std::process::Stdio;
    let mut command = ws
        .command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Its first bytes are out: it has read the store, and now waits for a reader.
    let mut out = command.stdout.take().unwrap();
    let mut first = [0u8; 1];
    out.read_exact(&mut first).unwrap();

    let stats = ws
        .command(&["outbox", "stats", "--json"])
        .env("OUTPOST_STORE_WAIT_S", "5")
        .output()
        .unwrap();
    assert!(
        stats.status.success(),
        "{args:?}: the store was held: {}",
        String::from_utf8_lossy(&stats.stderr)
    );

    let mut rest = Vec::new();
    out.read_to_end(&mut rest).unwrap();
    assert!(command.wait().unwrap().success(), "{args:?}");
    let mut printed = first.to_vec();
    printed.extend(rest);
    String::from_utf8(printed).unwrap()
}

/// The JSON a command printed, once it succeeded.
fn json_of_success(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A store put back from a copy (a backup restored, a VM snapshot rolled back) numbers its
/// new exports past those made after the copy, which the endpoint may have seen: a receiver
/// that deduplicates by `Idempotency-Key` would drop a new export under a reused id.
#[test]
fn a_store_put_back_from_a_copy_reuses_no_export_id() {
    let ws = Workspace::new();
    let ingest = |id: &str, name: &str| {
        let line = member_update(id, name, "2026-01-01T00:00:01Z");
        ws.run_ok(&["ingest", "-"], Some(line.as_bytes()));
    };
    let ids = || -> Vec<String> {
        json_lines(&ws.run_ok(&["outbox", "list", "--json"], None))
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect()
    };
    ingest("p-1", "Jane");
    let copy = ws.dir.path().join("copy");
    copy_dir(&ws.store_path(), &copy);
    ingest("p-2", "John");
    let made_after_the_copy = ids()[1].clone();

    copy_dir(&copy, &ws.store_path());
    std::thread::sleep(std::time::Duration::from_millis(5));
    ingest("p-3", "Joan");
    let now = ids();
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(
        seq_of(&now[1]) > seq_of(&made_after_the_copy),
        "{} made after the put-back is numbered at or below {made_after_the_copy}, made before it",
        now[1]
    );
}

/// Output that cannot be written is an error the command names and exits 1 for, never a panic
/// (exit 101) nor a success: a cron job's `outbox list --json > backup` on a full disk must
/// not read as a backup made. An ingest whose summary is lost says its updates were stored.
#[test]
fn output_that_cannot_be_written_is_a_failure_not_a_panic() {
    let ws = Workspace::new();
    let to_full_disk = |args: &[&str], stdin: Option<&str>| {
        let mut command = ws.command(args);
        command
            .stdout(std::fs::File::create("/dev/full").unwrap())
            .stderr(std::process::Stdio::piped())
            .stdin(std::process::Stdio::piped());
        let mut child = command.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        drop(input);
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let update = member_update("p-1", "Jane", "2026-01-01T00:00:01Z");
    let (code, stderr) = to_full_disk(&["ingest", "--json", "-"], Some(&update));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "1 update(s) stored, but the summary could not be written: No space left on device"
        ),
        "{stderr}"
    );
    assert_eq!(ws.outbox_stats()["pending"], 1, "the update was stored");
    for args in [
        &["outbox", "list", "--json"][..],
        &["outbox", "list"],
        &["outbox", "list", "--dead"],
        &["outbox", "stats"],
        &["outbox", "stats", "--json"],
        &["profile", "show", "p-1"],
        &["rejected", "list"],
        &["compact", "--json"],
        &["check", "--store"],
        &["completions", "bash"],
    ] {
        let (code, stderr) = to_full_disk(args, None);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("cannot write the output: No space left on device"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }

    // An ingest whose reader went away says, on stderr, that its updates were stored.
    let mut child = ws
        .command(&["ingest", "--json", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut input = child.stdin.take().unwrap();
    input
        .write_all(member_update("p-2", "John", "2026-01-01T00:00:01Z").as_bytes())
        .unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("1 update(s) stored, but the summary could not be written: Broken pipe"),
        "{out:?}"
    );
    // Another command that keeps SIGPIPE ignored ends quietly, as those that take its default
    // action do.
    let mut child = ws
        .command(&["check"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(141), "{out:?}");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("outpost:"),
        "{out:?}"
    );
}

/// With `--log-format json`, the line that says why a command failed is JSON too, for the
/// pipeline reading the logs; an `OUTPOST_LOG` that is not UTF-8 is warned of, not ignored.
#[test]
fn the_failure_line_is_json_with_json_logs_and_an_unreadable_filter_is_warned_of() {
    use std::os::unix::ffi::OsStrExt;
    let ws = Workspace::new();
    let out = ws
        .command(&["--log-format", "json", "outbox", "stats"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {stderr}"));
    assert_eq!(last["level"], "ERROR", "{last}");
    assert!(
        last["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("there is no store at")),
        "{last}"
    );
    assert_eq!(last["fields"]["exit_code"], 2, "{last}");
    // Also when the logging itself cannot be set up as asked.
    let out = ws
        .command(&[
            "--log-format",
            "json",
            "--log-level",
            "outpost=dbug",
            "outbox",
            "stats",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let line: serde_json::Value =
        serde_json::from_slice(&out.stderr).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"));
    assert!(
        line["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("--log-level `outpost=dbug`")),
        "{line}"
    );

    let out = ws
        .command(&["outbox", "stats"])
        .env("OUTPOST_LOG", std::ffi::OsStr::from_bytes(b"warn\xff"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("OUTPOST_LOG cannot be read; logging at the default level")
            && stderr.contains("it is not UTF-8"),
        "{stderr}"
    );
}

/// `--version` names the commit the binary was built from: every build is 0.1.0, and an
/// operator upgrading could not tell two apart.
#[test]
fn the_version_names_the_commit_built() {
    let out = std::process::Command::new(binary())
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8(out.stdout).unwrap();
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned());
    // Where git cannot name it (no checkout, or one git refuses to read as another user's),
    // neither can the build.
    let commit = head.unwrap_or_else(|| "unknown commit".to_owned());
    assert_eq!(
        version.trim(),
        format!("outpost {} ({commit})", env!("CARGO_PKG_VERSION"))
    );
}
