//! Profiles: update parsing, the export rules and the export payload, all pure.

pub mod apply;
pub mod change;
pub mod export;
pub mod prune;
pub mod update;

pub use apply::{apply, Applied, StoredProfile};
pub use change::Reason;
pub use update::{Op, Update};
