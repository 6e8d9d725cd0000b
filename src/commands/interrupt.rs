//! SIGINT and SIGTERM for the commands that store or publish an input a part at a time
//! (`outpost ingest`, `outpost publish`): the first one stops them between parts, so that they
//! can say how far they got and how to go on from there (`--skip`, `--resume`); a second one
//! ends the process at once, as the signal's default would. Before the first part, while the
//! input is read in (typed into a terminal, spooled from a pipe) and checked, the first one
//! ends it at once, saying that nothing was stored or published: there is nothing to go on
//! from, and reading a terminal would otherwise go on until its input ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use signal_hook::consts::{SIGINT, SIGTERM};

struct Watch {
    asked: Arc<AtomicBool>,
    /// Until [`parts_begin`].
    before_parts: Arc<AtomicBool>,
}

static WATCH: OnceLock<Watch> = OnceLock::new();

/// Whether the command was asked to stop (never, unless [`watch_from_now`] was called).
pub(super) fn asked() -> bool {
    WATCH
        .get()
        .is_some_and(|watch| watch.asked.load(Ordering::SeqCst))
}

/// Starts watching for the signals (before the command's work begins, so that one that
/// comes at any time during it is seen). `before_parts_out`: what a signal before the first
/// part writes on standard output besides the message (`ingest --json`'s error line).
pub(super) fn watch_from_now(before_parts_out: Option<String>) {
    WATCH.get_or_init(|| watch(before_parts_out.map(|line| &*line.leak())));
}

/// The command is about to store or publish its first part: a signal from now on stops it
/// between parts.
pub(super) fn parts_begin() {
    if let Some(watch) = WATCH.get() {
        watch.before_parts.store(false, Ordering::SeqCst);
    }
}

/// What a command stopped by a signal before its first part says it was.
pub(super) const STOPPED_BEFORE_PARTS: &str =
    "stopped by SIGINT or SIGTERM before it stored or published any update";

fn watch(before_parts_out: Option<&'static str>) -> Watch {
    let before_parts_said: &'static str = format!("outpost: {STOPPED_BEFORE_PARTS}\n").leak();
    let asked = Arc::new(AtomicBool::new(false));
    let before_parts = Arc::new(AtomicBool::new(true));
    for signal in [SIGINT, SIGTERM] {
        let before = Arc::clone(&before_parts);
        let end_before_parts = move || {
            if before.load(Ordering::SeqCst) {
                for (fd, text) in [(1, before_parts_out), (2, Some(before_parts_said))] {
                    if let Some(text) = text {
                        // SAFETY: write(2) on a static buffer, async-signal-safe.
                        let _ = unsafe { libc::write(fd, text.as_ptr().cast(), text.len()) };
                    }
                }
                signal_hook::low_level::exit(128 + signal);
            }
        };
        // Registered first, so they see the flag as it was before this signal set it: a
        // second signal ends the process (with the status a shell gives a command the
        // signal ended, as the signal would have), as does the first before any part.
        // SAFETY: the action does only what a signal handler may: an atomic load, write(2)
        // and _exit(2).
        let registered = unsafe { signal_hook::low_level::register(signal, end_before_parts) }
            .and_then(|_| {
                signal_hook::flag::register_conditional_shutdown(
                    signal,
                    128 + signal,
                    Arc::clone(&asked),
                )
            })
            .and_then(|_| signal_hook::flag::register(signal, Arc::clone(&asked)));
        if let Err(e) = registered {
            tracing::debug!(signal, error = %e, "cannot watch for the signal; it ends the command as it would");
        }
    }
    Watch {
        asked,
        before_parts,
    }
}

/// What a command stopped by a signal says it was.
pub(super) const STOPPED: &str = "stopped by SIGINT or SIGTERM";
