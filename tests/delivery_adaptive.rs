//! How delivery adapts to the endpoint, over real sockets: more requests in flight for a slow
//! endpoint, few 429s from a rate-limited one, a `Retry-After` that delays only its own export
//! and profile, one probe at a time while the endpoint is down, array bodies, and the OAuth 2
//! password grant with refresh tokens.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use outpost::admin::AdminRequest;
use outpost::agent::Agent;
use outpost::config::Config;
use outpost::receiver::{self, FixedWindow, RateLimit, Received, Receiver, ReceiverOptions, Reply};
use outpost::store::{ListFilter, Store};

async fn setup(
    options: ReceiverOptions,
    auth: impl Fn(&str) -> String,
    delivery: &str,
) -> ReceiverSetup {
    receiver_setup(options, auth, delivery).await
}

async fn start(config: &Config) -> Agent {
    start_agent(config).await
}

/// One update (which exports) for each of `n` profiles `<prefix>0`, `<prefix>1`, …, `round`
/// giving each a new first name.
fn one_each(prefix: &str, n: usize, round: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            member_update(
                &format!("{prefix}{i}"),
                &format!("{prefix}{i}-v{round}"),
                &format!("2026-01-01T00:00:{:02}Z", round + 1),
            )
        })
        .collect()
}

async fn ingest(agent: &Agent, lines: &[String]) {
    let (status, body) = http_post(agent.listen_addr, "/v1/updates", lines.join("\n"), &[]).await;
    assert_eq!(status, 200, "{body}");
}

/// How many export requests were answered 429, of how many.
fn answered_429(receiver: &Receiver) -> (usize, usize) {
    let requests = receiver.export_requests();
    let refused = requests.iter().filter(|r| r.status == 429).count();
    (refused, requests.len())
}

async fn wait_for_exports(agent: &Agent, receiver: &Receiver, exports: usize) {
    wait_until(60, "every export delivered", || {
        let mut keys: Vec<String> = delivered_pairs(receiver).into_iter().map(|p| p.1).collect();
        keys.sort();
        keys.dedup();
        keys.len() >= exports && agent.store.tally().unwrap().pending == 0
    })
    .await;
    assert_per_profile_order(&delivered_pairs(receiver));
}

#[tokio::test]
async fn a_slow_endpoint_gets_more_requests_in_flight() {
    let s = setup(
        ReceiverOptions::default(),
        oauth_body,
        "max_concurrency = 32",
    )
    .await;
    s.receiver.set_export_script(Some(Arc::new(|_, _| {
        Reply::Delay(Duration::from_millis(50))
    })));
    let agent = start(&s.config).await;
    ingest(&agent, &one_each("p", 600, 0)).await;
    wait_for_exports(&agent, &s.receiver, 600).await;
    let most = s.receiver.max_in_flight();
    assert!(
        most > 8,
        "the limit should grow past its start of 8 on a steady slow endpoint; at most {most} in flight"
    );
    assert!(most <= 32, "never above max_concurrency: {most}");
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_rate_limited_endpoint_gets_few_429s_and_everything_arrives_in_order() {
    let s = setup(
        ReceiverOptions::default(),
        oauth_body,
        "max_concurrency = 32",
    )
    .await;
    let bucket = Arc::new(RateLimit::new(300.0, 30.0));
    s.receiver.set_export_script(Some(bucket.script()));
    let agent = start(&s.config).await;
    let mut lines = one_each("p", 400, 0);
    lines.extend(one_each("p", 400, 1));
    ingest(&agent, &lines).await;
    wait_for_exports(&agent, &s.receiver, 800).await;
    let (refused, requests) = answered_429(&s.receiver);
    assert!(refused > 0, "the bucket should have refused something");
    assert!(
        refused * 10 <= requests,
        "{refused} of {requests} requests answered 429: the rate should settle at the limit"
    );
    assert!(
        agent.metrics.rate_cap.get() > 0,
        "the 429s set a request rate cap"
    );
    let metrics = agent.metrics.render();
    assert!(metrics.contains("outpost_delivery_retries_total{cause=\"rate_limited\"}"));
    assert!(metrics.contains("outpost_delivery_concurrency_limit"));
    agent.stop().await.unwrap();
}

/// An endpoint that says what its window has left (`RateLimit-Remaining`, `RateLimit-Reset`)
/// is not sent more than that: requests wait for the next window rather than collect 429s.
#[tokio::test]
async fn an_advertised_quota_is_waited_for_rather_than_refused() {
    let s = setup(
        ReceiverOptions::default(),
        oauth_body,
        "max_concurrency = 32",
    )
    .await;
    // 50 a second; unadvertised, the same window refused about 150 of 450 requests.
    let window = Arc::new(FixedWindow::new(50, Duration::from_secs(1), true));
    s.receiver.set_export_script(Some(window.script()));
    let agent = start(&s.config).await;
    assert_eq!(agent.metrics.quota_left.get(), -1, "no quota heard yet");
    ingest(&agent, &one_each("p", 300, 0)).await;
    wait_until(30, "a window's quota spent", || {
        agent.metrics.quota_left.get() == 0
    })
    .await;
    wait_for_exports(&agent, &s.receiver, 300).await;
    let (refused, requests) = answered_429(&s.receiver);
    assert!(
        refused <= 3,
        "{refused} of {requests} requests answered 429 though every answer said what was left"
    );
    agent.stop().await.unwrap();
}

/// With `delivery.rate_limit_headers = false`, an endpoint's quota headers are not believed:
/// one whose every answer says nothing is left for an hour (headers meant for another quota,
/// say) still gets every export, with no wait for that hour.
#[tokio::test]
async fn quota_headers_are_ignored_when_the_config_says_so() {
    let s = setup(
        ReceiverOptions::default(),
        oauth_body,
        "rate_limit_headers = false",
    )
    .await;
    s.receiver.set_export_script(Some(Arc::new(|_, _| {
        Reply::NormalWith(vec![
            ("ratelimit-remaining".into(), "0".into()),
            ("ratelimit-reset".into(), "3600".into()),
        ])
    })));
    let agent = start(&s.config).await;
    ingest(&agent, &one_each("p", 50, 0)).await;
    wait_for_exports(&agent, &s.receiver, 50).await;
    assert_eq!(agent.metrics.quota_left.get(), -1, "a quota was heard");
    agent.stop().await.unwrap();
}

/// 429s whose `Retry-After` counts down to one instant are a window that refuses everything
/// until then: delivery takes its quota for spent until that instant (how much that spares
/// is measured in the controller's simulation), then delivers everything.
#[tokio::test]
async fn a_window_whose_429s_count_down_is_taken_for_a_spent_quota() {
    let s = setup(ReceiverOptions::default(), oauth_body, "").await;
    let opens_at = std::sync::Mutex::new(None::<Instant>);
    s.receiver.set_export_script(Some(Arc::new(move |_, _| {
        let now = Instant::now();
        let at = *opens_at
            .lock()
            .unwrap()
            .get_or_insert(now + Duration::from_secs(4));
        if now >= at {
            return Reply::Normal;
        }
        let rest = (at - now).as_secs_f64().ceil().to_string();
        Reply::Status(429, vec![("retry-after".into(), rest)], "wait".into())
    })));
    let agent = start(&s.config).await;
    ingest(&agent, &one_each("p", 300, 0)).await;
    wait_until(10, "the window's end told from the 429s", || {
        agent.metrics.quota_left.get() == 0
    })
    .await;
    wait_for_exports(&agent, &s.receiver, 300).await;
    agent.stop().await.unwrap();
}

/// The profile an export request is about (single bodies only).
fn profile_in(request: &Received) -> String {
    request.json().map(|p| profile_of(&p)).unwrap_or_default()
}

#[tokio::test]
async fn retry_after_delays_only_its_export_and_its_profile() {
    let s = setup(ReceiverOptions::default(), oauth_body, "").await;
    let refused_once = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&refused_once);
    s.receiver.set_export_script(Some(Arc::new(move |_, r| {
        if profile_in(r) == "slow0" && !flag.swap(true, Ordering::SeqCst) {
            Reply::Status(429, vec![("retry-after".into(), "5".into())], "wait".into())
        } else {
            Reply::Normal
        }
    })));
    let agent = start(&s.config).await;
    let started = Instant::now();
    let mut lines = one_each("slow", 1, 0);
    lines.extend(one_each("slow", 1, 1));
    lines.extend(one_each("fast", 20, 0));
    ingest(&agent, &lines).await;
    wait_until(10, "the other profiles delivered", || {
        delivered_pairs(&s.receiver)
            .iter()
            .filter(|(p, _)| p.starts_with("fast"))
            .count()
            == 20
    })
    .await;
    // 20 exports take well under a second; the margin is for a loaded machine.
    let others_took = started.elapsed();
    assert!(
        others_took < Duration::from_secs(4),
        "other profiles waited for the 429's Retry-After of 5 s: {others_took:?}"
    );
    assert!(
        !delivered_pairs(&s.receiver)
            .iter()
            .any(|(p, _)| p == "slow0"),
        "the refused profile's later export must wait behind it"
    );
    wait_for_exports(&agent, &s.receiver, 22).await;
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "Retry-After: 5 was not honoured"
    );
    agent.stop().await.unwrap();
}

// Two threads, and answers that wait without blocking one: two probes sent together overlap
// at the receiver, so the count of those in flight can see them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_endpoint_gets_one_probe_at_a_time_and_delivery_resumes_when_it_is_back() {
    let s = setup(
        ReceiverOptions::default(),
        oauth_body,
        "max_concurrency = 16\n",
    )
    .await;
    let down = Arc::new(AtomicBool::new(true));
    let flag = Arc::clone(&down);
    s.receiver.set_export_script(Some(Arc::new(move |_, _| {
        if flag.load(Ordering::SeqCst) {
            Reply::After(Duration::from_millis(30), Box::new(Reply::down()))
        } else {
            Reply::Normal
        }
    })));
    let agent = start(&s.config).await;
    ingest(&agent, &one_each("p", 200, 0)).await;
    wait_until(10, "the destination counted as down", || {
        agent.metrics.destination_down.get() == 1
    })
    .await;
    // Answers to requests sent before it went down may still be on their way.
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.receiver.reset_max_in_flight();
    let before = s.receiver.export_arrivals();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let probes = s.receiver.export_arrivals() - before;
    assert!(
        s.receiver.max_in_flight() <= 1,
        "at most one probe in flight while down, saw {}",
        s.receiver.max_in_flight()
    );
    // Backoff 20 ms doubling to 200 ms: about 8 probes in 1.5 s, never a flood.
    assert!(
        (1..=15).contains(&probes),
        "{probes} probes in 1.5 s while down"
    );
    down.store(false, Ordering::SeqCst);
    let back = Instant::now();
    wait_until(5, "the first delivery after the outage", || {
        !s.receiver.delivered().is_empty()
    })
    .await;
    let resumed_after = back.elapsed();
    // One backoff step (max_backoff 200 ms) and a probe's round trip, with room for a busy
    // machine; far below what hammering or a stuck loop would show.
    assert!(
        resumed_after <= Duration::from_millis(4000),
        "delivery resumed {resumed_after:?} after the endpoint came back (max_backoff 200 ms)"
    );
    wait_for_exports(&agent, &s.receiver, 200).await;
    assert_eq!(agent.metrics.destination_down.get(), 0);
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn arrays_of_distinct_profiles_and_a_refused_array_is_split() {
    let s = setup(
        ReceiverOptions::default(),
        oauth_body,
        "max_profiles_per_request = 5",
    )
    .await;
    s.receiver.set_export_script(Some(Arc::new(move |_, r| {
        let refused = r
            .json()
            .and_then(|v| v.as_array().cloned())
            .is_some_and(|items| items.iter().any(|p| profile_of(p) == "bad0"));
        if refused {
            Reply::Status(400, vec![], "bad0 is refused".into())
        } else {
            Reply::Normal
        }
    })));
    // The outbox is filled before the agent starts, so that every export id is known; bad0
    // comes first, so the first array holds it.
    let mut lines = one_each("bad", 1, 0);
    lines.extend(one_each("p", 20, 0));
    lines.extend(one_each("p", 20, 1));
    let listed = prefill(&s.config, &lines);
    assert_eq!(listed.len(), 41);
    let agent = start(&s.config).await;
    wait_until(30, "the good exports delivered", || {
        delivered_pairs(&s.receiver).len() >= 40 && agent.store.tally().unwrap().pending == 0
    })
    .await;

    let requests: Vec<Received> = s.receiver.export_requests().into_iter().collect();
    let mut most = 0;
    for request in &requests {
        let items = request.json().unwrap();
        let items = items.as_array().expect("every body is an array");
        most = most.max(items.len());
        let keys: Vec<&str> = request
            .header("idempotency-key")
            .unwrap()
            .split(',')
            .collect();
        assert_eq!(keys.len(), items.len());
        let mut profiles: Vec<String> = Vec::new();
        for (key, item) in keys.iter().zip(items) {
            assert_eq!(
                listed.get(*key),
                Some(&profile_of(item)),
                "key {key} names the export at its place in the array"
            );
            profiles.push(profile_of(item));
        }
        let count = profiles.len();
        profiles.sort();
        profiles.dedup();
        assert_eq!(profiles.len(), count, "an array holds distinct profiles");
    }
    assert!(
        most > 1 && most <= 5,
        "arrays of up to 5, the largest held {most}"
    );
    // The array holding bad0 was refused and split; only bad0 itself was dead-lettered.
    let dead = agent
        .store
        .list(&ListFilter {
            dead: true,
            ..ListFilter::default()
        })
        .unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].record.profile_id, "bad0");
    let pairs = delivered_pairs(&s.receiver);
    let mut keys: Vec<&String> = pairs.iter().map(|p| &p.1).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 40, "every good export delivered");
    assert_per_profile_order(&pairs);
    assert!(agent.metrics.splits() >= 1);
    // The array that held bad0 was refused; the next request with bad0 holds it alone.
    let with_bad: Vec<usize> = requests
        .iter()
        .filter_map(|r| {
            let items = r.json()?.as_array()?.clone();
            items
                .iter()
                .any(|p| profile_of(p) == "bad0")
                .then_some(items.len())
        })
        .collect();
    assert!(with_bad.len() >= 2 && with_bad[0] > 1, "{with_bad:?}");
    assert_eq!(with_bad[1], 1, "split: bad0 went alone next ({with_bad:?})");
    agent.stop().await.unwrap();
}

/// Commits `lines` straight into the agent's store (as `outpost ingest` does without an
/// agent) and returns each export's profile by export id.
fn prefill(config: &Config, lines: &[String]) -> HashMap<String, String> {
    let store = Store::open(&config.storage.path, config.storage.cache_bytes).unwrap();
    let updates = pruned_updates(lines, &config.mapping);
    store
        .apply_groups(&[&updates], &config.mapping, chrono::Utc::now())
        .unwrap();
    store.flush().unwrap();
    store
        .list(&ListFilter::default())
        .unwrap()
        .into_iter()
        .map(|e| (e.id.to_string(), e.record.profile_id))
        .collect()
}

fn password_auth(base: &str) -> String {
    format!(
        "type = \"oauth2_password\"\nauth_endpoint = \"{base}/oauth/token\"\nclient_id = \"edge-agent\"\nclient_secret = \"change-me\"\nusername = \"ops\"\npassword = \"pass word\""
    )
}

fn grant_of(request: &Received) -> String {
    url::form_urlencoded::parse(&request.body)
        .find(|(k, _)| k == "grant_type")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn the_password_grant_then_refresh_tokens_and_back_to_the_password_when_not_answered() {
    let options = ReceiverOptions {
        user: Some(("ops".into(), "pass word".into())),
        refresh_tokens: true,
        ..ReceiverOptions::default()
    };
    let s = setup(options, password_auth, "").await;
    let agent = start(&s.config).await;
    ingest(&agent, &one_each("p", 3, 0)).await;
    wait_for_exports(&agent, &s.receiver, 3).await;
    let first = &s.receiver.token_requests()[0];
    let form: HashMap<String, String> = url::form_urlencoded::parse(&first.body)
        .into_owned()
        .collect();
    assert_eq!(form["grant_type"], "password");
    assert_eq!(form["username"], "ops");
    assert_eq!(form["password"], "pass word");

    // The access token is revoked: the refresh token gets a new one.
    s.receiver.revoke_tokens();
    ingest(&agent, &one_each("p", 3, 1)).await;
    wait_for_exports(&agent, &s.receiver, 6).await;
    // Both the access and the refresh token are revoked: the refresh is refused, and the
    // password grant is used again.
    s.receiver.revoke_tokens();
    s.receiver.revoke_refresh_tokens();
    ingest(&agent, &one_each("p", 3, 2)).await;
    wait_for_exports(&agent, &s.receiver, 9).await;
    // A refresh answered 200 without a usable token, as some servers answer one they no
    // longer take: the password grant again, not the same refresh at every fetch.
    s.receiver.set_token_script(Some(Arc::new(|_, request| {
        if grant_of(request) == "refresh_token" {
            Reply::Status(200, vec![], r#"{"error":"invalid_grant"}"#.into())
        } else {
            Reply::Normal
        }
    })));
    s.receiver.revoke_tokens();
    ingest(&agent, &one_each("p", 3, 3)).await;
    wait_for_exports(&agent, &s.receiver, 12).await;
    // A refresh answered 429 says nothing of the refresh token: it is tried again, rather
    // than dropped for the password grant.
    let limited = Arc::new(std::sync::atomic::AtomicBool::new(false));
    s.receiver
        .set_token_script(Some(Arc::new(move |_, request| {
            let first_refresh = grant_of(request) == "refresh_token"
                && !limited.swap(true, std::sync::atomic::Ordering::SeqCst);
            match first_refresh {
                true => Reply::Status(429, vec![], "slow down".into()),
                false => Reply::Normal,
            }
        })));
    s.receiver.revoke_tokens();
    ingest(&agent, &one_each("p", 3, 4)).await;
    wait_for_exports(&agent, &s.receiver, 15).await;
    // An endpoint that does not serve the refresh grant it handed a token for (422 to every
    // refresh): the password grant at once, rather than the same refresh at every fetch
    // while nothing is delivered.
    s.receiver.set_token_script(Some(Arc::new(|_, request| {
        match grant_of(request) == "refresh_token" {
            true => Reply::Status(422, vec![], "unsupported grant".into()),
            false => Reply::Normal,
        }
    })));
    s.receiver.revoke_tokens();
    ingest(&agent, &one_each("p", 3, 5)).await;
    wait_for_exports(&agent, &s.receiver, 18).await;

    let grants: Vec<String> = s.receiver.token_requests().iter().map(grant_of).collect();
    let statuses: Vec<u16> = s
        .receiver
        .token_requests()
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(
        grants,
        [
            "password",
            "refresh_token",
            "refresh_token",
            "password",
            "refresh_token",
            "password",
            "refresh_token",
            "refresh_token",
            "refresh_token",
            "password"
        ],
        "statuses {statuses:?}"
    );
    assert_eq!(statuses, [200, 200, 400, 200, 200, 200, 429, 200, 422, 200]);
    agent.stop().await.unwrap();
}

/// The first name in an export's payload (single bodies only).
fn first_name_in(request: &Received) -> String {
    request
        .json()
        .and_then(|p| p["person"]["name"]["firstName"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// First names of the exports delivered (2xx), in arrival order.
fn delivered_names(receiver: &Receiver) -> Vec<String> {
    receiver.delivered().iter().map(first_name_in).collect()
}

fn dead_ids(agent: &Agent) -> Vec<String> {
    agent
        .store
        .list(&ListFilter {
            dead: true,
            ..ListFilter::default()
        })
        .unwrap()
        .iter()
        .map(|e| e.id.to_string())
        .collect()
}

/// Regression: a dead letter put back by `outbox retry` while a newer export of its profile is
/// held in the delivery loop's window (waiting for its retry time) goes before that one.
#[tokio::test]
async fn a_retried_dead_letter_goes_before_the_newer_export_held_for_its_profile() {
    let s = setup(ReceiverOptions::default(), oauth_body, "").await;
    let accept_old = Arc::new(AtomicBool::new(false));
    let newer_refused = Arc::new(AtomicBool::new(false));
    let (old_flag, newer_flag) = (Arc::clone(&accept_old), Arc::clone(&newer_refused));
    s.receiver.set_export_script(Some(Arc::new(move |_, r| {
        match first_name_in(r).as_str() {
            "p0-v0" if !old_flag.load(Ordering::SeqCst) => {
                Reply::Status(400, vec![], "not yet".into())
            }
            "p0-v1" if !newer_flag.swap(true, Ordering::SeqCst) => {
                Reply::Status(503, vec![("retry-after".into(), "3".into())], "busy".into())
            }
            _ => Reply::Normal,
        }
    })));
    let agent = start(&s.config).await;
    let mut lines = one_each("p", 1, 0);
    lines.extend(one_each("p", 1, 1));
    ingest(&agent, &lines).await;
    wait_until(
        10,
        "the old export dead and the newer one refused once",
        || dead_ids(&agent).len() == 1 && newer_refused.load(Ordering::SeqCst),
    )
    .await;
    accept_old.store(true, Ordering::SeqCst);
    let retried = admin_request(
        &agent,
        AdminRequest::Retry {
            ids: vec![],
            all_dead: true,
        },
    )
    .await;
    assert_eq!(retried["retried"].as_array().unwrap().len(), 1, "{retried}");
    wait_for_exports(&agent, &s.receiver, 2).await;
    assert_eq!(
        delivered_names(&s.receiver),
        ["p0-v0", "p0-v1"],
        "the put-back older export first"
    );
    agent.stop().await.unwrap();
}

/// `outbox drop ID` through the agent's admin socket; asserts it dropped it.
async fn drop_export(agent: &Agent, id: String) {
    let dropped = admin_request(
        agent,
        AdminRequest::Drop {
            ids: vec![id],
            all_dead: false,
        },
    )
    .await;
    assert_eq!(dropped["dropped"].as_array().unwrap().len(), 1, "{dropped}");
}

/// Regression: an export dropped by `outbox drop` while it waits for its retry time (or is in
/// flight) is never sent again, and its profile's next export goes on.
#[tokio::test]
async fn a_dropped_export_is_not_sent_again_and_its_profile_goes_on() {
    let s = setup(ReceiverOptions::default(), oauth_body, "").await;
    s.receiver.set_export_script(Some(Arc::new(|_, r| {
        if first_name_in(r) == "p0-v0" {
            Reply::Status(500, vec![], "always failing".into())
        } else {
            Reply::Normal
        }
    })));
    let agent = start(&s.config).await;
    let mut lines = one_each("p", 1, 0);
    lines.extend(one_each("p", 1, 1));
    ingest(&agent, &lines).await;
    let attempts = || {
        s.receiver
            .export_requests()
            .iter()
            .filter(|r| first_name_in(r) == "p0-v0")
            .count()
    };
    wait_until(10, "a few failed attempts", || attempts() >= 3).await;
    let failing = agent.store.list(&ListFilter::default()).unwrap()[0]
        .id
        .to_string();
    drop_export(&agent, failing).await;
    wait_for_exports(&agent, &s.receiver, 1).await;
    assert_eq!(delivered_names(&s.receiver), ["p0-v1"]);
    // One attempt may have been in flight when it was dropped; none after that.
    let after_drop = attempts();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(attempts(), after_drop, "the dropped export was sent again");
    agent.stop().await.unwrap();
}

/// A destination down whose last exports are dropped is not probed, and no longer counts as
/// down (a critical alert fired on for as long as no other export came); the next export
/// goes at once.
#[tokio::test]
async fn a_destination_down_with_nothing_left_to_deliver_no_longer_counts_as_down() {
    let s = setup(ReceiverOptions::default(), oauth_body, "").await;
    let down = Arc::new(AtomicBool::new(true));
    let flag = Arc::clone(&down);
    s.receiver.set_export_script(Some(Arc::new(move |_, _| {
        match flag.load(Ordering::SeqCst) {
            true => Reply::down(),
            false => Reply::Normal,
        }
    })));
    let agent = start(&s.config).await;
    ingest(&agent, &one_each("p", 1, 0)).await;
    wait_until(10, "the destination counted as down", || {
        agent.metrics.destination_down.get() == 1
    })
    .await;
    let failing = agent.store.list(&ListFilter::default()).unwrap()[0]
        .id
        .to_string();
    drop_export(&agent, failing).await;
    wait_until(5, "the destination no longer counted as down", || {
        agent.metrics.destination_down.get() == 0
    })
    .await;
    down.store(false, Ordering::SeqCst);
    ingest(&agent, &one_each("p", 1, 1)).await;
    wait_for_exports(&agent, &s.receiver, 1).await;
    assert_eq!(delivered_names(&s.receiver), ["p0-v1"]);
    agent.stop().await.unwrap();
}

/// Regression: an export dropped while in flight is not sent again when its answer would have
/// it retried at once (401) or sent alone (an array refused with a 4xx); its profile goes on.
#[tokio::test]
async fn an_export_dropped_in_flight_is_not_sent_again_whatever_the_answer() {
    for (delivery, status, lines) in [
        (
            "request_timeout_ms = 5000",
            401,
            [
                member_update("p0", "p0-v0", "2026-01-01T00:00:01Z"),
                member_update("p0", "p0-v1", "2026-01-01T00:00:02Z"),
            ],
        ),
        (
            "request_timeout_ms = 5000\nmax_profiles_per_request = 2",
            400,
            [
                member_update("p0", "p0-v0", "2026-01-01T00:00:01Z"),
                member_update("p1", "p1-v0", "2026-01-01T00:00:01Z"),
            ],
        ),
    ] {
        let s = setup(ReceiverOptions::default(), oauth_body, delivery).await;
        let first = Arc::new(AtomicBool::new(true));
        let is_first = Arc::clone(&first);
        s.receiver.set_export_script(Some(Arc::new(move |_, _| {
            if is_first.swap(false, Ordering::SeqCst) {
                let answer = Reply::Status(status, vec![], "not now".into());
                Reply::After(Duration::from_millis(1500), Box::new(answer))
            } else {
                Reply::Normal
            }
        })));
        let agent = start(&s.config).await;
        ingest(&agent, &lines).await;
        wait_until(10, "the first request at the endpoint", || {
            s.receiver.export_arrivals() == 1
        })
        .await;
        let in_flight = agent
            .store
            .list(&ListFilter {
                profile_id: Some("p0".into()),
                ..ListFilter::default()
            })
            .unwrap()[0]
            .id
            .to_string();
        drop_export(&agent, in_flight).await;
        wait_for_exports(&agent, &s.receiver, 1).await;
        wait_until(10, "the held request answered", || {
            s.receiver
                .export_requests()
                .iter()
                .any(|r| r.status == status)
        })
        .await;
        // Time for the answer to come back and, if it were put back, go out again.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let sent_dropped = s
            .receiver
            .export_requests()
            .iter()
            .filter(|r| String::from_utf8_lossy(&r.body).contains("p0-v0"))
            .count();
        assert_eq!(
            sent_dropped, 1,
            "{delivery}: the dropped export was sent again"
        );
        let other = if status == 401 { "p0-v1" } else { "p1-v0" };
        // Arrays (`max_profiles_per_request` > 1) and single payloads alike.
        let delivered: Vec<String> = s
            .receiver
            .delivered()
            .iter()
            .flat_map(payloads_of)
            .map(|p| {
                p["person"]["name"]["firstName"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned()
            })
            .collect();
        assert_eq!(delivered, [other], "{delivery}");
        agent.stop().await.unwrap();
    }
}

/// `n` updates of profile `blocked0`, each exporting (first names `blocked0-v<i>`).
fn blocked_updates(n: usize) -> Vec<String> {
    updates_of("blocked0", n, "")
}

/// `n` updates of profile `id`, each exporting: first names `<id>-v<i>` and then `filler`,
/// which makes each export as large as wanted.
fn updates_of(id: &str, n: usize, filler: &str) -> Vec<String> {
    (0..n)
        .map(|i| {
            member_update(
                id,
                &format!("{id}-v{i}{filler}"),
                &format!(
                    "2026-01-01T{:02}:{:02}:{:02}Z",
                    i / 3600,
                    i / 60 % 60,
                    i % 60
                ),
            )
        })
        .collect()
}

/// An agent whose endpoint fails every export of profile `blocked0` (500) and takes the rest.
async fn failing_blocked0() -> (ReceiverSetup, Agent) {
    let s = setup(ReceiverOptions::default(), oauth_body, "").await;
    s.receiver.set_export_script(Some(Arc::new(|_, r| {
        if first_name_in(r).starts_with("blocked0-") {
            Reply::Status(500, vec![], "always failing".into())
        } else {
            Reply::Normal
        }
    })));
    let agent = start(&s.config).await;
    (s, agent)
}

/// Regression: one profile the endpoint fails on its own makes the destination look down while
/// nothing else is sent, and the window then read no further than a few hundred exports: those
/// of other profiles behind it in the outbox were never read, so never sent, until it expired.
#[tokio::test]
async fn a_profile_failing_alone_does_not_starve_the_others_while_the_destination_looks_down() {
    let (s, agent) = failing_blocked0().await;
    ingest(&agent, &blocked_updates(300)).await;
    wait_until(10, "the destination counted as down", || {
        agent.metrics.destination_down.get() == 1
    })
    .await;
    ingest(&agent, &one_each("free", 20, 0)).await;
    // Delivered only once a probe reopened delivery.
    wait_until(10, "the other profiles delivered", || {
        delivered_names(&s.receiver).len() >= 20
    })
    .await;
    agent.stop().await.unwrap();
}

/// Regression: a profile with more exports than the window holds, all waiting behind a failing
/// one, does not keep other profiles' exports from being read and delivered.
#[tokio::test]
async fn a_long_blocked_profile_does_not_starve_the_others() {
    let (s, agent) = failing_blocked0().await;
    // 12,000 exports of one profile (more than the window reads before it stops), then 20 of
    // others.
    ingest(&agent, &blocked_updates(12_000)).await;
    ingest(&agent, &one_each("free", 20, 0)).await;
    wait_until(30, "the other profiles delivered", || {
        delivered_names(&s.receiver).len() == 20
    })
    .await;
    agent.stop().await.unwrap();
}

/// Makes the endpoint fail (500) every export whose body names a `blocked` profile, until the
/// flag returned is cleared.
fn fail_blocked_profiles(receiver: &Receiver) -> Arc<AtomicBool> {
    let blocked = Arc::new(AtomicBool::new(true));
    let flag = Arc::clone(&blocked);
    receiver.set_export_script(Some(Arc::new(move |_, r| {
        if flag.load(Ordering::SeqCst) && String::from_utf8_lossy(&r.body).contains("blocked") {
            Reply::Status(500, vec![], "always failing".into())
        } else {
            Reply::Normal
        }
    })));
    blocked
}

/// The exports delivery holds in memory stay under about 32 MiB whatever their size: 800
/// exports of 64 KB (50 MB) of 8 profiles, which the window would read ahead in full by their
/// count alone (it reads on while few profiles are ready; then the destination looks down).
#[tokio::test]
async fn the_window_holds_about_32_mib_of_exports_at_most() {
    const MIB: i64 = 1 << 20;
    let s = setup(ReceiverOptions::default(), oauth_body, "").await;
    s.receiver.set_export_script(Some(receiver::down()));
    let filler = format!("-{}", "x".repeat(64 << 10));
    let updates: Vec<String> = (0..8)
        .flat_map(|i| updates_of(&format!("big{i}"), 100, &filler))
        .collect();
    assert_eq!(prefill(&s.config, &updates).len(), 800);
    let agent = start(&s.config).await;
    let (mut most_bytes, mut most_held) = (0, 0);
    let mut sample = || {
        most_bytes = most_bytes.max(agent.metrics.window_bytes.get());
        most_held = most_held.max(agent.metrics.window_exports.get());
        most_bytes
    };
    wait_until(30, "the window read ahead", || sample() >= 24 * MIB).await;
    // Reads still under way would show here.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        sample();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(most_bytes <= 33 * MIB, "at most {most_bytes} bytes held");
    assert!(
        (300..600).contains(&most_held),
        "at most {most_held} exports held"
    );
    agent.stop().await.unwrap();
}

/// Past what the window may hold, the exports waiting behind a profile's failing export are
/// let go of once it failed a few times, so that other profiles' exports are read and
/// delivered; once that profile moves, they are read again and delivered in order. 150
/// exports of 128 KB of each of 2 profiles (38 MB), then 20 of other profiles.
#[tokio::test]
async fn a_blocked_backlog_larger_than_the_window_does_not_starve_the_others() {
    const MIB: i64 = 1 << 20;
    let s = setup(ReceiverOptions::default(), oauth_body, "").await;
    let blocked = fail_blocked_profiles(&s.receiver);
    let filler = format!("-{}", "x".repeat(128 << 10));
    let blocked_profiles = ["blocked0", "blocked1"];
    let mut updates: Vec<String> = blocked_profiles
        .iter()
        .flat_map(|profile| updates_of(profile, 150, &filler))
        .collect();
    updates.extend(one_each("free", 20, 0));
    assert_eq!(prefill(&s.config, &updates).len(), 320);
    let agent = start(&s.config).await;
    let mut most_bytes = 0;
    wait_until(30, "the other profiles delivered", || {
        most_bytes = most_bytes.max(agent.metrics.window_bytes.get());
        s.receiver.delivered().len() >= 20
    })
    .await;
    // The window never held them all (it is published once what it lets go of is gone).
    assert!(most_bytes <= 33 * MIB, "at most {most_bytes} bytes held");

    blocked.store(false, Ordering::SeqCst);
    wait_until(60, "every export delivered", || {
        agent.store.tally().unwrap().pending == 0
    })
    .await;
    let names: Vec<String> = delivered_names(&s.receiver)
        .into_iter()
        .filter_map(|n| n.strip_suffix(&filler).map(str::to_owned))
        .collect();
    for profile in blocked_profiles {
        let delivered: Vec<&String> = names.iter().filter(|n| n.starts_with(profile)).collect();
        let expected: Vec<String> = (0..150).map(|i| format!("{profile}-v{i}")).collect();
        assert_eq!(
            delivered,
            expected.iter().collect::<Vec<_>>(),
            "{profile}'s exports, each once and in order"
        );
    }
    agent.stop().await.unwrap();
}

/// Regression: a window full of failing exports alone, the heads of many profiles that each
/// fail for what they hold, kept the exports of other profiles further in the outbox unread:
/// the destination looked down, and its probes went to those heads in turn until they
/// expired. 300 profiles with one export of 128 KB each (38 MB, past the window's 32 MiB)
/// that the endpoint fails, then 20 of other profiles.
#[tokio::test]
async fn a_window_full_of_failing_heads_does_not_starve_the_others() {
    const MIB: i64 = 1 << 20;
    let mut s = setup(ReceiverOptions::default(), oauth_body, "").await;
    // Probes one at a time, as while the destination is down, go every 20 ms at most.
    s.config.delivery.initial_backoff = Duration::from_millis(5);
    s.config.delivery.max_backoff = Duration::from_millis(20);
    let blocked = fail_blocked_profiles(&s.receiver);
    let filler = format!("-{}", "x".repeat(128 << 10));
    let mut updates: Vec<String> = (0..300)
        .flat_map(|i| updates_of(&format!("blocked{i}"), 1, &filler))
        .collect();
    updates.extend(one_each("free", 20, 0));
    assert_eq!(prefill(&s.config, &updates).len(), 320);
    let agent = start(&s.config).await;
    let (mut most_bytes, mut seen_down) = (0, false);
    wait_until(60, "the other profiles delivered", || {
        most_bytes = most_bytes.max(agent.metrics.window_bytes.get());
        seen_down |= agent.metrics.destination_down.get() == 1;
        s.receiver.delivered().len() >= 20
    })
    .await;
    // Read back, the heads let go of stay within the window's bound too.
    assert!(most_bytes <= 33 * MIB, "at most {most_bytes} bytes held");
    assert!(
        seen_down,
        "the failing heads made the destination look down"
    );

    blocked.store(false, Ordering::SeqCst);
    wait_until(60, "every export delivered", || {
        agent.store.tally().unwrap().pending == 0
    })
    .await;
    let mut names: Vec<String> = delivered_names(&s.receiver)
        .into_iter()
        .map(|n| n.strip_suffix(&filler).map_or(n.clone(), str::to_owned))
        .collect();
    names.sort();
    let mut expected: Vec<String> = (0..300).map(|i| format!("blocked{i}-v0")).collect();
    expected.extend((0..20).map(|i| format!("free{i}-v0")));
    expected.sort();
    assert_eq!(names, expected, "each export delivered once");
    agent.stop().await.unwrap();
}
