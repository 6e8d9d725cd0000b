//! Inputs besides the HTTP ingest API: a NATS JetStream stream, partitioned by profile.
//!
//! - [`partition`]: the routing function every producer shares, and `owned` lists (pure).
//! - [`config`]: `[source.nats]`, validated.
//! - [`creds`]: `creds_file`, read again at each connection (user JWTs that expire).
//! - [`batch`]: what a fetched batch becomes: updates to commit, redeliveries to skip,
//!   rejected messages to keep (pure).
//! - [`headers`]: whether the NATS client can read a message's header block (pure).
//! - [`nats`]: the connection, the per-partition pull consumers and `nats setup`.
//! - [`publish`]: `outpost publish`: updates to their partitions, acknowledged, de-duplicated.

pub mod batch;
pub mod claim;
pub mod config;
pub mod creds;
pub mod headers;
pub mod nats;
pub mod partition;
pub mod publish;
