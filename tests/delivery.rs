//! Delivery over real sockets: the agent in this process, a receiver (token endpoint + profile
//! endpoint) with scripted faults, and checks of headers, token requests, bodies, order, and
//! that nothing is lost.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use outpost::agent::Agent;
use outpost::config::Config;
use outpost::receiver::{Receiver, ReceiverOptions, Reply, Script};
use outpost::store::ListFilter;
use serde_json::json;

type Setup = ReceiverSetup;

/// When each request a script answered came.
type Arrivals = Arc<std::sync::Mutex<Vec<Instant>>>;

/// A receiver's script that answers the `n`th request (from 0) with `reply(n)`, and when each
/// came.
fn timed(reply: impl Fn(u64) -> Reply + Send + Sync + 'static) -> (Script, Arrivals) {
    let arrivals = Arrivals::default();
    let seen = Arc::clone(&arrivals);
    let script: Script = Arc::new(move |n, _| {
        seen.lock().unwrap().push(Instant::now());
        reply(n)
    });
    (script, arrivals)
}

async fn setup_with(
    options: ReceiverOptions,
    auth: impl Fn(&str) -> String,
    delivery: &str,
) -> Setup {
    receiver_setup(options, auth, delivery).await
}

async fn setup() -> Setup {
    setup_with(ReceiverOptions::default(), oauth_body, "").await
}

async fn start(config: &Config) -> Agent {
    start_agent(config).await
}

/// Posts updates to the agent's ingest API and returns its summary.
async fn ingest(agent: &Agent, lines: &[String]) -> serde_json::Value {
    let (status, body) = http_post(agent.listen_addr, "/v1/updates", lines.join("\n"), &[]).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// `n` updates per profile for `profiles`, each changing the first name: every one exports.
fn updates(profiles: &[&str], n: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for i in 0..n {
        for p in profiles {
            lines.push(member_update(
                p,
                &format!("{p}-v{i}"),
                &format!("2026-01-01T00:00:{:02}Z", i + 1),
            ));
        }
    }
    lines
}

/// `outbox retry --all-dead` on the agent's store; its answer.
async fn retry_all_dead(agent: &Agent) -> serde_json::Value {
    let request = outpost::admin::AdminRequest::Retry {
        ids: vec![],
        all_dead: true,
    };
    admin_request(agent, request).await
}

/// `outbox retry --all-dead` on the agent's store; how many were put back.
async fn retried_all_dead(agent: &Agent) -> usize {
    retry_all_dead(agent).await["retried"]
        .as_array()
        .unwrap()
        .len()
}

/// Waits until every export was delivered and the outbox is empty; checks order.
fn dead_letters(agent: &Agent) -> Vec<outpost::store::Export> {
    let dead_only = ListFilter {
        dead: true,
        ..Default::default()
    };
    agent.store.list(&dead_only).unwrap()
}

async fn drained(agent: &Agent, receiver: &Receiver, exports: usize) {
    wait_drained(agent, receiver, exports).await;
    assert_per_profile_order(&delivered_pairs(receiver));
}

#[tokio::test]
async fn exact_headers_token_form_and_bodies() {
    let s = setup().await;
    let agent = start(&s.config).await;
    let summary = ingest(&agent, &updates(&["a", "b", "c"], 2)).await;
    assert_eq!(summary["exports"], 6);
    drained(&agent, &s.receiver, 6).await;

    let tokens = s.receiver.token_requests();
    assert_eq!(tokens.len(), 1, "one token for all deliveries");
    let t = &tokens[0];
    assert_eq!(
        t.header("content-type"),
        Some("application/x-www-form-urlencoded;charset=UTF-8")
    );
    assert_eq!(
        std::str::from_utf8(&t.body).unwrap(),
        "grant_type=client_credentials&client_id=edge-agent&client_secret=change-me"
    );
    assert_eq!(t.header("authorization"), None);

    let delivered = s.receiver.delivered();
    assert_eq!(delivered.len(), 6);
    let mut keys = std::collections::HashSet::new();
    for r in &delivered {
        assert_eq!(r.query.as_deref(), Some("source=edge"));
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert!(r
            .header("authorization")
            .unwrap()
            .starts_with("Bearer tok-"));
        assert_eq!(r.header("x-api-version"), Some("2"));
        assert_eq!(r.header("x-tenant"), Some("acme"));
        assert_eq!(
            r.header("user-agent"),
            Some(concat!("outpost/", env!("CARGO_PKG_VERSION")))
        );
        assert!(
            keys.insert(r.header("idempotency-key").unwrap().to_owned()),
            "keys are unique"
        );
    }
    let last_of_a = delivered
        .iter()
        .rev()
        .find(|r| profile_of(&r.json().unwrap()) == "a")
        .unwrap();
    assert_eq!(
        last_of_a.json().unwrap(),
        json!({
            "person": {"name": {"firstName": "a-v1", "lastName": "Doe"}},
            "segmentMembership": {"ups": {SEGMENT_A: {"status": "realized", "lastQualificationTime": "2026-01-01T00:00:00Z"}}},
            "identityMap": {"ecid": [{"id": "ecid-a"}]}
        })
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn basic_credentials_and_scope() {
    let s = setup_with(
        ReceiverOptions::default(),
        |base| {
            format!(
                "{}\ncredentials = \"basic\"\nscope = \"profiles.write\"",
                oauth_body(base)
            )
        },
        "",
    )
    .await;
    let agent = start(&s.config).await;
    ingest(&agent, &updates(&["a"], 1)).await;
    drained(&agent, &s.receiver, 1).await;
    let t = &s.receiver.token_requests()[0];
    assert_eq!(
        std::str::from_utf8(&t.body).unwrap(),
        "grant_type=client_credentials&scope=profiles.write"
    );
    // base64("edge-agent:change-me")
    assert_eq!(
        t.header("authorization"),
        Some("Basic ZWRnZS1hZ2VudDpjaGFuZ2UtbWU=")
    );
    agent.stop().await.unwrap();
}

/// SPEC: a `Retry-After` is the earliest time the export is sent again, also when the agent
/// restarts meanwhile (the retry time is kept in the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_holds_across_a_restart() {
    let s = setup().await;
    let (script, arrivals) = timed(|n| match n {
        0 => Reply::Status(503, vec![("retry-after".into(), "8".into())], "busy".into()),
        _ => Reply::Normal,
    });
    s.receiver.set_export_script(Some(script));
    let agent = start(&s.config).await;
    ingest(&agent, &updates(&["a"], 1)).await;
    wait_until(10, "the first attempt", || {
        !arrivals.lock().unwrap().is_empty()
    })
    .await;
    // Stopped while the attempt may still be in flight: the stop waits for its answer and
    // records the failure, with its retry time, before its last flush.
    agent.stop().await.unwrap();
    let pending = outpost::store::Store::open(&s.config.storage.path, 8 << 20)
        .unwrap()
        .list(&ListFilter::default())
        .unwrap();
    assert_eq!(pending[0].record.attempts, 1, "the failure was recorded");
    let agent = start(&s.config).await;
    let restarted = Instant::now();
    let first = arrivals.lock().unwrap()[0];
    assert!(
        restarted < first + Duration::from_secs(6),
        "the restart must come before the Retry-After is over"
    );
    drained(&agent, &s.receiver, 1).await;
    let arrivals = arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 2, "one retry");
    assert!(
        arrivals[1] >= first + Duration::from_secs(8),
        "sent again {:?} after a Retry-After of 8 s",
        arrivals[1] - first
    );
    agent.stop().await.unwrap();
}

/// SPEC: the backoff doubles per failed attempt, also across a restart: an export that failed
/// five times waits `initial_backoff_ms` × 2^5 after its sixth failure, not
/// `initial_backoff_ms` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backoff_goes_on_doubling_across_a_restart() {
    let mut s = setup().await;
    s.config.delivery.initial_backoff = Duration::from_millis(100);
    s.config.delivery.max_backoff = Duration::from_secs(10);
    let (script, arrivals) = timed(|n| match n {
        0..=5 => Reply::Status(500, vec![], "failing".into()),
        _ => Reply::Normal,
    });
    s.receiver.set_export_script(Some(script));
    let agent = start(&s.config).await;
    ingest(&agent, &updates(&["a"], 1)).await;
    wait_until(10, "five attempts", || arrivals.lock().unwrap().len() >= 5).await;
    agent.stop().await.unwrap();
    let pending = outpost::store::Store::open(&s.config.storage.path, 8 << 20)
        .unwrap()
        .list(&ListFilter::default())
        .unwrap();
    assert_eq!(pending[0].record.attempts, 5, "the failures were recorded");
    let agent = start(&s.config).await;
    drained(&agent, &s.receiver, 1).await;
    let arrivals = arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 7, "two attempts after the restart");
    let gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    for (i, expected_ms) in [100, 200, 400, 800].into_iter().enumerate() {
        assert!(
            gaps[i] >= Duration::from_millis(expected_ms),
            "attempt {} came {:?} after the one before",
            i + 2,
            gaps[i]
        );
    }
    assert!(
        gaps[5] >= Duration::from_millis(3200),
        "after its sixth failure it waited {:?}, not 3.2 s",
        gaps[5]
    );
    agent.stop().await.unwrap();
}

/// `outbox retry --all-dead` puts nothing back: the one dead letter is listed under `why`,
/// naming export `newer` as `whose`.
async fn assert_not_retried(agent: &Agent, why: &str, whose: &str, newer: &str) {
    let answer = retry_all_dead(agent).await;
    assert_eq!(answer["retried"], json!([]), "{answer}");
    assert_eq!(answer[why][0][whose], json!(newer), "{answer}");
}

/// Starts an agent whose endpoint refuses the first request and holds the next ones past the
/// request timeout (500 ms), up to the `answered_from`th (from 0), which it answers 2xx; ingests
/// two exports of profile `a` and returns once the second is in flight, the first a dead letter.
async fn older_dead_newer_in_flight(s: &Setup, answered_from: u64) -> (Agent, u64) {
    let arrived = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = Arc::clone(&arrived);
    s.receiver.set_export_script(Some(Arc::new(move |n, _| {
        seen.store(n + 1, std::sync::atomic::Ordering::SeqCst);
        match n {
            0 => Reply::Status(400, vec![], "refused".into()),
            n if n < answered_from => Reply::Delay(Duration::from_secs(3)),
            _ => Reply::Normal,
        }
    })));
    let agent = start(&s.config).await;
    let first = agent.store.durable_next_seq();
    ingest(&agent, &updates(&["a"], 2)).await;
    wait_until(10, "the second export in flight", || {
        arrived.load(std::sync::atomic::Ordering::SeqCst) == 2
    })
    .await;
    (agent, first)
}

/// A dead letter retried while a newer export of its profile is in flight: the retry waits
/// for that request, which times out. The endpoint may have taken it all the same (this one
/// does, late), so the dead letter stays as it is until the newer export is delivered, which
/// supersedes it: the older export is never sent again. The newer one's retry entry leaves
/// with its delivery: nothing is left in `retry_at`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_timed_out_holds_a_dead_letter_and_its_retry_entry_leaves_with_it() {
    let s = setup().await;
    let (agent, first) = older_dead_newer_in_flight(&s, 2).await;
    let newer = agent.store.export_id(first + 1).to_string();
    assert_not_retried(&agent, "maybe_overtaken", "pending", &newer).await;
    wait_drained(&agent, &s.receiver, 1).await;
    assert_not_retried(&agent, "superseded", "acknowledged", &newer).await;
    let keys: Vec<u64> = delivered_pairs(&s.receiver)
        .iter()
        .map(|(_, key)| seq_of(key))
        .collect();
    assert!(
        !keys.is_empty() && keys.iter().all(|&k| k == first + 1),
        "{keys:?}"
    );
    agent.stop().await.unwrap();
    let db = open_with_sled_alone(&s.config.storage.path).unwrap();
    assert_eq!(db.open_tree("retry_at").unwrap().len(), 0);
}

/// `outbox drop` of a pending export whose request is in flight waits for that request. It
/// gets no answer (a timeout), so the endpoint may have taken it: the drop counts as its
/// delivery, and the profile's older dead letter is superseded, never sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_an_export_in_flight_that_gets_no_answer_supersedes_older_dead_letters() {
    let s = setup().await;
    let (agent, first) = older_dead_newer_in_flight(&s, u64::MAX).await;
    let newer = agent.store.export_id(first + 1).to_string();
    let request = outpost::admin::AdminRequest::Drop {
        ids: vec![newer.clone()],
        all_dead: false,
    };
    let dropped = admin_request(&agent, request).await;
    assert_eq!(dropped["dropped"], json!([newer]), "{dropped}");
    assert_not_retried(&agent, "superseded", "acknowledged", &newer).await;
    assert_eq!(agent.store.tally().unwrap().pending, 0);
    agent.stop().await.unwrap();
}

/// `outbox retry` while a newer export of the dead letter's profile is in flight waits for
/// that request to end, and starts no other meanwhile. The endpoint acknowledges it, so the
/// dead letter is not put back (SPEC: no older export of a profile is sent after a newer one
/// was acknowledged), then or later, and it is never sent.
#[tokio::test]
async fn a_dead_letter_is_not_put_back_behind_an_acknowledged_export() {
    let s = setup_with(
        ReceiverOptions::default(),
        oauth_body,
        "request_timeout_ms = 10000",
    )
    .await;
    // When each request arrived.
    let (script, arrivals) = timed(|n| match n {
        0 => Reply::Status(400, vec![], "refused".into()),
        1 => Reply::Delay(Duration::from_secs(2)),
        _ => Reply::Normal,
    });
    s.receiver.set_export_script(Some(script));
    let agent = start(&s.config).await;
    let first = agent.store.durable_next_seq();
    ingest(&agent, &updates(&["a"], 2)).await;
    wait_until(10, "the second export in flight", || {
        arrivals.lock().unwrap().len() == 2
    })
    .await;
    let older = agent.store.export_id(first).to_string();
    let newer = agent.store.export_id(first + 1).to_string();
    let superseded = json!([{"id": older, "acknowledged": newer}]);
    let retry = {
        let store = Arc::clone(&agent.store);
        tokio::task::spawn_blocking(move || {
            let request = outpost::admin::AdminRequest::Retry {
                ids: vec![],
                all_dead: true,
            };
            outpost::admin::execute(&store, &request).unwrap()
        })
    };
    wait_until(10, "the retry holding requests", || {
        agent.store.requests_held()
    })
    .await;
    // Another profile's export, ready while the retry waits: it goes once the retry is done.
    ingest(&agent, &updates(&["b"], 1)).await;
    let answer = retry.await.unwrap();
    assert_eq!(answer["retried"], json!([]), "{answer}");
    assert_eq!(answer["superseded"], superseded, "{answer}");
    wait_until(10, "b delivered", || s.receiver.delivered().len() == 2).await;
    let arrived = arrivals.lock().unwrap().clone();
    assert!(
        arrived[2] - arrived[1] >= Duration::from_millis(1500),
        "b was sent while the retry held requests, {:?} after a's second export",
        arrived[2] - arrived[1]
    );
    // Time enough for the loop to send the older one, had it been put back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let keys: Vec<u64> = s
        .receiver
        .export_requests()
        .iter()
        .map(|r| seq_of(r.header("idempotency-key").unwrap()))
        .collect();
    assert_eq!(
        keys,
        [first, first + 1, first + 2],
        "the older export went out after the newer one"
    );
    let tally = agent.store.tally().unwrap();
    assert_eq!((tally.pending, tally.dead), (0, 1));
    assert_eq!(retry_all_dead(&agent).await["superseded"], superseded);
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn token_endpoint_failures_back_off_and_never_dead_letter() {
    let s = setup().await;
    let (script, asked_at) = timed(|n| {
        if n < 3 {
            Reply::Status(503, vec![], "token service down".into())
        } else {
            Reply::Normal
        }
    });
    s.receiver.set_token_script(Some(script));
    let agent = start(&s.config).await;
    // One profile: its first export alone is sent, so one backoff schedule asks for tokens.
    ingest(&agent, &updates(&["a"], 2)).await;
    drained(&agent, &s.receiver, 2).await;
    assert_eq!(
        s.receiver.token_requests().len(),
        4,
        "three failures, then one token"
    );
    // Each failure waits the export's backoff (20 ms doubling; tests run without jitter): 20,
    // 40 and 80 ms, where retrying at once would take a few ms in all.
    let asked_at = asked_at.lock().unwrap().clone();
    let waited = asked_at[3] - asked_at[0];
    assert!(
        waited >= Duration::from_millis(140),
        "three failed token requests and the fourth within {waited:?}"
    );
    assert_eq!(agent.store.tally().unwrap().dead, 0);
    agent.stop().await.unwrap();
}

/// A token endpoint's `Retry-After` holds the exports waiting for a token as long: with no token
/// to be had, each attempt would fail at once, and its export be tried again on its backoff.
#[tokio::test]
async fn exports_waiting_for_a_token_wait_for_the_token_endpoints_retry_after() {
    let s = setup().await;
    let (script, asked_at) = timed(|n| match n {
        0 => Reply::Status(429, vec![("retry-after".into(), "2".into())], "".into()),
        _ => Reply::Normal,
    });
    s.receiver.set_token_script(Some(script));
    let agent = start(&s.config).await;
    ingest(&agent, &updates(&["a"], 1)).await;
    wait_until(10, "the first token request", || {
        !asked_at.lock().unwrap().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pending = agent.store.list(&ListFilter::default()).unwrap();
    // On its backoff alone (20 ms, doubling) it would have been tried 5 or 6 times by now.
    assert_eq!(pending[0].record.attempts, 1, "{pending:?}");
    drained(&agent, &s.receiver, 1).await;
    let asked_at = asked_at.lock().unwrap().clone();
    assert_eq!(asked_at.len(), 2);
    assert!(asked_at[1] - asked_at[0] >= Duration::from_secs(2));
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn server_errors_and_429_with_retry_after() {
    let s = setup().await;
    s.receiver.set_export_script(Some(Arc::new(|n, _| match n {
        0 | 1 => Reply::Status(500, vec![], "boom".into()),
        2 => Reply::rate_limited(),
        _ => Reply::Normal,
    })));
    let agent = start(&s.config).await;
    ingest(&agent, &updates(&["a"], 3)).await;
    let started = Instant::now();
    drained(&agent, &s.receiver, 3).await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was not honoured"
    );
    let requests = s.receiver.export_requests();
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [500, 500, 429, 200, 200, 200],
        "the profile's first export retried until delivered, its later ones behind it"
    );
    let first_key = requests[0].header("idempotency-key").unwrap();
    assert!(
        requests[..4]
            .iter()
            .all(|r| r.header("idempotency-key") == Some(first_key)),
        "the same key on every retry"
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn revoked_token_is_replaced_once() {
    let s = setup().await;
    let agent = start(&s.config).await;
    ingest(&agent, &updates(&["a", "b", "c", "d"], 1)).await;
    drained(&agent, &s.receiver, 4).await;
    s.receiver.revoke_tokens();
    let more: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .map(|p| member_update(p, "again", "2026-01-01T00:01:00Z"))
        .collect();
    ingest(&agent, &more).await;
    drained(&agent, &s.receiver, 8).await;
    assert_eq!(s.receiver.tokens_issued(), 2);
    let rejected = s
        .receiver
        .export_requests()
        .iter()
        .filter(|r| r.status == 401)
        .count() as u64;
    assert!(rejected >= 1);
    // Each answer is counted once, under its own outcome.
    use outpost::metrics::DeliveryOutcome::*;
    let m = &agent.metrics;
    assert_eq!(m.deliveries(AuthRejected), rejected);
    assert_eq!(m.deliveries(Retried), 0);
    assert_eq!(
        m.deliveries(Delivered) + rejected,
        s.receiver.export_requests().len() as u64
    );
    assert_eq!(agent.store.tally().unwrap().dead, 0);
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn token_is_refreshed_before_it_expires() {
    const LIFETIME: Duration = Duration::from_secs(6);
    let options = ReceiverOptions {
        token_lifetime: LIFETIME,
        ..ReceiverOptions::default()
    };
    let s = setup_with(options, oauth_body, "").await;
    let (script, asked_at) = timed(|_| Reply::Normal);
    s.receiver.set_token_script(Some(script));
    let agent = start(&s.config).await;
    ingest(&agent, &updates(&["a"], 1)).await;
    drained(&agent, &s.receiver, 1).await;
    // Refresh is due 0.6 s before the 6 s expiry, counted from before the token was asked
    // for: the next export comes between the two.
    let first_asked = asked_at.lock().unwrap()[0];
    tokio::time::sleep_until((first_asked + Duration::from_millis(5450)).into()).await;
    ingest(
        &agent,
        &[member_update("a", "later", "2026-01-01T00:01:00Z")],
    )
    .await;
    drained(&agent, &s.receiver, 2).await;
    assert_eq!(s.receiver.tokens_issued(), 2);
    // Asked before the first expired (one fetched only at expiry would be asked after).
    let asked_at = asked_at.lock().unwrap().clone();
    let second_after = asked_at[1] - asked_at[0];
    assert!(
        second_after < LIFETIME,
        "the second token was asked for {second_after:?} after the first"
    );
    assert!(
        s.receiver.export_requests().iter().all(|r| r.status == 200),
        "no request with an expiring token"
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn slow_answers_time_out_and_are_retried() {
    let s = setup().await;
    s.receiver.set_export_script(Some(Arc::new(|n, _| {
        if n == 0 {
            Reply::Delay(Duration::from_secs(2))
        } else {
            Reply::Normal
        }
    })));
    let agent = start(&s.config).await;
    // Timed from before the update: its first request may go out before ingest returns.
    let started = Instant::now();
    ingest(&agent, &updates(&["a"], 1)).await;
    drained(&agent, &s.receiver, 1).await;
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "the first answer was not waited for"
    );
    assert_eq!(
        s.receiver.export_arrivals(),
        2,
        "timed out once, then delivered"
    );
    assert_eq!(s.receiver.delivered().len(), 1);
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn connection_refused_until_the_receiver_starts() {
    let port_holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = port_holder.local_addr().unwrap();
    drop(port_holder);
    let dir = tempfile::tempdir().unwrap();
    let base = format!("http://{addr}");
    let path = dir.path().join("outpost.toml");
    std::fs::write(&path, agent_config_text(&base, &oauth_body(&base), "")).unwrap();
    let config = Config::load(&path).unwrap();
    let agent = start(&config).await;
    ingest(&agent, &updates(&["a", "b"], 2)).await;
    wait_until(10, "a recorded connection error", || {
        agent
            .store
            .list(&ListFilter::default())
            .unwrap()
            .iter()
            .any(|e| e.record.attempts > 0)
    })
    .await;
    let error = agent.store.list(&ListFilter::default()).unwrap()[0]
        .record
        .last_error
        .clone()
        .unwrap();
    assert!(error.contains("token endpoint"), "{error}");
    let receiver = Receiver::start(addr, ReceiverOptions::default())
        .await
        .unwrap();
    drained(&agent, &receiver, 4).await;
    agent.stop().await.unwrap();
}

/// A slow token endpoint is not taken for a slow destination: latency (and the controller's
/// round-trip times) count from when the request went out, after the token was there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_counts_from_the_request_not_from_the_wait_for_a_token() {
    let s = setup_with(
        ReceiverOptions::default(),
        oauth_body,
        "request_timeout_ms = 10000",
    )
    .await;
    s.receiver
        .set_token_script(Some(Arc::new(|_, _| Reply::Delay(Duration::from_secs(2)))));
    let agent = start(&s.config).await;
    ingest(&agent, &updates(&["a"], 1)).await;
    drained(&agent, &s.receiver, 1).await;
    let metrics = agent.metrics.render();
    let sum: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("outpost_delivery_latency_seconds_sum "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no latency sum in\n{metrics}"));
    // The token takes 2 s; the request far less, also on a loaded machine.
    assert!(sum < 1.0, "latency {sum} s counts the token's 2 s");
    agent.stop().await.unwrap();
}

/// An endpoint that knows the token endpoint's credentials (a gateway in front of both) and
/// echoes them in a refusal: the client secret is hidden in the error kept with the dead
/// letter, as the token is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_an_endpoint_echoes_are_hidden_in_its_error() {
    let s = setup().await;
    s.receiver.set_export_script(Some(Arc::new(|_, _| {
        Reply::Status(
            400,
            vec![],
            "client edge-agent, secret change-me: no".into(),
        )
    })));
    let agent = start(&s.config).await;
    ingest(&agent, &updates(&["a"], 1)).await;
    wait_until(10, "a dead letter", || {
        agent.store.tally().unwrap().dead == 1
    })
    .await;
    let dead = dead_letters(&agent);
    assert_eq!(
        dead[0].record.last_error.as_deref(),
        Some("HTTP 400: client edge-agent, secret ***: no")
    );
    agent.stop().await.unwrap();
}

/// An endpoint that refuses the request's headers as too large (431, as servers answer a
/// token of many KB) keeps the export, retried on its backoff, rather than dead-letter it:
/// the token or the custom headers are at fault, not what the export holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_refused_as_too_large_keep_the_export() {
    let s = setup().await;
    let refusing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let refuses = Arc::clone(&refusing);
    s.receiver.set_export_script(Some(Arc::new(move |_, _| {
        match refuses.load(std::sync::atomic::Ordering::SeqCst) {
            true => Reply::Status(431, vec![], "Request Header Fields Too Large".into()),
            false => Reply::Normal,
        }
    })));
    let agent = start(&s.config).await;
    ingest(&agent, &updates(&["a"], 1)).await;
    wait_until(10, "a few refused attempts", || {
        let pending = agent.store.list(&ListFilter::default()).unwrap();
        pending.len() == 1 && pending[0].record.attempts >= 2
    })
    .await;
    assert_eq!(agent.store.tally().unwrap().dead, 0);
    refusing.store(false, std::sync::atomic::Ordering::SeqCst);
    drained(&agent, &s.receiver, 1).await;
    assert_eq!(agent.store.tally().unwrap().dead, 0);
    agent.stop().await.unwrap();
}

/// A redirect is not followed, and its export is kept (retried on its backoff) rather than
/// dead-lettered: the endpoint moved, which is the configuration's to fix, not the export's.
/// Its stored error names where the redirect points, without the query, and no more of it
/// than 2 KiB in all however long the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_keeps_the_export_and_names_where_it_points() {
    let s = setup().await;
    let moved = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let moving = Arc::clone(&moved);
    let tokens_seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seeing = Arc::clone(&tokens_seen);
    s.receiver.set_export_script(Some(Arc::new(move |_, r| {
        if moving.load(std::sync::atomic::Ordering::SeqCst) {
            // An endpoint may echo what it was sent, the token too.
            let token = r
                .header("authorization")
                .unwrap()
                .trim_start_matches("Bearer ");
            seeing.lock().unwrap().push(token.to_owned());
            let long = match r.json().map(|p| profile_of(&p)).as_deref() {
                Some("long") => "/x".repeat(50_000),
                _ => String::new(),
            };
            let to = format!("https://new.example.com/{token}/profiles{long}?key=s3cret");
            Reply::Status(308, vec![("location".into(), to)], String::new())
        } else {
            Reply::Normal
        }
    })));
    let agent = start(&s.config).await;
    ingest(&agent, &updates(&["a", "long"], 1)).await;
    wait_until(10, "a few redirected attempts", || {
        let pending = agent.store.list(&ListFilter::default()).unwrap();
        pending.len() == 2 && pending.iter().all(|e| e.record.attempts >= 2)
    })
    .await;
    let pending = agent.store.list(&ListFilter::default()).unwrap();
    let error = pending[0].record.last_error.clone().unwrap();
    assert!(
        error.starts_with("HTTP 308 (a redirect to https://new.example.com/***/profiles?…"),
        "{error}"
    );
    assert!(!error.contains("s3cret"), "{error}");
    for token in tokens_seen.lock().unwrap().iter() {
        assert!(!error.contains(token.as_str()), "{error}");
    }
    let long = pending[1].record.last_error.clone().unwrap();
    assert!(
        long.starts_with("HTTP 308 (a redirect to https://new.example.com/***/profiles/x/x/")
            && long.ends_with("/x…")
            && long.len() <= 2048 + '…'.len_utf8(),
        "{} bytes: {}",
        long.len(),
        &long[..100]
    );
    assert_eq!(agent.store.tally().unwrap().dead, 0);
    moved.store(false, std::sync::atomic::Ordering::SeqCst);
    drained(&agent, &s.receiver, 2).await;
    assert_eq!(agent.store.tally().unwrap().dead, 0);
    agent.stop().await.unwrap();
}

/// An endpoint that refuses one profile's export for its token (403) while it takes the
/// others: the first refusal is retried at once with a new token, the later ones on the
/// export's backoff, so the export is neither sent nor a token fetched as fast as the
/// endpoint answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_refused_for_its_token_while_others_go_waits_for_its_backoff() {
    let s = setup().await;
    s.receiver.set_export_script(Some(Arc::new(|_, r| {
        if r.json().is_some_and(|p| profile_of(&p) == "forbidden") {
            Reply::Status(403, vec![], "not for this tenant".into())
        } else {
            Reply::Normal
        }
    })));
    let agent = start(&s.config).await;
    ingest(&agent, &updates(&["forbidden"], 1)).await;
    // Other profiles' exports keep being delivered meanwhile, so the destination never
    // looks down.
    let started = Instant::now();
    let mut others = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        ingest(&agent, &updates(&[&format!("ok{others}")], 1)).await;
        others += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Tokens first: a refusal counted after them cannot outnumber them.
    let tokens = s.receiver.tokens_issued();
    let refused = s
        .receiver
        .export_requests()
        .iter()
        .filter(|r| r.status == 403)
        .count();
    // Backoff of 20 ms doubling up to 200 ms: about a dozen attempts in 1.5 s.
    assert!(
        (2..=20).contains(&refused),
        "{refused} refused attempts in 1.5 s"
    );
    assert!(
        tokens <= refused as u64 + 1,
        "{tokens} tokens for {refused} refusals"
    );
    wait_until(10, "the other profiles' exports delivered", || {
        distinct_delivered(&s.receiver) == others
    })
    .await;
    assert_eq!(agent.store.tally().unwrap().pending, 1, "still pending");
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn rejected_exports_are_dead_lettered_while_the_rest_go_on() {
    let s = setup().await;
    let reject = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let rejecting = Arc::clone(&reject);
    s.receiver.set_export_script(Some(Arc::new(move |_, r| {
        let bad = r.json().is_some_and(|p| profile_of(&p) == "bad");
        if bad && rejecting.load(std::sync::atomic::Ordering::Relaxed) {
            Reply::Status(400, vec![], "{\"error\":\"firstName too long\"}".into())
        } else {
            Reply::Normal
        }
    })));
    let agent = start(&s.config).await;
    ingest(&agent, &updates(&["bad", "good1", "good2"], 3)).await;
    wait_until(30, "good exports delivered and bad ones dead", || {
        let t = agent.store.tally().unwrap();
        t.pending == 0 && t.dead == 3
    })
    .await;
    assert_eq!(s.receiver.delivered().len(), 6);
    let dead = dead_letters(&agent);
    assert_eq!(dead.len(), 3);
    for e in &dead {
        assert_eq!(e.record.profile_id, "bad");
        assert_eq!(e.record.attempts, 1);
        assert_eq!(
            e.record.last_error.as_deref(),
            Some("HTTP 400: {\"error\":\"firstName too long\"}")
        );
        assert!(e.record.dead_at_ms.is_some());
    }
    // Repaired: the destination now takes them, and a retry puts them back in order.
    reject.store(false, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(retried_all_dead(&agent).await, 3);
    tokio::time::sleep(Duration::from_millis(1100)).await; // the loop's idle tick picks them up
    drained(&agent, &s.receiver, 9).await;
    let dead_keys: Vec<String> = dead.iter().map(|e| e.id.to_string()).collect();
    let delivered_bad: Vec<String> = delivered_pairs(&s.receiver)
        .into_iter()
        .filter(|(p, _)| p == "bad")
        .map(|(_, k)| k)
        .collect();
    assert_eq!(delivered_bad, dead_keys, "the same ids, oldest first");
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn expired_exports_are_dead_lettered() {
    let s = setup_with(ReceiverOptions::default(), oauth_body, "max_age_s = 1").await;
    s.receiver
        .set_export_script(Some(outpost::receiver::down()));
    let agent = start(&s.config).await;
    ingest(&agent, &updates(&["a", "b"], 1)).await;
    wait_until(20, "both exports expired", || {
        agent.store.tally().unwrap().dead == 2
    })
    .await;
    let dead = dead_letters(&agent);
    assert!(
        dead[0]
            .record
            .last_error
            .as_deref()
            .unwrap()
            .contains("max_age_s"),
        "{:?}",
        dead[0].record.last_error
    );
    agent.stop().await.unwrap();
}

/// An export whose retry the endpoint puts off past the export's expiry (`Retry-After:
/// 3600`) is dead-lettered once it expires: it stayed pending, counted as waiting to go, until
/// the hour was over, though it could never be sent before then.
#[tokio::test]
async fn an_export_put_off_past_its_expiry_is_dead_lettered_when_it_expires() {
    let s = setup_with(ReceiverOptions::default(), oauth_body, "max_age_s = 2").await;
    s.receiver.set_export_script(Some(Arc::new(|_, _| {
        Reply::Status(
            429,
            vec![("retry-after".into(), "3600".into())],
            "later".into(),
        )
    })));
    let agent = start(&s.config).await;
    ingest(&agent, &updates(&["a", "b"], 1)).await;
    wait_until(20, "both exports expired", || {
        agent.store.tally().unwrap().dead == 2
    })
    .await;
    for export in dead_letters(&agent) {
        let error = export.record.last_error.unwrap_or_default();
        assert!(error.contains("max_age_s"), "{error}");
    }
    assert_eq!(s.receiver.export_requests().len(), 2, "each sent once");
    agent.stop().await.unwrap();
}

/// A destination that takes a token only a while after it was issued (an identity provider
/// slow to spread new tokens, or a resource server whose clock is behind the tokens' `nbf`):
/// the token after a refused one is fetched at once, and has aged by the time the export's
/// backoff lets it go again (here 100 ms, within the tests' `max_backoff_ms` of 200). Fetched
/// only when a request needed it, every token went out the moment it came, was refused, and
/// was replaced: nothing was ever delivered.
#[tokio::test]
async fn a_token_the_destination_takes_only_a_while_after_it_was_issued_is_used_then() {
    let s = setup().await;
    let issued: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>> = Arc::default();
    let recorded = Arc::clone(&issued);
    s.receiver.set_token_script(Some(Arc::new(move |n, _| {
        let token = format!("slow-{n}");
        recorded
            .lock()
            .unwrap()
            .insert(token.clone(), Instant::now());
        let body = json!({"access_token": token, "token_type": "Bearer", "expires_in": 3600});
        let json = ("content-type".to_owned(), "application/json".to_owned());
        Reply::Status(200, vec![json], body.to_string())
    })));
    s.receiver
        .set_export_script(Some(Arc::new(move |_, received| {
            let token = received
                .header("authorization")
                .and_then(|v| v.strip_prefix("Bearer "));
            let issued_at = token.and_then(|t| issued.lock().unwrap().get(t).copied());
            match issued_at {
                Some(at) if at.elapsed() >= Duration::from_millis(100) => {
                    Reply::Status(200, vec![], String::new())
                }
                _ => Reply::Status(401, vec![], "token not valid yet".into()),
            }
        })));
    let agent = start(&s.config).await;
    ingest(&agent, &updates(&["a", "b"], 1)).await;
    wait_until(30, "both exports delivered", || {
        s.receiver.delivered().len() == 2
    })
    .await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn one_token_request_is_shared_by_concurrent_deliveries() {
    let s = setup().await;
    s.receiver.set_token_script(Some(Arc::new(|_, _| {
        Reply::Delay(Duration::from_millis(200))
    })));
    let agent = start(&s.config).await;
    ingest(&agent, &updates(&["a", "b", "c", "d", "e", "f"], 2)).await;
    drained(&agent, &s.receiver, 12).await;
    assert_eq!(s.receiver.token_requests().len(), 1);
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn static_bearer_and_no_auth() {
    let s = setup_with(
        ReceiverOptions::default(),
        |_| "type = \"bearer\"\ntoken = \"static-token\"".into(),
        "",
    )
    .await;
    s.receiver.set_export_script(Some(Arc::new(|_, r| {
        if r.header("authorization") == Some("Bearer static-token") {
            Reply::Status(200, vec![], "ok".into())
        } else {
            Reply::Status(400, vec![], "wrong token".into())
        }
    })));
    let agent = start(&s.config).await;
    ingest(&agent, &updates(&["a"], 1)).await;
    drained(&agent, &s.receiver, 1).await;
    assert_eq!(s.receiver.token_requests().len(), 0);
    agent.stop().await.unwrap();

    // A static token the endpoint refuses: each refusal counts, as for a token fetched, and
    // the destination goes down rather than be sent every export over and over.
    let s = setup_with(
        ReceiverOptions::default(),
        |_| "type = \"bearer\"\ntoken = \"revoked\"".into(),
        "",
    )
    .await;
    s.receiver.set_export_script(Some(Arc::new(|_, _| {
        Reply::Status(401, vec![], "revoked".into())
    })));
    let agent = start(&s.config).await;
    let ids = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"];
    ingest(&agent, &updates(&ids, 1)).await;
    wait_until(10, "the destination down", || {
        agent.metrics.destination_down.get() == 1
    })
    .await;
    agent.stop().await.unwrap();

    let s = setup_with(ReceiverOptions::default(), |_| "type = \"none\"".into(), "").await;
    s.receiver.set_export_script(Some(Arc::new(|_, r| {
        if r.header("authorization").is_none() {
            Reply::Status(204, vec![], String::new())
        } else {
            Reply::Status(400, vec![], "unexpected token".into())
        }
    })));
    let agent = start(&s.config).await;
    ingest(&agent, &updates(&["a"], 1)).await;
    drained(&agent, &s.receiver, 1).await;
    agent.stop().await.unwrap();
}

/// Writes `text` to a secret's file as a secret manager rotates it: into a file of its own,
/// renamed into place.
fn rotate(file: &std::path::Path, text: &str) {
    let next = file.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, file).unwrap();
}

/// A static token rotated in its file is read again at the destination's next refusal: the
/// exports refused with the old token go out with the new one, without a restart.
#[tokio::test]
async fn a_token_rotated_in_its_file_is_taken_up_without_a_restart() {
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("token");
    std::fs::write(&token_file, "old-token\n").unwrap();
    let s = setup_with(
        ReceiverOptions::default(),
        |_| {
            format!(
                "type = \"bearer\"\ntoken_file = \"{}\"",
                token_file.display()
            )
        },
        "",
    )
    .await;
    s.receiver.set_export_script(Some(Arc::new(|_, r| {
        if r.header("authorization") == Some("Bearer new-token") {
            Reply::Status(200, vec![], "ok".into())
        } else {
            Reply::Status(401, vec![], "revoked".into())
        }
    })));
    let agent = start(&s.config).await;
    ingest(&agent, &updates(&["a", "b", "c"], 2)).await;
    wait_until(10, "the old token refused", || {
        s.receiver.export_requests().len() >= 3
    })
    .await;
    rotate(&token_file, "new-token\n");
    drained(&agent, &s.receiver, 6).await;
    assert!(s
        .receiver
        .delivered()
        .iter()
        .all(|r| r.header("authorization") == Some("Bearer new-token")));
    agent.stop().await.unwrap();
}

/// An API key given in `custom_headers_file` and rotated there is read again at the
/// destination's next refusal: the exports refused with the old key go out with the new one,
/// without a restart, beside the headers of `custom_headers`.
#[tokio::test]
async fn an_api_key_rotated_in_the_custom_headers_file_is_taken_up_without_a_restart() {
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
        .await
        .unwrap();
    receiver.set_export_script(Some(Arc::new(|_, r| {
        if r.header("x-api-key") == Some("new-key") {
            Reply::Status(200, vec![], "ok".into())
        } else {
            Reply::Status(401, vec![], "unknown key".into())
        }
    })));
    let dir = tempfile::tempdir().unwrap();
    let headers_file = dir.path().join("headers");
    std::fs::write(&headers_file, "X-Api-Key:old-key\n").unwrap();
    let text = agent_config_text(&receiver.base_url(), "type = \"none\"", "");
    let with_file = text.replacen(
        "custom_headers = \"x-api-version:2,x-tenant:acme\"",
        "custom_headers = \"x-api-version:2,x-tenant:acme\"\ncustom_headers_file = \"headers\"",
        1,
    );
    assert_ne!(with_file, text);
    let config_path = dir.path().join("outpost.toml");
    std::fs::write(&config_path, with_file).unwrap();
    let config = Config::load(&config_path).unwrap();
    let agent = start(&config).await;
    ingest(&agent, &updates(&["a", "b", "c"], 1)).await;
    wait_until(10, "the old key refused", || {
        receiver.export_requests().len() >= 2
    })
    .await;
    rotate(&headers_file, "X-Api-Key:new-key\n");
    drained(&agent, &receiver, 3).await;
    for request in receiver.delivered() {
        assert_eq!(request.header("x-api-version"), Some("2"));
        assert_eq!(request.header("x-tenant"), Some("acme"));
    }
    agent.stop().await.unwrap();
}

/// The client secret and the password, rotated in their files at the identity provider's
/// side, are read again at the next token request: the token endpoint, which refused the old
/// ones, gives a token, and the exports go out without a restart.
#[tokio::test]
async fn a_client_secret_or_password_rotated_in_its_file_is_taken_up_without_a_restart() {
    // (the grant's keys, the file rotated, what the token endpoint takes)
    let cases = [
        (
            "type = \"oauth2_client_credentials\"\nclient_secret_file = \"{secret}\"",
            "secret",
            ReceiverOptions {
                client_secret: "new-secret".into(),
                ..ReceiverOptions::default()
            },
        ),
        (
            "type = \"oauth2_password\"\nclient_secret = \"change-me\"\nusername = \"ops\"\npassword_file = \"{password}\"",
            "password",
            ReceiverOptions {
                user: Some(("ops".into(), "new-password".into())),
                ..ReceiverOptions::default()
            },
        ),
    ];
    for (grant, rotated, options) in cases {
        let secrets = tempfile::tempdir().unwrap();
        let (secret, password) = (
            secrets.path().join("secret"),
            secrets.path().join("password"),
        );
        std::fs::write(&secret, "old-secret\n").unwrap();
        std::fs::write(&password, "old-password\n").unwrap();
        let grant = grant
            .replace("{secret}", &secret.display().to_string())
            .replace("{password}", &password.display().to_string());
        let s = setup_with(
            options,
            |base| {
                format!(
                    "{grant}\nauth_endpoint = \"{base}/oauth/token\"\nclient_id = \"edge-agent\""
                )
            },
            "",
        )
        .await;
        let agent = start(&s.config).await;
        ingest(&agent, &updates(&["a", "b"], 1)).await;
        wait_until(10, "the old secret refused", || {
            s.receiver.token_requests().len() >= 2
        })
        .await;
        assert!(s.receiver.delivered().is_empty(), "{rotated}");
        match rotated {
            "secret" => rotate(&secret, "new-secret\n"),
            _ => rotate(&password, "new-password\n"),
        }
        drained(&agent, &s.receiver, 2).await;
        agent.stop().await.unwrap();
    }
}

/// An endpoint that answers each request `200` with a body it never finishes: the status
/// came, so each export was taken, once; none is sent again for the body that stalled past
/// the request timeout (500 ms here), and the concurrency is not cut for it.
#[tokio::test]
async fn a_2xx_whose_body_stalls_is_delivered_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&requests);
    let endpoint = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            let counted = Arc::clone(&counted);
            held.push(tokio::spawn(async move {
                // One request a connection: its answer never ends.
                let mut request = Vec::new();
                let mut buf = [0u8; 8192];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let head = "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"ok\":";
                let _ = socket.write_all(head.as_bytes()).await;
                tokio::time::sleep(Duration::from_secs(60)).await;
            }));
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outpost.toml");
    std::fs::write(&path, agent_config_text(&base, "type = \"none\"", "")).unwrap();
    let config = Config::load(&path).unwrap();
    let agent = start(&config).await;
    ingest(&agent, &updates(&["a", "b", "c"], 1)).await;
    wait_until(30, "every export delivered", || {
        agent.store.tally().unwrap().pending == 0
    })
    .await;
    // Longer than the request timeout, for a retry to show.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 3);
    use outpost::metrics::DeliveryOutcome;
    assert_eq!(agent.metrics.deliveries(DeliveryOutcome::Delivered), 3);
    assert_eq!(agent.metrics.deliveries(DeliveryOutcome::Retried), 0);
    assert_eq!(
        agent.metrics.concurrency_limit.get(),
        4,
        "the limit it started at"
    );
    agent.stop().await.unwrap();
    endpoint.abort();
}
