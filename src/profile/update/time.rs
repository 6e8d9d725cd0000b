//! An update's `timestamp`: how it is read (to the microsecond, in UTC), how far ahead of the
//! agent's clock it may be, and how it is written back.

use chrono::{DateTime, Datelike, SecondsFormat, TimeDelta, Utc};

/// How far ahead of the agent's clock an update's timestamp may be (`ingest.max_future_s`): a
/// timestamp years ahead would make every later update of its profile stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FutureLimit {
    /// The agent's clock when the input arrived.
    pub now: DateTime<Utc>,
    pub max_future_s: u64,
}

impl FutureLimit {
    /// Refuses a timestamp more than `max_future_s` ahead of `now`, saying by how much.
    pub fn check(&self, timestamp: DateTime<Utc>) -> Result<(), String> {
        let ahead = timestamp - self.now;
        if ahead <= self.max_ahead() {
            return Ok(());
        }
        Err(format!(
            "`timestamp` {} is {} s ahead of the agent's clock ({}), more than ingest.max_future_s ({})",
            format_time(timestamp),
            ahead.num_seconds(),
            format_time(self.now),
            self.max_future_s
        ))
    }

    /// The time a clock must read for `timestamp` to pass [`FutureLimit::check`].
    pub fn passes_at(&self, timestamp: DateTime<Utc>) -> DateTime<Utc> {
        timestamp
            .checked_sub_signed(self.max_ahead())
            .unwrap_or(timestamp)
    }

    fn max_ahead(&self) -> TimeDelta {
        TimeDelta::try_seconds(i64::try_from(self.max_future_s).unwrap_or(i64::MAX))
            .unwrap_or(TimeDelta::MAX)
    }
}

/// An update's `timestamp`, in UTC, to the microsecond, as it is stored and compared: a
/// finer one, or a leap second (`23:59:60`, the next second's start once stored), would be
/// compared at one precision and stored at another, so that a resend of the same update
/// could be taken for an older one. RFC 3339 in ASCII (chrono also takes `−` for a minus), a
/// year from 0000 to 9999 once in UTC (exports carry it as RFC 3339).
pub fn parse_timestamp(text: &str) -> Result<DateTime<Utc>, String> {
    if !text.is_ascii() {
        return Err("is not RFC 3339: it holds characters other than ASCII".into());
    }
    let parsed = DateTime::parse_from_rfc3339(text)
        .map_err(|e| format!("is not RFC 3339: {e}"))?
        .with_timezone(&Utc);
    let in_utc = DateTime::from_timestamp_micros(parsed.timestamp_micros())
        .filter(|t| (0..=9999).contains(&t.year()))
        .ok_or_else(|| "is outside the years 0000 to 9999 once in UTC".to_owned())?;
    Ok(in_utc)
}

/// Formats a time as the exports carry it: RFC 3339, UTC, whole seconds.
pub fn format_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Formats a time as precisely as it is stored (RFC 3339, UTC, the fraction only when there
/// is one): a stored version's timestamp is what later updates are judged stale against.
pub fn format_stored_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Timestamps are kept to the microsecond: what is compared is what is stored.
    #[test]
    fn timestamp_table() {
        // (timestamp, in UTC as stored, or the start of the refusal)
        let cases: &[(&str, Result<&str, &str>)] = &[
            (
                "2026-01-01T01:00:05+01:00",
                Ok("2026-01-01T00:00:05.000000Z"),
            ),
            (
                "2026-01-01T00:00:05.1234569Z",
                Ok("2026-01-01T00:00:05.123456Z"),
            ),
            ("2016-12-31T23:59:60Z", Ok("2017-01-01T00:00:00.000000Z")),
            ("2016-12-31T23:59:60.5Z", Ok("2017-01-01T00:00:00.500000Z")),
            ("9999-12-31T23:59:59Z", Ok("9999-12-31T23:59:59.000000Z")),
            (
                "0000-01-01T00:30:00+01:00",
                Err("is outside the years 0000 to 9999"),
            ),
            (
                "9999-12-31T23:30:00-01:00",
                Err("is outside the years 0000 to 9999"),
            ),
            (
                "2026-01-01T00:00:05\u{2212}01:00",
                Err("is not RFC 3339: it holds characters"),
            ),
            ("2026-01-01T00:00:05", Err("is not RFC 3339: premature end")),
        ];
        for (text, expected) in cases {
            let got = parse_timestamp(text).map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true));
            match (got, expected) {
                (Ok(got), Ok(expected)) => assert_eq!(got, *expected, "{text}"),
                (Err(got), Err(expected)) => assert!(got.starts_with(expected), "{text}: {got}"),
                (got, _) => panic!("{text}: {got:?}"),
            }
        }
        // A resend of an update with a leap second is not older than its stored self.
        let leap = parse_timestamp("2016-12-31T23:59:60Z").unwrap();
        let stored = DateTime::from_timestamp_micros(leap.timestamp_micros()).unwrap();
        assert_eq!(leap, stored);
    }

    #[test]
    fn future_limit_table() {
        let now = DateTime::parse_from_rfc3339("2026-11-30T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let limit = FutureLimit {
            now,
            max_future_s: 86_400,
        };
        let at = |text: &str| {
            DateTime::parse_from_rfc3339(text)
                .unwrap()
                .with_timezone(&Utc)
        };
        // (timestamp, refused)
        let table = [
            ("2020-01-01T00:00:00Z", false),
            ("2026-11-30T00:00:00Z", false),
            ("2026-12-01T00:00:00Z", false), // exactly max_future_s ahead
            ("2026-12-01T00:00:01Z", true),
            ("2031-11-30T00:00:00Z", true),
        ];
        for (timestamp, refused) in table {
            assert_eq!(limit.check(at(timestamp)).is_err(), refused, "{timestamp}");
        }
        let reason = limit.check(at("2026-12-02T00:00:00Z")).unwrap_err();
        assert!(reason.contains("172800 s ahead"), "{reason}");
        assert!(reason.contains("ingest.max_future_s (86400)"), "{reason}");
        let huge = FutureLimit {
            now,
            max_future_s: u64::MAX,
        };
        assert!(huge.check(at("9999-12-31T23:59:59Z")).is_ok());
    }
}
