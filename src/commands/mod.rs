//! What each subcommand does: load the config, reach the store ([`backend`]: through the
//! running agent's socket, or straight on disk), do the work, and print the result for people
//! or (`--json`) for programs ([`output`]), with how far a long one is ([`progress`]).
//!
//! This file routes each command ([`dispatch`]) and says how one fails ([`CliError`]); the
//! commands stand a concept a file: [`run`] (the agent, the demo, the receiver), [`check`]
//! (the preflight, with [`preflight`]'s findings on this host), [`ingest`], [`outbox`],
//! [`repair`] (the store's upkeep: `check --store`, `repair`, `compact`), [`delivery`]
//! (pausing and resuming it), [`nats`] and
//! [`handover`] (the NATS stream, and moving its partitions between agents), and [`top`].

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
mod check;
mod delivery;
mod handover;
mod ingest;
mod interrupt;
mod nats;
mod outbox;
mod output;
mod preflight;
mod progress;
mod repair;
mod run;
mod top;

use std::io::Write;
use std::time::Duration;

use crate::admin::{AdminError, AdminRequest};
use crate::cli::{Cli, Command, NatsCommand, ProfileCommand};
use crate::config::{self, Config, ConfigError};
use crate::profile::update::InputError;
use crate::receiver::ReceiverOptions;
use crate::store::{Store, StoreError, StoreUse};

pub use backend::Backend;
pub use ingest::{ingest_file, ingest_path};
use outbox::{list_paged_by, Print};
pub use output::for_terminal;
use output::{
    ask, describe_clock_jumps, display_url, print_export, print_json, print_stats, print_summary,
    refuse_off_a_terminal, text_of, ExportTable, Listing,
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
    /// `ingest --skip` past the input's end: nothing stored (a usage mistake, exit 2); the
    /// input's updates are all taken for stored, as the skip says.
    #[error("--skip {skip}: the input holds {updates} updates; nothing was stored")]
    SkipPastEnd { skip: u64, updates: u64 },
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
            CliError::Config(_) | CliError::Usage(_) | CliError::SkipPastEnd { .. } => 2,
            CliError::Store(e) if e.path_is_unusable() => 2,
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
            | Command::Delivery(_)
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
        Command::Check { store: false, .. } => runtime()?.block_on(check::check(config)),
        Command::Check { store: true, json } => {
            let print = repair::check_store(&Backend::connect_existing(config)?, json)?;
            // The store this process opened is closed by now.
            print()
        }
        Command::Repair { yes } => repair::repair_store(config, yes),
        Command::Compact { json } => repair::compact_store(config, json),
        Command::Ingest { file, json, skip } => {
            interrupt::watch_from_now(json.then(|| ingest::stopped_before_parts_json(skip)));
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
                // Said on stderr even when the summary's reader went away.
                Ok(summary) => print_summary(&summary, json).map_err(|error| match error {
                    CliError::Output(e) => CliError::Failure(format!(
                        "{} update(s) stored, but the summary could not be written: {e}",
                        summary.accepted
                    )),
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
            outbox::ask_before_drop(config, &command)?;
            let print = outbox::outbox(&Backend::connect_existing(config)?, command)?;
            // The store this process opened is closed by now.
            print()
        }
        Command::Delivery(command) => {
            let print = delivery::delivery(&Backend::connect_existing(config)?, command)?;
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
        } => {
            interrupt::watch_from_now(None);
            runtime()?.block_on(nats::publish_path(
                config,
                &file,
                in_flight,
                resume.as_deref(),
            ))
        }
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
