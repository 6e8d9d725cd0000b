//! How hard delivery pushes the destination: a pure controller fed the answers, asked how many
//! requests may start now. It owns three decisions, all destination-wide:
//!
//! - **Concurrency limit** (AIMD, as TCP's congestion window and Vector's adaptive
//!   concurrency): once per measurement interval (about one round trip), the limit grows by one
//!   if requests filled it, nothing pushed back and the mean round-trip time did not grow; it
//!   is halved when something pushed back (503, a timeout, a connection error, or 429s that
//!   are a share of the answers: see below); it shrinks by a tenth when round trips clearly
//!   slow down. Always between 1 and the configured maximum.
//! - **Request rate cap**: a concurrency limit alone cannot hold a rate limit on a fast link
//!   (at one request in flight a loopback endpoint already gets thousands a second). When 429s
//!   become a tenth of the recent answers (not a stray one, which only delays its own export),
//!   the rate is capped just under what the endpoint accepted in the last 100 ms. For 3 s after
//!   such a cut, each 100 ms in which the cap held requests back and no 429 came grows it 1%, up
//!   to the rate accepted at the cut, and 100 ms in which 429s were a twentieth of the answers
//!   ease it 3% (a cap just over the limit would otherwise stay there, its 429s under a tenth);
//!   after that it grows 5% each 100 ms while it holds requests back (the limit may have been
//!   lifted) until 429s cut it again. So a rate-limited endpoint settles near its limit with
//!   few 429s.
//! - **Down**: after [`DOWN_AFTER`] failures in a row (server errors, timeouts, connection and
//!   token errors) with no answer in between that showed the endpoint working, only one probe is
//!   in flight at a time, on the backoff schedule; the first answer that is not such a failure
//!   reopens at once.
//!
//! Per-export retry times are not decided here (see `retry::RetrySchedule`): a 429 delays its
//! own export, not the destination.

use std::time::Duration;

use tokio::time::Instant;

use super::retry::RetrySchedule;

/// Failures in a row after which the destination counts as down.
pub const DOWN_AFTER: u32 = 8;
/// The limit a fresh controller starts at (below the maximum, it adapts from there).
pub const INITIAL_LIMIT: usize = 8;
/// The rate cap never goes below this many requests a second.
pub const MIN_RATE: f64 = 1.0;
const RATE_WINDOW: Duration = Duration::from_millis(100);
/// The rate is capped only when at least this share of the recent answers (see
/// [`RefusalShare`]) were 429s, and at least [`CAP_MIN_REFUSED`] of them: a few stray 429s
/// are left to their own `Retry-After`, a rate limit shows as a share that grows.
const CAP_AT_SHARE: f64 = 0.1;
const CAP_MIN_REFUSED: usize = 20;
/// The share is over the answers of the last [`SHARE_OVER`], or the last [`SHARE_OF_AT_LEAST`]
/// answers when fewer came in that time. 4% of answers 429 at random reach a tenth of 200
/// rarely (20 is over four standard deviations above 8), and of the thousands a fast endpoint
/// answers in 100 ms practically never; a longer window would let a low limit (a few hundred
/// a second) be overrun for seconds before the share shows.
const SHARE_OVER: Duration = Duration::from_millis(100);
const SHARE_OF_AT_LEAST: usize = 200;
/// Bounds memory on an endpoint that answers more than a million requests a second.
const SHARE_OF_AT_MOST: usize = 100_000;
const RATE_BUCKETS: usize = 10;
const RATE_GROWTH_EVERY: Duration = Duration::from_millis(100);
/// Growth per step soon after a 429 (probing gently near the limit that was found), and
/// later (the limit may have been lifted).
const RATE_GROWTH_NEAR: f64 = 1.01;
const RATE_GROWTH_FAR: f64 = 1.05;
const RATE_NEAR_FOR: Duration = Duration::from_secs(3);
/// Near a cut, a step with 429s held below the cut's share (a cap just over the limit, say
/// from a first cut that a burst allowance inflated) eases the cap by this factor rather
/// than leaving it there; a step with any 429 does not grow it.
const NEAR_EASE: f64 = 0.97;
const NEAR_EASE_AT_SHARE: f64 = CAP_AT_SHARE / 2.0;
const NEAR_EASE_MIN_REFUSED: u32 = 2;
/// Round trips count as slower when their mean exceeds the past mean by this factor (plus a
/// little, so that sub-millisecond noise on a local link does not count).
const SLOWDOWN_FACTOR: f64 = 2.0;
const RTT_SLACK: Duration = Duration::from_micros(500);
/// The weight of the newest interval in the mean round-trip time.
const RTT_EWMA: f64 = 0.4;
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// What one answer says about the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// 2xx.
    Healthy,
    /// An answer that shows the endpoint works but is not about load: a 4xx that rejects the
    /// export (401/403 are [`Signal::Failed`]: a destination that refuses every token is down).
    Neutral,
    /// 429.
    RateLimited,
    /// 503, a timeout or a connection error: the endpoint is overloaded or unreachable.
    Overloaded,
    /// Another retryable failure (5xx, 408, 425, a failed token request).
    Failed,
}

impl Signal {
    fn is_failure(self) -> bool {
        matches!(self, Signal::Overloaded | Signal::Failed)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ControllerConfig {
    pub max_concurrency: usize,
    /// The limit stays at `max_concurrency` (the deprecated `delivery.concurrency`).
    pub fixed: bool,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub jitter: bool,
}

/// Which of the recent answers were 429s (see [`SHARE_OVER`]).
#[derive(Debug, Default)]
struct RefusalShare {
    /// When each answer came and whether it was a 429, oldest first.
    answers: std::collections::VecDeque<(Instant, bool)>,
    refused: usize,
}

impl RefusalShare {
    fn record(&mut self, now: Instant, refused: bool) {
        self.answers.push_back((now, refused));
        self.refused += usize::from(refused);
        while let Some(&(at, was_refused)) = self.answers.front() {
            let old = self.answers.len() > SHARE_OF_AT_LEAST
                && now.saturating_duration_since(at) > SHARE_OVER;
            if !old && self.answers.len() <= SHARE_OF_AT_MOST {
                break;
            }
            self.answers.pop_front();
            self.refused -= usize::from(was_refused);
        }
    }

    fn is_rate_limit(&self) -> bool {
        self.refused >= CAP_MIN_REFUSED
            && self.refused as f64 >= CAP_AT_SHARE * self.answers.len() as f64
    }

    fn clear(&mut self) {
        self.answers.clear();
        self.refused = 0;
    }
}

/// Successes counted in buckets over the last [`RATE_WINDOW`].
#[derive(Debug)]
struct RateMeter {
    buckets: [u32; RATE_BUCKETS],
    /// The start of the newest bucket.
    newest: Instant,
}

impl RateMeter {
    fn new(now: Instant) -> RateMeter {
        RateMeter {
            buckets: [0; RATE_BUCKETS],
            newest: now,
        }
    }

    fn bucket_len() -> Duration {
        RATE_WINDOW / RATE_BUCKETS as u32
    }

    fn advance(&mut self, now: Instant) {
        let step = Self::bucket_len();
        let mut shifts = 0;
        while now >= self.newest + step && shifts < RATE_BUCKETS {
            self.buckets.rotate_left(1);
            self.buckets[RATE_BUCKETS - 1] = 0;
            self.newest += step;
            shifts += 1;
        }
        if now >= self.newest + step {
            // Idle for longer than the window: start afresh.
            self.newest = now;
        }
    }

    fn record(&mut self, now: Instant) {
        self.advance(now);
        self.buckets[RATE_BUCKETS - 1] += 1;
    }

    /// Successes a second over the window.
    fn rate(&mut self, now: Instant) -> f64 {
        self.advance(now);
        let count: u32 = self.buckets.iter().sum();
        f64::from(count) / RATE_WINDOW.as_secs_f64()
    }
}

#[derive(Debug)]
struct RateCap {
    per_second: f64,
    tokens: f64,
    refilled: Instant,
    /// The last cut or growth step.
    changed: Instant,
    cut_at: Instant,
    /// What the endpoint accepted a second when the cap was last cut: near that cut, the cap
    /// grows back up to it and no further (past it lie the 429s that made the cut).
    accepted_at_cut: f64,
    /// Whether the cap held requests back since `changed`.
    binding: bool,
    /// Answers since `changed` to requests sent since the last cut, and how many were 429s.
    answered: u32,
    refused: u32,
}

impl RateCap {
    fn burst(&self) -> f64 {
        // 20 ms worth of requests, at least one: smooth, yet a coarse timer can keep up.
        (self.per_second / 50.0).max(1.0)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst());
        self.refilled = now;
    }
}

/// The destination-wide state; see the module docs.
#[derive(Debug)]
pub struct Controller {
    config: ControllerConfig,
    limit: usize,
    in_flight: usize,
    // Measurement interval.
    interval_end: Instant,
    rtt_sum: f64,
    rtt_count: u32,
    reached_limit: bool,
    back_pressure: bool,
    past_rtt: Option<f64>,
    // Rate.
    accepted: RateMeter,
    recent_429: RefusalShare,
    rate_cap: Option<RateCap>,
    // Down.
    failures_in_a_row: u32,
    down_since: Option<Instant>,
    probe_in_flight: bool,
    probe_at: Instant,
    backoff: RetrySchedule,
}

impl Controller {
    pub fn new(config: ControllerConfig, now: Instant) -> Controller {
        let backoff = RetrySchedule::new(config.initial_backoff, config.max_backoff, config.jitter);
        let limit = if config.fixed {
            config.max_concurrency
        } else {
            INITIAL_LIMIT.min(config.max_concurrency)
        };
        Controller {
            config,
            limit,
            in_flight: 0,
            interval_end: now,
            rtt_sum: 0.0,
            rtt_count: 0,
            reached_limit: false,
            back_pressure: false,
            past_rtt: None,
            accepted: RateMeter::new(now),
            recent_429: RefusalShare::default(),
            rate_cap: None,
            failures_in_a_row: 0,
            down_since: None,
            probe_in_flight: false,
            probe_at: now,
            backoff,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn is_down(&self) -> bool {
        self.down_since.is_some()
    }

    /// The request rate cap, when a 429 set one.
    pub fn rate_cap(&self) -> Option<f64> {
        self.rate_cap.as_ref().map(|c| c.per_second)
    }

    /// How many requests may start now, when `wanted` could.
    pub fn permits(&mut self, now: Instant, wanted: usize) -> usize {
        if wanted == 0 {
            return 0;
        }
        if self.down_since.is_some() {
            return usize::from(!self.probe_in_flight && now >= self.probe_at);
        }
        let by_limit = self.limit.saturating_sub(self.in_flight);
        match &mut self.rate_cap {
            None => by_limit.min(wanted),
            Some(cap) => {
                cap.refill(now);
                let by_rate = cap.tokens.floor() as usize;
                if by_rate < wanted.min(by_limit) {
                    cap.binding = true;
                }
                by_limit.min(by_rate).min(wanted)
            }
        }
    }

    /// When to ask again, if requests that `wanted` could start are held back by the rate cap
    /// or the probe schedule. With none wanted, none is held back: a probe time already past
    /// would otherwise wake the loop at once, again and again, until an export is ready.
    pub fn next_permit_at(&self, now: Instant, wanted: usize) -> Option<Instant> {
        if wanted == 0 {
            return None;
        }
        if self.down_since.is_some() {
            return (!self.probe_in_flight).then_some(self.probe_at.max(now));
        }
        let cap = self.rate_cap.as_ref()?;
        if cap.tokens >= 1.0 || self.in_flight >= self.limit {
            return None;
        }
        let wait = (1.0 - cap.tokens) / cap.per_second;
        Some(now + Duration::from_secs_f64(wait).max(Duration::from_millis(1)))
    }

    /// A request started.
    pub fn started(&mut self, _now: Instant) {
        self.in_flight += 1;
        if self.in_flight >= self.limit {
            self.reached_limit = true;
        }
        if let Some(cap) = &mut self.rate_cap {
            cap.tokens -= 1.0;
        }
        if self.down_since.is_some() {
            self.probe_in_flight = true;
        }
    }

    /// A request started but never sent (the agent began to stop while it waited for its
    /// token): it says nothing about the endpoint, and a probe it was may go again.
    pub fn withdrawn(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.down_since.is_some() {
            self.probe_in_flight = false;
        }
    }

    /// A request started and sent at `sent_at` was answered (or failed) now.
    #[cfg(test)]
    pub fn answered(&mut self, now: Instant, sent_at: Instant, signal: Signal) {
        self.answered_after(now, sent_at, sent_at, signal);
    }

    /// A request started at `started_at` (its permit taken) and sent at `sent_at` (after any
    /// wait for a token) was answered now: the round trip counts from `sent_at`, while whether
    /// it was started before the destination went down or the rate was cut counts from
    /// `started_at`, since a request waiting for a token then was started under the old state.
    pub fn answered_after(
        &mut self,
        now: Instant,
        started_at: Instant,
        sent_at: Instant,
        signal: Signal,
    ) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let rtt = now.saturating_duration_since(sent_at);
        if signal == Signal::Healthy {
            self.rtt_sum += rtt.as_secs_f64();
            self.rtt_count += 1;
            self.accepted.record(now);
        }
        // Answers to requests sent before the last cut say nothing about the rate it set.
        let sent_since_cut = self
            .rate_cap
            .as_ref()
            .is_none_or(|cap| started_at >= cap.cut_at);
        if sent_since_cut {
            self.recent_429.record(now, signal == Signal::RateLimited);
            if let Some(cap) = &mut self.rate_cap {
                cap.answered += 1;
                cap.refused += u32::from(signal == Signal::RateLimited);
            }
        }
        // A 429 pushes back only as part of a rate limit (a share of the answers): a stray one
        // delays its own export, and halving the limit for each would keep it near 1.
        let rate_limited = signal == Signal::RateLimited && self.recent_429.is_rate_limit();
        if rate_limited {
            self.back_pressure = true;
            self.cut_rate(now);
        }
        if signal == Signal::Overloaded {
            self.back_pressure = true;
        }
        self.track_down(now, started_at, signal);
        self.grow_rate(now);
        if now >= self.interval_end {
            self.adjust_limit(now);
        }
    }

    fn track_down(&mut self, now: Instant, started_at: Instant, signal: Signal) {
        if !signal.is_failure() {
            self.failures_in_a_row = 0;
            if self.down_since.take().is_some() {
                self.probe_in_flight = false;
                self.backoff.reset();
            }
            return;
        }
        self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
        match self.down_since {
            None if self.failures_in_a_row >= DOWN_AFTER => {
                self.down_since = Some(now);
                self.probe_in_flight = false;
                self.probe_at = now + self.next_backoff();
            }
            // The probe failed: the next one waits longer. Answers to requests sent before the
            // destination went down change nothing.
            Some(since) if started_at >= since => {
                self.probe_in_flight = false;
                self.probe_at = now + self.next_backoff();
            }
            _ => {}
        }
    }

    fn next_backoff(&mut self) -> Duration {
        self.backoff.next_delay(None)
    }

    fn cut_rate(&mut self, now: Instant) {
        self.recent_429.clear();
        let accepted = self.accepted.rate(now);
        match &mut self.rate_cap {
            // At most one cut a window: the 429s of one burst are one signal.
            Some(cap) if now < cap.cut_at + RATE_WINDOW => {}
            Some(cap) => {
                cap.refill(now);
                cap.per_second = (accepted * 0.9).min(cap.per_second * 0.9).max(MIN_RATE);
                cap.tokens = cap.tokens.min(cap.burst());
                cap.changed = now;
                cap.cut_at = now;
                cap.accepted_at_cut = accepted.max(MIN_RATE);
                cap.binding = false;
                cap.answered = 0;
                cap.refused = 0;
            }
            None => {
                let per_second = (accepted * 0.9).max(MIN_RATE);
                self.rate_cap = Some(RateCap {
                    per_second,
                    tokens: 0.0,
                    refilled: now,
                    changed: now,
                    cut_at: now,
                    accepted_at_cut: accepted.max(MIN_RATE),
                    binding: false,
                    answered: 0,
                    refused: 0,
                });
            }
        }
    }

    fn grow_rate(&mut self, now: Instant) {
        if let Some(cap) = &mut self.rate_cap {
            if now >= cap.changed + RATE_GROWTH_EVERY {
                let near = now < cap.cut_at + RATE_NEAR_FOR;
                let over = cap.refused >= NEAR_EASE_MIN_REFUSED
                    && f64::from(cap.refused) >= NEAR_EASE_AT_SHARE * f64::from(cap.answered);
                if near && over {
                    cap.per_second = (cap.per_second * NEAR_EASE).max(MIN_RATE);
                } else if near && cap.binding && cap.refused == 0 {
                    cap.per_second = (cap.per_second * RATE_GROWTH_NEAR)
                        .min(cap.accepted_at_cut.max(cap.per_second));
                } else if !near && cap.binding {
                    cap.per_second *= RATE_GROWTH_FAR;
                }
                cap.changed = now;
                cap.binding = false;
                cap.answered = 0;
                cap.refused = 0;
            }
        }
    }

    fn adjust_limit(&mut self, now: Instant) {
        let current = (self.rtt_count > 0).then(|| self.rtt_sum / f64::from(self.rtt_count));
        if !self.config.fixed {
            let slack = RTT_SLACK.as_secs_f64();
            let slower = |factor: f64| match (current, self.past_rtt) {
                (Some(current), Some(past)) => current > past * factor + slack,
                _ => false,
            };
            if self.back_pressure {
                self.limit = (self.limit / 2).max(1);
            } else if slower(SLOWDOWN_FACTOR) {
                self.limit = (self.limit - self.limit / 10).max(1);
            } else if self.reached_limit && current.is_some() && !slower(1.0) {
                self.limit = (self.limit + 1).min(self.config.max_concurrency);
            }
        }
        if let Some(current) = current {
            self.past_rtt = Some(match self.past_rtt {
                None => current,
                Some(past) => past * (1.0 - RTT_EWMA) + current * RTT_EWMA,
            });
        }
        let interval = self
            .past_rtt
            .map_or(MIN_INTERVAL, Duration::from_secs_f64)
            .max(MIN_INTERVAL);
        self.interval_end = now + interval;
        self.rtt_sum = 0.0;
        self.rtt_count = 0;
        self.reached_limit = self.in_flight >= self.limit;
        self.back_pressure = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max: usize) -> ControllerConfig {
        ControllerConfig {
            max_concurrency: max,
            fixed: false,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(800),
            jitter: false,
        }
    }

    /// Runs `rounds` intervals in which the limit is filled and every request is answered with
    /// `signal` after `rtt`; returns the limit after each round.
    fn drive(
        c: &mut Controller,
        now: &mut Instant,
        rounds: usize,
        rtt: Duration,
        signal: Signal,
    ) -> Vec<usize> {
        let mut limits = Vec::new();
        for _ in 0..rounds {
            let n = c.permits(*now, usize::MAX);
            let sent = *now;
            for _ in 0..n {
                c.started(sent);
            }
            *now += rtt;
            for _ in 0..n {
                c.answered(*now, sent, signal);
            }
            limits.push(c.limit());
        }
        limits
    }

    #[test]
    fn healthy_steady_answers_raise_the_limit_by_one_per_interval_up_to_the_maximum() {
        let mut now = Instant::now();
        let mut c = Controller::new(config(12), now);
        let limits = drive(
            &mut c,
            &mut now,
            8,
            Duration::from_millis(20),
            Signal::Healthy,
        );
        assert_eq!(limits, [9, 10, 11, 12, 12, 12, 12, 12]);
    }

    #[test]
    fn back_pressure_halves_the_limit_down_to_one() {
        // One answer in each round is a 503 (or a timeout), the rest are fine.
        let mut now = Instant::now();
        let mut c = Controller::new(config(64), now);
        let mut limits = Vec::new();
        for _ in 0..4 {
            let n = c.permits(now, usize::MAX);
            let sent = now;
            for _ in 0..n {
                c.started(sent);
            }
            now += Duration::from_millis(5);
            c.answered(now, sent, Signal::Overloaded);
            for _ in 1..n {
                c.answered(now, sent, Signal::Healthy);
            }
            limits.push(c.limit());
        }
        assert_eq!(limits, [4, 2, 1, 1]);
        assert!(!c.is_down());
        assert_eq!(c.rate_cap(), None, "503s and timeouts cap no rate");

        // A few 429s neither halve the limit nor cap the rate; 429s that go on do both.
        let mut c = Controller::new(config(64), now);
        let limits = drive(
            &mut c,
            &mut now,
            3,
            Duration::from_millis(5),
            Signal::RateLimited,
        );
        // The 20th 429 comes in the third round, after that round's adjustment.
        assert_eq!(limits, [8, 8, 8]);
        assert_eq!(c.rate_cap(), Some(MIN_RATE), "nothing was accepted");
        now += Duration::from_millis(10);
        c.started(now);
        c.answered(now + Duration::from_millis(5), now, Signal::Healthy);
        assert_eq!(c.limit(), 4, "halved at the next adjustment");
    }

    #[test]
    fn answers_that_are_not_about_load_leave_the_limit_where_it_is_unless_it_was_reached() {
        let mut now = Instant::now();
        let mut c = Controller::new(config(64), now);
        // Neutral answers (4xx rejections) carry no round trip: the limit neither grows nor falls.
        let limits = drive(
            &mut c,
            &mut now,
            3,
            Duration::from_millis(5),
            Signal::Neutral,
        );
        assert_eq!(limits, [8, 8, 8]);
    }

    #[test]
    fn a_clear_slowdown_shrinks_the_limit_and_a_steady_slow_endpoint_grows_it_again() {
        let mut now = Instant::now();
        let mut c = Controller::new(config(64), now);
        drive(
            &mut c,
            &mut now,
            4,
            Duration::from_millis(10),
            Signal::Healthy,
        );
        assert_eq!(c.limit(), 12);
        // Three times slower: shrink by a tenth.
        // (The first interval still holds answers of the last fast round.)
        let limits = drive(
            &mut c,
            &mut now,
            2,
            Duration::from_millis(30),
            Signal::Healthy,
        );
        assert_eq!(limits, [12, 11]);
        // Once the mean has caught up with the new round trip, it grows again.
        let limits = drive(
            &mut c,
            &mut now,
            8,
            Duration::from_millis(30),
            Signal::Healthy,
        );
        assert!(limits.last().unwrap() > &11, "{limits:?}");
    }

    #[test]
    fn a_slow_endpoint_gets_more_requests_in_flight() {
        // 20 ms answers: the limit climbs to the maximum within a few seconds.
        let mut now = Instant::now();
        let mut c = Controller::new(config(64), now);
        drive(
            &mut c,
            &mut now,
            100,
            Duration::from_millis(20),
            Signal::Healthy,
        );
        assert_eq!(c.limit(), 64);
    }

    #[test]
    fn a_fixed_limit_never_moves() {
        let mut now = Instant::now();
        let mut c = Controller::new(
            ControllerConfig {
                fixed: true,
                ..config(5)
            },
            now,
        );
        assert_eq!(
            drive(
                &mut c,
                &mut now,
                2,
                Duration::from_millis(5),
                Signal::Overloaded
            ),
            [5, 5]
        );
        assert_eq!(
            drive(
                &mut c,
                &mut now,
                2,
                Duration::from_millis(5),
                Signal::Healthy
            ),
            [5, 5]
        );
    }

    #[test]
    fn permits_count_what_is_in_flight() {
        let now = Instant::now();
        let mut c = Controller::new(config(64), now);
        assert_eq!(c.permits(now, 3), 3);
        assert_eq!(c.permits(now, 100), 8);
        for _ in 0..6 {
            c.started(now);
        }
        assert_eq!(c.permits(now, 100), 2);
        assert_eq!(c.permits(now, 0), 0);
    }

    #[test]
    fn down_after_failures_in_a_row_one_probe_on_the_backoff_schedule_and_reopens_at_once() {
        let start = Instant::now();
        let mut c = Controller::new(config(64), start);
        for i in 0..DOWN_AFTER {
            assert!(!c.is_down(), "down after {i} failures");
            c.started(start);
            c.answered(start, start, Signal::Overloaded);
        }
        assert!(c.is_down());
        // Backoff without jitter: 100 ms, then 200, 400, 800, 800.
        let mut now = start;
        for delay in [100, 200, 400, 800, 800] {
            assert_eq!(c.permits(now, 10), 0);
            assert_eq!(
                c.next_permit_at(now, 10),
                Some(now + Duration::from_millis(delay))
            );
            now += Duration::from_millis(delay);
            assert_eq!(c.next_permit_at(now, 0), None, "nothing to probe with");
            assert_eq!(c.permits(now, 10), 1, "one probe");
            c.started(now);
            assert_eq!(c.permits(now, 10), 0, "only one probe in flight");
            assert_eq!(c.next_permit_at(now, 10), None);
            c.answered(now, now, Signal::Failed);
        }
        // The probe succeeds: open again at once, with the limit as the failures left it.
        now += Duration::from_millis(800);
        c.started(now);
        c.answered(now, now, Signal::Healthy);
        assert!(!c.is_down());
        assert_eq!(c.permits(now, 100), c.limit());
    }

    #[test]
    fn with_jitter_probes_never_wait_past_the_maximum_backoff() {
        let start = Instant::now();
        let mut c = Controller::new(
            ControllerConfig {
                jitter: true,
                ..config(64)
            },
            start,
        );
        for _ in 0..DOWN_AFTER {
            c.started(start);
            c.answered(start, start, Signal::Overloaded);
        }
        let mut now = start;
        for probe in 0..200 {
            let at = c.next_permit_at(now, 10).unwrap();
            let wait = at - now;
            assert!(
                wait <= Duration::from_millis(800),
                "probe {probe} waited {wait:?}"
            );
            now = at;
            assert_eq!(c.permits(now, 10), 1);
            c.started(now);
            c.answered(now, now, Signal::Failed);
        }
    }

    #[test]
    fn answers_to_requests_sent_before_going_down_do_not_push_the_probe_back() {
        let start = Instant::now();
        let mut c = Controller::new(config(64), start);
        for _ in 0..DOWN_AFTER + 4 {
            c.started(start);
        }
        let later = start + Duration::from_millis(1);
        for _ in 0..DOWN_AFTER {
            c.answered(later, start, Signal::Overloaded);
        }
        let probe_at = c.next_permit_at(later, 10).unwrap();
        for _ in 0..3 {
            c.answered(later + Duration::from_millis(50), start, Signal::Overloaded);
        }
        assert_eq!(c.next_permit_at(later, 10), Some(probe_at));
        // Nor one started before but sent after, once it had waited for a token.
        let sent = later + Duration::from_millis(5);
        c.answered_after(sent + Duration::from_millis(1), start, sent, Signal::Failed);
        assert_eq!(c.next_permit_at(later, 10), Some(probe_at));
    }

    #[test]
    fn failures_with_a_success_between_them_are_not_down() {
        let now = Instant::now();
        let mut c = Controller::new(config(64), now);
        for _ in 0..3 {
            for _ in 0..DOWN_AFTER - 1 {
                c.started(now);
                c.answered(now, now, Signal::Failed);
            }
            c.started(now);
            c.answered(now, now, Signal::Healthy);
        }
        assert!(!c.is_down());
        // 429s show the endpoint is there: they never make it down.
        for _ in 0..DOWN_AFTER * 2 {
            c.started(now);
            c.answered(now, now, Signal::RateLimited);
        }
        assert!(!c.is_down());
    }

    /// A token bucket endpoint: `limit` requests a second, `burst` at once; answers take `rtt`.
    /// Returns (accepted per second, share refused) over `seconds`, driving the controller as
    /// the delivery loop does.
    fn against_token_bucket(limit: f64, burst: f64, seconds: u64) -> (f64, f64) {
        let rtt = Duration::from_micros(300);
        let start = Instant::now();
        let mut c = Controller::new(config(64), start);
        let mut now = start;
        let mut tokens = burst;
        let (mut accepted, mut refused) = (0u64, 0u64);
        let step = Duration::from_micros(100);
        let mut in_flight: Vec<Instant> = Vec::new();
        while now < start + Duration::from_secs(seconds) {
            tokens = (tokens + limit * step.as_secs_f64()).min(burst);
            // Answers due now.
            let (due, rest): (Vec<Instant>, Vec<Instant>) =
                in_flight.into_iter().partition(|&sent| sent + rtt <= now);
            in_flight = rest;
            for sent in due {
                if tokens >= 1.0 {
                    tokens -= 1.0;
                    accepted += 1;
                    c.answered(now, sent, Signal::Healthy);
                } else {
                    refused += 1;
                    c.answered(now, sent, Signal::RateLimited);
                }
            }
            for _ in 0..c.permits(now, usize::MAX) {
                c.started(now);
                in_flight.push(now);
            }
            now += step;
        }
        let total = (accepted + refused) as f64;
        (accepted as f64 / seconds as f64, refused as f64 / total)
    }

    #[test]
    fn stray_429s_cost_little_of_the_rate() {
        // An endpoint with no rate limit that answers 4% of requests 429 at random (clusters
        // included) still gets nearly the rate of one that answers every request well; several
        // seeds, 2 s each.
        for seed in 0..3u64 {
            let healthy = against_random_429s(0.0, seed);
            let flaky = against_random_429s(0.04, seed);
            assert!(
                flaky.0 >= 0.9 * healthy.0,
                "seed {seed}: {:.0}/s with stray 429s vs {:.0}/s without (cuts: {})",
                flaky.0,
                healthy.0,
                flaky.1
            );
        }
    }

    /// Accepted requests a second against an endpoint without a limit that answers `share` of
    /// requests 429 at random after 300 µs, and how often the rate cap was cut.
    fn against_random_429s(share: f64, seed: u64) -> (f64, u32) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let rtt = Duration::from_micros(300);
        let step = Duration::from_micros(100);
        let seconds = 2;
        let start = Instant::now();
        let mut c = Controller::new(config(64), start);
        let (mut now, mut accepted, mut cuts, mut last_cap) = (start, 0u64, 0u32, None);
        let mut in_flight: Vec<Instant> = Vec::new();
        while now < start + Duration::from_secs(seconds) {
            let (due, rest): (Vec<Instant>, Vec<Instant>) =
                in_flight.into_iter().partition(|&sent| sent + rtt <= now);
            in_flight = rest;
            for sent in due {
                if rng.gen_bool(share) {
                    c.answered(now, sent, Signal::RateLimited);
                } else {
                    accepted += 1;
                    c.answered(now, sent, Signal::Healthy);
                }
                let cap = c.rate_cap();
                if cap.is_some_and(|cap| last_cap.is_none_or(|last| cap < last)) {
                    cuts += 1;
                }
                last_cap = cap;
            }
            for _ in 0..c.permits(now, usize::MAX) {
                c.started(now);
                in_flight.push(now);
            }
            now += step;
        }
        (accepted as f64 / seconds as f64, cuts)
    }

    #[test]
    fn a_rate_limited_endpoint_gets_close_to_its_limit_with_few_refusals() {
        // A low limit over a short run (as the socket test has it), then longer runs.
        for (limit, seconds) in [(300.0, 3), (300.0, 20), (5_000.0, 20), (15_000.0, 20)] {
            let (rate, refused) = against_token_bucket(limit, limit / 10.0, seconds);
            assert!(
                rate >= 0.9 * limit,
                "limit {limit}, {seconds} s: {rate:.0}/s"
            );
            assert!(
                refused <= 0.05,
                "limit {limit}, {seconds} s: {:.1}% refused",
                refused * 100.0
            );
        }
    }
}
