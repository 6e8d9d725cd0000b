//! What the change decision costs next to parsing the line it came from.
//!
//! Two sets of 2,000 update lines, both built from `data/sample-updates.ndjson`:
//! - `full-upserts`: the file's full-profile (~1 KB) upserts, cycled to 2,000; each is applied to
//!   a stored previous version (the real previous version of that profile in the file, or, for a
//!   first sight, a copy with a mapped attribute changed and an earlier timestamp);
//! - `sample-mix`: the file as it is (upserts, merges, deletes, first sights with no stored
//!   version, stale lines), cycled to 2,000 with fresh ids on each pass, each applied to the
//!   version the store would hold at that point.
//!
//! For each set it times (a) `serde_json::from_str::<Value>` of every line and (b)
//! `outpost::profile::engine::apply_record` (decision + payload text, what the committer thread
//! runs) of every update as the committer gets it (pruned; an upsert already made its record
//! by `engine::prepare`, as the parsing side does), against the stored record, and prints
//! updates/s for both and the ratio decide/parse (target: >= 1.0). For context it also prints
//! `apply_record` making the upserts' records itself, `engine::prepare` alone (on a fresh
//! copy of the pruned update, the copy's time taken off), the full validating parse
//! (`parse_body`), the same lines as the ingest API takes them (NDJSON bodies of 500, parsed
//! pruned and prepared, as `POST /v1/updates` does), the rules on JSON values
//! (`profile::apply`, what the store ran before typed records) and the per-update CPU work the
//! store does around `apply_record` (decode the stored record, apply, encode the record and
//! the export).
//!
//! Run: `cargo bench --bench decide`.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use serde_json::Value;

use outpost::config::Mapping;
use outpost::profile::apply::{apply, StoreAction, StoredProfile, UpdateResult};
use outpost::profile::engine::{self, apply_record, RecordAction};
use outpost::profile::layout::Layout;
use outpost::profile::prune::KeepTree;
use outpost::profile::record::ProfileRecord;
use outpost::profile::update::{parse_body, parse_body_with, Parsing};
use outpost::profile::{Op, Update};
use outpost::store::codec::{self, ExportRecord};

mod common;
use common::rate;

const LINES: usize = 2_000;
const ROUNDS: usize = 25;
/// Updates in an NDJSON body, as the ingest benchmarks send them.
const BODY_LINES: usize = 500;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 2, 0, 0, 0).unwrap()
}

fn parse_one(line: &str) -> Update {
    let mut updates = parse_body(line.as_bytes()).expect("sample line parses");
    assert_eq!(updates.len(), 1);
    updates.pop().unwrap()
}

/// One prepared case: the line, its update, and the stored version it is applied to.
struct Case {
    line: String,
    update: Update,
    old: Option<StoredProfile>,
}

/// Replays `lines` in order over an in-memory "store", returning each line with the version
/// stored before it.
fn replay(lines: &[String], mapping: &Mapping) -> Vec<Case> {
    let mut store: HashMap<String, StoredProfile> = HashMap::new();
    let mut cases = Vec::with_capacity(lines.len());
    for line in lines {
        let update = parse_one(line);
        let old = store.get(&update.id).cloned();
        let applied = apply(old.as_ref(), &update, mapping, now());
        match applied.store {
            StoreAction::Keep => {}
            StoreAction::Put(new) => {
                store.insert(update.id.clone(), new);
            }
            StoreAction::Remove => {
                store.remove(&update.id);
            }
        }
        cases.push(Case {
            line: line.clone(),
            update,
            old,
        });
    }
    cases
}

fn sample_lines() -> Vec<String> {
    common::sample_text()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// The file cycled to `LINES` lines; pass k > 0 renames `p-` ids to `p{k}-` (fresh profiles).
fn sample_mix(lines: &[String], mapping: &Mapping) -> Vec<Case> {
    let mut cycled = Vec::with_capacity(LINES);
    let mut pass = 0;
    while cycled.len() < LINES {
        for line in lines.iter().take(LINES - cycled.len()) {
            cycled.push(if pass == 0 {
                line.clone()
            } else {
                line.replacen("\"id\":\"p-", &format!("\"id\":\"p{pass}-"), 1)
            });
        }
        pass += 1;
    }
    replay(&cycled, mapping)
}

/// Full-profile upserts of the file, each with a stored previous version, cycled to `LINES`.
fn full_upserts(lines: &[String], mapping: &Mapping) -> Vec<Case> {
    let replayed = replay(lines, mapping);
    let mut picked: Vec<Case> = Vec::new();
    for case in replayed {
        if case.update.op != Op::Upsert || case.line.len() < 700 {
            continue;
        }
        let old = match case.old {
            Some(old) => old,
            None => {
                // First sight: a copy with a mapped attribute changed, stored a minute earlier.
                let mut profile = Value::Object(case.update.profile.clone());
                if let Some(name) = profile.pointer_mut("/person/name/firstName") {
                    *name = Value::String(format!("Old{}", name.as_str().unwrap_or("")));
                }
                StoredProfile {
                    timestamp: case
                        .update
                        .timestamp
                        .map(|t| t - chrono::Duration::minutes(1)),
                    profile,
                }
            }
        };
        picked.push(Case {
            old: Some(old),
            ..case
        });
    }
    assert!(!picked.is_empty(), "no full-profile upserts in the sample");
    let mut cases = Vec::with_capacity(LINES);
    while cases.len() < LINES {
        for case in picked.iter().take(LINES - cases.len()) {
            cases.push(Case {
                line: case.line.clone(),
                update: case.update.clone(),
                old: case.old.clone(),
            });
        }
    }
    cases
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// A case as the store meets it: the update pruned and, an upsert, made a record (as the
/// committer's callers do: `engine::prepare`), the stored version as a record; and the update
/// pruned only, which `apply_record` makes a record itself.
struct Prepared {
    update: Update,
    pruned: Update,
    old: Option<ProfileRecord>,
    old_bytes: Option<Vec<u8>>,
}

fn prepare(case: &Case, mapping: &Mapping, layout: &Layout) -> Prepared {
    let keep = KeepTree::for_mapping(mapping);
    let mut pruned = case.update.clone();
    keep.prune(&mut pruned.profile);
    let mut update = pruned.clone();
    engine::prepare(&mut update, layout);
    let old = case.old.as_ref().map(|old| {
        let mut profile = old.profile.as_object().expect("an object").clone();
        keep.prune(&mut profile);
        ProfileRecord::from_profile(
            old.timestamp.map(|t| t.timestamp_micros()),
            &profile,
            layout,
        )
    });
    let old_bytes = old.as_ref().map(codec::encode_profile);
    Prepared {
        update,
        pruned,
        old,
        old_bytes,
    }
}

/// The per-update CPU work of `Store::apply_groups` around `apply_record`, without sled.
fn store_side(case: &Prepared, mapping: &Mapping, layout: &Layout) -> usize {
    let stored = case
        .old_bytes
        .as_ref()
        .map(|bytes| codec::decode_profile(bytes).unwrap());
    let applied = apply_record(stored.as_ref(), &case.update, mapping, layout, now());
    let mut written = 0;
    if let RecordAction::Put(new) = &applied.store {
        written += codec::encode_profile(new).len();
    }
    if let Some((reason, payload)) = applied.export {
        written += codec::encode_export(&ExportRecord::new_pending(
            case.update.id.clone(),
            reason,
            payload,
            0,
            0,
        ))
        .len();
    }
    written
}

fn measure(name: &str, cases: &[Case], mapping: &Mapping) {
    let n = cases.len();
    let layout = Layout::new(mapping);
    let prepared: Vec<Prepared> = cases.iter().map(|c| prepare(c, mapping, &layout)).collect();
    let avg_line = cases.iter().map(|c| c.line.len()).sum::<usize>() / n;
    let with_old = cases.iter().filter(|c| c.old.is_some()).count();
    let mut counts = [0usize; 4];
    for case in &prepared {
        let applied = apply_record(case.old.as_ref(), &case.update, mapping, &layout, now());
        counts[match applied.result {
            UpdateResult::Exported => 0,
            UpdateResult::Unchanged => 1,
            UpdateResult::Stale => 2,
            UpdateResult::Deleted => 3,
        }] += 1;
    }

    let mut parse_times = Vec::with_capacity(ROUNDS);
    let mut decide_times = Vec::with_capacity(ROUNDS);
    let mut values_times = Vec::with_capacity(ROUNDS);
    let mut validate_times = Vec::with_capacity(ROUNDS);
    let mut store_times = Vec::with_capacity(ROUNDS);
    let mut unprepared_times = Vec::with_capacity(ROUNDS);
    let mut prepare_times = Vec::with_capacity(ROUNDS);
    let mut body_times = Vec::with_capacity(ROUNDS);
    let bodies: Vec<String> = cases
        .chunks(BODY_LINES)
        .map(|chunk| {
            chunk
                .iter()
                .map(|case| format!("{}\n", case.line))
                .collect()
        })
        .collect();
    let keep = KeepTree::for_mapping(mapping);
    let ingest_parsing = Parsing {
        keep: Some(&keep),
        layout: Some(&layout),
        ..Parsing::default()
    };
    for round in 0..=ROUNDS {
        let start = Instant::now();
        for case in cases {
            let value: Value = serde_json::from_str(black_box(&case.line)).unwrap();
            black_box(value);
        }
        let parse = start.elapsed();

        // `apply_record` over every case, on the update `pick` chooses.
        let time_apply_record = |pick: fn(&Prepared) -> &Update| {
            let start = Instant::now();
            for case in &prepared {
                let applied = apply_record(
                    black_box(case.old.as_ref()),
                    black_box(pick(case)),
                    mapping,
                    &layout,
                    now(),
                );
                black_box(applied);
            }
            start.elapsed()
        };
        let decide = time_apply_record(|case| &case.update);
        let unprepared = time_apply_record(|case| &case.pruned);

        let start = Instant::now();
        for case in &prepared {
            let mut update = case.pruned.clone();
            engine::prepare(black_box(&mut update), &layout);
            black_box(update);
        }
        let prepare_and_clone = start.elapsed();
        let start = Instant::now();
        for case in &prepared {
            black_box(case.pruned.clone());
        }
        let prepare = prepare_and_clone.saturating_sub(start.elapsed());

        let start = Instant::now();
        for case in cases {
            let applied = apply(
                black_box(case.old.as_ref()),
                black_box(&case.update),
                mapping,
                now(),
            );
            black_box(applied);
        }
        let values = start.elapsed();

        let start = Instant::now();
        for case in cases {
            black_box(parse_body(black_box(case.line.as_bytes())).unwrap());
        }
        let validate = start.elapsed();

        let start = Instant::now();
        for body in &bodies {
            black_box(parse_body_with(black_box(body.as_bytes()), &ingest_parsing).unwrap());
        }
        let body = start.elapsed();

        let start = Instant::now();
        for case in &prepared {
            black_box(store_side(case, mapping, &layout));
        }
        let store = start.elapsed();

        if round > 0 {
            // Round 0 warms caches and the allocator.
            parse_times.push(parse);
            decide_times.push(decide);
            values_times.push(values);
            validate_times.push(validate);
            store_times.push(store);
            unprepared_times.push(unprepared);
            prepare_times.push(prepare);
            body_times.push(body);
        }
    }
    let parse_rate = rate(n, median(parse_times));
    let decide_rate = rate(n, median(decide_times));
    let values_rate = rate(n, median(values_times));
    let validate_rate = rate(n, median(validate_times));
    let store_rate = rate(n, median(store_times));
    let unprepared_rate = rate(n, median(unprepared_times));
    let prepare_rate = rate(n, median(prepare_times));
    let body_rate = rate(n, median(body_times));
    println!(
        "decide[{name}]: {n} lines, avg {avg_line} B, {with_old} with a stored version; \
         results exported={} unchanged={} stale={} deleted={}",
        counts[0], counts[1], counts[2], counts[3]
    );
    println!(
        "decide[{name}]:   (a) parse serde_json::Value  {parse_rate:>10.0} updates/s  ({:.2} us/update)",
        1e6 / parse_rate
    );
    println!(
        "decide[{name}]:   (b) apply_record (decide+payload) {decide_rate:>10.0} updates/s  ({:.2} us/update)",
        1e6 / decide_rate
    );
    println!(
        "decide[{name}]:   context: apply_record, building the record itself {unprepared_rate:>10.0} updates/s  ({:.2} us/update)",
        1e6 / unprepared_rate
    );
    println!(
        "decide[{name}]:   context: engine::prepare (the record, on the parsing thread) {prepare_rate:>10.0} updates/s  ({:.2} us/update)",
        1e6 / prepare_rate
    );
    println!(
        "decide[{name}]:   context: rules on JSON values (apply)   {values_rate:>10.0} updates/s  ({:.2} us/update)",
        1e6 / values_rate
    );
    println!(
        "decide[{name}]:   context: parse_body (validating)     {validate_rate:>10.0} updates/s  ({:.2} us/update)",
        1e6 / validate_rate
    );
    println!(
        "decide[{name}]:   context: NDJSON bodies of {BODY_LINES} as ingest parses them (pruned, prepared) {body_rate:>10.0} updates/s  ({:.2} us/update)",
        1e6 / body_rate
    );
    println!(
        "decide[{name}]:   context: store-side CPU per update   {store_rate:>10.0} updates/s  ({:.2} us/update: decode record, apply_record, encode record and export)",
        1e6 / store_rate
    );
    println!(
        "decide[{name}]: RATIO decide_rate/parse_rate = {:.2} (target >= 1.0) {}",
        decide_rate / parse_rate,
        common::verdict(decide_rate / parse_rate >= 1.0)
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then only check it runs.
    let quick = common::smoke_run();
    let mapping = common::example_mapping();
    let lines = sample_lines();
    let full = full_upserts(&lines, &mapping);
    let mix = sample_mix(&lines, &mapping);
    if quick {
        let layout = Layout::new(&mapping);
        for case in full.iter().chain(&mix) {
            let prepared = prepare(case, &mapping, &layout);
            black_box(store_side(&prepared, &mapping, &layout));
        }
        println!(
            "decide: built {} + {} cases (run with cargo bench to measure)",
            full.len(),
            mix.len()
        );
        return;
    }
    println!("decide: {ROUNDS} rounds each, median round reported");
    measure("full-upserts", &full, &mapping);
    measure("sample-mix", &mix, &mapping);
}
