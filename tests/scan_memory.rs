//! What reading a whole sled store keeps in memory. Every full scan outpost makes (`check
//! --store`, `repair`, a backfill, a hand-over) reads each page of a tree once; sled's page
//! cache must let those pages go as it goes, within `cache_bytes`. sled 0.34.7 as published
//! counts a read page against its cache only once the page's shard (one of 256) has queued 64
//! reads, so a scan kept up to 16,384 pages uncounted; outpost builds the copy in `vendor/sled`,
//! which counts every fourth read (vendor/README.md).

mod common;

use common::memory::{measured_in_a_process_of_its_own_with, resident_rise_during};

const CACHE_BYTES: u64 = 1 << 20;
const KEYS: u32 = 100_000;
const VALUE_BYTES: usize = 400;
const STORE: &str = "OUTPOST_SCAN_TEST_STORE";

fn open(path: &std::path::Path) -> sled::Tree {
    let db = sled::Config::new()
        .path(path)
        .cache_capacity(CACHE_BYTES)
        .open()
        .unwrap();
    db.open_tree("groups").unwrap()
}

/// Keys in no order, as profile groups' are (the top bits of a hash).
fn key(i: u32) -> [u8; 4] {
    i.wrapping_mul(2_654_435_761).to_be_bytes()
}

/// 40 MB of values in about 8,000 leaf pages (sled splits a leaf past 16 keys), read back by
/// a process that has only opened the store: with sled as published the scan raised the
/// resident peak by 50 MB (two runs), with the change by 9 MB.
#[test]
fn a_scan_of_a_whole_store_keeps_within_a_few_mb_of_its_cache() {
    let test = "a_scan_of_a_whole_store_keeps_within_a_few_mb_of_its_cache";
    let Some(path) = std::env::var_os(STORE) else {
        let dir = tempfile::tempdir().unwrap();
        let tree = open(dir.path());
        for chunk in (0..KEYS).collect::<Vec<_>>().chunks(1_000) {
            let mut batch = sled::Batch::default();
            for &i in chunk {
                batch.insert(&key(i), vec![(i % 251) as u8; VALUE_BYTES]);
            }
            tree.apply_batch(batch).unwrap();
        }
        tree.flush().unwrap();
        drop(tree);
        measured_in_a_process_of_its_own_with(test, &[(STORE, dir.path())]);
        return;
    };
    let tree = open(std::path::Path::new(&path));

    let ((keys, bytes), rise) = resident_rise_during(|| {
        tree.iter().fold((0u32, 0usize), |(keys, bytes), item| {
            let (_, value) = item.unwrap();
            (keys + 1, bytes + value.len())
        })
    });

    assert_eq!((keys, bytes), (KEYS, KEYS as usize * VALUE_BYTES));
    let bound = 16 << 20;
    assert!(
        rise < bound,
        "reading {bytes} bytes through a {CACHE_BYTES}-byte cache raised the resident peak by \
         {rise} bytes (at most {bound})"
    );
}
