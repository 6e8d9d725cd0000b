//! The read-ahead window's bounds: how many pending exports, and how many bytes of them, it
//! holds ahead of sending; how many a read takes; whether it reads more; and when an export
//! read, or a read that failed, may go again.

use std::time::Duration;

use tokio::time::Instant;

use super::queue::MAX_HELD;

/// The fewest pending exports held in memory ahead of sending ([`window`]): two reads' worth,
/// so that a read is under way while the rest go out.
const MIN_WINDOW: usize = 2 * READ_CHUNK;
/// At most about this much memory is held in exports ([`super::queue::Queue::held_bytes`]),
/// whatever their size: a window of [`MAX_HELD`] exports of a few KB each would take hundreds
/// of MB.
pub(super) const MAX_HELD_BYTES: usize = 32 << 20;
/// The window while the destination is down: only probes go out, so holding more than a
/// little only costs memory; it grows again from the first answer that reopens the
/// destination.
const DOWN_WINDOW: usize = 256;
/// At most this many exports are read from the store at once.
pub(super) const READ_CHUNK: usize = 1_024;
/// What an empty window reads first, so that sending starts before a long read of a cold
/// outbox is done.
pub(super) const FIRST_READ: usize = 128;
/// While the destination looks down and nothing else is ready, heads let go of are read back
/// this many at a time: enough for the probes that go one at a time.
pub(super) const DOWN_READ_BACK: usize = 16;

/// Pending exports held in memory ahead of sending: four times what the requests in flight
/// can take at most, within [`MIN_WINDOW`] and [`MAX_HELD`]. Holding more only costs memory:
/// with the defaults (64 requests of one export) the minimum holds 32 rounds of every request
/// in flight, and a read starts while 16 are left.
pub(super) fn window(max_concurrency: usize, max_profiles_per_request: usize) -> usize {
    (4 * max_concurrency * max_profiles_per_request).clamp(MIN_WINDOW, MAX_HELD)
}

/// Whether the window (of `window` exports) should read more from the store, holding `held`
/// exports of which `ready` could go now: when fewer than half are left, or when few profiles
/// are ready (the rest wait behind failing exports), up to [`MAX_HELD`]. While the destination
/// is down, `ready` counts only exports whose attempts did not fail (a probe prefers those),
/// and it reads a little; more only once none is ready: one profile failing on its own (a
/// server error for what it holds) also makes the destination look down when nothing else is
/// being sent, and the exports behind its own in the outbox are the probes that can reopen
/// it. Never once the window is full ([`MAX_HELD`] or [`MAX_HELD_BYTES`]: [`window_full`]).
/// Past either bound with none ready, the loop lets go of exports
/// ([`super::queue::Queue::let_go_of_blocked`], [`super::queue::Queue::let_go_of_failed_heads`]).
pub(super) fn wants_read(
    window: usize,
    (held, held_bytes): (usize, usize),
    ready: usize,
    destination_down: bool,
) -> bool {
    !window_full(held, held_bytes)
        && if destination_down {
            held < DOWN_WINDOW / 2 || ready == 0
        } else {
            held < window / 2 || ready < READ_CHUNK
        }
}

/// Whether the window holds as many exports, or as many bytes of them, as it may.
pub(super) fn window_full(held: usize, held_bytes: usize) -> bool {
    held >= MAX_HELD || held_bytes >= MAX_HELD_BYTES
}

/// Whether a read may start after a failed one: not before its retry time. Once that time has
/// passed it is forgotten, whether or not a read then starts: the loop's timer wakes it for
/// the time, and a time left in the past would wake it at once on every turn, a busy loop for
/// as long as the window wants no read (the destination down with exports ready, say).
pub(super) fn read_retry_passed(read_retry_at: &mut Option<Instant>, now: Instant) -> bool {
    match *read_retry_at {
        Some(at) if now < at => false,
        _ => {
            *read_retry_at = None;
            true
        }
    }
}

/// When an export read from the store may go, given the run time its last failed attempt set
/// (`None`: at once), the run time now, and the `longest` wait an attempt can set. A crash
/// loses the run time since the last checkpoint that reached the disk (some seconds), which
/// only lengthens the wait: a time further ahead than `longest` (so lengthened, or set by a
/// run clock that started again after its record was unreadable) waits `longest`, which is
/// never shorter than what was left of it, unless `max_backoff_ms` was lowered since.
pub(super) fn retry_instant(
    retry_at_uptime_ms: Option<u64>,
    uptime_ms: u64,
    now: Instant,
    longest: Duration,
) -> Option<Instant> {
    let left = Duration::from_millis(retry_at_uptime_ms?.checked_sub(uptime_ms)?);
    Some(now + left.min(longest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_reads_ahead_only_a_little_while_the_destination_is_down_unless_none_is_ready() {
        let window = 8_192;
        let full = MAX_HELD_BYTES;
        // (held, ready, down) -> read more; the bytes held are under MAX_HELD_BYTES
        let table = [
            ((0, 0, false), true),
            ((window / 2 - 1, window / 2 - 1, false), true),
            ((window / 2, READ_CHUNK, false), false),
            // Few ready (the rest wait behind failing exports): read on, up to MAX_HELD.
            ((window, 10, false), true),
            ((MAX_HELD, 10, false), false),
            ((0, 0, true), true),
            ((DOWN_WINDOW / 2 - 1, 0, true), true),
            ((DOWN_WINDOW / 2, 1, true), false),
            ((window, 10, true), false),
            // None ready: every profile held waits behind a failing export.
            ((DOWN_WINDOW / 2, 0, true), true),
            ((window, 0, true), true),
            ((MAX_HELD, 0, true), false),
        ];
        for ((held, ready, down), expected) in table {
            assert_eq!(
                wants_read(window, (held, full - 1), ready, down),
                expected,
                "held {held}, ready {ready}, down {down}"
            );
            // Whatever the count, never past the bytes.
            assert!(!wants_read(window, (held, full), ready, down));
        }
        assert!(!wants_read(window, (1, full), 0, false), "one big export");
    }

    #[test]
    fn the_window_holds_what_the_requests_in_flight_can_take() {
        // (max_concurrency, max_profiles_per_request) -> window
        let table = [
            ((64, 1), MIN_WINDOW),
            ((1, 1), MIN_WINDOW),
            ((64, 10), 2_560),
            ((64, 100), 25_600),
            ((1024, 1), 4_096),
            ((1024, 10), 40_960),
            ((1024, 1000), MAX_HELD),
        ];
        for ((concurrency, per_request), expected) in table {
            assert_eq!(
                window(concurrency, per_request),
                expected,
                "max_concurrency {concurrency}, max_profiles_per_request {per_request}"
            );
        }
    }

    #[test]
    fn a_read_retry_time_is_forgotten_once_passed_so_that_it_stops_waking_the_loop() {
        let now = Instant::now();
        let mut at = Some(now + Duration::from_secs(1));
        assert!(!read_retry_passed(&mut at, now), "not yet");
        assert_eq!(at, Some(now + Duration::from_secs(1)), "still waited for");
        let later = now + Duration::from_secs(2);
        assert!(read_retry_passed(&mut at, later));
        assert_eq!(
            at, None,
            "a past time would fire the loop's timer on every turn"
        );
        assert!(read_retry_passed(&mut at, later), "nothing to wait for");
    }

    #[test]
    fn retry_times_read_from_the_store() {
        let now = Instant::now();
        let hour = Duration::from_secs(3600);
        // (stored run time, run time now, waits for)
        let table: [(Option<u64>, u64, Option<u64>); 7] = [
            (None, 1_000, None),
            (Some(900), 1_000, None),
            (Some(1_000), 1_000, Some(0)),
            (Some(5_000), 1_000, Some(4_000)),
            (Some(1_000 + 3_600_000), 1_000, Some(3_600_000)),
            // Further than any attempt sets: run time lost to a crash (more than a
            // checkpoint's interval when its write was refused), or the run clock started
            // again. Never sent before its time: the longest wait.
            (Some(1_000 + 3_600_000 + 6_500), 1_000, Some(3_600_000)),
            (Some(u64::MAX), 1_000, Some(3_600_000)),
        ];
        for (stored, uptime, wait) in table {
            assert_eq!(
                retry_instant(stored, uptime, now, hour),
                wait.map(|ms| now + Duration::from_millis(ms)),
                "{stored:?} at {uptime}"
            );
        }
    }
}
