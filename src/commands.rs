//! What each subcommand does: load the config, reach the store (through the running agent's
//! socket, or straight on disk), do the work, and print the result for people or (`--json`)
//! for programs.

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Read, Seek, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;

use crate::admin::{execute, AdminAnswer, AdminError, AdminRequest};
use crate::agent::{termination_signal, Agent, AgentOptions};
use crate::cli::{Cli, Command, OutboxCommand, ProfileCommand, Targets};
use crate::config::{self, Auth, Config, ConfigError};
use crate::profile::prune::KeepTree;
use crate::profile::update::{InputError, UpdateReader};
use crate::profile::{Reason, Update};
use crate::receiver::{Receiver, ReceiverOptions};
use crate::store::{BatchSummary, Store, StoreError};

/// How many updates `outpost ingest` commits (and flushes) at a time: bounds memory.
const INGEST_CHUNK: usize = 1_000;
/// How long the CLI waits for the agent's answer.
const AGENT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("input refused, nothing stored: {0}")]
    Input(#[from] InputError),
    #[error("{0}")]
    Failure(String),
}

impl CliError {
    /// 2 for usage and configuration errors, 1 for every other failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_) | CliError::Usage(_) => 2,
            _ => 1,
        }
    }
}

impl From<AdminError> for CliError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::Usage(m) => CliError::Usage(m),
            AdminError::NotFound(m) | AdminError::Failed(m) => CliError::Failure(m),
        }
    }
}

/// Where the CLI's requests go.
pub enum Backend {
    /// The running agent's admin socket.
    Agent(PathBuf),
    /// The store on disk, opened by this process.
    Local(Store),
}

impl Backend {
    /// The agent if one answers on the store's socket, else the store itself.
    pub fn connect(config: &Config) -> Result<Backend, CliError> {
        let socket = crate::server::admin::socket_path(&config.storage.path);
        if UnixStream::connect(&socket).is_ok() {
            return Ok(Backend::Agent(socket));
        }
        match Store::open(&config.storage.path, config.storage.cache_bytes) {
            Ok(store) => Ok(Backend::Local(store)),
            Err(StoreError::Locked(path)) => Err(CliError::Failure(format!(
                "the store at {} is in use by another process, and no agent answers on {}",
                path.display(),
                socket.display()
            ))),
            Err(e) => Err(e.into()),
        }
    }

    pub fn execute(&self, request: &AdminRequest) -> Result<Value, AdminError> {
        match self {
            Backend::Local(store) => execute(store, request),
            Backend::Agent(socket) => call_agent(socket, request),
        }
    }

    /// Commits one chunk of validated, pruned updates, durably.
    fn ingest(&self, config: &Config, updates: &[Update]) -> Result<BatchSummary, CliError> {
        match self {
            Backend::Local(store) => {
                if store.tally()?.bytes >= config.storage.max_outbox_bytes {
                    return Err(CliError::Failure(crate::admin::OUTBOX_FULL.into()));
                }
                let started = std::time::Instant::now();
                let summaries = store.apply_groups(&[updates], &config.mapping, Utc::now())?;
                let decided = started.elapsed();
                store.flush()?;
                tracing::debug!(
                    updates = updates.len(),
                    apply_us = decided.as_micros() as u64,
                    flush_us = (started.elapsed() - decided).as_micros() as u64,
                    "committed a chunk"
                );
                Ok(summaries[0])
            }
            Backend::Agent(socket) => {
                let request = AdminRequest::Ingest {
                    updates: updates.iter().map(Update::to_value).collect(),
                };
                let report = call_agent(socket, &request)?;
                BatchSummary::from_report(&report).ok_or_else(|| {
                    CliError::Failure(format!("unexpected answer from the agent: {report}"))
                })
            }
        }
    }
}

fn call_agent(socket: &Path, request: &AdminRequest) -> Result<Value, AdminError> {
    let failed =
        |e: std::io::Error| AdminError::Failed(format!("agent at {}: {e}", socket.display()));
    let mut stream = UnixStream::connect(socket).map_err(failed)?;
    stream
        .set_read_timeout(Some(AGENT_TIMEOUT))
        .map_err(failed)?;
    let mut line = serde_json::to_string(request).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(failed)?;
    stream.shutdown(std::net::Shutdown::Write).map_err(failed)?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(failed)?;
    let answer: AdminAnswer = serde_json::from_str(&answer).map_err(|e| {
        AdminError::Failed(format!(
            "agent at {}: unreadable answer: {e}",
            socket.display()
        ))
    })?;
    answer.into_result()
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failure(format!("cannot start the runtime: {e}")))
}

pub fn dispatch(cli: Cli) -> Result<(), CliError> {
    // The commands that need no config.
    match cli.command {
        Command::Demo { fail_share } => return runtime()?.block_on(demo(fail_share)),
        Command::Receiver {
            listen,
            client_id,
            client_secret,
            token_lifetime_s,
            fail_share,
            out,
        } => {
            let options = ReceiverOptions {
                client_id,
                client_secret,
                token_lifetime: Duration::from_secs(token_lifetime_s),
                fail_share,
                tls: None,
            };
            return runtime()?.block_on(receiver(listen, options, out));
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "outpost",
                &mut std::io::stdout(),
            );
            return Ok(());
        }
        _ => {}
    }
    let config_path = config::resolve_path(cli.config.as_deref());
    let config = Config::load(&config_path)?;
    match cli.command {
        Command::Run => runtime()?.block_on(run(&config)),
        Command::Check => runtime()?.block_on(check(&config)),
        Command::Ingest { file, json } => {
            let backend = Backend::connect(&config)?;
            let summary = ingest_path(&backend, &config, &file)?;
            print_summary(&summary, json);
            Ok(())
        }
        Command::Outbox(command) => outbox(&Backend::connect(&config)?, command),
        Command::Profile(ProfileCommand::Show { id, json }) => {
            let value = Backend::connect(&config)?.execute(&AdminRequest::Profile { id })?;
            print_json(&value, json.json);
            Ok(())
        }
        Command::Demo { .. } | Command::Receiver { .. } | Command::Completions { .. } => {
            unreachable!("handled above")
        }
    }
}

async fn demo(fail_share: f64) -> Result<(), CliError> {
    if !(0.0..1.0).contains(&fail_share) {
        return Err(CliError::Usage(
            "--fail-share must be at least 0 and below 1".into(),
        ));
    }
    println!("outpost demo: an embedded receiver on loopback, the agent against it, the sample updates of data/");
    let options = crate::demo::DemoOptions {
        fail_share,
        show_progress: std::io::stderr().is_terminal(),
        ..Default::default()
    };
    let report = crate::demo::run(&options)
        .await
        .map_err(CliError::Failure)?;
    crate::demo::print_report(&report);
    Ok(())
}

async fn receiver(
    listen: std::net::SocketAddr,
    options: ReceiverOptions,
    out: Option<PathBuf>,
) -> Result<(), CliError> {
    if !(0.0..=1.0).contains(&options.fail_share) {
        return Err(CliError::Usage(
            "--fail-share must be between 0 and 1".into(),
        ));
    }
    let lifetime = options.token_lifetime.as_secs();
    let client_id = options.client_id.clone();
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
        let key = r.header("idempotency-key").unwrap_or("-").to_owned();
        let body = r.json().unwrap_or(Value::Null);
        match &sink {
            Some(file) => {
                let line =
                    serde_json::json!({"idempotency_key": key, "query": r.query, "payload": body});
                let _ = writeln!(
                    file.lock().expect("the sink lock is never poisoned"),
                    "{line}"
                );
            }
            None => println!("{key} {body}"),
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
    termination_signal().await;
    Ok(())
}

async fn run(config: &Config) -> Result<(), CliError> {
    let agent = Agent::start(config, AgentOptions::default())
        .await
        .map_err(|e| CliError::Failure(e.to_string()))?;
    let stop = agent.shutdown_token();
    tokio::spawn(async move {
        termination_signal().await;
        tracing::info!("stopping: finishing in-flight deliveries");
        stop.cancel();
    });
    agent
        .wait()
        .await
        .map_err(|e| CliError::Failure(e.to_string()))
}

/// Validates the config (already done by loading it), builds the TLS client, fetches a token.
async fn check(config: &Config) -> Result<(), CliError> {
    let d = &config.destination;
    println!("config           {} (valid)", config.path.display());
    println!(
        "destination      {}",
        d.name.as_deref().unwrap_or("(unnamed)")
    );
    let query = d.http_endpoint.query_pairs().count();
    println!("endpoint         {}", display_url(&d.http_endpoint));
    if query > 0 {
        println!("                 (+ {query} query parameters, sent as given)");
    }
    let headers: Vec<&str> = d.custom_headers.iter().map(|(n, _)| n.as_str()).collect();
    println!(
        "custom headers   {}",
        if headers.is_empty() {
            "-".to_owned()
        } else {
            headers.join(", ")
        }
    );
    println!(
        "mapping          {} attributes, {} segments, {}",
        config.mapping.attributes.len(),
        config.mapping.segments.len(),
        if config.mapping.identities.is_empty() {
            "all identity namespaces".to_owned()
        } else {
            format!("{} identity namespaces", config.mapping.identities.len())
        }
    );
    println!("store            {}", config.storage.path.display());
    println!(
        "ingest           {}{}",
        config.ingest.listen,
        if config.ingest.token.is_some() {
            " (token required)"
        } else {
            ""
        }
    );
    let client = crate::delivery::client::HttpClient::new(d, config.delivery.request_timeout)
        .map_err(|e| CliError::Failure(format!("destination TLS: {e}")))?;
    match &d.auth {
        Auth::None => println!("auth             none"),
        Auth::Bearer { .. } => println!("auth             static bearer token (set)"),
        Auth::OAuth2ClientCredentials {
            auth_endpoint,
            client_id,
            credentials,
            ..
        } => {
            let placement = match credentials {
                crate::config::CredentialsPlacement::Body => "the form body",
                crate::config::CredentialsPlacement::Basic => "a Basic header",
            };
            println!("auth             oauth2 client credentials, client_id {client_id}, secret sent in {placement}");
            println!("token endpoint   {}", display_url(auth_endpoint));
            let source =
                crate::delivery::auth::TokenSource::new(d.auth.clone(), client, Default::default());
            let fetched = source
                .fetch()
                .await
                .map_err(|e| CliError::Failure(format!("token: {e}")))?;
            println!(
                "token            obtained ({} characters, type {}, lifetime {} s{})",
                fetched.token.expose().len(),
                fetched.token_type.as_deref().unwrap_or("unspecified"),
                fetched.lifetime.as_secs(),
                if fetched.lifetime_given {
                    ""
                } else {
                    ", assumed: no expires_in"
                }
            );
        }
    }
    println!("check            ok");
    Ok(())
}

/// A URL without its query, fragment and user info, which may carry secrets.
fn display_url(url: &url::Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.set_fragment(None);
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.to_string()
}

fn print_json(value: &Value, compact: bool) {
    if compact {
        println!("{value}");
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("a Value always serializes")
        );
    }
}

fn print_summary(summary: &BatchSummary, as_json: bool) {
    if as_json {
        println!("{}", summary.report());
        return;
    }
    let reasons: Vec<String> = Reason::ALL
        .iter()
        .filter(|r| summary.exports_for(**r) > 0)
        .map(|r| format!("{} {r}", summary.exports_for(*r)))
        .collect();
    let reasons = if reasons.is_empty() {
        String::new()
    } else {
        format!(" ({})", reasons.join(", "))
    };
    println!(
        "accepted {} updates: {} exports{reasons}, {} unchanged, {} stale, {} deleted",
        summary.accepted, summary.exports, summary.unchanged, summary.stale, summary.deleted
    );
}

/// Ingests a file, or stdin for `-` (spooled to a temporary file so it can be read twice).
pub fn ingest_path(
    backend: &Backend,
    config: &Config,
    path: &Path,
) -> Result<BatchSummary, CliError> {
    let mut file = if path == Path::new("-") {
        let mut spool = tempfile::tempfile()
            .map_err(|e| CliError::Failure(format!("cannot create a temporary file: {e}")))?;
        std::io::copy(&mut std::io::stdin().lock(), &mut spool)
            .map_err(|e| CliError::Failure(format!("cannot read standard input: {e}")))?;
        spool
    } else {
        File::open(path)
            .map_err(|e| CliError::Failure(format!("cannot open {}: {e}", path.display())))?
    };
    ingest_file(backend, config, &mut file)
}

/// Two passes so that memory stays bounded and a bad line stores nothing: the first validates
/// every line, the second commits in chunks. A crash during the second pass leaves a prefix
/// stored; running the same file again completes it (updates with timestamps are then stale or
/// unchanged, so no export is made twice).
pub fn ingest_file<F: Read + Seek>(
    backend: &Backend,
    config: &Config,
    file: &mut F,
) -> Result<BatchSummary, CliError> {
    let rewind = |file: &mut F| {
        file.rewind()
            .map_err(|e| CliError::Failure(format!("cannot reread the input: {e}")))
    };
    rewind(file)?;
    let mut count = 0u64;
    for update in UpdateReader::new(BufReader::new(&mut *file)) {
        update?;
        count += 1;
    }
    rewind(file)?;
    // Drawn only when stderr is a terminal.
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(count),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} updates, {eta} left")
            .expect("valid template"),
    );
    let keep = KeepTree::for_mapping(&config.mapping);
    let mut total = BatchSummary::default();
    let mut chunk = Vec::with_capacity(INGEST_CHUNK);
    let mut reader = UpdateReader::new(BufReader::new(&mut *file)).peekable();
    while reader.peek().is_some() {
        chunk.clear();
        while chunk.len() < INGEST_CHUNK {
            match reader.next() {
                Some(update) => {
                    let mut update = update?;
                    keep.prune(&mut update.profile);
                    chunk.push(update);
                }
                None => break,
            }
        }
        total.add(&backend.ingest(config, &chunk)?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(total)
}

fn outbox(backend: &Backend, command: OutboxCommand) -> Result<(), CliError> {
    match command {
        OutboxCommand::Stats(flag) => {
            let stats = backend.execute(&AdminRequest::Stats)?;
            if flag.json {
                println!("{stats}");
            } else {
                print_stats(&stats);
            }
        }
        OutboxCommand::List {
            dead,
            profile,
            limit,
            json,
        } => {
            let exports = backend.execute(&AdminRequest::List {
                dead,
                profile_id: profile,
                limit,
            })?;
            let exports = exports.as_array().cloned().unwrap_or_default();
            if json.json {
                let mut out = std::io::stdout().lock();
                for export in &exports {
                    let _ = writeln!(out, "{export}");
                }
            } else {
                print_export_table(&exports);
            }
        }
        OutboxCommand::Show { id, json } => {
            let export = backend.execute(&AdminRequest::Show { id })?;
            if json.json {
                println!("{export}");
            } else {
                print_export(&export);
            }
        }
        OutboxCommand::Retry(Targets { ids, all_dead }) => {
            let result = backend.execute(&AdminRequest::Retry { ids, all_dead })?;
            report_repair(&result, "retried", "put back in the outbox")?;
        }
        OutboxCommand::Drop {
            targets: Targets { ids, all_dead },
            yes,
        } => {
            if !yes && std::io::stdin().is_terminal() && !confirm(&ids, all_dead)? {
                return Err(CliError::Failure("nothing dropped".into()));
            }
            let result = backend.execute(&AdminRequest::Drop { ids, all_dead })?;
            report_repair(&result, "dropped", "deleted")?;
        }
    }
    Ok(())
}

fn confirm(ids: &[String], all_dead: bool) -> Result<bool, CliError> {
    let what = if all_dead {
        "every dead letter".to_owned()
    } else {
        format!("{} export(s)", ids.len())
    };
    eprint!("Delete {what} for good? [y/N] ");
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .map_err(|e| CliError::Failure(format!("cannot read the answer: {e}")))?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

fn report_repair(result: &Value, key: &str, verb: &str) -> Result<(), CliError> {
    let done = result[key].as_array().map_or(0, Vec::len);
    println!("{done} export(s) {verb}");
    let missing: Vec<&str> = result["not_found"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CliError::Failure(format!(
            "not found: {}",
            missing.join(", ")
        )))
    }
}

fn text_of(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_stats(stats: &Value) {
    let age = match (
        &stats["oldest_pending_created_at"],
        &stats["oldest_pending_age_s"],
    ) {
        (Value::String(at), Value::Number(age)) => format!("{at} ({age} s ago)"),
        _ => "-".into(),
    };
    println!("pending          {}", text_of(&stats["pending"]));
    println!("dead             {}", text_of(&stats["dead"]));
    println!("oldest pending   {age}");
    println!("outbox bytes     {}", text_of(&stats["bytes"]));
    println!("profiles stored  {}", text_of(&stats["profiles"]));
    println!("store id         {}", text_of(&stats["store_id"]));
}

fn print_export_table(exports: &[Value]) {
    if exports.is_empty() {
        println!("(no exports)");
        return;
    }
    println!(
        "{:<22} {:<24} {:<9} {:>8}  {:<24}  LAST ERROR",
        "ID", "PROFILE", "REASON", "ATTEMPTS", "CREATED"
    );
    for e in exports {
        println!(
            "{:<22} {:<24} {:<9} {:>8}  {:<24}  {}",
            text_of(&e["id"]),
            truncate_chars(&text_of(&e["profile_id"]), 24),
            text_of(&e["reason"]),
            text_of(&e["attempts"]),
            text_of(&e["created_at"]),
            truncate_chars(&text_of(&e["last_error"]), 60)
        );
    }
}

fn print_export(export: &Value) {
    for key in [
        "id",
        "profile_id",
        "reason",
        "dead",
        "attempts",
        "created_at",
        "last_attempt_at",
        "last_error",
        "dead_at",
    ] {
        println!("{key:<16} {}", text_of(&export[key]));
    }
    println!("payload:");
    println!(
        "{}",
        serde_json::to_string_pretty(&export["payload"]).expect("a Value always serializes")
    );
}

fn truncate_chars(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut cut: String = text.chars().take(max - 1).collect();
        cut.push('…');
        cut
    }
}
