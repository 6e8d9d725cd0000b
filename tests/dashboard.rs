//! data/grafana/outpost.json queries only what the agent exports: every metric name in its
//! expressions is one that the real `outpost run` serves on `GET /metrics`, and every label it
//! groups by is one those samples carry (or `instance`, which Prometheus adds). Its panels lie
//! apart within the grid, and its states show when they are on.

mod common;

use std::collections::BTreeSet;

use common::agent_process::workspace_with_agent;
use common::promql::{grouping_labels, metric_names};
use common::*;
use outpost::top::samples::Samples;
use serde_json::Value;

/// Every `expr` of every panel (rows included) and of the template variables.
fn expressions(dashboard: &Value) -> Vec<String> {
    let mut found = Vec::new();
    fn walk(value: &Value, found: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("expr" | "definition", Value::String(s)) => found.push(s.clone()),
                        _ => walk(v, found),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, found)),
            _ => {}
        }
    }
    walk(dashboard, &mut found);
    found
}

#[test]
fn the_helpers_find_names_and_labels() {
    let expr = "histogram_quantile(0.5, sum by (le) (rate(outpost_delivery_latency_seconds_bucket{instance=~\"$instance\"}[5m]))) / sum by (a, b) (outpost_x)";
    assert_eq!(
        metric_names(expr),
        ["outpost_delivery_latency_seconds_bucket", "outpost_x"]
    );
    assert_eq!(grouping_labels(expr), ["le", "a", "b"]);
    assert_eq!(
        grouping_labels("x == 0 and on (instance) group by (instance, job) (y)"),
        ["instance", "job", "instance"]
    );
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/grafana/outpost.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Grafana moves a panel that overlaps another down, out of the row it was laid out in.
#[test]
fn panels_lie_within_the_grid_and_apart() {
    let dashboard = dashboard();
    let boxes: Vec<(String, [u64; 4])> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|panel| {
            let at = &panel["gridPos"];
            let field = |name: &str| at[name].as_u64().unwrap();
            let title = panel["title"].as_str().unwrap().to_owned();
            (title, [field("x"), field("y"), field("w"), field("h")])
        })
        .collect();
    for (title, [x, _, w, _]) in &boxes {
        assert!(x + w <= 24, "{title} reaches past the grid's 24 columns");
    }
    for (i, (a, [ax, ay, aw, ah])) in boxes.iter().enumerate() {
        for (b, [bx, by, bw, bh]) in &boxes[i + 1..] {
            let apart = ax + aw <= *bx || bx + bw <= *ax || ay + ah <= *by || by + bh <= *ay;
            assert!(apart, "{a} and {b} overlap");
        }
    }
}

/// A state that is on (1) shows in a colour of its own and says so in words: Grafana's
/// default thresholds show 1 in green, like all is well.
#[test]
fn states_stand_out_when_on() {
    let dashboard = dashboard();
    for (title, on) in [("Destination down", "down"), ("Delivery paused", "paused")] {
        let panel = dashboard["panels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|panel| panel["title"] == title)
            .unwrap_or_else(|| panic!("no panel {title}"));
        let defaults = &panel["fieldConfig"]["defaults"];
        let steps = defaults["thresholds"]["steps"].as_array().unwrap();
        let at_one = steps.iter().find(|step| step["value"] == 1).unwrap();
        assert_ne!(at_one["color"], "green", "{title}");
        let said = &defaults["mappings"][0]["options"]["1"]["text"];
        assert_eq!(said, on, "{title}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exported() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "outpost-agent");
    let exprs = expressions(&dashboard);
    assert!(exprs.len() >= 20, "{exprs:?}");

    // A fresh agent: every series exists from the start, before any traffic.
    let (_ws, agent) = workspace_with_agent().await;
    let (status, metrics) = http_get(agent.addr, "/metrics").await;
    assert_eq!(status, 200);
    let samples = Samples::parse(&metrics).unwrap();
    let exported = samples.names();
    // The labels the samples of these metrics carry, and the one Prometheus adds to each.
    let labels_of = |names: &[String]| -> BTreeSet<&str> {
        samples
            .0
            .iter()
            .filter(|s| names.contains(&s.name))
            .flat_map(|s| s.labels.iter().map(|(k, _)| k.as_str()))
            .chain(["instance"])
            .collect()
    };

    let mut queried = BTreeSet::new();
    for expr in &exprs {
        let names = metric_names(expr);
        let labels = labels_of(&names);
        for name in names {
            assert!(
                exported.contains(name.as_str()),
                "the dashboard queries {name}, which /metrics does not export:\n{expr}\n\nexported: {exported:?}"
            );
            queried.insert(name);
        }
        for label in grouping_labels(expr) {
            assert!(
                labels.contains(label.as_str()),
                "the dashboard groups by {label}, which no sample of its metrics carries:\n{expr}"
            );
        }
    }
    // What operators look at first is all there.
    for name in [
        "outpost_outbox_pending",
        "outpost_outbox_oldest_pending_seconds",
        "outpost_outbox_dead",
        "outpost_updates_total",
        "outpost_exports_total",
        "outpost_deliveries_total",
        "outpost_delivery_latency_seconds_bucket",
        "outpost_delivery_concurrency_limit",
        "outpost_delivery_in_flight",
        "outpost_delivery_rate_cap",
        "outpost_delivery_retries_total",
        "outpost_token_fetches_total",
        "outpost_destination_down",
        "outpost_delivery_paused",
    ] {
        assert!(queried.contains(name), "the dashboard does not show {name}");
    }
    drop(agent);
}
