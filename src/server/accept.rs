//! What the listeners do when accepting a connection fails: out of file descriptors, above
//! all, which lasts as long as the connections that hold them, and comes back at every try.

use std::time::Duration;

use tokio::time::Instant;

use crate::log_limit::AtMostEvery;

/// A failed accept is tried again after this: what waits to be accepted stays in the
/// listen backlog, so trying again at once would spin.
pub const RETRY_AFTER: Duration = Duration::from_millis(50);
/// Failures after the first are said at most this often, with how many came meanwhile.
const SAID_EVERY: Duration = Duration::from_secs(60);

/// Failed accepts of one listener (`what`: "ingest", "admin"), said at most once a minute with
/// their count, also when accepts go through in between (connections that close free file
/// descriptors for a moment): at one try each [`RETRY_AFTER`], a listener out of file
/// descriptors logged 20 lines a second.
#[derive(Debug)]
pub struct AcceptFailures {
    what: &'static str,
    said: AtMostEvery,
}

impl AcceptFailures {
    pub fn new(what: &'static str) -> Self {
        AcceptFailures {
            what,
            said: AtMostEvery::new(SAID_EVERY),
        }
    }

    /// An accept failed `now` with `error`; said when it is the first in a minute, with how
    /// many failed since the last said.
    pub fn failed(&mut self, error: &std::io::Error, now: Instant) -> Option<u64> {
        let failures = self.said.due(now)?;
        let what = self.what;
        match remedy(error) {
            Some(remedy) => {
                tracing::warn!(%error, failures, "{what} connections cannot be accepted: {remedy} (said at most once a minute)")
            }
            None => {
                tracing::warn!(%error, failures, "{what} connections cannot be accepted (said at most once a minute)")
            }
        }
        Some(failures)
    }
}

/// What to do about an accept's `error`, when it is one a person can mend.
fn remedy(error: &std::io::Error) -> Option<&'static str> {
    match error.raw_os_error()? {
        libc::EMFILE => Some(
            "the agent has as many files open as its limit allows; raise it (LimitNOFILE= in the \
             systemd unit, `ulimit -n`) well above ingest.max_connections, or lower \
             ingest.max_connections",
        ),
        libc::ENFILE => Some("the system has as many files open as it allows (fs.file-max)"),
        libc::ENOBUFS | libc::ENOMEM => Some("the system is short of memory"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_file_descriptors_says_what_to_raise() {
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert!(remedy(&emfile).unwrap().contains("LimitNOFILE="));
        let enfile = std::io::Error::from_raw_os_error(libc::ENFILE);
        assert!(remedy(&enfile).unwrap().contains("fs.file-max"));
        let reset = std::io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(remedy(&reset), None);
    }

    #[test]
    fn failures_are_said_once_a_minute_with_their_count() {
        let start = Instant::now();
        let error = std::io::Error::from_raw_os_error(libc::EMFILE);
        let mut failures = AcceptFailures::new("ingest");
        assert_eq!(failures.failed(&error, start), Some(1));
        for i in 1..=100 {
            assert_eq!(failures.failed(&error, start + RETRY_AFTER * i), None);
        }
        // The hundred not said go with the next line, a minute after the first.
        let later = start + SAID_EVERY;
        assert_eq!(failures.failed(&error, later), Some(101));
        assert_eq!(failures.failed(&error, later + RETRY_AFTER), None);
    }
}
