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
//!   key; then `db.flush()`. "raw+fsync" also fsyncs `<path>/db` after the flush, as
//!   `Store::flush` does.
//!
//! Prints updates/s for each and the ratio committer/raw per batch size (target: >= 0.6 at 500).
//! Each configuration runs `REPEATS` times on a fresh store; the best run is reported.
//!
//! Run: `cargo bench --bench commit`.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use serde_json::{Map, Value};
use sled::transaction::ConflictableTransactionError;
use sled::Transactional;
use tokio::sync::Notify;

use outpost::config::Mapping;
use outpost::profile::change::is_member_of_any;
use outpost::profile::update::parse_body;
use outpost::profile::{Op, Reason, Update};
use outpost::store::codec::{self, ProfileRecord};
use outpost::store::committer::Committer;
use outpost::store::{ListFilter, Store};

const CACHE_BYTES: u64 = 64 << 20;
/// Distinct profiles; written once before timing.
const POOL: usize = 2_000;
/// (updates per request, updates timed).
const PLANS: [(usize, usize); 3] = [(1, 2_000), (50, 20_000), (500, 50_000)];
const REQUESTERS: usize = 4;
const REPEATS: usize = 2;

fn mapping() -> Mapping {
    // The mapping of data/outpost.example.toml plus the home address, so the export is ~600 B.
    Mapping::new(
        &[
            "person.name.firstName",
            "person.name.lastName",
            "person.birthDate",
            "personalEmail.address",
            "homeAddress",
        ],
        &[
            "7841ba61-23c1-4bb3-a495-00d3g5fe1e93",
            "59bd2fkd-3c48-4b18-bf56-4f5c5e6967ae",
        ],
        &["ecid", "email_lc_sha256"],
    )
}

/// A full-profile sample line of ~1 KB that is a member of a mapped segment.
fn template(mapping: &Mapping) -> Map<String, Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/sample-updates.ndjson");
    let text = std::fs::read_to_string(path).expect("reading data/sample-updates.ndjson");
    for line in text.lines().filter(|l| (950..=1150).contains(&l.len())) {
        let Ok(mut updates) = parse_body(line.as_bytes()) else {
            continue;
        };
        let update = updates.pop().unwrap();
        let profile = Value::Object(update.profile.clone());
        if update.op == Op::Upsert
            && is_member_of_any(&profile, mapping)
            && profile.pointer("/person/name/firstName").is_some()
            && profile.get("identityMap").is_some()
        {
            return update.profile;
        }
    }
    panic!("no suitable full-profile line in the sample");
}

/// Update number `j`: profile `j % POOL`, its first name changed to a value unique to `j`.
fn make_update(template: &Map<String, Value>, j: usize) -> Update {
    let mut profile = template.clone();
    let name = profile
        .get_mut("person")
        .and_then(|p| p.get_mut("name"))
        .and_then(|n| n.get_mut("firstName"))
        .expect("template has person.name.firstName");
    *name = Value::String(format!("Name{j:08}"));
    Update {
        id: format!("c-{:06}", j % POOL),
        op: Op::Upsert,
        profile,
        timestamp: Some(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()),
    }
}

/// The profile and export values the store writes for a timed update, taken from a small real
/// committer run (so the raw baseline writes the same sizes), and the NDJSON line length.
fn value_sizes(
    rt: &tokio::runtime::Runtime,
    template: &Map<String, Value>,
    mapping: &Arc<Mapping>,
) -> (Vec<u8>, Vec<u8>, usize) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), CACHE_BYTES).unwrap());
    let (committer, handle) =
        Committer::start(store.clone(), mapping.clone(), Arc::new(Notify::new()));
    let second = make_update(template, POOL);
    rt.block_on(async {
        let first = committer
            .commit(vec![make_update(template, 0)])
            .await
            .unwrap();
        let next = committer.commit(vec![second.clone()]).await.unwrap();
        assert_eq!((first.exports, next.exports), (1, 1));
    });
    drop(committer);
    handle.join().unwrap();
    let stored = store.profile(&second.id).unwrap().expect("stored profile");
    let profile = codec::encode_profile(&ProfileRecord {
        timestamp_micros: stored.timestamp.map(|t| t.timestamp_micros()),
        json: stored.profile.to_string(),
    });
    let exports = store.list(&ListFilter::default()).unwrap();
    let last = exports.last().expect("an export");
    assert_eq!(last.record.reason(), Reason::Attribute);
    let export = codec::encode_export(&last.record);
    let line_len = serde_json::json!({
        "id": second.id,
        "timestamp": "2026-01-01T00:00:00Z",
        "profile": Value::Object(second.profile.clone()),
    })
    .to_string()
    .len();
    (profile, export, line_len)
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
        .map(|js| js.iter().map(|&j| make_update(template, j)).collect())
        .collect()
}

fn rate(n: usize, time: Duration) -> f64 {
    n as f64 / time.as_secs_f64()
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

fn open_raw(path: &Path) -> sled::Db {
    sled::Config::new()
        .path(path)
        .cache_capacity(CACHE_BYTES)
        .mode(sled::Mode::HighThroughput)
        .open()
        .unwrap()
}

fn run_raw(profile: &[u8], export: &[u8], batch: usize, total: usize, fsync: bool) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let db = open_raw(dir.path());
    let profiles = db.open_tree("profiles").unwrap();
    let outbox = db.open_tree("outbox").unwrap();
    let ids: Vec<String> = (0..POOL).map(|i| format!("c-{i:06}")).collect();
    for id in &ids {
        profiles.insert(id.as_bytes(), profile).unwrap();
    }
    db.flush().unwrap();
    let log = if fsync {
        Some(File::open(dir.path().join("db")).unwrap())
    } else {
        None
    };
    let mut seq = 0u64;
    let start = Instant::now();
    let mut done = 0;
    while done < total {
        let n = batch.min(total - done);
        (&profiles, &outbox)
            .transaction(|(p, o)| {
                for k in 0..n {
                    let id = ids[(done + k) % POOL].as_bytes();
                    std::hint::black_box(p.get(id)?);
                    p.insert(id, profile)?;
                    o.insert(&(seq + k as u64).to_be_bytes(), export)?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .unwrap();
        db.flush().unwrap();
        if let Some(file) = &log {
            file.sync_data().unwrap();
        }
        seq += n as u64;
        done += n;
    }
    rate(total, start.elapsed())
}

fn best(runs: impl Iterator<Item = f64>) -> f64 {
    runs.fold(0.0, f64::max)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then run a tiny smoke test.
    let quick = !std::env::args().any(|a| a == "--bench");
    let mapping = Arc::new(mapping());
    let template = template(&mapping);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (profile, export, line_len) = value_sizes(&rt, &template, &mapping);
    println!(
        "commit: update line {line_len} B, stored profile value {} B, export value {} B, pool {POOL} profiles, cache 64 MiB, best of {REPEATS}",
        profile.len(),
        export.len()
    );
    if quick {
        run_committer(&rt, &template, &mapping, 10, 20, 2);
        run_raw(&profile, &export, 10, 20, true);
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
            raw.push(run_raw(&profile, &export, batch, total, false));
            raw_fsync.push(run_raw(&profile, &export, batch, total, true));
            concurrent.push(run_committer(
                &rt, &template, &mapping, batch, total, REQUESTERS,
            ));
        }
        let fmt = |v: &[f64]| {
            v.iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (c, c4, r, rf) = (
            best(committer.iter().copied()),
            best(concurrent.iter().copied()),
            best(raw.iter().copied()),
            best(raw_fsync.iter().copied()),
        );
        println!(
            "commit[batch={batch:>3}, {total} updates]: committer {c:>8.0}/s [{}]  committer x{REQUESTERS} {c4:>8.0}/s [{}]  raw {r:>8.0}/s [{}]  raw+fsync {rf:>8.0}/s [{}]",
            fmt(&committer),
            fmt(&concurrent),
            fmt(&raw),
            fmt(&raw_fsync)
        );
        summary.push((batch, c, c4, r, rf));
    }
    for (batch, c, c4, r, rf) in summary {
        let verdict = if batch == 500 {
            if c / rf >= 0.6 {
                "  (target >= 0.6 of raw at 500: MET vs raw+fsync"
            } else {
                "  (target >= 0.6 of raw at 500: NOT MET vs raw+fsync"
            }
        } else {
            ""
        };
        let verdict_raw = if batch == 500 {
            if c / r >= 0.6 {
                ", MET vs raw)"
            } else {
                ", NOT MET vs raw)"
            }
        } else {
            ""
        };
        println!(
            "commit RATIO batch={batch:>3}: committer/raw = {:.2}, committer/raw+fsync = {:.2}, committer x{REQUESTERS}/raw+fsync = {:.2}{verdict}{verdict_raw}",
            c / r,
            c / rf,
            c4 / rf
        );
    }
}
