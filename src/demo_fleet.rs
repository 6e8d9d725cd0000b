//! `outpost demo --fleet`: a fleet on loopback. A `nats-server -js` child process with its
//! store in a temporary folder, the demo's receiver, three agents owning 12 partitions
//! between them, and the sample updates published into the stream. Needs `nats-server`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent::{Agent, AgentOptions};
use crate::config::Config;
use crate::demo::{demo_config_text, progress, SAMPLE_UPDATES};
use crate::metrics::DeliveryOutcome;
use crate::profile::update::parse_body;
use crate::receiver::{Receiver, ReceiverOptions};
use crate::source::nats::setup;
use crate::source::publish::{fresh_nonce, plan, publish};

const PARTITIONS: u32 = 12;
const OWNED: [&str; 3] = ["0-3", "4-7", "8-11"];

/// What each agent of the fleet did.
#[derive(Debug, Clone)]
pub struct AgentReport {
    pub owned: &'static str,
    pub committed: u64,
    pub exports: u64,
    pub delivered: u64,
    pub profiles: u64,
}

#[derive(Debug, Clone)]
pub struct FleetReport {
    pub published: u64,
    pub agents: Vec<AgentReport>,
    /// Distinct exports the receiver accepted.
    pub receiver_exports: u64,
}

/// `nats-server` on `PATH` or in the usual places.
fn nats_server() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/bin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

/// The nats-server child; killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(binary: &Path, store: &Path) -> Result<(Server, u16), String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("cannot find a free port: {e}"))?
        .port();
    let child = Command::new(binary)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let mut server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = server.0.try_wait() {
            return Err(format!("nats-server exited with {status}"));
        }
        if Instant::now() > deadline {
            return Err("nats-server did not take connections within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((server, port))
}

pub async fn run(fail_share: f64, show_progress: bool) -> Result<FleetReport, String> {
    let binary = nats_server().ok_or(
        "outpost demo --fleet needs nats-server (Debian: apt-get install nats-server); the plain `outpost demo` does not",
    )?;
    let dir = tempfile::tempdir().map_err(|e| format!("cannot create a temporary folder: {e}"))?;
    let (_server, port) = start_server(&binary, &dir.path().join("nats"))?;
    let receiver = Receiver::start(
        "127.0.0.1:0".parse().expect("valid address"),
        ReceiverOptions {
            fail_share,
            token_lifetime: Duration::from_secs(1),
            ..ReceiverOptions::default()
        },
    )
    .await
    .map_err(|e| format!("cannot start the receiver: {e}"))?;
    let mut configs = Vec::new();
    for (i, owned) in OWNED.iter().enumerate() {
        let agent_dir = dir.path().join(format!("agent{i}"));
        std::fs::create_dir_all(&agent_dir).map_err(|e| e.to_string())?;
        let text = format!(
            "{}\n[source.nats]\nservers = [\"nats://127.0.0.1:{port}\"]\npartitions = {PARTITIONS}\nowned = \"{owned}\"\n",
            demo_config_text(&receiver.base_url())
        );
        configs.push(
            Config::parse(&agent_dir.join("outpost.toml"), &text)
                .map_err(|e| format!("the fleet demo config: {e}"))?,
        );
    }
    let nats = configs[0]
        .nats
        .clone()
        .expect("the config has [source.nats]");
    setup(&nats, false).await.map_err(|e| e.to_string())?;
    let mut agents = Vec::new();
    for config in &configs {
        agents.push(
            Agent::start(config, AgentOptions::default())
                .await
                .map_err(|e| e.to_string())?,
        );
    }

    let updates = parse_body(SAMPLE_UPDATES.as_bytes()).map_err(|e| e.to_string())?;
    let total = updates.len() as u64;
    let bar = Arc::new(progress(
        show_progress,
        total,
        "publish [{bar:40}] {pos}/{len} updates into the stream",
    ));
    let shown = Arc::clone(&bar);
    let report = publish(
        &nats,
        plan(&updates, &nats, fresh_nonce()),
        None,
        64,
        move |n| shown.set_position(n),
    )
    .await
    .map_err(|(_, e)| e.to_string())?;
    bar.finish();

    let committed = |agents: &[Agent]| -> u64 {
        agents
            .iter()
            .map(|a| a.metrics.source_messages("committed") + a.metrics.source_messages("rejected"))
            .sum()
    };
    let pending = |agents: &[Agent]| -> Result<u64, String> {
        agents.iter().try_fold(0, |sum, a| {
            Ok(sum + a.store.tally().map_err(|e| e.to_string())?.pending)
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let bar = progress(
        show_progress,
        total,
        "consume [{bar:40}] {pos}/{len} updates committed by the fleet",
    );
    while committed(&agents) < total {
        bar.set_position(committed(&agents));
        if tokio::time::Instant::now() > deadline {
            return Err("the fleet did not consume every update within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bar.finish();
    while pending(&agents)? > 0 {
        if tokio::time::Instant::now() > deadline {
            return Err("the fleet did not deliver every export within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut keys: Vec<String> = receiver
        .delivered()
        .iter()
        .filter_map(|r| r.header("idempotency-key").map(str::to_owned))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut reports = Vec::new();
    for (agent, owned) in agents.into_iter().zip(OWNED) {
        let m = &agent.metrics;
        reports.push(AgentReport {
            owned,
            committed: m.source_messages("committed"),
            exports: crate::profile::Reason::ALL
                .iter()
                .map(|r| m.exports(*r))
                .sum(),
            delivered: m.deliveries(DeliveryOutcome::Delivered),
            profiles: agent
                .store
                .stats(chrono::Utc::now())
                .map_err(|e| e.to_string())?
                .profiles
                .unwrap_or(0),
        });
        agent.stop().await.map_err(|e| e.to_string())?;
    }
    Ok(FleetReport {
        published: report.published,
        agents: reports,
        receiver_exports: keys.len() as u64,
    })
}

/// What the fleet demo's figures say went wrong, if anything: its receiver is to hold every
/// export the agents made, once each.
pub fn shortfall(report: &FleetReport) -> Option<String> {
    let made: u64 = report.agents.iter().map(|a| a.exports).sum();
    let delivered: u64 = report.agents.iter().map(|a| a.delivered).sum();
    if report.receiver_exports != made || delivered < made {
        return Some(format!(
            "the fleet made {made} exports and recorded {delivered} delivered; the receiver accepted {} distinct ones",
            report.receiver_exports
        ));
    }
    None
}

pub fn print_report(report: &FleetReport, out: &mut impl std::io::Write) -> std::io::Result<()> {
    writeln!(out)?;
    writeln!(
        out,
        "stream    {} updates published over {PARTITIONS} partitions (FNV-1a 64 of the profile id)",
        report.published
    )?;
    for (i, agent) in report.agents.iter().enumerate() {
        writeln!(
            out,
            "agent {i}   partitions {:<5} {} updates committed, {} exports, {} delivered, {} profiles stored",
            agent.owned, agent.committed, agent.exports, agent.delivered, agent.profiles
        )?;
    }
    let exports: u64 = report.agents.iter().map(|a| a.exports).sum();
    writeln!(
        out,
        "receiver  {} distinct exports accepted (the fleet made {exports})",
        report.receiver_exports
    )?;
    writeln!(out)?;
    writeln!(out, "next: README, \"A fleet fed by NATS JetStream\"; data/fleet-demo.sh runs the same with three `outpost run` processes")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fleet_demo_falls_short_when_the_receiver_lacks_or_doubles_an_export() {
        let agent = |exports, delivered| AgentReport {
            owned: "0-3",
            committed: 0,
            exports,
            delivered,
            profiles: 0,
        };
        // (each agent's exports and deliveries, distinct exports accepted, short)
        let table = [
            ([(300, 300), (523, 523)], 823, false),
            ([(300, 300), (523, 524)], 823, false),
            ([(300, 300), (523, 523)], 822, true),
            ([(300, 300), (523, 523)], 824, true),
            ([(300, 299), (523, 523)], 823, true),
        ];
        for (agents, receiver_exports, short) in table {
            let report = FleetReport {
                published: 0,
                agents: agents.iter().map(|&(e, d)| agent(e, d)).collect(),
                receiver_exports,
            };
            assert_eq!(
                shortfall(&report).is_some(),
                short,
                "{agents:?} {receiver_exports}"
            );
        }
    }
}
