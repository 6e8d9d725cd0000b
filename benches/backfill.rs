//! Backfill: how fast the stored members of a newly mapped segment are exported, and what
//! ingest gets while a backfill runs.
//!
//! The store holds N tiny profiles (default 1,000,000; `OUTPOST_BENCH_PROFILES` sets N), every
//! second one a member of SEGMENT_A, stored while only SEGMENT_B was mapped. Then:
//! (a) SEGMENT_A joins the mapping: the backfill alone, step after step as the committer runs
//!     them (each step one transaction + flush);
//! (b) ingest alone: groups of 500 updates, each group one transaction + flush;
//! (c) SEGMENT_A leaves and joins again (a second backfill), with one group of 500 updates
//!     between steps, as the committer interleaves them: both rates over the run.
//!
//! Run: `cargo bench --bench backfill`.

use std::time::{Duration, Instant};

use chrono::Utc;

use outpost::config::Mapping;
use outpost::profile::prune::KeepTree;
use outpost::profile::Update;
use outpost::store::backfill::STEP_PROFILES;
use outpost::store::Store;

mod common;
use common::{rate, smoke_run, tiny_update, PREFILL_CACHE_BYTES, SEGMENT_A, SEGMENT_B};

const GROUP: usize = 500;

fn mapping(segments: &[&str]) -> Mapping {
    Mapping::new(&["person.name.firstName"], segments, &["ecid"])
}

fn record(store: &Store, segments: &[&str]) -> Mapping {
    let mut mapping = mapping(segments);
    store
        .record_mapping(&mut mapping, Utc::now().timestamp_millis())
        .unwrap();
    mapping
}

/// Runs the queued backfill to its end; returns (profiles scanned, exports, time). With
/// `ingest`, one group of it is applied after each step.
fn backfill(
    store: &Store,
    mapping: &Mapping,
    mut ingest: Option<&mut dyn Iterator<Item = Vec<Update>>>,
) -> (u64, u64, usize, Duration) {
    let start = Instant::now();
    let (mut scanned, mut exported, mut ingested) = (0, 0, 0);
    while let Some(progress) = store
        .backfill_step(mapping, STEP_PROFILES, Utc::now())
        .unwrap()
    {
        store.flush().unwrap();
        (scanned, exported) = (progress.scanned, progress.exported);
        if let Some(groups) = ingest.as_mut() {
            if let Some(updates) = groups.next() {
                store
                    .apply_groups(&[updates.as_slice()], mapping, Utc::now())
                    .unwrap();
                store.flush().unwrap();
                ingested += updates.len();
            }
        }
    }
    (scanned, exported, ingested, start.elapsed())
}

/// Groups of tiny updates to profiles numbered from `first` on, members of SEGMENT_A.
fn groups(first: usize, keep: KeepTree) -> impl Iterator<Item = Vec<Update>> {
    (0..).map(move |g| {
        let from = first + g * GROUP;
        (from..from + GROUP)
            .map(|i| tiny_update(i, true, &keep))
            .collect()
    })
}

fn main() {
    let profiles: usize = if smoke_run() {
        2_000
    } else {
        std::env::var("OUTPOST_BENCH_PROFILES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1_000_000)
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store"), PREFILL_CACHE_BYTES).unwrap();
    let only_b = record(&store, &[SEGMENT_B]);
    let keep = KeepTree::for_mapping(&only_b);
    let filled = Instant::now();
    for chunk in (0..profiles).collect::<Vec<_>>().chunks(10_000) {
        let updates: Vec<Update> = chunk
            .iter()
            .map(|&i| tiny_update(i, i % 2 == 0, &keep))
            .collect();
        store
            .apply_groups(&[updates.as_slice()], &only_b, Utc::now())
            .unwrap();
    }
    store.flush().unwrap();
    assert_eq!(store.tally().unwrap().pending, 0);
    println!(
        "backfill: {profiles} profiles stored in {:.1} s",
        filled.elapsed().as_secs_f64()
    );

    // (a)
    let both = record(&store, &[SEGMENT_A, SEGMENT_B]);
    let (scanned, exported, _, took) = backfill(&store, &both, None);
    assert_eq!(scanned as usize, profiles);
    assert_eq!(exported as usize, profiles.div_ceil(2));
    println!(
        "backfill alone: {:.0} profiles/s scanned, {:.0} exports/s ({exported} exports in {:.1} s)",
        rate(profiles, took),
        rate(exported as usize, took),
        took.as_secs_f64()
    );

    // (b)
    let ingest_groups = if smoke_run() { 2 } else { 200 };
    let start = Instant::now();
    for updates in groups(profiles, keep.clone()).take(ingest_groups) {
        store
            .apply_groups(&[updates.as_slice()], &both, Utc::now())
            .unwrap();
        store.flush().unwrap();
    }
    let alone = rate(ingest_groups * GROUP, start.elapsed());
    println!("ingest alone: {alone:.0} updates/s (groups of {GROUP}, one flush each)");

    // (c)
    record(&store, &[SEGMENT_B]);
    let both = record(&store, &[SEGMENT_A, SEGMENT_B]);
    let mut more = groups(profiles + ingest_groups * GROUP, keep);
    let (scanned, _, ingested, took) = backfill(&store, &both, Some(&mut more));
    let during = rate(ingested, took);
    println!(
        "backfill with ingest between steps: {:.0} profiles/s scanned; ingest {during:.0} updates/s = {:.2} of ingest alone",
        rate(scanned as usize, took),
        during / alone
    );
}
