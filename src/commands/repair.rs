//! The store's upkeep: `outpost check --store` lists the records that cannot be read,
//! `outpost repair` acts on them, and `outpost compact` rebuilds the store.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::admin::AdminRequest;
use crate::config::Config;
use crate::store::Store;

use super::{
    ask, for_terminal, preflight, print_json, refuse_off_a_terminal, text_of, Backend, CliError,
    Print,
};

/// `outpost check --store`: every unreadable record with its key; exit 1 if `repair` acts on
/// one, or a stream position is unreadable.
pub(super) fn check_store(backend: &Backend, json: bool) -> Result<Print, CliError> {
    let found = backend.execute(&AdminRequest::Unreadable)?;
    Ok(Box::new(move || print_unreadable(&found, json)))
}

fn print_unreadable(found: &Value, json: bool) -> Result<(), CliError> {
    let records = found.as_array().cloned().unwrap_or_default();
    for record in &records {
        if json {
            outln!("{record}")?;
        } else {
            outln!(
                "{} {}: {}; repair: {}",
                text_of(&record["tree"]),
                text_of(&record["key"]),
                text_of(&record["error"]),
                text_of(&record["action"]),
            )?;
        }
    }
    let to_repair = records.iter().filter(|r| repairs(r)).count();
    // Left by repair, and its partition does not start: the operator's to act on. An agent
    // of an earlier build names no command; its only such records were unreadable positions.
    let mut partitions_waiting: BTreeMap<&str, usize> = BTreeMap::new();
    for record in records
        .iter()
        .filter(|r| r["tree"] == "positions" && !repairs(r))
    {
        let command = record["partition_waits_for"]
            .as_str()
            .unwrap_or("nats set-position");
        *partitions_waiting.entry(command).or_default() += 1;
    }
    if !json {
        outln!("{} unreadable record(s)", records.len())?;
    }
    let mut failures = Vec::new();
    if to_repair > 0 {
        failures.push(format!(
            "{to_repair} unreadable record(s); `outpost repair` acts on them"
        ));
    }
    for (command, partitions) in partitions_waiting {
        failures.push(match command {
            "nats set-position" => format!(
                "{partitions} unreadable stream position(s): their partitions do not start \
                 until `outpost nats set-position` sets them"
            ),
            move_command => format!(
                "{partitions} partition(s) whose {} did not finish: not consumed until \
                 `outpost {move_command}` is run again as before",
                move_command.trim_start_matches("nats ")
            ),
        });
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(CliError::Failure(failures.join("; ")))
    }
}

/// `outpost compact`: rebuilds the store, in the running agent if there is one (waiting, as
/// other commands do, for one that is starting or stopping).
pub(super) fn compact_store(config: &Config, json: bool) -> Result<(), CliError> {
    let path = &config.storage.path;
    let result = Backend::connect_existing_opening(config, Store::open_to_compact)?
        .execute(&AdminRequest::Compact)?;
    if json {
        print_json(&result, true)?;
    } else {
        let size = |field: &str| preflight::bytes(result[field].as_u64().unwrap_or(0));
        outln!(
            "compacted the store at {} in {:.1} s: {} on disk before, {} after (keys copied: {}, profiles: {})",
            path.display(),
            result["seconds"].as_f64().unwrap_or(0.0),
            size("bytes_before"),
            size("bytes_after"),
            result["keys"],
            result["profiles"],
        )?;
    }
    Ok(())
}

/// `outpost repair`: acts on the unreadable records, after confirmation.
pub(super) fn repair_store(config: &Config, yes: bool) -> Result<(), CliError> {
    let backend = Backend::connect_existing(config)?;
    let records = records_to_repair(&backend)?;
    if records.is_empty() {
        outln!("no unreadable records for repair to act on (`outpost check --store` lists all)")?;
        return Ok(());
    }
    for (tree, key, action) in &records {
        // A profile's key is its id, as an update gave it.
        outln!(
            "{tree} {}: {}",
            for_terminal(key, false),
            for_terminal(action, false)
        )?;
    }
    let backend = if yes {
        backend
    } else {
        // Not held while a person reads the question (`outpost run` could not start), and
        // opened again after: the repair goes ahead only if what it would do is still what
        // was shown.
        drop(backend);
        refuse_off_a_terminal("repair")?;
        if !ask(&format!("Do this to {} record(s)?", records.len()))? {
            outln!("nothing changed")?;
            return Ok(());
        }
        let backend = Backend::connect_existing(config)?;
        let now = records_to_repair(&backend)?;
        let keys = |list: &[(String, String, String)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(t, k, _)| (t.clone(), k.clone()))
                .collect()
        };
        if keys(&now) != keys(&records) {
            return Err(CliError::Failure(format!(
                "the unreadable records changed while the question waited ({} now); nothing changed: run repair again",
                now.len()
            )));
        }
        backend
    };
    let done = backend.execute(&AdminRequest::RepairUnreadable)?;
    for line in done["repaired"].as_array().cloned().unwrap_or_default() {
        outln!("{}", text_of(&line))?;
    }
    Ok(())
}

/// Whether `repair` acts on a listed unreadable record. An agent of an earlier build, still
/// running, lists no `repairs`: it acted on every record but `meta` values.
fn repairs(record: &Value) -> bool {
    record["repairs"]
        .as_bool()
        .unwrap_or(record["tree"] != "meta")
}

/// The unreadable records `repair` acts on (not meta values, rebuilt at open, nor the stream
/// records it leaves): tree, key and what it does.
fn records_to_repair(backend: &Backend) -> Result<Vec<(String, String, String)>, CliError> {
    let found = backend.execute(&AdminRequest::Unreadable)?;
    let text = |r: &Value, field: &str| r[field].as_str().unwrap_or("?").to_owned();
    Ok(found
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|r| repairs(r))
        .map(|r| (text(r, "tree"), text(r, "key"), text(r, "action")))
        .collect())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// What `check --store` says to do with the records it lists: each partition stopped is
    /// sent to the command it waits for.
    #[test]
    fn check_store_sends_each_stopped_partition_to_its_command() {
        let record = |tree: &str, repairs: bool, waits_for: Option<&str>| {
            let mut record =
                json!({"tree": tree, "key": "5", "error": "e", "action": "a", "repairs": repairs});
            if let Some(command) = waits_for {
                record["partition_waits_for"] = command.into();
            }
            record
        };
        let failure = |records: Vec<Value>| match print_unreadable(&Value::Array(records), true) {
            Ok(()) => String::new(),
            Err(CliError::Failure(message)) => message,
            Err(other) => panic!("{other:?}"),
        };
        assert_eq!(failure(vec![]), "");
        // Nothing for an operator: a rejected message kept as it is.
        assert_eq!(failure(vec![record("rejected", false, None)]), "");
        assert_eq!(
            failure(vec![
                record("outbox", true, None),
                record("profiles", true, None)
            ]),
            "2 unreadable record(s); `outpost repair` acts on them"
        );
        assert_eq!(
            failure(vec![
                record("positions", false, Some("nats hand-over")),
                record("positions", false, Some("nats hand-over")),
                record("positions", false, Some("nats take-over")),
                record("positions", false, Some("nats set-position")),
                // From an agent of an earlier build, which names no command.
                record("positions", false, None),
            ]),
            "2 partition(s) whose hand-over did not finish: not consumed until `outpost nats \
             hand-over` is run again as before; 2 unreadable stream position(s): their \
             partitions do not start until `outpost nats set-position` sets them; 1 \
             partition(s) whose take-over did not finish: not consumed until `outpost nats \
             take-over` is run again as before"
        );
    }
}
