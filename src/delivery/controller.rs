//! How hard delivery pushes the destination: a pure controller fed the answers, asked how many
//! requests may start now. It owns four decisions, all destination-wide:
//!
//! - **Concurrency limit** (AIMD, as TCP's congestion window and Vector's adaptive
//!   concurrency): once per measurement interval (about one round trip), the limit grows by one
//!   if requests filled it, nothing pushed back, the round trip ([`typical_round_trip`]) did
//!   not grow and it is within [`QUEUEING_FACTOR`] of the *base* round trip (the endpoint's own
//!   time, without our requests queued in it: see [`Controller::track_base`]); it shrinks by a
//!   tenth when round trips clearly slow down. It is halved when something pushes back: at
//!   once for a 503, a timeout or a connection error, at most once for the requests started
//!   before the cut, as TCP cuts its window once a round trip; at the interval's end for 429s
//!   that are a share of the answers (see below), which the rate cap answers first. Overloads
//!   that come at the same share at any limit are strays and cut nothing unless clearly more
//!   of them come ([`OverloadShares`]). Always between 1 and the configured maximum.
//! - **Request rate cap**: a concurrency limit alone cannot hold a rate limit on a fast link
//!   (at one request in flight a loopback endpoint already gets thousands a second). When 429s
//!   become a tenth of the recent answers (not a stray one, which only delays its own export),
//!   the rate is capped under what the endpoint accepted. From then on the cap is judged in
//!   steps of at least 100 ms and 20 answers, by the 429s of the step and of the last 100
//!   answers: at a low limit 100 ms holds one answer or none, so time alone says nothing.
//!   429s clearly over the share expected as strays plus a twentieth cut the cap to just under
//!   the rate accepted, which becomes the *ceiling*, where the limit seems to lie (when the
//!   answers judged were all refused, or nothing was accepted of late, the cut halves the cap
//!   and leaves the ceiling be, but while the 429s say to retry within a second, not under
//!   what the last second took: a window of a second refuses all its end, and starts again).
//!   429s not clearly over the strays plus a fiftieth grow it, 0.5%
//!   a step in which it held requests back and half as much again for each such step in a
//!   row, up to 5%. 429s in between ease it by their share less the strays', at
//!   least 3%. After a cut or an ease the cap is held a while; 429s that go on at caps well
//!   apart are strays ([`StrayShare`]). Under 0.8 of the ceiling (climbing back after a burst
//!   of 429s) or over twice it (a lifted limit), steps are judged by time: the cap grows 5%
//!   each 100 ms and only clearer evidence cuts it. So a rate-limited endpoint settles at its
//!   limit with few 429s, from a few requests a second up.
//! - **Advertised quota**: an answer that says how many requests the endpoint's window has
//!   left, and when it starts again (`quota`), bounds the requests started until then; so do
//!   429s whose `Retry-After`s count down to one instant (a window that does not advertise
//!   itself, spent until then).
//! - **Down**: after [`DOWN_AFTER`] failures in a row (server errors, timeouts, connection and
//!   token errors) of requests started since an answer last showed the endpoint working, or
//!   of any once three quarters of the answers of the last request timeout were failures
//!   ([`DOWN_AT_SHARE`]), only one probe is in flight at a time, on the backoff schedule; the
//!   first answer that is not such a failure reopens at once.
//!
//! Per-export retry times are not decided here (see `retry::RetrySchedule`): a 429 delays its
//! own export, not the destination, unless it counts down with others to a window's end.

use std::time::Duration;

use tokio::time::Instant;

use super::quota::{Advertised, CountDown, Quota};
use super::retry::RetrySchedule;

/// Failures in a row after which the destination counts as down (see `failures_in_a_row`).
pub const DOWN_AFTER: u32 = 8;
/// The share of the answers of the last request timeout that were failures from which failures
/// in a row take the destination down whenever their requests were started.
pub const DOWN_AT_SHARE: f64 = 0.75;
/// The limit a fresh controller starts at (below the maximum, it adapts from there).
pub const INITIAL_LIMIT: usize = 8;
/// The rate cap never goes below this many requests a second.
pub const MIN_RATE: f64 = 1.0;
/// The rate the endpoint accepts is measured over its successes of the last [`RATE_WINDOW`]
/// (or two round trips, when longer: see [`AcceptedRate`]), or its last [`RATE_OF_AT_LEAST`]
/// when fewer came in that time (none older than [`RATE_LOOKBACK`]): 100 ms of a low limit
/// holds one success or none.
const RATE_WINDOW: Duration = Duration::from_millis(100);
const RATE_OF_AT_LEAST: usize = 20;
const RATE_LOOKBACK: Duration = Duration::from_secs(20);
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
/// Once capped, the rate is judged in steps of at least [`STEP_AT_LEAST`] and
/// [`STEP_ANSWERS`] answers; a step whose 429s neither clear nor condemn the cap goes on up to
/// [`STEP_ANSWERS_AT_MOST`]. Growth is judged over the last [`RECENT_ANSWERS`] answers: 20 of
/// them often hold no 429 when a tenth of all are refused.
const STEP_AT_LEAST: Duration = Duration::from_millis(100);
const STEP_ANSWERS: u32 = 20;
const STEP_ANSWERS_AT_MOST: u32 = 100;
const RECENT_ANSWERS: u32 = 100;
/// Under [`FAST_BELOW`] of the ceiling, or over [`FAST_ABOVE`] times it, a step is judged by
/// time alone, the cap grows [`FAST_GROWTH`] each [`STEP_AT_LEAST`] and only clearer evidence
/// cuts it: there it climbs back after a burst of 429s, or follows a limit that was lifted
/// (a limit kept refuses long before the cap doubles it, unless it allows a burst of many
/// seconds' worth), where 20 answers at a cap of a few a second would take seconds.
const FAST_BELOW: f64 = 0.8;
const FAST_ABOVE: f64 = 2.0;
const FAST_GROWTH: f64 = 1.05;
/// 429s clearly (by [`CUT_DEVIATIONS`] standard deviations, [`FAST_CUT_DEVIATIONS`] where
/// steps are judged by time) over the strays plus this share of the answers, and at least
/// [`CUT_MIN_REFUSED`], cut the cap to [`CUT_TO`] of the accepted rate.
const CUT_EXCESS: f64 = 0.05;
const CUT_DEVIATIONS: f64 = 2.0;
const FAST_CUT_DEVIATIONS: f64 = 3.0;
const CUT_MIN_REFUSED: u32 = 3;
const CUT_TO: f64 = 0.95;
/// While the latest 429 said to retry within this, a cut on answers all refused halves the cap
/// no lower than [`CUT_TO`] of the successes of the last [`LAST_SECOND`]: a fixed window of
/// a second (the usual "N requests a second") takes its N at once and refuses the rest of the
/// second, so halving at each such end (the controller's simulation, minutes 2 to 5: 200 a
/// second got 0.69–0.76 of it) throws away what the next second takes. An endpoint that
/// begins to refuse everything is halved down again once that second's successes age out.
const SHORT_RETRY_AFTER: Duration = Duration::from_secs(1);
const LAST_SECOND: Duration = Duration::from_secs(1);
/// 429s not clearly over the strays plus this share of the answers (or fewer than two) let the
/// cap grow [`NEAR_GROWTH`], times [`ACCELERATION`] for each such step in a row before, up to
/// [`FAST_GROWTH`]. Between this and a cut the cap eases by the share the strays do not
/// explain, at least to [`EASE`] of itself.
const GROW_EXCESS: f64 = 0.02;
const GROW_DEVIATIONS: f64 = 2.0;
const NEAR_GROWTH: f64 = 0.005;
const ACCELERATION: f64 = 1.5;
const EASE: f64 = 0.97;
/// After a cut or an ease the cap does not grow for [`HOLD_FOR_ANSWERS`] answers, or
/// [`HOLD_AT_MOST`]; the share of 429s in that while is kept (see [`StrayShare`]).
const HOLD_FOR_ANSWERS: u32 = 200;
const HOLD_AT_MOST: Duration = Duration::from_secs(2);
const STRAY_WINDOWS: usize = 5;
const STRAY_CAPS_APART: f64 = 0.9;
const STRAY_SHARE_AT_MOST: f64 = 0.25;
/// Overloads are judged strays from answers bucketed by the limit they were sent under (see
/// [`OverloadShares`]).
const LIMIT_BUCKETS: usize = 16;
const BUCKET_ANSWERS_AT_LEAST: u32 = 100;
const BUCKET_ANSWERS_AT_MOST: u32 = 2_000;
const STRAYS_SEEN_AT_LEAST: u32 = 3;
/// The chi-squared distribution's 99th percentile for 1 to 15 degrees of freedom: buckets
/// whose shares are farther apart than one share explains once in a hundred disagree.
const CHI_SQUARED_1_PERCENT: [f64; LIMIT_BUCKETS - 1] = [
    6.63, 9.21, 11.34, 13.28, 15.09, 16.81, 18.48, 20.09, 21.67, 23.21, 24.72, 26.22, 27.69, 29.14,
    30.58,
];
/// Overloads over this share of the answers are no strays: an endpoint failing so many is in
/// trouble, not flaky (20% at random were pushed to the maximum).
const OVERLOAD_STRAYS_AT_MOST: f64 = 0.15;
/// A bucket no answer came in for this long is left out: an endpoint that begins failing at
/// random would otherwise find the limits it no longer visits holding that it did not.
const BUCKET_STALE_AFTER: Duration = Duration::from_secs(60);
/// Overloads in a row that strays explain less often than this are no strays: an endpoint
/// refusing what is over its slots at once refuses every request started into the slots its
/// refusals free, and eight in a row count as down.
const STRAYS_IN_A_ROW_CHANCE: f64 = 1e-5;
/// The limits of the last so many changes are kept, to bucket an answer by the limit its
/// request was started under.
const LIMITS_KEPT: usize = 4_096;
/// Round trips count as slower when their mean exceeds the past mean by this factor (plus a
/// little, so that sub-millisecond noise on a local link does not count).
const SLOWDOWN_FACTOR: f64 = 2.0;
const RTT_SLACK: Duration = Duration::from_micros(500);
/// The weight of the newest interval in the smoothed round trip.
const RTT_EWMA: f64 = 0.4;
const MIN_INTERVAL: Duration = Duration::from_millis(1);
/// Round trips this many times the base (plus [`RTT_SLACK`]) mean our requests queue at the
/// endpoint: the limit grows no more. An endpoint that queues what is over its capacity
/// answers no slower than that below it, and ever slower past it, for no more throughput (a
/// trial: 8 slots of 10 ms queued, the limit at 64 and every answer after 80 ms).
const QUEUEING_FACTOR: f64 = 1.5;
/// Round trips this many times the base mean a queue built up (the endpoint's capacity fell,
/// say) or the endpoint got slower (a route changed): the base is measured again. Neither
/// shrinks the limit by itself: were it the route, the limit would fall for nothing.
const QUEUED_FACTOR: f64 = 2.0;
/// The base is measured again at least this often, or every [`BASE_EVERY_RTTS`] round trips
/// when longer: the endpoint's own time may have grown (a route changed), and a base kept from
/// before would hold the limit down.
const BASE_FOR: Duration = Duration::from_secs(30);
const BASE_EVERY_RTTS: u32 = 50;
/// Measured again no sooner than this after the last measure, however slow the round trips.
const BASE_AT_MOST_EVERY: Duration = Duration::from_secs(5);
/// A measure of the base takes the mean of at least this many answers (over as many
/// intervals as that takes, up to [`BASE_MEASURE_INTERVALS`]): at a low limit one interval
/// holds a few, whose mean may lie well under the endpoint's usual time.
const BASE_MEASURE_ANSWERS: u32 = 16;
const BASE_MEASURE_INTERVALS: u32 = 4;

/// A measure of the base round trip under way: the limit held at half until the requests out
/// before it have been answered (they waited behind the old limit's queue), then over
/// [`BASE_MEASURE_ANSWERS`] answers, whose mean round trip is the base.
#[derive(Debug, Clone, Copy)]
struct BaseProbe {
    /// The limit to go back to.
    limit_before: usize,
    began_at: Instant,
    /// Requests started before it, not yet answered.
    out_before: usize,
    /// Once they all were: the round trips of the intervals since, summed, and how many.
    measuring: Option<(f64, u32)>,
    /// Intervals measured so far, past the first.
    intervals: u32,
}

/// What one answer says about the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// 2xx.
    Healthy,
    /// An answer that shows the endpoint works but is not about load: a 4xx that rejects the
    /// export (401/403 are [`Signal::Failed`], or [`Signal::TokenDroppedBefore`]: a
    /// destination that refuses every token is down).
    Neutral,
    /// 429.
    RateLimited,
    /// 503 (or a gateway's 502 or 504, or 408), a timeout or a connection error: the endpoint
    /// is overloaded or unreachable.
    Overloaded,
    /// Another retryable failure (5xx, 425, a failed token request).
    Failed,
    /// A 401/403 to an OAuth token an earlier answer refused first: says nothing of the
    /// destination that the first did not, so it neither counts towards down nor reopens it
    /// (a probe so answered failed, though).
    TokenDroppedBefore,
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
    /// `delivery.request_timeout_ms`: how long a request may take, and so how far back the
    /// share of failed answers that takes the destination down is judged ([`DOWN_AT_SHARE`]).
    pub request_timeout: Duration,
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

/// Successes of the last [`LAST_SECOND`], counted in slices of [`LAST_SECOND_SLICE`], so that
/// an endpoint that takes tens of thousands a second keeps a hundred entries.
#[derive(Debug, Default)]
struct LastSecond {
    slices: std::collections::VecDeque<(Instant, u32)>,
    count: u32,
}

const LAST_SECOND_SLICE: Duration = Duration::from_millis(10);

impl LastSecond {
    fn record(&mut self, now: Instant) {
        self.forget_before(now);
        match self.slices.back_mut() {
            Some((from, n)) if now.saturating_duration_since(*from) < LAST_SECOND_SLICE => *n += 1,
            _ => self.slices.push_back((now, 1)),
        }
        self.count += 1;
    }

    fn count(&mut self, now: Instant) -> u32 {
        self.forget_before(now);
        self.count
    }

    fn forget_before(&mut self, now: Instant) {
        while let Some(&(from, n)) = self.slices.front() {
            if now.saturating_duration_since(from) <= LAST_SECOND {
                break;
            }
            self.slices.pop_front();
            self.count -= n;
        }
    }
}

/// The times of the latest successes (see [`RATE_WINDOW`]), each with how many came then:
/// answers come in bunches, and an endpoint that takes tens of thousands a second would
/// otherwise have each answer go over thousands of them.
#[derive(Debug)]
struct AcceptedRate {
    times: std::collections::VecDeque<(Instant, usize)>,
    count: usize,
    /// [`RATE_WINDOW`], or twice the round trip when that is longer: answers to requests held
    /// back by the concurrency limit come in bunches a round trip apart, and the gap between
    /// two bunches is no pause.
    window: Duration,
}

impl Default for AcceptedRate {
    fn default() -> AcceptedRate {
        AcceptedRate {
            times: std::collections::VecDeque::new(),
            count: 0,
            window: RATE_WINDOW,
        }
    }
}

impl AcceptedRate {
    fn set_round_trip(&mut self, rtt: Duration) {
        self.window = (rtt * 2).max(RATE_WINDOW);
    }

    fn record(&mut self, now: Instant) {
        // After a pause the successes before it are forgotten: a rate measured across it would
        // be far too low.
        if self.paused(now) {
            self.times.clear();
            self.count = 0;
        }
        match self.times.back_mut() {
            Some((at, n)) if *at == now => *n += 1,
            _ => self.times.push_back((now, 1)),
        }
        self.count += 1;
        while let Some(&(at, n)) = self.times.front() {
            let age = now.saturating_duration_since(at);
            let left = self.count - n;
            let old = (left >= RATE_OF_AT_LEAST && age > self.window) || age > RATE_LOOKBACK;
            if !old && left < SHARE_OF_AT_MOST {
                break;
            }
            self.times.pop_front();
            self.count = left;
        }
    }

    /// Successes a second from the first of them to the last: what the endpoint took while it
    /// took any, so 429s after them do not lower it. None until [`RATE_OF_AT_LEAST`] came, or
    /// while they all came at once.
    fn per_second(&self) -> Option<f64> {
        if self.count < RATE_OF_AT_LEAST {
            return None;
        }
        self.per_second_of_few()
    }

    /// Successes a second as [`Self::per_second`] measures them, from however few (two at
    /// least): a rate limit with a small burst refuses before 20 successes came, and a cap
    /// begun at [`MIN_RATE`] for want of a measure took its 5% steps for seconds to get back
    /// (the controller's simulation: 50 a second with bursts of 5, 193 of the first 10 s's
    /// 500; 1,000 a second with bursts of 10, answers after 1 ms, 271 of 10,000). Too high,
    /// from a burst, it is cut as the 429s go on, by then against a rate measured.
    fn per_second_of_few(&self) -> Option<f64> {
        let (&(first, with_first), &(last, _)) = (self.times.front()?, self.times.back()?);
        // Those that came with the first are before the span.
        let after_first = self.count - with_first;
        if after_first == 0 {
            return None;
        }
        let span = last.saturating_duration_since(first);
        Some(after_first as f64 / span.max(RATE_WINDOW).as_secs_f64())
    }

    /// [`Self::per_second_still`], or, before [`RATE_OF_AT_LEAST`] successes came,
    /// [`Self::per_second_of_few`] (a pause is told only from a rate measured).
    fn per_second_so_far(&self, now: Instant) -> Option<f64> {
        if self.count < RATE_OF_AT_LEAST {
            self.per_second_of_few()
        } else {
            self.per_second_still(now)
        }
    }

    /// Whether a few of the gaps between successes went by since the last one without
    /// another: the endpoint refuses everything for now, or had nothing to take.
    fn paused(&self, now: Instant) -> bool {
        let (Some(rate), Some(&(last, _))) = (self.per_second(), self.times.back()) else {
            return false;
        };
        let gap = Duration::from_secs_f64(1.0 / rate);
        now.saturating_duration_since(last) > (gap * 3).max(self.window)
    }

    /// [`Self::per_second`] while the endpoint still accepts at about that pace: what it took
    /// before a pause says nothing of what it takes when it starts again.
    fn per_second_still(&self, now: Instant) -> Option<f64> {
        self.per_second().filter(|_| !self.paused(now))
    }
}

#[derive(Debug)]
struct RateCap {
    per_second: f64,
    tokens: f64,
    refilled: Instant,
    cut_at: Instant,
    /// The rate the endpoint accepted at the last cut: where its limit seems to lie. None
    /// until a cut measured one.
    ceiling: Option<f64>,
    strays: StrayShare,
    /// Answers and 429s of the last steps since the last cut or ease: at least
    /// [`RECENT_ANSWERS`] when as many came.
    recent: std::collections::VecDeque<(u32, u32)>,
    /// Answers and 429s since the last cut or ease, while the cap is held after it.
    held: Option<(u32, u32)>,
    /// Steps in a row near the ceiling that grew the cap: the longer growth goes without 429s,
    /// the faster it goes (the limit may have been lifted, or the ceiling found too low).
    clean_steps: u32,
    step: CapStep,
}

/// 429s that come whatever the rate (a flaky endpoint), which a step expects and does not
/// count against the cap: else they would drive it down for good. After each cut or ease the
/// cap is held (see [`HOLD_FOR_ANSWERS`]) and the share of 429s in that while is kept with it.
/// Strays are 429s whose share stays when the cap goes down: the smallest share of the last
/// [`STRAY_WINDOWS`] kept, once their caps lie at least [`STRAY_CAPS_APART`] apart. A rate
/// limit refuses none once the cap is under it, so one cut that went under it clears the
/// share, and cuts that each stopped just over it (their caps close together) confirm none.
#[derive(Debug, Default)]
struct StrayShare {
    /// (share of 429s, cap) of each window kept, oldest first.
    windows: std::collections::VecDeque<(f64, f64)>,
}

impl StrayShare {
    fn after_cut(&mut self, (answered, refused): (u32, u32), cap: f64) {
        // Too few to say, or everything refused: a pause, not strays.
        if answered < STEP_ANSWERS || refused >= answered {
            return;
        }
        self.windows
            .push_back((f64::from(refused) / f64::from(answered), cap));
        if self.windows.len() > STRAY_WINDOWS {
            self.windows.pop_front();
        }
    }

    fn share(&self) -> f64 {
        if self.windows.len() < STRAY_WINDOWS {
            return 0.0;
        }
        let shares = self.windows.iter().map(|&(share, _)| share);
        let caps = self.windows.iter().map(|&(_, cap)| cap);
        let lowest_cap = caps.clone().fold(f64::INFINITY, f64::min);
        let highest_cap = caps.fold(0.0, f64::max);
        if lowest_cap > STRAY_CAPS_APART * highest_cap {
            return 0.0;
        }
        shares
            .fold(f64::INFINITY, f64::min)
            .min(STRAY_SHARE_AT_MOST)
    }
}

/// The mean of the faster half of `rtts` (reordered), or `None` when there are none. Requests
/// queued at the endpoint all wait, so their whole spread moves up; a share of slow answers
/// (a backend that takes seconds now and then) moves only its top. The mean of every answer
/// followed such a tail: against 50 ms answers with 5% of them taking 3 s, it went over twice
/// the base round trip as often as not, and the limit, cut a tenth at each interval whose
/// mean doubled and measured at half for the queue it seemed to show, fell from 64 to 5 in a
/// minute and a half (the controller's simulation; 123 requests a second of 324).
fn typical_round_trip(rtts: &mut [f64]) -> Option<f64> {
    if rtts.is_empty() {
        return None;
    }
    let faster = rtts.len().div_ceil(2);
    if faster < rtts.len() {
        rtts.select_nth_unstable_by(faster - 1, f64::total_cmp);
    }
    Some(rtts[..faster].iter().sum::<f64>() / faster as f64)
}

/// Whether `refused` of `answered` are clearly more than `share` of them: by some standard
/// deviations, since a few answers hold clusters.
fn clearly_above((answered, refused): (u32, u32), share: f64, deviations: f64) -> bool {
    let expected = share * f64::from(answered);
    f64::from(refused) > expected + deviations * expected.sqrt()
}

/// Overloads among the answers to requests sent under each limit, in buckets of limits a
/// power of two apart (1, 2–3, 4–7, …). An endpoint overloaded by what it is sent refuses more
/// the more it is sent, and little or nothing well under its capacity; one that fails a share
/// of requests at random (a flaky backend behind a load balancer) fails that share at any
/// limit. Halving for each of those, once a round trip, as TCP's window under random loss,
/// holds the limit near the square root of twice the inverse share: with 1% of 503s a 300 ms
/// endpoint got a sixth of what it takes at 64 (the controller's simulation).
#[derive(Debug, Default)]
struct OverloadShares {
    /// (answers, overloads) of each bucket, both halved when the answers reach
    /// [`BUCKET_ANSWERS_AT_MOST`], so that what the endpoint did long ago fades.
    buckets: [(u32, u32); LIMIT_BUCKETS],
    /// When an answer last came in each bucket.
    answered_at: [Option<Instant>; LIMIT_BUCKETS],
}

impl OverloadShares {
    fn bucket(limit: usize) -> usize {
        (limit.max(1).ilog2() as usize).min(LIMIT_BUCKETS - 1)
    }

    fn record(&mut self, now: Instant, limit: usize, overloaded: bool) {
        self.answered_at[Self::bucket(limit)] = Some(now);
        let (answers, overloads) = &mut self.buckets[Self::bucket(limit)];
        *answers += 1;
        *overloads += u32::from(overloaded);
        if *answers >= BUCKET_ANSWERS_AT_MOST {
            *answers /= 2;
            *overloads /= 2;
        }
    }

    /// The share of answers overloaded at random at limits up to `limit`, whatever the limit,
    /// or zero: the bucket of `limit` and every one under it with at least
    /// [`BUCKET_ANSWERS_AT_LEAST`] answers (two of them at least, [`STRAYS_SEEN_AT_LEAST`]
    /// overloads in each of two) holding shares one share explains ([`CHI_SQUARED_1_PERCENT`]),
    /// and that share at most
    /// [`OVERLOAD_STRAYS_AT_MOST`]. Buckets over the limit's are left out: an endpoint may
    /// fail a share at random and refuse what is over its capacity besides, and the limit is
    /// to grow up to that capacity, not past it. The limit's own bucket, when it holds fewer
    /// answers than that (the limit only just reached it), is only to hold no clearly more
    /// overloads than the share.
    fn stray_share(&self, now: Instant, limit: usize) -> f64 {
        let own = Self::bucket(limit);
        let recent = |at: &Option<Instant>| {
            at.is_some_and(|at| now.saturating_duration_since(at) < BUCKET_STALE_AFTER)
        };
        let measured: Vec<(u32, u32)> = self.buckets[..=own]
            .iter()
            .zip(&self.answered_at)
            .filter(|((answers, _), at)| *answers >= BUCKET_ANSWERS_AT_LEAST && recent(at))
            .map(|(bucket, _)| *bucket)
            .collect();
        let seen = measured
            .iter()
            .filter(|(_, overloads)| *overloads >= STRAYS_SEEN_AT_LEAST)
            .count();
        if measured.len() < 2 || seen < 2 {
            return 0.0;
        }
        let (answers, overloads) = measured
            .iter()
            .fold((0, 0), |(a, o), &(answers, overloads)| {
                (a + u64::from(answers), o + u64::from(overloads))
            });
        let share = overloads as f64 / answers as f64;
        // Pearson's test of one share for all of them: each bucket's distance from it weighed
        // by its own spread, so that the largest bucket does not set the share the others are
        // held to (1% beside 5% passed as 4.1% so).
        let distance: f64 = measured
            .iter()
            .map(|&(bucket_answers, bucket_overloads)| {
                let expected = share * f64::from(bucket_answers);
                (f64::from(bucket_overloads) - expected).powi(2) / (expected * (1.0 - share))
            })
            .sum();
        let agree = distance <= CHI_SQUARED_1_PERCENT[measured.len() - 2];
        // A bucket the limit has only just reached holds too few answers to agree or not,
        // but may already hold clearly more overloads than the share.
        let (own_answers, own_overloads) = self.buckets[own];
        let own_over = own_answers < BUCKET_ANSWERS_AT_LEAST
            && clearly_above((own_answers, own_overloads), share, CUT_DEVIATIONS);
        if agree && !own_over && share <= OVERLOAD_STRAYS_AT_MOST {
            share
        } else {
            0.0
        }
    }
}

/// Overloads in a row (no other answer about the load between them) that strays of `share`
/// come in less often than [`STRAYS_IN_A_ROW_CHANCE`].
fn unlikely_in_a_row(share: f64) -> u32 {
    (STRAYS_IN_A_ROW_CHANCE.ln() / share.ln()).ceil().max(2.0) as u32
}

/// The answers of about the last `window` (a request timeout), counted in [`WINDOW_PARTS`]
/// parts of it, and how many were failures: bounded however fast the endpoint answers.
#[derive(Debug, Default)]
struct FailureShare {
    /// (when the part began, answers, failures), oldest first.
    parts: std::collections::VecDeque<(Instant, u32, u32)>,
}

const WINDOW_PARTS: u32 = 20;

impl FailureShare {
    fn record(&mut self, now: Instant, window: Duration, failed: bool) {
        let part = window / WINDOW_PARTS;
        while self
            .parts
            .front()
            .is_some_and(|&(began, ..)| began + window < now)
        {
            self.parts.pop_front();
        }
        match self.parts.back_mut() {
            Some((began, answers, failures)) if *began + part > now => {
                *answers += 1;
                *failures += u32::from(failed);
            }
            _ => self.parts.push_back((now, 1, u32::from(failed))),
        }
    }

    /// The share of the answers counted that were failures.
    fn share(&self) -> f64 {
        let (answers, failures) = self
            .parts
            .iter()
            .fold((0, 0), |(a, f), &(_, answers, failures)| {
                (a + answers, f + failures)
            });
        f64::from(failures) / f64::from(answers.max(1))
    }
}

/// The last [`RECENT_ANSWERS`] answers to requests started since the limit was last cut,
/// and how many of them were overloads.
#[derive(Debug, Default)]
struct RecentOverloads {
    answers: std::collections::VecDeque<bool>,
    overloads: u32,
}

impl RecentOverloads {
    fn record(&mut self, overloaded: bool) {
        self.answers.push_back(overloaded);
        self.overloads += u32::from(overloaded);
        if self.answers.len() > RECENT_ANSWERS as usize {
            let oldest = self.answers.pop_front().unwrap_or_default();
            self.overloads -= u32::from(oldest);
        }
    }

    /// Whether they are clearly more than `strays` explain: by as much as a cut of the rate
    /// cap asks of 429s over theirs.
    fn over(&self, strays: f64) -> bool {
        let counts = (self.answers.len() as u32, self.overloads);
        counts.1 >= CUT_MIN_REFUSED && clearly_above(counts, strays + CUT_EXCESS, CUT_DEVIATIONS)
    }

    fn clear(&mut self) {
        self.answers.clear();
        self.overloads = 0;
    }
}

/// What happened since the cap was last judged.
#[derive(Debug, Clone, Copy)]
struct CapStep {
    from: Instant,
    /// Answers to requests started since the last cut, and how many were 429s.
    answered: u32,
    refused: u32,
    /// Whether the cap held requests back.
    binding: bool,
}

impl CapStep {
    fn new(from: Instant) -> CapStep {
        CapStep {
            from,
            answered: 0,
            refused: 0,
            binding: false,
        }
    }
}

impl RateCap {
    /// A first cap, under what the endpoint accepted. That rate often includes a burst the
    /// endpoint allowed at first, or counts too few successes, so it sets no ceiling: the cap
    /// grows fast until the first cut of its own finds one.
    fn new(now: Instant, accepted: Option<f64>) -> RateCap {
        RateCap {
            per_second: accepted.map_or(MIN_RATE, |a| a * CUT_TO).max(MIN_RATE),
            tokens: 0.0,
            refilled: now,
            cut_at: now,
            ceiling: None,
            strays: StrayShare::default(),
            held: None,
            recent: std::collections::VecDeque::new(),
            clean_steps: 0,
            step: CapStep::new(now),
        }
    }

    fn burst(&self) -> f64 {
        // 20 ms worth of requests, at least one: smooth, yet a coarse timer can keep up.
        (self.per_second / 50.0).max(1.0)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst());
        self.refilled = now;
    }

    /// After a cut or an ease: what came before says nothing of the new cap, which is held.
    fn restart(&mut self, now: Instant) {
        self.cut_at = now;
        self.clean_steps = 0;
        self.held = Some((0, 0));
        self.recent.clear();
    }

    /// Cuts, grows or keeps the cap once a step is long enough; `accepted` is the rate the
    /// endpoint took (see [`AcceptedRate`]), `halve_to_at_least` what a cut on answers all
    /// refused leaves at least (see [`SHORT_RETRY_AFTER`]).
    fn judge_step(&mut self, now: Instant, accepted: Option<f64>, halve_to_at_least: f64) {
        let step = self.step;
        let fast = self.ceiling.is_none_or(|ceiling| {
            self.per_second < FAST_BELOW * ceiling || self.per_second > FAST_ABOVE * ceiling
        });
        if now < step.from + STEP_AT_LEAST {
            return;
        }
        let strays = self.strays.share();
        // Far under the ceiling a cut wants more evidence: there it throws away what the
        // endpoint was found to take.
        let deviations = if fast {
            FAST_CUT_DEVIATIONS
        } else {
            CUT_DEVIATIONS
        };
        let over_in = |counts: (u32, u32)| {
            counts.1 >= CUT_MIN_REFUSED && clearly_above(counts, strays + CUT_EXCESS, deviations)
        };
        let recent = self
            .recent
            .iter()
            .fold((step.answered, step.refused), |sum, step| {
                (sum.0 + step.0, sum.1 + step.1)
            });
        let over = over_in((step.answered, step.refused)) || over_in(recent);
        let clean = recent.1 < 2 || !clearly_above(recent, strays + GROW_EXCESS, GROW_DEVIATIONS);
        let judged = fast
            || (step.answered >= STEP_ANSWERS
                && (over || clean || step.answered >= STEP_ANSWERS_AT_MOST));
        if !judged {
            return;
        }
        // Neither clearly over nor clear: a cap a little over a limit (by the share the strays
        // do not explain), or strays not yet known. It eases and is held as after a cut,
        // which also measures them.
        let eases = !over && !clean && !fast && self.held.is_none();
        if over {
            self.refill(now);
            // Answers that were all refused say nothing of the limit (the endpoint may have
            // just begun to refuse everything), whatever was accepted before them.
            let any_accepted = recent.1 < recent.0;
            match accepted.filter(|_| any_accepted) {
                Some(accepted) => {
                    // Before a first ceiling, the successes measured may still hold a burst
                    // the endpoint allowed at first: no more than what the cap let through,
                    // less the share refused.
                    let accepted = match self.ceiling {
                        None => {
                            let refused = f64::from(recent.1) / f64::from(recent.0);
                            accepted.min(self.per_second * (1.0 - refused))
                        }
                        Some(_) => accepted,
                    };
                    self.ceiling = Some(accepted.max(MIN_RATE));
                    self.per_second = self.per_second.min(accepted) * CUT_TO;
                }
                // Nothing accepted of late (the endpoint refuses everything for now), or too
                // little seen to say what it takes.
                None => {
                    let halved = (self.per_second / 2.0).max(halve_to_at_least);
                    self.per_second = self.per_second.min(halved);
                }
            }
            self.per_second = self.per_second.max(MIN_RATE);
            self.tokens = self.tokens.min(self.burst());
            self.restart(now);
        } else if eases {
            let over_by = f64::from(recent.1) / f64::from(recent.0.max(1)) - strays;
            self.per_second = (self.per_second * (1.0 - over_by).min(EASE)).max(MIN_RATE);
            self.restart(now);
        } else if let Some((answered, refused)) = &mut self.held {
            *answered += step.answered;
            *refused += step.refused;
            if *answered >= HOLD_FOR_ANSWERS || now >= self.cut_at + HOLD_AT_MOST {
                self.strays
                    .after_cut((*answered, *refused), self.per_second);
                self.held = None;
            }
        } else if step.binding && fast {
            // By the time the step took: at a low cap answers come seconds apart.
            let steps = (now - step.from).as_secs_f64() / STEP_AT_LEAST.as_secs_f64();
            self.per_second *= FAST_GROWTH.powf(steps.min(10.0));
            self.clean_steps = 0;
        } else if step.binding {
            let in_a_row = self.clean_steps.min(20) as i32;
            self.per_second *=
                1.0 + (NEAR_GROWTH * ACCELERATION.powi(in_a_row)).min(FAST_GROWTH - 1.0);
            self.clean_steps += 1;
        } else {
            // Not held back (idle, or the concurrency limit): no growth to go on with.
            self.clean_steps = 0;
        }
        if !over && !eases {
            self.recent.push_back((step.answered, step.refused));
            let mut answered: u32 = self.recent.iter().map(|s| s.0).sum();
            while let Some(&(oldest, _)) = self.recent.front() {
                if answered - oldest < RECENT_ANSWERS {
                    break;
                }
                answered -= oldest;
                self.recent.pop_front();
            }
        }
        self.step = CapStep::new(now);
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
    /// The round trips of the interval's healthy answers, in seconds.
    rtts: Vec<f64>,
    reached_limit: bool,
    /// Something pushed back in this interval: the limit does not grow.
    back_pressure: bool,
    /// A rate limit pushed back in this interval, and no overload has halved the limit since:
    /// it is halved at the interval's end.
    rate_limited: bool,
    past_rtt: Option<f64>,
    /// When the limit was last halved: answers to requests started before then do not halve
    /// it again.
    limit_cut_at: Instant,
    /// The lowest the smoothed round trip has been since `base_since`, or what a measure
    /// found then (see [`Controller::track_base`]).
    base_rtt: Option<f64>,
    base_since: Instant,
    base_probe: Option<BaseProbe>,
    overload_shares: OverloadShares,
    recent_overloads: RecentOverloads,
    /// Overloads since the last answer about the load that was none.
    overloads_in_a_row: u32,
    /// (since when, the limit) of the latest changes, oldest first.
    limits: std::collections::VecDeque<(Instant, usize)>,
    /// Intervals after a measure of the base in which the limit does not grow: its first
    /// answers came before the queue it drained built up again.
    after_probe: u8,
    // Rate.
    accepted: AcceptedRate,
    accepted_last_second: LastSecond,
    recent_429: RefusalShare,
    rate_cap: Option<RateCap>,
    /// What the endpoint last said of its quota (see `quota`).
    quota: Option<Quota>,
    /// Whether the outcome being taken in leaves the quota be: an answer that spoke of it
    /// ([`Controller::heard_quota`]) or no answer at all ([`Controller::unanswered`]).
    quota_kept: bool,
    count_down: CountDown,
    /// Whether the latest 429 said to retry within [`SHORT_RETRY_AFTER`].
    retry_soon: bool,
    // Down.
    /// Failures in a row. They take the destination down when [`DOWN_AFTER`] of them are of
    /// requests started since an answer last showed the endpoint working (`worked_at`), or
    /// when three quarters of the answers of the last request timeout were failures
    /// ([`DOWN_AT_SHARE`]). A request started before then says nothing against it alone:
    /// counting those as the others, an endpoint that hangs on a share of its requests went
    /// down again and again, since once the hung requests held more slots than the limit
    /// their timeouts had halved, nothing new was started, and their timeouts came in a row.
    /// Counting them never, one that hangs on nearly all its requests, a rare success moving
    /// `worked_at`, never went down.
    failures_in_a_row: u32,
    failures_since_worked: u32,
    failure_share: FailureShare,
    worked_at: Instant,
    /// When the first request of the current failures in a row was started.
    failures_began_at: Instant,
    /// Once the destination is back after it looked down: the limit it had before its
    /// failures, which the limit doubles towards a round trip, as long as nothing pushes back
    /// (see [`Controller::adjust_limit`]).
    regrow_to: Option<usize>,
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
            rtts: Vec::new(),
            reached_limit: false,
            back_pressure: false,
            rate_limited: false,
            past_rtt: None,
            limit_cut_at: now,
            base_rtt: None,
            base_since: now,
            base_probe: None,
            overload_shares: OverloadShares::default(),
            recent_overloads: RecentOverloads::default(),
            overloads_in_a_row: 0,
            limits: std::collections::VecDeque::from([(now, limit)]),
            after_probe: 0,
            accepted: AcceptedRate::default(),
            accepted_last_second: LastSecond::default(),
            recent_429: RefusalShare::default(),
            rate_cap: None,
            quota: None,
            quota_kept: false,
            count_down: CountDown::default(),
            retry_soon: false,
            failures_in_a_row: 0,
            failures_since_worked: 0,
            failure_share: FailureShare::default(),
            worked_at: now,
            failures_began_at: now,
            regrow_to: None,
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

    /// Nothing is left to deliver (the last exports dropped or expired while the destination
    /// looked down): no probe goes, so nothing more will be learnt of it, and it no longer
    /// counts as down, which would otherwise be reported (and alerted on) until the next
    /// export. That export finds out as one after a start does: the failures in a row count
    /// from none.
    pub fn forget_down(&mut self) {
        debug_assert_eq!(
            self.in_flight, 0,
            "a probe is out: something is left to deliver"
        );
        self.failures_in_a_row = 0;
        self.failures_since_worked = 0;
        if self.down_since.take().is_some() {
            self.no_longer_down();
        }
    }

    /// The destination no longer counts as down: the next request goes at once, and the limit
    /// regrows towards where it stood before the failures (see `regrow_to`).
    fn no_longer_down(&mut self) {
        self.probe_in_flight = false;
        self.backoff.reset();
        let before = self.limit_at(self.failures_began_at);
        self.regrow_to = (before > self.limit).then_some(before);
    }

    /// The request rate cap, when a 429 set one.
    pub fn rate_cap(&self) -> Option<f64> {
        self.rate_cap.as_ref().map(|c| c.per_second)
    }

    /// Requests the endpoint's window has left, as its last answers advertised.
    pub fn quota_left(&self, now: Instant) -> Option<usize> {
        self.quota.map(|q| q.allows(now))
    }

    /// When the endpoint's advertised window starts again, while it has nothing left.
    pub fn quota_spent_until(&self, now: Instant) -> Option<Instant> {
        self.quota.and_then(|q| q.spent_until(now))
    }

    /// How many requests may start now, when `wanted` could.
    pub fn permits(&mut self, now: Instant, wanted: usize) -> usize {
        if wanted == 0 {
            return 0;
        }
        if self.down_since.is_some() {
            return usize::from(!self.probe_in_flight && now >= self.probe_at);
        }
        let by_quota = self.quota.map_or(usize::MAX, |q| q.allows(now));
        let by_limit = self.limit.saturating_sub(self.in_flight).min(by_quota);
        match &mut self.rate_cap {
            None => by_limit.min(wanted),
            Some(cap) => {
                cap.refill(now);
                let by_rate = cap.tokens.floor() as usize;
                if by_rate < wanted.min(by_limit) {
                    cap.step.binding = true;
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
        if self.in_flight >= self.limit {
            return None;
        }
        if let Some(window) = self.quota.and_then(|q| q.spent_until(now)) {
            return Some(window);
        }
        let cap = self.rate_cap.as_ref()?;
        if cap.tokens >= 1.0 {
            return None;
        }
        let wait = (1.0 - cap.tokens) / cap.per_second;
        Some(now + Duration::from_secs_f64(wait).max(Duration::from_millis(1)))
    }

    /// A request started.
    pub fn started(&mut self, now: Instant) {
        self.in_flight += 1;
        if self.in_flight >= self.limit {
            self.reached_limit = true;
        }
        if let Some(cap) = &mut self.rate_cap {
            cap.tokens -= 1.0;
        }
        if let Some(quota) = &mut self.quota {
            quota.started(now);
        }
        if self.down_since.is_some() {
            self.probe_in_flight = true;
        }
    }

    /// A request started at `started_at` but never sent (the agent began to stop while it
    /// waited for its token): it says nothing about the endpoint, and a probe it was may go
    /// again.
    pub fn withdrawn(&mut self, started_at: Instant) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.left_before_probe(started_at);
        if let Some(quota) = &mut self.quota {
            quota.given_back(started_at);
        }
        if self.down_since.is_some() {
            self.probe_in_flight = false;
        }
    }

    /// An answer that came now, to a request sent at `sent_at`, advertised the endpoint's
    /// quota: until its window starts again, no more requests start than it has left. Called
    /// before [`Controller::answered_after`] of that answer, while its request still counts
    /// in flight.
    pub fn heard_quota(&mut self, now: Instant, sent_at: Instant, advertised: Advertised) {
        let others = self.in_flight.saturating_sub(1);
        let heard = Quota::heard(now, sent_at, advertised, others);
        self.quota = Some(match self.quota {
            Some(kept) => kept.updated(now, heard),
            None => heard,
        });
        self.quota_kept = true;
    }

    /// A request started at `started_at` got no answer: its token failed, or its connection
    /// (a timeout, a reset), `reached` telling whether the request may have reached the
    /// endpoint. Called before [`Controller::answered_after`] of that outcome. It says nothing
    /// of the quota, which stays as it was (dropping it would let the next window begin with a
    /// burst); its start is given back if it never reached the endpoint, and otherwise only
    /// when it was started on the guess past the window (see `Quota::unanswered`).
    pub fn unanswered(&mut self, started_at: Instant, reached: bool) {
        if let Some(quota) = &mut self.quota {
            if reached {
                quota.unanswered(started_at);
            } else {
                quota.given_back(started_at);
            }
        }
        self.quota_kept = true;
    }

    /// A 429 came now, to a request sent at `sent_at`, saying to wait `retry_after` if it said.
    /// Called before [`Controller::answered_after`] of that answer. When 429s count down to one
    /// instant (see `quota::CountDown`), the endpoint is a fixed window that refuses everything
    /// until then: no request starts before it, as if its quota were advertised spent; the
    /// end is returned. Otherwise (a stray 429, a token bucket's constant `Retry-After`) the
    /// 429 delays its own export alone.
    pub fn heard_429(
        &mut self,
        now: Instant,
        sent_at: Instant,
        retry_after: Option<Duration>,
    ) -> Option<Instant> {
        self.retry_soon = retry_after.is_some_and(|wait| wait <= SHORT_RETRY_AFTER);
        let end = self.count_down.heard(now, retry_after?)?;
        let spent = Advertised {
            remaining: 0,
            resets_in: end.saturating_duration_since(now),
        };
        self.heard_quota(now, sent_at, spent);
        Some(end)
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
        self.left_before_probe(started_at);
        // An answer that says nothing of the quota once its window is over: the endpoint
        // may have stopped saying, and a quota spent with nothing in flight would hold
        // requests for good.
        let quota_kept = std::mem::take(&mut self.quota_kept);
        if !quota_kept && self.quota.is_some_and(|q| q.past(now)) {
            self.quota = None;
        }
        let rtt = now.saturating_duration_since(sent_at);
        if signal == Signal::Healthy {
            self.rtts.push(rtt.as_secs_f64());
        }
        // A request refused for what it holds (a 4xx) passed the endpoint's rate limit too.
        if matches!(signal, Signal::Healthy | Signal::Neutral) {
            self.accepted.record(now);
            self.accepted_last_second.record(now);
            self.count_down.accepted(sent_at);
        }
        // Answers to requests sent before the last cut say nothing about the rate it set.
        let sent_since_cut = self
            .rate_cap
            .as_ref()
            .is_none_or(|cap| started_at >= cap.cut_at);
        // Only answers that passed the endpoint's rate limit, or hit it, say what share of
        // requests it refuses: a failed token request never reached the endpoint, a timeout
        // or a 5xx need not have passed its limit. Counted as answers without a 429, an outage
        // of the token endpoint would hide a rate limit, or grow the cap while nothing went.
        let about_the_rate = matches!(
            signal,
            Signal::Healthy | Signal::Neutral | Signal::RateLimited
        );
        if sent_since_cut && about_the_rate {
            self.recent_429.record(now, signal == Signal::RateLimited);
            if let Some(cap) = &mut self.rate_cap {
                cap.step.answered += 1;
                cap.step.refused += u32::from(signal == Signal::RateLimited);
            }
        }
        // A 429 pushes back only as part of a rate limit (a share of the answers): a stray one
        // delays its own export, and halving the limit for each would keep it near 1.
        let rate_limited = signal == Signal::RateLimited && self.recent_429.is_rate_limit();
        if rate_limited {
            self.back_pressure = true;
            // A measure of the base has halved the limit already: that is the halving, and
            // the limit stays there.
            self.rate_limited = !self.give_up_base_probe(now);
            self.recent_429.clear();
            if self.rate_cap.is_none() {
                let accepted = self.accepted.per_second_so_far(now);
                self.rate_cap = Some(RateCap::new(now, accepted));
            }
        }
        let about_load = matches!(
            signal,
            Signal::Healthy | Signal::Neutral | Signal::Overloaded
        );
        if about_load {
            let overloaded = signal == Signal::Overloaded;
            // Under the limit its request was started under: an overload that comes after a
            // wait (a timeout, a queue's 503) belongs to the limit that caused it.
            self.overload_shares
                .record(now, self.limit_at(started_at), overloaded);
            if started_at >= self.limit_cut_at {
                self.recent_overloads.record(overloaded);
            }
            self.overloads_in_a_row = if overloaded {
                self.overloads_in_a_row.saturating_add(1)
            } else {
                0
            };
        }
        if signal == Signal::Overloaded {
            self.push_back(now, started_at);
        }
        self.track_down(now, started_at, signal);
        if let Some(cap) = &mut self.rate_cap {
            let halve_to_at_least = if self.retry_soon {
                f64::from(self.accepted_last_second.count(now)) * CUT_TO
            } else {
                0.0
            };
            cap.judge_step(now, self.accepted.per_second_still(now), halve_to_at_least);
        }
        if now >= self.interval_end {
            self.adjust_limit(now);
        }
    }

    fn track_down(&mut self, now: Instant, started_at: Instant, signal: Signal) {
        // A refusal of a token refused before tells nothing new: it neither counts towards down
        // nor reopens. As a probe's answer, though, it is that probe's failure (below): else
        // no probe would go again.
        let news = signal != Signal::TokenDroppedBefore;
        if news {
            let window = self.config.request_timeout;
            self.failure_share.record(now, window, signal.is_failure());
        }
        if news && !signal.is_failure() {
            self.failures_in_a_row = 0;
            self.failures_since_worked = 0;
            self.worked_at = self.worked_at.max(now);
            if self.down_since.take().is_some() {
                self.no_longer_down();
            }
            return;
        }
        if news {
            if self.failures_in_a_row == 0 {
                self.failures_began_at = started_at;
            }
            self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
            if started_at >= self.worked_at {
                self.failures_since_worked = self.failures_since_worked.saturating_add(1);
            }
        }
        let down = self.failures_since_worked >= DOWN_AFTER
            || (self.failures_in_a_row >= DOWN_AFTER
                && self.failure_share.share() >= DOWN_AT_SHARE);
        match self.down_since {
            None if news && down => {
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

    /// Something pushed back on a request started at `started_at`: the limit is halved now,
    /// not at the interval's end. An endpoint that refuses what is over its capacity at once
    /// (a 503 in a fraction of a millisecond) would otherwise refuse every request started into
    /// each slot its refusals free until then, a round trip's worth, and those refusals in a
    /// row take the destination down, a round trip later up again (a trial: 0.67 of such an
    /// endpoint's capacity, 14% refused, down and up ten times a second). The requests out
    /// before the cut were started under the old limit: their refusals cut nothing more.
    ///
    /// An overload of a share that comes at any limit (see [`OverloadShares`]), with no more
    /// of them since the last cut than that share explains, is a stray: it says nothing of
    /// the limit (nor ends a measure of the base), and only its export backs off.
    fn push_back(&mut self, now: Instant, started_at: Instant) {
        // Judged at the limit the request was started under, whose bucket it was counted in.
        let started_under = self.limit_at(started_at);
        let strays = self.overload_shares.stray_share(now, started_under);
        if strays > 0.0
            && !self.recent_overloads.over(strays)
            && self.overloads_in_a_row < unlikely_in_a_row(strays)
        {
            return;
        }
        self.back_pressure = true;
        // A measure of the base halved the limit (and set `limit_cut_at`): the limit is not to
        // go back up where it began.
        self.give_up_base_probe(now);
        if self.config.fixed || started_at < self.limit_cut_at {
            return;
        }
        self.cut_limit(now);
        self.rate_limited = false;
    }

    /// Halves the limit now: answers to requests started before say nothing of the new one.
    fn cut_limit(&mut self, now: Instant) {
        self.limit = (self.limit / 2).max(1);
        self.limit_cut_at = now;
        self.recent_overloads.clear();
        self.note_limit(now);
    }

    /// Keeps the limit as it is from `now` on, if it changed (see [`Controller::limit_at`]).
    fn note_limit(&mut self, now: Instant) {
        if self
            .limits
            .back()
            .is_some_and(|&(_, limit)| limit != self.limit)
        {
            self.limits.push_back((now, self.limit));
            if self.limits.len() > LIMITS_KEPT {
                self.limits.pop_front();
            }
        }
    }

    /// The limit a request started at `started_at` was started under (the oldest kept, for
    /// one older than that).
    fn limit_at(&self, started_at: Instant) -> usize {
        let after = self
            .limits
            .partition_point(|&(since, _)| since <= started_at);
        self.limits
            .get(after.saturating_sub(1))
            .map_or(self.limit, |&(_, limit)| limit)
    }

    /// Ends a measure of the base under way, if one is, without putting the limit back
    /// (something pushed back meanwhile); the next waits as after a measure. Whether one was.
    fn give_up_base_probe(&mut self, now: Instant) -> bool {
        let was = self.base_probe.take().is_some();
        if was {
            self.base_since = now;
        }
        was
    }

    /// A request started at `started_at` is no longer out.
    fn left_before_probe(&mut self, started_at: Instant) {
        if let Some(probe) = &mut self.base_probe {
            // A request started at the very instant the measure began was counted out before it.
            if started_at <= probe.began_at {
                probe.out_before = probe.out_before.saturating_sub(1);
            }
        }
    }

    /// Whether the base is old enough to be measured again (see [`BASE_FOR`]).
    fn base_is_due(&self, now: Instant) -> bool {
        let rtts = self
            .past_rtt
            .and_then(|rtt| Duration::try_from_secs_f64(rtt * f64::from(BASE_EVERY_RTTS)).ok())
            .unwrap_or_default();
        now >= self.base_since + BASE_FOR.max(rtts)
    }

    /// Keeps the base round trip: the lowest the smoothed round trip has been since it
    /// was last measured. Round trips at the limit include the time our requests wait in the
    /// endpoint's queue, so a base taken from them alone would follow that queue up; it is
    /// measured again by holding the limit at half until the requests out before have been
    /// answered, then over at least [`BASE_MEASURE_ANSWERS`] answers (see [`BaseProbe`]), and
    /// putting the limit back: when the base is old ([`BASE_FOR`]), and sooner when round
    /// trips went over twice it (`queued`), which a grown queue and a slower route alike
    /// would do, though not more often than [`BASE_AT_MOST_EVERY`]. The measure takes the new
    /// base either way and shrinks nothing itself: the limit grows no further than round trips
    /// of 1.5 times it allow, and for [`BASE_AT_MOST_EVERY`] after a measure (the base fresh,
    /// not a slower route's old one) a filled limit with round trips over that shrinks by one
    /// an interval: an endpoint that serves fewer the more it is sent past its knee was held
    /// where the limit first stood. Only a limit that was filled is measured: below it, the
    /// round trips are those of what is sent.
    ///
    /// An endpoint whose capacity fell keeps a queue of about what the measure at half the
    /// limit finds: better than the limit pushed on to its maximum, which the growth rule
    /// alone allowed.
    fn track_base(&mut self, now: Instant, (current, answers): (Option<f64>, u32), queued: bool) {
        self.after_probe = self.after_probe.saturating_sub(1);
        if let Some(probe) = &mut self.base_probe {
            let Some((sum, count)) = &mut probe.measuring else {
                if probe.out_before == 0 {
                    probe.measuring = Some((0.0, 0));
                }
                return;
            };
            *sum += current.unwrap_or_default() * f64::from(answers);
            *count += answers;
            if *count < BASE_MEASURE_ANSWERS && probe.intervals < BASE_MEASURE_INTERVALS {
                probe.intervals += 1;
                return;
            }
            let measured = (*count > 0).then(|| *sum / f64::from(*count));
            let limit_before = probe.limit_before;
            self.base_probe = None;
            self.base_rtt = measured.or(self.base_rtt);
            self.base_since = now;
            self.limit = self.limit.max(limit_before);
            self.after_probe = 2;
            return;
        }
        // The smoothed round trip, not an interval's own: a few answers at a low limit (an
        // endpoint that takes 200 to 500 ms) may average well under its usual time, and a base
        // that low held the limit down for a run's first 30 s.
        if let Some(smoothed) = self.past_rtt.or(current) {
            self.base_rtt = Some(self.base_rtt.map_or(smoothed, |base| base.min(smoothed)));
        }
        let due = self.base_is_due(now) || (queued && now >= self.base_since + BASE_AT_MOST_EVERY);
        if !due {
            return;
        }
        if self.reached_limit && self.limit > 1 {
            self.base_probe = Some(BaseProbe {
                limit_before: self.limit,
                began_at: now,
                out_before: self.in_flight,
                measuring: None,
                intervals: 0,
            });
            // Overloads of the requests started before it cut nothing more
            // ([`Controller::push_back`]).
            self.cut_limit(now);
        } else {
            // Below the limit, the round trips are those of what is sent: the smoothed one
            // is the base.
            self.base_rtt = self.past_rtt.or(current).or(self.base_rtt);
            self.base_since = now;
        }
    }

    fn next_backoff(&mut self) -> Duration {
        self.backoff.next_delay(None)
    }

    fn adjust_limit(&mut self, now: Instant) {
        let answers = self.rtts.len() as u32;
        let current = typical_round_trip(&mut self.rtts);
        if !self.config.fixed {
            let slack = RTT_SLACK.as_secs_f64();
            let slower = |factor: f64| match (current, self.past_rtt) {
                (Some(current), Some(past)) => current > past * factor + slack,
                _ => false,
            };
            // The smoothed round trip, as the base is: an interval's own of a noisy endpoint
            // (some answers ten times slower than most) goes over 1.5 times the base now and
            // then, and each time the limit would stop growing for nothing.
            let smoothed = current.map(|current| {
                self.past_rtt
                    .map_or(current, |past| past * (1.0 - RTT_EWMA) + current * RTT_EWMA)
            });
            let over_base = |factor: f64| match (smoothed, self.base_rtt) {
                (Some(smoothed), Some(base)) => smoothed > base * factor + slack,
                _ => false,
            };
            // What the endpoint took before an outage is taken back fast, until something
            // says it takes less now: the failures halved the limit down to 1, and growing
            // by one a round trip from there cost seconds of delivery after every outage.
            if self.rate_limited
                || self.back_pressure
                || slower(SLOWDOWN_FACTOR)
                || over_base(QUEUEING_FACTOR)
                || self.regrow_to.is_some_and(|to| self.limit >= to)
            {
                self.regrow_to = None;
            }
            if self.rate_limited {
                self.limit = (self.limit / 2).max(1);
            } else if self.back_pressure || self.base_probe.is_some() {
                // An overload halved the limit as it came ([`Controller::push_back`]); a
                // measure of the base holds it at half.
            } else if slower(SLOWDOWN_FACTOR) {
                // At least one fewer: a tenth of a limit under 10 rounds to none.
                self.limit = self.limit.saturating_sub((self.limit / 10).max(1)).max(1);
            } else if self.reached_limit
                && current.is_some()
                && !slower(1.0)
                && !over_base(QUEUEING_FACTOR)
                && self.after_probe == 0
            {
                let grown = match self.regrow_to {
                    Some(to) => (self.limit * 2).min(to),
                    None => self.limit + 1,
                };
                self.limit = grown.min(self.config.max_concurrency);
            } else if self.reached_limit
                && over_base(QUEUEING_FACTOR)
                && now < self.base_since + BASE_AT_MOST_EVERY
                && self.after_probe == 0
            {
                // Our queue at the endpoint, by a base just measured (see `track_base`).
                self.limit = self.limit.saturating_sub(1).max(1);
            }
            self.track_base(now, (current, answers), over_base(QUEUED_FACTOR));
        }
        if let Some(current) = current {
            let past = match self.past_rtt {
                None => current,
                Some(past) => past * (1.0 - RTT_EWMA) + current * RTT_EWMA,
            };
            self.past_rtt = Some(past);
            if let Ok(rtt) = Duration::try_from_secs_f64(past) {
                self.accepted.set_round_trip(rtt);
            }
        }
        let interval = self
            .past_rtt
            .map_or(MIN_INTERVAL, Duration::from_secs_f64)
            .max(MIN_INTERVAL);
        self.interval_end = now + interval;
        self.rtts.clear();
        self.reached_limit = self.in_flight >= self.limit;
        self.note_limit(now);
        self.back_pressure = false;
        self.rate_limited = false;
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
            request_timeout: Duration::from_secs(10),
        }
    }

    /// Starts as many requests as the controller permits now, and moves `now` on by `rtt`, to
    /// when they are answered: how many, and when they were sent.
    fn start_round(c: &mut Controller, now: &mut Instant, rtt: Duration) -> (usize, Instant) {
        let n = c.permits(*now, usize::MAX);
        let sent = *now;
        for _ in 0..n {
            c.started(sent);
        }
        *now += rtt;
        (n, sent)
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
            let (n, sent) = start_round(c, now, rtt);
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

    /// A request sent at `sent` answered well 10 ms later, the answer saying `remaining` left
    /// until `resets_in` from then; when it came.
    fn answered_with_quota(
        c: &mut Controller,
        sent: Instant,
        remaining: u64,
        resets_in: Duration,
    ) -> Instant {
        let answer = sent + Duration::from_millis(10);
        let quota = Advertised {
            remaining,
            resets_in,
        };
        c.heard_quota(answer, sent, quota);
        c.answered(answer, sent, Signal::Healthy);
        answer
    }

    #[test]
    fn an_advertised_quota_bounds_the_requests_started_until_its_window_starts_again() {
        let now = Instant::now();
        let mut c = Controller::new(config(64), now);
        assert_eq!(c.quota_left(now), None);
        for _ in 0..3 {
            c.started(now);
        }
        // The first answer: 5 left until 2 s from now, with 2 others still in flight.
        let answer = answered_with_quota(&mut c, now, 5, Duration::from_secs(2));
        assert_eq!(c.quota_left(answer), Some(3));
        assert_eq!(c.permits(answer, usize::MAX), 3);
        for _ in 0..3 {
            c.started(answer);
        }
        assert_eq!(c.permits(answer, usize::MAX), 0);
        let window = answer + Duration::from_secs(2);
        assert_eq!(c.next_permit_at(answer, 1), Some(window));
        // Once the window starts again, what a window was said to have (5) starts, less
        // nothing: the 5 in flight were started in the old window.
        assert_eq!(c.quota_left(window), Some(5));
        assert_eq!(
            c.permits(window, usize::MAX),
            3,
            "the limit of 8 less 5 out"
        );
        for _ in 0..3 {
            c.started(window);
        }
        // An answer to one sent before the window started again says nothing of the new one.
        let late = window + Duration::from_millis(5);
        c.heard_quota(
            late,
            answer,
            Advertised {
                remaining: 0,
                resets_in: Duration::from_secs(1),
            },
        );
        c.answered(late, answer, Signal::RateLimited);
        assert_eq!(c.quota_left(late), Some(2));
        // An answer that says nothing of the quota once its window is over drops it: with
        // nothing in flight, a spent quota would hold requests for good.
        c.answered(late, answer, Signal::Healthy);
        assert_eq!(c.quota_left(late), None);
    }

    #[test]
    fn requests_that_get_no_answer_keep_the_quota_and_give_their_starts_back() {
        let now = Instant::now();
        let mut c = Controller::new(config(64), now);
        c.started(now);
        let answer = answered_with_quota(&mut c, now, 2, Duration::from_secs(1));
        // Within the window: one that timed out may have been counted and keeps its start;
        // one whose token failed never reached the endpoint and gives it back.
        c.started(answer);
        c.started(answer);
        assert_eq!(c.quota_left(answer), Some(0));
        let failed = answer + Duration::from_millis(100);
        c.unanswered(answer, true);
        c.answered_after(failed, answer, answer, Signal::Overloaded);
        assert_eq!(c.quota_left(failed), Some(0));
        c.unanswered(answer, false);
        c.answered_after(failed, answer, answer, Signal::Failed);
        assert_eq!(c.quota_left(failed), Some(1));
        // The next window is taken to have 2: both start, and neither gets an answer.
        let window = answer + Duration::from_secs(1);
        assert_eq!(c.permits(window, usize::MAX), 2);
        c.started(window);
        c.started(window);
        assert_eq!(c.permits(window, usize::MAX), 0);
        let timed_out = window + Duration::from_millis(100);
        c.unanswered(window, true);
        c.answered_after(timed_out, window, window, Signal::Overloaded);
        assert_eq!(
            c.quota_left(timed_out),
            Some(1),
            "the quota stays, the start given back"
        );
        c.unanswered(window, true);
        c.answered_after(timed_out, window, window, Signal::Failed);
        assert_eq!(c.quota_left(timed_out), Some(2));
        assert_eq!(c.next_permit_at(timed_out, 1), None, "nothing holds them");
    }

    #[test]
    fn back_pressure_halves_the_limit_down_to_one() {
        // One answer in each round is a 503 (or a timeout), the rest are fine.
        let mut now = Instant::now();
        let mut c = Controller::new(config(64), now);
        let mut limits = Vec::new();
        for _ in 0..4 {
            let (n, sent) = start_round(&mut c, &mut now, Duration::from_millis(5));
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

    /// A fresh controller driven `fast_rounds` intervals of healthy 10 ms round trips, then two
    /// three times slower (the first still holds answers of the last fast round): the limit
    /// reached, and the limits over the two slow intervals.
    fn fast_then_three_times_slower(
        fast_rounds: usize,
    ) -> (Controller, Instant, usize, Vec<usize>) {
        let mut now = Instant::now();
        let mut c = Controller::new(config(64), now);
        let fast = Duration::from_millis(10);
        drive(&mut c, &mut now, fast_rounds, fast, Signal::Healthy);
        let reached = c.limit();
        let slow = Duration::from_millis(30);
        let limits = drive(&mut c, &mut now, 2, slow, Signal::Healthy);
        (c, now, reached, limits)
    }

    #[test]
    fn a_clear_slowdown_shrinks_a_limit_under_ten_by_one() {
        let (_, _, reached, limits) = fast_then_three_times_slower(1);
        assert_eq!(reached, 9);
        // The first slow answers are judged with the fast ones of the round before, which
        // are more: a slowdown of less than half of an interval's answers is no slowdown.
        assert_eq!(limits, [10, 9]);
    }

    #[test]
    fn a_clear_slowdown_shrinks_the_limit_and_a_steady_slow_endpoint_grows_it_again() {
        // Three times slower: shrink by a tenth.
        let (mut c, mut now, reached, limits) = fast_then_three_times_slower(4);
        assert_eq!(reached, 12);
        assert_eq!(limits, [13, 12]);
        // Over three times the base: a queue of ours or a slower route, which only a measure
        // at half the limit tells apart, and not sooner than BASE_AT_MOST_EVERY after the
        // last. Meanwhile the limit holds.
        let slow = Duration::from_millis(30);
        let limits = drive(&mut c, &mut now, 8, slow, Signal::Healthy);
        assert!(limits.iter().all(|&limit| limit <= 12), "{limits:?}");
        // The measure finds the endpoint's own time is 30 ms now: the limit is put back and
        // grows again.
        let limits = drive(&mut c, &mut now, 300, slow, Signal::Healthy);
        assert!(limits.contains(&6), "measured at half: {limits:?}");
        assert!(limits.last().unwrap() > &20, "{limits:?}");
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
    fn refusals_of_a_token_refused_before_neither_take_the_destination_down_nor_reopen_it() {
        let start = Instant::now();
        let mut c = Controller::new(config(64), start);
        // One token revoked with 64 requests in flight: one refusal counts.
        for signal in std::iter::once(Signal::Failed).chain([Signal::TokenDroppedBefore; 63]) {
            c.started(start);
            c.answered(start, start, signal);
        }
        assert!(!c.is_down());
        // A destination that refuses every token still goes down, a token a failure.
        for _ in 1..DOWN_AFTER {
            c.started(start);
            c.answered(start, start, Signal::Failed);
            c.started(start);
            c.answered(start, start, Signal::TokenDroppedBefore);
        }
        assert!(c.is_down());
        c.started(start);
        c.answered(start, start, Signal::TokenDroppedBefore);
        assert!(
            c.is_down(),
            "a late refusal of an old token reopens nothing"
        );
        // A probe so refused failed: the next goes on the backoff schedule.
        let probe_at = c.next_permit_at(start, 1).expect("a probe is due");
        assert_eq!(c.permits(probe_at, 1), 1);
        c.started(probe_at);
        c.answered(probe_at, probe_at, Signal::TokenDroppedBefore);
        assert!(c.is_down());
        let next = c.next_permit_at(probe_at, 1).expect("another probe is due");
        assert!(next > probe_at);
        assert_eq!(c.permits(next, 1), 1, "probes go on");
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
    fn back_from_down_the_limit_doubles_up_to_where_it_was_unless_something_pushes_back() {
        let rtt = Duration::from_millis(10);
        let down_and_back = |now: &mut Instant| {
            let mut c = Controller::new(config(64), *now);
            drive(&mut c, now, 600, rtt, Signal::Healthy);
            let before = c.limit();
            while !c.is_down() {
                drive(&mut c, now, 1, rtt, Signal::Overloaded);
            }
            // Probes that fail take the limit down to 1; then one succeeds.
            for probe in 0..8 {
                *now = c.next_permit_at(*now, 1).unwrap();
                c.started(*now);
                *now += rtt;
                let signal = if probe < 7 {
                    Signal::Overloaded
                } else {
                    Signal::Healthy
                };
                c.answered(*now, *now - rtt, signal);
            }
            assert!(!c.is_down());
            (c, before)
        };
        let mut now = Instant::now();
        let (mut c, before) = down_and_back(&mut now);
        assert_eq!(before, 64);
        let back_at = c.limit();
        assert!(back_at <= 2, "back at {back_at}");
        let limits = drive(&mut c, &mut now, 12, rtt, Signal::Healthy);
        let mut expected = Vec::new();
        for _ in 0..12 {
            let last = expected.last().copied().unwrap_or(back_at);
            expected.push((last * 2).min(64));
        }
        assert_eq!(limits, expected);

        // A slowdown on the way ends the doubling (seen an interval late here, since the last
        // answers of a round count in the next): from there the limit goes no higher than
        // one over the highest it has been (a measure of the base puts it back where it was).
        let (mut c, _) = down_and_back(&mut now);
        drive(&mut c, &mut now, 3, rtt, Signal::Healthy);
        let limits = drive(&mut c, &mut now, 60, rtt * 3, Signal::Healthy);
        for (round, &limit) in limits.iter().enumerate().skip(1) {
            let highest = limits[..round].iter().max().unwrap();
            assert!(limit <= highest + 1, "round {round}: {limits:?}");
        }
    }

    #[test]
    fn a_destination_down_with_nothing_left_to_deliver_is_forgotten_as_down() {
        let start = Instant::now();
        let mut c = Controller::new(config(64), start);
        for _ in 0..DOWN_AFTER {
            c.started(start);
            c.answered(start, start, Signal::Overloaded);
        }
        assert!(c.is_down());
        c.forget_down();
        assert!(!c.is_down());
        // The next export goes at once, not on the probes' schedule.
        assert_eq!(c.permits(start, 1), 1);
        // And the failures count from none again.
        for i in 0..DOWN_AFTER {
            assert!(!c.is_down(), "down after {i} failures");
            c.started(start);
            c.answered(start, start, Signal::Overloaded);
        }
        assert!(c.is_down());
    }

    #[test]
    fn forgotten_as_down_the_limit_doubles_back_as_after_a_probe() {
        let mut now = Instant::now();
        let rtt = Duration::from_millis(10);
        let mut c = Controller::new(config(64), now);
        drive(&mut c, &mut now, 600, rtt, Signal::Healthy);
        assert_eq!(c.limit(), 64);
        while !c.is_down() {
            drive(&mut c, &mut now, 1, rtt, Signal::Overloaded);
        }
        for _ in 0..6 {
            now = c.next_permit_at(now, 1).unwrap();
            c.started(now);
            now += rtt;
            c.answered(now, now - rtt, Signal::Overloaded);
        }
        c.forget_down();
        let from = c.limit();
        assert!(from <= 2, "{from}");
        let limits = drive(&mut c, &mut now, 8, rtt, Signal::Healthy);
        assert_eq!(limits[5..], [64, 64, 64], "{limits:?}");
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

    /// An endpoint that serves `slots` requests at once, each in 10 ms, and answers 503 at
    /// once to one over them, and to `stray_503s` of the others after their 10 ms, driven as
    /// the delivery loop drives the controller for `seconds`: (requests it served, requests it
    /// refused for its slots, whether the destination ever counted as down).
    fn against_slots(slots: usize, stray_503s: f64, seconds: u64) -> (u64, u64, bool) {
        against_slots_refusing_after(slots, Duration::ZERO, stray_503s, seconds)
    }

    /// [`against_slots`], the 503 to a request over the slots coming `refuse_after` it (a
    /// queue that gives up, a timeout).
    fn against_slots_refusing_after(
        slots: usize,
        refuse_after: Duration,
        stray_503s: f64,
        seconds: u64,
    ) -> (u64, u64, bool) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let service = Duration::from_millis(10);
        let step = Duration::from_micros(100);
        let start = Instant::now();
        let mut c = Controller::new(config(64), start);
        let mut now = start;
        // When each request in service is answered, and when each refused one started.
        let mut serving: Vec<Instant> = Vec::new();
        let mut refusing: Vec<Instant> = Vec::new();
        let (mut served, mut refused, mut ever_down) = (0, 0, false);
        while now < start + Duration::from_secs(seconds) {
            // A refusal comes back within a step of its time.
            refusing.retain(|&sent| {
                if sent + refuse_after > now {
                    return true;
                }
                refused += 1;
                c.answered(now, sent, Signal::Overloaded);
                false
            });
            serving.retain(|&done| {
                if done > now {
                    return true;
                }
                if rng.gen_bool(stray_503s) {
                    c.answered(now, done - service, Signal::Overloaded);
                } else {
                    served += 1;
                    c.answered(now, done - service, Signal::Healthy);
                }
                false
            });
            ever_down |= c.is_down();
            for _ in 0..c.permits(now, usize::MAX) {
                c.started(now);
                if serving.len() < slots {
                    serving.push(now + service);
                } else {
                    refusing.push(now);
                }
            }
            now += step;
        }
        (served, refused, ever_down)
    }

    /// The controller driven as the delivery loop drives it, with always more exports waiting
    /// than it may send, for `seconds` against an endpoint that answers a request started at
    /// `now` at the time and as `answer` says (given the run's time so far), `request_timeout`
    /// the longest it takes: (requests served, when the destination first counted as down, how
    /// many times it went down).
    fn downs_against(
        (seconds, request_timeout): (u64, Duration),
        seed: u64,
        mut answer: impl FnMut(&mut rand::rngs::StdRng, Instant, Duration) -> (Instant, Signal),
    ) -> (u64, Option<Duration>, u32) {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let step = Duration::from_micros(100);
        let start = Instant::now();
        let config = ControllerConfig {
            request_timeout,
            ..config(64)
        };
        let mut c = Controller::new(config, start);
        let mut now = start;
        let mut out: Vec<(Instant, Instant, Signal)> = Vec::new();
        let (mut served, mut first_down, mut downs) = (0, None, 0);
        while now < start + Duration::from_secs(seconds) {
            let mut answered = Vec::new();
            out.retain(|&(sent, at, signal)| {
                if at > now {
                    return true;
                }
                answered.push((sent, signal));
                false
            });
            for (sent, signal) in answered {
                let was_down = c.is_down();
                c.answered(now, sent, signal);
                served += u64::from(signal == Signal::Healthy);
                if c.is_down() && !was_down {
                    downs += 1;
                    first_down.get_or_insert(now - start);
                }
            }
            for _ in 0..c.permits(now, usize::MAX) {
                c.started(now);
                let (at, signal) = answer(&mut rng, now, now - start);
                out.push((now, at, signal));
            }
            now += step;
        }
        (served, first_down, downs)
    }

    #[test]
    fn an_endpoint_that_hangs_on_a_share_of_its_requests_is_never_down() {
        use rand::Rng;
        // (share that hangs until the timeout, the timeout): the rest answered in 50 ms.
        for (hang, timeout) in [(0.1, Duration::from_secs(2)), (0.2, Duration::from_secs(5))] {
            for seed in 0..3 {
                let seconds = 60;
                let (served, _, downs) = downs_against((seconds, timeout), seed, |rng, now, _| {
                    match rng.gen_bool(hang) {
                        true => (now + timeout, Signal::Overloaded),
                        false => (now + Duration::from_millis(50), Signal::Healthy),
                    }
                });
                // What 64 requests in flight at all times get.
                let mean_service = (1.0 - hang) * 0.05 + hang * timeout.as_secs_f64();
                let capacity = 64.0 / mean_service * (1.0 - hang) * seconds as f64;
                let got = format!(
                    "{:.0}% hanging for {timeout:?}, seed {seed}: served {served} ({:.2} of \
                     capacity), down {downs} times",
                    hang * 100.0,
                    served as f64 / capacity
                );
                eprintln!("{got}");
                assert_eq!(downs, 0, "{got}");
                assert!(served as f64 >= 0.7 * capacity, "{got}");
            }
        }
    }

    #[test]
    fn an_endpoint_that_hangs_on_nearly_every_request_goes_down_within_a_few_timeouts() {
        use rand::Rng;
        let timeout = Duration::from_secs(10);
        for hang in [0.9, 0.97] {
            for seed in 0..3 {
                let (served, first_down, _) = downs_against((60, timeout), seed, |rng, now, _| {
                    match rng.gen_bool(hang) {
                        true => (now + timeout, Signal::Overloaded),
                        false => (now + Duration::from_millis(50), Signal::Healthy),
                    }
                });
                let got = format!(
                    "{:.0}% hanging, seed {seed}: served {served}, first down at {first_down:?}",
                    hang * 100.0
                );
                eprintln!("{got}");
                assert!(first_down.is_some_and(|at| at <= timeout * 3), "{got}");
            }
        }
    }

    #[test]
    fn an_endpoint_that_starts_to_hang_on_every_request_goes_down_within_a_few_timeouts() {
        let timeout = Duration::from_secs(2);
        let healthy_for = Duration::from_secs(5);
        let (_, first_down, downs) = downs_against((30, timeout), 0, |_, now, since_start| {
            match since_start < healthy_for {
                true => (now + Duration::from_millis(50), Signal::Healthy),
                false => (now + timeout, Signal::Overloaded),
            }
        });
        let first_down = first_down.expect("down");
        assert!(
            first_down > healthy_for && first_down <= healthy_for + timeout * 3,
            "down at {first_down:?}"
        );
        assert_eq!(downs, 1);
    }

    #[test]
    fn an_endpoint_that_refuses_what_is_over_its_slots_at_once_is_used_and_never_down() {
        // With 1% of 503s at random besides, the slots' refusals are no strays: the limit
        // is not let grow into them.
        for (slots, stray_503s) in [
            (8, 0.0),
            (16, 0.0),
            (8, 0.01),
            (16, 0.01),
            (16, 0.02),
            (24, 0.02),
            (32, 0.01),
            (32, 0.02),
            (16, 0.05),
            (32, 0.05),
        ] {
            let seconds = 30;
            let (served, refused, ever_down) = against_slots(slots, stray_503s, seconds);
            let capacity = slots as f64 * 100.0 * seconds as f64 * (1.0 - stray_503s);
            let got = format!(
                "{slots} slots, {:.0}% of 503s at random: served {served} ({:.2} of capacity), \
                 refused {refused} ({:.1}%), down {ever_down}",
                stray_503s * 100.0,
                served as f64 / capacity,
                100.0 * refused as f64 / (served + refused) as f64
            );
            eprintln!("{got}");
            // The strays cut the limit, as an endpoint's answers must.
            let at_least = if stray_503s > 0.0 { 0.65 } else { 0.75 };
            assert!(served as f64 >= at_least * capacity, "{got}");
            assert!(refused * 20 <= served + refused, "{got}");
            assert!(!ever_down, "{got}");
        }
    }

    #[test]
    fn overloads_that_come_after_a_wait_are_no_strays() {
        // 8 slots whose overflow is refused after 100 ms or 1 s, 1% of 503s at random besides:
        // counted under the limit they came back at, not the one they were sent under, the
        // refusals looked like strays, and the limit grew to five times the slots (11.9%
        // refused after 100 ms). Halving at each: 6.7% and 8.2% refused. A refusal a second
        // late comes a hundred round trips after the limit that caused it: some are still
        // taken for strays.
        for (refuse_after_ms, refused_at_most) in [(100, 0.08), (1_000, 0.15)] {
            let refuse_after = Duration::from_millis(refuse_after_ms);
            let (served, refused, _) = against_slots_refusing_after(8, refuse_after, 0.01, 60);
            let share = refused as f64 / (served + refused) as f64;
            let got = format!(
                "refused after {refuse_after_ms} ms: served {:.2} of capacity, {:.1}% refused",
                served as f64 / (8.0 * 100.0 * 60.0 * 0.99),
                share * 100.0
            );
            eprintln!("{got}");
            assert!(share <= refused_at_most, "{got}");
        }
    }

    /// The controller driven as the delivery loop drives it for `seconds`, with always more
    /// exports waiting than it may send, against an endpoint that answers a request started
    /// at `now`, in the run's `second`, at `answer_at(now, second)`: per second, (requests
    /// served, their mean round trip in ms, the highest limit).
    fn run_against(
        seconds: u64,
        mut answer_at: impl FnMut(Instant, u64) -> Instant,
    ) -> Vec<(u64, f64, usize)> {
        run_against_answering(seconds, |now, second| {
            (answer_at(now, second), Signal::Healthy)
        })
    }

    /// [`run_against`], the endpoint also saying what it answers: only healthy answers
    /// count as served.
    fn run_against_answering(
        seconds: u64,
        mut answer: impl FnMut(Instant, u64) -> (Instant, Signal),
    ) -> Vec<(u64, f64, usize)> {
        let step = Duration::from_micros(100);
        let start = Instant::now();
        let mut c = Controller::new(config(64), start);
        let mut now = start;
        // (sent, answered, how) of each request out.
        let mut out: Vec<(Instant, Instant, Signal)> = Vec::new();
        let mut seconds_seen = vec![(0u64, 0.0f64, 0usize); seconds as usize];
        while now < start + Duration::from_secs(seconds) {
            let second = (now - start).as_secs();
            out.retain(|&(sent, answered, signal)| {
                if answered > now {
                    return true;
                }
                c.answered(now, sent, signal);
                if signal != Signal::Healthy {
                    return false;
                }
                let (served, rtt_sum, _) = &mut seconds_seen[second as usize];
                *served += 1;
                *rtt_sum += (answered - sent).as_secs_f64() * 1000.0;
                false
            });
            for _ in 0..c.permits(now, usize::MAX) {
                c.started(now);
                let (answered, signal) = answer(now, second);
                out.push((now, answered, signal));
            }
            let limit = &mut seconds_seen[second as usize].2;
            *limit = (*limit).max(c.limit());
            now += step;
        }
        seconds_seen
            .into_iter()
            .map(|(served, rtt_sum, limit)| (served, rtt_sum / served.max(1) as f64, limit))
            .collect()
    }

    /// An endpoint that serves `slots` requests at once, each in 10 ms, and queues the rest,
    /// its slots cut to `slots_after` from `cut_at` seconds on (see [`run_against`]).
    fn against_a_queue(
        slots: usize,
        (cut_at, slots_after): (u64, usize),
        seconds: u64,
    ) -> Vec<(u64, f64, usize)> {
        let service = Duration::from_millis(10);
        // When each slot is next free.
        let mut free_at: Vec<Option<Instant>> = vec![None; slots];
        run_against(seconds, |now, second| {
            if second == cut_at && free_at.len() > slots_after {
                free_at.truncate(slots_after);
            }
            let slot = (0..free_at.len()).min_by_key(|&i| free_at[i]).unwrap();
            let answered = free_at[slot].map_or(now, |free| free.max(now)) + service;
            free_at[slot] = Some(answered);
            answered
        })
    }

    #[test]
    fn an_endpoint_that_queues_what_is_over_its_slots_is_not_pushed_into_its_queue() {
        // 8 slots of 10 ms (800 a second) for 40 s, then 2 (200 a second) for 20 s. Without
        // a base round trip, the limit grew to 64: every answer after 80 ms, then 320 ms. The
        // capacity that fell keeps a queue (no shrink on the base alone: it may be the route).
        let seconds = against_a_queue(8, (40, 2), 60);
        for (second, &(served, rtt_ms, limit)) in seconds.iter().enumerate() {
            eprintln!("{second:>2} s: {served} served, {rtt_ms:.1} ms, limit {limit}");
        }
        let (before, after) = (&seconds[5..40], &seconds[45..]);
        let served = |part: &[(u64, f64, usize)]| {
            part.iter().map(|s| s.0).sum::<u64>() as f64 / part.len() as f64
        };
        let worst_rtt = |part: &[(u64, f64, usize)]| part.iter().map(|s| s.1).fold(0.0, f64::max);
        assert!(served(before) >= 0.95 * 800.0, "{:.0}/s", served(before));
        assert!(worst_rtt(before) <= 20.0, "{:.1} ms", worst_rtt(before));
        assert!(served(after) >= 0.95 * 200.0, "{:.0}/s", served(after));
        assert!(worst_rtt(after) <= 80.0, "{:.1} ms", worst_rtt(after));
        let highest = seconds.iter().map(|s| s.2).max().unwrap();
        assert!(highest <= 20, "the limit went up to {highest}");
    }

    /// Requests answered after `latency()` each, however many are out (no queue) (see
    /// [`run_against`]): requests served a second from the 10th second on.
    fn against_random_latency(mut latency: impl FnMut() -> Duration, seconds: u64) -> f64 {
        let run = run_against(seconds, |now, _| now + latency());
        run[10..].iter().map(|s| s.0).sum::<u64>() as f64 / (seconds - 10) as f64
    }

    #[test]
    fn answers_that_are_now_and_then_much_slower_keep_the_limit_up() {
        use rand::{Rng, SeedableRng};
        // 10 ms answers, a share of them slower by some time, at random: no queue, so a
        // measure of the base at half the limit must not keep it there, though the mean of
        // its few answers may hold none of the slow ones (a rule that kept half the limit
        // where half seemed to serve as many by Little's law served 1,728 a second in the
        // first case). Served a second when this test was written: 3,077, 2,482 and 3,223.
        for (share, slower_ms, before) in
            [(0.05, 200, 3077.0), (0.02, 500, 2482.0), (0.1, 100, 3223.0)]
        {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let served = against_random_latency(
                || {
                    let extra = if rng.gen_bool(share) { slower_ms } else { 0 };
                    Duration::from_millis(10 + extra)
                },
                60,
            );
            let got = format!("{share} of answers {slower_ms} ms slower: {served:.0}/s");
            eprintln!("{got}");
            assert!(served >= 0.9 * before, "{got}, {before:.0}/s before");
        }
    }

    #[test]
    fn a_long_tail_of_slow_answers_keeps_the_limit_up() {
        use rand::{Rng, SeedableRng};
        // A share of answers taking seconds, at random, no queue: judged by the mean of every
        // answer, an interval holding a few of them looked twice as slow, and the limit fell
        // a tenth at a time and was measured at half for a queue there was not (the first
        // case served 123 a second of 324, the second 291 of 1,067, the limit at 1 or 2 for
        // seconds).
        for (base_ms, share, slower_ms) in [(50, 0.05, 2950), (10, 0.05, 990), (100, 0.02, 4900)] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let served = against_random_latency(
                || {
                    let extra = if rng.gen_bool(share) { slower_ms } else { 0 };
                    Duration::from_millis(base_ms + extra)
                },
                90,
            );
            let mean_ms = base_ms as f64 + share * slower_ms as f64;
            let takes = 64.0 * 1000.0 / mean_ms;
            let got = format!(
                "{base_ms} ms, {share} of answers {slower_ms} ms slower: {served:.0}/s of the \
                 {takes:.0} 64 in flight take"
            );
            eprintln!("{got}");
            assert!(served >= 0.9 * takes, "{got}");
        }
    }

    #[test]
    fn delivery_is_back_at_its_rate_soon_after_an_outage() {
        // Answers after 100 ms, none in flight too many; from 10 s to 20 s every connection is
        // refused at once (or answered 503, or timed out). The failures halve the limit down
        // to 1, and it grew back by one a round trip: 6 s to get back to 64 (in the 5 s from
        // the outage's end + 2 s, 2,072, 2,210 and 1,775 served against 3,172 before).
        let rtt = Duration::from_millis(100);
        let mut results = Vec::new();
        for (outage, failing_after) in [
            ("connections refused", Duration::from_micros(200)),
            ("503s", rtt),
            ("timeouts after 1 s", Duration::from_secs(1)),
        ] {
            let seconds = run_against_answering(40, |now, second| match second {
                10..20 => (now + failing_after, Signal::Overloaded),
                _ => (now + rtt, Signal::Healthy),
            });
            let served = |part: &[(u64, f64, usize)]| part.iter().map(|s| s.0).sum::<u64>();
            let before = served(&seconds[5..10]);
            let after = served(&seconds[22..27]);
            let got = format!("after {outage}: {after} served in 5 s against {before} before");
            eprintln!("{got}");
            results.push((got, before, after));
        }
        for (got, before, after) in results {
            assert!(before >= 3_000, "{got}");
            assert!(after as f64 >= 0.95 * before as f64, "{got}");
        }
    }

    #[test]
    fn a_few_slow_round_trips_do_not_hold_the_limit_down() {
        // Healthy 10 ms round trips up to the maximum, a few much slower ones, then 10 ms
        // again: a measure of the base may come from the slowdown, and puts the limit back
        // (a rule that kept half the limit where half seemed to serve as many, by Little's
        // law from the slowdown's round trips, kept it there for 514 round trips).
        for (slow_ms, rounds) in [(30, 3), (40, 2), (60, 2), (100, 1), (100, 3)] {
            let mut now = Instant::now();
            let mut c = Controller::new(config(64), now);
            let fast = Duration::from_millis(10);
            drive(&mut c, &mut now, 600, fast, Signal::Healthy);
            assert_eq!(c.limit(), 64);
            let slow = Duration::from_millis(slow_ms);
            drive(&mut c, &mut now, rounds, slow, Signal::Healthy);
            let limits = drive(&mut c, &mut now, 1200, fast, Signal::Healthy);
            let low = limits.iter().filter(|&&limit| limit <= 32).count();
            let served: usize = limits.iter().sum();
            let got = format!(
                "{rounds} round trips of {slow_ms} ms: {low} rounds at half the limit or less, \
                 {:.3} of the maximum served",
                served as f64 / (64.0 * 1200.0)
            );
            eprintln!("{got}");
            assert!(low <= 20, "{got}");
        }
    }

    #[test]
    fn an_endpoint_that_refuses_every_export_keeps_the_limit() {
        // A 404 for a wrong path, say: such answers are not about load, and neither move the
        // limit nor give a measure of the base a round trip (a rule that kept half the limit
        // where half served as many healthy answers as the whole, none, took it down to 1).
        let mut now = Instant::now();
        let mut c = Controller::new(config(64), now);
        let rtt = Duration::from_millis(10);
        drive(&mut c, &mut now, 600, rtt, Signal::Healthy);
        assert_eq!(c.limit(), 64);
        let limits = drive(&mut c, &mut now, 6_000, rtt, Signal::Neutral);
        let lowest = limits.iter().min().unwrap();
        assert!(*lowest >= 32, "down to {lowest}");
        assert_eq!(limits.last(), Some(&64));
    }

    #[test]
    fn an_overload_during_a_measure_of_the_base_halves_the_limit_once() {
        let mut now = Instant::now();
        let mut c = Controller::new(config(64), now);
        let rtt = Duration::from_millis(10);
        // Healthy round trips until a measure of the base halves the limit, amid the answers
        // of one round.
        for _ in 0..10_000 {
            let before = c.limit();
            let (n, sent) = start_round(&mut c, &mut now, rtt);
            for answered in 1..=n {
                c.answered(now, sent, Signal::Healthy);
                if c.base_probe.is_none() {
                    continue;
                }
                let halved = c.limit();
                assert_eq!(halved, before / 2);
                // Two of the requests out before the measure meet an overload: the measure's
                // halving was the cut for them.
                c.answered(now, sent, Signal::Overloaded);
                c.answered(now, sent, Signal::Overloaded);
                assert_eq!(c.limit(), halved, "halved again");
                assert!(
                    c.base_probe.is_none(),
                    "the measure would put the limit back"
                );
                for _ in answered + 2..n {
                    c.answered(now, sent, Signal::Healthy);
                }
                // One started since then halves it.
                c.started(now);
                c.answered(now + rtt, now, Signal::Overloaded);
                assert_eq!(c.limit(), halved / 2);
                return;
            }
        }
        panic!("no measure of the base began");
    }

    /// What a simulated endpoint does with a request at some moment of a run.
    #[derive(Debug, Clone, Copy)]
    enum Endpoint {
        /// A token bucket: `per_second` requests a second, `burst` at once; 429 above that.
        Limit { per_second: f64, burst: f64 },
        /// Every request answered 429 (a quota window, an outage answered 429).
        RefusesAll,
        /// A fixed window: `limit` requests in each `seconds` from the run's start, 429s
        /// saying the rest of the window, rounded up to whole seconds, as `Retry-After`.
        Window { limit: u64, seconds: f64 },
        /// Every request accepted (but for stray 429s).
        Unlimited,
    }

    /// A run of the controller against a simulated endpoint, driven as the delivery loop
    /// drives it, with always more exports waiting than it may send.
    struct Simulation {
        rtt: Duration,
        max_concurrency: usize,
        /// The share of answers refused 429 at random, whatever the rate.
        stray_429s: f64,
        /// The share of answers that are 503s at random, whatever the load.
        stray_503s: f64,
        seed: u64,
    }

    /// Accepted and refused requests in one second of a run.
    #[derive(Debug, Clone, Copy, Default)]
    struct Second {
        accepted: u64,
        refused: u64,
    }

    impl Simulation {
        fn at(rtt: Duration) -> Simulation {
            Simulation {
                rtt,
                max_concurrency: 64,
                stray_429s: 0.0,
                stray_503s: 0.0,
                seed: 0,
            }
        }

        /// Runs `seconds`, asking `endpoint` what the endpoint does at each moment (seconds
        /// since the start), and returns what was accepted and refused in each second.
        fn run(&self, seconds: u64, endpoint: impl Fn(f64) -> Endpoint) -> Vec<Second> {
            self.run_to_the_end(seconds, endpoint).0
        }

        /// [`Self::run`], and the controller as the run left it.
        fn run_to_the_end(
            &self,
            seconds: u64,
            endpoint: impl Fn(f64) -> Endpoint,
        ) -> (Vec<Second>, Controller) {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
            let step = (self.rtt / 3).min(Duration::from_millis(1));
            let start = Instant::now();
            let mut c = Controller::new(config(self.max_concurrency), start);
            let mut now = start;
            // An endpoint idle until now has its whole burst to give.
            let mut tokens = match endpoint(0.0) {
                Endpoint::Limit { burst, .. } => burst,
                _ => 0.0,
            };
            let mut in_flight = std::collections::VecDeque::new();
            let mut tally = vec![Second::default(); seconds as usize];
            // The current window's number, and the requests it took.
            let mut window = (u64::MAX, 0u64);
            while now < start + Duration::from_secs(seconds) {
                let elapsed = (now - start).as_secs_f64();
                let answering = endpoint(elapsed);
                if let Endpoint::Limit { per_second, burst } = answering {
                    tokens = (tokens + per_second * step.as_secs_f64()).min(burst);
                }
                while let Some(&sent) = in_flight.front() {
                    if sent + self.rtt > now {
                        break;
                    }
                    in_flight.pop_front();
                    if rng.gen_bool(self.stray_503s) {
                        tally[elapsed as usize].refused += 1;
                        c.answered(now, sent, Signal::Overloaded);
                        continue;
                    }
                    let accepted = !rng.gen_bool(self.stray_429s)
                        && match answering {
                            Endpoint::Limit { .. } if tokens >= 1.0 => {
                                tokens -= 1.0;
                                true
                            }
                            Endpoint::Window { limit, seconds } => {
                                let number = (elapsed / seconds) as u64;
                                if window.0 != number {
                                    window = (number, 0);
                                }
                                window.1 += 1;
                                window.1 <= limit
                            }
                            Endpoint::Limit { .. } | Endpoint::RefusesAll => false,
                            Endpoint::Unlimited => true,
                        };
                    let second = &mut tally[elapsed as usize];
                    if accepted {
                        second.accepted += 1;
                        c.answered(now, sent, Signal::Healthy);
                    } else {
                        second.refused += 1;
                        // As the receiver: a second, or the rest of a fixed window.
                        let wait = match answering {
                            Endpoint::Window { seconds, .. } => {
                                (seconds - elapsed % seconds).ceil().max(1.0)
                            }
                            _ => 1.0,
                        };
                        c.heard_429(now, sent, Some(Duration::from_secs_f64(wait)));
                        c.answered(now, sent, Signal::RateLimited);
                    }
                }
                for _ in 0..c.permits(now, usize::MAX) {
                    c.started(now);
                    in_flight.push_back(now);
                }
                now += step;
            }
            (tally, c)
        }
    }

    /// Accepted requests a second and the share refused over `seconds`.
    fn summed(seconds: &[Second]) -> (f64, f64) {
        let accepted: u64 = seconds.iter().map(|s| s.accepted).sum();
        let refused: u64 = seconds.iter().map(|s| s.refused).sum();
        (
            accepted as f64 / seconds.len().max(1) as f64,
            refused as f64 / (accepted + refused).max(1) as f64,
        )
    }

    /// A token bucket endpoint: `limit` requests a second, `burst` at once; answers take
    /// 300 µs. Returns (accepted per second, share refused) over `seconds`.
    fn against_token_bucket(limit: f64, burst: f64, seconds: u64) -> (f64, f64) {
        let simulation = Simulation::at(Duration::from_micros(300));
        summed(&simulation.run(seconds, |_| Endpoint::Limit {
            per_second: limit,
            burst,
        }))
    }

    #[test]
    fn the_last_second_counts_the_successes_of_the_last_second_alone() {
        let start = Instant::now();
        let mut last = LastSecond::default();
        for ms in [0, 3, 250, 900, 990] {
            last.record(start + Duration::from_millis(ms));
        }
        assert_eq!(last.count(start + Duration::from_millis(990)), 5);
        // The first slice (0 and 3 ms) is over a second old.
        assert_eq!(last.count(start + Duration::from_millis(1_005)), 3);
        assert_eq!(last.count(start + Duration::from_millis(1_950)), 1);
        assert_eq!(last.count(start + Duration::from_millis(3_000)), 0);
    }

    #[test]
    fn a_window_of_a_second_gets_most_of_its_limit() {
        // 200 requests in each second from the run's start, 429s saying to retry in a second:
        // every answer at a second's end is refused, and halving the cap at each such end got
        // 0.73 of the limit (answers after 300 µs; here 0.86 and 0.88). Minute 2.
        for rtt in [Duration::from_micros(300), Duration::from_millis(50)] {
            let run = Simulation::at(rtt).run(120, |_| Endpoint::Window {
                limit: 200,
                seconds: 1.0,
            });
            let (rate, refused) = summed(&run[60..]);
            let share = rate / 200.0;
            assert!(
                share >= 0.8 && refused <= 0.1,
                "answers after {rtt:?}: {share:.2} of the limit, {:.1}% refused",
                refused * 100.0
            );
        }
    }

    #[test]
    fn a_fixed_window_whose_429s_count_down_is_waited_for() {
        // 1,000 requests a minute and 100 each 10 s, 429s counting down to the window's end:
        // once told apart, requests wait for the window's end rather than collect 429s (the
        // share refused was 13.1-13.8% and 15.5-18.9% without). Minutes 2 to 5.
        for (limit, seconds, at_most) in [(1_000, 60.0, 0.08), (100, 10.0, 0.15)] {
            for rtt in [Duration::from_micros(300), Duration::from_millis(50)] {
                let run = Simulation::at(rtt).run(300, |_| Endpoint::Window { limit, seconds });
                let (rate, refused) = summed(&run[60..]);
                let share = rate / (limit as f64 / seconds);
                assert!(
                    share >= 0.95 && refused <= at_most,
                    "{limit} per {seconds} s, answers after {rtt:?}: {share:.2} of the limit, {:.1}% refused",
                    refused * 100.0
                );
            }
        }
    }

    #[test]
    fn stray_429s_cost_little_of_the_rate() {
        // An endpoint with no rate limit that answers 4% of requests 429 at random (clusters
        // included) still gets nearly the rate of one that answers every request well; several
        // seeds, 2 s each.
        for seed in 0..3u64 {
            let run = |stray_429s| {
                let simulation = Simulation {
                    stray_429s,
                    seed,
                    ..Simulation::at(Duration::from_micros(300))
                };
                summed(&simulation.run(2, |_| Endpoint::Unlimited)).0
            };
            let (healthy, flaky) = (run(0.0), run(0.04));
            assert!(
                flaky >= 0.9 * healthy,
                "seed {seed}: {flaky:.0}/s with stray 429s vs {healthy:.0}/s without"
            );
        }
    }

    #[test]
    fn overloads_are_strays_when_they_come_at_the_same_share_at_limits_apart() {
        // (answers, overloads) under limits 4–7, 8–15 and 16–31; the limit; the share learnt.
        type Buckets = [(u32, u32); 3];
        let rows: [(Buckets, usize, f64); 12] = [
            // 1% at random.
            ([(400, 4), (600, 6), (0, 0)], 12, 0.01),
            // An endpoint of about 10 slots: nothing refused under 8.
            ([(400, 0), (600, 30), (0, 0)], 12, 0.0),
            // A few refused under 8, many more over: not the same share.
            ([(400, 3), (600, 40), (0, 0)], 12, 0.0),
            // 1% and 5%: each is judged against the others, not against a share the larger
            // bucket sets.
            ([(300, 3), (1000, 50), (0, 0)], 12, 0.0),
            // Overloads seen in one bucket only.
            ([(400, 2), (600, 6), (0, 0)], 12, 0.0),
            // Too few answers to say.
            ([(90, 4), (600, 6), (0, 0)], 12, 0.0),
            // Failing a fifth at any limit: in trouble, not flaky.
            ([(300, 60), (600, 120), (0, 0)], 12, 0.0),
            // 1% at random under 16, slots refusing more over them: strays under 16...
            ([(400, 4), (600, 6), (300, 40)], 12, 0.01),
            // ...but not at 16 and over...
            ([(400, 4), (600, 6), (300, 40)], 17, 0.0),
            // ...nor in a bucket the limit has only just reached, where they are many...
            ([(400, 4), (600, 6), (20, 5)], 17, 0.0),
            // ...but there if they are few.
            ([(400, 4), (600, 6), (60, 1)], 17, 0.01),
            // A bucket not visited for a minute is left out.
            ([(400, 0), (600, 6), (300, 3)], 17, 0.01),
        ];
        let now = Instant::now();
        for (i, (buckets, limit, share)) in rows.into_iter().enumerate() {
            let mut shares = OverloadShares::default();
            shares.buckets[2..5].copy_from_slice(&buckets);
            shares.answered_at = [Some(now); LIMIT_BUCKETS];
            if i == rows.len() - 1 {
                shares.answered_at[2] = Some(now - BUCKET_STALE_AFTER);
            }
            let learnt = shares.stray_share(now, limit);
            assert!(
                (learnt - share).abs() < 1e-9,
                "{buckets:?} at {limit}: {learnt}, not {share}"
            );
        }
    }

    #[test]
    fn stray_503s_cost_little_of_the_rate() {
        // An endpoint that takes any load and fails a share of requests 503 at random: halved
        // for each, once a round trip, the limit stayed about 12 with 1% of them, and the
        // endpoint got 39.7 requests a second of the 211 it takes (answers after 300 ms, 64
        // at most). The second minute.
        for (rtt, stray_503s, seed) in [
            (300, 0.01, 0),
            (300, 0.05, 0),
            (300, 0.1, 0),
            (10, 0.01, 0),
            (300, 0.01, 1),
            (300, 0.05, 1),
            (300, 0.1, 1),
            (300, 0.01, 2),
            (300, 0.05, 2),
            (300, 0.1, 2),
        ] {
            let rtt = Duration::from_millis(rtt);
            let simulation = Simulation {
                stray_503s,
                seed,
                ..Simulation::at(rtt)
            };
            let (rate, _) = summed(&simulation.run(120, |_| Endpoint::Unlimited)[60..]);
            let takes = 64.0 / rtt.as_secs_f64() * (1.0 - stray_503s);
            let got = format!(
                "{:.0}% of 503s after {rtt:?}, seed {seed}: {rate:.1}/s of the {takes:.1} it takes",
                stray_503s * 100.0
            );
            eprintln!("{got}");
            assert!(rate >= 0.85 * takes, "{got}");
        }
    }

    #[test]
    fn a_rate_limited_endpoint_gets_close_to_its_limit_with_few_refusals() {
        // A low limit over a short run (as the socket test has it), then longer runs.
        for (limit, seconds) in [(300.0, 3), (300.0, 20), (5_000.0, 20), (15_000.0, 20)] {
            let (rate, refused) = against_token_bucket(limit, limit / 10.0, seconds);
            eprintln!(
                "limit {limit}, {seconds} s: {rate:.0}/s, {:.1}% refused",
                refused * 100.0
            );
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

    #[test]
    fn a_rate_limit_with_a_small_burst_is_followed_from_the_start() {
        // 429s before 20 successes came: the cap began at 1 a second for want of a measured
        // rate, and took seconds of 5% steps to get back (193 of the first 10 s's 500 in the
        // first case, 271 of 10,000 in the second).
        for (rtt_ms, limit, burst, at_least) in [(50, 50.0, 5.0, 0.9), (1, 1_000.0, 10.0, 0.5)] {
            let run = Simulation::at(Duration::from_millis(rtt_ms)).run(10, |_| Endpoint::Limit {
                per_second: limit,
                burst,
            });
            let (rate, refused) = summed(&run);
            let got = format!(
                "{limit}/s in bursts of {burst}, answers after {rtt_ms} ms: {rate:.1}/s over \
                 the first 10 s, {:.1}% refused",
                refused * 100.0
            );
            eprintln!("{got}");
            assert!(rate >= at_least * limit && refused <= 0.1, "{got}");
        }
    }

    /// An endpoint that serves `knee` requests at once in `flat`, and each one more in
    /// `extra` more (a server whose threads thrash past its cores): what it served a second
    /// from the 20th second of two minutes, of the most it serves (at its knee).
    fn against_a_knee(knee: usize, flat: u64, extra: u64) -> f64 {
        let mut out: Vec<Instant> = Vec::new();
        let run = run_against(120, |now, _| {
            out.retain(|&at| at > now);
            let over = (out.len() + 1).saturating_sub(knee) as u64;
            let at = now + Duration::from_millis(flat + extra * over);
            out.push(at);
            at
        });
        let served = run[20..].iter().map(|s| s.0).sum::<u64>() as f64 / 100.0;
        served / (knee as f64 * 1000.0 / flat as f64)
    }

    #[test]
    fn an_endpoint_slower_past_its_knee_is_kept_near_it() {
        // Round trips over 1.5 times the base stopped growth, but nothing brought a limit
        // already past the knee back (the first one it starts at): 0.43, 0.29 and 0.69 of
        // the most each served.
        for (knee, flat, extra, at_least) in
            [(5, 50, 50, 0.6), (20, 10, 10, 0.5), (3, 100, 100, 0.75)]
        {
            let share = against_a_knee(knee, flat, extra);
            let got = format!(
                "{knee} at once in {flat} ms, each one more {extra} ms more: {share:.2} of the most"
            );
            eprintln!("{got}");
            assert!(share >= at_least, "{got}");
        }
    }

    #[test]
    fn a_low_rate_limit_gets_its_rate_with_few_refusals() {
        // Limits of a few requests a second, a second's worth allowed at once, answers after
        // 50 ms; three minutes, the first left out (the cap is found in it).
        let simulation = Simulation::at(Duration::from_millis(50));
        let short: Vec<String> = [2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
            .into_iter()
            .filter_map(|limit| {
                let seconds = simulation.run(180, |_| Endpoint::Limit {
                    per_second: limit,
                    burst: limit,
                });
                let (rate, refused) = summed(&seconds[60..]);
                let got = format!(
                    "limit {limit}/s: {rate:.2}/s, {:.1}% refused",
                    refused * 100.0
                );
                eprintln!("{got}");
                (rate < 0.95 * limit || refused > 0.04).then_some(got)
            })
            .collect();
        assert!(short.is_empty(), "{short:#?}");
    }

    #[test]
    fn after_a_burst_of_429s_the_cap_climbs_back_to_the_limit_within_20_s_and_stays() {
        // A limited endpoint refuses everything for a while (a quota window ran out, or it
        // answers 429 while it restarts), then takes its old rate again. The burst starts at
        // several points of the cap's steps.
        let simulation = Simulation::at(Duration::from_millis(50));
        let mut slow = Vec::new();
        for limit in [20.0, 100.0, 500.0, 1_000.0] {
            for burst_of_429s in [2.0, 10.0, 60.0] {
                for offset in [0.0, 0.17, 0.43, 0.71] {
                    let (from, back_at) = (30.0 + offset, 30.0 + offset + burst_of_429s);
                    let seconds = simulation.run(back_at as u64 + 60, |t| {
                        if (from..back_at).contains(&t) {
                            Endpoint::RefusesAll
                        } else {
                            Endpoint::Limit {
                                per_second: limit,
                                burst: limit / 10.0,
                            }
                        }
                    });
                    // From the first whole second it is back.
                    let back = &seconds[back_at.ceil() as usize..];
                    let climbed = back.iter().position(|s| s.accepted as f64 >= 0.9 * limit);
                    // And the ten seconds after it: the rate held, few refused.
                    let after = climbed
                        .and_then(|s| back.get(s..s + 10))
                        .unwrap_or_default();
                    let (then, refused) = summed(after);
                    let got = format!(
                        "limit {limit}/s after {burst_of_429s} s of 429s from {from} s: back \
                         to 90% after {climbed:?} s, then {then:.0}/s with {:.1}% refused",
                        refused * 100.0
                    );
                    eprintln!("{got}");
                    if climbed.is_none_or(|s| s > 20) || then < 0.9 * limit || refused > 0.05 {
                        slow.push(got);
                    }
                }
            }
        }
        assert!(slow.is_empty(), "{slow:#?}");
    }

    #[test]
    fn stray_429s_after_a_cut_do_not_hold_the_cap_down() {
        // A few percent of answers are 429 at random throughout. First a limit of 600/s cuts
        // the cap (which sets a ceiling near it), or 2 s of 429s do (which set none); then no
        // limit is left, and the last 20 s of a minute must get about what 64 requests in
        // flight at 50 ms allow without strays.
        let limited = |t: f64| match t {
            t if t < 20.0 => Endpoint::Limit {
                per_second: 600.0,
                burst: 60.0,
            },
            _ => Endpoint::Unlimited,
        };
        let refused_for_a_while = |t: f64| match t {
            t if (18.0..20.0).contains(&t) => Endpoint::RefusesAll,
            _ => Endpoint::Unlimited,
        };
        let mut held_down = Vec::new();
        for (first, endpoint) in [
            ("a limit", &limited as &dyn Fn(f64) -> Endpoint),
            ("a burst of 429s", &refused_for_a_while),
        ] {
            let without = Simulation::at(Duration::from_millis(50));
            let (clean, _) = summed(&without.run(80, endpoint)[60..]);
            for stray_429s in [0.02, 0.04] {
                for seed in 0..3 {
                    let simulation = Simulation {
                        stray_429s,
                        seed,
                        ..without
                    };
                    let (seconds, c) = simulation.run_to_the_end(80, endpoint);
                    let (after, _) = summed(&seconds[60..]);
                    let cap = c.rate_cap.as_ref().unwrap();
                    let got = format!(
                        "{}% stray 429s after {first}, seed {seed}: {after:.0}/s, {clean:.0}/s \
                         without strays; ceiling {:?}, strays expected {:.1}%",
                        stray_429s * 100.0,
                        cap.ceiling,
                        cap.strays.share() * 100.0
                    );
                    eprintln!("{got}");
                    // After the limit the cap has a ceiling, near which strays are told apart
                    // (without that, 4% of strays drove the ceiling down to 330-400/s).
                    let told_apart = cap.ceiling.is_some() && cap.strays.share() > 0.0;
                    if after < 0.9 * clean || (first == "a limit" && !told_apart) {
                        held_down.push(got);
                    }
                }
            }
        }
        assert!(held_down.is_empty(), "{held_down:#?}");
    }

    #[test]
    fn strays_are_429s_that_go_on_at_caps_well_apart() {
        let mut strays = StrayShare::default();
        // Windows after cuts that each stopped just over a limit: their caps lie close, so
        // their 429s are not strays, however many windows there are.
        for cap in [100.0, 98.0, 99.0, 97.0, 96.0, 98.0] {
            strays.after_cut((200, 6), cap);
        }
        assert_eq!(strays.share(), 0.0);
        // The same share at caps 10% apart and more: strays, the least share of the windows.
        let mut strays = StrayShare::default();
        for (refused, cap) in [(8, 100.0), (7, 95.0), (9, 90.0), (8, 85.0), (8, 80.0)] {
            strays.after_cut((200, refused), cap);
        }
        assert_eq!(strays.share(), 7.0 / 200.0);
        // One window under a limit (no 429) clears it.
        strays.after_cut((200, 0), 78.0);
        assert_eq!(strays.share(), 0.0);
        // Fewer than five windows, a window of fewer answers than a step, or one in which
        // everything was refused, say nothing.
        let mut strays = StrayShare::default();
        for (answered, refused, cap) in [(200, 8, 100.0), (19, 1, 90.0), (200, 200, 80.0)] {
            strays.after_cut((answered, refused), cap);
        }
        for cap in [70.0, 60.0, 50.0] {
            strays.after_cut((200, 8), cap);
        }
        assert_eq!(strays.windows.len(), 4);
        assert_eq!(strays.share(), 0.0);
    }

    #[test]
    fn a_lifted_limit_is_followed() {
        // The limit (a second's burst) goes up tenfold after a minute; answers after 50 ms.
        let simulation = Simulation::at(Duration::from_millis(50));
        let mut slow = Vec::new();
        for (from, to, within) in [(100.0, 1_000.0, 15), (20.0, 200.0, 25), (10.0, 100.0, 50)] {
            let seconds = simulation.run(150, |t| {
                let per_second = if t < 60.0 { from } else { to };
                Endpoint::Limit {
                    per_second,
                    burst: per_second,
                }
            });
            let reached = seconds[60..]
                .iter()
                .position(|s| s.accepted as f64 >= 0.9 * to);
            let got = format!("limit {from}/s lifted to {to}/s: 90% of it after {reached:?} s");
            eprintln!("{got}");
            if reached.is_none_or(|s| s > within) {
                slow.push(got);
            }
        }
        assert!(slow.is_empty(), "{slow:#?}");
    }

    #[test]
    fn the_accepted_rate_is_not_measured_across_a_pause() {
        // 2 s at 1,000 a second, 5 s with nothing to send, then 300 a second.
        let start = Instant::now();
        let mut accepted = AcceptedRate::default();
        for i in 0..2_000 {
            accepted.record(start + Duration::from_millis(i));
        }
        let rate = accepted.per_second().unwrap();
        assert!((990.0..=1_010.0).contains(&rate), "{rate}");
        let again = start + Duration::from_secs(7);
        let at = |i: u32| again + Duration::from_secs(1) * i / 300;
        for i in 0..7 {
            accepted.record(at(i));
        }
        assert_eq!(
            accepted.per_second(),
            None,
            "too few since the pause to say"
        );
        for i in 7..40 {
            accepted.record(at(i));
        }
        let rate = accepted.per_second().unwrap();
        assert!((290.0..=310.0).contains(&rate), "{rate}");
        // While nothing more is accepted, the rate is that of before only for a few gaps.
        let last = at(39);
        assert_eq!(
            accepted.per_second_still(last + Duration::from_millis(50)),
            Some(rate)
        );
        assert_eq!(
            accepted.per_second_still(last + Duration::from_millis(200)),
            None
        );
    }

    #[test]
    fn answers_in_bunches_a_round_trip_apart_are_no_pause() {
        // 64 requests in flight, answered together every 500 ms: 128 a second.
        let start = Instant::now();
        let mut accepted = AcceptedRate::default();
        accepted.set_round_trip(Duration::from_millis(500));
        for bunch in 0..6u32 {
            let at = start + Duration::from_millis(500) * bunch;
            for _ in 0..64 {
                accepted.record(at);
            }
            if bunch >= 2 {
                let rate = accepted.per_second_still(at).unwrap();
                assert!((120.0..=136.0).contains(&rate), "bunch {bunch}: {rate}");
            }
        }
    }

    #[test]
    fn a_request_refused_for_what_it_holds_passed_the_rate_limit_too() {
        // 100 answers a second, every other one a 4xx: the endpoint accepted 100 a second.
        let start = Instant::now();
        let mut c = Controller::new(config(64), start);
        for i in 0..40 {
            let at = start + Duration::from_millis(10 * i);
            c.started(at);
            let signal = if i % 2 == 0 {
                Signal::Healthy
            } else {
                Signal::Neutral
            };
            c.answered(at, at, signal);
        }
        let rate = c.accepted.per_second().unwrap();
        assert!((95.0..=105.0).contains(&rate), "{rate}");
    }

    #[test]
    fn failures_are_not_answers_without_a_429() {
        // Every answer from the endpoint is a 429, among many requests whose token could not
        // be had: a rate limit all the same.
        let now = Instant::now();
        let mut c = Controller::new(config(64), now);
        for _ in 0..25 {
            for signal in std::iter::once(Signal::RateLimited).chain([Signal::Failed; 12]) {
                c.started(now);
                c.answered(now, now, signal);
            }
        }
        assert!(
            c.rate_cap().is_some(),
            "a rate limit, whatever failed besides"
        );
    }

    #[test]
    fn answers_that_all_come_at_once_measure_no_rate() {
        // 64 requests answered in one instant, then 429s: the successes span no time, so they
        // say nothing of a rate (a rate of 0 would make the gap between them endless, which
        // no duration holds).
        let now = Instant::now();
        let mut c = Controller::new(config(64), now);
        for _ in 0..64 {
            c.started(now);
        }
        for _ in 0..64 {
            c.answered(now, now, Signal::Healthy);
        }
        let later = now + Duration::from_millis(200);
        for _ in 0..200 {
            c.started(later);
            c.answered(later, later, Signal::RateLimited);
        }
        assert_eq!(c.rate_cap(), Some(MIN_RATE), "capped, at the least rate");
        assert_eq!(c.accepted.per_second(), None);
    }
}
