//! Which agent consumes a partition. Two agents configured to own the same partition (a copied
//! config, or a second agent left with the default `owned`, every partition) would each make
//! its consumer again in turn, split its messages between their stores and break per-profile
//! order. So an agent first claims each partition it owns in a JetStream key-value bucket
//! beside the stream, one bucket per stream and consumer prefix (so fleets for different
//! destinations each claim their own): key `partition-<n>`, value `store <id> on <host>`.
//! The first store to claim a partition keeps it; another leaves the partition alone, says
//! who holds it, and looks again now and then. The agent that consumes a partition looks
//! at its claim now and then too: released meanwhile, the claim is made again (the partition
//! is still consumed there); taken by another store, consuming stops. Claims never expire,
//! so a restart, or a store that dies for a while, keeps its partitions; `outpost nats
//! release` lets one go (after its store was lost). `outpost nats hand-over` makes a claim
//! say which file the partition was handed over in ([`handed_over`]), which no store holds,
//! and `outpost nats take-over` of that file claims it for the taking store: first as being
//! taken over ([`taking_over`]), then, once its store holds the partition, for the store.

use async_nats::jetstream::{self, kv};
use bytes::Bytes;

use super::nats::{nats_error, no_such_stream, NatsError};

/// Whether a partition may be consumed by this store.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// Claimed for this store before.
    Ours,
    /// Claimed for this store now: nobody held it.
    Made,
    /// Held by another store: its claim, as recorded.
    Elsewhere(String),
}

/// The bucket of claims for `stream` and `consumer_prefix`. Bucket names take letters, digits,
/// `-` and `_`, so any other character becomes `_`; the stream's length comes first, so that
/// no two pairs share a name (`A_B` and `c`, `A` and `B_c`).
pub fn bucket_name(stream: &str, consumer_prefix: &str) -> String {
    let name = format!("owners_{}_{stream}_{consumer_prefix}", stream.len());
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub fn key(partition: u32) -> String {
    format!("partition-{partition}")
}

/// This store's claim: its id, which decides, and the host it is on, which helps whoever
/// reads a refusal find it.
pub fn holder(store_id: u32, host: &str) -> String {
    format!("store {store_id:08x} on {host}")
}

/// What a claim says between `outpost nats hand-over` and `outpost nats take-over`: held by
/// no store, so no agent consumes the partition, and naming the file that must take it over
/// (a stale file, or one of another fleet, names another). Never contains " on ", so
/// [`judge`] takes it for no store's.
pub fn handed_over(file_id: &str) -> String {
    format!("{HANDED_OVER}{file_id}")
}

pub const HANDED_OVER: &str = "handed over in file ";

/// What a claim says while `outpost nats take-over` of the file that `handed` names
/// ([`handed_over`]) runs for the store whose claim is `taker` ([`holder`]): a take-over writes
/// it, by compare-and-set, before it changes its store, so that a second take-over of the same
/// file, from another store, is refused before it stores anything. It starts as `handed` does,
/// so agents leave the partition alone and `outpost nats release` keeps it, as they do a
/// handed-over claim; and it never contains " on ", so [`judge`] takes it for no store's.
pub fn taking_over(handed: &str, taker: &str) -> String {
    format!("{handed}{TAKEN_BY}{}", store_of(taker))
}

const TAKEN_BY: &str = ", being taken over by ";

/// The store that a claim saying [`taking_over`] the file `handed` names names (`store <id>`).
pub fn taker<'a>(claim: &'a str, handed: &str) -> Option<&'a str> {
    claim.strip_prefix(handed)?.strip_prefix(TAKEN_BY)
}

/// The store that a claim saying [`taking_over`] any file names.
pub fn any_taker(claim: &str) -> Option<&str> {
    let (handed, taker) = claim.split_once(TAKEN_BY)?;
    handed.starts_with(HANDED_OVER).then_some(taker)
}

/// The store a claim names, without the host it is on.
fn store_of(claim: &str) -> &str {
    claim.split(" on ").next().unwrap_or(claim)
}

/// The host name, for claims; `unknown host` when it cannot be read.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown host".to_string())
}

/// Whether a recorded claim is this store's: the same store id, wherever it now runs.
pub fn judge(recorded: &str, ours: &str) -> Claim {
    if store_of(recorded) == store_of(ours) {
        Claim::Ours
    } else {
        Claim::Elsewhere(recorded.to_string())
    }
}

/// The bucket of claims, made when missing. Its stream is made as the key-value API makes a
/// bucket's (one value a key, roll-ups for purges, direct reads), but directly: the client's
/// own way asks the server for account details that servers before 2.10 answer in a form
/// it cannot read. It gets as many replicas as the updates' stream, whatever the config says
/// (`replicas` is for `nats setup`, and is used only if the stream cannot be read): a bucket
/// with fewer would stop the fleet's consuming while a server the stream survives is down.
pub async fn bucket(
    js: &jetstream::Context,
    stream: &str,
    consumer_prefix: &str,
    replicas: usize,
) -> Result<kv::Store, NatsError> {
    let name = bucket_name(stream, consumer_prefix);
    if let Ok(store) = js.get_key_value(&name).await {
        return Ok(store);
    }
    let replicas = match js.get_stream(stream).await {
        Ok(updates) => updates.cached_info().config.num_replicas,
        Err(_) => replicas,
    };
    let making = |e: &dyn std::fmt::Display| {
        nats_error(&format!("making the bucket of partition claims {name}"), e)
    };
    js.get_or_create_stream(jetstream::stream::Config {
        name: format!("KV_{name}"),
        description: Some(format!(
            "which outpost store consumes each partition of stream {stream} (consumers {consumer_prefix}-p*)"
        )),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        storage: jetstream::stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        num_replicas: replicas.max(1),
        ..Default::default()
    })
    .await
    .map_err(|e| making(&e))?;
    js.get_key_value(&name).await.map_err(|e| making(&e))
}

/// The claims bucket of `nats`'s stream, on a connection of its own (for commands).
pub async fn open(nats: &super::config::NatsSource) -> Result<kv::Store, NatsError> {
    let client = super::nats::connect(nats, false).await?;
    let js = jetstream::new(client);
    bucket(&js, &nats.stream, &nats.consumer_prefix, nats.replicas).await
}

/// Claims `partition` for `ours` unless another store holds it.
pub async fn claim(bucket: &kv::Store, partition: u32, ours: &str) -> Result<Claim, NatsError> {
    let key = key(partition);
    match bucket.create(&key, Bytes::from(ours.to_string())).await {
        Ok(_) => return Ok(Claim::Made),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
        Err(e) => return Err(nats_error(&format!("claiming partition {partition}"), e)),
    }
    let recorded = bucket
        .get(&key)
        .await
        .map_err(|e| nats_error(&format!("reading the claim on partition {partition}"), e))?;
    match recorded {
        Some(recorded) => Ok(judge(&String::from_utf8_lossy(&recorded), ours)),
        // Released in between: the caller tries again, and claims it.
        None => Err(NatsError(format!(
            "the claim on partition {partition} went while it was read"
        ))),
    }
}

/// Looks at the claim on a partition this store consumes: read first (the claim is there
/// nearly always), made again only when it is gone.
pub async fn look(bucket: &kv::Store, partition: u32, ours: &str) -> Result<Claim, NatsError> {
    let recorded = bucket
        .get(key(partition))
        .await
        .map_err(|e| nats_error(&format!("reading the claim on partition {partition}"), e))?;
    match recorded {
        Some(recorded) => Ok(judge(&String::from_utf8_lossy(&recorded), ours)),
        None => claim(bucket, partition, ours).await,
    }
}

/// A claim as read, with the revision a change made on its strength must still find.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadClaim {
    pub partition: u32,
    /// What it says; `None` when there is none (never made, or released).
    pub holder: Option<String>,
    revision: Option<u64>,
}

pub async fn read(bucket: &kv::Store, partition: u32) -> Result<ReadClaim, NatsError> {
    let entry = bucket
        .entry(key(partition))
        .await
        .map_err(|e| nats_error(&format!("reading the claim on partition {partition}"), e))?;
    Ok(ReadClaim {
        partition,
        holder: entry
            .as_ref()
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| String::from_utf8_lossy(&e.value).into_owned()),
        revision: entry.map(|e| e.revision),
    })
}

/// Makes the claim read as `read` say `value`, unless it changed since it was read (another
/// command, or an agent, wrote it meanwhile): then nothing is written, and the error says so.
/// The claim as written.
pub async fn replace(
    bucket: &kv::Store,
    read: &ReadClaim,
    value: &str,
) -> Result<ReadClaim, NatsError> {
    let partition = read.partition;
    let bytes = Bytes::from(value.to_string());
    let written = match read.revision {
        Some(revision) => bucket
            .update(key(partition), bytes, revision)
            .await
            .map_err(|e| e.to_string()),
        None => bucket
            .create(key(partition), bytes)
            .await
            .map_err(|e| e.to_string()),
    };
    let written = written.map(|revision| ReadClaim {
        partition,
        holder: Some(value.to_string()),
        revision: Some(revision),
    });
    written.map_err(|e| {
        NatsError(format!(
            "writing the claim on partition {partition}: it changed since it was read (another \
             command or an agent wrote it meanwhile), or could not be written ({e})"
        ))
    })
}

/// What became of a claim [`release`] was asked to let go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    /// It was let go; it said this.
    Was(String),
    /// There was none.
    NoClaim,
    /// It changed since it was read (a hand-over that wrote "handed over" meanwhile, which a
    /// release must not wipe unasked): it is left as it is.
    Changed,
}

/// Lets the claim read as `read` go, unless it changed since it was read.
pub async fn release(bucket: &kv::Store, read: &ReadClaim) -> Result<Released, NatsError> {
    let partition = read.partition;
    let Some(holder) = &read.holder else {
        return Ok(Released::NoClaim);
    };
    match bucket
        .purge_expect_revision(key(partition), read.revision)
        .await
    {
        Ok(()) => Ok(Released::Was(holder.clone())),
        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(Released::Changed),
        Err(e) => Err(nats_error(&format!("releasing partition {partition}"), e)),
    }
}

/// How a partition an agent owns stands for it, by its store's mark and the partition's
/// claim, in the order the agent looks at them: whether it would consume the partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// Claimed by this store.
    Ours,
    /// Claimed by nobody: the agent claims it as it starts.
    Unclaimed,
    /// This store handed it over, or began to: left alone, whatever its claim says.
    MovedFromHere,
    /// Held by no store since a hand-over, until a take-over of the file it names: its claim.
    HandedOver(String),
    /// Held by another store: its claim.
    Elsewhere(String),
}

impl Standing {
    pub fn consumed(&self) -> bool {
        matches!(self, Standing::Ours | Standing::Unclaimed)
    }
}

/// `recorded` is the partition's claim, if any; `our_store` the id of the store that would
/// consume it, if it has been made (a store made later gets a new id, so no claim is its).
pub fn standing(recorded: Option<&str>, our_store: Option<u32>, moved_from_here: bool) -> Standing {
    if moved_from_here {
        return Standing::MovedFromHere;
    }
    let Some(recorded) = recorded else {
        return Standing::Unclaimed;
    };
    if recorded.starts_with(HANDED_OVER) {
        return Standing::HandedOver(recorded.to_string());
    }
    match our_store.map(|id| judge(recorded, &holder(id, ""))) {
        Some(Claim::Ours) => Standing::Ours,
        _ => Standing::Elsewhere(recorded.to_string()),
    }
}

/// The claims on `partitions`, in their order, read from the bucket of `stream` and
/// `consumer_prefix` without making it: `None` when there is no bucket (no agent has claimed
/// anything of this stream yet).
pub async fn read_if_any(
    js: &jetstream::Context,
    stream: &str,
    consumer_prefix: &str,
    partitions: &[u32],
) -> Result<Option<Vec<Option<String>>>, NatsError> {
    let name = bucket_name(stream, consumer_prefix);
    let reading = |e: &dyn std::fmt::Display| {
        nats_error(&format!("reading the bucket of partition claims {name}"), e)
    };
    match js.get_stream(format!("KV_{name}")).await {
        Ok(_) => {}
        Err(e) if no_such_stream(&e) => return Ok(None),
        Err(e) => return Err(reading(&e)),
    }
    let bucket = js.get_key_value(&name).await.map_err(|e| reading(&e))?;
    let mut claims = Vec::with_capacity(partitions.len());
    for &partition in partitions {
        claims.push(read(&bucket, partition).await?.holder);
    }
    Ok(Some(claims))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_ours_when_it_names_our_store_wherever_that_now_runs() {
        let ours = holder(0x1a2b, "edge-7");
        assert_eq!(ours, "store 00001a2b on edge-7");
        assert_eq!(judge(&ours, &ours), Claim::Ours);
        assert_eq!(judge("store 00001a2b on edge-8", &ours), Claim::Ours);
        let theirs = "store 00009999 on edge-7";
        assert_eq!(judge(theirs, &ours), Claim::Elsewhere(theirs.to_string()));
    }

    #[test]
    fn how_an_owned_partition_stands_by_its_mark_and_its_claim() {
        let ours = holder(0x1a2b, "edge-7");
        let moved_ours = "store 00001a2b on edge-8";
        let theirs = "store 00009999 on edge-7";
        let handed = handed_over("00009999-1700000000000");
        let taking = taking_over(&handed, &ours);
        let cases: [(Option<&str>, Option<u32>, bool, Standing); 9] = [
            (None, Some(0x1a2b), false, Standing::Unclaimed),
            (None, None, false, Standing::Unclaimed),
            (Some(&ours), Some(0x1a2b), false, Standing::Ours),
            (Some(moved_ours), Some(0x1a2b), false, Standing::Ours),
            (
                Some(theirs),
                Some(0x1a2b),
                false,
                Standing::Elsewhere(theirs.into()),
            ),
            // No store yet: a claim is another store's, as the new store gets a new id.
            (Some(&ours), None, false, Standing::Elsewhere(ours.clone())),
            (
                Some(&handed),
                Some(0x9999),
                false,
                Standing::HandedOver(handed.clone()),
            ),
            (
                Some(&taking),
                Some(0x1a2b),
                false,
                Standing::HandedOver(taking.clone()),
            ),
            // The store's mark comes first, as in the agent.
            (Some(&ours), Some(0x1a2b), true, Standing::MovedFromHere),
        ];
        for (recorded, store, moved, expected) in cases {
            assert_eq!(
                standing(recorded, store, moved),
                expected,
                "{recorded:?} {store:?} {moved}"
            );
        }
        assert!(Standing::Ours.consumed() && Standing::Unclaimed.consumed());
        assert!(!Standing::MovedFromHere.consumed());
        assert!(!Standing::Elsewhere(theirs.into()).consumed());
    }

    #[test]
    fn a_handed_over_claim_is_no_stores() {
        let ours = holder(0x1a2b, "edge-7");
        let handed = handed_over("00001a2b-1700000000000");
        assert_eq!(judge(&handed, &ours), Claim::Elsewhere(handed.clone()));
    }

    #[test]
    fn a_claim_taken_over_names_its_taker_and_is_no_stores_yet() {
        let ours = holder(0x1a2b, "edge-7");
        let handed = handed_over("00009999-1700000000000");
        let taking = taking_over(&handed, &ours);
        assert_eq!(
            taking,
            "handed over in file 00009999-1700000000000, being taken over by store 00001a2b"
        );
        assert!(taking.starts_with(HANDED_OVER));
        assert_eq!(judge(&taking, &ours), Claim::Elsewhere(taking.clone()));
        assert_eq!(taker(&taking, &handed), Some("store 00001a2b"));
        assert_eq!(any_taker(&taking), Some("store 00001a2b"));
        assert_eq!(any_taker(&handed), None);
        assert_eq!(taker(&handed, &handed), None);
        let other_file = handed_over("00009999-1800000000000");
        assert_eq!(taker(&taking, &other_file), None);
    }

    #[test]
    fn bucket_names_take_only_what_the_server_allows() {
        assert_eq!(
            bucket_name("UPDATES", "outpost"),
            "owners_7_UPDATES_outpost"
        );
        assert_eq!(bucket_name("up.dates", "a/b"), "owners_8_up_dates_a_b");
        assert_ne!(bucket_name("A_B", "c"), bucket_name("A", "B_c"));
    }
}
