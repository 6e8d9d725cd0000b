//! The endpoint's own word on its rate limit: `RateLimit-Remaining` and `RateLimit-Reset`
//! (the IETF draft's, or as `X-RateLimit-*` and `X-Rate-Limit-*`, as many APIs send them), or
//! the draft's single `RateLimit` field (`limit=100, remaining=0, reset=30`, or
//! `"default";r=0;t=30`). An endpoint that says how many requests its window has left, and
//! when the window starts again, is not sent more than that: once they are spent, requests
//! wait for the window rather than collect 429s. Parsing is pure and tested from a table;
//! [`Quota`] is what the controller keeps of what the answers said.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::retry::{answer_clock, MAX_RETRY_AFTER};

/// What one answer said of the endpoint's quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advertised {
    /// Requests the window has left.
    pub remaining: u64,
    /// When the window starts again, from the answer (at most an hour).
    pub resets_in: Duration,
}

/// Reset values from this many up are a time since 1970 (GitHub's and others'
/// `X-RateLimit-Reset`), in seconds, or from [`EPOCH_MILLISECONDS_FROM`] in milliseconds, not
/// a number of seconds from now.
const EPOCH_SECONDS_FROM: f64 = 1e9;
const EPOCH_MILLISECONDS_FROM: f64 = 1e12;

/// The pairs of headers that say what is left and when the window starts again, as each
/// answer is looked at (names fixed here: no name is built for every answer).
const SEPARATE_HEADERS: [(&str, &str); 3] = [
    ("ratelimit-remaining", "ratelimit-reset"),
    ("x-ratelimit-remaining", "x-ratelimit-reset"),
    ("x-rate-limit-remaining", "x-rate-limit-reset"),
];

/// The quota an answer advertises, when it says both how much is left and when the window
/// starts again. Times since 1970 are measured against the answer's `Date` (the endpoint's
/// clock), else `now`.
pub fn advertised(headers: &hyper::HeaderMap, now: SystemTime) -> Option<Advertised> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let separate = |(remaining, reset): (&str, &str)| {
        Some((first_number(text(remaining)?)?, first_number(text(reset)?)?))
    };
    let (remaining, reset) = SEPARATE_HEADERS
        .into_iter()
        .find_map(separate)
        .or_else(|| combined(text("ratelimit")?))?;
    if remaining < 0.0 || reset < 0.0 {
        return None;
    }
    let resets_in = if reset >= EPOCH_SECONDS_FROM {
        let reference = answer_clock(headers, now);
        let seconds = if reset >= EPOCH_MILLISECONDS_FROM {
            reset / 1000.0
        } else {
            reset
        };
        // Past what a `Duration` or the system's time can hold: as far off as can be.
        let at = Duration::try_from_secs_f64(seconds)
            .ok()
            .and_then(|since| SystemTime::UNIX_EPOCH.checked_add(since));
        match at {
            Some(at) => at.duration_since(reference).unwrap_or_default(),
            None => MAX_RETRY_AFTER,
        }
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
    number(value.split([',', ';']).next()?)
}

fn number(text: &str) -> Option<f64> {
    let number = text.trim().trim_matches('"').parse::<f64>().ok()?;
    number.is_finite().then_some(number)
}

/// (remaining, reset) from a draft `RateLimit` field: the dictionary of one policy of the
/// early drafts (`limit=100, remaining=50, reset=30`), or the list of the later ones, an item
/// a policy (`"hour";r=0;t=1800, "second";r=9;t=1`), of which the most restrictive holds: the
/// fewest left, and of those the latest reset.
fn combined(value: &str) -> Option<(f64, f64)> {
    let parameters = |text: &'_ str, separator: char, names: [&str; 2]| {
        let (mut remaining, mut reset) = (None, None);
        for parameter in text.split(separator) {
            let Some((key, value)) = parameter.split_once('=') else {
                continue;
            };
            if key.trim() == names[0] {
                remaining = number(value);
            } else if key.trim() == names[1] {
                reset = number(value);
            }
        }
        Some((remaining?, reset?))
    };
    parameters(value, ',', ["remaining", "reset"]).or_else(|| {
        value
            .split(',')
            .filter_map(|policy| parameters(policy, ';', ["r", "t"]))
            .min_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)))
    })
}

/// 429s whose `Retry-After`s this close point at one instant (whole seconds, rounded).
const SAME_INSTANT: Duration = Duration::from_secs(1);
/// ... when they came at least this far apart: a `Retry-After` that stays the same (a token
/// bucket's "1") points further on as time goes, by more than [`SAME_INSTANT`] here.
const COUNTING_DOWN_FOR: Duration = Duration::from_millis(1_500);
/// Windows at least this long are told by a 429 once their length is known: one that points
/// a window's length (or two: a window may refuse nothing) after the last end, says to wait
/// longer than a token bucket's constant "1", and is at least the [`KNOWN_AFTER_REFUSED`]th
/// 429 of a run with no success to a request sent after the run began (a window that ended
/// refuses everything; stray 429s come alone).
const KNOWN_WINDOW_FROM: Duration = Duration::from_secs(10);
const KNOWN_AFTER_REFUSED: u32 = 3;

/// 429s whose `Retry-After` counts down to one instant: a fixed window that does not advertise
/// its quota, and refuses everything until it starts again. A success in between, to a request
/// sent after the count began, shows that it does not. Once windows have ended a known length
/// apart, the next is told sooner (see [`KNOWN_WINDOW_FROM`]).
#[derive(Debug, Default)]
pub struct CountDown {
    /// When the first 429 of the count came, and the instant it pointed at.
    first: Option<(Instant, Instant)>,
    /// 429s in a run with no success to a request sent after the run's first 429 came, and
    /// when that was.
    refused_in_a_row: u32,
    run_began: Option<Instant>,
    /// The end of the last window counted down to, and a window's length.
    last_end: Option<Instant>,
    length: Option<Duration>,
}

fn near(a: Instant, b: Instant) -> bool {
    let apart = if a > b { a - b } else { b - a };
    apart <= SAME_INSTANT
}

impl CountDown {
    /// A 429 that came `now` said to wait `retry_after`: the end of the window, when a 429 at
    /// least [`COUNTING_DOWN_FOR`] before pointed at the same instant, with no success in
    /// between, or as [`KNOWN_WINDOW_FROM`] says once a window's length is known.
    pub fn heard(&mut self, now: Instant, retry_after: Duration) -> Option<Instant> {
        let points_at = now + retry_after;
        self.refused_in_a_row += 1;
        self.run_began.get_or_insert(now);
        if retry_after > SAME_INSTANT && self.refused_in_a_row >= KNOWN_AFTER_REFUSED {
            if let Some(end) = self.a_known_window_end(points_at) {
                return Some(self.ended(end));
            }
        }
        if let Some((since, at)) = self.first {
            if near(points_at, at) {
                let counted_for = now.saturating_duration_since(since);
                return (counted_for >= COUNTING_DOWN_FOR).then(|| self.ended(at.max(points_at)));
            }
        }
        self.first = Some((now, points_at));
        None
    }

    /// A request sent at `sent_at` succeeded: sent after a 429 came, it shows the endpoint was
    /// not refusing everything then.
    pub fn accepted(&mut self, sent_at: Instant) {
        if self.first.is_some_and(|(since, _)| sent_at >= since) {
            self.first = None;
        }
        if self.run_began.is_none_or(|at| sent_at >= at) {
            self.refused_in_a_row = 0;
            self.run_began = None;
        }
    }

    /// `points_at`, when it is near the end of the window after the last, or the one after it,
    /// of the known length.
    fn a_known_window_end(&self, points_at: Instant) -> Option<Instant> {
        let (last, length) = (self.last_end?, self.length?);
        if length < KNOWN_WINDOW_FROM {
            return None;
        }
        [last + length, last + length * 2]
            .into_iter()
            .any(|end| near(points_at, end))
            .then_some(points_at)
    }

    /// Records a window's end; one later than the last ends another window, and the time
    /// between them is a window's length, or two.
    fn ended(&mut self, end: Instant) -> Instant {
        let Some(last) = self.last_end.filter(|&last| end > last + SAME_INSTANT) else {
            let end = self.last_end.map_or(end, |last| end.max(last));
            self.last_end = Some(end);
            return end;
        };
        let apart = end - last;
        let twice = |length: Duration| (length * 2).abs_diff(apart) <= SAME_INSTANT;
        if !self.length.is_some_and(twice) {
            self.length = Some(apart);
        }
        self.last_end = Some(end);
        end
    }
}

/// The quota the answers advertised: what the current window has left until it starts again,
/// then, until an answer speaks of the new window, about as much as a window was seen to have.
#[derive(Debug, Clone, Copy)]
pub struct Quota {
    /// Requests that may still start in this window: what the answer said was left, less the
    /// requests then in flight (the endpoint may not have counted them yet) and those started
    /// since.
    left: i64,
    until: Instant,
    /// The most an answer said a window had left (at least one): what the next window is taken
    /// to allow before an answer speaks of it, so that it does not begin with a burst of more
    /// than it takes.
    window: i64,
    /// Requests started since `until`.
    started_after: i64,
    /// When the request was sent whose answer said what `left` counts from.
    told_by: Instant,
}

impl Quota {
    /// What an answer that came `now`, to a request sent at `sent_at`, advertised, with
    /// `others_in_flight` requests then out besides its own.
    pub fn heard(
        now: Instant,
        sent_at: Instant,
        advertised: Advertised,
        others_in_flight: usize,
    ) -> Quota {
        let remaining = i64::try_from(advertised.remaining).unwrap_or(i64::MAX);
        Quota {
            left: remaining.saturating_sub(others_in_flight as i64),
            until: now + advertised.resets_in,
            window: remaining.max(1),
            started_after: 0,
            told_by: sent_at,
        }
    }

    /// This quota after another answer advertised `heard`. Answers to requests in flight
    /// together may come in another order than the endpoint counted them: one to a request
    /// sent before the one this quota counts from, that says more is left, is late and gives
    /// back nothing; one to a request sent before the window started again speaks of the old
    /// window, and is left out once it has.
    pub fn updated(self, now: Instant, heard: Quota) -> Quota {
        let window = self.window.max(heard.window);
        let of_the_old_window = now >= self.until && heard.told_by < self.until;
        let late = now < self.until && heard.left > self.left && heard.told_by < self.told_by;
        if of_the_old_window || late {
            Quota { window, ..self }
        } else {
            Quota { window, ..heard }
        }
    }

    /// Whether the window this quota knows of has started again.
    pub fn past(&self, now: Instant) -> bool {
        now >= self.until
    }

    /// How many requests may start now.
    pub fn allows(&self, now: Instant) -> usize {
        let left = if self.past(now) {
            self.window - self.started_after
        } else {
            self.left
        };
        left.max(0) as usize
    }

    /// When the window starts again, if none may start before.
    pub fn spent_until(&self, now: Instant) -> Option<Instant> {
        (!self.past(now) && self.left <= 0).then_some(self.until)
    }

    pub fn started(&mut self, now: Instant) {
        if self.past(now) {
            self.started_after += 1;
        } else {
            self.left -= 1;
        }
    }

    /// A request started at `started_at` that never reached the endpoint gives its start back
    /// to the window it was started in.
    pub fn given_back(&mut self, started_at: Instant) {
        if started_at >= self.until {
            self.guess_given_back();
        } else {
            self.left += 1;
        }
    }

    /// A request started at `started_at` that may have reached the endpoint but got no answer:
    /// within the window the answers told of, the endpoint may have counted it, and it keeps
    /// its start; on the guess past that window it gives its start back, since a guess spent
    /// on requests that got no answer would hold the next ones for good.
    pub fn unanswered(&mut self, started_at: Instant) {
        if started_at >= self.until {
            self.guess_given_back();
        }
    }

    fn guess_given_back(&mut self) {
        self.started_after = (self.started_after - 1).max(0);
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
            // Twitter's and Okta's names.
            (
                &[
                    ("x-rate-limit-remaining", "0"),
                    ("x-rate-limit-reset", "1700000045"),
                ],
                quota(0, secs(45)),
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
            // Several policies: the fewest left, and of those the latest reset.
            (
                &[("RateLimit", "\"hour\";r=0;t=1800, \"second\";r=9;t=1")],
                quota(0, secs(1800)),
            ),
            (
                &[("RateLimit", "\"a\";r=3;t=1, \"b\";r=3;t=40, \"c\";r=8;t=90")],
                quota(3, secs(40)),
            ),
            // A time since 1970 in milliseconds.
            (
                &[
                    ("x-ratelimit-remaining", "0"),
                    ("x-ratelimit-reset", "1700000012500"),
                ],
                quota(0, Duration::from_millis(12_500)),
            ),
            // Separate headers that cannot be read leave the field to say it.
            (
                &[
                    ("RateLimit-Remaining", "soon"),
                    ("RateLimit-Reset", "30"),
                    ("RateLimit", "limit=10, remaining=4, reset=6"),
                ],
                quota(4, secs(6)),
            ),
            // At most an hour, as `Retry-After`.
            (
                &[("RateLimit-Remaining", "0"), ("RateLimit-Reset", "86400")],
                quota(0, secs(3600)),
            ),
            // A time since 1970 too far to add to it, in seconds or milliseconds, or to hold.
            (
                &[
                    ("X-RateLimit-Remaining", "5"),
                    ("X-RateLimit-Reset", "1e22"),
                ],
                quota(5, secs(3600)),
            ),
            (
                &[("RateLimit", "remaining=1, reset=15000000000000000000000")],
                quota(1, secs(3600)),
            ),
            (
                &[("RateLimit", "remaining=0, reset=1e300")],
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
                now,
                Advertised {
                    remaining,
                    resets_in: Duration::from_secs(2),
                },
                others,
            )
        };
        let mut quota = heard(5, 3);
        assert_eq!(quota.allows(now), 2);
        assert_eq!(quota.spent_until(now), None);
        quota.started(now);
        quota.started(now);
        assert_eq!(quota.allows(now), 0);
        assert_eq!(quota.spent_until(now), Some(now + Duration::from_secs(2)));
        // More in flight than is left: none.
        assert_eq!(heard(2, 6).allows(now), 0);
        assert_eq!(heard(u64::MAX, 0).allows(now), i64::MAX as usize);
    }

    /// What an answer that came `at` to a request sent then said: `remaining` left, the
    /// window starting again `resets_in` seconds on; nothing else in flight.
    fn window(at: Instant, remaining: u64, resets_in: u64) -> Quota {
        sent_at(at, at, remaining, resets_in)
    }

    /// [`window`], the request sent at `sent`.
    fn sent_at(sent: Instant, at: Instant, remaining: u64, resets_in: u64) -> Quota {
        let advertised = Advertised {
            remaining,
            resets_in: Duration::from_secs(resets_in),
        };
        Quota::heard(at, sent, advertised, 0)
    }

    #[test]
    fn once_its_window_is_over_a_quota_allows_about_what_a_window_had_until_an_answer_says() {
        let now = Instant::now();
        // Windows said to have 30, then 12, then none left; the most said is what the next
        // window is taken to have.
        let mut quota = window(now, 30, 2)
            .updated(now, window(now, 12, 2))
            .updated(now, window(now, 0, 2));
        assert_eq!(quota.spent_until(now), Some(now + Duration::from_secs(2)));
        let over = now + Duration::from_secs(2);
        assert!(quota.past(over));
        assert_eq!(quota.spent_until(over), None);
        assert_eq!(quota.allows(over), 30);
        for _ in 0..30 {
            quota.started(over);
        }
        assert_eq!(quota.allows(over), 0);
        // A start given back (never sent) may go again; one started in the old window gives
        // nothing to the new one.
        quota.given_back(now);
        assert_eq!(quota.allows(over), 0);
        quota.given_back(over);
        assert_eq!(quota.allows(over), 1);
        // Nothing said a window had anything: one request, to hear of the next.
        assert_eq!(window(now, 0, 2).allows(over), 1);
    }

    #[test]
    fn answers_out_of_order_give_back_nothing_and_a_new_window_starts_over() {
        let now = Instant::now();
        let earlier = now - Duration::from_millis(30);
        // A late answer (more left, to a request sent before) gives back nothing, however
        // much more it says.
        let kept = window(now, 5, 2).updated(now, sent_at(earlier, now, 300, 2));
        assert_eq!(kept.allows(now), 5);
        // Fewer left: believed.
        let kept = window(now, 40, 2).updated(now, sent_at(earlier, now, 5, 2));
        assert_eq!(kept.allows(now), 5);
        // More left, to a request sent after: the window started again before the quota's
        // reset, rounded up, said; the new one holds, with its own reset.
        let soon = now + Duration::from_millis(700);
        let next = window(soon, 95, 1);
        let kept = window(now, 20, 1).updated(soon, next);
        assert_eq!(kept.allows(soon), 95);
        assert!(
            !kept.past(now + Duration::from_millis(1_200)),
            "the new window's reset, not the old one's"
        );
        // Once the window is over, an answer to a request sent before speaks of the old one.
        let over = now + Duration::from_secs(2);
        let kept = window(now, 20, 2).updated(over, sent_at(now, over, 0, 1));
        assert_eq!(kept.allows(over), 20);
        // One sent after it is of the new window.
        let kept = window(now, 20, 2).updated(over, window(over, 0, 1));
        assert_eq!(kept.allows(over), 0);
    }

    #[test]
    fn retry_afters_that_count_down_to_one_instant_are_a_window_that_ends_there() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let secs = Duration::from_secs;
        // A token bucket's constant "1", for a minute: never a window.
        let mut bucket = CountDown::default();
        for ms in (0..60_000).step_by(100) {
            assert_eq!(bucket.heard(at(ms), secs(1)), None, "at {ms} ms");
        }
        // A window ending at 60 s, counted down in whole seconds, rounded up: a window once
        // 1.5 s of 429s point at its end.
        let mut window = CountDown::default();
        let rest = |ms: u64, end: u64| secs((end - ms).div_ceil(1_000));
        assert_eq!(window.heard(at(50_200), rest(50_200, 60_000)), None);
        assert_eq!(window.heard(at(51_000), rest(51_000, 60_000)), None);
        let end = window
            .heard(at(51_800), rest(51_800, 60_000))
            .expect("a window");
        assert!(end >= at(60_000) && end <= at(61_000), "{:?}", end - start);
        // The next window's end, a minute on, counted down too; from then on a window is
        // told by a few 429s in a row, also after a window with no 429 at all.
        assert_eq!(window.heard(at(110_000), rest(110_000, 120_000)), None);
        assert!(window.heard(at(111_600), rest(111_600, 120_000)).is_some());
        window.accepted(at(125_000));
        assert_eq!(window.heard(at(175_300), rest(175_300, 180_000)), None);
        assert_eq!(window.heard(at(175_310), rest(175_310, 180_000)), None);
        let third = window.heard(at(175_320), rest(175_320, 180_000));
        assert!(third.is_some_and(|end| end >= at(180_000) && end <= at(181_000)));
        window.accepted(at(185_000));
        for ms in [290_100, 290_110] {
            assert_eq!(window.heard(at(ms), rest(ms, 300_000)), None);
        }
        let after_none = window.heard(at(290_120), rest(290_120, 300_000));
        assert!(after_none.is_some(), "a window with no 429 between");
        // A success to a request sent after a run of 429s began ends the run, though its
        // answer comes after a later 429: 429s among successes are strays, even three of them
        // pointing at the next end.
        window.accepted(at(305_000));
        assert_eq!(window.heard(at(355_000), rest(355_000, 360_000)), None);
        assert_eq!(window.heard(at(355_010), rest(355_010, 360_000)), None);
        window.accepted(at(355_005));
        assert_eq!(window.heard(at(355_020), rest(355_020, 360_000)), None);
        // A constant "1" that points at a window's end is no window.
        window.accepted(at(356_000));
        for ms in [358_800, 358_900, 359_000, 359_100] {
            assert_eq!(window.heard(at(ms), secs(1)), None, "at {ms} ms");
        }
    }

    #[test]
    fn a_success_in_between_shows_that_429s_were_no_window() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut stray = CountDown::default();
        // Two refusals told to wait for one instant, a success sent in between.
        assert_eq!(stray.heard(at(0), Duration::from_secs(40)), None);
        stray.accepted(at(700));
        assert_eq!(stray.heard(at(2_000), Duration::from_secs(38)), None);
        // A success to a request sent before the first refusal proves nothing.
        let mut window = CountDown::default();
        assert_eq!(window.heard(at(0), Duration::from_secs(40)), None);
        window.accepted(at(0) - Duration::from_millis(5));
        assert!(window.heard(at(2_000), Duration::from_secs(38)).is_some());
    }
}
