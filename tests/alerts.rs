//! data/prometheus/outpost-alerts.yml: every rule reads only what the real `outpost run`
//! serves on `GET /metrics`, says how severe it is and what to do, and fires when it should
//! and not otherwise, as promtool (Prometheus's own rule evaluation) finds over the series
//! of each case below.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::agent_process::workspace_with_agent;
use common::promql::{grouping_labels, metric_names};
use common::*;
use outpost::top::samples::Samples;
use serde::Deserialize;
use serde_json::{json, Value};

const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/data/prometheus/outpost-alerts.yml"
);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    groups: Vec<Group>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Group {
    #[allow(dead_code)]
    name: String,
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    alert: String,
    expr: String,
    #[serde(rename = "for")]
    #[allow(dead_code)]
    pending_for: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

fn rules() -> Vec<Rule> {
    let text = std::fs::read_to_string(RULES).unwrap();
    let file: RuleFile = yaml_serde::from_str(&text).unwrap();
    file.groups.into_iter().flat_map(|g| g.rules).collect()
}

#[test]
fn every_rule_says_how_severe_it_is_and_what_to_do() {
    let rules = rules();
    assert!(rules.len() >= 10, "{} rules", rules.len());
    let mut names = BTreeSet::new();
    for rule in &rules {
        assert!(names.insert(&rule.alert), "{} twice", rule.alert);
        assert!(rule.alert.starts_with("Outpost"), "{}", rule.alert);
        assert_eq!(
            rule.labels.keys().collect::<Vec<_>>(),
            ["severity"],
            "{}",
            rule.alert
        );
        assert!(
            ["critical", "warning", "info"].contains(&rule.labels["severity"].as_str()),
            "{}",
            rule.alert
        );
        assert_eq!(
            rule.annotations.keys().collect::<Vec<_>>(),
            ["description", "summary"],
            "{}",
            rule.alert
        );
        // Which agent, in every notification.
        assert!(
            rule.annotations["summary"].starts_with("outpost on {{ $labels.instance }}: "),
            "{}",
            rule.alert
        );
        // Plain text, which the cases below expect as it is written.
        assert!(
            !rule.annotations["description"].contains("{{"),
            "{}",
            rule.alert
        );
    }
}

/// The metric names a `/metrics` text declares (a counter with no series yet included, as
/// the NATS source's are on an agent without one) and those it has samples of.
fn served_names(text: &str) -> BTreeSet<String> {
    let declared = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next());
    let sampled = Samples::parse(text).unwrap().0.into_iter().map(|s| s.name);
    declared.map(str::to_owned).chain(sampled).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_read_is_served() {
    let (_ws, agent) = workspace_with_agent().await;
    let (status, text) = http_get(agent.addr, "/metrics").await;
    assert_eq!(status, 200);
    let served = served_names(&text);
    let labels: BTreeSet<String> = Samples::parse(&text)
        .unwrap()
        .0
        .into_iter()
        .flat_map(|s| s.labels.into_iter().map(|(k, _)| k))
        .chain(["instance".to_owned()])
        .collect();
    for rule in rules() {
        let names = metric_names(&rule.expr);
        assert!(!names.is_empty(), "{}: {}", rule.alert, rule.expr);
        for name in names {
            assert!(
                served.contains(&name),
                "{} reads {name}, which /metrics does not serve:\n{}",
                rule.alert,
                rule.expr
            );
        }
        for label in grouping_labels(&rule.expr) {
            assert!(
                labels.contains(&label),
                "{} groups or matches on {label}, which no sample carries:\n{}",
                rule.alert,
                rule.expr
            );
        }
    }
    drop(agent);
}

/// `promtool`, or `None` after saying why the test is skipped. Under CI a missing one fails
/// the test instead: CI installs it (`.ci/run`, Debian's `prometheus` package).
fn promtool_or_skip(test: &str) -> Option<PathBuf> {
    let found = find_program("promtool", &["/usr/bin"]);
    installed_or_skip(test, found, "promtool", "prometheus")
}

fn promtool(promtool: &Path, args: &[&str]) -> String {
    let output = Command::new(promtool).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// One agent's series: `a:8686` unless named.
fn series(name_and_labels: &str, instance: &str, values: &str) -> Value {
    let (name, labels) = match name_and_labels.split_once('{') {
        Some((name, labels)) => (name, format!("{},", labels.trim_end_matches('}'))),
        None => (name_and_labels, String::new()),
    };
    json!({
        "series": format!("{name}{{{labels}instance=\"{instance}\",job=\"outpost\"}}"),
        "values": values,
    })
}

/// An alert that fires: the instance it is of, whether it keeps the `job` label (a rule that
/// sums by instance drops it), and the summary it renders.
type Firing = (&'static str, bool, &'static str);

/// A case: series, then at each time (minutes) the alerts that fire.
struct Case {
    alert: &'static str,
    series: Vec<Value>,
    at: Vec<(u32, Vec<Firing>)>,
}

fn cases() -> Vec<Case> {
    let on_a = |summary: &'static str| vec![("a:8686", true, summary)];
    vec![
        Case {
            alert: "OutpostDestinationDown",
            series: vec![
                series("outpost_destination_down", "a:8686", "0 1x10"),
                // Down for 3 minutes only.
                series("outpost_destination_down", "b:8686", "0 1x3 0x7"),
                // Down, and paused by an operator: nothing is sent to find out.
                series("outpost_destination_down", "c:8686", "0 1x10"),
                series("outpost_delivery_paused", "c:8686", "1x10"),
                series("outpost_delivery_paused", "a:8686", "0x10"),
            ],
            at: vec![
                (4, vec![]),
                (
                    7,
                    on_a("outpost on a:8686: the destination has been down for 5 minutes"),
                ),
            ],
        },
        Case {
            alert: "OutpostOutboxFilling",
            series: vec![
                series("outpost_outbox_max_bytes", "a:8686", "1000x10"),
                series("outpost_outbox_bytes", "a:8686", "900x10"),
                series("outpost_outbox_max_bytes", "b:8686", "1000x10"),
                series("outpost_outbox_bytes", "b:8686", "700x10"),
                // An agent of a build that does not serve its limit.
                series("outpost_outbox_max_bytes", "c:8686", "0x10"),
                series("outpost_outbox_bytes", "c:8686", "900x10"),
            ],
            at: vec![
                (3, vec![]),
                (6, on_a("outpost on a:8686: the outbox is 90% full")),
            ],
        },
        Case {
            alert: "OutpostOutboxFull",
            series: vec![
                series("outpost_outbox_max_bytes", "a:8686", "1000x10"),
                series("outpost_outbox_bytes", "a:8686", "1000x10"),
                series("outpost_outbox_max_bytes", "b:8686", "1000x10"),
                series("outpost_outbox_bytes", "b:8686", "999x10"),
                series("outpost_outbox_max_bytes", "c:8686", "0x10"),
                series("outpost_outbox_bytes", "c:8686", "900x10"),
            ],
            at: vec![
                (0, vec![]),
                (
                    2,
                    on_a("outpost on a:8686: the outbox is full, ingest is refused"),
                ),
            ],
        },
        Case {
            alert: "OutpostDeadLetters",
            series: vec![
                series("outpost_outbox_dead", "a:8686", "0 3x5"),
                series("outpost_outbox_dead", "b:8686", "0x5"),
            ],
            at: vec![
                (1, vec![]),
                (
                    3,
                    on_a("outpost on a:8686: 3 dead letter(s) wait for an operator"),
                ),
            ],
        },
        Case {
            alert: "OutpostExportsWaiting",
            series: vec![
                series("outpost_outbox_oldest_pending_seconds", "a:8686", "4000x15"),
                series("outpost_outbox_oldest_pending_seconds", "b:8686", "3000x15"),
                // Waiting because delivery is paused.
                series("outpost_outbox_oldest_pending_seconds", "c:8686", "4000x15"),
                series("outpost_delivery_paused", "c:8686", "1x15"),
            ],
            at: vec![
                (5, vec![]),
                (
                    11,
                    on_a("outpost on a:8686: an export has waited 1h 6m 40s"),
                ),
            ],
        },
        Case {
            alert: "OutpostTokenOrAuthFailing",
            series: vec![
                // The token endpoint unreachable: the destination down, a probe every 5
                // minutes (a), every 15 (e: max_backoff_ms at 30 minutes), each failing;
                // nothing delivered.
                series(
                    "outpost_delivery_retries_total{cause=\"token\"}",
                    "a:8686",
                    &(0..=80).map(|minute| (minute / 5).to_string()).collect::<Vec<_>>().join(" "),
                ),
                series(
                    "outpost_delivery_retries_total{cause=\"token\"}",
                    "e:8686",
                    &(0..=80).map(|minute| (minute / 15).to_string()).collect::<Vec<_>>().join(" "),
                ),
                series(
                    "outpost_deliveries_total{outcome=\"delivered\"}",
                    "e:8686",
                    "100x80",
                ),
                series(
                    "outpost_deliveries_total{outcome=\"delivered\"}",
                    "a:8686",
                    "100x80",
                ),
                // One refusal (a token that expired early), then none.
                series(
                    "outpost_delivery_retries_total{cause=\"auth\"}",
                    "b:8686",
                    "0 1x80",
                ),
                series(
                    "outpost_deliveries_total{outcome=\"delivered\"}",
                    "b:8686",
                    "0x80",
                ),
                // Refusals now and then while deliveries go on.
                series(
                    "outpost_delivery_retries_total{cause=\"token\"}",
                    "c:8686",
                    "0+1x80",
                ),
                series(
                    "outpost_deliveries_total{outcome=\"delivered\"}",
                    "c:8686",
                    "0+50x80",
                ),
                // Failures of another kind.
                series(
                    "outpost_delivery_retries_total{cause=\"connection\"}",
                    "d:8686",
                    "0+5x80",
                ),
                // Token failures, then a pause: nothing delivered, as asked.
                series(
                    "outpost_delivery_retries_total{cause=\"token\"}",
                    "f:8686",
                    &(0..=80).map(|minute| (minute / 5).to_string()).collect::<Vec<_>>().join(" "),
                ),
                series(
                    "outpost_deliveries_total{outcome=\"delivered\"}",
                    "f:8686",
                    "100x80",
                ),
                series("outpost_delivery_paused", "f:8686", "1x80"),
            ],
            at: vec![
                (8, vec![]),
                (
                    60,
                    vec![
                        ("a:8686", false, "outpost on a:8686: getting or using a token keeps failing, and nothing is delivered"),
                        ("e:8686", false, "outpost on e:8686: getting or using a token keeps failing, and nothing is delivered"),
                    ],
                ),
            ],
        },
        Case {
            alert: "OutpostDeliveryPaused",
            series: vec![
                series("outpost_delivery_paused", "a:8686", "0 1x70"),
                // Paused for half an hour, then resumed.
                series("outpost_delivery_paused", "b:8686", "0 1x30 0x40"),
                series("outpost_delivery_paused", "c:8686", "0x70"),
            ],
            at: vec![
                (45, vec![]),
                (
                    62,
                    on_a("outpost on a:8686: delivery has been paused for an hour"),
                ),
            ],
        },
        Case {
            alert: "OutpostUpdatesRefused",
            series: vec![
                series(
                    "outpost_updates_total{result=\"refused\"}",
                    "a:8686",
                    "0 0 0 0 0 2x20",
                ),
                series(
                    "outpost_updates_total{result=\"refused\"}",
                    "b:8686",
                    "0x25",
                ),
                series(
                    "outpost_updates_total{result=\"exported\"}",
                    "b:8686",
                    "0+10x25",
                ),
            ],
            at: vec![
                (
                    6,
                    vec![(
                        "a:8686",
                        false,
                        "outpost on a:8686: requests of updates were refused",
                    )],
                ),
                // The refusals left the 10 minutes looked at.
                (20, vec![]),
            ],
        },
        Case {
            alert: "OutpostClockJumped",
            series: vec![
                series("outpost_clock_jumps_total", "a:8686", "0 0 0 0 0 1x80"),
                series("outpost_clock_jumps_total", "b:8686", "0x80"),
            ],
            at: vec![
                (
                    6,
                    on_a("outpost on a:8686: the host's wall clock jumped (outpost_clock_last_jump_seconds says by how much)"),
                ),
                (70, vec![]),
            ],
        },
        Case {
            alert: "OutpostNatsDisconnected",
            series: vec![
                series("outpost_source_connected", "a:8686", "0x10"),
                series(
                    "outpost_source_messages_total{result=\"committed\"}",
                    "a:8686",
                    "0x10",
                ),
                series(
                    "outpost_source_messages_total{result=\"rejected\"}",
                    "a:8686",
                    "0x10",
                ),
                // An agent without a NATS source.
                series("outpost_source_connected", "b:8686", "0x10"),
                series("outpost_source_connected", "c:8686", "1x10"),
                series(
                    "outpost_source_messages_total{result=\"committed\"}",
                    "c:8686",
                    "0+5x10",
                ),
            ],
            at: vec![
                (3, vec![]),
                (
                    6,
                    on_a("outpost on a:8686: not connected to NATS for 5 minutes"),
                ),
            ],
        },
        Case {
            alert: "OutpostNatsPaused",
            series: vec![
                series("outpost_source_paused", "a:8686", "0 1x12"),
                series("outpost_source_paused", "b:8686", "0 1x5 0x6"),
            ],
            at: vec![
                (8, vec![]),
                (
                    12,
                    on_a("outpost on a:8686: the NATS source has been paused for 10 minutes"),
                ),
            ],
        },
        Case {
            alert: "OutpostNatsPartitionsClaimedElsewhere",
            series: vec![
                series("outpost_source_claimed_elsewhere", "a:8686", "2x12"),
                series("outpost_source_claimed_elsewhere", "b:8686", "0x12"),
            ],
            at: vec![
                (5, vec![]),
                (
                    11,
                    on_a("outpost on a:8686: 2 partition(s) it owns are claimed by another agent's store"),
                ),
            ],
        },
    ]
}

/// promtool's unit-test file for the cases: each alert's expected labels are its series'
/// labels and the rule's own, its annotations the summary the case gives and the rule's
/// description.
fn promtool_tests(rules: &[Rule], cases: &[Case]) -> Value {
    let by_name: BTreeMap<&str, &Rule> = rules.iter().map(|r| (r.alert.as_str(), r)).collect();
    let tests: Vec<Value> = cases
        .iter()
        .map(|case| {
            let rule = by_name[case.alert];
            let evaluations: Vec<Value> = case
                .at
                .iter()
                .map(|(minute, firing)| {
                    let expected: Vec<Value> = firing
                        .iter()
                        .map(|(instance, keeps_job, summary)| {
                            let mut labels = rule.labels.clone();
                            labels.insert("instance".into(), (*instance).into());
                            if *keeps_job {
                                labels.insert("job".into(), "outpost".into());
                            }
                            json!({
                                "exp_labels": labels,
                                "exp_annotations": {
                                    "summary": summary,
                                    "description": rule.annotations["description"],
                                },
                            })
                        })
                        .collect();
                    json!({
                        "eval_time": format!("{minute}m"),
                        "alertname": case.alert,
                        "exp_alerts": expected,
                    })
                })
                .collect();
            json!({
                "interval": "1m",
                "input_series": case.series,
                "alert_rule_test": evaluations,
            })
        })
        .collect();
    json!({
        "rule_files": [RULES],
        "evaluation_interval": "1m",
        "tests": tests,
    })
}

#[test]
fn each_rule_fires_when_it_should_and_not_otherwise() {
    let Some(promtool_path) = promtool_or_skip("each_rule_fires_when_it_should_and_not_otherwise")
    else {
        return;
    };
    let checked = promtool(&promtool_path, &["check", "rules", RULES]);
    assert!(checked.contains("SUCCESS"), "{checked}");

    let (rules, cases) = (rules(), cases());
    // Every rule has a case, with a time it fires and a time it does not.
    for rule in &rules {
        let case = cases.iter().find(|c| c.alert == rule.alert);
        let case = case.unwrap_or_else(|| panic!("no case for {}", rule.alert));
        assert!(
            case.at.iter().any(|(_, f)| f.is_empty()) && case.at.iter().any(|(_, f)| !f.is_empty()),
            "{}",
            rule.alert
        );
    }
    let dir = tempfile::tempdir().unwrap();
    // JSON is YAML, which promtool reads.
    let file = dir.path().join("outpost-alerts.test.yml");
    std::fs::write(&file, promtool_tests(&rules, &cases).to_string()).unwrap();
    let tested = promtool(&promtool_path, &["test", "rules", file.to_str().unwrap()]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}
