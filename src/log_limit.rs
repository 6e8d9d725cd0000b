//! Lines logged per export (a failed attempt, a dead letter) or per request (an ingest request
//! refused) come as fast as exports fail or clients send: a flaky endpoint at thousands of
//! exports a second, one that refuses every export of a mapping, or a client that sends bad
//! updates in a loop would flood the log. Each kind logs its first few lines of a window whole;
//! the rest are counted, and said in one line once the window is over. The outbox and the
//! metrics keep every one.

use std::time::Duration;

use tokio::time::Instant;

/// How long a window lasts.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Lines logged whole in a window, of each kind.
pub const WHOLE_A_WINDOW: u32 = 10;

#[derive(Debug, Default)]
pub struct LogLimit {
    /// When the current window began; `None` before the first line.
    since: Option<Instant>,
    logged: u32,
    left_out: u64,
}

impl LogLimit {
    /// Whether a line that comes `now` is logged whole. A window ends at the first line past it
    /// or at [`LogLimit::left_out`], whichever asks first.
    pub fn admit(&mut self, now: Instant) -> bool {
        if self.since.is_none_or(|since| now >= since + WINDOW) && self.left_out == 0 {
            self.since = Some(now);
            self.logged = 0;
        }
        if self.logged < WHOLE_A_WINDOW {
            self.logged += 1;
            true
        } else {
            self.left_out += 1;
            false
        }
    }

    /// How many lines the window over by `now` left out, once: to be said in one line. A new
    /// window begins.
    pub fn left_out(&mut self, now: Instant) -> Option<u64> {
        let over = self.since.is_some_and(|since| now >= since + WINDOW);
        if !over || self.left_out == 0 {
            return None;
        }
        self.since = Some(now);
        self.logged = 0;
        Some(std::mem::take(&mut self.left_out))
    }
}

/// A line said at most once every `every`: what comes in between is counted, and the count
/// goes with the next line said.
#[derive(Debug)]
pub struct AtMostEvery {
    every: Duration,
    said_at: Option<Instant>,
    unsaid: u64,
}

impl AtMostEvery {
    pub const fn new(every: Duration) -> Self {
        AtMostEvery {
            every,
            said_at: None,
            unsaid: 0,
        }
    }

    /// Something to say came `now`: how many came since the last line said, this one
    /// included, when a line is due now.
    pub fn due(&mut self, now: Instant) -> Option<u64> {
        self.unsaid += 1;
        if self.said_at.is_some_and(|at| now < at + self.every) {
            return None;
        }
        self.said_at = Some(now);
        Some(std::mem::take(&mut self.unsaid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_lines_of_a_window_are_logged_and_the_rest_counted_once() {
        let start = Instant::now();
        let at = |s: f64| start + Duration::from_secs_f64(s);
        let mut limit = LogLimit::default();
        let admitted: Vec<bool> = (0..25).map(|i| limit.admit(at(i as f64 * 0.1))).collect();
        assert_eq!(
            admitted.iter().filter(|&&a| a).count(),
            WHOLE_A_WINDOW as usize
        );
        assert!(admitted[..WHOLE_A_WINDOW as usize].iter().all(|&a| a));
        assert_eq!(limit.left_out(at(9.9)), None, "the window is not over");
        // Over: said once, and a new window logs again.
        assert_eq!(limit.left_out(at(10.0)), Some(15));
        assert_eq!(limit.left_out(at(30.0)), None);
        assert!(limit.admit(at(30.0)));
        // A quiet window leaves nothing to say, and the next line opens one of its own.
        assert_eq!(limit.left_out(at(60.0)), None);
        assert!(limit.admit(at(61.0)));
    }

    #[test]
    fn lines_left_out_are_said_before_a_new_window_logs_whole() {
        let start = Instant::now();
        let mut limit = LogLimit::default();
        for _ in 0..=WHOLE_A_WINDOW {
            limit.admit(start);
        }
        // Past the window, but its count not yet said: still counted, not logged whole, so
        // that the line saying it does not come after lines logged since.
        assert!(!limit.admit(start + WINDOW));
        assert_eq!(limit.left_out(start + WINDOW), Some(2));
        assert!(limit.admit(start + WINDOW));
    }
}
