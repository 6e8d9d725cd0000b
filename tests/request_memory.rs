//! What one large `POST /v1/updates` costs the agent in memory, seen in the resident peak of a
//! process that runs only that agent (this binary again, running the one test).

mod common;

use common::memory::{measured_in_a_process_of_its_own, resident_rise_during};
use common::{http_post, oauth_body, receiver_setup, start_agent};
use outpost::receiver::ReceiverOptions;

/// The sample mix's lines, cycled with fresh ids and without timestamps, up to `bytes`.
fn sample_mix_body(bytes: usize) -> (String, usize) {
    let sample = include_str!("../data/sample-updates.ndjson");
    let lines: Vec<&str> = sample.lines().collect();
    let mut body = String::new();
    let mut count = 0;
    while body.len() < bytes {
        let mut update: serde_json::Value =
            serde_json::from_str(lines[count % lines.len()]).unwrap();
        let update = update.as_object_mut().unwrap();
        update.insert("id".into(), format!("large-{count:06}").into());
        update.remove("timestamp");
        body.push_str(&serde_json::to_string(update).unwrap());
        body.push('\n');
        count += 1;
    }
    (body, count)
}

/// A request's updates are committed, and past the first chunk parsed, a chunk at a time:
/// what a transaction's updates write is held until it is flushed, so one transaction for the
/// whole request raised the agent's peak by about 12 times the body (96 MiB for 8 MiB in a
/// debug build), and in chunks by 51-54 MiB: the body, held until the request is answered,
/// what sled's page cache keeps of what was written, and what the allocator holds on to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_request_is_stored_without_holding_what_all_of_it_writes() {
    if measured_in_a_process_of_its_own(
        "a_large_request_is_stored_without_holding_what_all_of_it_writes",
    ) {
        return;
    }
    let setup = receiver_setup(ReceiverOptions::default(), oauth_body, "").await;
    let agent = start_agent(&setup.config).await;
    let (body, count) = sample_mix_body(8 << 20);
    let addr = agent.listen_addr;
    let body_bytes = body.len();

    let runtime = tokio::runtime::Handle::current();
    let ((status, answer), rise) = tokio::task::block_in_place(|| {
        resident_rise_during(|| runtime.block_on(http_post(addr, "/v1/updates", body, &[])))
    });

    assert_eq!(status, 200, "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["accepted"], count, "{answer}");
    println!(
        "{count} updates, {body_bytes} bytes: the resident peak rose {} MiB",
        rise >> 20
    );
    assert!(
        rise < 9 * body_bytes,
        "a request of {count} updates ({body_bytes} bytes) raised the resident peak by {rise} bytes"
    );
    agent.stop().await.unwrap();
}
