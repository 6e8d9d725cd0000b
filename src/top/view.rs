//! Two snapshots of a running agent turned into what `outpost top` shows: rates per second
//! from counter differences, latency quantiles from histogram buckets, the gauges, and the
//! recent history of the outbox for sparklines. Pure: no clock, no I/O.

use std::collections::VecDeque;
use std::fmt::Write;

use serde_json::Value;

use super::samples::Samples;
use crate::metrics::{DeliveryOutcome, RetryCause, UPDATE_RESULTS};
use crate::profile::Reason;

/// The histogram of delivery round trips in `/metrics`.
pub const LATENCY: &str = "outpost_delivery_latency_seconds";

/// What the agent answered to the admin `snapshot` request, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// When it was taken, in seconds on `top`'s own monotonic clock.
    pub at_s: f64,
    pub metrics: Samples,
    /// `outbox stats` with the delivery state.
    pub stats: Value,
    pub token_expires_in_s: Option<u64>,
    /// Which run of the agent answered: its counters start again from zero with each.
    /// `None` from an agent of an earlier build.
    pub agent_run: Option<String>,
}

impl Snapshot {
    /// Whether another run of the agent answered `previous`: no rate spans a restart.
    pub fn restarted_since(&self, previous: &Snapshot) -> bool {
        matches!((&previous.agent_run, &self.agent_run), (Some(a), Some(b)) if a != b)
    }

    pub fn from_answer(at_s: f64, answer: &Value) -> Result<Snapshot, String> {
        let text = answer["metrics"]
            .as_str()
            .ok_or("the agent's answer has no metrics")?;
        Ok(Snapshot {
            at_s,
            metrics: Samples::parse(text)?,
            stats: answer["stats"].clone(),
            token_expires_in_s: answer["token_expires_in_s"].as_u64(),
            agent_run: answer["agent_run"].as_str().map(str::to_owned),
        })
    }
}

/// A counter's increase per second between two readings. A counter that went down belongs to
/// an agent that restarted in between: its whole current value counts as the increase.
pub fn rate(previous: f64, current: f64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    let increase = if current >= previous {
        current - previous
    } else {
        current
    };
    increase / seconds
}

/// The increase of each cumulative bucket between two readings (the whole current counts after
/// a restart, as in [`rate`]).
pub fn bucket_increase(previous: &[(f64, f64)], current: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let total = |b: &[(f64, f64)]| b.last().map_or(0.0, |l| l.1);
    let restarted = total(current) < total(previous);
    current
        .iter()
        .map(|&(le, count)| {
            let before = previous.iter().find(|(l, _)| *l == le).map_or(0.0, |b| b.1);
            (le, if restarted { count } else { count - before })
        })
        .collect()
}

/// The `q` quantile of cumulative buckets `(le, count)` as Prometheus' `histogram_quantile`
/// estimates it: linear within the bucket that holds the rank; the highest finite bound when it
/// falls in `+Inf`. `None` without observations.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank && count > lower.1 {
            if le.is_infinite() {
                return Some(lower.0);
            }
            return Some(lower.0 + (le - lower.0) * (rank - lower.1) / (count - lower.1));
        }
        lower = (le, count);
    }
    Some(lower.0)
}

/// One line of a family: its label value, per second over the interval, and its total.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    pub label: &'static str,
    pub per_s: f64,
    pub total: u64,
}

/// The figures of `name{label=…}` for each of `values`.
pub fn figures(
    previous: &Snapshot,
    current: &Snapshot,
    name: &str,
    label: &str,
    values: &[&'static str],
) -> Vec<Figure> {
    let seconds = current.at_s - previous.at_s;
    values
        .iter()
        .map(|value| {
            let now = current.metrics.labelled(name, label, value);
            Figure {
                label: value,
                per_s: rate(previous.metrics.labelled(name, label, value), now, seconds),
                total: now as u64,
            }
        })
        .collect()
}

/// How the destination's credentials are set up (from the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    None,
    Bearer,
    OAuth2,
}

/// The token, as `top` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    NoAuth,
    Static,
    /// OAuth 2.0, no token held (none fetched yet, or dropped after a 401/403).
    NotHeld,
    ExpiresIn(u64),
}

impl TokenState {
    pub fn describe(self) -> String {
        match self {
            TokenState::NoAuth => "no auth".into(),
            TokenState::Static => "static bearer token".into(),
            TokenState::NotHeld => "none held (fetched when a request needs one)".into(),
            TokenState::ExpiresIn(0) => "expired (refreshed by the next request)".into(),
            TokenState::ExpiresIn(s) => format!("expires in {}", duration(s)),
        }
    }
}

/// The last readings of the outbox, for sparklines: one point per snapshot.
#[derive(Debug, Clone)]
pub struct History {
    capacity: usize,
    pending: VecDeque<u64>,
    waited: VecDeque<u64>,
}

impl History {
    pub fn new(capacity: usize) -> History {
        History {
            capacity: capacity.max(1),
            pending: VecDeque::new(),
            waited: VecDeque::new(),
        }
    }

    pub fn push(&mut self, snapshot: &Snapshot) {
        if self.pending.len() == self.capacity {
            self.pending.pop_front();
            self.waited.pop_front();
        }
        self.pending
            .push_back(snapshot.stats["pending"].as_u64().unwrap_or(0));
        self.waited.push_back(
            snapshot.stats["oldest_pending_waited_s"]
                .as_u64()
                .unwrap_or(0),
        );
    }
}

/// Everything `top` shows, computed from two snapshots.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub store: String,
    pub interval_s: f64,
    pub run_time_s: u64,
    pub updates: Vec<Figure>,
    pub exports: Vec<Figure>,
    pub deliveries: Vec<Figure>,
    pub retries: Vec<Figure>,
    pub token_fetches: Figure,
    /// p50 and p99 over the interval, then since the agent started.
    pub latency_recent: (Option<f64>, Option<f64>),
    pub latency_since_start: (Option<f64>, Option<f64>),
    pub concurrency_limit: i64,
    pub in_flight: i64,
    pub rate_cap: i64,
    /// Requests left in the endpoint's advertised window; `None` when none was advertised.
    pub quota_left: Option<i64>,
    pub retry_waiting: i64,
    pub destination_down: bool,
    /// Since when delivery is paused (`outpost delivery pause`), while it is.
    pub paused_since: Option<String>,
    pub pending: u64,
    pub dead: u64,
    /// Profiles stored (`None` while the store does not know: counted at its next open).
    pub profiles: Option<u64>,
    pub oldest_waited_s: Option<u64>,
    pub pending_history: Vec<u64>,
    pub waited_history: Vec<u64>,
    pub token: TokenState,
    pub clock_jumps: String,
    /// Messages waiting in the NATS stream per owned partition, when a source runs.
    pub source_lag: Option<String>,
    /// Shown above everything when set (e.g. the agent stopped answering).
    pub notice: Option<String>,
}

/// The view of `current`, with rates since `previous`.
pub fn view(
    previous: &Snapshot,
    current: &Snapshot,
    history: &History,
    auth: AuthKind,
    store: &str,
) -> View {
    let restarted = current.restarted_since(previous);
    let previous = if restarted { current } else { previous };
    let m = &current.metrics;
    let gauge = |name: &str| m.value(name) as i64;
    let reasons: Vec<&'static str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
    let outcomes: Vec<&'static str> = DeliveryOutcome::ALL.iter().map(|o| o.label()).collect();
    let causes: Vec<&'static str> = RetryCause::ALL.iter().map(|c| c.label()).collect();
    let seconds = current.at_s - previous.at_s;
    let all = m.buckets(LATENCY);
    let recent = bucket_increase(&previous.metrics.buckets(LATENCY), &all);
    let fetches = m.value("outpost_token_fetches_total");
    View {
        store: store.to_owned(),
        interval_s: seconds,
        run_time_s: current.stats["run_time_s"].as_u64().unwrap_or(0),
        updates: figures(
            previous,
            current,
            "outpost_updates_total",
            "result",
            &UPDATE_RESULTS,
        ),
        exports: figures(
            previous,
            current,
            "outpost_exports_total",
            "reason",
            &reasons,
        ),
        deliveries: figures(
            previous,
            current,
            "outpost_deliveries_total",
            "outcome",
            &outcomes,
        ),
        retries: figures(
            previous,
            current,
            "outpost_delivery_retries_total",
            "cause",
            &causes,
        ),
        token_fetches: Figure {
            label: "requests",
            per_s: rate(
                previous.metrics.value("outpost_token_fetches_total"),
                fetches,
                seconds,
            ),
            total: fetches as u64,
        },
        latency_recent: (quantile(0.5, &recent), quantile(0.99, &recent)),
        latency_since_start: (quantile(0.5, &all), quantile(0.99, &all)),
        concurrency_limit: gauge("outpost_delivery_concurrency_limit"),
        in_flight: gauge("outpost_delivery_in_flight"),
        rate_cap: gauge("outpost_delivery_rate_cap"),
        // Absent from agents before the quota was read: none advertised.
        quota_left: m
            .get("outpost_delivery_quota_left", &[])
            .map(|left| left as i64)
            .filter(|&left| left >= 0),
        retry_waiting: gauge("outpost_delivery_retry_waiting"),
        destination_down: gauge("outpost_destination_down") == 1,
        paused_since: (current.stats["delivery_paused"] == true).then(|| {
            current.stats["delivery_paused_since"]
                .as_str()
                .unwrap_or("-")
                .to_owned()
        }),
        pending: gauge("outpost_outbox_pending").max(0) as u64,
        dead: gauge("outpost_outbox_dead").max(0) as u64,
        profiles: current.stats["profiles"].as_u64(),
        oldest_waited_s: current.stats["oldest_pending_waited_s"].as_u64(),
        pending_history: history.pending.iter().copied().collect(),
        waited_history: history.waited.iter().copied().collect(),
        token: match (auth, current.token_expires_in_s) {
            (AuthKind::None, _) => TokenState::NoAuth,
            (AuthKind::Bearer, _) => TokenState::Static,
            (AuthKind::OAuth2, None) => TokenState::NotHeld,
            (AuthKind::OAuth2, Some(s)) => TokenState::ExpiresIn(s),
        },
        clock_jumps: clock_jumps(&current.stats),
        source_lag: source_lag(m),
        notice: restarted.then(|| {
            "the agent restarted since the last snapshot: rates from the next one on".into()
        }),
    }
}

/// The number of profiles stored, or "-" while the store does not know it.
pub(super) fn profiles(count: Option<u64>) -> String {
    count.map_or("-".into(), |n| n.to_string())
}

/// "1,240 waiting (connected): 0:12 1:0 …" from `outpost_source_pending{partition}`, or `None`
/// without a NATS source.
fn source_lag(m: &Samples) -> Option<String> {
    let mut lag: Vec<(u32, u64)> =
        m.0.iter()
            .filter(|s| s.name == "outpost_source_pending")
            .filter_map(|s| {
                let (_, partition) = s.labels.iter().find(|(k, _)| k == "partition")?;
                Some((partition.parse().ok()?, s.value.max(0.0) as u64))
            })
            .collect();
    if lag.is_empty() {
        return None;
    }
    lag.sort_unstable();
    let total: u64 = lag.iter().map(|(_, n)| n).sum();
    let state = if m.value("outpost_source_connected") == 1.0 {
        "connected"
    } else {
        "disconnected"
    };
    let each: Vec<String> = lag.iter().map(|(p, n)| format!("{p}:{n}")).collect();
    Some(format!("{total} waiting ({state}): {}", each.join(" ")))
}

/// "none noticed", or how many and the last one.
fn clock_jumps(stats: &Value) -> String {
    let jumps = stats["clock_jumps"].as_u64().unwrap_or(0);
    match (jumps, stats["last_clock_jump"]["by_s"].as_i64()) {
        (0, _) | (_, None) => "none noticed".to_owned(),
        (n, Some(by_s)) => format!(
            "{n}, last {} at {}",
            crate::clock::describe_jump(by_s * 1000),
            stats["last_clock_jump"]["noticed_at"]
                .as_str()
                .unwrap_or("-")
        ),
    }
}

/// A rate for people: one decimal below 1,000/s, whole numbers above.
pub fn per_second(rate: f64) -> String {
    if rate < 1000.0 {
        format!("{rate:.1}")
    } else {
        format!("{rate:.0}")
    }
}

/// A latency for people: "-" without observations, else ms below a second.
pub fn latency(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s < 0.01 => format!("{:.2} ms", s * 1000.0),
        Some(s) if s < 1.0 => format!("{:.1} ms", s * 1000.0),
        Some(s) => format!("{s:.2} s"),
    }
}

/// A duration for people: "45s", "52m 10s", "3h 2m", "2d 3h".
pub fn duration(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

/// The rate cap for people, and what the endpoint's advertised window has left.
pub fn rate_cap(cap: i64, quota_left: Option<i64>) -> String {
    let cap = if cap > 0 {
        format!("{cap}/s (after 429s)")
    } else {
        "none".into()
    };
    match quota_left {
        Some(left) => format!("{cap}; quota {left} left"),
        None => cap,
    }
}

pub fn destination(down: bool) -> &'static str {
    if down {
        "down: probing one request at a time"
    } else {
        "up"
    }
}

/// Whether delivery is paused, for people.
pub fn paused(since: Option<&str>) -> String {
    match since {
        Some(since) => format!("paused since {since} (`outpost delivery resume`)"),
        None => "no".into(),
    }
}

/// The plain-text frame of `outpost top --once`: one figure a line, the group repeated on
/// each line so that scripts can `grep '^deliveries *delivered'`.
pub fn plain(view: &View) -> String {
    let mut out = String::new();
    let mut line = |group: &str, key: &str, value: String| {
        let _ = writeln!(out, "{group:<11} {key:<18} {value}");
    };
    let header = format!(
        "outpost top: {}, run time {}, rates over the last {:.1} s",
        view.store,
        duration(view.run_time_s),
        view.interval_s
    );
    let mut text = header + "\n";
    if let Some(notice) = &view.notice {
        text.push_str(notice);
        text.push('\n');
    }
    let _ = writeln!(text, "{:<30} {:>10} {:>12}", "", "per s", "total");
    for (group, figures) in [
        ("updates", &view.updates),
        ("exports", &view.exports),
        ("deliveries", &view.deliveries),
        ("retries", &view.retries),
    ] {
        for f in figures.iter() {
            let _ = writeln!(
                text,
                "{group:<11} {:<18} {:>10} {:>12}",
                f.label,
                per_second(f.per_s),
                f.total
            );
        }
    }
    let _ = writeln!(
        text,
        "{:<11} {:<18} {:>10} {:>12}",
        "token",
        "requests",
        per_second(view.token_fetches.per_s),
        view.token_fetches.total
    );
    for (name, recent, since) in [
        ("p50", view.latency_recent.0, view.latency_since_start.0),
        ("p99", view.latency_recent.1, view.latency_since_start.1),
    ] {
        line(
            "latency",
            name,
            format!(
                "{} over the interval, {} since start",
                latency(recent),
                latency(since)
            ),
        );
    }
    line(
        "delivery",
        "concurrency limit",
        view.concurrency_limit.to_string(),
    );
    line("delivery", "in flight", view.in_flight.to_string());
    line(
        "delivery",
        "rate cap",
        rate_cap(view.rate_cap, view.quota_left),
    );
    line(
        "delivery",
        "waiting for retry",
        view.retry_waiting.to_string(),
    );
    line(
        "delivery",
        "destination",
        destination(view.destination_down).into(),
    );
    line("delivery", "paused", paused(view.paused_since.as_deref()));
    line("token", "lifetime", view.token.describe());
    line("outbox", "pending", view.pending.to_string());
    line("outbox", "dead", view.dead.to_string());
    line(
        "outbox",
        "oldest waited",
        view.oldest_waited_s
            .map_or("- (none pending)".into(), |s| format!("{s} s")),
    );
    line("store", "profiles", profiles(view.profiles));
    line("clock", "wall-clock jumps", view.clock_jumps.clone());
    if let Some(lag) = &view.source_lag {
        line("source", "NATS lag", lag.clone());
    }
    text + &out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    type Buckets<'a> = &'a [(f64, f64)];

    fn snapshot(at_s: f64, metrics: &str, stats: Value) -> Snapshot {
        Snapshot::from_answer(
            at_s,
            &json!({"metrics": metrics, "stats": stats, "token_expires_in_s": 125}),
        )
        .unwrap()
    }

    #[test]
    fn rate_table() {
        // previous, current, seconds, per second
        let table = [
            (0.0, 10.0, 1.0, 10.0),
            (10.0, 30.0, 2.0, 10.0),
            (10.0, 10.0, 1.0, 0.0),
            (100.0, 5.0, 1.0, 5.0), // the agent restarted: its counters began again
            (0.0, 10.0, 0.0, 0.0),
            (0.0, 10.0, -1.0, 0.0),
            (3.0, 4.0, 0.5, 2.0),
        ];
        for (previous, current, seconds, expected) in table {
            assert_eq!(
                rate(previous, current, seconds),
                expected,
                "{previous} -> {current} in {seconds} s"
            );
        }
    }

    #[test]
    fn quantile_table() {
        let inf = f64::INFINITY;
        let table: &[(f64, Buckets, Option<f64>)] = &[
            (0.5, &[], None),
            (0.5, &[(0.001, 0.0), (inf, 0.0)], None),
            // All in the first bucket: interpolated from 0.
            (
                0.5,
                &[(0.001, 10.0), (0.002, 10.0), (inf, 10.0)],
                Some(0.0005),
            ),
            (
                1.0,
                &[(0.001, 10.0), (0.002, 10.0), (inf, 10.0)],
                Some(0.001),
            ),
            // Half below 1 ms, half in (1, 2] ms: the p50 rank is the first bucket's edge.
            (
                0.5,
                &[(0.001, 5.0), (0.002, 10.0), (inf, 10.0)],
                Some(0.001),
            ),
            (
                0.75,
                &[(0.001, 5.0), (0.002, 10.0), (inf, 10.0)],
                Some(0.0015),
            ),
            // In +Inf: the highest finite bound.
            (
                0.99,
                &[(0.001, 5.0), (0.002, 6.0), (inf, 10.0)],
                Some(0.002),
            ),
            (1.5, &[(0.001, 5.0), (inf, 5.0)], None),
        ];
        for (q, buckets, expected) in table {
            let got = quantile(*q, buckets);
            match (got, expected) {
                (Some(g), Some(e)) => assert!((g - e).abs() < 1e-12, "q{q} {buckets:?}: {g}"),
                _ => assert_eq!(got, *expected, "q{q} {buckets:?}"),
            }
        }
    }

    #[test]
    fn bucket_increase_table() {
        let inf = f64::INFINITY;
        let table: &[(Buckets, Buckets, Buckets)] = &[
            (
                &[(0.001, 2.0), (inf, 3.0)],
                &[(0.001, 5.0), (inf, 9.0)],
                &[(0.001, 3.0), (inf, 6.0)],
            ),
            (
                &[],
                &[(0.001, 1.0), (inf, 1.0)],
                &[(0.001, 1.0), (inf, 1.0)],
            ),
            // Restarted: the current counts whole.
            (
                &[(0.001, 50.0), (inf, 60.0)],
                &[(0.001, 1.0), (inf, 2.0)],
                &[(0.001, 1.0), (inf, 2.0)],
            ),
        ];
        for (previous, current, expected) in table {
            assert_eq!(bucket_increase(previous, current), expected.to_vec());
        }
    }

    #[test]
    fn format_table() {
        assert_eq!(per_second(0.0), "0.0");
        assert_eq!(per_second(12.345), "12.3");
        assert_eq!(per_second(32_812.4), "32812");
        assert_eq!(latency(None), "-");
        assert_eq!(latency(Some(0.0005)), "0.50 ms");
        assert_eq!(latency(Some(0.25)), "250.0 ms");
        assert_eq!(latency(Some(2.5)), "2.50 s");
        for (s, text) in [
            (0, "0s"),
            (59, "59s"),
            (3130, "52m 10s"),
            (10_920, "3h 2m"),
            (183_600, "2d 3h"),
        ] {
            assert_eq!(duration(s), text);
        }
    }

    #[test]
    fn no_rate_spans_a_restart_of_the_agent() {
        let of_run = |at_s: f64, delivered: u64, run: Option<&str>| {
            let metrics =
                format!("outpost_deliveries_total{{outcome=\"delivered\"}} {delivered}\n");
            let mut answer = json!({"metrics": metrics, "stats": {}});
            if let Some(run) = run {
                answer["agent_run"] = run.into();
            }
            Snapshot::from_answer(at_s, &answer).unwrap()
        };
        let history = History::new(2);
        let delivered = |previous: &Snapshot, current: &Snapshot| {
            let v = view(previous, current, &history, AuthKind::None, "s");
            let figure = v.deliveries.iter().find(|f| f.label == "delivered");
            (figure.unwrap().per_s, v.notice.is_some())
        };
        // The same run: 40 more in 2 s.
        let (before, after) = (of_run(10.0, 50, Some("a")), of_run(12.0, 90, Some("a")));
        assert_eq!(delivered(&before, &after), (20.0, false));
        // Another run, whose counter passed the old one's: no rate, and a notice.
        let (before, after) = (of_run(10.0, 50, Some("a")), of_run(12.0, 90, Some("b")));
        assert_eq!(delivered(&before, &after), (0.0, true));
        // An agent of an earlier build names no run: judged by its counters alone.
        let (before, after) = (of_run(10.0, 50, None), of_run(12.0, 90, None));
        assert_eq!(delivered(&before, &after), (20.0, false));
    }

    #[test]
    fn a_view_of_two_snapshots() {
        let before = snapshot(
            10.0,
            "outpost_updates_total{result=\"exported\"} 100\n\
             outpost_deliveries_total{outcome=\"delivered\"} 50\n\
             outpost_delivery_latency_seconds_bucket{le=\"0.001\"} 40\n\
             outpost_delivery_latency_seconds_bucket{le=\"0.002\"} 50\n\
             outpost_delivery_latency_seconds_bucket{le=\"+Inf\"} 50\n\
             outpost_token_fetches_total 1\n",
            json!({"pending": 50, "oldest_pending_waited_s": 3, "run_time_s": 60}),
        );
        let after = snapshot(
            12.0,
            "outpost_updates_total{result=\"exported\"} 120\n\
             outpost_updates_total{result=\"stale\"} 4\n\
             outpost_deliveries_total{outcome=\"delivered\"} 90\n\
             outpost_delivery_retries_total{cause=\"rate_limited\"} 6\n\
             outpost_delivery_latency_seconds_bucket{le=\"0.001\"} 40\n\
             outpost_delivery_latency_seconds_bucket{le=\"0.002\"} 90\n\
             outpost_delivery_latency_seconds_bucket{le=\"+Inf\"} 90\n\
             outpost_token_fetches_total 2\n\
             outpost_delivery_concurrency_limit 12\n\
             outpost_delivery_in_flight 3\n\
             outpost_delivery_rate_cap 150\n\
             outpost_delivery_quota_left 7\n\
             outpost_destination_down 0\n\
             outpost_outbox_pending 34\n\
             outpost_outbox_dead 2\n\
             outpost_source_connected 1\n\
             outpost_source_pending{partition=\"10\"} 5\n\
             outpost_source_pending{partition=\"2\"} 7\n",
            json!({"pending": 34, "oldest_pending_waited_s": 5, "run_time_s": 62,
                   "delivery_paused": true, "delivery_paused_since": "2026-01-01T00:00:05.000Z",
                   "clock_jumps": 1, "last_clock_jump": {"by_s": -90, "noticed_at": "2026-01-01T00:00:00Z"}}),
        );
        let mut history = History::new(2);
        for s in [&before, &before, &after] {
            history.push(s);
        }
        let v = view(
            &before,
            &after,
            &history,
            AuthKind::OAuth2,
            "/var/lib/outpost",
        );
        assert_eq!(v.interval_s, 2.0);
        assert_eq!(
            v.updates[..3],
            [
                Figure {
                    label: "exported",
                    per_s: 10.0,
                    total: 120
                },
                Figure {
                    label: "unchanged",
                    per_s: 0.0,
                    total: 0
                },
                Figure {
                    label: "stale",
                    per_s: 2.0,
                    total: 4
                },
            ]
        );
        assert_eq!(
            v.deliveries[0],
            Figure {
                label: "delivered",
                per_s: 20.0,
                total: 90
            }
        );
        assert_eq!(
            v.retries[0],
            Figure {
                label: "rate_limited",
                per_s: 3.0,
                total: 6
            }
        );
        assert_eq!(v.token_fetches.per_s, 0.5);
        // The 40 deliveries of the interval all took 1 to 2 ms.
        let close = |got: Option<f64>, expected: f64| {
            assert!(
                (got.unwrap() - expected).abs() < 1e-12,
                "{got:?} vs {expected}"
            )
        };
        close(v.latency_recent.0, 0.0015);
        close(v.latency_recent.1, 0.001 + 0.001 * 39.6 / 40.0);
        close(v.latency_since_start.0, 0.001 + 0.001 * 5.0 / 50.0);
        assert_eq!((v.concurrency_limit, v.in_flight, v.rate_cap), (12, 3, 150));
        assert_eq!(v.quota_left, Some(7));
        assert_eq!(v.paused_since.as_deref(), Some("2026-01-01T00:00:05.000Z"));
        assert_eq!(
            view(&before, &before, &history, AuthKind::OAuth2, "s").paused_since,
            None
        );
        assert_eq!((v.pending, v.dead, v.oldest_waited_s), (34, 2, Some(5)));
        assert_eq!(v.pending_history, vec![50, 34]);
        assert_eq!(v.waited_history, vec![3, 5]);
        assert_eq!(v.token, TokenState::ExpiresIn(125));
        assert_eq!(v.clock_jumps, "1, last -1m 30s at 2026-01-01T00:00:00Z");
        assert_eq!(
            v.source_lag.as_deref(),
            Some("12 waiting (connected): 2:7 10:5"),
            "partitions in numeric order"
        );
        assert_eq!(
            view(&before, &before, &history, AuthKind::OAuth2, "s").source_lag,
            None
        );

        let text = plain(&v);
        for expected in [
            "rates over the last 2.0 s",
            "updates     stale                     2.0            4",
            "deliveries  delivered                20.0           90",
            "retries     rate_limited              3.0            6",
            "delivery    concurrency limit  12",
            "delivery    rate cap           150/s (after 429s); quota 7 left",
            "delivery    paused             paused since 2026-01-01T00:00:05.000Z (`outpost delivery resume`)",
            "token       lifetime           expires in 2m 5s",
            "outbox      dead               2",
            "source      NATS lag           12 waiting (connected): 2:7 10:5",
        ] {
            assert!(text.contains(expected), "{expected:?} missing in:\n{text}");
        }
    }
}
