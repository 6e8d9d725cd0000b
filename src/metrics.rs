//! The agent's metrics (prometheus-client), rendered as Prometheus text on `GET /metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::profile::Reason;
use crate::store::BatchSummary;

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
    fn label(self) -> &'static str {
        match self {
            DeliveryOutcome::Delivered => "delivered",
            DeliveryOutcome::Retried => "retried",
            DeliveryOutcome::AuthRejected => "auth_rejected",
            DeliveryOutcome::Dead => "dead",
            DeliveryOutcome::Expired => "expired",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    updates: Family<Labels, Counter>,
    exports: Family<Labels, Counter>,
    deliveries: Family<Labels, Counter>,
    pub outbox_pending: Gauge,
    pub outbox_dead: Gauge,
    pub token_fetches: Counter,
    delivery_latency: Histogram,
    source_messages: Family<Labels, Counter>,
    /// Messages of the NATS source acknowledged after their group was durable.
    pub source_acks: Counter,
    /// 1 while connected to NATS (0 also when no NATS source is configured).
    pub source_connected: Gauge,
    /// 1 while fetching is paused because the outbox is full.
    pub source_paused: Gauge,
    source_pending: Family<Vec<(&'static str, String)>, Gauge>,
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
        let token_fetches = Counter::default();
        let delivery_latency = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register("updates", "Profile updates by result", updates.clone());
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
            "token_fetches",
            "Requests to the token endpoint",
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
            "source_pending",
            "Messages waiting in the NATS stream, per owned partition",
            source_pending.clone(),
        );
        Metrics {
            registry,
            source_messages,
            source_acks,
            source_connected,
            source_paused,
            source_pending,
            updates,
            exports,
            deliveries,
            outbox_pending,
            outbox_dead,
            token_fetches,
            delivery_latency,
        }
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
        self.deliveries
            .get_or_create(&vec![("outcome", outcome.label())])
            .inc();
        if let Some(latency) = latency {
            self.delivery_latency.observe(latency.as_secs_f64());
        }
    }

    pub fn deliveries(&self, outcome: DeliveryOutcome) -> u64 {
        self.deliveries
            .get_or_create(&vec![("outcome", outcome.label())])
            .get()
    }

    pub fn updates(&self, result: &'static str) -> u64 {
        self.updates.get_or_create(&vec![("result", result)]).get()
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

    pub fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}
