//! Printing results for people (tables, aligned fields) or programs (JSON).

use std::io::IsTerminal;

use serde_json::Value;

use crate::profile::Reason;
use crate::store::BatchSummary;

/// A URL without its query, fragment and user info, which may carry secrets.
pub(super) fn display_url(url: &url::Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.set_fragment(None);
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.to_string()
}

/// Refuses to go on unasked off a terminal: `command` changes or deletes for good, a script
/// cannot answer its question, and going ahead would act on what nobody confirmed.
pub(super) fn refuse_off_a_terminal(command: &str) -> Result<(), super::CliError> {
    if std::io::stdin().is_terminal() {
        return Ok(());
    }
    Err(super::CliError::Usage(format!(
        "{command} asks for confirmation on a terminal; give --yes to go ahead without"
    )))
}

/// Asks `question` on stderr; yes only for `y`, `Y` or `yes` on stdin.
pub(super) fn ask(question: &str) -> Result<bool, super::CliError> {
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .map_err(|e| super::CliError::Failure(format!("cannot read the answer: {e}")))?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

pub(super) fn print_json(value: &Value, compact: bool) -> Result<(), super::CliError> {
    match compact {
        true => outln!("{value}"),
        false => outln!("{}", pretty_for_terminal(value)),
    }
}

/// `value` as indented JSON for people: serde_json leaves DEL and the C1 controls (U+0080 to
/// U+009F, such as the one-character CSI U+009B) raw in strings, so they are escaped too.
fn pretty_for_terminal(value: &Value) -> String {
    let pretty = serde_json::to_string_pretty(value).expect("a Value always serializes");
    for_terminal(&pretty, true).into_owned()
}

pub(super) fn print_summary(summary: &BatchSummary, as_json: bool) -> Result<(), super::CliError> {
    if as_json {
        return outln!("{}", summary.report());
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
    outln!(
        "accepted {} updates: {} exports{reasons}, {} unchanged, {} stale, {} deleted",
        summary.accepted,
        summary.exports,
        summary.unchanged,
        summary.stale,
        summary.deleted
    )?;
    Ok(())
}

/// A value as a person reads it: `-` for null, strings unquoted and [`for_terminal`].
pub(super) fn text_of(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => for_terminal(s, false).into_owned(),
        other => other.to_string(),
    }
}

/// `text` with its control characters escaped (`\u{1b}`), newlines too unless `keep_lines`:
/// ids, error bodies and rejected messages come from inputs and endpoints, and printed as
/// they are an escape sequence in one could move the cursor, recolour or retitle the
/// terminal of whoever lists them.
pub fn for_terminal(text: &str, keep_lines: bool) -> std::borrow::Cow<'_, str> {
    // The bidirectional embeddings, overrides and isolates too: they reorder what follows
    // them on the line where the terminal honours them.
    let bidi = |c: char| matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    let escaped = |c: char| (c.is_control() && !(keep_lines && c == '\n')) || bidi(c);
    if !text.chars().any(escaped) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut shown = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if escaped(c) {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    std::borrow::Cow::Owned(shown)
}

pub(super) fn print_stats(stats: &Value) -> Result<(), super::CliError> {
    let age = match (
        &stats["oldest_pending_created_at"],
        &stats["oldest_pending_age_s"],
    ) {
        (Value::String(at), Value::Number(age)) => format!("{at} ({age} s ago)"),
        _ => "-".into(),
    };
    outln!("pending          {}", text_of(&stats["pending"]))?;
    outln!("dead             {}", text_of(&stats["dead"]))?;
    outln!("oldest pending   {age}")?;
    if stats["delivery_paused"] == true {
        outln!(
            "delivery paused  since {} (`outpost delivery resume` to deliver; updates are still taken)",
            text_of(&stats["delivery_paused_since"])
        )?;
    }
    if stats["reserve_given_up"] == true {
        outln!(
            "updates refused  the disk is full: the space kept for delivery (storage.reserve_bytes) was given up to record deliveries; updates are taken again once the disk has room for it twice over"
        )?;
    }
    if let Value::Number(waited) = &stats["oldest_pending_waited_s"] {
        outln!("  waited         {waited} s of agent run time (what delivery.max_age_s counts)")?;
    }
    if let Value::Number(waiting) = &stats["waiting_for_retry"] {
        outln!("  waiting        {waiting} for their retry time (failed, backing off)")?;
        let cap = match stats["rate_cap_per_s"].as_i64() {
            Some(cap) if cap > 0 => format!(", rate capped at {cap}/s after 429s"),
            _ => String::new(),
        };
        let quota = match stats["quota_left"].as_i64() {
            Some(left) => format!(", {left} request(s) left in the endpoint's advertised window"),
            None => String::new(),
        };
        let down = if stats["destination_down"] == Value::Bool(true) {
            ", destination down: probing one request at a time"
        } else {
            ""
        };
        outln!(
            "delivery         {} in flight, limit {}{cap}{quota}{down}",
            text_of(&stats["in_flight"]),
            text_of(&stats["concurrency_limit"])
        )?;
    } else if stats["agent_running"] == false {
        outln!("delivery         no agent is running on this store")?;
    }
    outln!("outbox bytes     {}", text_of(&stats["bytes"]))?;
    outln!("profiles stored  {}", text_of(&stats["profiles"]))?;
    if let Some(bytes) = stats["store_disk_bytes"].as_u64() {
        outln!("store on disk    {}", super::preflight::bytes(bytes))?;
    }
    outln!("store id         {}", text_of(&stats["store_id"]))?;
    outln!("run time         {} s", text_of(&stats["run_time_s"]))?;
    outln!("clock jumps      {}", describe_clock_jumps(stats))?;
    if let Some(line) = describe_backfill(&stats["backfill"]) {
        outln!("backfill         {line}")?;
    }
    if let Some(partitions) = stats["handed_over"]["partitions"].as_array() {
        let listed: Vec<String> = partitions.iter().map(text_of).collect();
        outln!(
            "handed over      partition(s) {} of {} (`outpost nats hand-over`): their updates go to the stream",
            listed.join(", "),
            text_of(&stats["handed_over"]["partition_count"])
        )?;
    }
    match (stats["rejected"].as_u64(), stats["rejected_not_kept"].as_u64()) {
        (Some(kept), Some(0)) if kept > 0 => {
            outln!("rejected         {kept} stream message(s) kept (`outpost rejected list`)")?
        }
        (Some(kept), Some(not_kept)) if not_kept > 0 => outln!(
            "rejected         {kept} stream message(s) kept, {not_kept} more not kept (source.nats.max_rejected reached; the log has them)"
        )?,
        _ => {}
    }
    Ok(())
}

/// How far the backfill in progress is, from `outbox stats --json` (`None`: none running).
fn describe_backfill(backfill: &Value) -> Option<String> {
    let segments: Vec<&str> = backfill["segments"]
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let queued = match backfill["queued_after"].as_u64() {
        Some(n) if n > 0 => format!("; {n} more queued"),
        _ => String::new(),
    };
    Some(format!(
        "{} of about {} profiles scanned, {} exported, for newly mapped {}{queued}",
        text_of(&backfill["scanned"]),
        text_of(&backfill["profiles"]),
        text_of(&backfill["exported"]),
        segments.join(", "),
    ))
}

/// "none noticed", or how many and the last one, from `outbox stats --json`.
pub(super) fn describe_clock_jumps(stats: &Value) -> String {
    let jumps = stats["clock_jumps"].as_u64().unwrap_or(0);
    let last = &stats["last_clock_jump"];
    match (jumps, last["by_s"].as_i64()) {
        (0, _) | (_, None) => "none noticed".to_owned(),
        (n, Some(by_s)) => format!(
            "{n} noticed; last: wall clock {} (noticed at {})",
            crate::clock::describe_jump(by_s * 1000),
            text_of(&last["noticed_at"])
        ),
    }
}

/// Where a listing goes: straight to standard output through the running agent; into a
/// temporary file when this process has the store open, printed once the store is closed
/// ([`Listing::print`]), so that a reader who stops reading (a pager) does not keep the store
/// from the agent, which then could not start.
pub(super) enum Listing {
    Stdout(std::io::StdoutLock<'static>),
    Spooled(std::io::BufWriter<std::fs::File>),
}

impl Listing {
    pub fn for_backend(backend: &super::Backend) -> Result<Listing, super::CliError> {
        Ok(match backend {
            super::Backend::Agent { .. } => Listing::Stdout(std::io::stdout().lock()),
            super::Backend::Local(_) => {
                let file = tempfile::tempfile().map_err(|e| {
                    super::CliError::Failure(format!("cannot create a temporary file: {e}"))
                })?;
                Listing::Spooled(std::io::BufWriter::new(file))
            }
        })
    }

    /// A listing that `error` cut short: prints the rows read before it, as writing straight to
    /// standard output did, and hands the error back (the one worth telling).
    pub fn cut_short(self, error: super::CliError) -> super::CliError {
        let _ = self.print();
        error
    }

    /// Prints what was spooled (nothing to do for standard output). A reader gone (a closed
    /// pipe) ends it quietly, as writing straight to it does.
    pub fn print(self) -> Result<(), super::CliError> {
        use std::io::{Seek, Write};
        let mut out = match self {
            Listing::Stdout(mut out) => return out.flush().map_err(super::CliError::Output),
            Listing::Spooled(out) => out,
        };
        let failed = |e: std::io::Error| {
            super::CliError::Failure(format!("cannot read back the listing: {e}"))
        };
        let spool_full = |e| output_error(spool_error(e));
        out.flush().map_err(spool_full)?;
        let mut file = out.into_inner().map_err(|e| spool_full(e.into_error()))?;
        file.rewind().map_err(failed)?;
        std::io::copy(&mut file, &mut std::io::stdout().lock()).map_err(super::CliError::Output)?;
        Ok(())
    }
}

impl std::io::Write for Listing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Listing::Stdout(out) => out.write(buf),
            Listing::Spooled(out) => out.write(buf).map_err(spool_error),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Listing::Stdout(out) => out.flush(),
            Listing::Spooled(out) => out.flush().map_err(spool_error),
        }
    }
}

/// A failed write to the listing's temporary file.
#[derive(Debug)]
struct SpoolFailed(std::io::Error);

impl std::fmt::Display for SpoolFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SpoolFailed {}

fn spool_error(error: std::io::Error) -> std::io::Error {
    std::io::Error::new(error.kind(), SpoolFailed(error))
}

/// The error of a listing's write: a failed write to its temporary file is named as such, as
/// the disk to free is that of the temporary folder, not of the output.
pub(super) fn output_error(error: std::io::Error) -> super::CliError {
    match error
        .get_ref()
        .and_then(|e| e.downcast_ref::<SpoolFailed>())
    {
        Some(SpoolFailed(cause)) => super::CliError::Failure(format!(
            "cannot write the listing's temporary file in {}: {cause}; free space there, or set \
             TMPDIR to a folder with room",
            std::env::temp_dir().display()
        )),
        None => super::CliError::Output(error),
    }
}

/// `outbox list`'s output, a row at a time as the pages come: NDJSON, or a table under one
/// header.
pub(super) struct ExportTable {
    json: bool,
    /// Rows printed so far.
    pub rows: usize,
    out: Listing,
}

impl ExportTable {
    pub fn new(json: bool, out: Listing) -> Self {
        ExportTable { json, rows: 0, out }
    }

    pub fn row(&mut self, e: &Value) -> Result<(), super::CliError> {
        use std::io::Write;
        if self.json {
            writeln!(self.out, "{e}").map_err(output_error)?;
        } else {
            if self.rows == 0 {
                writeln!(
                    self.out,
                    "{:<26} {:<24} {:<9} {:>8}  {:<24}  LAST ERROR",
                    "ID", "PROFILE", "REASON", "ATTEMPTS", "CREATED"
                )
                .map_err(output_error)?;
            }
            writeln!(
                self.out,
                "{:<26} {} {:<9} {:>8}  {:<24}  {}",
                text_of(&e["id"]),
                in_columns(&text_of(&e["profile_id"]), 24),
                text_of(&e["reason"]),
                text_of(&e["attempts"]),
                text_of(&e["created_at"]),
                cut_to_columns(&text_of(&e["last_error"]), 60)
            )
            .map_err(output_error)?;
        }
        self.rows += 1;
        Ok(())
    }

    /// The listing, to be printed once the store is closed.
    pub fn finish(mut self) -> Result<Listing, super::CliError> {
        use std::io::Write;
        if !self.json && self.rows == 0 {
            writeln!(self.out, "(no exports)").map_err(output_error)?;
        }
        Ok(self.out)
    }
}

pub(super) fn print_export(export: &Value) -> Result<(), super::CliError> {
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
        "superseded_by",
    ] {
        if key == "superseded_by" && export[key].is_null() {
            continue; // pending, or a dead letter that may be retried
        }
        outln!("{key:<16} {}", text_of(&export[key]))?;
    }
    if export["dead"] == false {
        let next = match export["retry_in_s"].as_u64() {
            Some(0) | None => "when delivery reaches it".to_owned(),
            Some(s) => format!("in {s} s of agent run time (its backoff or Retry-After)"),
        };
        outln!("{:<16} {next}", "next attempt")?;
    }
    outln!("payload:")?;
    outln!("{}", pretty_for_terminal(&export["payload"]))?;
    Ok(())
}

/// `text` cut to at most `columns` columns of a terminal, ending in `…` where it was cut: wide
/// characters (CJK, most emoji) take two.
fn cut_to_columns(text: &str, columns: usize) -> String {
    use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};
    if text.width() <= columns {
        return text.to_owned();
    }
    let mut cut = String::new();
    let mut width = 0;
    for c in text.chars() {
        let w = c.width().unwrap_or(0);
        if width + w > columns.saturating_sub(1) {
            break;
        }
        cut.push(c);
        width += w;
    }
    cut.push('…');
    cut
}

/// `text` in a table column `columns` wide: cut as [`cut_to_columns`] cuts it, padded with
/// spaces (`{:<N}` pads by characters, and a column of wide ones went past its place).
pub(super) fn in_columns(text: &str, columns: usize) -> String {
    use unicode_width::UnicodeWidthStr;
    let cut = cut_to_columns(text, columns);
    let pad = columns.saturating_sub(cut.width());
    format!("{cut}{}", " ".repeat(pad))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn table_columns_count_what_a_terminal_shows() {
        use unicode_width::UnicodeWidthStr;
        for (text, shown) in [
            ("p-1", "p-1     "),
            ("顧客-42", "顧客-42 "),
            ("顧客顧客顧客", "顧客顧… "),
            ("profile-long-id", "profile…"),
            ("é✓", "é✓      "),
        ] {
            let column = in_columns(text, 8);
            assert_eq!(column, shown, "{text}");
            assert_eq!(column.width(), 8, "{text}: {column}");
        }
        assert_eq!(
            cut_to_columns("顧客顧客顧客", 8),
            "顧客顧…",
            "no room for a fourth"
        );
    }

    #[test]
    fn control_characters_reach_the_terminal_escaped() {
        let hostile = "a\u{1b}]0;title\u{7}b\u{9b}2Jc\r\nd\te";
        assert_eq!(
            text_of(&json!(hostile)),
            "a\\u{1b}]0;title\\u{7}b\\u{9b}2Jc\\r\\nd\\te"
        );
        assert_eq!(
            for_terminal(hostile, true),
            "a\\u{1b}]0;title\\u{7}b\\u{9b}2Jc\\r\nd\\te"
        );
        assert_eq!(
            pretty_for_terminal(&json!({"name": "a\u{9b}2J\u{7f}b\n"})),
            "{\n  \"name\": \"a\\u{9b}2J\\u{7f}b\\n\"\n}"
        );
        assert_eq!(
            text_of(&json!("id\u{202e}gnp.exe\u{2066}x")),
            "id\\u{202e}gnp.exe\\u{2066}x"
        );
        assert_eq!(text_of(&json!("plain é ✓")), "plain é ✓");
        assert_eq!(text_of(&Value::Null), "-");
        assert_eq!(text_of(&json!(3)), "3");
    }

    #[test]
    fn a_running_backfill_is_described_and_none_is_left_out() {
        let backfill = json!({"segments": ["s1", "s2"], "scanned": 2000, "exported": 12, "profiles": 9000, "queued_after": 1});
        assert_eq!(
            describe_backfill(&backfill).unwrap(),
            "2000 of about 9000 profiles scanned, 12 exported, for newly mapped s1, s2; 1 more queued"
        );
        assert_eq!(describe_backfill(&Value::Null), None);
    }
}
