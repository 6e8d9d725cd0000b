//! Records that cannot be decoded: unreadable exports become dead letters that keep their
//! bytes, unreadable profiles refuse their updates until `outpost repair` forgets them;
//! `outpost check --store` lists them, with the stream records `store::source` finds. And the
//! store's self-check ([`Store::verify`]).

use chrono::Utc;
use sled::Transactional;

use super::codec::{self, ExportRecord};
use super::error::StoreError;
use super::export::ExportId;
use super::keys::{self, meta};
use super::profiles::{
    count_profiles, forget_group, forget_profile, group_name, profile_count_damaged,
    read_profile_count, recount_profiles, unreadable_profiles, Unreadable,
};
use super::tally::{read_tally, write_tally, Place, Tally};
use super::{Store, Trees};
use crate::profile::Reason;

/// The reason (`last_error`) of a dead letter made of an unreadable export record.
pub const UNREADABLE: &str = "unreadable record";

/// The dead letter that stands for an export record that cannot be decoded: no profile, its
/// stored bytes (base64) as the payload, so that nothing is lost and nothing is sent from it
/// (`outbox retry` refuses it; `outbox drop` deletes it).
pub fn unreadable_record(bytes: &[u8], error: &str, now_ms: i64) -> ExportRecord {
    use base64::Engine;
    let stored = base64::engine::general_purpose::STANDARD.encode(bytes);
    ExportRecord {
        last_error: Some(format!("{UNREADABLE}: {error}")),
        dead_at_ms: Some(now_ms),
        ..ExportRecord::new_pending(
            String::new(),
            Reason::Segment,
            serde_json::json!({ "unreadable_record_base64": stored }).to_string(),
            now_ms,
            0,
        )
    }
}

impl ExportRecord {
    /// Whether this is a dead letter made by [`unreadable_record`].
    pub fn is_unreadable(&self) -> bool {
        self.profile_id.is_empty()
            && self
                .last_error
                .as_deref()
                .is_some_and(|e| e.starts_with(UNREADABLE))
    }
}

/// A record that cannot be read, as `outpost check --store` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UnreadableRecord {
    /// `profiles` (a profile), `profile_groups` (a group: all of its profiles), `outbox`,
    /// `dead`, `meta`, `positions` (a stream partition's) or `rejected`.
    pub tree: &'static str,
    /// The key: a profile id, a group's key (hex), an export id, a meta key (bytes shown
    /// escaped when not text).
    pub key: String,
    pub error: String,
    /// What `outpost repair` does with it, or did already.
    pub action: String,
    /// Whether `outpost repair` acts on it (not on `meta` values, rebuilt at open, but the
    /// count of rejected messages that disagrees with them; nor on the stream records it
    /// leaves).
    pub repairs: bool,
    /// The command a partition waits for, stopped until it is run: `nats set-position` for an
    /// unreadable stream position, `nats hand-over` or `nats take-over` for a move left
    /// unfinished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition_waits_for: Option<&'static str>,
}

/// A key as text: as it is when it is UTF-8 without control characters, else escaped.
pub(super) fn key_text(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) if !text.chars().any(char::is_control) => text.to_owned(),
        _ => key.escape_ascii().to_string(),
    }
}

impl Store {
    /// Checks the invariants a crash must not break; returns what is wrong, if anything.
    pub fn verify(&self) -> Result<Vec<String>, StoreError> {
        let mut problems = Vec::new();
        let mut counted = Tally::default();
        let mut max_seq = None;
        let t = self.trees()?;
        for (tree, place) in [(&t.outbox, Place::Pending), (&t.dead, Place::Dead)] {
            for item in tree.iter() {
                let (key, value) = item?;
                counted.count(place, value.len(), 1);
                match self.decode_export(&key, &value, place == Place::Dead) {
                    Ok(e) => max_seq = max_seq.max(Some(e.id.seq)),
                    Err(e) => problems.push(e.to_string()),
                }
            }
        }
        let mut unreadable_group = false;
        for unreadable in unreadable_profiles(&t)? {
            unreadable_group |= matches!(unreadable, Unreadable::Group { .. });
            match unreadable {
                Unreadable::Group { error, .. } | Unreadable::Profile { error, .. } => {
                    problems.push(error.to_string())
                }
                Unreadable::NotAnId { key } => problems.push(format!(
                    "profiles: key {} is not a profile id",
                    key_text(&key)
                )),
            }
        }
        // Missing, the count is unknown (counted at the next open); an unreadable group's
        // profiles are in the kept count but cannot be counted again.
        if profile_count_damaged(&t)? {
            problems.push("meta/profiles is not 8 bytes".into());
        }
        if let (Some(recorded), false) = (read_profile_count(&t)?, unreadable_group) {
            let counted = count_profiles(&t)?;
            if recorded != counted {
                problems.push(format!(
                    "meta/profiles says {recorded}, the groups hold {counted}"
                ));
            }
        }
        let (said, rejected_keys) = super::source::rejected_count_and_keys(&t)?;
        if said != super::source::CountSaid::Missing && !said.holds(rejected_keys) {
            problems.push(format!(
                "meta/rejected says {}, the tree holds {rejected_keys}",
                said.text()
            ));
        }
        let recorded = self.tally()?;
        if recorded != counted {
            problems.push(format!(
                "the tally says {recorded:?}, the trees hold {counted:?}"
            ));
        }
        let next = t
            .meta
            .get(meta::NEXT_SEQ)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0);
        if let Some(max) = max_seq {
            if max >= next {
                problems.push(format!("export {max} is not below next_seq {next}"));
            }
        }
        Ok(problems)
    }

    /// Moves the pending export `seq`, whose record cannot be read, to the dead letters as an
    /// [`unreadable_record`] keeping its bytes. Not flushed.
    pub fn dead_letter_unreadable(&self, seq: u64, error: &str) -> Result<(), StoreError> {
        let key = keys::seq_key(seq);
        let now_ms = Utc::now().timestamp_millis();
        self.with(|t| {
            Ok(
                (&t.outbox, &t.dead, &t.meta).transaction(|(outbox, dead, meta_tx)| {
                    let Some(old) = outbox.remove(&key)? else {
                        return Ok(());
                    };
                    let mut tally = read_tally(meta_tx)?;
                    tally.count(Place::Pending, old.len(), -1);
                    let value = codec::encode_export(&unreadable_record(&old, error, now_ms));
                    tally.count(Place::Dead, value.len(), 1);
                    dead.insert(&key, value)?;
                    write_tally(meta_tx, tally)?;
                    Ok(())
                })?,
            )
        })
    }

    /// Every record that cannot be read, with its key, and the `meta` values rebuilt when the
    /// store was opened.
    pub fn unreadable(&self) -> Result<Vec<UnreadableRecord>, StoreError> {
        self.classified(|| self.list_unreadable())
    }

    /// `run`'s error said as every other I/O error of the store is ([`Store::classify`]): sled
    /// repeats its first I/O error on every later call, shown as its debug string.
    fn classified<T>(&self, run: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let generation = self.generation.load(std::sync::atomic::Ordering::SeqCst);
        run().map_err(|e| self.classify(e, generation))
    }

    fn list_unreadable(&self) -> Result<Vec<UnreadableRecord>, StoreError> {
        let mut found = Vec::new();
        for note in self
            .rebuilt_meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            // The mapping and the backfills cannot be derived from the rest of the store.
            let action = match note.key {
                "mapping" | "backfill" => "dropped when the store was opened",
                _ => "rebuilt when the store was opened",
            };
            found.push(UnreadableRecord {
                tree: "meta",
                key: note.key.to_owned(),
                error: format!("was {}", note.was),
                action: action.into(),
                repairs: false,
                partition_waits_for: None,
            });
        }
        let t = self.trees()?;
        // Damaged while the store is open: unknown until a commit that changes the count drops
        // it, or the next open or a repair counts again.
        if profile_count_damaged(&t)? {
            found.push(UnreadableRecord {
                tree: "meta",
                key: "profiles".into(),
                error: "is not 8 bytes".into(),
                action: "count the profiles again".into(),
                repairs: true,
                partition_waits_for: None,
            });
        }
        for unreadable in unreadable_profiles(&t)? {
            found.push(match unreadable {
                Unreadable::Group { key, error } => UnreadableRecord {
                    tree: "profile_groups",
                    key: group_name(&key),
                    error: error.to_string(),
                    action: "forget the group's profiles (their next updates count them as new)"
                        .into(),
                    repairs: true,
                    partition_waits_for: None,
                },
                Unreadable::Profile { id, error } => UnreadableRecord {
                    tree: "profiles",
                    key: id,
                    error: error.to_string(),
                    action: "forget the profile (its next update counts it as new)".into(),
                    repairs: true,
                    partition_waits_for: None,
                },
                Unreadable::NotAnId { key } => UnreadableRecord {
                    tree: "profiles",
                    key: key_text(&key),
                    error: "the key is not a profile id (not UTF-8)".into(),
                    action: "delete it".into(),
                    repairs: true,
                    partition_waits_for: None,
                },
            });
        }
        found.extend(self.unreadable_exports(&t)?);
        found.extend(self.unreadable_stream_records()?);
        Ok(found)
    }

    /// The unreadable records of `outbox` and `dead`.
    fn unreadable_exports(&self, t: &Trees) -> Result<Vec<UnreadableRecord>, StoreError> {
        let mut found = Vec::new();
        for (tree, name, dead) in [(&t.outbox, "outbox", false), (&t.dead, "dead", true)] {
            for item in tree.iter() {
                let (raw, value) = item?;
                let Err(e) = self.decode_export(&raw, &value, dead) else {
                    continue;
                };
                let (key, action) = match keys::seq_from_key(&raw) {
                    Some(seq) => (
                        self.export_id(seq).to_string(),
                        "keep it as a dead letter \"unreadable record\" with its bytes",
                    ),
                    None => (key_text(&raw), "delete it (the key is not an export id)"),
                };
                found.push(UnreadableRecord {
                    tree: name,
                    key,
                    error: e.to_string(),
                    action: action.into(),
                    repairs: true,
                    partition_waits_for: None,
                });
            }
        }
        Ok(found)
    }

    /// Acts on every unreadable record as [`Store::unreadable`] says: forgets unreadable
    /// profiles, keeps unreadable exports as dead letters "unreadable record" (with their
    /// bytes), deletes outbox and dead entries whose key is not an export id. Flushed. Returns
    /// what it did, one line each. It also counts the profiles again (`meta/profiles`).
    pub fn repair_unreadable(&self) -> Result<Vec<String>, StoreError> {
        self.classified(|| self.repair_unreadable_records())
    }

    fn repair_unreadable_records(&self) -> Result<Vec<String>, StoreError> {
        // Written and flushed on the same handles: a reopen waits for the section.
        let _section = self.write_section()?;
        let t = self.trees()?;
        // Listed first, without holding the committer up: what is unreadable stays so.
        let profiles = unreadable_profiles(&t)?;
        let found = self.unreadable_exports(&t)?;
        let stream_keys = super::source::stream_keys_not_ids(&t)?;
        let _writer = self.lock_profile_writer();
        let counted_before = read_profile_count(&t)?;
        let damaged_before = profile_count_damaged(&t)?;
        let repairs_profiles = !profiles.is_empty();
        if repairs_profiles {
            // The count is unknown until recounted below: a kill in between leaves it missing,
            // and the next open counts.
            t.meta.remove(meta::PROFILES)?;
            self.flush()?;
        }
        let mut done = Vec::new();
        // Groups first, so that a group's leftovers in the old tree are in it before they are
        // judged.
        for unreadable in profiles {
            match unreadable {
                Unreadable::Group { key, error } => {
                    let moved = forget_group(&t, &key)?;
                    done.push(format!(
                        "profile group {}: its profiles forgotten ({error}){}",
                        group_name(&key),
                        match moved {
                            0 => String::new(),
                            n => format!(
                                "; {n} profiles the upgrade could not move into it moved in"
                            ),
                        }
                    ));
                }
                Unreadable::Profile { id, error } => {
                    forget_profile(&t, &id)?;
                    done.push(format!("profile {id}: forgotten ({error})"));
                }
                Unreadable::NotAnId { key } => {
                    t.legacy_profiles.remove(&key)?;
                    done.push(format!(
                        "profiles entry with key {}: deleted (the key is not a profile id)",
                        key_text(&key)
                    ));
                }
            }
        }
        let count = recount_profiles(&t)?;
        if repairs_profiles || Some(count) != counted_before {
            let said = match (counted_before, damaged_before) {
                (Some(n), _) => n.to_string(),
                (None, true) => "something unreadable".into(),
                (None, false) => "nothing".into(),
            };
            done.push(format!(
                "profiles counted again: {count} (meta/profiles said {said})"
            ));
        }
        for record in found {
            match record.tree {
                "outbox" | "dead" => {
                    let tree = if record.tree == "outbox" {
                        &t.outbox
                    } else {
                        &t.dead
                    };
                    let place = if record.tree == "outbox" {
                        Place::Pending
                    } else {
                        Place::Dead
                    };
                    let id: Option<ExportId> = record.key.parse().ok();
                    let now_ms = Utc::now().timestamp_millis();
                    // Find the raw key again: the listed key is an export id or escaped bytes.
                    let raw: Option<Vec<u8>> = match id {
                        Some(id) => Some(keys::seq_key(id.seq).to_vec()),
                        None => tree
                            .iter()
                            .keys()
                            .filter_map(Result::ok)
                            .find(|k| key_text(k) == record.key)
                            .map(|k| k.to_vec()),
                    };
                    let Some(raw) = raw else { continue };
                    (&t.outbox, &t.dead, &t.meta).transaction(|(outbox, dead, meta_tx)| {
                        let source = if place == Place::Pending {
                            outbox
                        } else {
                            dead
                        };
                        let Some(old) = source.remove(raw.as_slice())? else {
                            return Ok(());
                        };
                        let mut tally = read_tally(meta_tx)?;
                        tally.count(place, old.len(), -1);
                        if id.is_some() {
                            let value = codec::encode_export(&unreadable_record(
                                &old,
                                &record.error,
                                now_ms,
                            ));
                            tally.count(Place::Dead, value.len(), 1);
                            dead.insert(raw.as_slice(), value)?;
                        }
                        write_tally(meta_tx, tally)?;
                        Ok(())
                    })?;
                    done.push(match id {
                        Some(_) => format!(
                            "export {} ({}): a dead letter \"{UNREADABLE}\" ({})",
                            record.key, record.tree, record.error
                        ),
                        None => format!(
                            "{} entry with key {}: deleted ({})",
                            record.tree, record.key, record.error
                        ),
                    });
                }
                _ => {}
            }
        }
        done.extend(super::source::delete_stream_keys(&t, &stream_keys)?);
        done.extend(super::source::recount_rejected(&t)?);
        drop(t);
        self.flush()?;
        Ok(done)
    }
}
