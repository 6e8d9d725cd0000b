//! The agent's metrics (prometheus-client), rendered as Prometheus text on `GET /metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::delivery::auth::TokenExpiry;
use crate::profile::Reason;
use crate::store::{BatchSummary, OutboxStats};

/// The `result` labels of `outpost_updates_total`.
pub const UPDATE_RESULTS: [&str; 5] = ["exported", "unchanged", "stale", "deleted", "refused"];

/// The statuses a request to `/v1/updates` is refused with, as `outpost_ingest_refusals_total`
/// labels them; any other is `other`.
pub const REFUSAL_STATUSES: [&str; 11] = [
    "400", "401", "408", "409", "411", "413", "415", "500", "501", "503", "other",
];

type Labels = Vec<(&'static str, &'static str)>;

/// How a delivery attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    Delivered,
    /// Failed and will be retried (5xx, 429, timeouts, connection errors, token failures).
    Retried,
    /// 401/403: token dropped, will be retried.
    AuthRejected,
    /// Rejected by the endpoint and dead-lettered.
    Dead,
    /// Undelivered after `max_age_s` and dead-lettered.
    Expired,
}

impl DeliveryOutcome {
    pub const ALL: [DeliveryOutcome; 5] = [
        DeliveryOutcome::Delivered,
        DeliveryOutcome::Retried,
        DeliveryOutcome::AuthRejected,
        DeliveryOutcome::Dead,
        DeliveryOutcome::Expired,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DeliveryOutcome::Delivered => "delivered",
            DeliveryOutcome::Retried => "retried",
            DeliveryOutcome::AuthRejected => "auth_rejected",
            DeliveryOutcome::Dead => "dead",
            DeliveryOutcome::Expired => "expired",
        }
    }
}

/// Why an export is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryCause {
    /// 429.
    RateLimited,
    /// 503.
    Unavailable,
    /// Another 5xx, 408 or 425.
    ServerError,
    Timeout,
    Connection,
    /// The token endpoint failed.
    Token,
    /// 401/403.
    Auth,
}

impl RetryCause {
    pub const ALL: [RetryCause; 7] = [
        RetryCause::RateLimited,
        RetryCause::Unavailable,
        RetryCause::ServerError,
        RetryCause::Timeout,
        RetryCause::Connection,
        RetryCause::Token,
        RetryCause::Auth,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RetryCause::RateLimited => "rate_limited",
            RetryCause::Unavailable => "unavailable",
            RetryCause::ServerError => "server_error",
            RetryCause::Timeout => "timeout",
            RetryCause::Connection => "connection",
            RetryCause::Token => "token",
            RetryCause::Auth => "auth",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    updates: Family<Labels, Counter>,
    exports: Family<Labels, Counter>,
    /// The counters of `deliveries`, by [`DeliveryOutcome`] in `ALL` order: looked up once,
    /// not per export.
    delivery_counters: Vec<Counter>,
    retries: Family<Labels, Counter>,
    splits: Counter,
    ingest_refusals: Family<Labels, Counter>,
    pub outbox_pending: Gauge,
    pub outbox_dead: Gauge,
    /// The longest a pending export has waited in run time (0: none pending).
    pub outbox_oldest_waited: Gauge,
    /// What pending exports and dead letters take, as `storage.max_outbox_bytes` counts it.
    pub outbox_bytes: Gauge,
    /// `storage.max_outbox_bytes`: at it, ingest is refused with 503 until deliveries make room.
    pub outbox_max_bytes: Gauge,
    /// Profiles stored (as the store keeps the count).
    pub profiles_stored: Gauge,
    /// Bytes the store's files take on the disk.
    pub store_disk_bytes: Gauge,
    pub token_fetches: Counter,
    /// When the OAuth token held expires (not a Prometheus metric: read by `outpost top`).
    pub token_expiry: TokenExpiry,
    delivery_latency: Histogram,
    source_messages: Family<Labels, Counter>,
    /// Messages of the NATS source acknowledged after their group was durable.
    pub source_acks: Counter,
    /// 1 while connected to NATS (0 also when no NATS source is configured).
    pub source_connected: Gauge,
    /// 1 while fetching is paused because the outbox is full.
    pub source_paused: Gauge,
    /// Owned partitions left alone because another agent's store claims them.
    pub source_claimed_elsewhere: Gauge,
    source_pending: Family<Vec<(&'static str, String)>, Gauge>,
    /// Wall-clock jumps beyond the threshold noticed by this agent (at start and while running).
    pub clock_jumps: Counter,
    /// The last such jump, in seconds (positive: set forward).
    pub clock_last_jump_seconds: Gauge,
    /// The adaptive limit of requests in flight.
    pub concurrency_limit: Gauge,
    pub in_flight: Gauge,
    /// Requests a second allowed since the endpoint answered 429 (0: no cap).
    pub rate_cap: Gauge,
    /// Requests the endpoint's window has left, as its answers advertise or its 429s count
    /// down to (-1: none known).
    pub quota_left: Gauge,
    /// Exports waiting for their retry time.
    pub retry_waiting: Gauge,
    /// Pending exports read ahead and held in memory, and about the bytes they take.
    pub window_exports: Gauge,
    pub window_bytes: Gauge,
    /// 1 while the destination looks down and is probed one request at a time.
    pub destination_down: Gauge,
    /// 1 while delivery is paused (`outpost delivery pause`).
    pub delivery_paused: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("outpost");
        let updates = Family::<Labels, Counter>::default();
        let exports = Family::<Labels, Counter>::default();
        let deliveries = Family::<Labels, Counter>::default();
        let outbox_pending = Gauge::default();
        let outbox_dead = Gauge::default();
        let outbox_oldest_waited = Gauge::default();
        let outbox_bytes = Gauge::default();
        let outbox_max_bytes = Gauge::default();
        let token_fetches = Counter::default();
        let delivery_latency = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let clock_jumps = Counter::default();
        let clock_last_jump_seconds = Gauge::default();
        let retries = Family::<Labels, Counter>::default();
        let splits = Counter::default();
        let ingest_refusals = Family::<Labels, Counter>::default();
        let concurrency_limit = Gauge::default();
        let in_flight = Gauge::default();
        let rate_cap = Gauge::default();
        let quota_left = Gauge::default();
        quota_left.set(-1);
        let retry_waiting = Gauge::default();
        let window_exports = Gauge::default();
        let window_bytes = Gauge::default();
        let destination_down = Gauge::default();
        let delivery_paused = Gauge::default();
        registry.register(
            "delivery_retries",
            "Exports to be retried, by cause",
            retries.clone(),
        );
        registry.register(
            "delivery_array_splits",
            "Array requests refused with a 4xx and split into single exports",
            splits.clone(),
        );
        registry.register(
            "delivery_concurrency_limit",
            "The adaptive limit of requests in flight",
            concurrency_limit.clone(),
        );
        registry.register(
            "delivery_in_flight",
            "Requests in flight",
            in_flight.clone(),
        );
        registry.register(
            "delivery_rate_cap",
            "Requests a second allowed after the endpoint answered 429 (0: no cap)",
            rate_cap.clone(),
        );
        registry.register(
            "delivery_quota_left",
            "Requests the endpoint's window has left, as its RateLimit headers advertise or its 429s count down to (-1: none known)",
            quota_left.clone(),
        );
        registry.register(
            "delivery_retry_waiting",
            "Exports waiting for their retry time",
            retry_waiting.clone(),
        );
        registry.register(
            "delivery_window_exports",
            "Pending exports read ahead and held in memory by delivery",
            window_exports.clone(),
        );
        registry.register(
            "delivery_window_bytes",
            "About the memory the exports held by delivery take (at most about 32 MiB)",
            window_bytes.clone(),
        );
        registry.register(
            "destination_down",
            "1 while the destination looks down and is probed one request at a time",
            destination_down.clone(),
        );
        registry.register(
            "delivery_paused",
            "1 while delivery is paused by `outpost delivery pause`: updates are taken, nothing is sent until `outpost delivery resume`",
            delivery_paused.clone(),
        );
        registry.register("updates", "Profile updates by result", updates.clone());
        registry.register(
            "ingest_refusals",
            "Requests to /v1/updates refused, by HTTP status",
            ingest_refusals.clone(),
        );
        registry.register("exports", "Exports produced by reason", exports.clone());
        registry.register(
            "deliveries",
            "Delivery attempts by outcome",
            deliveries.clone(),
        );
        registry.register(
            "outbox_pending",
            "Exports waiting for delivery",
            outbox_pending.clone(),
        );
        registry.register("outbox_dead", "Dead-lettered exports", outbox_dead.clone());
        registry.register(
            "outbox_oldest_pending_seconds",
            "The longest run time a pending export has waited, what delivery.max_age_s counts (0: none pending)",
            outbox_oldest_waited.clone(),
        );
        registry.register(
            "outbox_bytes",
            "Bytes pending exports and dead letters take, as storage.max_outbox_bytes counts them",
            outbox_bytes.clone(),
        );
        registry.register(
            "outbox_max_bytes",
            "storage.max_outbox_bytes: at it, ingest is refused (503) until deliveries make room",
            outbox_max_bytes.clone(),
        );
        let profiles_stored = Gauge::default();
        registry.register(
            "profiles_stored",
            "Profiles in the store",
            profiles_stored.clone(),
        );
        let store_disk_bytes = Gauge::default();
        registry.register(
            "store_disk_bytes",
            "Bytes the store's files take on the disk (outpost compact gives back what removed data took)",
            store_disk_bytes.clone(),
        );
        registry.register(
            "token_fetches",
            "Requests to the token endpoint, failed ones too",
            token_fetches.clone(),
        );
        registry.register(
            "delivery_latency_seconds",
            "Time from sending an export to its 2xx answer",
            delivery_latency.clone(),
        );
        let source_messages = Family::<Labels, Counter>::default();
        let source_acks = Counter::default();
        let source_connected = Gauge::default();
        let source_paused = Gauge::default();
        let source_claimed_elsewhere = Gauge::default();
        let source_pending = Family::<Vec<(&'static str, String)>, Gauge>::default();
        registry.register(
            "source_messages",
            "Messages from the NATS stream by result (committed, skipped redeliveries, rejected)",
            source_messages.clone(),
        );
        registry.register(
            "source_acks",
            "Messages from the NATS stream acknowledged",
            source_acks.clone(),
        );
        registry.register(
            "source_connected",
            "1 while connected to NATS",
            source_connected.clone(),
        );
        registry.register(
            "source_paused",
            "1 while fetching from NATS is paused by a full outbox",
            source_paused.clone(),
        );
        registry.register(
            "source_claimed_elsewhere",
            "Owned NATS partitions left alone because another agent's store claims them",
            source_claimed_elsewhere.clone(),
        );
        registry.register(
            "source_pending",
            "Messages waiting in the NATS stream, per owned partition",
            source_pending.clone(),
        );
        registry.register(
            "clock_jumps",
            "Wall-clock jumps of more than 60 s noticed (they expire nothing)",
            clock_jumps.clone(),
        );
        registry.register(
            "clock_last_jump_seconds",
            "The last wall-clock jump noticed, in seconds (positive: set forward)",
            clock_last_jump_seconds.clone(),
        );
        // Every label value from the start, so that a series never appears out of nothing (a
        // rate over a missing series is no rate at all in Prometheus).
        for result in UPDATE_RESULTS {
            let _ = updates.get_or_create(&vec![("result", result)]);
        }
        for reason in Reason::ALL {
            let _ = exports.get_or_create(&vec![("reason", reason.as_str())]);
        }
        for cause in RetryCause::ALL {
            let _ = retries.get_or_create(&vec![("cause", cause.label())]);
        }
        for status in REFUSAL_STATUSES {
            let _ = ingest_refusals.get_or_create(&vec![("status", status)]);
        }
        Metrics {
            clock_jumps,
            clock_last_jump_seconds,
            registry,
            source_messages,
            source_acks,
            source_connected,
            source_paused,
            source_claimed_elsewhere,
            source_pending,
            updates,
            exports,
            delivery_counters: DeliveryOutcome::ALL
                .iter()
                .map(|o| {
                    deliveries
                        .get_or_create(&vec![("outcome", o.label())])
                        .clone()
                })
                .collect(),
            retries,
            splits,
            ingest_refusals,
            outbox_pending,
            outbox_dead,
            outbox_oldest_waited,
            outbox_bytes,
            outbox_max_bytes,
            profiles_stored,
            store_disk_bytes,
            token_fetches,
            token_expiry: TokenExpiry::default(),
            delivery_latency,
            concurrency_limit,
            in_flight,
            rate_cap,
            quota_left,
            retry_waiting,
            window_exports,
            window_bytes,
            destination_down,
            delivery_paused,
        }
    }

    pub fn record_retry(&self, cause: RetryCause) {
        self.retries
            .get_or_create(&vec![("cause", cause.label())])
            .inc();
    }

    pub fn retries(&self, cause: RetryCause) -> u64 {
        self.retries
            .get_or_create(&vec![("cause", cause.label())])
            .get()
    }

    /// A request to `/v1/updates` refused with `status`.
    pub fn record_ingest_refusal(&self, status: u16) {
        let label = REFUSAL_STATUSES
            .into_iter()
            .find(|label| label.parse() == Ok(status))
            .unwrap_or("other");
        self.ingest_refusals
            .get_or_create(&vec![("status", label)])
            .inc();
    }

    pub fn record_split(&self) {
        self.splits.inc();
    }

    pub fn splits(&self) -> u64 {
        self.splits.get()
    }

    pub fn record_commit(&self, summary: &BatchSummary) {
        let exported = summary.accepted - summary.unchanged - summary.stale - summary.deleted;
        for (result, n) in [
            ("exported", exported),
            ("unchanged", summary.unchanged),
            ("stale", summary.stale),
            ("deleted", summary.deleted),
        ] {
            self.updates
                .get_or_create(&vec![("result", result)])
                .inc_by(n);
        }
        for reason in Reason::ALL {
            self.exports
                .get_or_create(&vec![("reason", reason.as_str())])
                .inc_by(summary.exports_for(reason));
        }
    }

    pub fn record_refused(&self, updates: u64) {
        self.updates
            .get_or_create(&vec![("result", "refused")])
            .inc_by(updates);
    }

    pub fn record_delivery(&self, outcome: DeliveryOutcome, latency: Option<std::time::Duration>) {
        self.delivery_counters[outcome as usize].inc();
        if let Some(latency) = latency {
            self.delivery_latency.observe(latency.as_secs_f64());
        }
    }

    pub fn deliveries(&self, outcome: DeliveryOutcome) -> u64 {
        self.delivery_counters[outcome as usize].get()
    }

    /// Exports a backfill step made (reason `segment`).
    pub fn record_backfill_exports(&self, exported: u64) {
        self.exports
            .get_or_create(&vec![("reason", Reason::Segment.as_str())])
            .inc_by(exported);
    }

    pub fn exports(&self, reason: Reason) -> u64 {
        self.exports
            .get_or_create(&vec![("reason", reason.as_str())])
            .get()
    }

    pub fn record_source_messages(&self, committed: u64, skipped: u64, rejected: u64) {
        for (result, n) in [
            ("committed", committed),
            ("skipped", skipped),
            ("rejected", rejected),
        ] {
            self.source_messages
                .get_or_create(&vec![("result", result)])
                .inc_by(n);
        }
    }

    /// With a NATS source configured, its `result` series are there from the start, as the
    /// others are: a rate over them, or an alert that asks whether an agent has a source,
    /// needs them before the first message.
    pub fn expect_source_messages(&self) {
        self.record_source_messages(0, 0, 0);
    }

    pub fn source_messages(&self, result: &'static str) -> u64 {
        self.source_messages
            .get_or_create(&vec![("result", result)])
            .get()
    }

    pub fn set_source_pending(&self, partition: u32, pending: u64) {
        self.source_pending
            .get_or_create(&vec![("partition", partition.to_string())])
            .set(pending as i64);
    }

    /// Sets the outbox gauges from the store's figures (before rendering).
    pub fn set_outbox(&self, stats: &OutboxStats) {
        self.outbox_pending.set(stats.pending as i64);
        self.outbox_dead.set(stats.dead as i64);
        self.outbox_oldest_waited
            .set(stats.oldest_pending_waited_s.unwrap_or(0) as i64);
        self.outbox_bytes
            .set(i64::try_from(stats.bytes).unwrap_or(i64::MAX));
        if let Some(profiles) = stats.profiles {
            self.profiles_stored.set(profiles as i64);
        }
        if let Some(bytes) = stats.store_disk_bytes {
            self.store_disk_bytes.set(bytes as i64);
        }
    }

    /// The OpenMetrics text.
    pub fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

/// The media types `/metrics` answers with.
pub const OPENMETRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const PROMETHEUS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a scraper's `Accept` header prefers OpenMetrics to the Prometheus text format (as
/// Prometheus's does by default): OpenMetrics is asked for with a quality above 0 and at
/// least that of `text/plain` (or of `text/*` or `*/*`, when `text/plain` is not named).
/// Other clients get the Prometheus text format.
pub fn accepts_openmetrics(accept: Option<&str>) -> bool {
    let Some(accept) = accept else {
        return false;
    };
    let quality_of = |wanted: &[&str]| -> Option<f64> {
        accept
            .split(',')
            .filter_map(|range| {
                let mut parts = range.split(';').map(str::trim);
                let media_type = parts.next()?;
                if !wanted.iter().any(|w| media_type.eq_ignore_ascii_case(w)) {
                    return None;
                }
                let q = parts
                    .filter_map(|p| p.split_once('='))
                    .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
                    .map_or(Some(1.0), |(_, value)| value.trim().parse::<f64>().ok());
                Some(q.unwrap_or(0.0))
            })
            .reduce(f64::max)
    };
    let openmetrics = quality_of(&["application/openmetrics-text"]).unwrap_or(0.0);
    let text = quality_of(&["text/plain"])
        .or_else(|| quality_of(&["text/*", "*/*"]))
        .unwrap_or(0.0);
    openmetrics > 0.0 && openmetrics >= text
}

/// The Prometheus text format (0.0.4) of an OpenMetrics text: the same samples; a counter's
/// `HELP` and `TYPE` lines name its samples (`…_total`), as that format wants; no `UNIT` or
/// `EOF` lines, which it does not have.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].into_iter().find_map(|prefix| {
            let (name, rest) = line.strip_prefix(prefix)?.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {rest}"))
        });
        text.push_str(renamed.as_deref().unwrap_or(line));
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_goes_to_scrapers_that_ask_for_it() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        for (accept, openmetrics) in [
            (None, false),
            (Some("*/*"), false),
            (Some("text/plain"), false),
            (Some(prometheus), true),
            (Some("Application/OpenMetrics-Text; version=1.0.0"), true),
            (Some("text/plain, application/openmetrics-text; q=0"), false),
            (Some("application/openmetrics-text;Q=0.000"), false),
            (Some("application/openmetrics-text; q = 0.0, */*"), false),
            (Some("application/openmetrics-textual"), false),
            // Prometheus with `scrape_protocols` preferring the Prometheus text.
            (Some("text/plain;version=0.0.4;q=0.5,application/openmetrics-text;version=1.0.0;q=0.4,*/*;q=0.1"), false),
            (Some("application/openmetrics-text;q=0.4, */*;q=0.1"), true),
            (Some("application/openmetrics-text;q=0.4, */*"), false),
        ] {
            assert_eq!(accepts_openmetrics(accept), openmetrics, "{accept:?}");
        }
    }

    #[test]
    fn the_prometheus_text_names_counters_by_their_samples_and_has_no_eof() {
        let openmetrics = "\
# HELP outpost_updates Profile updates by result.
# TYPE outpost_updates counter
outpost_updates_total{result=\"exported\"} 4
# HELP outpost_outbox_pending Exports waiting for delivery.
# TYPE outpost_outbox_pending gauge
outpost_outbox_pending 3
# HELP outpost_delivery_latency_seconds Request latency.
# TYPE outpost_delivery_latency_seconds histogram
# UNIT outpost_delivery_latency_seconds seconds
outpost_delivery_latency_seconds_sum 0.5
outpost_delivery_latency_seconds_count 2
outpost_delivery_latency_seconds_bucket{le=\"+Inf\"} 2
# EOF
";
        let expected = "\
# HELP outpost_updates_total Profile updates by result.
# TYPE outpost_updates_total counter
outpost_updates_total{result=\"exported\"} 4
# HELP outpost_outbox_pending Exports waiting for delivery.
# TYPE outpost_outbox_pending gauge
outpost_outbox_pending 3
# HELP outpost_delivery_latency_seconds Request latency.
# TYPE outpost_delivery_latency_seconds histogram
outpost_delivery_latency_seconds_sum 0.5
outpost_delivery_latency_seconds_count 2
outpost_delivery_latency_seconds_bucket{le=\"+Inf\"} 2
";
        assert_eq!(to_prometheus_text(openmetrics), expected);
    }

    #[test]
    fn every_sample_of_the_agent_is_in_both_formats() {
        let metrics = Metrics::new();
        metrics.token_fetches.inc();
        let openmetrics = metrics.render();
        let prometheus = to_prometheus_text(&openmetrics);
        let samples = |text: &str| -> Vec<String> {
            let lines = text.lines().filter(|l| !l.starts_with('#'));
            lines.map(str::to_owned).collect()
        };
        assert_eq!(samples(&prometheus), samples(&openmetrics));
        assert!(samples(&prometheus).contains(&"outpost_token_fetches_total 1".to_owned()));
        for line in prometheus.lines().filter(|l| l.starts_with("# TYPE ")) {
            assert!(
                !line.ends_with(" counter") || line.contains("_total "),
                "{line}"
            );
        }
        assert!(!prometheus.contains("# EOF") && openmetrics.contains("# EOF"));
    }
}
