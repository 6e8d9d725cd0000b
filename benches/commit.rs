//! Committer throughput against raw sled, at 1, 50 and 500 updates per request.
//!
//! Every update is a ~1 KB profile (a full-profile sample line, member of a mapped segment) whose
//! mapped `person.name.firstName` changes on every update, so every update exports. Profiles come
//! from a pool of `POOL` ids that is written once before timing, so every timed update finds a
//! stored version.
//!
//! - committer: `Store::open(tmp, 64 MiB)` + `Committer::start`, `commit(updates).await` on a
//!   tokio runtime, one request of N updates at a time (and, separately, 4 concurrent requesters);
//! - raw: a plain `sled::Db` (same cache size and mode) with two trees; per batch of N one
//!   two-tree transaction doing, per update, a get of the profile key, an insert of profile bytes
//!   and an insert of export bytes (both the sizes the committer writes) under a big-endian u64
//!   key; then `db.flush()`. Each profile value differs from the stored one (sled skips a set of
//!   the same value), as an update's does. "raw+fsync" also fsyncs `<path>/db` after the flush, as
//!   `Store::flush` does.
//!
//! Prints updates/s for each and the ratio committer/raw per batch size (target: >= 0.6 at 500).
//! Each configuration runs `REPEATS` times on a fresh store; the best run is reported.
//!
//! Then `outpost ingest` (the binary, without an agent) of `CLI_UPDATES` lines of the sample mix
//! (`data/sample-updates.ndjson` cycled, with fresh ids on each pass: upserts, merges, deletes,
//! stale lines) into a fresh store, from the process start to its exit, including its
//! validating first pass over the file; against raw+fsync at 500 of the same run.
//!
//! Run: `cargo bench --bench commit`.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value};
use tokio::sync::Notify;

use outpost::config::Mapping;
use outpost::profile::Update;
use outpost::store::committer::Committer;
use outpost::store::Store;

mod common;
use common::{
    best, full_mapping, list, make_update, rate, template, value_sizes, verdict, RawSled,
};

const CACHE_BYTES: u64 = 64 << 20;
/// Distinct profiles; written once before timing.
const POOL: usize = 2_000;
/// (updates per request, updates timed).
const PLANS: [(usize, usize); 3] = [(1, 2_000), (50, 20_000), (500, 50_000)];
const REQUESTERS: usize = 4;
const REPEATS: usize = 2;
const CLI_UPDATES: usize = 100_000;

/// Updates/s of `outpost ingest FILE` into a fresh store, whole process.
fn run_cli_ingest(lines: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("updates.ndjson");
    std::fs::write(&file, common::sample_mix(lines)).unwrap();
    let mapping = format!(
        r#"attributes = ["person.name.firstName", "person.name.lastName", "person.birthDate", "personalEmail.address"]
segments = ["{}", "{}"]
identities = ["ecid", "email_lc_sha256"]"#,
        common::SEGMENT_A,
        common::SEGMENT_B
    );
    let text = common::config_text(
        "http://127.0.0.1:9",
        common::AUTH_NONE,
        &mapping,
        "127.0.0.1:0",
        "",
    );
    let (config, _) = common::write_config(dir.path(), "outpost.toml", &text);
    let start = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .arg("--config")
        .arg(&config)
        .arg("ingest")
        .arg(&file)
        .output()
        .unwrap();
    let elapsed = start.elapsed();
    assert!(out.status.success(), "outpost ingest: {out:?}");
    rate(lines, elapsed)
}

fn batches(
    template: &Map<String, Value>,
    from: usize,
    total: usize,
    batch: usize,
) -> Vec<Vec<Update>> {
    (from..from + total)
        .collect::<Vec<_>>()
        .chunks(batch)
        .map(|js| js.iter().map(|&j| make_update(template, POOL, j)).collect())
        .collect()
}

fn run_committer(
    rt: &tokio::runtime::Runtime,
    template: &Map<String, Value>,
    mapping: &Arc<Mapping>,
    batch: usize,
    total: usize,
    requesters: usize,
) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), CACHE_BYTES).unwrap());
    let (committer, handle) =
        Committer::start(store.clone(), mapping.clone(), Arc::new(Notify::new()));
    let prefill = batches(template, 0, POOL, 500);
    let timed = batches(template, POOL, total, batch);
    let mut per_requester: Vec<Vec<Vec<Update>>> = (0..requesters).map(|_| Vec::new()).collect();
    for (i, b) in timed.into_iter().enumerate() {
        per_requester[i % requesters].push(b);
    }
    let (elapsed, exports) = rt.block_on(async {
        for b in prefill {
            committer.commit(b).await.unwrap();
        }
        let start = Instant::now();
        let tasks: Vec<_> = per_requester
            .into_iter()
            .map(|mine| {
                let committer = committer.clone();
                tokio::spawn(async move {
                    let mut exports = 0;
                    for b in mine {
                        exports += committer.commit(b).await.unwrap().exports;
                    }
                    exports
                })
            })
            .collect();
        let mut exports = 0;
        for task in tasks {
            exports += task.await.unwrap();
        }
        (start.elapsed(), exports)
    });
    assert_eq!(exports as usize, total, "every timed update should export");
    drop(committer);
    handle.join().unwrap();
    drop(store);
    rate(total, elapsed)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then run a tiny smoke test.
    let quick = common::smoke_run();
    let mapping = Arc::new(full_mapping());
    let template = template(&mapping);
    let rt = common::runtime();
    let (profile, export, line_len) = value_sizes(&rt, &template, &mapping, POOL, CACHE_BYTES);
    let raw_sled = RawSled {
        profile: &profile,
        export: &export,
        pool: POOL,
        cache_bytes: CACHE_BYTES,
    };
    println!(
        "commit: update line {line_len} B, stored profile value {} B, export value {} B, pool {POOL} profiles, cache 64 MiB, best of {REPEATS}",
        profile.len(),
        export.len()
    );
    if quick {
        run_committer(&rt, &template, &mapping, 10, 20, 2);
        raw_sled.run(10, 20, true);
        run_cli_ingest(100);
        println!("commit: smoke run done (run with cargo bench to measure)");
        return;
    }
    let mut summary = Vec::new();
    for (batch, total) in PLANS {
        let mut committer = Vec::new();
        let mut concurrent = Vec::new();
        let mut raw = Vec::new();
        let mut raw_fsync = Vec::new();
        for _ in 0..REPEATS {
            // Interleaved so that drift in the machine hits every configuration alike.
            committer.push(run_committer(&rt, &template, &mapping, batch, total, 1));
            raw.push(raw_sled.run(batch, total, false));
            raw_fsync.push(raw_sled.run(batch, total, true));
            concurrent.push(run_committer(
                &rt, &template, &mapping, batch, total, REQUESTERS,
            ));
        }
        let (c, c4, r, rf) = (
            best(&committer),
            best(&concurrent),
            best(&raw),
            best(&raw_fsync),
        );
        println!(
            "commit[batch={batch:>3}, {total} updates]: committer {c:>8.0}/s [{}]  committer x{REQUESTERS} {c4:>8.0}/s [{}]  raw {r:>8.0}/s [{}]  raw+fsync {rf:>8.0}/s [{}]",
            list(&committer),
            list(&concurrent),
            list(&raw),
            list(&raw_fsync)
        );
        summary.push((batch, c, c4, r, rf));
    }
    let cli: Vec<f64> = (0..REPEATS).map(|_| run_cli_ingest(CLI_UPDATES)).collect();
    let raw_500 = summary.last().map_or(f64::NAN, |&(_, _, _, _, rf)| rf);
    println!(
        "commit[cli]: outpost ingest of {CLI_UPDATES} sample-mix updates {:>8.0}/s [{}]",
        best(&cli),
        list(&cli)
    );
    for (batch, c, c4, r, rf) in summary {
        let (vs_fsync, vs_raw) = if batch == 500 {
            (
                format!(
                    "  (target >= 0.6 of raw at 500: {} vs raw+fsync",
                    verdict(c / rf >= 0.6)
                ),
                format!(", {} vs raw)", verdict(c / r >= 0.6)),
            )
        } else {
            (String::new(), String::new())
        };
        println!(
            "commit RATIO batch={batch:>3}: committer/raw = {:.2}, committer/raw+fsync = {:.2}, committer x{REQUESTERS}/raw+fsync = {:.2}{vs_fsync}{vs_raw}",
            c / r,
            c / rf,
            c4 / rf
        );
    }
    println!(
        "commit RATIO cli: outpost ingest/raw+fsync at 500 = {:.2} (target >= 0.6) {}",
        best(&cli) / raw_500,
        verdict(best(&cli) / raw_500 >= 0.6)
    );
}
