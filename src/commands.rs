//! What each subcommand does: load the config, reach the store, do the work, print the result
//! for people or (`--json`) for programs.

use std::fs::File;
use std::io::{BufReader, Read, Seek, Write};
use std::path::Path;

use chrono::Utc;
use serde_json::{json, Value};

use crate::cli::{Cli, Command, OutboxCommand, ProfileCommand};
use crate::config::{self, Config, ConfigError};
use crate::profile::update::{format_time, InputError, UpdateReader};
use crate::profile::Reason;
use crate::store::{BatchSummary, Export, ExportId, ListFilter, OutboxStats, Store, StoreError};

/// How many updates `outpost ingest` commits (and flushes) at a time.
const INGEST_CHUNK: usize = 1_000;

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

pub fn dispatch(cli: Cli) -> Result<(), CliError> {
    let config_path = config::resolve_path(cli.config.as_deref());
    let config = Config::load(&config_path)?;
    match cli.command {
        Command::Ingest { file, json } => {
            let store = open_store(&config)?;
            let summary = ingest_path(&store, &config, &file)?;
            print_summary(&summary, json);
            Ok(())
        }
        Command::Outbox(command) => {
            let store = open_store(&config)?;
            outbox(&store, command)
        }
        Command::Profile(ProfileCommand::Show { id, json }) => {
            let store = open_store(&config)?;
            let stored = store
                .profile(&id)?
                .ok_or_else(|| CliError::Failure(format!("no profile `{id}` is stored")))?;
            let value = json!({
                "id": id,
                "timestamp": stored.timestamp.map(format_time),
                "profile": stored.profile,
            });
            print_json(&value, json.json);
            Ok(())
        }
    }
}

fn open_store(config: &Config) -> Result<Store, CliError> {
    Ok(Store::open(
        &config.storage.path,
        config.storage.cache_bytes,
    )?)
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
        let mut value = serde_json::to_value(summary).expect("summary serializes");
        value["exports_by_reason"] = Reason::ALL
            .iter()
            .map(|r| (r.as_str().to_owned(), json!(summary.exports_for(*r))))
            .collect();
        println!("{value}");
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
pub fn ingest_path(store: &Store, config: &Config, path: &Path) -> Result<BatchSummary, CliError> {
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
    ingest_file(store, config, &mut file)
}

/// Two passes so that memory stays bounded and a bad line stores nothing: the first validates
/// every line, the second commits in chunks. A crash during the second pass leaves a prefix
/// stored; running the same file again completes it (updates with timestamps are then stale or
/// unchanged, so no export is made twice).
pub fn ingest_file<F: Read + Seek>(
    store: &Store,
    config: &Config,
    file: &mut F,
) -> Result<BatchSummary, CliError> {
    let rewind = |file: &mut F| {
        file.rewind()
            .map_err(|e| CliError::Failure(format!("cannot reread the input: {e}")))
    };
    rewind(file)?;
    for update in UpdateReader::new(BufReader::new(&mut *file)) {
        update?;
    }
    rewind(file)?;
    let mut total = BatchSummary::default();
    let mut chunk = Vec::with_capacity(INGEST_CHUNK);
    let mut reader = UpdateReader::new(BufReader::new(&mut *file)).peekable();
    while reader.peek().is_some() {
        chunk.clear();
        while chunk.len() < INGEST_CHUNK {
            match reader.next() {
                Some(update) => chunk.push(update?),
                None => break,
            }
        }
        let summaries = store.apply_groups(&[&chunk], &config.mapping, Utc::now())?;
        store.flush()?;
        total.add(&summaries[0]);
    }
    Ok(total)
}

fn parse_export_id(text: &str) -> Result<ExportId, CliError> {
    text.parse().map_err(CliError::Usage)
}

fn outbox(store: &Store, command: OutboxCommand) -> Result<(), CliError> {
    match command {
        OutboxCommand::Stats(flag) => {
            let stats = store.stats(Utc::now())?;
            if flag.json {
                println!("{}", serde_json::to_value(&stats).expect("stats serialize"));
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
            let exports = store.list(&ListFilter {
                dead,
                profile_id: profile,
                limit,
            })?;
            if json.json {
                let mut out = std::io::stdout().lock();
                for export in &exports {
                    let _ = writeln!(out, "{}", export.to_json());
                }
            } else {
                print_export_table(&exports);
            }
        }
        OutboxCommand::Show { id, json } => {
            let id = parse_export_id(&id)?;
            let export = store.export(id)?.ok_or_else(|| {
                CliError::Failure(format!("no export `{id}` in the outbox or dead letters"))
            })?;
            if json.json {
                println!("{}", export.to_json());
            } else {
                print_export(&export);
            }
        }
    }
    Ok(())
}

fn print_stats(stats: &OutboxStats) {
    println!("pending          {}", stats.pending);
    println!("dead             {}", stats.dead);
    println!(
        "oldest pending   {}",
        match (&stats.oldest_pending_created_at, stats.oldest_pending_age_s) {
            (Some(at), Some(age)) => format!("{at} ({age} s ago)"),
            _ => "-".into(),
        }
    );
    println!("outbox bytes     {}", stats.bytes);
    println!("profiles stored  {}", stats.profiles);
    println!("store id         {}", stats.store_id);
}

fn print_export_table(exports: &[Export]) {
    if exports.is_empty() {
        println!("(no exports)");
        return;
    }
    println!(
        "{:<22} {:<24} {:<9} {:>8}  {:<24}  LAST ERROR",
        "ID", "PROFILE", "REASON", "ATTEMPTS", "CREATED"
    );
    for e in exports {
        let r = &e.record;
        println!(
            "{:<22} {:<24} {:<9} {:>8}  {:<24}  {}",
            e.id.to_string(),
            truncate_chars(&r.profile_id, 24),
            r.reason().as_str(),
            r.attempts,
            crate::store::format_ms(r.created_at_ms),
            r.last_error
                .as_deref()
                .map(|s| truncate_chars(s, 60))
                .unwrap_or_else(|| "-".into())
        );
    }
}

fn print_export(export: &Export) {
    let value = export.to_json();
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
        let shown = match &value[key] {
            Value::Null => "-".to_owned(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        println!("{key:<16} {shown}");
    }
    println!("payload:");
    println!(
        "{}",
        serde_json::to_string_pretty(&value["payload"]).expect("a Value always serializes")
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
