//! The endpoint's own word on its rate limit: `RateLimit-Remaining` and `RateLimit-Reset`
//! (the IETF draft's, or with an `X-` in front as many APIs send them), or the draft's single
//! `RateLimit` field (`limit=100, remaining=0, reset=30`, or `"default";r=0;t=30`). An
//! endpoint that says how many requests its window has left, and when the window starts
//! again, is not sent more than that: once they are spent, requests wait for the window
//! rather than collect 429s. Parsing is pure and tested from a table; [`Quota`] is what the
//! controller keeps of the latest answer that said so.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::retry::MAX_RETRY_AFTER;

/// What one answer said of the endpoint's quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advertised {
    /// Requests the window has left.
    pub remaining: u64,
    /// When the window starts again, from the answer (at most an hour).
    pub resets_in: Duration,
}

/// Reset values from this many seconds up are a time since 1970 (GitHub's and others'
/// `X-RateLimit-Reset`), not a number of seconds from now.
const EPOCH_SECONDS_FROM: f64 = 1e9;

/// The quota an answer advertises, when it says both how much is left and when the window
/// starts again. Times since 1970 are measured against the answer's `Date` (the endpoint's
/// clock), else `now`.
pub fn advertised(headers: &hyper::HeaderMap, now: SystemTime) -> Option<Advertised> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let separate = |prefix: &str| {
        Some((
            text(&format!("{prefix}ratelimit-remaining"))?,
            text(&format!("{prefix}ratelimit-reset"))?,
        ))
    };
    let (remaining, reset) = match separate("").or_else(|| separate("x-")) {
        Some((remaining, reset)) => (first_number(remaining)?, first_number(reset)?),
        None => combined(text("ratelimit")?)?,
    };
    if remaining < 0.0 || reset < 0.0 {
        return None;
    }
    let resets_in = if reset >= EPOCH_SECONDS_FROM {
        let reference = text("date")
            .and_then(|date| httpdate::parse_http_date(date).ok())
            .unwrap_or(now);
        let at = SystemTime::UNIX_EPOCH + Duration::try_from_secs_f64(reset).ok()?;
        at.duration_since(reference).unwrap_or_default()
    } else {
        Duration::try_from_secs_f64(reset).ok()?
    };
    Some(Advertised {
        remaining: remaining as u64,
        resets_in: resets_in.min(MAX_RETRY_AFTER),
    })
}

/// The first number of a field value: `42`, `42, 100;w=60` (a list, as some send for several
/// policies), `1.5`.
fn first_number(value: &str) -> Option<f64> {
    let first = value.split([',', ';']).next()?.trim();
    first.parse::<f64>().ok().filter(|n| n.is_finite())
}

/// (remaining, reset) from a draft `RateLimit` field: `limit=100, remaining=50, reset=30`
/// or `"default";r=50;t=30`.
fn combined(value: &str) -> Option<(f64, f64)> {
    let (mut remaining, mut reset) = (None, None);
    for parameter in value.split([',', ';']) {
        let Some((key, number)) = parameter.split_once('=') else {
            continue;
        };
        let number = number.trim().trim_matches('"').parse::<f64>().ok();
        match key.trim() {
            "remaining" | "r" => remaining = number,
            "reset" | "t" => reset = number,
            _ => {}
        }
    }
    Some((remaining?, reset?)).filter(|(r, t)| r.is_finite() && t.is_finite())
}

/// Resets this close are taken for one window (see [`Quota::updated`]).
const SAME_WINDOW: Duration = Duration::from_secs(1);

/// The quota the latest answer advertised, until its window starts again.
#[derive(Debug, Clone, Copy)]
pub struct Quota {
    /// Requests that may still start in this window: what the answer said was left, less the
    /// requests then in flight (the endpoint may not have counted them yet) and those started
    /// since.
    left: i64,
    until: Instant,
}

impl Quota {
    /// What an answer that came `now` advertised, with `others_in_flight` requests then out
    /// besides its own.
    pub fn heard(now: Instant, advertised: Advertised, others_in_flight: usize) -> Quota {
        let remaining = i64::try_from(advertised.remaining).unwrap_or(i64::MAX);
        Quota {
            left: remaining.saturating_sub(others_in_flight as i64),
            until: now + advertised.resets_in,
        }
    }

    /// This quota after another answer advertised `heard`. Answers to requests in flight
    /// together may come in another order than the endpoint counted them, so within one
    /// window (resets no more than [`SAME_WINDOW`] apart, the rounding of whole seconds) the
    /// smaller count left holds: a late answer does not give back requests already spent.
    pub fn updated(self, now: Instant, heard: Quota) -> Quota {
        let same_window = now < self.until && heard.until <= self.until + SAME_WINDOW;
        if same_window && self.left < heard.left {
            Quota {
                left: self.left,
                until: self.until.max(heard.until),
            }
        } else {
            heard
        }
    }

    /// How many requests may start now, or `None` once the window has started again.
    pub fn allows(&self, now: Instant) -> Option<usize> {
        (now < self.until).then(|| self.left.max(0) as usize)
    }

    /// When the window starts again, if none may start before.
    pub fn spent_until(&self, now: Instant) -> Option<Instant> {
        (self.allows(now) == Some(0)).then_some(self.until)
    }

    pub fn started(&mut self) {
        self.left -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> hyper::HeaderMap {
        let mut map = hyper::HeaderMap::new();
        for (name, value) in pairs {
            map.insert(
                hyper::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    /// Headers of an answer, and what they advertise.
    type Case<'a> = (&'a [(&'a str, &'a str)], Option<Advertised>);

    #[test]
    fn advertised_quotas_table() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let secs = Duration::from_secs;
        let quota = |remaining, resets_in| {
            Some(Advertised {
                remaining,
                resets_in,
            })
        };
        let table: &[Case] = &[
            (
                &[("RateLimit-Remaining", "0"), ("RateLimit-Reset", "30")],
                quota(0, secs(30)),
            ),
            (
                &[("X-RateLimit-Remaining", "57"), ("X-RateLimit-Reset", "12")],
                quota(57, secs(12)),
            ),
            // A time since 1970, on the local clock, or on the answer's `Date`.
            (
                &[
                    ("x-ratelimit-remaining", "4999"),
                    ("x-ratelimit-reset", "1700000090"),
                ],
                quota(4999, secs(90)),
            ),
            (
                &[
                    ("x-ratelimit-remaining", "0"),
                    ("x-ratelimit-reset", "1700000090"),
                    ("date", "Tue, 14 Nov 2023 22:14:30 GMT"),
                ],
                quota(0, secs(20)),
            ),
            // A reset already past on the endpoint's clock: the window starts again now.
            (
                &[
                    ("x-ratelimit-remaining", "0"),
                    ("x-ratelimit-reset", "1699999000"),
                ],
                quota(0, Duration::ZERO),
            ),
            (
                &[("RateLimit-Remaining", "3"), ("RateLimit-Reset", "1.5")],
                quota(3, Duration::from_millis(1500)),
            ),
            (
                &[
                    ("RateLimit-Remaining", "10, 100;w=60"),
                    ("RateLimit-Reset", "5"),
                ],
                quota(10, secs(5)),
            ),
            (
                &[("RateLimit", "limit=100, remaining=0, reset=7")],
                quota(0, secs(7)),
            ),
            (&[("RateLimit", "\"default\";r=25;t=3")], quota(25, secs(3))),
            // At most an hour, as `Retry-After`.
            (
                &[("RateLimit-Remaining", "0"), ("RateLimit-Reset", "86400")],
                quota(0, secs(3600)),
            ),
            // Half a quota, or nonsense, says nothing.
            (&[("RateLimit-Remaining", "0")], None),
            (&[("X-RateLimit-Reset", "30")], None),
            (&[("RateLimit-Limit", "100")], None),
            (&[("RateLimit", "limit=100, reset=7")], None),
            (
                &[("RateLimit-Remaining", "-1"), ("RateLimit-Reset", "30")],
                None,
            ),
            (
                &[("RateLimit-Remaining", "many"), ("RateLimit-Reset", "30")],
                None,
            ),
            (
                &[("RateLimit-Remaining", "0"), ("RateLimit-Reset", "inf")],
                None,
            ),
            (&[], None),
        ];
        for (pairs, expected) in table {
            assert_eq!(advertised(&headers(pairs), now), *expected, "{pairs:?}");
        }
    }

    #[test]
    fn a_quota_counts_requests_in_flight_and_started_until_its_window_starts_again() {
        let now = Instant::now();
        let heard = |remaining, others| {
            Quota::heard(
                now,
                Advertised {
                    remaining,
                    resets_in: Duration::from_secs(2),
                },
                others,
            )
        };
        let mut quota = heard(5, 3);
        assert_eq!(quota.allows(now), Some(2));
        assert_eq!(quota.spent_until(now), None);
        quota.started();
        quota.started();
        assert_eq!(quota.allows(now), Some(0));
        assert_eq!(quota.spent_until(now), Some(now + Duration::from_secs(2)));
        let later = now + Duration::from_secs(2);
        assert_eq!(quota.allows(later), None);
        assert_eq!(quota.spent_until(later), None);
        // A late answer within the window gives back nothing; one after it starts over.
        let kept = heard(5, 0).updated(now, heard(40, 0));
        assert_eq!(kept.allows(now), Some(5));
        let kept = heard(40, 0).updated(now, heard(5, 0));
        assert_eq!(kept.allows(now), Some(5));
        let after = now + Duration::from_secs(3);
        let next_window = Quota::heard(
            after,
            Advertised {
                remaining: 40,
                resets_in: Duration::from_secs(1),
            },
            0,
        );
        assert_eq!(
            heard(5, 0).updated(after, next_window).allows(after),
            Some(40)
        );
        // More in flight than is left: none.
        assert_eq!(heard(2, 6).allows(now), Some(0));
        assert_eq!(heard(u64::MAX, 0).allows(now), Some(i64::MAX as usize));
    }
}
