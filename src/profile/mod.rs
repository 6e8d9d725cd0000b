//! Profiles: update parsing, the export rules and the export payload, all pure (but for
//! `update::UpdateReader`, which reads updates from a stream).
//!
//! The rules are stated twice. `apply`, `change` and `export` state them on JSON values, as
//! SPEC does; `engine` runs them on typed records (`record`, shaped by `layout`, payloads
//! written by `payload`), which is what the store does for every update. Tests hold the two
//! to the same answers.

pub mod apply;
pub mod change;
pub mod engine;
pub mod export;
pub mod layout;
pub mod numbers;
pub mod payload;
pub mod prune;
pub mod record;
pub mod shape;
pub mod update;

pub use apply::{apply, Applied, StoredProfile};
pub use change::Reason;
pub use update::{Op, Update};
