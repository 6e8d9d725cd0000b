//! Key encodings. Sequence numbers are big-endian so that sled's byte order is their order.

pub const SEQ_KEY_LEN: usize = 8;

pub fn seq_key(seq: u64) -> [u8; SEQ_KEY_LEN] {
    seq.to_be_bytes()
}

pub fn seq_from_key(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// Keys of the `meta` tree.
pub mod meta {
    /// The store's on-disk format version.
    pub const FORMAT: &[u8] = b"format";
    /// A random id of this store, part of every export id.
    pub const STORE_ID: &[u8] = b"store_id";
    /// The sequence number the next export gets.
    pub const NEXT_SEQ: &[u8] = b"next_seq";
    /// The [`Tally`](crate::store::Tally) of the outbox and dead trees.
    pub const TALLY: &[u8] = b"tally";
    /// The mapping the store last ran with (see `store::mapping`).
    pub const MAPPING: &[u8] = b"mapping";
    /// The [`ClockRecord`](crate::clock::ClockRecord): run time, last wall time, jumps.
    pub const CLOCK: &[u8] = b"clock";
    /// The backfills to run (see `store::backfill`).
    pub const BACKFILL: &[u8] = b"backfill";
    /// How far the upgrade of profiles to typed records is (see `store::upgrade`).
    pub const UPGRADE: &[u8] = b"upgrade";
    /// How many profiles the store holds (u64 BE), kept by the transactions that add or
    /// remove one (sled counts only by walking).
    pub const PROFILES: &[u8] = b"profiles";
    /// Present while the store is to be rebuilt into a fresh database (see `store::rebuild`).
    pub const REBUILD: &[u8] = b"rebuild";
    /// Present while a delivery loop runs and may have outcomes unrecorded (see
    /// `store::unrecorded`).
    pub const DELIVERING: &[u8] = b"delivering";
    /// Pending exports below this sequence (u64 BE) may have been acknowledged unrecorded.
    pub const UNRECORDED_BELOW: &[u8] = b"unrecorded_below";
    /// How many rejected stream messages the store keeps (u64 BE), kept by the transactions
    /// that add or remove one; counted at open when missing (see `store::source`).
    pub const REJECTED: &[u8] = b"rejected";
    /// How many rejected stream messages were not kept, the store holding
    /// `source.nats.max_rejected` already (u64 BE).
    pub const REJECTED_NOT_KEPT: &[u8] = b"rejected_not_kept";
    /// The partition count of the stream this store handed partitions over from (u64 BE):
    /// with the partitions marked as given away, which profiles' updates it refuses.
    pub const MOVED_PARTITIONS_OF: &[u8] = b"moved_partitions_of";
    /// When delivery was paused (wall clock, ms since the epoch, i64 BE); present only while
    /// it is (see `store::pause`).
    pub const DELIVERY_PAUSED: &[u8] = b"delivery_paused";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_order_is_sequence_order() {
        let seqs = [0u64, 1, 255, 256, 65_535, 1 << 32, u64::MAX - 1, u64::MAX];
        let mut keys: Vec<_> = seqs.iter().rev().map(|&s| seq_key(s)).collect();
        keys.sort();
        let decoded: Vec<_> = keys.iter().map(|k| seq_from_key(k).unwrap()).collect();
        assert_eq!(decoded, seqs);
    }

    #[test]
    fn malformed_keys_are_refused() {
        assert_eq!(seq_from_key(b"short"), None);
        assert_eq!(seq_from_key(&[0; 9]), None);
    }
}
