//! Command-line definitions (clap derive). Parsing only: the work is in [`crate::commands`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "outpost",
    version,
    about = "Exports changed customer profiles to an HTTP destination, durably."
)]
pub struct Cli {
    /// The configuration file [default: $OUTPOST_CONFIG, else outpost.toml]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Log format on stderr
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log level or filter (e.g. `debug`, `outpost=trace`) [default: $OUTPOST_LOG, else info]
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: the ingest API, the delivery loop and the admin socket.
    ///
    /// Stops on SIGTERM or SIGINT after in-flight deliveries finish.
    ///
    /// Example: outpost run --config /etc/outpost/outpost.toml
    Run,
    /// Validate the config, fetch a token, and report (never printing a secret).
    ///
    /// Example: outpost check --config /etc/outpost/outpost.toml
    Check,
    /// Ingest NDJSON updates (also a JSON array or one object) from a file or `-` for stdin.
    ///
    /// The input is validated whole before anything is stored: one bad line refuses it all.
    ///
    /// Example: outpost ingest --config outpost.toml data/sample-updates.ndjson
    Ingest {
        /// The file to read, or `-` for standard input
        #[arg(default_value = "-")]
        file: PathBuf,
        /// Print the summary as JSON
        #[arg(long)]
        json: bool,
    },
    /// Inspect and repair the outbox.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Inspect stored profiles.
    #[command(subcommand)]
    Profile(ProfileCommand),
}

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Counts of pending and dead exports, the oldest pending age, bytes.
    ///
    /// Example: outpost outbox stats --json
    Stats(JsonFlag),
    /// List exports, oldest first (pending by default).
    ///
    /// Example: outpost outbox list --dead --profile p-000123 --json
    List {
        /// List dead letters instead of pending exports
        #[arg(long)]
        dead: bool,
        /// Only exports of this profile
        #[arg(long, value_name = "ID")]
        profile: Option<String>,
        /// At most this many; 0 lists all
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Show one export: payload, reason, attempts, last error, times.
    ///
    /// Example: outpost outbox show 3fa2c1d0-42
    Show {
        /// The export id (as sent in Idempotency-Key)
        id: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Put dead letters back in the outbox (same id, so the same Idempotency-Key).
    ///
    /// Example: outpost outbox retry --all-dead
    Retry(Targets),
    /// Delete exports (dead letters, or pending ones named by id).
    ///
    /// Example: outpost outbox drop 3fa2c1d0-42 --yes
    Drop {
        #[command(flatten)]
        targets: Targets,
        /// Do not ask for confirmation
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Clone, Args)]
pub struct Targets {
    /// Export ids
    #[arg(required_unless_present = "all_dead", conflicts_with = "all_dead")]
    pub ids: Vec<String>,
    /// Every dead letter
    #[arg(long)]
    pub all_dead: bool,
}

#[derive(Debug, Subcommand)]
pub enum ProfileCommand {
    /// Show the stored version of a profile.
    ///
    /// Example: outpost profile show p-000123
    Show {
        /// The profile id
        id: String,
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(Debug, Clone, Copy, Args)]
pub struct JsonFlag {
    /// Print JSON for programs instead of text for people
    #[arg(long)]
    pub json: bool,
}
