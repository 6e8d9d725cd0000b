//! How far a command is through a file of updates, on stderr: a bar on a terminal; elsewhere
//! (a log file, a unit's journal, a CI job) a plain line every [`PLAIN_EVERY`], so that a long
//! run is seen to move and a stuck one to stop.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const PLAIN_EVERY: Duration = Duration::from_secs(5);

pub(super) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: Mutex<PlainProgress>,
}

impl Progress {
    /// Progress through `total` updates, `at` of them done already; `template` draws the bar
    /// (its `{pos}` and `{len}` the updates), `done` says what was done to each in a plain line
    /// ("accepted", "published").
    pub(super) fn new(total: u64, at: u64, template: &str, done: &'static str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_position(at);
            bar.set_style(
                indicatif::ProgressStyle::with_template(template).expect("the template is valid"),
            );
            bar
        });
        Progress {
            bar,
            plain: Mutex::new(PlainProgress::new(Instant::now(), total, at, done)),
        }
    }

    pub(super) fn set_position(&self, position: u64) {
        self.advance(|_| position);
    }

    pub(super) fn inc(&self, by: u64) {
        self.advance(|position| position + by);
    }

    fn advance(&self, to: impl FnOnce(u64) -> u64) {
        let mut plain = self.plain.lock().unwrap_or_else(|e| e.into_inner());
        let position = to(plain.position);
        let line = plain.moved_to(Instant::now(), position);
        match (&self.bar, line) {
            (Some(bar), _) => bar.set_position(position),
            (None, Some(line)) => eprintln!("{line}"),
            (None, None) => {}
        }
    }

    pub(super) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// When a plain line is due, and what it says.
struct PlainProgress {
    total: u64,
    position: u64,
    done: &'static str,
    started: Instant,
    last_line: Instant,
}

impl PlainProgress {
    fn new(now: Instant, total: u64, at: u64, done: &'static str) -> PlainProgress {
        PlainProgress {
            total,
            position: at,
            done,
            started: now,
            last_line: now,
        }
    }

    /// The line to print now that `position` updates are done, if one is due.
    fn moved_to(&mut self, now: Instant, position: u64) -> Option<String> {
        self.position = position;
        if now < self.last_line + PLAIN_EVERY || position >= self.total {
            return None;
        }
        self.last_line = now;
        let percent = position * 100 / self.total.max(1);
        Some(format!(
            "{done} {position} of {total} updates ({percent}%) in {seconds} s",
            done = self.done,
            total = self.total,
            seconds = now.duration_since(self.started).as_secs(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_a_terminal_a_line_says_how_far_every_few_seconds_until_the_end() {
        let start = Instant::now();
        let mut plain = PlainProgress::new(start, 200_000, 0, "accepted");
        let at = |seconds: f64| start + Duration::from_secs_f64(seconds);
        assert_eq!(plain.moved_to(at(1.0), 20_000), None);
        assert_eq!(plain.moved_to(at(4.9), 90_000), None);
        assert_eq!(
            plain.moved_to(at(5.2), 100_000).as_deref(),
            Some("accepted 100000 of 200000 updates (50%) in 5 s")
        );
        assert_eq!(plain.moved_to(at(9.0), 150_000), None);
        assert_eq!(
            plain.moved_to(at(10.3), 180_000).as_deref(),
            Some("accepted 180000 of 200000 updates (90%) in 10 s")
        );
        // The command's own summary says the end.
        assert_eq!(plain.moved_to(at(20.0), 200_000), None);
    }
}
