//! `outpost demo`: the whole job on loopback. An embedded receiver (token endpoint + profile
//! endpoint, failing some requests and issuing short-lived tokens), the agent against it with a
//! store in a temporary folder, and the sample updates streamed through the ingest API.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::agent::{Agent, AgentOptions};
use crate::config::Config;
use crate::metrics::DeliveryOutcome;
use crate::profile::Reason;
use crate::receiver::{RateLimit, Receiver, ReceiverOptions, Reply};
use crate::store::BatchSummary;

/// The sample updates of `data/`, built from Adobe's XDM examples.
pub const SAMPLE_UPDATES: &str = include_str!("../data/sample-updates.ndjson");
const BATCH_LINES: usize = 100;
/// The receiver's first requests fail: enough for the agent to find the destination down.
const OUTAGE_REQUESTS: u64 = 12;
/// Requests a second the receiver takes before it answers 429.
const DEMO_RATE_LIMIT: f64 = 300.0;
/// A pause between ingest batches, so that delivery runs while updates stream in and the
/// short-lived tokens expire along the way.
const BATCH_PAUSE: Duration = Duration::from_millis(80);

pub struct DemoOptions {
    /// Share of export requests the receiver fails with 503.
    pub fail_share: f64,
    pub token_lifetime: Duration,
    pub show_progress: bool,
    pub timeout: Duration,
    /// Cancelled to stop the demo (on a signal).
    pub stop: tokio_util::sync::CancellationToken,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            fail_share: 0.05,
            token_lifetime: Duration::from_secs(1),
            show_progress: true,
            timeout: Duration::from_secs(120),
            stop: tokio_util::sync::CancellationToken::new(),
        }
    }
}

/// What the demo did, from both ends.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub ingested: BatchSummary,
    pub delivered: u64,
    pub retried: u64,
    pub auth_rejected: u64,
    pub dead: u64,
    pub token_fetches: u64,
    /// What the receiver saw: requests, and distinct exports answered 2xx.
    pub receiver_requests: u64,
    pub receiver_exports: u64,
    pub receiver_tokens: u64,
    /// Export requests the receiver answered 429.
    pub receiver_refused: u64,
    pub receiver_peak_in_flight: u64,
    /// Profiles the receiver got an export of after a newer one of the same profile.
    pub receiver_out_of_order: u64,
    /// Exports the receiver accepted that the store did not hold (it looks each up as it
    /// accepts it, before the agent hears the answer and records the delivery).
    pub receiver_unknown: u64,
    /// Exports the receiver accepted and found in the store, resends included.
    pub receiver_looked_up: u64,
    pub adaptive: AdaptiveSeen,
    pub samples: Vec<(String, Value)>,
}

/// What the delivery controller did during the demo, sampled from the agent's metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdaptiveSeen {
    pub limit_min: i64,
    pub limit_max: i64,
    pub limit_end: i64,
    /// How long the destination counted as down (probed one request at a time).
    pub down_for: Duration,
    pub rate_cap_min: i64,
}

/// Samples the controller's state every 5 ms until `watching` is cleared.
async fn watch_delivery(
    metrics: Arc<crate::metrics::Metrics>,
    watching: Arc<std::sync::atomic::AtomicBool>,
) -> AdaptiveSeen {
    const EVERY: Duration = Duration::from_millis(5);
    let mut seen = AdaptiveSeen::default();
    let mut last_look = tokio::time::Instant::now();
    while watching.load(std::sync::atomic::Ordering::SeqCst) {
        // The time since the last look, not the sleep asked for: a sleep often lasts longer.
        let now = tokio::time::Instant::now();
        let since_last_look = now - last_look;
        last_look = now;
        // 0 until the delivery loop has set its first limit.
        let limit = metrics.concurrency_limit.get();
        if limit > 0 {
            let first = seen.limit_max == 0;
            seen.limit_min = if first {
                limit
            } else {
                seen.limit_min.min(limit)
            };
            seen.limit_max = seen.limit_max.max(limit);
            seen.limit_end = limit;
        }
        if metrics.destination_down.get() == 1 {
            seen.down_for += since_last_look;
        }
        let cap = metrics.rate_cap.get();
        if cap > 0 && (seen.rate_cap_min == 0 || cap < seen.rate_cap_min) {
            seen.rate_cap_min = cap;
        }
        tokio::time::sleep(EVERY).await;
    }
    seen
}

/// The demo agent's config in `dir`; refused only where `dir` is (a temporary folder whose
/// path leaves no room for the admin socket's, say).
fn demo_config(dir: &std::path::Path, receiver: &str) -> Result<Config, String> {
    let text = demo_config_text(receiver);
    let path = dir.join("outpost.toml");
    Config::parse(&path, &text).map_err(|e| {
        format!(
            "the demo's config in its temporary folder {}: {e} (TMPDIR sets where that folder is)",
            dir.display()
        )
    })
}

/// The demo agent's config, delivering to the receiver at `receiver`.
pub(crate) fn demo_config_text(receiver: &str) -> String {
    format!(
        r#"[destination]
name = "demo"
description = "the embedded receiver of outpost demo"
http_endpoint = "{receiver}/profiles?source=demo"
custom_headers = "x-api-version:2"

[destination.auth]
type = "oauth2_client_credentials"
auth_endpoint = "{receiver}/oauth/token"
client_id = "edge-agent"
client_secret = "change-me"

[mapping]
attributes = ["person.name.firstName", "person.name.lastName", "person.birthDate", "personalEmail.address"]
segments = ["7841ba61-23c1-4bb3-a495-00d3g5fe1e93", "59bd2fkd-3c48-4b18-bf56-4f5c5e6967ae"]
identities = ["ecid", "email_lc_sha256"]

[storage]
path = "store"
cache_bytes = 16777216

[ingest]
listen = "127.0.0.1:0"

[delivery]
max_concurrency = 16
request_timeout_ms = 2000
initial_backoff_ms = 50
max_backoff_ms = 1000
"#
    )
}

pub(crate) fn progress(show: bool, len: u64, template: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

pub async fn run(options: &DemoOptions) -> Result<DemoReport, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("cannot create a temporary folder: {e}"))?;
    let receiver = Receiver::start(
        "127.0.0.1:0".parse().expect("valid address"),
        ReceiverOptions {
            fail_share: options.fail_share,
            token_lifetime: options.token_lifetime,
            ..ReceiverOptions::default()
        },
    )
    .await
    .map_err(|e| format!("cannot start the receiver: {e}"))?;
    // A short outage at the start (the agent finds the destination down and probes it one
    // request at a time), then a rate limit that answers 429 + Retry-After above it.
    let limit = Arc::new(RateLimit::new(DEMO_RATE_LIMIT, DEMO_RATE_LIMIT / 10.0));
    receiver.set_export_script(Some(Arc::new(move |n, _| {
        if n < OUTAGE_REQUESTS {
            Reply::Status(503, vec![], "warming up".into())
        } else if limit.admit() {
            Reply::Normal
        } else {
            Reply::rate_limited()
        }
    })));
    let config = demo_config(dir.path(), &receiver.base_url())?;
    let agent = Agent::start(&config, AgentOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    // Stopped by a signal (`stop`), the agent is stopped before its folder goes.
    let driven = tokio::select! {
        driven = drive(&agent, &receiver, options, config.ingest.token.as_ref()) => driven,
        () = options.stop.cancelled() => Err("interrupted; the demo's temporary folder is removed".into()),
    };
    agent.stop().await.map_err(|e| e.to_string())?;
    driven
}

/// What the receiver accepted, export by export, with the profile the store holds each of:
/// each profile's exports must arrive oldest first (a resend of the same one aside).
#[derive(Default)]
struct Arrivals {
    by_profile: std::collections::HashMap<String, Vec<u64>>,
    unknown: u64,
}

impl Arrivals {
    /// Notes the exports of an accepted request, looked up in `store`.
    fn note(&mut self, store: &crate::store::Store, key: &str) {
        for id in key.split(',') {
            let export = id
                .parse()
                .ok()
                .and_then(|id| store.export(id).ok().flatten());
            match export {
                Some(export) => self
                    .by_profile
                    .entry(export.record.profile_id)
                    .or_default()
                    .push(export.id.seq),
                None => self.unknown += 1,
            }
        }
    }

    /// Profiles that got an export after a newer one.
    fn out_of_order(&self) -> u64 {
        let ordered = |seqs: &Vec<u64>| seqs.windows(2).all(|pair| pair[0] <= pair[1]);
        self.by_profile.values().filter(|s| !ordered(s)).count() as u64
    }
}

/// Streams the sample updates through the agent, waits until every export left the outbox,
/// and says what happened from both ends.
async fn drive(
    agent: &Agent,
    receiver: &Receiver,
    options: &DemoOptions,
    ingest_token: Option<&crate::config::Secret>,
) -> Result<DemoReport, String> {
    let arrivals = Arc::new(std::sync::Mutex::new(Arrivals::default()));
    let (noting, store) = (Arc::clone(&arrivals), Arc::clone(&agent.store));
    receiver.on_delivered(Arc::new(move |request| {
        if let Some(key) = request.header("idempotency-key") {
            noting.lock().unwrap().note(&store, key);
        }
    }));
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = tokio::spawn(watch_delivery(
        Arc::clone(&agent.metrics),
        Arc::clone(&watching),
    ));

    let lines: Vec<&str> = SAMPLE_UPDATES
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let bar = progress(
        options.show_progress,
        lines.len() as u64,
        "ingest  [{bar:40}] {pos}/{len} updates",
    );
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut ingested = BatchSummary::default();
    for batch in lines.chunks(BATCH_LINES) {
        let mut request = hyper::Request::post(format!("http://{}/v1/updates", agent.listen_addr));
        // The agent asks for one where the environment gives it (`OUTPOST_INGEST_TOKEN`).
        if let Some(token) = ingest_token {
            request = request.header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", token.expose()),
            );
        }
        let request = request
            .body(Full::new(Bytes::from(batch.join("\n"))))
            .expect("valid request");
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("ingest: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("ingest: {e}"))?
            .to_bytes();
        let answer: Value =
            serde_json::from_slice(&body).map_err(|e| format!("ingest answer: {e}"))?;
        if !status.is_success() {
            return Err(format!("ingest answered {status}: {answer}"));
        }
        for (field, total) in [
            ("accepted", &mut ingested.accepted),
            ("exports", &mut ingested.exports),
            ("unchanged", &mut ingested.unchanged),
            ("stale", &mut ingested.stale),
            ("deleted", &mut ingested.deleted),
        ] {
            *total += answer[field].as_u64().unwrap_or(0);
        }
        bar.inc(batch.len() as u64);
        tokio::time::sleep(BATCH_PAUSE).await;
    }
    bar.finish();
    for reason in Reason::ALL {
        ingested.by_reason[reason.code() as usize] = agent.metrics.exports(reason);
    }

    let bar = progress(
        options.show_progress,
        ingested.exports,
        "deliver [{bar:40}] {pos}/{len} exports",
    );
    let deadline = tokio::time::Instant::now() + options.timeout;
    loop {
        let tally = agent.store.tally().map_err(|e| e.to_string())?;
        bar.set_position(ingested.exports.saturating_sub(tally.pending));
        if tally.pending == 0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "{} exports still pending after {:?}",
                tally.pending, options.timeout
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bar.finish();

    watching.store(false, std::sync::atomic::Ordering::SeqCst);
    let adaptive = watcher.await.map_err(|e| e.to_string())?;
    let m = &agent.metrics;
    let delivered_requests = receiver.delivered();
    let mut keys: Vec<&str> = delivered_requests
        .iter()
        .filter_map(|r| r.header("idempotency-key"))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let samples = [
        0,
        delivered_requests.len() / 2,
        delivered_requests.len().saturating_sub(1),
    ]
    .iter()
    .filter_map(|&i| delivered_requests.get(i))
    .filter_map(|r| Some((r.header("idempotency-key")?.to_owned(), r.json()?)))
    .collect();
    let (receiver_out_of_order, receiver_unknown, receiver_looked_up) = {
        let arrivals = arrivals.lock().unwrap();
        let found = arrivals.by_profile.values().map(|seqs| seqs.len() as u64);
        (arrivals.out_of_order(), arrivals.unknown, found.sum())
    };
    let report = DemoReport {
        ingested,
        delivered: m.deliveries(DeliveryOutcome::Delivered),
        retried: m.deliveries(DeliveryOutcome::Retried),
        auth_rejected: m.deliveries(DeliveryOutcome::AuthRejected),
        dead: m.deliveries(DeliveryOutcome::Dead) + m.deliveries(DeliveryOutcome::Expired),
        token_fetches: m.token_fetches.get(),
        receiver_requests: receiver.export_requests().len() as u64,
        receiver_exports: keys.len() as u64,
        receiver_tokens: receiver.tokens_issued(),
        receiver_refused: receiver
            .export_requests()
            .iter()
            .filter(|r| r.status == 429)
            .count() as u64,
        receiver_peak_in_flight: receiver.max_in_flight(),
        receiver_out_of_order,
        receiver_unknown,
        receiver_looked_up,
        adaptive,
        samples,
    };
    Ok(report)
}

/// What the demo's own figures say went wrong, if anything: it is to end with every export it
/// made accepted by its receiver, none twice under another key, none dead.
pub fn shortfall(report: &DemoReport) -> Option<String> {
    let made = report.ingested.exports;
    if report.receiver_out_of_order > 0 {
        return Some(format!(
            "{} profiles got an export after a newer one of theirs",
            report.receiver_out_of_order
        ));
    }
    if report.receiver_unknown > 0 {
        return Some(format!(
            "the receiver accepted {} exports the store did not hold",
            report.receiver_unknown
        ));
    }
    if report.receiver_looked_up < report.receiver_exports {
        return Some(format!(
            "the receiver looked up {} of the {} exports it accepted",
            report.receiver_looked_up, report.receiver_exports
        ));
    }
    if report.dead > 0 {
        return Some(format!(
            "{} of the {made} exports became dead letters",
            report.dead
        ));
    }
    (report.receiver_exports != made).then(|| {
        format!(
            "the receiver accepted {} distinct exports, not the {made} made",
            report.receiver_exports
        )
    })
}

pub fn print_report(report: &DemoReport, out: &mut impl std::io::Write) -> std::io::Result<()> {
    let i = &report.ingested;
    writeln!(out)?;
    writeln!(
        out,
        "updates   {} accepted: {} exported, {} unchanged, {} stale, {} deleted",
        i.accepted,
        i.accepted - i.unchanged - i.stale - i.deleted,
        i.unchanged,
        i.stale,
        i.deleted
    )?;
    let reasons: Vec<String> = Reason::ALL
        .iter()
        .map(|r| format!("{} {r}", i.exports_for(*r)))
        .collect();
    writeln!(out, "exports   {} ({})", i.exports, reasons.join(", "))?;
    writeln!(
        out,
        "delivery  {} delivered, {} retried after a failure, {} after an expired token, {} dead",
        report.delivered, report.retried, report.auth_rejected, report.dead
    )?;
    let a = &report.adaptive;
    writeln!(
        out,
        "adaptive  destination down for {} ms at the start (one probe at a time, on the backoff schedule);",
        a.down_for.as_millis()
    )?;
    writeln!(
        out,
        "          requests in flight adapted between {} and {} (limit {} at the end), peak {} at the receiver;",
        a.limit_min, a.limit_max, a.limit_end, report.receiver_peak_in_flight
    )?;
    writeln!(
        out,
        "          {} of {} requests answered 429 by its rate limit of {DEMO_RATE_LIMIT:.0}/s{}",
        report.receiver_refused,
        report.receiver_requests,
        if a.rate_cap_min > 0 {
            format!(
                ", which capped the request rate (lowest cap {}/s)",
                a.rate_cap_min
            )
        } else {
            String::new()
        }
    )?;
    writeln!(
        out,
        "tokens    {} fetched (each lives one second in the demo, refreshed before it expires)",
        report.token_fetches
    )?;
    let order = match report.receiver_out_of_order {
        0 => "each profile's in order".to_owned(),
        n => format!("{n} profiles' out of order"),
    };
    writeln!(
        out,
        "receiver  {} requests, {} distinct exports accepted ({order}), {} tokens issued",
        report.receiver_requests, report.receiver_exports, report.receiver_tokens
    )?;
    for (key, payload) in &report.samples {
        writeln!(out)?;
        writeln!(out, "received  Idempotency-Key: {key}")?;
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(payload).expect("a Value always serializes")
        )?;
    }
    writeln!(out)?;
    writeln!(out, "next: cp data/outpost.example.toml outpost.toml, point it at your endpoint, then `outpost check`")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report_with(made: u64, accepted: u64, out_of_order: u64, unknown: u64) -> DemoReport {
        DemoReport {
            receiver_out_of_order: out_of_order,
            receiver_unknown: unknown,
            ..report(made, accepted, 0)
        }
    }

    #[test]
    fn a_profile_that_got_an_older_export_after_a_newer_one_is_out_of_order() {
        let mut arrivals = Arrivals::default();
        for (profile, seqs) in [
            ("a", vec![1, 4, 4, 9]),
            ("b", vec![2, 7, 3]),
            ("c", vec![5]),
        ] {
            arrivals.by_profile.insert(profile.into(), seqs);
        }
        assert_eq!(arrivals.out_of_order(), 1);
        let problem = shortfall(&report_with(823, 823, 1, 0));
        assert!(problem.is_some_and(|p| p.contains("1 profiles got an export after a newer one")));
        let problem = shortfall(&report_with(823, 823, 0, 2));
        assert!(problem.is_some_and(|p| p.contains("2 exports the store did not hold")));
    }

    fn report(made: u64, accepted: u64, dead: u64) -> DemoReport {
        DemoReport {
            ingested: BatchSummary {
                exports: made,
                ..BatchSummary::default()
            },
            delivered: accepted,
            retried: 0,
            auth_rejected: 0,
            dead,
            token_fetches: 0,
            receiver_requests: accepted,
            receiver_exports: accepted,
            receiver_tokens: 0,
            receiver_refused: 0,
            receiver_peak_in_flight: 0,
            receiver_out_of_order: 0,
            receiver_unknown: 0,
            receiver_looked_up: accepted,
            adaptive: AdaptiveSeen::default(),
            samples: Vec::new(),
        }
    }

    #[test]
    fn the_demo_falls_short_when_an_export_is_missing_extra_or_dead() {
        // (made, distinct exports the receiver accepted, dead, what is said)
        let table = [
            (823, 823, 0, None),
            (
                823,
                822,
                0,
                Some("accepted 822 distinct exports, not the 823 made"),
            ),
            (
                823,
                824,
                0,
                Some("accepted 824 distinct exports, not the 823 made"),
            ),
            (
                823,
                820,
                3,
                Some("3 of the 823 exports became dead letters"),
            ),
        ];
        for (made, accepted, dead, said) in table {
            let problem = shortfall(&report(made, accepted, dead));
            match said {
                None => assert_eq!(problem, None),
                Some(said) => assert!(
                    problem.as_deref().is_some_and(|p| p.contains(said)),
                    "{problem:?}"
                ),
            }
        }
    }
}
