//! Running the agent (`outpost run`), and what tries it out: the demo (`outpost demo`) and a
//! receiver to deliver to (`outpost receiver`).

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use crate::agent::{termination_signal, Agent, AgentOptions};
use crate::config::Config;
use crate::receiver::{Receiver, ReceiverOptions};
use crate::store::{StoreOwner, StoreUse};

use super::{cannot_act_as_owner, for_terminal, CliError};

pub(super) async fn demo(fail_share: f64, fleet: bool) -> Result<(), CliError> {
    if !(0.0..1.0).contains(&fail_share) {
        return Err(CliError::Usage(
            "--fail-share must be at least 0 and below 1".into(),
        ));
    }
    // Stopped by a signal, the fleet demo's future is dropped, and with it its temporary
    // folders and the nats-server child; the plain demo stops its agent first. The default
    // action would leave them behind.
    let interrupted =
        || CliError::Failure("interrupted; the demo's temporary folders are removed".into());
    if fleet {
        outln!("outpost demo --fleet: nats-server, the embedded receiver, three agents owning 12 partitions, the sample updates of data/ published into the stream")?;
        let run = crate::demo_fleet::run(fail_share, std::io::stderr().is_terminal());
        let report = tokio::select! {
            report = run => report.map_err(CliError::Failure)?,
            () = termination_signal() => return Err(interrupted()),
        };
        let printed = crate::demo_fleet::print_report(&report, &mut std::io::stdout().lock());
        return verdict(crate::demo_fleet::shortfall(&report), printed);
    }
    outln!("outpost demo: an embedded receiver on loopback, the agent against it, the sample updates of data/")?;
    let options = crate::demo::DemoOptions {
        fail_share,
        show_progress: std::io::stderr().is_terminal(),
        ..Default::default()
    };
    let (stop, terminated) = (options.stop.clone(), termination_signal());
    tokio::spawn(async move {
        terminated.await;
        stop.cancel();
    });
    let report = crate::demo::run(&options)
        .await
        .map_err(CliError::Failure)?;
    let printed = crate::demo::print_report(&report, &mut std::io::stdout().lock());
    verdict(crate::demo::shortfall(&report), printed)
}

/// The demo's outcome: what it fell short of, before a report that could not be written.
fn verdict(shortfall: Option<String>, printed: std::io::Result<()>) -> Result<(), CliError> {
    match (shortfall, printed) {
        (Some(problem), _) => Err(CliError::Failure(format!("the demo fell short: {problem}"))),
        (None, printed) => printed.map_err(CliError::Output),
    }
}

pub(super) async fn receiver(
    listen: std::net::SocketAddr,
    options: ReceiverOptions,
    out: Option<PathBuf>,
) -> Result<(), CliError> {
    for (flag, share) in [
        ("--fail-share", options.fail_share),
        ("--reject-share", options.reject_share),
    ] {
        if !(0.0..=1.0).contains(&share) {
            return Err(CliError::Usage(format!("{flag} must be between 0 and 1")));
        }
    }
    if options.fail_share + options.reject_share > 1.0 {
        return Err(CliError::Usage(
            "--fail-share and --reject-share must not add up to more than 1".into(),
        ));
    }
    let lifetime = options.token_lifetime.as_secs();
    let client_id = options.client_id.clone();
    let terminated = termination_signal();
    let receiver = Receiver::start(listen, options)
        .await
        .map_err(|e| CliError::Failure(format!("cannot listen on {listen}: {e}")))?;
    let sink: Option<std::sync::Arc<std::sync::Mutex<File>>> = match out {
        Some(path) => Some(std::sync::Arc::new(std::sync::Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| CliError::Failure(format!("cannot open {}: {e}", path.display())))?,
        ))),
        None => None,
    };
    receiver.on_delivered(std::sync::Arc::new(move |r| {
        let key = r.header("idempotency-key").unwrap_or("-");
        // An accepted body is valid JSON (the receiver checked it): written as it came, not
        // parsed a second time. A line break in valid JSON text can only be whitespace between
        // tokens (inside strings it is escaped), so a space keeps each export on one line.
        let payload = std::str::from_utf8(&r.body).ok().and_then(|text| {
            serde_json::value::RawValue::from_string(text.replace(['\n', '\r'], " ")).ok()
        });
        match &sink {
            Some(file) => {
                /// One line of `--out`; the payload as the receiver got it.
                #[derive(serde::Serialize)]
                struct Line<'a> {
                    idempotency_key: &'a str,
                    query: &'a Option<String>,
                    payload: Option<&'a serde_json::value::RawValue>,
                }
                let line = serde_json::to_string(&Line {
                    idempotency_key: key,
                    query: &r.query,
                    payload: payload.as_deref(),
                })
                .expect("a line serializes");
                let _ = writeln!(
                    file.lock().expect("the sink lock is never poisoned"),
                    "{line}"
                );
            }
            None => {
                let text = payload
                    .as_deref()
                    .map_or("null", serde_json::value::RawValue::get);
                // JSON carries control characters raw in its strings, which a terminal would
                // act on; and a reader that stops early (`| head`) only ends the printing.
                let line = format!("{key} {text}");
                let stdout = std::io::stdout();
                let shown = match stdout.is_terminal() {
                    true => for_terminal(&line, false),
                    false => std::borrow::Cow::Borrowed(line.as_str()),
                };
                let _ = writeln!(stdout.lock(), "{shown}");
            }
        }
    }));
    let base = receiver.base_url();
    eprintln!("receiver listening on {base}");
    eprintln!(
        "  token endpoint   {base}{}  (client_id {client_id}, tokens live {lifetime} s)",
        crate::receiver::TOKEN_PATH
    );
    eprintln!(
        "  profile endpoint {base}{}",
        crate::receiver::PROFILES_PATH
    );
    terminated.await;
    Ok(())
}

/// How long `outpost run` waits, once the agent has stopped, for blocking work still running.
pub(super) const LEFT_WORK_WAIT: Duration = Duration::from_secs(5);

/// From now on, a SIGTERM or SIGINT ends the process at once, exit 1, as a kill would: a stop
/// that waits (for requests in flight, up to the request timeout and more) can be cut short by
/// whoever asked for it. Nothing acknowledged is lost; deliveries not yet recorded are sent
/// again.
fn exit_on_a_second_signal() {
    let again = termination_signal();
    tokio::spawn(async move {
        again.await;
        tracing::warn!("a second signal: exiting now, without waiting for the stop to finish");
        std::process::exit(1);
    });
}

pub(super) async fn run(config: &Config) -> Result<(), CliError> {
    // Before the agent serves: a SIGTERM right after `/healthz` first answers stops it cleanly.
    let mut terminated = Box::pin(termination_signal());
    let agent_error = |e: crate::agent::AgentError| match e.is_config() {
        true => CliError::Usage(e.to_string()),
        false => CliError::Failure(e.to_string()),
    };
    // Run as root on a store folder another user owns, the agent acts as that user, as the
    // commands do, once it has bound its port and read its key files.
    let acting_as = match StoreOwner::of_foreign_store(&config.storage.path, StoreUse::Make) {
        Ok(None) => None,
        Ok(Some(owner)) => {
            let ready = crate::agent::Ready::new(config)
                .await
                .map_err(agent_error)?;
            let uid = owner.act_as().map_err(|e| cannot_act_as_owner(config, e))?;
            tracing::info!(uid, store = %config.storage.path.display(), "acting as the store folder's owner");
            Some((ready, uid))
        }
        Err(e) => return Err(cannot_act_as_owner(config, e)),
    };
    let uid = acting_as.as_ref().map(|(_, uid)| *uid);
    let start = async {
        match acting_as {
            Some((ready, _)) => Agent::start_ready(config, AgentOptions::default(), ready).await,
            None => Agent::start(config, AgentOptions::default()).await,
        }
    };
    // A signal while the agent starts (it may wait up to 30 s for a store another process
    // holds) stops it there: nothing was taken or acknowledged yet.
    let started = tokio::select! {
        started = start => started,
        () = terminated.as_mut() => {
            tracing::info!("stopped before the agent had started");
            exit_on_a_second_signal();
            return Ok(());
        }
    };
    let started = match (started, uid) {
        // The owner may be refused a file root could read: the error says whose rights it had.
        (Err(crate::agent::AgentError::NatsFiles(e)), Some(uid)) => {
            Err(crate::agent::AgentError::NatsFiles(format!(
                "{e} (read as uid {uid}, the store folder's owner, whose rights the agent takes)"
            )))
        }
        (started, _) => started,
    };
    let agent = started.map_err(agent_error)?;
    let stop = agent.shutdown_token();
    tokio::spawn(async move {
        terminated.await;
        tracing::info!("stopping: finishing in-flight deliveries");
        exit_on_a_second_signal();
        stop.cancel();
    });
    agent
        .wait()
        .await
        .map_err(|e| CliError::Failure(e.to_string()))
}
