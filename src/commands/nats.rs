//! `outpost nats setup`, `outpost publish` and `outpost rejected`.

use std::io::{BufReader, Read, Seek, Write};
use std::path::Path;

use serde_json::Value;

use super::output::{in_columns, output_error, Listing};
use super::progress::Progress;
use super::{for_terminal, list_paged_by, print_json, text_of, Backend, CliError, Print};
use crate::admin::AdminRequest;
use crate::cli::RejectedCommand;
use crate::config::Config;
use crate::profile::update::{FutureLimit, UpdateReader};
use crate::source::claim::{self, standing, Released, Standing};
use crate::source::config::{NatsAuth, NatsSource};
use crate::source::nats::{last_sequence, probe, setup, SetupOutcome};
use crate::source::partition::{fnv1a64_extend, format_owned, FNV1A64_EMPTY};
use crate::source::publish::{fresh_nonce, payload_of, publish, Largest, Planner};
use crate::store::source::RejectedId;

pub(super) fn nats_config(config: &Config) -> Result<&NatsSource, CliError> {
    let nats = config.nats.as_ref().ok_or_else(|| {
        CliError::Usage(format!(
            "config {} has no [source.nats] table",
            config.path.display()
        ))
    })?;
    nats.check_files().map_err(CliError::Usage)?;
    Ok(nats)
}

/// `outpost nats release PARTITIONS`: lets the claims on them go.
pub(super) async fn release(
    config: &Config,
    partitions: &str,
    force: bool,
) -> Result<(), CliError> {
    let nats = nats_config(config)?;
    let partitions = crate::source::partition::parse_owned(partitions, nats.partitions)
        .map_err(|e| CliError::Usage(format!("partitions: {e}")))?;
    let failure = |e: crate::source::nats::NatsError| CliError::Failure(e.to_string());
    let claims = claim::open(nats).await.map_err(failure)?;
    let (mut changed, mut handed_over) = (0, 0);
    for partition in partitions {
        let read = claim::read(&claims, partition).await.map_err(failure)?;
        let holder = read.holder.as_ref();
        if let Some(handed) = holder.filter(|h| h.starts_with(claim::HANDED_OVER)) {
            if !force {
                let then = match claim::any_taker(handed) {
                    Some(taker) => format!(
                        "{taker}'s take-over of that file has not finished (run it again there)"
                    ),
                    None => "take it over with that file (`outpost nats take-over`)".into(),
                };
                let handed = for_terminal(handed, false);
                let then = for_terminal(&then, false);
                outln!(
                    "partition {partition:<6} left as it is: its claim says {handed}; {then}, \
                     or give --force to let it go, and an agent that owns it consumes it from \
                     the stream's start"
                )?;
                handed_over += 1;
                continue;
            }
        }
        match claim::release(&claims, &read).await.map_err(failure)? {
            Released::Was(holder) => outln!(
                "partition {partition:<6} released (claimed by {}); an agent that owns it \
                 consumes it from where its own store left it, the stream's start for a store \
                 new to it",
                for_terminal(&holder, false)
            )?,
            Released::NoClaim => outln!("partition {partition:<6} had no claim")?,
            Released::Changed => {
                changed += 1;
                outln!(
                    "partition {partition:<6} left as it is: its claim changed since it was read \
                     (a hand-over or an agent wrote it meanwhile); run the command again to see \
                     what it says now"
                )?;
            }
        }
    }
    // A partition left as it is was not released, whatever the others were: a script must
    // not take the command's success for its own.
    let mut left = Vec::new();
    if handed_over > 0 {
        left.push(format!(
            "{handed_over} claim(s) say their partition was handed over, and were left as they \
             are (--force lets them go)"
        ));
    }
    if changed > 0 {
        left.push(format!(
            "{changed} claim(s) changed while they were being released, and were left as they are"
        ));
    }
    match left.is_empty() {
        true => Ok(()),
        false => Err(CliError::Failure(left.join("; "))),
    }
}

pub(super) async fn nats_setup(config: &Config, record_made_at: bool) -> Result<(), CliError> {
    let nats = nats_config(config)?;
    // Addresses carry no credentials (refused at load).
    outln!("servers          {}", nats.servers.join(", "))?;
    let outcome = setup(nats, record_made_at)
        .await
        .map_err(|e| CliError::Failure(e.to_string()))?;
    let subjects = format!("{}.*", nats.subject_prefix);
    match outcome {
        SetupOutcome::Created => outln!(
            "stream           {} created: subjects {subjects}, file storage, {} replica(s)",
            nats.stream,
            nats.replicas
        )?,
        SetupOutcome::Found {
            messages,
            replicas,
            recorded,
            made_at_recorded,
            ref warnings,
        } => {
            outln!(
            "stream           {} found: subjects {subjects}, file storage, {replicas} replica(s), {messages} message(s); {}",
            nats.stream,
            match (recorded, made_at_recorded) {
                (true, _) => "its description now records the partition count and when the stream was made",
                (false, Some(true)) => "its description now records when the stream was made (a NATS server restarted after the stream was edited reports another time, which agents would take for a new stream)",
                (false, Some(false)) => "nothing changed; its description does not record when the stream was made: once every agent runs this build, `outpost nats setup --record-made-at` records it (a NATS server restarted after the stream was edited reports another time, which agents would take for a new stream)",
                (false, None) => "nothing changed",
            }
            )?;
            for warning in warnings {
                outln!("warning          {}", for_terminal(warning, false))?;
            }
        }
    }
    outln!(
        "partitions       {} ({}.0 to {}.{}); this agent owns {}",
        nats.partitions,
        nats.subject_prefix,
        nats.subject_prefix,
        nats.partitions - 1,
        nats.owned_text()
    )?;
    Ok(())
}

/// `outpost check`'s lines about `[source.nats]`: connects and reads the stream and the claims
/// on the partitions this agent owns, with the store's figures (`stats`) telling which claims
/// are its own store's. A problem when the agent would consume none of them.
pub(super) async fn check_nats(
    nats: &NatsSource,
    stats: &Result<Value, String>,
    store_exists: bool,
) -> Result<Option<String>, CliError> {
    let auth = match &nats.auth {
        NatsAuth::None => "no credentials",
        NatsAuth::CredsFile(_) => "a creds file",
        NatsAuth::Token(_) => "a token (set)",
        NatsAuth::UserPassword { .. } => "user and password (set)",
    };
    report_line!("nats             {} ({auth})", nats.servers.join(", "))?;
    let probed = probe(nats)
        .await
        .map_err(|e| CliError::Failure(e.to_string()))?;
    let (messages, stray) = (probed.messages, probed.stray);
    report_line!(
        "stream           {}: {messages} message(s); {} partitions on {}.*, this agent owns {}",
        nats.stream,
        nats.partitions,
        nats.subject_prefix,
        nats.owned_text()
    )?;
    if !stray.is_empty() {
        report_line!("warning          {}", stray.describe())?;
    }
    for warning in &probed.warnings {
        report_line!("warning          {}", for_terminal(warning, false))?;
    }
    // An agent consumes no partition whose claim it cannot read (its credentials may not
    // reach the bucket, say).
    let claims = match probed.claims {
        Ok(claims) => claims,
        Err(e) => {
            report_line!("claims           cannot be read (the error below says why)")?;
            // Said after "nats: ", as the other problems of the source are.
            return Ok(Some(e.0));
        }
    };
    let Some(claims) = claims else {
        report_line!(
            "claims           none yet: the agent claims the partitions it owns as it starts"
        )?;
        return Ok(None);
    };
    // Which claims are this store's can be told only from its figures, or when there is no
    // store yet (a store made later gets a new id, so no claim is its).
    let (our_store, moved) = match stats {
        Ok(stats) => match stats["store_id"]
            .as_str()
            .and_then(|id| u32::from_str_radix(id, 16).ok())
        {
            Some(id) => {
                let moved: Vec<u64> = stats["handed_over"]["partitions"]
                    .as_array()
                    .map(|p| p.iter().filter_map(Value::as_u64).collect())
                    .unwrap_or_default();
                (Some(id), moved)
            }
            None => {
                return not_judged(
                    "the store's figures do not name it (an agent of an earlier build?)",
                )
            }
        },
        Err(_) if !store_exists => (None, Vec::new()),
        Err(why) => return not_judged(why),
    };
    let standings: Vec<(u32, Standing)> = nats
        .owned
        .iter()
        .zip(&claims)
        .map(|(&partition, recorded)| {
            let moved = moved.contains(&u64::from(partition));
            (partition, standing(recorded.as_deref(), our_store, moved))
        })
        .collect();
    let report = ClaimsReport::of(&standings);
    report_line!("claims           {}", report.line)?;
    for warning in &report.warnings {
        report_line!("warning          {}", for_terminal(warning, false))?;
    }
    Ok(report.problem)
}

/// The claims line of a store whose claims cannot be told from another store's (`why`).
fn not_judged(why: &str) -> Result<Option<String>, CliError> {
    report_line!("claims           not judged: {}", for_terminal(why, false))?;
    Ok(None)
}

/// What `outpost check` says of how the partitions an agent owns stand.
#[derive(Debug, PartialEq, Eq)]
struct ClaimsReport {
    line: String,
    warnings: Vec<String>,
    /// When the agent would consume none of them.
    problem: Option<String>,
}

impl ClaimsReport {
    fn of(standings: &[(u32, Standing)]) -> ClaimsReport {
        let count =
            |wanted: fn(&Standing) -> bool| standings.iter().filter(|(_, s)| wanted(s)).count();
        let ours = count(|s| *s == Standing::Ours);
        let unclaimed = count(|s| *s == Standing::Unclaimed);
        let elsewhere = standings.len() - ours - unclaimed;
        let mut parts = vec![format!("{ours} claimed by this store")];
        if unclaimed > 0 {
            parts.push(format!(
                "{unclaimed} unclaimed (the agent claims them as it starts)"
            ));
        }
        if elsewhere > 0 {
            parts.push(format!("{elsewhere} left alone (below)"));
        }
        let line = format!(
            "of the {} partition(s) this agent owns: {}",
            standings.len(),
            parts.join(", ")
        );
        // Partitions grouped by what keeps them from this agent, in the order first met.
        let mut reasons: Vec<(String, Vec<u32>)> = Vec::new();
        for (partition, standing) in standings {
            let reason = match standing {
                Standing::Ours | Standing::Unclaimed => continue,
                Standing::MovedFromHere => "this store handed them over (`outpost nats hand-over`), and leaves them alone".to_string(),
                Standing::HandedOver(claim) => format!(
                    "their claim says {claim}: no agent consumes them until `outpost nats take-over` of that file has finished"
                ),
                Standing::Elsewhere(holder) => format!(
                    "{holder} claims them: this agent leaves them alone while that claim stands (`outpost nats release` lets it go once that store is gone for good)"
                ),
            };
            match reasons.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, partitions)) => partitions.push(*partition),
                None => reasons.push((reason, vec![*partition])),
            }
        }
        let warnings = reasons
            .into_iter()
            .map(|(reason, partitions)| {
                format!("partition(s) {}: {reason}", format_owned(&partitions))
            })
            .collect();
        let consumes_none = !standings.iter().any(|(_, s)| s.consumed());
        let problem = (!standings.is_empty() && consumes_none).then(|| {
            format!(
                "this agent would consume none of the {} partition(s) it owns (the warnings above say why)",
                standings.len()
            )
        });
        ClaimsReport {
            line,
            warnings,
            problem,
        }
    }
}

/// async-nats' default bound on publish acknowledgements awaited.
const MAX_IN_FLIGHT: usize = 5_000;

pub(super) async fn publish_path(
    config: &Config,
    path: &Path,
    in_flight: usize,
    resume: Option<&str>,
) -> Result<(), CliError> {
    let nats = nats_config(config)?;
    let resumed = resume
        .map(|id| ResumeId::parse(id).map_err(CliError::Usage))
        .transpose()?;
    let nonce = resumed.map_or_else(fresh_nonce, |r| r.nonce);
    let skip = resumed.map_or(0, |r| r.published);
    if in_flight == 0 {
        return Err(CliError::Usage("--in-flight must be at least 1".into()));
    }
    // The NATS client holds at most this many acknowledgements awaited; past it, a publish
    // would wait for one that is only awaited after it.
    if in_flight > MAX_IN_FLIGHT {
        return Err(CliError::Usage(format!(
            "--in-flight must be at most {MAX_IN_FLIGHT}, the acknowledgements the NATS client awaits at once"
        )));
    }
    // Two passes, so that memory stays bounded and a bad line publishes nothing: the first
    // validates every line, the second publishes. Standard input is spooled to read it twice.
    let mut file = super::ingest::open_input(path)?;
    let rewind = |file: &mut std::fs::File| {
        file.rewind()
            .map_err(|e| CliError::Failure(format!("cannot reread the input: {e}")))
    };
    // One clock reading for the whole input, so both passes judge every line alike.
    let limit = FutureLimit {
        now: chrono::Utc::now(),
        max_future_s: config.ingest.max_future_s,
    };
    rewind(&mut file)?;
    let mut total = 0u64;
    let mut largest: Option<Largest> = None;
    // The input's digest, for the messages' de-duplication ids, taken as it is read.
    let input = std::cell::Cell::new(FNV1A64_EMPTY);
    let hashing = Hashing {
        inner: &mut file,
        hash: &input,
    };
    let mut reader = UpdateReader::new(BufReader::new(hashing)).within(limit);
    while let Some(update) = reader.next() {
        let update = update
            .map_err(|e| CliError::Failure(format!("input refused, nothing published: {e}")))?;
        total += 1;
        let bytes = payload_of(&update).len();
        if largest.is_none_or(|l| bytes > l.bytes) {
            largest = Some(Largest {
                bytes,
                line: reader.line(),
            });
        }
    }
    drop(reader);
    if let Some(digest) = resumed.map(|r| r.digest).filter(|&d| d != input.get()) {
        return Err(CliError::Usage(format!(
            "--resume: this input is not the one that publish read (its digest {:016x}, this one's {:016x}); nothing published. Publish it without --resume",
            digest,
            input.get()
        )));
    }
    if skip > total {
        return Err(CliError::Usage(format!(
            "--resume: that publish went through {skip} updates, and this input holds {total}; nothing published"
        )));
    }
    rewind(&mut file)?;
    super::interrupt::parts_begin();
    let mut planner = Planner::new(nats, input.get(), nonce);
    // A line that fails on the second pass (the file changed meanwhile) ends the publish.
    let reread_error = std::cell::RefCell::new(None);
    let messages = UpdateReader::new(BufReader::new(&mut file))
        .within(limit)
        .map_while(|update| match update {
            Ok(update) => Some(planner.plan(&update)),
            Err(e) => {
                *reread_error.borrow_mut() = Some(e);
                None
            }
        })
        // Planned all the same, so that the rest keep their ids.
        .skip(skip as usize)
        // A signal stops the publish between two messages; those sent are acknowledged first.
        .take_while(|_| !super::interrupt::asked());
    let progress = (path != Path::new("-")).then(|| {
        Progress::new(
            total,
            skip,
            "{bar:40} {pos}/{len} updates published, {per_sec}, {eta} left",
            "published",
        )
    });
    let result = publish(nats, messages, largest, in_flight, |n| {
        if let Some(progress) = &progress {
            progress.set_position(skip + n);
        }
    })
    .await;
    let result = match (result, reread_error.into_inner()) {
        (Ok(report), Some(e)) => Err((
            report,
            crate::source::nats::NatsError(format!(
                "the input changed while it was published: {e}"
            )),
        )),
        (Ok(report), None) if skip + report.published < total => Err((
            report,
            crate::source::nats::NatsError(super::interrupt::STOPPED.into()),
        )),
        (result, _) => result,
    };
    if let Some(progress) = &progress {
        progress.finish();
    }
    match result {
        Ok(report) => {
            let before = match skip {
                0 => String::new(),
                n => format!("; the first {n} went through before, and were not sent again"),
            };
            outln!(
                "{} update(s) published to stream {} ({} already there, ignored as duplicates){before}",
                report.published - report.duplicates,
                nats.stream,
                report.duplicates
            )?;
            Ok(())
        }
        Err((report, e)) => {
            let id = ResumeId {
                nonce,
                digest: input.get(),
                published: skip + report.published,
            };
            Err(CliError::Failure(format!(
                "{e}; the first {} of {total} update(s) were published in order: publishing the same input again with `--resume {id}` within the stream's duplicate window (2 minutes by default) completes it",
                id.published,
            )))
        }
    }
}

/// What a failed publish prints for `--resume`: its nonce, the input's digest and how many
/// of its updates went through in order (16 hexadecimal digits each). Those are not sent
/// again: JetStream drops a repeat only within its duplicate window, counted from when it
/// took the message, so the start of a long publish sent again would be stored again, after
/// later updates of its profiles. The rest are sent with the ids they had, so what went
/// through of them (at most the messages awaiting their acknowledgement when it failed) is
/// dropped as duplicates within the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ResumeId {
    nonce: u64,
    digest: u64,
    published: u64,
}

impl ResumeId {
    fn parse(id: &str) -> Result<ResumeId, String> {
        let part = |at: usize| {
            id.get(at..at + 16)
                .filter(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        };
        match (id.len(), part(0), part(16), part(32)) {
            (48, Some(nonce), Some(digest), Some(published)) => Ok(ResumeId {
                nonce,
                digest,
                published,
            }),
            // As a failed publish printed it before it said how far it went: from the start.
            (32, Some(nonce), Some(digest), _) => Ok(ResumeId {
                nonce,
                digest,
                published: 0,
            }),
            _ => Err(format!(
                "--resume takes the 48 hexadecimal digits a failed publish printed (32 from an earlier outpost), not `{}`",
                id.chars().take(60).collect::<String>()
            )),
        }
    }
}

impl std::fmt::Display for ResumeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:016x}{:016x}{:016x}",
            self.nonce, self.digest, self.published
        )
    }
}

/// A reader that keeps the FNV-1a 64 of what was read through it in `hash`.
struct Hashing<'a, R> {
    inner: R,
    hash: &'a std::cell::Cell<u64>,
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.set(fnv1a64_extend(self.hash.get(), &buf[..n]));
        Ok(n)
    }
}

/// How long `outpost nats set-position` waits for the stream's last sequence.
pub(super) const STREAM_END_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// `outpost nats set-position`'s checks, before the store is opened: the partition is one of
/// the config's, and SEQ is not past the stream's end. A position past it is taken for one
/// in another stream when the partition starts, and the partition is then consumed from the
/// start: refused while the stream can be read, so that a mistyped number does not do that.
/// When it cannot be read, SEQ is set with a warning: that may be when it is needed most.
pub(super) fn check_position(config: &Config, partition: u32, seq: u64) -> Result<(), CliError> {
    let Some(nats) = &config.nats else {
        eprintln!(
            "warning: config {} has no [source.nats] table: {seq} was not checked against the end of the stream",
            config.path.display()
        );
        return Ok(());
    };
    if partition >= nats.partitions {
        return Err(CliError::Usage(format!(
            "partition {partition} is not one of source.nats's {} partitions",
            nats.partitions
        )));
    }
    let read = super::runtime()?.block_on(async {
        match tokio::time::timeout(STREAM_END_WAIT, last_sequence(nats)).await {
            Ok(read) => read.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {} s", STREAM_END_WAIT.as_secs())),
        }
    });
    match read {
        Ok(last) => within_stream(seq, last, &nats.stream),
        Err(e) => {
            eprintln!(
                "warning: {seq} was not checked against the end of stream {} ({e}); \
                 a position past it makes the partition start again from the stream's start",
                nats.stream
            );
            Ok(())
        }
    }
}

fn within_stream(seq: u64, last: u64, stream: &str) -> Result<(), CliError> {
    if seq > last {
        return Err(CliError::Usage(format!(
            "{seq} is past the end of stream {stream}, whose last message is {last}: \
             give at most {last}"
        )));
    }
    Ok(())
}

/// `outpost nats set-position`: sets an unreadable stream position.
pub(super) fn set_position(backend: &Backend, partition: u32, seq: u64) -> Result<(), CliError> {
    backend.execute(&AdminRequest::SetPosition { partition, seq })?;
    outln!(
        "partition {partition}: position set to {seq}; the partition starts again at its next attempt"
    )?;
    Ok(())
}

/// A `rejected` command; what it prints, to be printed once the store is closed.
pub(super) fn rejected(backend: &Backend, command: RejectedCommand) -> Result<Print, CliError> {
    match command {
        RejectedCommand::List { limit, json } => {
            // Fewer a page than exports: each carries its message (up to 64 KiB, as text and
            // as base64).
            const PAGE: usize = 100;
            let wanted = if limit == 0 { usize::MAX } else { limit };
            let mut out = Listing::for_backend(backend)?;
            let mut rows = 0;
            let fetch = |after: Option<RejectedId>, asked| {
                Ok(backend.execute(&AdminRequest::RejectedList {
                    limit: asked,
                    after: after.map(|id| id.to_string()),
                })?)
            };
            let id_of = |item: &Value| RejectedId::parse(item["id"].as_str()?).ok();
            let mut row = |item: &Value| -> std::io::Result<()> {
                if json.json {
                    writeln!(out, "{item}")?;
                } else {
                    if rows == 0 {
                        writeln!(
                            out,
                            "{:<14} {:<24} {:<24} ERROR",
                            "ID", "SUBJECT", "RECEIVED"
                        )?;
                    }
                    writeln!(
                        out,
                        "{:<14} {} {:<24} {}",
                        text_of(&item["id"]),
                        in_columns(&text_of(&item["subject"]), 24),
                        text_of(&item["received_at"]),
                        text_of(&item["error"])
                    )?;
                }
                rows += 1;
                Ok(())
            };
            let cut = list_paged_by(wanted, PAGE, "rejected message", id_of, fetch, |item| {
                row(item).map_err(output_error)
            });
            let cut = match cut {
                Ok(cut) => cut,
                Err(e) => return Err(out.cut_short(e)),
            };
            if !json.json && rows == 0 {
                writeln!(out, "no rejected messages").map_err(output_error)?;
            }
            if cut {
                eprintln!("the first {limit} shown; --limit 0 lists all");
            }
            Ok(Box::new(move || out.print()))
        }
        RejectedCommand::Show { id, json } => {
            let item = backend.execute(&AdminRequest::RejectedShow { id })?;
            Ok(Box::new(move || {
                if json.json {
                    outln!("{item}")?;
                } else {
                    for key in ["id", "subject", "seq", "received_at", "error", "raw_bytes"] {
                        outln!("{key:<12} {}", text_of(&item[key]))?;
                    }
                    if item["raw_truncated"].as_bool() == Some(true) {
                        outln!("raw (first bytes):")?;
                    } else {
                        outln!("raw:")?;
                    }
                    // A message may span lines; its other control characters are escaped.
                    match item["raw"].as_str() {
                        Some(raw) => outln!("{}", for_terminal(raw, true))?,
                        None => outln!("{}", text_of(&item["raw"]))?,
                    }
                }
                Ok(())
            }))
        }
        RejectedCommand::Drop { ids, all, json } => {
            let result = backend.execute(&AdminRequest::RejectedDrop { ids, all })?;
            Ok(Box::new(move || {
                // Counted by the agent with `--all`, which names only the first ids (an agent of
                // an earlier build named them all).
                let done = result["dropped_count"].as_u64().map_or_else(
                    || result["dropped"].as_array().map_or(0, Vec::len),
                    |n| n as usize,
                );
                match json.json {
                    true => print_json(&result, true)?,
                    false => outln!("{done} rejected message(s) deleted")?,
                }
                let missing: Vec<&str> = result["not_found"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                if !missing.is_empty() {
                    return Err(CliError::Failure(format!(
                        "not found: {}",
                        missing.join(", ")
                    )));
                }
                Ok(())
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_tells_which_owned_partitions_an_agent_would_leave_alone() {
        let theirs = "store 00009999 on edge-2";
        let handed = "handed over in file 00009999-1700000000000";
        let all_ours = ClaimsReport::of(&[(0, Standing::Ours), (1, Standing::Unclaimed)]);
        assert_eq!(
            all_ours,
            ClaimsReport {
                line: "of the 2 partition(s) this agent owns: 1 claimed by this store, 1 unclaimed (the agent claims them as it starts)".into(),
                warnings: vec![],
                problem: None,
            }
        );
        let some = ClaimsReport::of(&[
            (0, Standing::Ours),
            (3, Standing::Elsewhere(theirs.into())),
            (4, Standing::Elsewhere(theirs.into())),
            (6, Standing::HandedOver(handed.into())),
            (7, Standing::Elsewhere(theirs.into())),
        ]);
        assert_eq!(
            some.line,
            "of the 5 partition(s) this agent owns: 1 claimed by this store, 4 left alone (below)"
        );
        assert_eq!(some.warnings.len(), 2, "{:?}", some.warnings);
        assert!(
            some.warnings[0]
                .starts_with("partition(s) 3-4,7: store 00009999 on edge-2 claims them"),
            "{:?}",
            some.warnings
        );
        assert!(
            some.warnings[1].starts_with(&format!("partition(s) 6: their claim says {handed}")),
            "{:?}",
            some.warnings
        );
        assert_eq!(some.problem, None);
        let none = ClaimsReport::of(&[
            (6, Standing::MovedFromHere),
            (7, Standing::Elsewhere(theirs.into())),
        ]);
        assert_eq!(
            none.problem.as_deref(),
            Some("this agent would consume none of the 2 partition(s) it owns (the warnings above say why)")
        );
        assert!(none.warnings[0].starts_with("partition(s) 6: this store handed them over"));
    }

    #[test]
    fn a_position_is_refused_only_past_the_streams_last_message() {
        assert!(within_stream(180, 180, "UPDATES").is_ok());
        assert!(within_stream(0, 180, "UPDATES").is_ok());
        assert!(within_stream(0, 0, "UPDATES").is_ok());
        for (seq, last) in [(181, 180), (1, 0)] {
            let error = within_stream(seq, last, "UPDATES").unwrap_err();
            assert_eq!(error.exit_code(), 2);
            assert_eq!(
                error.to_string(),
                format!("{seq} is past the end of stream UPDATES, whose last message is {last}: give at most {last}")
            );
        }
    }

    #[test]
    fn a_resume_id_is_what_a_failed_publish_printed() {
        let id = ResumeId {
            nonce: 0xaa,
            digest: 0x0123_4567_89ab_cdef,
            published: 15_000,
        };
        let printed = id.to_string();
        assert_eq!(printed, "00000000000000aa0123456789abcdef0000000000003a98");
        assert_eq!(ResumeId::parse(&printed), Ok(id));
        assert_eq!(ResumeId::parse(&printed.to_uppercase()), Ok(id));
        // The id of a publish as it was printed before it counted what went through.
        assert_eq!(
            ResumeId::parse("00000000000000aa0123456789abcdef"),
            Ok(ResumeId { published: 0, ..id })
        );
        for refused in [
            "",
            "00000000000000aa0123456789abcde",
            "00000000000000aa0123456789abcdef0000000000003a9",
            "00000000000000aa0123456789abcdef0000000000003a988",
            "00000000000000aa0123456789abcdef+000000000003a98",
            "00000000000000aa0123456789abcdefg000000000003a98",
            "00000000000000aa0123456789abcdé000000000003a98",
        ] {
            let error = ResumeId::parse(refused).unwrap_err();
            assert!(
                error.starts_with("--resume takes the 48 hexadecimal digits"),
                "{refused}: {error}"
            );
        }
    }
}
