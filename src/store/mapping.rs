//! The mapping the store last ran with, per segment: when it was first mapped and when its
//! entry (name, its own times) last changed or it was mapped again after leaving the mapping. The payload's `mappingCreatedAt` and
//! `mappingUpdatedAt` come from here.
//!
//! Value of `meta/mapping`: one format byte, then JSON `{segment id: {created_ms, updated_ms,
//! entry, mapped}}`, `entry` being what the config said of the segment and `mapped` whether
//! the last run mapped it. Segments that left the mapping keep their record, so one mapped
//! again keeps its first time. A segment mapped now that the last run did not map is
//! backfilled (see `store::backfill`): recording the mapping and queuing its backfill are one
//! atomic write.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::codec;
use super::keys::meta;
use super::{Store, StoreError};
use crate::config::{MappedAt, Mapping};

const MAPPING_V1: u8 = 1;

/// The entry of a segment a take-over recorded, which knows its id alone: the first run takes
/// the config's entry as it is, not as a change (`mappingUpdatedAt` stays when it was
/// recorded). Never an entry [`entry_of`] makes.
const ENTRY_NOT_KNOWN: &str = "taken over";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedSegment {
    pub created_ms: i64,
    pub updated_ms: i64,
    /// What the config said of the segment besides its id, as text to compare.
    pub entry: String,
    /// Whether the last run mapped it (records written before this field: mapped).
    #[serde(default = "mapped_by_default")]
    pub mapped: bool,
}

fn mapped_by_default() -> bool {
    true
}

/// The config's entry of `segment`, as text that changes when the entry does: the same for
/// `"seg"` and `{ id = "seg" }`, which say the same.
fn entry_of(mapping: &Mapping, segment: &str) -> String {
    match mapping.segment_details.get(segment) {
        Some(d) if d.name.is_some() || d.created_at_ms.is_some() || d.updated_at_ms.is_some() => {
            format!("{:?}|{:?}|{:?}", d.name, d.created_at_ms, d.updated_at_ms)
        }
        _ => String::new(),
    }
}

/// The records after running with `mapping` at `now_ms` (pure): new segments are created now,
/// changed entries and segments mapped again updated now, the rest kept, each marked mapped or
/// not.
pub fn updated_records(
    mut records: BTreeMap<String, RecordedSegment>,
    mapping: &Mapping,
    now_ms: i64,
) -> BTreeMap<String, RecordedSegment> {
    for (segment, record) in records.iter_mut() {
        if !mapping.segments.contains(segment) {
            record.mapped = false;
        }
    }
    for segment in &mapping.segments {
        let entry = entry_of(mapping, segment);
        match records.get_mut(segment) {
            Some(record) => {
                // Builds before `{ id = "seg" }` counted as no entry recorded it so.
                let recorded = match record.entry.as_str() {
                    "None|None|None" => Some(""),
                    ENTRY_NOT_KNOWN => None,
                    other => Some(other),
                };
                if recorded.is_some_and(|recorded| recorded != entry) || !record.mapped {
                    record.updated_ms = now_ms;
                }
                if recorded != Some(entry.as_str()) || !record.mapped {
                    record.entry = entry;
                }
                record.mapped = true;
            }
            None => {
                records.insert(
                    segment.clone(),
                    RecordedSegment {
                        created_ms: now_ms,
                        updated_ms: now_ms,
                        entry,
                        mapped: true,
                    },
                );
            }
        }
    }
    records
}

/// The segments of `mapping` that the last run (`before`) did not map: those to backfill.
/// A store that recorded no mapping yet has nothing to backfill: whatever it holds was stored
/// under this mapping, as far as anyone can tell.
pub fn newly_mapped(before: &BTreeMap<String, RecordedSegment>, mapping: &Mapping) -> Vec<String> {
    newly_mapped_ids(before, &mapping.segments)
}

/// The segments `before` had mapped that `mapping` leaves out.
pub fn no_longer_mapped(
    before: &BTreeMap<String, RecordedSegment>,
    mapping: &Mapping,
) -> Vec<String> {
    before
        .iter()
        .filter(|(id, r)| r.mapped && !mapping.segments.contains(id))
        .map(|(id, _)| id.clone())
        .collect()
}

fn newly_mapped_ids(
    before: &BTreeMap<String, RecordedSegment>,
    segments: &[String],
) -> Vec<String> {
    if before.is_empty() {
        return Vec::new();
    }
    segments
        .iter()
        .filter(|s| before.get(*s).is_none_or(|r| !r.mapped))
        .cloned()
        .collect()
}

pub(super) fn decode_records(
    bytes: &[u8],
) -> Result<BTreeMap<String, RecordedSegment>, StoreError> {
    codec::decode_json(MAPPING_V1, bytes)
        .map_err(|e| StoreError::corrupt("the recorded mapping", e))
}

impl Store {
    /// Which of `segments` the store's last recorded mapping did not map: the agent backfills
    /// them at its next start. None when no mapping was ever recorded (nothing to backfill).
    pub fn segments_not_yet_run_with(
        &self,
        segments: &[String],
    ) -> Result<Vec<String>, StoreError> {
        Ok(newly_mapped_ids(&self.mapping_records()?, segments))
    }

    /// Records `segments` as the mapping this store ran with, their entries not known: a
    /// take-over into a store that has run with no mapping (`handover::take_over_as`). Not
    /// flushed: the take-over flushes it with what it stores.
    pub(super) fn record_segments_taken_over(
        &self,
        segments: &[String],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let records: BTreeMap<String, RecordedSegment> = segments
            .iter()
            .map(|segment| {
                let record = RecordedSegment {
                    created_ms: now_ms,
                    updated_ms: now_ms,
                    entry: ENTRY_NOT_KNOWN.into(),
                    mapped: true,
                };
                (segment.clone(), record)
            })
            .collect();
        let value = codec::encode_json(MAPPING_V1, &records);
        self.with(|t| {
            t.meta.insert(meta::MAPPING, value)?;
            Ok(())
        })
    }

    pub(super) fn mapping_records(&self) -> Result<BTreeMap<String, RecordedSegment>, StoreError> {
        let Some(value) = self.with(|t| Ok(t.meta.get(meta::MAPPING)?))? else {
            return Ok(BTreeMap::new());
        };
        decode_records(&value)
    }

    /// Records that the store now runs with `mapping` (durably), queues the backfill of its
    /// newly mapped segments in the same write, and fills [`Mapping::mapped_at`] from the
    /// records.
    pub fn record_mapping(&self, mapping: &mut Mapping, now_ms: i64) -> Result<(), StoreError> {
        let before = self.mapping_records()?;
        let records = updated_records(before.clone(), mapping, now_ms);
        if records != before {
            let value = codec::encode_json(MAPPING_V1, &records);
            let mut write = sled::Batch::default();
            write.insert(meta::MAPPING, value);
            let segments = newly_mapped(&before, mapping);
            let queued = self.backfill_state()?;
            if !segments.is_empty() {
                tracing::info!(
                    ?segments,
                    "newly mapped segments: their stored members will be exported (backfill)"
                );
            }
            let unmapped = no_longer_mapped(&before, mapping);
            if !unmapped.is_empty() {
                tracing::info!(
                    segments = ?unmapped,
                    "segments no longer mapped: payloads leave them out and their changes export nothing from now on (the destination is not told); mapped again, their stored members are exported again (backfill)"
                );
            }
            if !segments.is_empty() || !queued.jobs.is_empty() {
                let profiles = self.profile_count()?;
                // Nothing is written meanwhile: the store is being opened.
                let next_seq = self.written_next.load(std::sync::atomic::Ordering::SeqCst);
                let backfill = queued.with_new_segments(
                    &mapping.segments,
                    segments,
                    profiles,
                    now_ms,
                    next_seq,
                );
                write.insert(meta::BACKFILL, backfill.encode());
            }
            self.with(|t| Ok(t.meta.apply_batch(write)?))?;
            self.flush()?;
        }
        if self.remove_unneeded_marks()? > 0 {
            self.flush()?;
        }
        mapping.mapped_at = mapping
            .segments
            .iter()
            .filter_map(|s| {
                let r = records.get(s)?;
                Some((
                    s.clone(),
                    MappedAt {
                        created_ms: r.created_ms,
                        updated_ms: r.updated_ms,
                    },
                ))
            })
            .collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SegmentDetails;

    #[test]
    fn new_segments_are_created_changed_entries_updated_and_records_kept() {
        let mut mapping = Mapping::new(&[], &["a", "b"], &[]);
        let first = updated_records(BTreeMap::new(), &mapping, 100);
        assert_eq!(first["a"].created_ms, 100);
        assert_eq!(first["b"].updated_ms, 100);

        // Later: b gets a name, c is added, a leaves the mapping.
        mapping.segments = vec!["b".into(), "c".into()];
        mapping.segment_details.insert(
            "b".into(),
            SegmentDetails {
                name: Some("Lapsed VIPs".into()),
                ..SegmentDetails::default()
            },
        );
        let second = updated_records(first.clone(), &mapping, 200);
        assert_eq!(
            (second["a"].created_ms, second["a"].updated_ms),
            (100, 100),
            "kept for when it is mapped again"
        );
        assert_eq!((second["b"].created_ms, second["b"].updated_ms), (100, 200));
        assert_eq!((second["c"].created_ms, second["c"].updated_ms), (200, 200));

        assert!(!second["a"].mapped && second["b"].mapped && second["c"].mapped);

        // The same mapping again changes nothing.
        assert_eq!(updated_records(second.clone(), &mapping, 300), second);
    }

    #[test]
    fn segments_the_last_run_did_not_map_are_newly_mapped() {
        let first = Mapping::new(&[], &["a", "b"], &[]);
        let records = updated_records(BTreeMap::new(), &first, 100);
        assert!(
            newly_mapped(&BTreeMap::new(), &first).is_empty(),
            "a store without a recorded mapping backfills nothing"
        );
        assert!(newly_mapped(&records, &first).is_empty());
        // b leaves, c comes.
        let second = Mapping::new(&[], &["a", "c"], &[]);
        assert_eq!(newly_mapped(&records, &second), ["c"]);
        assert_eq!(no_longer_mapped(&records, &second), ["b"]);
        let records = updated_records(records, &second, 200);
        // Said once: the run after knows it left.
        assert!(no_longer_mapped(&records, &second).is_empty());
        // b comes back: mapped again, backfilled again; its first time is kept, and its
        // mapping changed then.
        let third = Mapping::new(&[], &["a", "b", "c"], &[]);
        assert_eq!(newly_mapped(&records, &third), ["b"]);
        let b = &updated_records(records, &third, 300)["b"];
        assert_eq!((b.created_ms, b.updated_ms), (100, 300));
    }

    #[test]
    fn a_segment_written_as_a_table_with_its_id_alone_is_no_change() {
        let plain = Mapping::new(&[], &["a"], &[]);
        let records = updated_records(BTreeMap::new(), &plain, 100);
        let mut table = plain.clone();
        table
            .segment_details
            .insert("a".into(), SegmentDetails::default());
        assert_eq!(updated_records(records.clone(), &table, 200), records);
        // As an earlier build recorded it: no change either.
        let mut earlier = records.clone();
        earlier.get_mut("a").unwrap().entry = "None|None|None".into();
        assert_eq!(updated_records(earlier, &table, 200)["a"].updated_ms, 100);
    }

    #[test]
    fn the_records_survive_reopening_and_fill_the_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let mut mapping = Mapping::new(&[], &["a"], &[]);
        {
            let store = Store::open(dir.path(), 8 << 20).unwrap();
            store.record_mapping(&mut mapping, 1_000).unwrap();
        }
        assert_eq!(
            mapping.mapped_at["a"],
            MappedAt {
                created_ms: 1_000,
                updated_ms: 1_000
            }
        );
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let mut again = Mapping::new(&[], &["a", "b"], &[]);
        store.record_mapping(&mut again, 2_000).unwrap();
        assert_eq!(again.mapped_at["a"].created_ms, 1_000);
        assert_eq!(again.mapped_at["b"].created_ms, 2_000);
    }
}
