//! `outpost outbox`: the outbox's figures, its exports listed a page at a time or shown one by
//! one, and dead letters retried or exports dropped; and [`Print`], what a command prints once
//! the store it opened is closed.

use std::io::IsTerminal;

use serde_json::Value;

use crate::admin::{AdminError, AdminRequest};
use crate::cli::{OutboxCommand, Targets};
use crate::config::Config;
use crate::store::{put_back_wait, ExportId, Store, StoreError};

use super::{
    ask, for_terminal, print_export, print_json, print_stats, refuse_off_a_terminal, Backend,
    CliError, ExportTable, Listing,
};

/// What a command prints, printed once the store it opened is closed: a reader who stops
/// reading (a pager) must not keep the store from `outpost run` meanwhile.
pub(super) type Print = Box<dyn FnOnce() -> Result<(), CliError>>;

/// Prints `value` as one line of JSON when `json`, else as `text` shows it.
fn as_json_or(value: Value, json: bool, text: fn(&Value) -> Result<(), CliError>) -> Print {
    Box::new(move || match json {
        true => print_json(&value, true),
        false => text(&value),
    })
}

/// An outbox command; what it prints, to be printed once the store is closed.
pub(super) fn outbox(backend: &Backend, command: OutboxCommand) -> Result<Print, CliError> {
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
                report_retry_or_drop(
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
            if let Backend::Agent {
                request_timeout, ..
            } = &backend
            {
                // Else a drop beside a request that hangs waits without a word.
                if !ids.is_empty() && std::io::stderr().is_terminal() {
                    eprintln!(
                        "the agent drops them once its requests in flight have ended (within {} s)…",
                        put_back_wait(*request_timeout).as_secs()
                    );
                }
            }
            let result = backend.execute(&AdminRequest::Drop { ids, all_dead })?;
            Ok(Box::new(move || {
                report_retry_or_drop(&result, ("dropped", "deleted"), all_dead, json.json)
            }))
        }
    }
}

/// Before `outbox drop` without `--yes`: refuses a store that is not there and a drop off a
/// terminal, checks that every id named is there and asks for confirmation. Asked before the store is
/// opened: a store this process held while a person reads the question would keep
/// `outpost run` from starting meanwhile.
pub(super) fn ask_before_drop(config: &Config, command: &OutboxCommand) -> Result<(), CliError> {
    if let OutboxCommand::Drop {
        targets: Targets { ids, all_dead },
        yes: false,
        ..
    } = command
    {
        if !Store::exists_at(&config.storage.path)? {
            return Err(CliError::Usage(
                StoreError::Missing(config.storage.path.clone()).to_string(),
            ));
        }
        refuse_off_a_terminal("outbox drop")?;
        let missing = exports_not_found(config, ids)?;
        if !missing.is_empty() {
            return Err(CliError::Failure(format!(
                "not found: {}; nothing dropped",
                missing.join(", ")
            )));
        }
        let what = if *all_dead {
            "every dead letter".to_owned()
        } else {
            format!("{} export(s)", ids.len())
        };
        if !ask(&format!("Delete {what} for good?"))? {
            return Err(CliError::Failure("nothing dropped".into()));
        }
    }
    Ok(())
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

/// Prints what `outbox retry` or `outbox drop` did (with `json`, the answer as the agent or
/// store gave it); what it could not do for an export named by id is a failure.
fn report_retry_or_drop(
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

/// How many exports `outbox list` asks for at a time.
const LIST_PAGE: usize = 1_000;

/// Lists up to `wanted` exports page by page, so that a long outbox is never held whole, by
/// the agent or here: `fetch(after, asked)` answers up to `asked` exports numbered above
/// `after`, and `show` takes each export listed. Returns whether the list was cut at `wanted`
/// (each page asks for one more than is still wanted, to tell).
///
/// An agent of a build from before paging ignores `after` and answers the first page again:
/// that is refused before any of the page is shown, rather than listed again and again.
fn list_paged(
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
