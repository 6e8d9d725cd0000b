//! Profile groups: the stored profiles, a few to a sled key.
//!
//! `profile_groups`: key = the group, 4 bytes big-endian: the top [`GROUP_BITS`] bits of the
//! xxHash64 (seed 0) of the profile id; value = format byte [`GROUP_V1`] + bincode of the
//! group's entries `[(profile id, profile value)]`, ids ascending and distinct, each profile
//! value as [`codec`](super::codec) encodes one (format byte + record; format 1, JSON, only
//! in groups filled by the upgrade from a profile it could not read).
//!
//! Why groups: sled 0.34 keeps bookkeeping in memory for every page of every tree for as long
//! as the store is open (each page's log fragments), and splits a leaf page past 16 keys, so
//! what an open store holds grows with its number of keys. A store of 1,000,000 keys of 250
//! bytes held 54 MiB once opened; 250,000 keys of 1,000 bytes (the same bytes, four to a key)
//! 14 MiB, and 100,000 updates through a transaction and a flush per 500 ran within 4% of each
//! other (README "Memory"). With 2^18 groups a store of 1,000,000 profiles has about four to a
//! group, and a small store one.
//!
//! Invariants:
//! - a profile is in the group its id hashes to, at most once;
//! - a group with no entry is not stored;
//! - groups are changed by one writer at a time (`Store::profile_writer`), so reading a group
//!   outside a transaction and writing it back inside one loses no entry.

use bincode::{BorrowDecode, Encode};

use super::codec::{with_decode_config, CodecError};

/// How many bits of the hash name a group: 2^18 = 262,144 groups.
pub const GROUP_BITS: u32 = 18;

pub const GROUP_V1: u8 = 1;

pub type GroupKey = [u8; GROUP_KEY_LEN];

pub const GROUP_KEY_LEN: usize = 4;

/// A profile's id and stored value.
pub type Entry<'a> = (&'a str, &'a [u8]);

/// A change to a group: store this value for the profile, or (`None`) remove it.
pub type Change<'a> = (&'a str, Option<&'a [u8]>);

/// The group a profile id belongs to.
pub fn group_key(id: &str) -> GroupKey {
    let hash = twox_hash::XxHash64::oneshot(0, id.as_bytes());
    let group = (hash >> (64 - GROUP_BITS)) as u32;
    group.to_be_bytes()
}

/// A group's entries, borrowed from its stored bytes: decoding copies nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupView<'a> {
    entries: Vec<Entry<'a>>,
}

#[derive(Encode, BorrowDecode)]
struct Entries<'a>(Vec<Entry<'a>>);

impl<'a> GroupView<'a> {
    pub fn decode(bytes: &'a [u8]) -> Result<GroupView<'a>, CodecError> {
        let (&format, rest) = bytes.split_first().ok_or(CodecError::Empty)?;
        if format != GROUP_V1 {
            return Err(CodecError::UnknownFormat(format));
        }
        let (Entries(entries), used): (Entries<'a>, usize) =
            with_decode_config!(rest.len(), |config| {
                bincode::borrow_decode_from_slice(rest, config)
            })
            .map_err(|e| CodecError::Corrupt(e.to_string()))?;
        if used != rest.len() {
            return Err(CodecError::Corrupt(format!(
                "{} trailing bytes",
                rest.len() - used
            )));
        }
        if entries.windows(2).any(|pair| pair[0].0 >= pair[1].0) {
            return Err(CodecError::Corrupt(
                "profile ids out of order or repeated".into(),
            ));
        }
        Ok(GroupView { entries })
    }

    /// The stored value of profile `id`, if the group holds it.
    pub fn get(&self, id: &str) -> Option<&'a [u8]> {
        let at = self.entries.binary_search_by(|(e, _)| (*e).cmp(id)).ok()?;
        Some(self.entries[at].1)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries in id order.
    pub fn entries(&self) -> &[Entry<'a>] {
        &self.entries
    }

    /// The group with `changes` made (`Some`: store this value, `None`: remove the profile),
    /// encoded; `None` when no entry is left (the group is then removed). `changes` must be
    /// sorted by id, each id once.
    pub fn with_changes(&self, changes: &[Change]) -> Option<Vec<u8>> {
        debug_assert!(changes.windows(2).all(|pair| pair[0].0 < pair[1].0));
        let mut merged: Vec<Entry> = Vec::with_capacity(self.entries.len() + changes.len());
        let (mut old, mut new) = (self.entries.iter().peekable(), changes.iter().peekable());
        loop {
            match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(&&entry), None) => {
                    merged.push(entry);
                    old.next();
                }
                (Some(&&(old_id, _)), Some(&&(new_id, _))) if old_id < new_id => {
                    merged.push(*old.next().expect("peeked"));
                }
                (old_entry, Some(&&(id, value))) => {
                    if old_entry.is_some_and(|(old_id, _)| *old_id == id) {
                        old.next();
                    }
                    if let Some(value) = value {
                        merged.push((id, value));
                    }
                    new.next();
                }
            }
        }
        (!merged.is_empty()).then(|| encode(&merged))
    }
}

/// Encodes entries sorted by id, each id once.
pub fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut bytes = vec![GROUP_V1];
    bincode::encode_into_std_write(
        Entries(entries.to_vec()),
        &mut bytes,
        bincode::config::standard(),
    )
    .expect("writing to a Vec cannot fail");
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Profiles that share a group may together take more than one alone may: the group reads
    /// back.
    #[test]
    fn a_group_larger_than_a_small_value_reads_back() {
        let (a, b) = (vec![1u8; 40 << 20], vec![2u8; 40 << 20]);
        let group = GroupView::default()
            .with_changes(&[("a", Some(&a[..])), ("b", Some(&b[..]))])
            .unwrap();
        let view = GroupView::decode(&group).unwrap();
        assert_eq!((view.get("a"), view.get("b")), (Some(&a[..]), Some(&b[..])));
    }

    #[test]
    fn the_hash_is_xxhash64_and_groups_are_its_top_bits() {
        // Stored keys depend on it: pinned to the reference values of xxHash64, seed 0.
        assert_eq!(twox_hash::XxHash64::oneshot(0, b""), 0xef46db3751d8e999);
        assert_eq!(twox_hash::XxHash64::oneshot(0, b"a"), 0xd24ec4f1a98c6e5b);
        // 0xd24ec4f1... >> 46 = 0x3493b.
        assert_eq!(group_key("a"), 0x3493bu32.to_be_bytes());
    }

    #[test]
    fn a_group_spreads_a_million_ids_about_evenly() {
        let mut counts = vec![0u32; 1 << GROUP_BITS];
        for i in 0..1_000_000 {
            let key = group_key(&format!("profile-{i}"));
            counts[u32::from_be_bytes(key) as usize] += 1;
        }
        let max = *counts.iter().max().unwrap();
        assert!(max <= 20, "a group of {max}");
        assert!(counts.iter().filter(|&&c| c == 0).count() < 20_000);
    }

    #[test]
    fn changes_merge_in_id_order() {
        let stored = encode(&[("b", b"2"), ("d", b"4")]);
        let view = GroupView::decode(&stored).unwrap();
        assert_eq!(view.get("b"), Some(&b"2"[..]));
        assert_eq!(view.get("c"), None);
        let cases: &[(&[Change], Option<&[Entry]>)] = &[
            (&[], Some(&[("b", b"2"), ("d", b"4")])),
            (
                &[("a", Some(b"1"))],
                Some(&[("a", b"1"), ("b", b"2"), ("d", b"4")]),
            ),
            (
                &[("c", Some(b"3")), ("e", Some(b"5"))],
                Some(&[("b", b"2"), ("c", b"3"), ("d", b"4"), ("e", b"5")]),
            ),
            (&[("b", Some(b"9"))], Some(&[("b", b"9"), ("d", b"4")])),
            (&[("b", None)], Some(&[("d", b"4")])),
            (&[("a", None), ("d", None)], Some(&[("b", b"2")])),
            (&[("b", None), ("d", None)], None),
        ];
        for (changes, expected) in cases {
            let merged = view.with_changes(changes);
            assert_eq!(merged, expected.map(encode), "{changes:?}");
        }
    }

    #[test]
    fn bad_groups_are_refused_with_what_is_wrong() {
        let good = encode(&[("a", b"1")]);
        let mut trailing = good.clone();
        trailing.push(0);
        let mut unknown = good.clone();
        unknown[0] = 9;
        let unsorted = {
            let mut bytes = vec![GROUP_V1];
            bincode::encode_into_std_write(
                Entries(vec![("b", b"2"), ("a", b"1")]),
                &mut bytes,
                bincode::config::standard(),
            )
            .unwrap();
            bytes
        };
        for (bytes, needle) in [
            (&[][..], "empty"),
            (&unknown[..], "unknown format byte 9"),
            (&trailing[..], "trailing"),
            (&unsorted[..], "out of order"),
            (&good[..good.len() - 1], "corrupt"),
            (&[GROUP_V1, 0xff, 0xff][..], "corrupt"),
        ] {
            let error = GroupView::decode(bytes).unwrap_err().to_string();
            assert!(error.contains(needle), "{bytes:?}: {error}");
        }
    }
}
