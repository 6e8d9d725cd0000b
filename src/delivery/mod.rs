//! The delivery loop: drains the outbox to the destination.
//!
//! - It takes the oldest pending exports, at most one in flight per profile, up to
//!   `delivery.concurrency` profiles at once; it is woken by commits, not by polling.
//! - A 2xx removes the export, and the removal is flushed before that profile's next export is
//!   sent: once the endpoint acknowledged an export, no older one of that profile is sent again,
//!   whatever crash follows. While the flush runs the profile is *settling*: it holds no
//!   request slot, so other profiles' requests go on, and flushes of many deliveries are
//!   grouped into one.
//! - Failures back off destination-wide ([`retry::Gate`]); rejected exports move to the dead
//!   letters and the profile's later exports go on.

pub mod auth;
pub mod client;
pub mod retry;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{
    HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, USER_AGENT,
};
use hyper::{Request, Uri};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::RunClock;
use crate::config::Config;
use crate::metrics::{DeliveryOutcome, Metrics};
use crate::store::codec::ExportRecord;
use crate::store::flusher::Flusher;
use crate::store::{Export, Place, Store};
use auth::TokenSource;
use client::HttpClient;
use retry::{classify, parse_retry_after, Class, Gate};

/// How many pending exports one pass may look at to fill the free slots.
const SCAN_LIMIT: usize = 10_000;
/// A wake-up even without commits: picks up exports put back by `outbox retry` and expiries.
const IDLE_TICK: Duration = Duration::from_secs(1);

pub fn user_agent() -> String {
    concat!("outpost/", env!("CARGO_PKG_VERSION")).to_owned()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// What one delivery attempt came to.
#[derive(Debug)]
enum Outcome {
    /// Answered 2xx and removed from the outbox; the removal is not yet flushed.
    Delivered,
    Failed {
        retry_after: Option<Duration>,
    },
    DeadLettered,
}

struct Finished {
    profile_id: String,
    sent_at: Instant,
    outcome: Outcome,
}

/// Everything a delivery task needs; shared by all of them.
pub struct Deliverer {
    store: Arc<Store>,
    flusher: Flusher,
    client: HttpClient,
    tokens: Arc<TokenSource>,
    endpoint: Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    concurrency: usize,
    max_age: Duration,
    clock: RunClock,
    gate_config: (Duration, Duration, bool),
    metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("destination: {0}")]
    Client(#[from] client::ClientError),
    #[error("destination.http_endpoint: {0}")]
    Endpoint(String),
}

impl Deliverer {
    pub fn new(
        config: &Config,
        store: Arc<Store>,
        flusher: Flusher,
        metrics: Arc<Metrics>,
    ) -> Result<Deliverer, SetupError> {
        let client = HttpClient::new(&config.destination, config.delivery.request_timeout)?;
        let tokens = Arc::new(TokenSource::new(
            config.destination.auth.clone(),
            client.clone(),
            metrics.token_fetches.clone(),
        ));
        let endpoint: Uri = config
            .destination
            .http_endpoint
            .as_str()
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| SetupError::Endpoint(e.to_string()))?;
        let headers = config
            .destination
            .custom_headers
            .iter()
            .map(|(name, value)| {
                // Both were validated with the same types when the config was loaded.
                (
                    HeaderName::from_bytes(name.as_bytes()).expect("validated header name"),
                    HeaderValue::from_str(value).expect("validated header value"),
                )
            })
            .collect();
        Ok(Deliverer {
            clock: store.run_clock(),
            store,
            flusher,
            client,
            tokens,
            endpoint,
            headers,
            concurrency: config.delivery.concurrency,
            max_age: config.delivery.max_age,
            gate_config: (
                config.delivery.initial_backoff,
                config.delivery.max_backoff,
                true,
            ),
            metrics,
        })
    }

    /// Switches the backoff jitter off, for tests that assert exact delays.
    pub fn without_jitter(mut self) -> Self {
        self.gate_config.2 = false;
        self
    }

    /// Runs until `shutdown`; then lets the deliveries in flight finish and returns.
    /// `wake` is notified on commits and repairs.
    pub async fn run(self: Arc<Self>, wake: Arc<Notify>, shutdown: CancellationToken) {
        let (initial, max, jitter) = self.gate_config;
        let mut gate = Gate::new(initial, max, jitter);
        // Profiles with a request in flight, and profiles whose delivered export's removal is
        // being flushed; neither may send its next export yet.
        let mut in_flight: HashSet<String> = HashSet::new();
        let mut settling: HashSet<String> = HashSet::new();
        let mut tasks: JoinSet<Finished> = JoinSet::new();
        let mut settles: JoinSet<String> = JoinSet::new();
        // Scans start here, not at the head of the outbox, where a long run of removed keys
        // would be walked again on every pass (see `Store::scan_pending`).
        let mut scan_from = 0u64;
        loop {
            if !shutdown.is_cancelled() {
                self.start_deliveries(
                    &mut gate,
                    &mut in_flight,
                    &settling,
                    &mut tasks,
                    &mut scan_from,
                );
            }
            let resting = gate.is_failing();
            let ready_at = gate.ready_at();
            tokio::select! {
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    match joined {
                        Ok(finished) => {
                            in_flight.remove(&finished.profile_id);
                            match finished.outcome {
                                Outcome::Delivered => {
                                    gate.succeeded();
                                    settling.insert(finished.profile_id.clone());
                                    settles.spawn(Arc::clone(&self).settle(finished.profile_id));
                                }
                                Outcome::DeadLettered => gate.succeeded(),
                                Outcome::Failed { retry_after } => {
                                    let delay = gate.failed_request(Instant::now(), finished.sent_at, retry_after);
                                    tracing::debug!(?delay, "destination failing; backing off");
                                }
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "a delivery task failed"),
                    }
                }
                Some(settled) = settles.join_next(), if !settles.is_empty() => {
                    if let Ok(profile_id) = settled {
                        settling.remove(&profile_id);
                    }
                }
                _ = wake.notified(), if !shutdown.is_cancelled() => {}
                _ = tokio::time::sleep_until(ready_at), if resting && !shutdown.is_cancelled() => {}
                _ = tokio::time::sleep(IDLE_TICK), if !shutdown.is_cancelled() => {}
                _ = shutdown.cancelled(), if !shutdown.is_cancelled() => {}
                else => break,
            }
            if shutdown.is_cancelled() && tasks.is_empty() && settles.is_empty() {
                break;
            }
        }
    }

    /// Waits until the removal of `profile_id`'s delivered export is durable (retrying a failed
    /// flush: the profile must not send again before), then hands the profile back.
    async fn settle(self: Arc<Self>, profile_id: String) -> String {
        while let Err(e) = self.flusher.flush().await {
            tracing::error!(error = %e, "cannot flush the outbox; retrying");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        profile_id
    }

    /// Starts deliveries for the oldest pending export of as many idle profiles as the gate allows.
    fn start_deliveries(
        self: &Arc<Self>,
        gate: &mut Gate,
        in_flight: &mut HashSet<String>,
        settling: &HashSet<String>,
        tasks: &mut JoinSet<Finished>,
        scan_from: &mut u64,
    ) {
        let mut slots = gate.slots(Instant::now(), self.concurrency, in_flight.len());
        if slots == 0 {
            return;
        }
        let mut seen: HashSet<String> = in_flight.union(settling).cloned().collect();
        self.store.scan_pending(scan_from, |exports| {
            for export in exports.take(SCAN_LIMIT) {
                let export = match export {
                    Ok(export) => export,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the outbox");
                        return;
                    }
                };
                if !seen.insert(export.record.profile_id.clone()) {
                    continue; // not the oldest pending export of its profile, or that one is in flight
                }
                if self.clock.expired(&export.record, self.max_age) {
                    self.expire(&export);
                    continue;
                }
                in_flight.insert(export.record.profile_id.clone());
                gate.started();
                let this = Arc::clone(self);
                tasks.spawn(async move { this.deliver(export).await });
                slots -= 1;
                if slots == 0 {
                    break;
                }
            }
        });
    }

    fn expire(&self, export: &Export) {
        let max_age = self.max_age.as_secs();
        let moved = self
            .store
            .change_export(export.id.seq, Place::Pending, |mut record| {
                let cause = record.last_error.as_deref().unwrap_or("never attempted");
                record.last_error = Some(format!(
                    "undelivered after max_age_s {max_age} ({} attempts; last: {cause})",
                    record.attempts
                ));
                record.dead_at_ms = Some(now_ms());
                (Place::Dead, record)
            });
        match moved {
            Ok(true) => {
                self.metrics.record_delivery(DeliveryOutcome::Expired, None);
                tracing::warn!(export = %export.id, profile = %export.record.profile_id, "export expired; dead-lettered");
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "cannot dead-letter an expired export"),
        }
    }

    fn request(
        &self,
        export: &Export,
        token: Option<&crate::config::Secret>,
    ) -> Result<Request<Full<Bytes>>, String> {
        let mut builder = Request::post(self.endpoint.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, user_agent())
            .header("idempotency-key", export.id.to_string());
        if let Some(token) = token {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                .map_err(|_| "the access token is not a valid header value".to_owned())?;
            value.set_sensitive(true);
            builder = builder.header(AUTHORIZATION, value);
        }
        for (name, value) in &self.headers {
            builder = builder.header(name, value);
        }
        builder
            .body(Full::new(Bytes::from(export.record.payload.clone())))
            .map_err(|e| e.to_string())
    }

    /// Records a failed attempt on the export (not flushed: losing an attempt count is harmless).
    fn record_attempt(&self, export: &Export, error: &str) {
        let at = now_ms();
        let result =
            self.store
                .change_export(export.id.seq, Place::Pending, |mut record: ExportRecord| {
                    record.attempts += 1;
                    record.last_error = Some(error.to_owned());
                    record.last_attempt_at_ms = Some(at);
                    (Place::Pending, record)
                });
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot record a delivery attempt");
        }
    }

    async fn deliver(self: Arc<Self>, export: Export) -> Finished {
        let sent_at = Instant::now();
        let outcome = self.attempt(&export).await;
        Finished {
            profile_id: export.record.profile_id,
            sent_at,
            outcome,
        }
    }

    async fn attempt(&self, export: &Export) -> Outcome {
        let failed_as = |outcome, error: String, retry_after| {
            self.record_attempt(export, &error);
            self.metrics.record_delivery(outcome, None);
            tracing::info!(export = %export.id, profile = %export.record.profile_id, %error, "delivery failed; will retry");
            Outcome::Failed { retry_after }
        };
        let failed = |error, retry_after| failed_as(DeliveryOutcome::Retried, error, retry_after);
        let token = match self.tokens.token().await {
            Ok(token) => token,
            Err(e) => return failed(e.to_string(), None),
        };
        let request = match self.request(export, token.as_ref()) {
            Ok(request) => request,
            Err(e) => return failed(e, None),
        };
        let started = Instant::now();
        let answer = match self.client.send(request).await {
            Ok(answer) => answer,
            Err(e) => return failed(e.to_string(), None),
        };
        let status = answer.status.as_u16();
        match classify(status) {
            Class::Delivered => {
                let removed = self
                    .store
                    .change_export(export.id.seq, Place::Pending, |record| {
                        (Place::Gone, record)
                    });
                if let Err(e) = removed {
                    // The export stays pending and is sent again: at least once.
                    tracing::error!(error = %e, "cannot remove a delivered export");
                    return Outcome::Failed { retry_after: None };
                }
                // Flushed by `settle` before this profile sends again.
                self.metrics
                    .record_delivery(DeliveryOutcome::Delivered, Some(started.elapsed()));
                tracing::debug!(export = %export.id, status, "delivered");
                Outcome::Delivered
            }
            Class::AuthRejected => {
                if let Some(token) = &token {
                    self.tokens.invalidate(token).await;
                }
                failed_as(
                    DeliveryOutcome::AuthRejected,
                    format!("HTTP {status}: {}", answer.body_start()),
                    None,
                )
            }
            Class::Retry => {
                let retry_after = answer
                    .headers
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                failed(
                    format!("HTTP {status}: {}", answer.body_start()),
                    retry_after,
                )
            }
            Class::Reject => {
                let error = format!("HTTP {status}: {}", answer.body_start());
                let at = now_ms();
                let moved =
                    self.store
                        .change_export(export.id.seq, Place::Pending, |mut record| {
                            record.attempts += 1;
                            record.last_error = Some(error.clone());
                            record.last_attempt_at_ms = Some(at);
                            record.dead_at_ms = Some(at);
                            (Place::Dead, record)
                        });
                if let Err(e) = moved {
                    tracing::error!(error = %e, "cannot dead-letter an export");
                }
                if let Err(e) = self.flusher.flush().await {
                    tracing::error!(error = %e, "cannot flush the outbox");
                }
                self.metrics.record_delivery(DeliveryOutcome::Dead, None);
                tracing::warn!(export = %export.id, profile = %export.record.profile_id, %error, "export rejected; dead-lettered");
                Outcome::DeadLettered
            }
        }
    }
}
