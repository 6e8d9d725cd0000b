//! SIGINT and SIGTERM for the commands that store or publish an input a part at a time
//! (`outpost ingest`, `outpost publish`): the first one stops them between parts, so that they
//! can say how far they got and how to go on from there (`--skip`, `--resume`); a second one
//! ends the process at once, as the signal's default would.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use signal_hook::consts::{SIGINT, SIGTERM};

static ASKED: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Whether the command was asked to stop (never, unless [`watch_from_now`] was called).
pub(super) fn asked() -> bool {
    ASKED.get().is_some_and(|flag| flag.load(Ordering::SeqCst))
}

/// Starts watching for the signals (before the command's work begins, so that one that
/// comes at any time during it is seen).
pub(super) fn watch_from_now() {
    ASKED.get_or_init(watch);
}

fn watch() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        // Registered first, so it sees the flag as it was before this signal set it: a
        // second signal ends the process (with the status a shell gives a command the
        // signal ended, as the signal would have).
        let registered = signal_hook::flag::register_conditional_shutdown(
            signal,
            128 + signal,
            Arc::clone(&flag),
        )
        .and_then(|_| signal_hook::flag::register(signal, Arc::clone(&flag)));
        if let Err(e) = registered {
            tracing::debug!(signal, error = %e, "cannot watch for the signal; it ends the command as it would");
        }
    }
    flag
}

/// What a command stopped by a signal says it was.
pub(super) const STOPPED: &str = "stopped by SIGINT or SIGTERM";
