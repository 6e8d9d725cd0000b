//! Which partition a profile belongs to, and which partitions an agent owns (pure).
//!
//! Every producer, in any language, must route a profile the same way, so the function is
//! fixed forever: FNV-1a 64 of the id's UTF-8 bytes, modulo the number of partitions. The
//! README lists the test vectors below for producers to check against.

/// FNV-1a 64's offset basis: the hash of nothing.
pub const FNV1A64_EMPTY: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a, 64 bits: offset basis 0xcbf29ce484222325, prime 0x100000001b3.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_extend(FNV1A64_EMPTY, bytes)
}

/// The FNV-1a 64 of what `hash` is the hash of, followed by `bytes`.
pub fn fnv1a64_extend(mut hash: u64, bytes: &[u8]) -> u64 {
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The partition of profile `id` among `partitions` (which must be above 0).
pub fn partition_of(id: &str, partitions: u32) -> u32 {
    partition_of_hash(id_hash(id), partitions)
}

/// What a profile id's partition is taken from, whatever the number of partitions.
pub fn id_hash(id: &str) -> u64 {
    fnv1a64(id.as_bytes())
}

/// [`partition_of`] the id whose [`id_hash`] is `hash`.
pub fn partition_of_hash(hash: u64, partitions: u32) -> u32 {
    (hash % u64::from(partitions)) as u32
}

/// The subject updates of `partition` are published on: `<prefix>.<partition>`.
pub fn subject_of(prefix: &str, partition: u32) -> String {
    format!("{prefix}.{partition}")
}

/// Whether `subject` is the subject of one of `partitions` under `prefix`, written as
/// [`subject_of`] writes it (`<prefix>.01` is not: no consumer filters on it).
pub fn is_partition_subject(prefix: &str, subject: &str, partitions: u32) -> bool {
    subject
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('.'))
        .and_then(|n| {
            n.parse::<u32>()
                .ok()
                .filter(|p| subject_of(prefix, *p) == subject)
        })
        .is_some_and(|p| p < partitions)
}

/// Parses an `owned` list such as `0-3,7,9-11` into sorted partition numbers, each below
/// `partitions`, none listed twice.
pub fn parse_owned(text: &str, partitions: u32) -> Result<Vec<u32>, String> {
    let number = |s: &str| -> Result<u32, String> {
        let s = s.trim();
        // Digits only: `u32::from_str` would take `+1`.
        s.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| s.parse::<u32>().ok())
            .flatten()
            .ok_or_else(|| format!("`{s}` is not a partition number"))
    };
    let mut owned = Vec::new();
    for item in text.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(format!(
                "`{text}` has an empty item; write ranges and numbers like 0-3,7,9-11"
            ));
        }
        let (first, last) = match item.split_once('-') {
            Some((a, b)) if a.trim().is_empty() || b.trim().is_empty() => {
                return Err(format!(
                    "range `{item}` needs a partition number on each side of its `-` \
                     (partitions are numbered from 0)"
                ))
            }
            Some((a, b)) => (number(a)?, number(b)?),
            None => {
                let n = number(item)?;
                (n, n)
            }
        };
        if first > last {
            return Err(format!("range `{item}` runs backwards"));
        }
        if last >= partitions {
            return Err(format!(
                "partition {last} is not below partitions = {partitions} (partitions are numbered from 0)"
            ));
        }
        owned.extend(first..=last);
    }
    owned.sort_unstable();
    if let Some(pair) = owned.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("partition {} is listed twice", pair[0]));
    }
    Ok(owned)
}

/// Writes partitions back as the shortest list of ranges: `[0,1,2,3,7]` is `0-3,7`.
pub fn format_owned(owned: &[u32]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < owned.len() {
        let start = owned[i];
        let mut end = start;
        while i + 1 < owned.len() && owned[i + 1] == end + 1 {
            i += 1;
            end = owned[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

/// The partitions of a stream (`[source.nats]`) this agent owns. An update that does not come
/// from the stream (HTTP, `outpost ingest`) of a profile of another partition is refused (see
/// `Committer::owning`): the agent that owns that partition stores and exports the profile's
/// updates from the stream, and per-profile order holds only where one agent takes them all.
/// Stored here too, it would be exported after the other agent's later versions, or before
/// its earlier ones.
#[derive(Debug)]
pub struct Ownership {
    partitions: u32,
    owned: Vec<bool>,
}

impl Ownership {
    /// `owned` of `partitions` (at least one), each below it.
    pub fn new(partitions: u32, owned: &[u32]) -> Ownership {
        let mut flags = vec![false; partitions as usize];
        for &partition in owned {
            flags[partition as usize] = true;
        }
        Ownership {
            partitions,
            owned: flags,
        }
    }

    /// Where, among profiles known by their ids' [`id_hash`]es, the first of a partition not
    /// owned lies, and that partition.
    pub fn first_not_owned(&self, hashes: impl IntoIterator<Item = u64>) -> Option<(usize, u32)> {
        hashes.into_iter().enumerate().find_map(|(index, hash)| {
            let partition = partition_of_hash(hash, self.partitions);
            (!self.owned[partition as usize]).then_some((index, partition))
        })
    }

    /// The partition of profile `id`, when it is not owned.
    pub fn not_owning(&self, id: &str) -> Option<u32> {
        self.first_not_owned([id_hash(id)])
            .map(|(_, partition)| partition)
    }

    /// The refusal of an update of profile `id`, of `partition`, which is not owned.
    pub fn refusal(&self, id: &str, partition: u32) -> String {
        let owned: Vec<u32> = (0..self.partitions)
            .filter(|&p| self.owned[p as usize])
            .collect();
        format!(
            "profile {id} is in partition {partition}, which this agent does not own \
             (source.nats.owned = \"{}\"): publish its updates to the stream (`outpost \
             publish`), which the agent that owns the partition consumes, and not to this one",
            format_owned(&owned)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_subjects_are_those_the_consumers_filter_on() {
        for (subject, is) in [
            ("u.p.0", true),
            ("u.p.63", true),
            ("u.p.64", false),
            ("u.p.01", false),
            ("u.p.+1", false),
            ("u.p.1.x", false),
            ("u.p", false),
            ("u.px.1", false),
            ("v.p.1", false),
        ] {
            assert_eq!(is_partition_subject("u.p", subject, 64), is, "{subject}");
        }
    }

    /// The vectors the README gives producers. The first three are FNV's published ones.
    #[test]
    fn fnv1a64_vectors() {
        for (input, hash) in [
            ("", 0xcbf2_9ce4_8422_2325u64),
            ("a", 0xaf63_dc4c_8601_ec8c),
            ("foobar", 0x8594_4171_f739_67e8),
        ] {
            assert_eq!(fnv1a64(input.as_bytes()), hash, "fnv1a64({input:?})");
        }
        assert_eq!(fnv1a64_extend(fnv1a64(b"foo"), b"bar"), fnv1a64(b"foobar"));
    }

    #[test]
    fn partition_vectors() {
        for (id, partitions, partition) in [
            ("p-000123", 64, 38),
            ("p-000123", 12, 2),
            ("p-000001", 64, 41),
            ("p-000001", 8, 1),
            ("émilie@example.com", 64, 38),
            ("a", 1, 0),
        ] {
            assert_eq!(
                partition_of(id, partitions),
                partition,
                "partition_of({id:?}, {partitions})"
            );
        }
    }

    #[test]
    fn owned_lists_parse() {
        for (text, partitions, owned) in [
            ("0-3,7,9-11", 12, vec![0, 1, 2, 3, 7, 9, 10, 11]),
            ("5", 8, vec![5]),
            (" 2 - 3 , 0 ", 4, vec![0, 2, 3]),
            ("0-63", 64, (0..64).collect()),
        ] {
            assert_eq!(parse_owned(text, partitions).as_ref(), Ok(&owned), "{text}");
            assert_eq!(
                parse_owned(&format_owned(&owned), partitions),
                Ok(owned.clone())
            );
        }
        assert_eq!(format_owned(&[0, 1, 2, 3, 7, 9, 10, 11]), "0-3,7,9-11");
    }

    #[test]
    fn bad_owned_lists_say_why() {
        for (text, partitions, message) in [
            ("", 8, "empty item"),
            ("0,,1", 8, "empty item"),
            ("x", 8, "`x` is not a partition number"),
            ("3-1", 8, "runs backwards"),
            ("0-8", 8, "partition 8 is not below partitions = 8"),
            ("1,0-2", 8, "partition 1 is listed twice"),
            (
                "-1",
                8,
                "range `-1` needs a partition number on each side of its `-`",
            ),
            ("2-", 8, "range `2-` needs a partition number on each side"),
            ("+1", 8, "`+1` is not a partition number"),
            ("0-+3", 8, "`+3` is not a partition number"),
        ] {
            let error = parse_owned(text, partitions).unwrap_err();
            assert!(error.contains(message), "{text:?}: {error}");
        }
    }
}
