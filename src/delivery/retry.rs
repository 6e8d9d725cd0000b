//! What an answer means (a pure table), `Retry-After`, and the destination-wide backoff gate.

use std::time::{Duration, SystemTime};

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use tokio::time::Instant;

/// `Retry-After` is honoured up to this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What to do with an export after an HTTP answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// 2xx: it leaves the outbox.
    Delivered,
    /// 401, 403: drop the token, fetch a new one, retry.
    AuthRejected,
    /// 408, 425, 429, 5xx: retry after backing off.
    Retry,
    /// Any other status: dead-letter it.
    Reject,
}

pub fn classify(status: u16) -> Class {
    match status {
        200..=299 => Class::Delivered,
        401 | 403 => Class::AuthRejected,
        408 | 425 | 429 | 500..=599 => Class::Retry,
        _ => Class::Reject,
    }
}

/// Parses `Retry-After` (delta seconds or an HTTP date), capped at [`MAX_RETRY_AFTER`].
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let delay = if let Ok(seconds) = value.parse::<u64>() {
        Duration::from_secs(seconds)
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// The `Retry-After` of an answer. An HTTP date is measured against the answer's own `Date`
/// header when it has one (both are the server's clock), so that a wrong local wall clock
/// neither stretches the wait (up to [`MAX_RETRY_AFTER`]) nor ignores it; else against `now`.
pub fn retry_after(headers: &hyper::HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(hyper::header::RETRY_AFTER)?.to_str().ok()?;
    let reference = headers
        .get(hyper::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .unwrap_or(now);
    parse_retry_after(value, reference)
}

/// The destination-wide backoff: after a failure nothing is sent until the delay has passed,
/// then only one probe at a time until one succeeds.
///
/// Its times are on the monotonic clock (tokio's `Instant`), as are request timeouts
/// ([`super::client`]): a step of the wall clock neither stalls nor hurries a retry.
pub struct Gate {
    backoff: ExponentialBackoff,
    failing: bool,
    ready_at: Instant,
    /// When the current run of failures began to rest; answers to requests sent before it do
    /// not escalate the backoff again (they were in flight when the first failure came).
    failed_at: Option<Instant>,
    probe_in_flight: bool,
}

impl Gate {
    /// `jitter` off makes the delays exact: initial, doubling, capped at `max`.
    pub fn new(initial: Duration, max: Duration, jitter: bool) -> Gate {
        let backoff = ExponentialBackoff {
            current_interval: initial,
            initial_interval: initial,
            randomization_factor: if jitter { 0.5 } else { 0.0 },
            multiplier: 2.0,
            max_interval: max,
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        Gate {
            backoff,
            failing: false,
            ready_at: Instant::now(),
            failed_at: None,
            probe_in_flight: false,
        }
    }

    pub fn is_failing(&self) -> bool {
        self.failing
    }

    /// When the next probe may go, while failing.
    pub fn ready_at(&self) -> Instant {
        self.ready_at
    }

    /// How many more requests may start now, given how many are in flight.
    pub fn slots(&self, now: Instant, concurrency: usize, in_flight: usize) -> usize {
        if !self.failing {
            concurrency.saturating_sub(in_flight)
        } else if now >= self.ready_at && !self.probe_in_flight {
            1
        } else {
            0
        }
    }

    /// Records that a request started; while failing, it is the probe.
    pub fn started(&mut self) {
        if self.failing {
            self.probe_in_flight = true;
        }
    }

    pub fn succeeded(&mut self) {
        self.failing = false;
        self.failed_at = None;
        self.probe_in_flight = false;
        self.backoff.reset();
    }

    /// Records a failure and returns how long the destination now rests.
    pub fn failed(&mut self, now: Instant, retry_after: Option<Duration>) -> Duration {
        self.failed_request(now, now, retry_after)
    }

    /// Records the failure of a request sent at `sent_at`. One that was already in flight when
    /// the destination started to rest frees its slot and may lengthen the rest (Retry-After),
    /// but does not double the backoff again.
    pub fn failed_request(
        &mut self,
        now: Instant,
        sent_at: Instant,
        retry_after: Option<Duration>,
    ) -> Duration {
        let stale = self.failed_at.is_some_and(|at| sent_at < at);
        let delay = if stale {
            self.ready_at.saturating_duration_since(now)
        } else {
            self.backoff
                .next_backoff()
                .unwrap_or(self.backoff.max_interval)
        };
        let delay = match retry_after {
            Some(wait) => wait.max(delay),
            None => delay,
        };
        self.failing = true;
        if !stale {
            self.failed_at = Some(now);
            self.probe_in_flight = false;
        }
        self.ready_at = self.ready_at.max(now + delay);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_table() {
        let table: &[(u16, Class)] = &[
            (200, Class::Delivered),
            (201, Class::Delivered),
            (204, Class::Delivered),
            (299, Class::Delivered),
            (301, Class::Reject),
            (400, Class::Reject),
            (401, Class::AuthRejected),
            (403, Class::AuthRejected),
            (404, Class::Reject),
            (408, Class::Retry),
            (409, Class::Reject),
            (413, Class::Reject),
            (422, Class::Reject),
            (425, Class::Retry),
            (429, Class::Retry),
            (500, Class::Retry),
            (502, Class::Retry),
            (503, Class::Retry),
            (599, Class::Retry),
        ];
        for &(status, class) in table {
            assert_eq!(classify(status), class, "status {status}");
        }
    }

    #[test]
    fn retry_after_table() {
        let now = httpdate::parse_http_date("Sun, 29 Nov 2026 10:00:00 GMT").unwrap();
        let table: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            ("120", Some(120)),
            (" 7 ", Some(7)),
            ("999999", Some(3600)),
            ("Sun, 29 Nov 2026 10:00:30 GMT", Some(30)),
            ("Sun, 29 Nov 2026 09:00:00 GMT", Some(0)),
            ("Mon, 30 Nov 2026 10:00:00 GMT", Some(3600)),
            ("-5", None),
            ("soon", None),
            ("", None),
        ];
        for &(value, expected) in table {
            assert_eq!(
                parse_retry_after(value, now),
                expected.map(Duration::from_secs),
                "{value:?}"
            );
        }
    }

    #[test]
    fn retry_after_dates_are_measured_on_the_server_clock() {
        let server_now = "Sun, 29 Nov 2026 10:00:00 GMT";
        let ten_days_behind = httpdate::parse_http_date("Thu, 19 Nov 2026 10:00:00 GMT").unwrap();
        let right = httpdate::parse_http_date(server_now).unwrap();
        let a_day_ahead = httpdate::parse_http_date("Mon, 30 Nov 2026 10:00:00 GMT").unwrap();
        // (Retry-After, Date, local clock, delay)
        let table: &[(&str, Option<&str>, SystemTime, Option<u64>)] = &[
            (
                "Sun, 29 Nov 2026 10:00:30 GMT",
                Some(server_now),
                ten_days_behind,
                Some(30),
            ),
            (
                "Sun, 29 Nov 2026 10:00:30 GMT",
                Some(server_now),
                a_day_ahead,
                Some(30),
            ),
            (
                "Sun, 29 Nov 2026 10:00:30 GMT",
                Some(server_now),
                right,
                Some(30),
            ),
            // Without a Date, the local clock is all there is.
            ("Sun, 29 Nov 2026 10:00:30 GMT", None, right, Some(30)),
            (
                "Sun, 29 Nov 2026 10:00:30 GMT",
                None,
                ten_days_behind,
                Some(3600),
            ),
            // An unreadable Date is ignored.
            (
                "Sun, 29 Nov 2026 10:00:30 GMT",
                Some("soon"),
                right,
                Some(30),
            ),
            // Seconds need no clock.
            ("45", Some(server_now), ten_days_behind, Some(45)),
            ("later", Some(server_now), right, None),
        ];
        for &(value, date, now, expected) in table {
            let mut headers = hyper::HeaderMap::new();
            headers.insert(hyper::header::RETRY_AFTER, value.parse().unwrap());
            if let Some(date) = date {
                headers.insert(hyper::header::DATE, date.parse().unwrap());
            }
            assert_eq!(
                retry_after(&headers, now),
                expected.map(Duration::from_secs),
                "{value:?} with Date {date:?}"
            );
        }
        assert_eq!(retry_after(&hyper::HeaderMap::new(), right), None);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_to_the_cap_then_resets() {
        let mut gate = Gate::new(
            Duration::from_millis(100),
            Duration::from_millis(500),
            false,
        );
        let start = Instant::now();
        assert_eq!(gate.slots(start, 4, 1), 3);
        let delays: Vec<_> = (0..5)
            .map(|_| gate.failed(Instant::now(), None).as_millis())
            .collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        assert_eq!(gate.slots(Instant::now(), 4, 0), 0, "nothing while resting");
        tokio::time::advance(Duration::from_millis(499)).await;
        assert_eq!(gate.slots(Instant::now(), 4, 0), 0);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(gate.slots(Instant::now(), 4, 0), 1, "one probe");
        gate.started();
        assert_eq!(
            gate.slots(Instant::now(), 4, 1),
            0,
            "only one probe at a time"
        );
        gate.succeeded();
        assert_eq!(gate.slots(Instant::now(), 4, 1), 3);
        assert_eq!(
            gate.failed(Instant::now(), None),
            Duration::from_millis(100),
            "reset after success"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_wins_when_longer() {
        let mut gate = Gate::new(Duration::from_millis(100), Duration::from_secs(1), false);
        assert_eq!(
            gate.failed(Instant::now(), Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            gate.failed(Instant::now(), Some(Duration::from_millis(10))),
            Duration::from_millis(200)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn answers_already_in_flight_do_not_escalate() {
        let mut gate = Gate::new(Duration::from_millis(100), Duration::from_secs(10), false);
        let sent = Instant::now();
        tokio::time::advance(Duration::from_millis(5)).await;
        assert_eq!(
            gate.failed_request(Instant::now(), sent, None),
            Duration::from_millis(100)
        );
        // Three more that were sent together with the first fail after it.
        for _ in 0..3 {
            gate.failed_request(Instant::now(), sent, None);
        }
        tokio::time::advance(Duration::from_millis(100)).await;
        gate.started();
        let probe_sent = Instant::now();
        assert_eq!(
            gate.failed_request(Instant::now(), probe_sent, None),
            Duration::from_millis(200)
        );
    }

    #[test]
    fn jitter_stays_within_half_of_the_interval() {
        let mut gate = Gate::new(Duration::from_millis(1000), Duration::from_secs(60), true);
        let first = gate.failed(Instant::now(), None);
        assert!(
            first >= Duration::from_millis(500) && first <= Duration::from_millis(1500),
            "{first:?}"
        );
    }
}
