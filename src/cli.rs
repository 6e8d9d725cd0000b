//! Command-line definitions (clap derive). Parsing only: the work is in [`crate::commands`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// What `--version` and the agent's first line say: the version and the commit built.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("OUTPOST_COMMIT"), ")");

#[derive(Debug, Parser)]
#[command(
    name = "outpost",
    version = crate::cli::VERSION,
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
    /// Segments added to the mapping since the last run are backfilled: each stored member
    /// gets one export, in steps between updates (`outbox stats` shows how far it is).
    ///
    /// A store written by an outpost before store format 4 (profiles one to a key) is
    /// upgraded in place when it is first opened, by this or any other command: its profiles
    /// move into groups of a few, as typed records, in chunks of 2,000, with a progress line in
    /// the log; a kill during the upgrade loses nothing, and the next open finishes it. The
    /// store is then rebuilt into a fresh database inside its folder (sled keeps in memory a
    /// record of every page the upgrade emptied); the copy stops short of leaving less than
    /// 64 MiB free on the disk, and is tried again at an open that finds more room.
    ///
    /// Stops on SIGTERM, SIGINT or SIGHUP after in-flight deliveries finish.
    ///
    /// Example: outpost run --config /etc/outpost/outpost.toml
    Run,
    /// Validate the config, fetch a token, and report (never printing a secret).
    ///
    /// Example: outpost check --config /etc/outpost/outpost.toml
    Check {
        /// Instead: read every record of the store and list those that cannot be read, with
        /// their keys (exit 1 if `outpost repair` acts on one, or a stream position is
        /// unreadable)
        #[arg(long)]
        store: bool,
        /// With --store: print JSON (one object a line)
        #[arg(long, requires = "store")]
        json: bool,
    },
    /// Act on the store's unreadable records (`outpost check --store` lists them): forget
    /// unreadable profiles (their next update counts them as new), keep unreadable exports as
    /// dead letters "unreadable record", delete stream positions and rejected messages whose
    /// keys name nothing. An unreadable stream position is left as it is (its partition does
    /// not start); an unreadable rejected message needs nothing (`rejected list` shows it).
    ///
    /// Example: outpost repair --yes
    Repair {
        /// Do not ask for confirmation (needed off a terminal, where nothing can be asked)
        #[arg(long)]
        yes: bool,
    },
    /// Rebuild the store into a fresh database inside its folder, to give back the disk space
    /// sled keeps (and, at the agent's next start, the memory): its log holds old versions of
    /// rewritten pages, and it never returns the space of what was removed (a delivered
    /// backlog, deleted profiles).
    ///
    /// While the agent runs, the agent does it: it refuses updates with 503 (and delivery
    /// waits) for the time it takes, under 2 s for each 100,000 profiles here. Needs room on
    /// the store's disk for a copy of what is live, plus 64 MiB. A kill at any point loses
    /// nothing: the next open finishes the swap or deletes the copy.
    ///
    /// Example: outpost compact --config /etc/outpost/outpost.toml
    Compact {
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Ingest NDJSON updates (also a JSON array or one object) from a file or `-` for stdin.
    ///
    /// The input is validated whole before anything is stored: one bad line refuses it all.
    /// Standard input, or a file that is a pipe (`<(zcat updates.gz)`), is first copied to a
    /// temporary file, to be read twice. Without a running agent, a backfill of newly mapped
    /// segments runs first.
    ///
    /// Example: outpost ingest --config outpost.toml data/sample-updates.ndjson
    Ingest {
        /// The file to read, or `-` for standard input
        #[arg(default_value = "-")]
        file: PathBuf,
        /// Print the summary as JSON
        #[arg(long)]
        json: bool,
        /// Store only the updates after the first N, which a run that stopped partway stored
        /// (it says how many): they are checked, not applied again
        #[arg(long, value_name = "N", default_value_t = 0)]
        skip: u64,
    },
    /// Inspect and repair the outbox.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Pause and resume delivery while ingest goes on.
    #[command(subcommand)]
    Delivery(DeliveryCommand),
    /// Show the whole job on loopback: an embedded receiver, the agent, the sample updates.
    ///
    /// Needs no config and nothing else running; cleans up after itself.
    ///
    /// Example: outpost demo
    Demo {
        /// Share of export requests the embedded receiver fails with 503
        #[arg(long, default_value_t = 0.05)]
        fail_share: f64,
        /// A fleet instead: nats-server (must be installed), three agents owning 12 partitions,
        /// the sample updates published into the stream
        #[arg(long)]
        fleet: bool,
    },
    /// Run a test destination: an OAuth 2.0 token endpoint and a profile endpoint.
    ///
    /// Prints each export it accepts (or appends them as NDJSON to --out).
    ///
    /// Example: outpost receiver --listen 127.0.0.1:8687 --fail-share 0.1
    Receiver {
        /// Address to listen on
        #[arg(long, default_value = "127.0.0.1:8687")]
        listen: std::net::SocketAddr,
        /// The client id tokens are issued to
        #[arg(long, default_value = "edge-agent")]
        client_id: String,
        /// The client secret [default: change-me]
        #[arg(
            long,
            env = "OUTPOST_RECEIVER_SECRET",
            default_value = "change-me",
            hide_env_values = true,
            hide_default_value = true
        )]
        client_secret: String,
        /// Token lifetime in seconds (at least 1)
        #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
        token_lifetime_s: u64,
        /// Share (0 to 1) of export requests to fail with 503
        #[arg(long, default_value_t = 0.0)]
        fail_share: f64,
        /// Share (0 to 1) of export requests to refuse with 400, which the agent keeps as dead
        /// letters (to try `outpost outbox list --dead`, `retry` and `drop`)
        #[arg(long, default_value_t = 0.0)]
        reject_share: f64,
        /// Append accepted exports as NDJSON to this file instead of printing them
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Print a shell completion script.
    ///
    /// Example: outpost completions bash > /etc/bash_completion.d/outpost
    Completions { shell: clap_complete::Shell },
    /// Inspect stored profiles.
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// Publish NDJSON updates into the NATS stream, each to its profile's partition.
    ///
    /// The input is validated whole first (one bad line: nothing is published). Each message
    /// waits for JetStream's acknowledgement and carries a de-duplication id (Nats-Msg-Id)
    /// made of a digest of the whole input, an id of this publish and the update's place in
    /// the input. Publishing a file again publishes it again; a publish that failed prints
    /// its id, and the same input published with `--resume ID` within the stream's duplicate
    /// window adds only what did not go through: the updates that went through in order are
    /// not sent again, and JetStream drops the others that went through as duplicates.
    ///
    /// Example: outpost publish --config outpost.toml data/sample-updates.ndjson
    Publish {
        /// The file to read, or `-` for standard input
        #[arg(default_value = "-")]
        file: PathBuf,
        /// Publishes waiting for their acknowledgement at most
        #[arg(long, default_value_t = 256)]
        in_flight: usize,
        /// Completes the publish that failed with this id, of the same input (refused for
        /// another): the updates it published in order are not sent again, and the others
        /// that went through are dropped by JetStream as duplicates (within the stream's
        /// duplicate window, 2 minutes by default, from the failure)
        #[arg(long, value_name = "ID")]
        resume: Option<String>,
    },
    /// Set up NATS JetStream for `[source.nats]`.
    #[command(subcommand)]
    Nats(NatsCommand),
    /// Messages from the NATS stream that were not valid updates (kept, and acknowledged).
    #[command(subcommand)]
    Rejected(RejectedCommand),
    /// A live view of the running agent: rates, latency, how delivery adapts, the outbox.
    ///
    /// Reads the agent through its admin socket; `q`, Esc or Ctrl-C quits.
    ///
    /// Example: outpost top --once
    Top {
        /// Print one plain-text frame (rates over one interval) and exit, for scripts
        #[arg(long)]
        once: bool,
        /// Seconds between two readings
        #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
        interval: f64,
    },
}

#[derive(Debug, Subcommand)]
pub enum NatsCommand {
    /// Create the stream (file storage, subjects <prefix>.*), or check the one there.
    ///
    /// Idempotent: says whether it created the stream or found it. A stream it makes records
    /// in its description when it was made, which agents know it by (a NATS server restarted
    /// after the stream was edited reports another time).
    ///
    /// Example: outpost nats setup --config outpost.toml
    Setup {
        /// Record when a stream made by an earlier build was made in its description. Only
        /// once every agent runs this build: agents of earlier builds know the stream by the
        /// server's time, and this edit is one after which a restarted server reports
        /// another. A stream another setup has just made gets it without this flag.
        #[arg(long)]
        record_made_at: bool,
    },
    /// Set a stream position that cannot be read (`outpost check --store` lists them): its
    /// partition, stopped until then, starts again with the messages after SEQ.
    ///
    /// The store cannot tell where such a partition was, so the choice is yours: messages at
    /// or below SEQ are taken as in the store and never applied, those after it are applied,
    /// also ones that already were (without a timestamp, such an update counts as new). 0
    /// consumes the partition from the stream's start. A SEQ past the stream's last sequence
    /// is taken, when the partition starts, for a position in another stream, and the
    /// partition is then consumed from the start: so it is refused while the stream can be
    /// read, and set with a warning when it cannot (or the config has no [source.nats]). A
    /// readable position
    /// is never changed. The running agent picks it up at its next attempt to start the
    /// partition, within seconds.
    ///
    /// Example: outpost nats set-position 7 1042
    SetPosition {
        /// The partition
        partition: u32,
        /// The last stream sequence of the partition to take as in the store
        seq: u64,
    },
    /// Let go the claim on partitions, so that another agent's store may consume them.
    ///
    /// An agent claims every partition it owns before consuming it, and one whose partition
    /// another store claims leaves it alone (and logs who holds it): two agents owning the
    /// same partition would split its messages and break per-profile order. Release a
    /// partition only where no agent consumes it any more: after the store that held it was
    /// lost or replaced (a partition moves with its profiles' stored versions by `outpost nats
    /// hand-over` and `take-over`, which pass its claim on). An agent waiting for the
    /// partition claims it within seconds; one still consuming it claims it again within
    /// seconds (and logs a warning), unless a waiting agent took it first: then both consume
    /// it for a few seconds, so stop the consuming agent first. Exits 1 when it left a claim
    /// as it is (one that says its partition was handed over, without --force, or that
    /// changed meanwhile), having released the others.
    ///
    /// Example: outpost nats release 4-7 --config outpost.toml
    Release {
        /// Partitions: ranges and lists, as `owned` ("0-3,7")
        partitions: String,
        /// Release also claims that say a partition was handed over (`outpost nats
        /// hand-over`): its file is then never taken over, and an agent that owns the
        /// partition consumes it from the stream's start
        #[arg(long)]
        force: bool,
    },
    /// Hand partitions over to another agent: writes their profiles' stored versions and how
    /// far each was consumed to FILE, forgets them here, and makes their claims say they were
    /// handed over in FILE (no agent consumes them meanwhile). The other agent's store takes
    /// them with `outpost nats take-over FILE`, and its agent goes on where this one stopped,
    /// deciding against the versions stored here.
    ///
    /// First take the partitions out of this agent's `source.nats.owned` and restart it:
    /// it then stops consuming them and delivers the exports of their profiles, and the
    /// hand-over is refused while any of those wait (pending or dead), so that the endpoint
    /// never gets a newer version from the other agent before an older one from this. Runs
    /// with the agent running (profile updates wait meanwhile) or stopped. Once handed over,
    /// a partition is not consumed in this store again until it is taken back.
    ///
    /// FILE must be where both this command and a running agent see it: the agent writes it
    /// (with `data/outpost.service`, which gives the agent a private /tmp and lets it write
    /// only in /var/lib/outpost, a path there). The command checks that it sees the file
    /// before anything is forgotten.
    ///
    /// Example: outpost nats hand-over 4-7 /var/lib/outpost/partitions-4-7.handover
    HandOver {
        /// Partitions: ranges and lists, as `owned` ("0-3,7")
        partitions: String,
        /// The file to write; it must not exist
        file: PathBuf,
        /// Run again with FILE, give up another store's take-over of it that never finished
        /// (its claims say it is being taken over): only when that store is lost, or will
        /// never consume these partitions, since it may hold some of their profiles
        #[arg(long)]
        force: bool,
    },
    /// Take over partitions from a file `outpost nats hand-over` wrote: stores their profiles
    /// and positions, so that this agent consumes them from where the other stopped.
    ///
    /// Refused, with nothing changed, when the partitions' claims do not say they were handed
    /// over in this file (a stale file, or one of another fleet), when the file is damaged or
    /// was written with another mapping, stream or partition count, when a partition in it
    /// was consumed in this store, or a profile of it is stored here with another version, or
    /// while another store's take-over of the file is under way (the claims say so: a
    /// take-over makes them say it is taking the file over before it stores anything). Run it with this agent stopped,
    /// then add the partitions to `source.nats.owned` and start it; or while it runs without
    /// them, then add them and restart it. A take-over cut short (a kill) leaves the
    /// partitions unconsumed until it is run again with the same file.
    ///
    /// Example: outpost nats take-over /var/lib/outpost/partitions-4-7.handover
    TakeOver {
        /// The file `outpost nats hand-over` wrote
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum RejectedCommand {
    /// List rejected messages by partition and stream sequence.
    ///
    /// Example: outpost rejected list --json
    List {
        /// At most this many; 0 lists all
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Show one rejected message: subject, sequence, time, error, the bytes received.
    ///
    /// Example: outpost rejected show 7-1042
    Show {
        /// The rejected message's id: <partition>-<stream sequence>, and -<n> for the n-th
        /// message rejected at that place (a stream made again numbers its messages anew)
        id: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Delete rejected messages.
    ///
    /// Example: outpost rejected drop 7-1042
    Drop {
        /// Rejected message ids: <partition>-<stream sequence>[-<n>], as `rejected list` shows
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Every rejected message
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeliveryCommand {
    /// Stop sending exports until `outpost delivery resume`; updates are still taken.
    ///
    /// Requests in flight finish and are recorded; no other starts, and no probe. The pause is
    /// kept in the store, so it holds across restarts of the agent. Updates keep coming in
    /// (HTTP, NATS, `outpost ingest`) until the outbox holds storage.max_outbox_bytes; then
    /// they are refused with 503, and nothing is lost. Exports keep ageing toward
    /// delivery.max_age_s meanwhile: those that waited longer are dead-lettered when delivery
    /// resumes (`outpost outbox retry --all-dead` puts them back).
    ///
    /// Example: outpost delivery pause
    Pause(JsonFlag),
    /// Send exports again after `outpost delivery pause`, at once.
    ///
    /// Example: outpost delivery resume
    Resume(JsonFlag),
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
    /// A dead letter is not put back once the endpoint has acknowledged a newer export of its
    /// profile: sending it would undo that one. Nor while a newer export of its profile
    /// (pending, or a dead letter) may have been acknowledged unrecorded (a request of it got
    /// no answer, or an agent stopped before recording every delivery); once that one is
    /// delivered or dropped, the dead letter is superseded. Through the
    /// running agent, waits first for the requests in flight to end (at most the request
    /// timeout and 50 s more), starting none meanwhile.
    ///
    /// Example: outpost outbox retry --all-dead
    Retry {
        #[command(flatten)]
        targets: Targets,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Delete exports (dead letters, or pending ones named by id).
    ///
    /// Through the running agent, a drop by id first waits for the requests in flight to end.
    /// Dropping an export that may have been acknowledged without outpost knowing (a request
    /// of it got no answer, or an agent stopped before recording every delivery) supersedes
    /// its profile's older dead letters, as its delivery would.
    ///
    /// Example: outpost outbox drop 3fa2c1d0-42 --yes
    Drop {
        #[command(flatten)]
        targets: Targets,
        /// Do not ask for confirmation (needed off a terminal, where nothing can be asked)
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
}

/// Export ids or `--all-dead`, one of the two: usage and errors name both.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct Targets {
    /// Export ids
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
