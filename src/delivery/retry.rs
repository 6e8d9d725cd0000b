//! What an answer means (a pure table), `Retry-After`, and the retry schedule of one export.

use std::time::{Duration, SystemTime};

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;

use super::controller::Signal;
use crate::metrics::{DeliveryOutcome, RetryCause};
use crate::store::codec::ExportRecord;

/// `Retry-After` is honoured up to this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What to do with an export after an HTTP answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// 2xx: it leaves the outbox.
    Delivered,
    /// 401, 403: drop the token, fetch a new one, retry.
    AuthRejected,
    /// 408, 425, 429, 5xx: retry after backing off. Also what SPEC does not name: a redirect
    /// (not followed: the endpoint moved, which the configuration must say) or a status
    /// outside HTTP's classes. Either is a fault of the endpoint or the configuration, not of
    /// the export, so it keeps the export rather than dead-letter the whole outbox.
    Retry,
    /// Any other 4xx: dead-letter it.
    Reject,
}

pub fn classify(status: u16) -> Class {
    match status {
        200..=299 => Class::Delivered,
        401 | 403 => Class::AuthRejected,
        408 | 425 | 429 => Class::Retry,
        400..=499 => Class::Reject,
        _ => Class::Retry,
    }
}

/// What delivery does with the exports of an attempt, once it is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// They leave the outbox.
    Delivered,
    /// Refused for what they are: dead letters (an array is split and its exports sent alone
    /// first).
    Rejected,
    /// Sent again after their backoff.
    Retry(Retry),
}

/// What an attempt to retry tells the controller, and the cause it is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub signal: Signal,
    pub cause: RetryCause,
}

impl Retry {
    pub fn outcome(self) -> DeliveryOutcome {
        match self.cause {
            RetryCause::Auth => DeliveryOutcome::AuthRejected,
            _ => DeliveryOutcome::Retried,
        }
    }
}

/// Why an attempt got no answer from the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoAnswer {
    /// No token could be had, so nothing was sent.
    Token,
    Timeout,
    Connection,
}

/// The verdict on an answer. `token_dropped_before`: a 401/403 to a token an earlier answer
/// refused first, which says nothing of the destination that the first did not. A gateway
/// that timed out (504) or could not reach what it fronts (502), and a server that timed out
/// waiting for the request (408), are overload as 503 is: the timeouts and connection errors
/// SPEC halves the limit on, one hop away. A 431 refuses the request's headers, not what an
/// export holds: an array's (its `Idempotency-Key` lists every export) is split as a refused
/// array is, while one export's is the token's or the custom headers' fault, the
/// configuration's or the token endpoint's to mend, and is retried rather than dead-letter
/// the whole outbox, as a redirect is.
pub fn verdict(status: u16, token_dropped_before: bool, array: bool) -> Verdict {
    let retry = |signal, cause| Verdict::Retry(Retry { signal, cause });
    if status == 431 && !array {
        return retry(Signal::Failed, RetryCause::ServerError);
    }
    match classify(status) {
        Class::Delivered => Verdict::Delivered,
        Class::Reject => Verdict::Rejected,
        Class::AuthRejected if token_dropped_before => {
            retry(Signal::TokenDroppedBefore, RetryCause::Auth)
        }
        Class::AuthRejected => retry(Signal::Failed, RetryCause::Auth),
        Class::Retry => match status {
            429 => retry(Signal::RateLimited, RetryCause::RateLimited),
            503 => retry(Signal::Overloaded, RetryCause::Unavailable),
            408 | 502 | 504 => retry(Signal::Overloaded, RetryCause::ServerError),
            _ => retry(Signal::Failed, RetryCause::ServerError),
        },
    }
}

/// The retry of an attempt without an answer: a timeout or a connection error is overload
/// (SPEC halves the limit on them); a failed token request says nothing of the endpoint's load.
pub fn retry_without_answer(why: NoAnswer) -> Retry {
    let (signal, cause) = match why {
        NoAnswer::Token => (Signal::Failed, RetryCause::Token),
        NoAnswer::Timeout => (Signal::Overloaded, RetryCause::Timeout),
        NoAnswer::Connection => (Signal::Overloaded, RetryCause::Connection),
    };
    Retry { signal, cause }
}

/// Parses `Retry-After` (delta seconds or an HTTP date), capped at [`MAX_RETRY_AFTER`]. A
/// list, as a proxy makes of the field given twice (`120, 120`), waits for its longest item
/// that parses.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    list_items(value)
        .filter_map(|item| parse_retry_after_item(item, now))
        .max()
}

/// The items of a comma-separated field value whose items may be HTTP dates, which hold a
/// comma of their own after the day's name (`Sun, 29 Nov 2026 10:00:30 GMT`, or RFC 850's
/// `Sunday, 29-Nov-26 10:00:30 GMT`).
fn list_items(value: &str) -> impl Iterator<Item = &str> {
    let mut rest = value;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = rest.find(',').unwrap_or(rest.len());
        let first = rest[..end].trim();
        // A day's name, short (`Sun`, IMF-fixdate) or whole (`Sunday`, RFC 850's form).
        let day = DAYS.iter().any(|(short, whole)| {
            first.eq_ignore_ascii_case(short) || first.eq_ignore_ascii_case(whole)
        });
        if day {
            end = rest[end..]
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ',')
                .map_or(rest.len(), |(at, _)| end + at);
        }
        let item = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or("");
        Some(item)
    })
}

/// The days' names an HTTP date begins with.
const DAYS: [(&str, &str); 7] = [
    ("Mon", "Monday"),
    ("Tue", "Tuesday"),
    ("Wed", "Wednesday"),
    ("Thu", "Thursday"),
    ("Fri", "Friday"),
    ("Sat", "Saturday"),
    ("Sun", "Sunday"),
];

fn parse_retry_after_item(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let delay = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // More seconds than a u64 holds is still a wait, of the longest kind.
        value
            .parse::<u64>()
            .map_or(MAX_RETRY_AFTER, Duration::from_secs)
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
    let now = answer_clock(headers, now);
    headers
        .get_all(hyper::header::RETRY_AFTER)
        .iter()
        .filter_map(|value| parse_retry_after(value.to_str().ok()?, now))
        .max()
}

/// The time an answer was made on the server's clock: its `Date` header, else `now`. Times
/// the server names (a `Retry-After` date, a quota's reset) are measured against it.
pub fn answer_clock(headers: &hyper::HeaderMap, now: SystemTime) -> SystemTime {
    headers
        .get(hyper::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .unwrap_or(now)
}

/// The retry schedule of one export, and of the probes while the destination is down:
/// `initial`, doubling per failed attempt up to `max`, with jitter (off in tests, for exact
/// delays); a `Retry-After` is a floor.
#[derive(Debug)]
pub struct RetrySchedule {
    backoff: ExponentialBackoff,
}

impl RetrySchedule {
    pub fn new(initial: Duration, max: Duration, jitter: bool) -> RetrySchedule {
        RetrySchedule {
            backoff: ExponentialBackoff {
                current_interval: initial,
                initial_interval: initial,
                randomization_factor: if jitter { 0.5 } else { 0.0 },
                multiplier: 2.0,
                max_interval: max,
                max_elapsed_time: None,
                ..ExponentialBackoff::default()
            },
        }
    }

    /// The schedule of an export that failed `failures` times already (before a restart, or
    /// before the window read it again): its next delay is the one its next failure gets,
    /// `initial` doubled that many times, up to `max`.
    pub fn after_failures(mut self, failures: u32) -> RetrySchedule {
        let b = &mut self.backoff;
        b.current_interval = b
            .initial_interval
            .checked_mul(2u32.saturating_pow(failures))
            .map_or(b.max_interval, |d| d.min(b.max_interval));
        self
    }

    /// Starts again from `initial`.
    pub fn reset(&mut self) {
        self.backoff.reset();
    }

    /// How long the export waits after one more failed attempt. The jittered delay is held to
    /// `max` too: `backoff` caps the interval before jittering it, so alone it waits up to
    /// 1.5 × `max`. A draw above `max` is reflected below it, so that at the cap the waits
    /// still spread over [`max`/2, `max`] rather than pile up at `max` in step.
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        let max = self.backoff.max_interval;
        let drawn = self.backoff.next_backoff().unwrap_or(max);
        let delay = match drawn.checked_sub(max) {
            Some(over) if !over.is_zero() => max.saturating_sub(over),
            _ => drawn,
        };
        match retry_after {
            Some(wait) => wait.max(delay),
            None => delay,
        }
    }
}

/// How many failed attempts of an export its retry schedule counts from: those stored with it,
/// unless it was put back in the outbox (`outbox retry`) since its last attempt, which starts
/// its schedule again.
pub fn failures_before(record: &ExportRecord) -> u32 {
    match record.last_attempt_at_ms {
        Some(at) if at >= record.queued_at_ms => record.attempts,
        _ => 0,
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
            (301, Class::Retry),
            (308, Class::Retry),
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
            (600, Class::Retry),
            (999, Class::Retry),
            (100, Class::Retry),
        ];
        for &(status, class) in table {
            assert_eq!(classify(status), class, "status {status}");
        }
    }

    #[test]
    fn what_attempts_tell_the_controller_and_are_counted_as() {
        use DeliveryOutcome::{AuthRejected, Retried};
        let retry = |signal, cause| Verdict::Retry(Retry { signal, cause });
        // (status, token dropped before, verdict, outcome counted when retried)
        let table: &[(u16, bool, Verdict, Option<DeliveryOutcome>)] = &[
            (200, false, Verdict::Delivered, None),
            (204, true, Verdict::Delivered, None),
            (400, false, Verdict::Rejected, None),
            (413, true, Verdict::Rejected, None),
            (
                429,
                false,
                retry(Signal::RateLimited, RetryCause::RateLimited),
                Some(Retried),
            ),
            (
                503,
                false,
                retry(Signal::Overloaded, RetryCause::Unavailable),
                Some(Retried),
            ),
            (
                408,
                false,
                retry(Signal::Overloaded, RetryCause::ServerError),
                Some(Retried),
            ),
            (
                502,
                false,
                retry(Signal::Overloaded, RetryCause::ServerError),
                Some(Retried),
            ),
            (
                504,
                false,
                retry(Signal::Overloaded, RetryCause::ServerError),
                Some(Retried),
            ),
            (
                425,
                false,
                retry(Signal::Failed, RetryCause::ServerError),
                Some(Retried),
            ),
            (
                500,
                false,
                retry(Signal::Failed, RetryCause::ServerError),
                Some(Retried),
            ),
            (
                501,
                false,
                retry(Signal::Failed, RetryCause::ServerError),
                Some(Retried),
            ),
            (
                308,
                false,
                retry(Signal::Failed, RetryCause::ServerError),
                Some(Retried),
            ),
            (
                401,
                false,
                retry(Signal::Failed, RetryCause::Auth),
                Some(AuthRejected),
            ),
            (
                403,
                true,
                retry(Signal::TokenDroppedBefore, RetryCause::Auth),
                Some(AuthRejected),
            ),
        ];
        for &(status, dropped_before, expected, outcome) in table {
            let got = verdict(status, dropped_before, false);
            assert_eq!(got, expected, "status {status}");
            assert_eq!(
                verdict(status, dropped_before, true),
                got,
                "an array, {status}"
            );
            let counted = match got {
                Verdict::Retry(retry) => Some(retry.outcome()),
                _ => None,
            };
            assert_eq!(counted, outcome, "status {status}");
        }
        // Headers too large: one export's are not its own fault, an array's may be.
        assert_eq!(
            verdict(431, false, false),
            retry(Signal::Failed, RetryCause::ServerError)
        );
        assert_eq!(verdict(431, false, true), Verdict::Rejected);
        let table = [
            (NoAnswer::Token, Signal::Failed, RetryCause::Token),
            (NoAnswer::Timeout, Signal::Overloaded, RetryCause::Timeout),
            (
                NoAnswer::Connection,
                Signal::Overloaded,
                RetryCause::Connection,
            ),
        ];
        for (why, signal, cause) in table {
            let retry = retry_without_answer(why);
            assert_eq!(retry, Retry { signal, cause }, "{why:?}");
            assert_eq!(retry.outcome(), Retried, "{why:?}");
        }
    }

    #[test]
    fn retry_after_dates_are_measured_on_the_server_clock() {
        let server_now = "Sun, 29 Nov 2026 10:00:00 GMT";
        let ten_days_behind = httpdate::parse_http_date("Thu, 19 Nov 2026 10:00:00 GMT").unwrap();
        let right = httpdate::parse_http_date(server_now).unwrap();
        let a_day_ahead = httpdate::parse_http_date("Mon, 30 Nov 2026 10:00:00 GMT").unwrap();
        let at = "Sun, 29 Nov 2026 10:00:30 GMT";
        // (Retry-After, Date, local clock, delay)
        let table: &[(&str, Option<&str>, SystemTime, Option<u64>)] = &[
            (at, Some(server_now), ten_days_behind, Some(30)),
            (at, Some(server_now), a_day_ahead, Some(30)),
            (at, Some(server_now), right, Some(30)),
            // Without a Date, the local clock is all there is.
            (at, None, right, Some(30)),
            (at, None, ten_days_behind, Some(3600)),
            // An unreadable Date is ignored.
            (at, Some("soon"), right, Some(30)),
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
        // The field given twice: its longest wait, as when a proxy joins them.
        let mut headers = hyper::HeaderMap::new();
        headers.append(hyper::header::RETRY_AFTER, "5".parse().unwrap());
        headers.append(hyper::header::RETRY_AFTER, at.parse().unwrap());
        headers.append(hyper::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&headers, right), Some(Duration::from_secs(30)));
    }

    #[test]
    fn retry_after_table() {
        let now = httpdate::parse_http_date("Sun, 29 Nov 2026 10:00:00 GMT").unwrap();
        let table: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            ("120", Some(120)),
            (" 7 ", Some(7)),
            ("999999", Some(3600)),
            ("99999999999999999999999", Some(3600)),
            ("+5", None),
            ("Sun, 29 Nov 2026 10:00:30 GMT", Some(30)),
            ("Sun, 29 Nov 2026 09:00:00 GMT", Some(0)),
            ("Mon, 30 Nov 2026 10:00:00 GMT", Some(3600)),
            ("-5", None),
            ("soon", None),
            ("", None),
            // The field given twice, joined into a list by a proxy: its longest wait.
            ("120, 120", Some(120)),
            ("5,120", Some(120)),
            ("soon, 7", Some(7)),
            (
                "Sun, 29 Nov 2026 10:00:30 GMT, Sun, 29 Nov 2026 10:01:00 GMT",
                Some(60),
            ),
            ("10, Sun, 29 Nov 2026 10:00:30 GMT", Some(30)),
            ("Sunday, 29-Nov-26 10:00:30 GMT", Some(30)),
            ("Sunday, 29-Nov-26 10:00:30 GMT, 45", Some(45)),
            ("Sun, 29 Nov 2026 10:00:30 GMT,45", Some(45)),
            (",", None),
            ("Sun,", None),
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
    fn export_backoff_doubles_to_the_cap_and_retry_after_is_a_floor() {
        let mut backoff = RetrySchedule::new(
            Duration::from_millis(100),
            Duration::from_millis(500),
            false,
        );
        let table: &[(Option<u64>, u64)] = &[
            (None, 100),
            (None, 200),
            (Some(1000), 1000),
            (Some(10), 500),
            (None, 500),
        ];
        for &(retry_after, expected) in table {
            assert_eq!(
                backoff.next_delay(retry_after.map(Duration::from_millis)),
                Duration::from_millis(expected)
            );
        }
    }

    #[test]
    fn a_schedule_goes_on_from_the_failures_before() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        let table: &[(u32, &[u64])] = &[
            (0, &[100, 200, 400]),
            (1, &[200, 400, 800]),
            (3, &[800, 1600, 3200]),
            (6, &[6400, 10_000, 10_000]),
            (7, &[10_000, 10_000]),
            (40, &[10_000]),
            (u32::MAX, &[10_000]),
        ];
        for &(failures, delays) in table {
            let mut schedule = RetrySchedule::new(initial, max, false).after_failures(failures);
            let got: Vec<u64> = delays
                .iter()
                .map(|_| schedule.next_delay(None).as_millis() as u64)
                .collect();
            assert_eq!(got, delays, "after {failures} failures");
        }
    }

    #[test]
    fn failures_count_from_the_last_put_back() {
        use crate::profile::Reason;
        let record = |attempts, queued_at_ms, last_attempt_at_ms| ExportRecord {
            attempts,
            queued_at_ms,
            last_attempt_at_ms,
            ..ExportRecord::new_pending("p".into(), Reason::Segment, "{}".into(), 0, 0)
        };
        let table = [
            (record(0, 10, None), 0),
            (record(4, 10, Some(20)), 4),
            (record(4, 10, Some(10)), 4),
            // Put back by `outbox retry` after its last attempt.
            (record(4, 30, Some(20)), 0),
        ];
        for (record, expected) in table {
            assert_eq!(failures_before(&record), expected, "{record:?}");
        }
    }

    #[test]
    fn jitter_stays_within_half_of_the_interval() {
        let mut backoff =
            RetrySchedule::new(Duration::from_millis(1000), Duration::from_secs(60), true);
        let first = backoff.next_delay(None);
        assert!(
            first >= Duration::from_millis(500) && first <= Duration::from_millis(1500),
            "{first:?}"
        );
    }

    #[test]
    fn jitter_never_waits_past_the_cap() {
        let max = Duration::from_millis(2000);
        let mut backoff = RetrySchedule::new(Duration::from_millis(200), max, true);
        let delays: Vec<Duration> = (0..200).map(|_| backoff.next_delay(None)).collect();
        assert!(delays.iter().all(|d| *d <= max), "{delays:?}");
        // At the cap it still varies, below it, and not in step at the cap itself.
        let at_cap = &delays[10..];
        assert!(at_cap.iter().all(|d| *d >= max / 2), "{at_cap:?}");
        let above_three_quarters = at_cap.iter().filter(|d| **d > max * 3 / 4).count();
        assert!(
            (at_cap.len() / 4..at_cap.len() * 3 / 4).contains(&above_three_quarters),
            "{above_three_quarters} of {}",
            at_cap.len()
        );
        let at_max = at_cap.iter().filter(|d| **d == max).count();
        assert!(at_max <= 2, "{at_max} waits of exactly the cap");
    }
}
