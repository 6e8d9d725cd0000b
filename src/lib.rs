//! # outpost
//!
//! An edge agent that keeps the previous version of every customer profile, decides for each
//! update whether an HTTP destination must hear about it, and delivers those exports durably.
//!
//! ## Layout
//! - [`clock`]: wall clock versus run time: what `max_age_s` counts, and clock jumps noticed.
//! - [`config`]: the TOML configuration, validated once; errors name the key. One concept a
//!   file: the raw tables, their loading and checks, the file's syntax errors, and each part
//!   (auth, proxy, mapping, headers, addresses, secrets, warnings).
//! - [`profile`]: profile logic, pure but for reading updates from a stream: update parsing
//!   ([`profile::update`]); the export rules stated on JSON values ([`profile::change`],
//!   [`profile::export`], [`profile::apply`]);
//!   and run on typed stored records ([`profile::record`], [`profile::layout`],
//!   [`profile::engine`], [`profile::payload`]), which is what the store does. Tests hold the
//!   two to the same answers.
//! - [`store`]: the sled store, one concept a file (its module docs have the table of parts
//!   and of each tree's keys and values): key and value encodings ([`store::keys`],
//!   [`store::codec`]), profiles a few to a key ([`store::groups`]), the group-committing
//!   single writer ([`store::committer`]), delivery's grouped changes to pending exports
//!   ([`store::outbox`]), the backfill of newly mapped segments ([`store::backfill`]), the
//!   upgrade of older stores' profiles.
//! - [`delivery`]: the delivery loop: the read-ahead window ([`delivery::queue`]) and its
//!   bounds (`delivery::window`), one request built and sent (`delivery::request`), the
//!   adaptive controller ([`delivery::controller`]), answer classification and per-export
//!   backoff ([`delivery::retry`]), tokens ([`delivery::auth`]) from credentials read again
//!   from their files (`delivery::credentials`), the HTTP client
//!   ([`delivery::client`]) and its way through a proxy ([`delivery::proxy`]), and the writer
//!   of outcomes ([`delivery::settler`]).
//! - [`top`]: `outpost top`'s figures and layout, from two snapshots of a running agent.
//! - [`server`]: the agent's listeners: the ingest API over HTTP or HTTPS
//!   ([`server::ingest`], [`server::tls`]), its token ([`server::ingest_token`]), and the
//!   admin socket ([`server::admin`]).
//! - [`tls_files`]: certificates and keys in PEM files, and what follows its files when they
//!   change (a certificate with its key, the CAs trusted).
//! - [`cli`]: the command line (clap); [`commands`]: what each subcommand does and prints, one
//!   concept a file (running the agent, check, ingest, the outbox, the store's upkeep, NATS),
//!   routed from its mod.rs.
//! - [`source`]: a NATS JetStream stream as a second input, partitioned by profile.
//! - [`explain`]: errors a person can act on (what is wrong, which key or certificate, what to
//!   do).
//! - [`logging`]: tracing set-up; [`log_limit`]: lines that come as fast as their causes,
//!   logged a few at a time and counted.

/// jemalloc rather than glibc's malloc, for every binary built from this crate (the agent,
/// and the benches and tests, so that their comparisons with raw sled stay paired). Under
/// glibc's malloc a third of `outpost ingest`'s time went to the allocator itself (`perf`:
/// `_int_malloc`, `unlink_chunk`, `malloc_consolidate`) and to the kernel zeroing fresh pages
/// on page faults; README "Performance" has the figures, and the resident memory each allocator costs.
#[cfg(unix)]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (its `malloc_conf`, read when it starts; `_RJEM_MALLOC_CONF` in the
/// environment adds to them): one arena rather than four per core. In the agent bench the
/// idle peak of resident memory is 4-11 MiB lower for it, and HTTP ingest 4-17% slower
/// (README "The allocator").
#[cfg(unix)]
#[export_name = "_rjem_malloc_conf"]
static JEMALLOC_OPTIONS: &[u8; 10] = b"narenas:1\0";

pub mod admin;
pub mod agent;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod delivery;
pub mod demo;
pub mod demo_fleet;
pub mod explain;
pub mod log_limit;
pub mod logging;
pub mod metrics;
pub mod profile;
pub mod receiver;
pub mod server;
pub mod source;
pub mod store;
pub mod tls_files;
pub mod top;
