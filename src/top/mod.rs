//! `outpost top`, the pure part: the agent's `/metrics` text parsed into samples
//! ([`samples`]), two snapshots turned into rates, latency quantiles and a view ([`view`]), and
//! the terminal layout of a view ([`layout`]). The I/O (the admin socket, the terminal) is in
//! `commands/top.rs`.

pub mod layout;
pub mod samples;
pub mod view;
