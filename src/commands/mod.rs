//! What each subcommand does: load the config, reach the store ([`backend`]: through the
//! running agent's socket, or straight on disk), do the work, and print the result for people
//! or (`--json`) for programs ([`output`]).

/// `println!` for a command's output: a full disk or a reader gone comes back as
/// [`CliError::Output`] to return, where `println!` would panic.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::commands::CliError::Output)
    }};
}

/// [`outln!`] for a line of a report that shows what a config or a server gave (names, ids,
/// paths), with their control characters escaped: one line each, whatever they hold.
macro_rules! report_line {
    ($($arg:tt)*) => {
        outln!("{}", $crate::commands::for_terminal(&format!($($arg)*), false))
    };
}

/// [`outln!`] without the line's end.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*).map_err($crate::commands::CliError::Output)
    }};
}

mod backend;
mod handover;
mod ingest;
mod nats;
mod output;
mod preflight;
mod repair;
mod run;
mod top;

use std::io::{IsTerminal, Write};
use std::time::Duration;

use serde_json::Value;

use crate::admin::{AdminError, AdminRequest};
use crate::cli::{Cli, Command, NatsCommand, OutboxCommand, ProfileCommand, Targets};
use crate::config::{self, Auth, Config, ConfigError};
use crate::profile::update::InputError;
use crate::receiver::ReceiverOptions;
use crate::store::{ExportId, Store, StoreError, StoreOwner, StoreUse};

/// How many exports `outbox list` asks for at a time.
const LIST_PAGE: usize = 1_000;
pub use backend::Backend;
pub use ingest::{ingest_file, ingest_path};
pub use output::for_terminal;
use output::{
    describe_clock_jumps, display_url, print_export, print_json, print_stats, print_summary,
    text_of, ExportTable, Listing,
};

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
    /// The store refused the request and changed nothing for it ([`AdminError::Refused`]).
    /// For an ingest, a profile of a partition the store handed over: running the input
    /// again is refused again.
    #[error("{0}")]
    Refused(String),
    /// The request may have been done: the agent got it but did not answer, or answered that
    /// it could not tell.
    #[error("{0}")]
    InDoubt(String),
    /// An ingest that stopped partway: its first `stored` updates of `updates` were stored,
    /// and the `in_doubt` after them may have been.
    #[error("{message}")]
    PartlyStored {
        message: String,
        stored: u64,
        in_doubt: u64,
        updates: u64,
    },
    /// The output could not be written (a full disk, a reader gone): what the command did is
    /// done.
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
}

impl CliError {
    /// The output's reader went away (a closed pipe): nothing to tell it, nor anyone else.
    pub fn is_reader_gone(&self) -> bool {
        matches!(self, CliError::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }

    /// 2 for usage and configuration errors, 1 for every other failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_) | CliError::Usage(_) => 2,
            CliError::Store(e) if e.path_is_not_a_folder() => 2,
            // What a shell reports for the commands that SIGPIPE ends.
            error if error.is_reader_gone() => 141,
            _ => 1,
        }
    }
}

impl From<AdminError> for CliError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::Usage(m) => CliError::Usage(m),
            AdminError::NotFound(m) | AdminError::Failed(m) => CliError::Failure(m),
            AdminError::Refused(m) => CliError::Refused(m),
            AdminError::Unanswered(m) | AdminError::InDoubt(m) => CliError::InDoubt(m),
        }
    }
}

/// Lists up to `wanted` exports page by page, so that a long outbox is never held whole, by
/// the agent or here: `fetch(after, asked)` answers up to `asked` exports numbered above
/// `after`, and `show` takes each export listed. Returns whether the list was cut at `wanted`
/// (each page asks for one more than is still wanted, to tell).
///
/// An agent of a build from before paging ignores `after` and answers the first page again:
/// that is refused before any of the page is shown, rather than listed again and again.
pub(super) fn list_paged(
    wanted: usize,
    fetch: impl FnMut(Option<u64>, usize) -> Result<Value, CliError>,
    show: impl FnMut(&Value) -> Result<(), CliError>,
) -> Result<bool, CliError> {
    let seq = |export: &Value| Some(export["id"].as_str()?.parse::<ExportId>().ok()?.seq);
    list_paged_by(wanted, LIST_PAGE, "export number", seq, fetch, show)
}

/// [`list_paged`] for any list in key order, `page` items a page: `key` reads an item's key,
/// which `fetch` takes to answer the items after it; `what` names a key in the message for an
/// older agent.
pub(super) fn list_paged_by<K: PartialOrd + Copy + std::fmt::Display>(
    wanted: usize,
    page: usize,
    what: &str,
    key: impl Fn(&Value) -> Option<K>,
    mut fetch: impl FnMut(Option<K>, usize) -> Result<Value, CliError>,
    mut show: impl FnMut(&Value) -> Result<(), CliError>,
) -> Result<bool, CliError> {
    let (mut after, mut shown) = (None, 0);
    loop {
        let left = wanted - shown;
        let asked = page.min(left.saturating_add(1));
        let items = fetch(after, asked)?;
        let items = items.as_array().map(Vec::as_slice).unwrap_or_default();
        if let (Some(after), Some(first)) = (after, items.first().and_then(&key)) {
            if first <= after {
                return Err(CliError::Failure(format!(
                    "the running agent answered the page after {what} {after} with \
                     {what} {first}: it is of an older build, which lists only a first \
                     page; restart it with this build, or list fewer than {page} with --limit"
                )));
            }
        }
        for item in items.iter().take(left) {
            show(item)?;
            shown += 1;
        }
        if items.len() > left {
            return Ok(true);
        }
        match items.last().and_then(&key) {
            Some(last) if items.len() == asked => after = Some(last),
            _ => return Ok(false),
        }
    }
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
        Command::Demo { fail_share, fleet } => {
            return runtime()?.block_on(run::demo(fail_share, fleet))
        }
        Command::Receiver {
            listen,
            client_id,
            client_secret,
            token_lifetime_s,
            fail_share,
            reject_share,
            out,
        } => {
            let options = ReceiverOptions {
                client_id,
                client_secret,
                token_lifetime: Duration::from_secs(token_lifetime_s),
                fail_share,
                reject_share,
                keep_requests: false,
                ..ReceiverOptions::default()
            };
            return runtime()?.block_on(run::receiver(listen, options, out));
        }
        Command::Completions { shell } => {
            // Made in memory: clap_complete panics when it cannot write.
            let mut script = Vec::new();
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "outpost",
                &mut script,
            );
            return std::io::stdout()
                .lock()
                .write_all(&script)
                .map_err(CliError::Output);
        }
        _ => {}
    }
    let config_path = config::resolve_path(cli.config.as_deref());
    // Only these talk to the destination.
    let secrets = match cli.command {
        Command::Run | Command::Check { store: false, .. } => config::Secrets::Required,
        _ => config::Secrets::IfGiven,
    };
    let config = Config::load_for(&config_path, secrets)?;
    with_config(cli.command, &config)
}

/// The commands that read a config.
fn with_config(command: Command, config: &Config) -> Result<(), CliError> {
    let works_on_store = matches!(
        command,
        Command::Check { store: true, .. }
            | Command::Repair { .. }
            | Command::Compact { .. }
            | Command::Outbox(_)
            | Command::Profile(_)
            | Command::Rejected(_)
    );
    if works_on_store {
        as_store_owner(config, StoreUse::Existing)?;
    }
    match command {
        Command::Run => {
            let runtime = runtime()?;
            let ran = runtime.block_on(run::run(config));
            // Blocking work left running (a store still opening, or upgrading, when a signal
            // came before the agent had started) is not waited for past this: it stops as a
            // kill would stop it, which the store is made to survive.
            runtime.shutdown_timeout(run::LEFT_WORK_WAIT);
            ran
        }
        Command::Check { store: false, .. } => runtime()?.block_on(check(config)),
        Command::Check { store: true, json } => {
            let print = repair::check_store(&Backend::connect_existing(config)?, json)?;
            // The store this process opened is closed by now.
            print()
        }
        Command::Repair { yes } => repair::repair_store(config, yes),
        Command::Compact { json } => repair::compact_store(config, json),
        Command::Ingest { file, json, skip } => {
            let ingested = (|| {
                // Opened with this process's rights, before it may act as the store's owner.
                let mut input = ingest::open_input(&file)?;
                // Checked before a store not made yet is made, so that refused input leaves
                // none. A folder this user cannot look into is left to the store's opening to
                // report, as the store owner's folder.
                let checked = match Store::exists_at(&config.storage.path) {
                    Ok(false) => Some(ingest::check_before_making_store(config, &mut input)?),
                    Ok(true) | Err(_) => None,
                };
                if let Some(checked) = &checked {
                    checked.refuse_skip_past_the_end(skip)?;
                }
                as_store_owner(config, StoreUse::Make)?;
                let backend = Backend::connect(config)?;
                ingest::ingest_checked(&backend, config, &mut input, checked, skip)
            })();
            match ingested {
                // Stored, whatever becomes of the summary: a run again would apply them again.
                Ok(summary) => print_summary(&summary, json).map_err(|error| match error {
                    CliError::Output(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                        CliError::Failure(format!(
                            "{} update(s) stored, but the summary could not be written: {e}",
                            summary.accepted
                        ))
                    }
                    error => error,
                }),
                Err(error) => {
                    // What a script reads on standard output too, the message on stderr.
                    if json {
                        // The error is what the exit tells, should this fail too.
                        let _ = print_json(&ingest::error_json(&error, skip), true);
                    }
                    Err(error)
                }
            }
        }
        Command::Outbox(command) => {
            // Asked before the store is opened: a store this process held while a person
            // reads the question would keep `outpost run` from starting meanwhile.
            if let OutboxCommand::Drop {
                targets: Targets { ids, all_dead },
                yes: false,
                ..
            } = &command
            {
                if !Store::exists_at(&config.storage.path)? {
                    return Err(CliError::Usage(
                        StoreError::Missing(config.storage.path.clone()).to_string(),
                    ));
                }
                if std::io::stdin().is_terminal() {
                    let missing = exports_not_found(config, ids)?;
                    if !missing.is_empty() {
                        return Err(CliError::Failure(format!(
                            "not found: {}; nothing dropped",
                            missing.join(", ")
                        )));
                    }
                    if !confirm(ids, *all_dead)? {
                        return Err(CliError::Failure("nothing dropped".into()));
                    }
                }
            }
            let print = outbox(&Backend::connect_existing(config)?, command)?;
            // The store this process opened is closed by now.
            print()
        }
        Command::Profile(ProfileCommand::Show { id, json }) => {
            let value =
                Backend::connect_existing(config)?.execute(&AdminRequest::Profile { id })?;
            print_json(&value, json.json)
        }
        Command::Publish {
            file,
            in_flight,
            resume,
        } => runtime()?.block_on(nats::publish_path(
            config,
            &file,
            in_flight,
            resume.as_deref(),
        )),
        Command::Nats(NatsCommand::Setup { record_made_at }) => {
            runtime()?.block_on(nats::nats_setup(config, record_made_at))
        }
        Command::Nats(NatsCommand::Release { partitions, force }) => {
            runtime()?.block_on(nats::release(config, &partitions, force))
        }
        Command::Nats(NatsCommand::HandOver {
            partitions,
            file,
            force,
        }) => handover::hand_over(config, &partitions, &file, force),
        Command::Nats(NatsCommand::TakeOver { file }) => handover::take_over(config, &file),
        Command::Nats(NatsCommand::SetPosition { partition, seq }) => {
            // Checked against the stream with this process's rights (credential files).
            nats::check_position(config, partition, seq)?;
            as_store_owner(config, StoreUse::Existing)?;
            nats::set_position(&Backend::connect_existing(config)?, partition, seq)
        }
        Command::Rejected(command) => {
            let print = nats::rejected(&Backend::connect_existing(config)?, command)?;
            // The store this process opened is closed by now.
            print()
        }
        Command::Top { once, interval } => top::top(config, once, interval),
        Command::Demo { .. } | Command::Receiver { .. } | Command::Completions { .. } => {
            unreachable!("handled above")
        }
    }
}

/// Run as root on a store folder another user owns, a command that works on the store acts as
/// that user ([`crate::store::act_as_owner`]).
fn as_store_owner(config: &Config, store_use: StoreUse) -> Result<(), CliError> {
    let store = &config.storage.path;
    match crate::store::act_as_owner(store, store_use) {
        Ok(Some(uid)) => {
            tracing::debug!(uid, store = %store.display(), "acting as the store folder's owner");
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => Err(cannot_act_as_owner(config, e)),
    }
}

fn cannot_act_as_owner(config: &Config, e: impl Into<crate::store::OwnerError>) -> CliError {
    match e.into() {
        crate::store::OwnerError::Refused(refusal) => CliError::Failure(refusal),
        missing @ crate::store::OwnerError::Missing(_) => CliError::Usage(missing.to_string()),
        crate::store::OwnerError::Io(e) => CliError::Failure(format!(
            "cannot act as the owner of the store folder {} ({e}); run the command as that user",
            config.storage.path.display()
        )),
    }
}

/// Validates the config (already done by loading it), builds the TLS client, fetches a token.
async fn check(config: &Config) -> Result<(), CliError> {
    let d = &config.destination;
    report_line!("config           {} (valid)", config.path.display())?;
    report_line!(
        "destination      {}",
        d.name.as_deref().unwrap_or("(unnamed)")
    )?;
    let query = d.http_endpoint.query_pairs().count();
    report_line!("endpoint         {}", display_url(&d.http_endpoint))?;
    if query > 0 {
        let parameters = if query == 1 {
            "parameter"
        } else {
            "parameters"
        };
        report_line!("                 (+ {query} query {parameters}, sent as given)")?;
    }
    if let Some(proxy) = &d.proxy {
        let credentials = match proxy.credentials {
            Some(_) => ", with credentials (set)",
            None => "",
        };
        let mut through = Vec::new();
        if proxy.takes(&d.http_endpoint) {
            through.push("the endpoint");
        }
        if let Auth::OAuth2 { auth_endpoint, .. } = &d.auth {
            if proxy.takes(auth_endpoint) {
                through.push("the token endpoint");
            }
        }
        let through = match through.is_empty() {
            true => {
                "for neither the endpoint nor the token endpoint: destination.no_proxy lists them"
                    .to_owned()
            }
            false => format!("tunnels to {}", through.join(" and ")),
        };
        report_line!(
            "proxy            {} ({through}{credentials})",
            proxy.address()
        )?;
    }
    let headers: Vec<&str> = d.custom_headers.iter().map(|(n, _)| n.as_str()).collect();
    report_line!(
        "custom headers   {}",
        if headers.is_empty() {
            "-".to_owned()
        } else {
            headers.join(", ")
        }
    )?;
    report_line!(
        "mapping          {} attributes, {} segments, {}",
        config.mapping.attributes.len(),
        config.mapping.segments.len(),
        if config.mapping.identities.is_empty() {
            "all identity namespaces".to_owned()
        } else {
            format!("{} identity namespaces", config.mapping.identities.len())
        }
    )?;
    let store = preflight::store(config);
    report_line!("store            {}", store.line)?;
    report_line!("clock            {}", clock_report(config))?;
    let listen = preflight::listen(config);
    report_line!("ingest           {}", listen.line)?;
    let mut problems: Vec<String> = Vec::new();
    // Files the config names that cannot be used, or a store path through a file: the agent
    // would refuse to start (exit 2).
    let mut file_problems: Vec<String> = Vec::new();
    if let Some(tls) = &config.ingest.tls {
        match crate::server::tls::acceptor(tls) {
            Ok(_) => report_line!("ingest TLS       certificate and key load")?,
            Err(e) => {
                report_line!("ingest TLS       cannot be used")?;
                file_problems.push(e);
            }
        }
    }
    for finding in [store, listen] {
        if let Some(warning) = finding.warning {
            report_line!("warning          {warning}")?;
        }
        match finding.refused_at_start {
            true => file_problems.extend(finding.problem),
            false => problems.extend(finding.problem),
        }
    }
    for warning in &config.warnings {
        report_line!("warning          {warning}")?;
    }
    if let Some(nats) = &config.nats {
        match nats.check_files() {
            Err(e) => file_problems.push(e),
            Ok(()) => {
                if let Err(e) = nats::check_nats(nats).await {
                    report_line!("stream           cannot be read")?;
                    problems.push(format!("nats: {e}"));
                }
            }
        }
    }
    let client = match crate::delivery::client::HttpClient::new(d, config.delivery.request_timeout)
    {
        Ok(client) => client,
        Err(crate::delivery::client::ClientError::Config(message)) => {
            file_problems.push(message);
            return fail_with_files(problems, file_problems);
        }
        Err(other) => {
            problems.push(format!("destination TLS: {other}"));
            return fail_with_files(problems, file_problems);
        }
    };
    if !file_problems.is_empty() {
        return fail_with_files(problems, file_problems);
    }
    let https = d.http_endpoint.scheme() == "https";
    match crate::delivery::client::probe_endpoint(
        d,
        &d.http_endpoint,
        config.delivery.request_timeout,
    )
    .await
    {
        Ok(Some(version)) => report_line!("endpoint TLS     certificate verifies ({version})")?,
        // No export is sent: a wrong path or a refusal shows only when one is.
        Ok(None) => report_line!("endpoint TCP     accepts connections (no export sent)")?,
        Err(e) if https => {
            report_line!("endpoint TLS     failed")?;
            problems.push(format!("endpoint: {e}"));
        }
        // Not a failure of the set-up: exports wait until the endpoint is there.
        Err(e) => report_line!(
            "warning          endpoint: {e}; exports wait in the outbox until it accepts them"
        )?,
    }
    match &d.auth {
        Auth::None => report_line!("auth             none")?,
        Auth::Bearer { .. } => report_line!("auth             static bearer token (set)")?,
        Auth::OAuth2 {
            auth_endpoint,
            client_id,
            credentials,
            grant,
            ..
        } => {
            let placement = match credentials {
                crate::config::CredentialsPlacement::Body => "the form body",
                crate::config::CredentialsPlacement::Basic => "a Basic header",
            };
            let grant = match grant {
                crate::config::Grant::ClientCredentials => "client credentials".to_owned(),
                crate::config::Grant::Password { username, .. } => {
                    format!("password grant for user {username}")
                }
            };
            report_line!("auth             oauth2 {grant}, client_id {client_id}, secret sent in {placement}")?;
            report_line!("token endpoint   {}", display_url(auth_endpoint))?;
            let source =
                crate::delivery::auth::TokenSource::new(d.auth.clone(), client, Default::default());
            let fetched = match source.fetch().await {
                Ok(fetched) => fetched,
                Err(e) => {
                    problems.push(format!("token: {e}"));
                    return fail(problems);
                }
            };
            report_line!(
                "token            obtained ({} characters, type {}, lifetime {} s{})",
                fetched.token.expose().len(),
                for_terminal(
                    fetched.token_type.as_deref().unwrap_or("unspecified"),
                    false
                ),
                fetched.lifetime.as_secs(),
                if fetched.lifetime_given {
                    ""
                } else {
                    ", assumed: no usable expires_in"
                }
            )?;
            let token_type = fetched.token_type.as_deref();
            if let Some(warning) = crate::delivery::auth::token_type_warning(token_type) {
                report_line!("warning          {warning}")?;
            }
        }
    }
    if !problems.is_empty() {
        return fail(problems);
    }
    report_line!("check            ok")?;
    Ok(())
}

/// `check`'s failure: every problem found, one a line.
fn fail(problems: Vec<String>) -> Result<(), CliError> {
    Err(CliError::Failure(problems.join("\noutpost: ")))
}

/// `check`'s failure when files the config names cannot be used, as the agent would refuse
/// them (exit 2): those, then the other problems found.
fn fail_with_files(problems: Vec<String>, files: Vec<String>) -> Result<(), CliError> {
    if files.is_empty() {
        return fail(problems);
    }
    let all: Vec<String> = files.into_iter().chain(problems).collect();
    Err(CliError::Usage(all.join("\noutpost: ")))
}

/// The wall-clock jumps the store recorded, if the store exists (`check` does not create one).
fn clock_report(config: &Config) -> String {
    if !Store::exists_at(&config.storage.path).unwrap_or(false) {
        return "wall clock not watched yet (no store)".to_owned();
    }
    // Run as root, `check` keeps root's rights throughout (for the key files), so it opens
    // the store only where root would keep them too.
    match StoreOwner::of_foreign_store(&config.storage.path, StoreUse::Existing) {
        Ok(None) => {}
        Ok(Some(_)) => {
            return "not read: the store is another user's, and check runs with root's rights (run it as that user for this line)".to_owned()
        }
        Err(e) => return format!("not read: {e}"),
    }
    let stats = Backend::connect(config)
        .map_err(|e| e.to_string())
        .and_then(|backend| {
            backend
                .execute(&AdminRequest::Stats)
                .map_err(|e| e.to_string())
        });
    match stats {
        Ok(stats) => format!("wall-clock jumps {}", describe_clock_jumps(&stats)),
        Err(e) => format!("cannot read the store: {e}"),
    }
}

/// What a command prints, printed once the store it opened is closed: a reader who stops
/// reading (a pager) must not keep the store from `outpost run` meanwhile.
type Print = Box<dyn FnOnce() -> Result<(), CliError>>;

/// Prints `value` as one line of JSON when `json`, else as `text` shows it.
fn as_json_or(value: Value, json: bool, text: fn(&Value) -> Result<(), CliError>) -> Print {
    Box::new(move || match json {
        true => print_json(&value, true),
        false => text(&value),
    })
}

/// An outbox command; what it prints, to be printed once the store is closed.
fn outbox(backend: &Backend, command: OutboxCommand) -> Result<Print, CliError> {
    match command {
        OutboxCommand::Stats(flag) => {
            let stats = backend.execute(&AdminRequest::Stats)?;
            Ok(as_json_or(stats, flag.json, print_stats))
        }
        OutboxCommand::List {
            dead,
            profile,
            limit,
            json,
        } => {
            let wanted = if limit == 0 { usize::MAX } else { limit };
            let mut table = ExportTable::new(json.json, Listing::for_backend(backend)?);
            let fetch = |after, asked| {
                Ok(backend.execute(&AdminRequest::List {
                    dead,
                    profile_id: profile.clone(),
                    limit: asked,
                    after,
                })?)
            };
            let cut = match list_paged(wanted, fetch, |export| table.row(export)) {
                Ok(cut) => cut,
                Err(e) => {
                    return Err(match table.finish() {
                        Ok(listing) => listing.cut_short(e),
                        Err(_) => e,
                    })
                }
            };
            if cut {
                eprintln!("the first {limit} shown; --limit 0 lists all");
            }
            if !dead {
                // The pending exports alone can read as "(no exports)" while dead letters wait
                // for a person; a count that cannot be read says nothing here.
                let dead_letters = backend.execute(&AdminRequest::Stats).ok();
                let dead_letters = dead_letters.and_then(|stats| stats["dead"].as_u64());
                if let Some(n) = dead_letters.filter(|&n| n > 0) {
                    let of = if profile.is_some() {
                        " (of every profile)"
                    } else {
                        ""
                    };
                    eprintln!("the outbox also holds {n} dead letter(s){of}, not listed here: --dead lists them");
                }
            }
            let listing = table.finish()?;
            Ok(Box::new(move || listing.print()))
        }
        OutboxCommand::Show { id, json } => {
            let export = backend.execute(&AdminRequest::Show { id })?;
            Ok(as_json_or(export, json.json, print_export))
        }
        OutboxCommand::Retry {
            targets: Targets { ids, all_dead },
            json,
        } => {
            let result = backend.execute(&AdminRequest::Retry { ids, all_dead })?;
            Ok(Box::new(move || {
                report_repair(
                    &result,
                    ("retried", "put back in the outbox"),
                    all_dead,
                    json.json,
                )
            }))
        }
        OutboxCommand::Drop {
            targets: Targets { ids, all_dead },
            json,
            ..
        } => {
            let result = backend.execute(&AdminRequest::Drop { ids, all_dead })?;
            Ok(Box::new(move || {
                report_repair(&result, ("dropped", "deleted"), all_dead, json.json)
            }))
        }
    }
}

/// Of `ids`, those in neither the outbox nor the dead letters, looked up before `outbox drop`
/// asks, so that a mistyped id is not found out only after the answer. The store is let go
/// of before the question, as the drop connects again after it.
fn exports_not_found(config: &Config, ids: &[String]) -> Result<Vec<String>, CliError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let backend = Backend::connect_existing(config)?;
    let mut missing = Vec::new();
    for id in ids {
        match backend.execute(&AdminRequest::Show { id: id.clone() }) {
            Ok(_) => {}
            Err(AdminError::NotFound(_)) => missing.push(for_terminal(id, false).into_owned()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(missing)
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

/// Prints what a repair did (with `json`, the answer as the agent or store gave it); what it
/// could not do for an export named by id is a failure.
fn report_repair(
    result: &Value,
    (key, verb): (&str, &str),
    all_dead: bool,
    json: bool,
) -> Result<(), CliError> {
    let say = |line: String| match json {
        true => Ok(()),
        false => outln!("{line}"),
    };
    if json {
        print_json(result, true)?;
    }
    // With `--all-dead`, the agent names the first ids of a kind and counts them all (an
    // agent of an earlier build named them all).
    let count = |name: &str| {
        result[format!("{name}_count")].as_u64().map_or_else(
            || result[name].as_array().map_or(0, Vec::len),
            |n| n as usize,
        )
    };
    let done = count(key);
    say(format!("{done} export(s) {verb}"))?;
    let listed =
        |name: &str| -> Vec<Value> { result[name].as_array().cloned().unwrap_or_default() };
    let ids = |name: &str| -> Vec<String> {
        listed(name)
            .iter()
            .filter_map(|id| Some(id.as_str()?.to_owned()))
            .collect()
    };
    // Retrying an export that is not a dead letter changes nothing, and is no failure.
    let pending = ids("already_pending");
    if !pending.is_empty() {
        say(format!(
            "already pending (not dead letters), left as they are: {}",
            pending.join(", ")
        ))?;
    }
    let missing = ids("not_found");
    let mut unreadable = ids("unreadable");
    if count("unreadable") > unreadable.len() {
        unreadable.push("…".into());
    }
    let paired = |name: &str, with: &str, word: &str| -> Vec<String> {
        listed(name)
            .iter()
            .map(|s| {
                format!(
                    "{} ({word} {})",
                    s["id"].as_str().unwrap_or("?"),
                    s[with].as_str().unwrap_or("?")
                )
            })
            .collect()
    };
    let superseded = paired("superseded", "acknowledged", "after");
    let mut maybe_overtaken = paired("maybe_overtaken", "pending", "before");
    let (superseded_count, overtaken_count) = (count("superseded"), count("maybe_overtaken"));
    if overtaken_count > maybe_overtaken.len() {
        maybe_overtaken.push("…".into());
    }
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("not found: {}", missing.join(", ")));
    }
    if all_dead && !superseded.is_empty() {
        // Every dead letter that may be retried was: the others are no failure of the command.
        say(format!(
            "{superseded_count} dead letter(s) left as they are: the endpoint has acknowledged a newer export of their profile, or it was dropped, which counts the same (`outbox list --dead --json` names it, as superseded_by)"
        ))?;
    } else if !superseded.is_empty() {
        problems.push(format!(
            "not retried, the endpoint has acknowledged a newer export of the same profile (or it was dropped, which counts the same), which sending these would undo (`outbox drop ID` deletes them): {}",
            superseded.join(", ")
        ));
    }
    // Held until the newer export is delivered or dropped (then superseded).
    let held = "a newer export of the same profile, pending or a dead letter, may already have been acknowledged by the endpoint (a request of it got no answer, or it was pending when an agent stopped before recording every delivery or before this version of outpost kept track), so sending the older one first could undo it; once the newer one is delivered (a dead letter: retried), or dropped, the older is superseded";
    if all_dead && !maybe_overtaken.is_empty() {
        say(format!(
            "{overtaken_count} dead letter(s) left as they are: {held}: {}",
            maybe_overtaken.join(", ")
        ))?;
    } else if !maybe_overtaken.is_empty() {
        problems.push(format!(
            "not retried, {held}: {}",
            maybe_overtaken.join(", ")
        ));
    }
    if !unreadable.is_empty() {
        problems.push(format!(
            "not retried, {} unreadable record(s) (see `outbox show ID`; `outbox drop ID` deletes them): {}",
            count("unreadable"),
            unreadable.join(", ")
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CliError::Failure(problems.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// An agent holding exports 1 to `exports`; `pages` says whether it honours `after`.
    fn agent(
        exports: u64,
        pages: bool,
    ) -> impl FnMut(Option<u64>, usize) -> Result<Value, CliError> {
        move |after, asked| {
            let from = if pages { after.unwrap_or(0) + 1 } else { 1 };
            let ids = (from..=exports)
                .take(asked)
                .map(|seq| json!({ "id": ExportId { store: 7, seq }.to_string() }))
                .collect();
            Ok(Value::Array(ids))
        }
    }

    fn listed(wanted: usize, exports: u64, pages: bool) -> (Result<bool, CliError>, Vec<u64>) {
        let mut shown = Vec::new();
        let result = list_paged(wanted, agent(exports, pages), |export| {
            let id: ExportId = export["id"].as_str().unwrap().parse().unwrap();
            shown.push(id.seq);
            Ok(())
        });
        (result, shown)
    }

    #[test]
    fn pages_list_every_export_once_in_order_and_say_when_the_list_was_cut() {
        for (wanted, exports, cut) in [
            (usize::MAX, 2_500, false),
            (usize::MAX, 2_000, false),
            (usize::MAX, 0, false),
            (1_500, 2_500, true),
            (1_500, 1_500, false),
            (1_000, 1_001, true),
            (10, 3, false),
        ] {
            let (result, shown) = listed(wanted, exports, true);
            assert_eq!(result.unwrap(), cut, "{wanted} of {exports}");
            let expected: Vec<u64> = (1..=exports).take(wanted).collect();
            assert_eq!(shown, expected, "{wanted} of {exports}");
        }
    }

    #[test]
    fn an_agent_that_answers_the_first_page_again_is_refused_before_it_is_shown_twice() {
        for wanted in [usize::MAX, 1_500, 2_000] {
            let (result, shown) = listed(wanted, 2_500, false);
            let error = result.unwrap_err();
            assert_eq!(error.exit_code(), 1);
            let message = error.to_string();
            assert!(
                message.contains("after export number 1000 with export number 1"),
                "{message}"
            );
            assert!(message.contains("older build"), "{message}");
            assert_eq!(shown, (1..=1_000).collect::<Vec<u64>>(), "{wanted}");
        }
        // Fewer than a page is all an older agent can list: its first page tells whether the
        // list was cut.
        let (result, shown) = listed(LIST_PAGE - 1, 2_500, false);
        assert!(result.unwrap());
        assert_eq!(shown, (1..=999).collect::<Vec<u64>>());
    }
}
