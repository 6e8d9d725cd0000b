//! Crash safety of the committer: a child process commits batches through the real committer
//! and prints each acknowledgement; the parent SIGKILLs it at random instants, reopens the
//! store and checks that every acknowledged update and its export are there, and that the
//! store is consistent (no export without its profile version, or the reverse).
//!
//! The child is this same test binary, re-run with `OUTPOST_CRASH_CHILD` set.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::KilledOnDrop;
use outpost::config::Mapping;
use outpost::profile::update::parse_body;
use outpost::store::committer::Committer;
use outpost::store::{ListFilter, Store};
use rand::Rng;
use serde_json::Value;

const SEGMENT: &str = "seg-a";
const PROFILES: u64 = 40;
const WRITERS: u64 = 4;
const BATCH: u64 = 25;

fn mapping() -> Mapping {
    Mapping::new(&["person.name.firstName"], &[SEGMENT], &[])
}

/// The marker `run.writer.batch.i` that update i of a batch writes into its profile.
fn update_line(run: u64, writer: u64, batch: u64, i: u64) -> (String, String) {
    let profile = format!("p-{}", (writer * 1000 + batch * BATCH + i) % PROFILES);
    let marker = format!("{run}.{writer}.{batch}.{i}");
    let line = serde_json::json!({
        "id": profile,
        "profile": {
            "person": {"name": {"firstName": marker}},
            "segmentMembership": {"ups": {SEGMENT: {"status": "realized"}}}
        }
    })
    .to_string();
    (profile, line)
}

#[test]
#[ignore = "the child process that acknowledged_commits_survive_sigkill runs and kills"]
fn crash_child() {
    let Ok(spec) = std::env::var("OUTPOST_CRASH_CHILD") else {
        return;
    };
    let (store_path, run) = spec.split_once('|').unwrap();
    let run: u64 = run.parse().unwrap();
    let store = Arc::new(Store::open(store_path.as_ref(), 8 << 20).unwrap());
    let (committer, _thread) = Committer::start(store, Arc::new(mapping()), Default::default());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let mut writers = Vec::new();
        for writer in 0..WRITERS {
            let committer = committer.clone();
            writers.push(tokio::spawn(async move {
                for batch in 0.. {
                    let body: Vec<String> = (0..BATCH)
                        .map(|i| update_line(run, writer, batch, i).1)
                        .collect();
                    let updates = parse_body(body.join("\n").as_bytes()).unwrap();
                    let summary = committer.commit(updates).await.unwrap();
                    assert_eq!(summary.exports, BATCH);
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ACK {writer} {batch}").unwrap();
                    out.flush().unwrap();
                }
            }));
        }
        for w in writers {
            w.await.unwrap();
        }
    });
}

fn marker_of(profile: &Value) -> String {
    profile["person"]["name"]["firstName"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn acknowledged_commits_survive_sigkill() {
    if std::env::var("OUTPOST_CRASH_CHILD").is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("store");
    let mut rng = rand::thread_rng();
    let mut acked: Vec<(u64, u64, u64)> = Vec::new();
    let kills = 12;
    for run in 0..kills {
        let stderr_path = dir.path().join(format!("child-{run}.stderr"));
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(
                "OUTPOST_CRASH_CHILD",
                format!("{}|{run}", store_path.display()),
            )
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        // Killed also when this test fails before its kill below.
        let mut child = KilledOnDrop(child);
        let stdout = child.0.stdout.take().unwrap();
        let (lines_tx, lines_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Wait for the child's first line, then kill at a random instant. That line can be the
        // test harness's own header, so a kill may also land while the child opens the store
        // (sled writing its snapshot, see `tests/unfinished_snapshot.rs`); the acks checked
        // below are the ones printed.
        let first = lines_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("child never acknowledged");
        let mut lines = vec![first];
        let deadline = Instant::now() + Duration::from_millis(rng.gen_range(5..400));
        while Instant::now() < deadline {
            if let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(1)) {
                lines.push(line);
            }
        }
        // The child commits until it is killed: one that ended, or whose writer panicked (the
        // others going on), failed, and its acks alone would not show it.
        let ended = child.0.try_wait().unwrap();
        child.0.kill().unwrap(); // SIGKILL
        child.0.wait().unwrap();
        let stderr = std::fs::read_to_string(&stderr_path).unwrap();
        assert!(
            ended.is_none() && !stderr.contains("panicked"),
            "run {run}: the child ended ({ended:?}) or panicked before it was killed:\n{stderr}"
        );
        reader.join().unwrap();
        lines.extend(lines_rx.try_iter());
        for line in lines.iter().filter(|l| l.starts_with("ACK ")) {
            let mut parts = line[4..].split(' ').map(|n| n.parse::<u64>().unwrap());
            acked.push((run, parts.next().unwrap(), parts.next().unwrap()));
        }
    }
    assert!(acked.len() >= kills as usize, "only {} acks", acked.len());

    let store = Store::open(&store_path, 8 << 20).unwrap();
    assert_eq!(store.verify().unwrap(), Vec::<String>::new());
    let exports = store.list(&ListFilter::default()).unwrap();
    let payload_markers: HashMap<String, (u64, String)> = exports
        .iter()
        .map(|e| {
            let payload: Value = serde_json::from_str(&e.record.payload).unwrap();
            (marker_of(&payload), (e.id.seq, e.record.profile_id.clone()))
        })
        .collect();
    for &(run, writer, batch) in &acked {
        for i in 0..BATCH {
            let (profile, _) = update_line(run, writer, batch, i);
            let marker = format!("{run}.{writer}.{batch}.{i}");
            let (_, exported_for) = payload_markers
                .get(&marker)
                .unwrap_or_else(|| panic!("acknowledged update {marker} has no export"));
            assert_eq!(exported_for, &profile);
        }
    }
    // Every stored profile is the version of its newest export, and the reverse.
    let mut newest: HashMap<&str, (u64, String)> = HashMap::new();
    for (marker, (seq, profile)) in &payload_markers {
        let entry = newest
            .entry(profile.as_str())
            .or_insert((*seq, marker.clone()));
        if *seq > entry.0 {
            *entry = (*seq, marker.clone());
        }
    }
    for p in 0..PROFILES {
        let id = format!("p-{p}");
        let stored = store.profile(&id).unwrap();
        match (stored, newest.get(id.as_str())) {
            (Some(stored), Some((_, marker))) => {
                assert_eq!(&marker_of(&stored.profile), marker, "profile {id}")
            }
            (None, None) => {}
            (stored, export) => {
                panic!("profile {id}: stored {stored:?} but newest export {export:?}")
            }
        }
    }
}
