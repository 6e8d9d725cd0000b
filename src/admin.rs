//! The operations the CLI performs on a store, as data: the same [`AdminRequest`] is executed
//! straight on the store when no agent runs, or sent over the agent's Unix socket when one
//! does (sled lets one process open a store).

use std::path::Path;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::profile::update::format_stored_time;
use crate::store::handover::MoveError;
use crate::store::handover_file::{HandedPartition, Header, Terms};
use crate::store::source::{PositionSet, RejectedId};
use crate::store::{
    format_ms, Export, ExportId, ListFilter, MaybeAcknowledged, NotQuiet, Pausing, PutBack,
    Resuming, Store, StoreError,
};

/// The name of the agent's socket in the store folder.
pub const SOCKET_NAME: &str = "outpost.sock";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminRequest {
    Stats,
    List {
        dead: bool,
        profile_id: Option<String>,
        limit: usize,
        /// Only exports numbered above this one: the CLI asks for a long list page by page,
        /// so that neither side holds it whole.
        #[serde(default)]
        after: Option<u64>,
    },
    Show {
        id: String,
    },
    Retry {
        ids: Vec<String>,
        all_dead: bool,
    },
    Drop {
        ids: Vec<String>,
        all_dead: bool,
    },
    Profile {
        id: String,
    },
    /// Every record of the store that cannot be read (`outpost check --store`).
    Unreadable,
    /// Acts on every unreadable record (`outpost repair`).
    RepairUnreadable,
    /// Rebuilds the store into a fresh database (`outpost compact`).
    Compact,
    /// Updates already validated by the CLI, committed as one group.
    Ingest {
        updates: Vec<Value>,
        /// The number of the first of them in the command's input (from 1): an input goes
        /// in many requests, and an update refused is named by it. `None` from a command of
        /// an earlier build.
        #[serde(default)]
        first: Option<u64>,
    },
    /// Messages from the NATS stream that were not valid updates.
    RejectedList {
        limit: usize,
        /// Only those after this id (the next page).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
    },
    RejectedShow {
        id: String,
    },
    RejectedDrop {
        ids: Vec<String>,
        all: bool,
    },
    /// Sets an unreadable stream position (`outpost nats set-position`).
    SetPosition {
        partition: u32,
        seq: u64,
    },
    /// Writes the stored profiles and positions of `partitions` to a new file at `path`
    /// (absolute) and forgets them (`outpost nats hand-over`).
    HandOver {
        partitions: Vec<u32>,
        terms: Terms,
        path: String,
        /// Stop once the file is written: forget nothing yet.
        #[serde(default)]
        write_only: bool,
    },
    /// Stores what the hand-over file at `path` (absolute) holds (`outpost nats take-over`).
    TakeOver {
        path: String,
        terms: Terms,
        /// Only a take-over of this file finished before fits (its claims name this store
        /// already).
        #[serde(default)]
        finished_only: bool,
    },
    /// Refuses as [`AdminRequest::TakeOver`] would, and changes nothing. An op of its own, so
    /// that an agent of an earlier build refuses it rather than taking the file over.
    CheckTakeOver {
        path: String,
        terms: Terms,
        finished_only: bool,
    },
    /// Pauses delivery, durably: ingest goes on, nothing is sent (`outpost delivery pause`).
    PauseDelivery,
    /// Resumes delivery (`outpost delivery resume`).
    ResumeDelivery,
    /// What `outpost top` shows: `{"metrics": <the /metrics text>, "stats": <outbox stats with
    /// the delivery state, without the profile count>, "token_expires_in_s": n | null}`. Only a
    /// running agent answers it.
    Snapshot,
}

/// How deep a line on the socket may nest: an ingest request nests each update two levels
/// down, an answer a stored profile a few, and either may nest as deep as serde_json's
/// default limit (128) lets ingest read it; a request no deeper, so that an update the agent
/// stores reads back.
pub const MAX_REQUEST_DEPTH: usize = 128 + 2;
pub const MAX_ANSWER_DEPTH: usize = 128 + 8;

/// Reads a request or answer line. serde_json's recursion limit would refuse an ingest
/// request carrying an update as deep as ingest takes (or an answer showing such a profile),
/// so it is lifted for a line that nests no deeper than `max_depth` (counted first, so that
/// the stack stays bounded).
pub fn read_line<T: serde::de::DeserializeOwned>(
    line: &[u8],
    max_depth: usize,
) -> serde_json::Result<T> {
    if nesting_depth(line) > max_depth {
        return serde_json::from_slice(line);
    }
    let mut reading = serde_json::Deserializer::from_slice(line);
    reading.disable_recursion_limit();
    let read = T::deserialize(&mut reading)?;
    reading.end()?;
    Ok(read)
}

impl AdminRequest {
    /// Whether it changes what the delivery loop is to do: the outbox, the store (reopened),
    /// or whether delivery is paused. The agent then wakes the loop, which would otherwise see
    /// it only at its next idle tick.
    pub fn wakes_delivery(&self) -> bool {
        matches!(
            self,
            AdminRequest::Retry { .. }
                | AdminRequest::Drop { .. }
                | AdminRequest::RepairUnreadable
                | AdminRequest::Compact
                | AdminRequest::PauseDelivery
                | AdminRequest::ResumeDelivery
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// The request names something that is not there (exit 1).
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed (exit 2).
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Failed(String),
    /// The store refused the request before changing anything for it: a take-over's
    /// refusals, and an ingest chunk holding a profile of a partition the store handed over.
    /// An agent of an older build answers these as [`AdminError::Failed`].
    #[error("{0}")]
    Refused(String),
    /// The request reached the agent, but no answer came back: it may have been done.
    #[error("{0}")]
    Unanswered(String),
    /// The agent answered that the request may have been done or not (an ingest chunk whose
    /// flush failed).
    #[error("{0}")]
    InDoubt(String),
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        AdminError::Failed(e.to_string())
    }
}

/// How an agent answers a request line it cannot read. Older agents answer the same, and
/// serde names a request they do not know an "unknown variant" (see
/// [`AdminAnswer::into_result`]).
pub fn unreadable_request(e: &serde_json::Error) -> AdminError {
    AdminError::Usage(format!("{BAD_REQUEST}: {e}"))
}

const BAD_REQUEST: &str = "bad admin request";

/// What a running agent adds to the outbox stats of delivery as it runs (with `agent_running`
/// true); null without one, so that a script reads the same keys either way.
pub const DELIVERY_STATE_KEYS: [&str; 6] = [
    "waiting_for_retry",
    "in_flight",
    "concurrency_limit",
    "rate_cap_per_s",
    "quota_left",
    "destination_down",
];

/// The answer on the socket: exactly one of the two is set.
#[derive(Debug, Serialize, Deserialize)]
pub struct AdminAnswer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

impl AdminAnswer {
    pub fn from_result(result: Result<Value, AdminError>) -> AdminAnswer {
        match result {
            Ok(value) => AdminAnswer {
                ok: Some(value),
                error: None,
                kind: None,
            },
            Err(e) => {
                let kind = match e {
                    AdminError::NotFound(_) => "not_found",
                    AdminError::Usage(_) => "usage",
                    AdminError::Failed(_) | AdminError::Unanswered(_) => "failed",
                    AdminError::Refused(_) => "refused",
                    AdminError::InDoubt(_) => "in_doubt",
                };
                AdminAnswer {
                    ok: None,
                    error: Some(e.to_string()),
                    kind: Some(kind.into()),
                }
            }
        }
    }

    pub fn into_result(self) -> Result<Value, AdminError> {
        match (self.ok, self.error) {
            (Some(value), None) => Ok(value),
            // An agent of an older build than the command, which never heard of the request:
            // nothing was done, and the fault is not in how the command was called.
            (_, Some(error))
                if self.kind.as_deref() == Some("usage")
                    && error.starts_with(&format!("{BAD_REQUEST}: unknown variant")) =>
            {
                Err(AdminError::Failed(format!(
                    "the running agent does not know this request: it is an older build of \
                     outpost than this command (restart it with this build); nothing was done \
                     ({error})"
                )))
            }
            (_, Some(error)) => Err(match self.kind.as_deref() {
                Some("not_found") => AdminError::NotFound(error),
                Some("usage") => AdminError::Usage(error),
                Some("in_doubt") => AdminError::InDoubt(error),
                Some("refused") => AdminError::Refused(error),
                _ => AdminError::Failed(error),
            }),
            (None, None) => Err(AdminError::Failed("empty answer from the agent".into())),
        }
    }
}

/// Executes every request but `Ingest` (which needs the committer) on the store.
/// Repairs are flushed before the answer.
pub fn execute(store: &Store, request: &AdminRequest) -> Result<Value, AdminError> {
    execute_with(store, request, &[])
}

/// [`execute`] for a running agent that owns the stream partitions `owned`: none of them may
/// be handed or taken over.
pub fn execute_with(
    store: &Store,
    request: &AdminRequest,
    owned: &[u32],
) -> Result<Value, AdminError> {
    match request {
        AdminRequest::Stats => {
            let mut stats =
                serde_json::to_value(store.stats(Utc::now())?).expect("stats serialize");
            for key in DELIVERY_STATE_KEYS {
                stats[key] = Value::Null;
            }
            stats["agent_running"] = false.into();
            Ok(stats)
        }
        AdminRequest::List {
            dead,
            profile_id,
            limit,
            after,
        } => {
            let filter = ListFilter {
                dead: *dead,
                profile_id: profile_id.clone(),
                limit: *limit,
                after: *after,
            };
            let exports = store.list(&filter)?;
            Ok(Value::Array(
                exports
                    .iter()
                    .map(|e| export_view(store, e))
                    .collect::<Result<_, _>>()?,
            ))
        }
        AdminRequest::Show { id } => {
            let id: ExportId = id.parse().map_err(AdminError::Usage)?;
            let export = store.export(id)?.ok_or_else(|| {
                AdminError::NotFound(format!("no export `{id}` in the outbox or dead letters"))
            })?;
            export_view(store, &export)
        }
        AdminRequest::Profile { id } => {
            let stored = store.profile(id)?.ok_or_else(|| {
                // Errors keep their own line breaks on a terminal; an id's are escaped.
                let id = crate::commands::for_terminal(id, false);
                AdminError::NotFound(format!("no profile `{id}` is stored"))
            })?;
            Ok(
                json!({"id": id, "timestamp": stored.timestamp.map(format_stored_time), "profile": stored.profile}),
            )
        }
        AdminRequest::Unreadable => {
            Ok(serde_json::to_value(store.unreadable()?).expect("records serialize"))
        }
        AdminRequest::RepairUnreadable => Ok(json!({ "repaired": store.repair_unreadable()? })),
        AdminRequest::Compact => Ok(store.compact_in_place()?.to_json(store.path())),
        AdminRequest::PauseDelivery => {
            let (changed, since_ms) = match store.pause_delivery(Utc::now().timestamp_millis())? {
                Pausing::Paused { since_ms } => (true, since_ms),
                Pausing::AlreadyPaused { since_ms } => (false, since_ms),
            };
            Ok(json!({
                "delivery_paused": true,
                "changed": changed,
                "paused_since": format_ms(since_ms),
                "pending": pending_or_null(store),
            }))
        }
        AdminRequest::ResumeDelivery => {
            let paused_since_ms = match store.resume_delivery()? {
                Resuming::Resumed { paused_since_ms } => Some(paused_since_ms),
                Resuming::NotPaused => None,
            };
            Ok(json!({
                "delivery_paused": false,
                "changed": paused_since_ms.is_some(),
                "paused_since": paused_since_ms.map(format_ms),
                "pending": pending_or_null(store),
            }))
        }
        AdminRequest::Retry { ids, all_dead } => repair(store, ids, *all_dead, true),
        AdminRequest::Drop { ids, all_dead } => repair(store, ids, *all_dead, false),
        AdminRequest::Ingest { .. } => {
            Err(AdminError::Failed("ingest is not executed here".into()))
        }
        AdminRequest::RejectedList { limit, after } => Ok(Value::Array(
            store
                .rejected_list(
                    *limit,
                    after
                        .as_deref()
                        .map(RejectedId::parse)
                        .transpose()
                        .map_err(AdminError::Usage)?,
                )?
                .iter()
                .map(|r| r.to_json())
                .collect(),
        )),
        AdminRequest::RejectedShow { id } => {
            let parsed = RejectedId::parse(id).map_err(AdminError::Usage)?;
            let record = store
                .rejected_get(parsed)?
                .ok_or_else(|| AdminError::NotFound(format!("no rejected message `{id}`")))?;
            Ok(record.to_json())
        }
        AdminRequest::RejectedDrop { ids, all } => drop_rejected(store, ids, *all),
        AdminRequest::SetPosition { partition, seq } => {
            match store.set_unreadable_position(*partition, *seq)? {
                PositionSet::Set => Ok(json!({ "partition": partition, "seq": seq })),
                PositionSet::NoPosition => Err(AdminError::NotFound(format!(
                    "partition {partition} has no stream position: nothing of it is in the \
                     store, and it is consumed from the stream's start"
                ))),
                PositionSet::Moved => Err(AdminError::Failed(format!(
                    "partition {partition} was handed over, or its take-over is unfinished: \
                     its position is left as it is"
                ))),
                PositionSet::Readable(at) => Err(AdminError::Failed(format!(
                    "partition {partition}'s stream position reads ({at}): only an unreadable \
                     one is set, so that no message is skipped or applied again by mistake"
                ))),
            }
        }
        AdminRequest::Snapshot => Err(AdminError::Failed(
            "only a running agent has figures to show".into(),
        )),
        AdminRequest::HandOver {
            partitions,
            terms,
            path,
            write_only,
        } => {
            let done = store
                .hand_over(partitions, terms, Path::new(path), owned, *write_only)
                .map_err(moved)?;
            Ok(json!({
                "file_id": done.header.file_id(),
                "partitions": partitions_json(&done.header),
                "profiles_in_file": done.profiles_in_file,
                "wrote": done.wrote,
                "forgotten": done.forgotten,
            }))
        }
        AdminRequest::TakeOver {
            path,
            terms,
            finished_only,
        }
        | AdminRequest::CheckTakeOver {
            path,
            terms,
            finished_only,
        } => {
            let take_over = match request {
                AdminRequest::CheckTakeOver { .. } => Store::check_take_over,
                _ => Store::take_over,
            };
            // A take-over refuses before it marks anything: the command can then put the
            // claims back as they were.
            let done = take_over(store, Path::new(path), terms, owned, *finished_only).map_err(
                |e| match e {
                    MoveError::Refused(text) => AdminError::Refused(text),
                    other => moved(other),
                },
            )?;
            Ok(json!({
                "from_store": format!("{:08x}", done.header.store_id),
                "file_id": done.header.file_id(),
                "partitions": partitions_json(&done.header),
                "profiles_in_file": done.profiles_in_file,
                "stored": done.stored,
            }))
        }
    }
}

/// Pending exports, for what a pause or a resume says: `null` when the tally cannot be read,
/// since the pause or resume itself is done by then.
fn pending_or_null(store: &Store) -> Value {
    store
        .tally()
        .map_or(Value::Null, |tally| tally.pending.into())
}

fn moved(e: MoveError) -> AdminError {
    match e {
        MoveError::Refused(text) => AdminError::Failed(text),
        MoveError::Unfinished(_) => AdminError::Failed(e.to_string()),
        MoveError::Store(e) => e.into(),
    }
}

/// The partitions of a hand-over file, each with the last stream sequence handed over.
fn partitions_json(header: &Header) -> Value {
    let each = |p: &HandedPartition| json!({"partition": p.partition, "seq": p.position.map(|(seq, _)| seq)});
    Value::Array(header.partitions.iter().map(each).collect())
}

/// `items` in their order, without the later ones of a key already seen: an id named twice
/// is acted on once (and not reported as not found the second time).
fn first_of_each<T, K: Ord>(items: Vec<T>, key: impl Fn(&T) -> K) -> Vec<T> {
    let mut seen = std::collections::BTreeSet::new();
    items
        .into_iter()
        .filter(|item| seen.insert(key(item)))
        .collect()
}

/// `rejected drop --all` deletes this many a page, each under its own write section and
/// flushed: a compaction or a reopen waits for one page, not for every message kept.
const REJECTED_A_PAGE: usize = if cfg!(test) { 50 } else { 10_000 };

/// Deletes rejected messages (named, or `all`), durably. With `all`, a page at a time, and the
/// answer names the first [`IDS_NAMED`] and counts them all (`dropped_count`).
fn drop_rejected(store: &Store, ids: &[String], all: bool) -> Result<Value, AdminError> {
    if all != ids.is_empty() {
        return Err(AdminError::Usage(
            "give rejected message ids or --all, not both or neither".into(),
        ));
    }
    let named = ids
        .iter()
        .map(|id| {
            Ok((
                id.clone(),
                RejectedId::parse(id).map_err(AdminError::Usage)?,
            ))
        })
        .collect::<Result<_, AdminError>>()?;
    let mut targets: Vec<(String, RejectedId)> = first_of_each(named, |(_, id)| *id);
    let (mut dropped, mut missing) = (Named::every(!all), Vec::new());
    let mut after = None;
    let so_far = "rejected message(s) were deleted";
    loop {
        if all {
            let page = store.rejected_ids(after, REJECTED_A_PAGE);
            let page = page.map_err(|e| after_some_done(e.into(), dropped.count, so_far))?;
            let Some(&last) = page.last() else {
                break;
            };
            after = Some(last);
            targets = page.into_iter().map(|id| (id.to_string(), id)).collect();
        }
        let deleted = (|| -> Result<(), AdminError> {
            let _section = store.write_section()?;
            for (text, id) in targets.drain(..) {
                match store.rejected_drop(id)? {
                    true => dropped.push(Value::String(text)),
                    // With `all`, another drop took it since the page was listed: gone, as
                    // asked.
                    false if all => {}
                    false => missing.push(text),
                }
            }
            Ok(store.flush()?)
        })();
        deleted.map_err(|e| after_some_done(e, dropped.count, so_far))?;
        if !all {
            break;
        }
    }
    Ok(json!({
        "dropped": dropped.ids,
        "dropped_count": dropped.count,
        "not_found": missing,
    }))
}

/// An export as `outbox list` and `show` give it; a dead letter also names the newer export of
/// its profile that the endpoint acknowledged, if one did (then it is never sent again).
fn export_view(store: &Store, export: &Export) -> Result<Value, AdminError> {
    let mut view = export.to_json();
    if export.dead {
        let by = store.superseded_by(export.id.seq)?;
        view["superseded_by"] = json!(by.map(|by| store.export_id(by).to_string()));
    } else {
        let wait = store.retry_wait(export.id.seq)?;
        view["retry_in_s"] = json!(wait.map(|wait| wait.as_secs_f64().ceil() as u64));
    }
    Ok(view)
}

/// Dead letters `--all-dead` puts back or drops under the lock at a time (fewer in tests, so
/// that they take several pages).
const DEAD_LETTERS_A_PAGE: usize = if cfg!(test) { 500 } else { 10_000 };

/// With `--all-dead`, at most this many ids of each kind are named in the answer, with the
/// count of all: a store may hold millions of dead letters, and the answer would hold each id
/// several times over (a list, a JSON value, a line) only for the command to count them.
const IDS_NAMED: usize = 1_000;

/// Ids a repair names in its answer, and how many there were.
#[derive(Default)]
struct Named {
    ids: Vec<Value>,
    count: usize,
    /// Every id is kept, not only the first [`IDS_NAMED`].
    all: bool,
}

impl Named {
    fn every(all: bool) -> Named {
        Named {
            all,
            ..Named::default()
        }
    }

    fn push(&mut self, id: Value) {
        self.count += 1;
        if self.all || self.ids.len() < IDS_NAMED {
            self.ids.push(id);
        }
    }
}

/// What one step of a repair did, under the lock.
struct Page {
    done: Vec<String>,
    missing: Vec<String>,
    /// With `--all-dead`, the last dead letter looked at, when the page was full: the next
    /// page starts after it.
    next_after: Option<u64>,
    /// What stopped the page partway, after `done` was done (and flushed).
    stopped: Option<AdminError>,
}

/// `error` with what a repair did before it (`done` of `what`, "export(s) were dropped"):
/// exports put back or dropped, and rejected messages deleted, are not undone.
fn after_some_done(error: AdminError, done: usize, what: &str) -> AdminError {
    if done == 0 {
        return error;
    }
    let said = |message: String| format!("{message}; {done} {what} before it");
    match error {
        AdminError::NotFound(m) => AdminError::NotFound(said(m)),
        AdminError::Usage(m) => AdminError::Usage(said(m)),
        AdminError::Failed(m) => AdminError::Failed(said(m)),
        AdminError::Refused(m) => AdminError::Refused(said(m)),
        AdminError::Unanswered(m) => AdminError::Unanswered(said(m)),
        AdminError::InDoubt(m) => AdminError::InDoubt(said(m)),
    }
}

/// `retry` puts dead letters back in the outbox (same id, so same Idempotency-Key; `max_age_s`
/// counts again from now, on the store's run-time clock), but not one a newer export of its
/// profile has overtaken at the endpoint; `drop` deletes exports, dead or pending.
fn repair(store: &Store, ids: &[String], all_dead: bool, retry: bool) -> Result<Value, AdminError> {
    if all_dead != ids.is_empty() {
        return Err(AdminError::Usage(
            "give export ids or --all-dead, not both or neither".into(),
        ));
    }
    // Each target with its sequence number; an id of another store is never found here.
    let parsed: Vec<(String, ExportId)> = ids
        .iter()
        .map(|text| Ok((text.clone(), text.parse().map_err(AdminError::Usage)?)))
        .collect::<Result<_, AdminError>>()?;
    let named: Vec<(String, Option<u64>)> = first_of_each(parsed, |(_, id)| *id)
        .into_iter()
        .map(|(text, id)| (text, (id.store == store.store_id()).then_some(id.seq)))
        .collect();
    let mut unreadable = Named::every(!all_dead);
    let mut already_pending = Vec::new();
    let mut superseded = Named::every(!all_dead);
    let mut maybe_overtaken = Named::every(!all_dead);
    // `after`: with `--all-dead`, the page of dead letters after this one.
    let mut apply = |after: Option<u64>| -> Result<Page, AdminError> {
        // Written and flushed on the same handles (a reopen waits for the section), and
        // flushed before the delivery loop, told of the change, reads the outbox again: a
        // drop not yet durable could otherwise let a newer export of its profile be sent and
        // acknowledged, and a crash then bring the dropped one back ahead of it.
        let _section = store.write_section()?;
        // Put back now, after the wait for requests in flight: a dead letter made meanwhile
        // then counts as put back after its last failure, and starts its backoff again.
        let now = Utc::now().timestamp_millis();
        let uptime_ms = store.run_clock().uptime_ms();
        // The dead letters as they are now, under the lock that keeps other repairs out: a
        // list made before it could name exports another repair has since put back.
        let (targets, next_after): (Vec<(String, Option<u64>)>, Option<u64>) = if all_dead {
            let seqs = store.dead_seqs(after, DEAD_LETTERS_A_PAGE)?;
            let next_after = seqs
                .last()
                .copied()
                .filter(|_| seqs.len() == DEAD_LETTERS_A_PAGE);
            let targets = seqs
                .into_iter()
                .map(|seq| (store.export_id(seq).to_string(), Some(seq)))
                .collect();
            (targets, next_after)
        } else {
            (named.clone(), None)
        };
        let mut done = Vec::new();
        let mut missing = Vec::new();
        let maybe_acknowledged = if retry {
            let seqs: Vec<u64> = targets.iter().filter_map(|(_, seq)| *seq).collect();
            store.maybe_acknowledged(&seqs)?
        } else {
            MaybeAcknowledged::default()
        };
        // What was done before an error is flushed all the same: it is in the store, and
        // flushed only later it would let the delivery loop, told of the change, run ahead
        // of it.
        let each = || -> Result<(), AdminError> {
            for (text, seq) in targets {
                let Some(seq) = seq else {
                    missing.push(text);
                    continue;
                };
                if retry {
                    match store.put_back_dead_letter(seq, now, uptime_ms, &maybe_acknowledged)? {
                        PutBack::Done => done.push(text),
                        PutBack::Superseded { by } => superseded.push(json!({
                            "id": text,
                            "acknowledged": store.export_id(by).to_string(),
                        })),
                        // `pending` names the newer export, also when it is a dead letter.
                        PutBack::MaybeOvertaken { by } => maybe_overtaken.push(json!({
                            "id": text,
                            "pending": store.export_id(by).to_string(),
                        })),
                        PutBack::Unreadable => unreadable.push(Value::String(text)),
                        // Retrying an export still pending changes nothing; it is there all the same.
                        PutBack::NotDead if store.export(store.export_id(seq))?.is_some() => {
                            already_pending.push(text)
                        }
                        PutBack::NotDead => missing.push(text),
                    }
                    continue;
                }
                // `--all-dead` drops dead letters only, whatever happened to them since.
                let dropped = store.drop_dead(seq)? || (!all_dead && store.drop_pending(seq)?);
                if dropped {
                    done.push(text)
                } else {
                    missing.push(text)
                }
            }
            Ok(())
        };
        let each = each();
        store.flush()?;
        Ok(Page {
            done,
            missing,
            next_after,
            stopped: each.err(),
        })
    };
    // With `--all-dead` a page at a time, each under the lock on its own: the delivery loop
    // waits for one page, not for every dead letter of a large store.
    let wait = store.put_back_wait();
    let (mut done, mut missing) = (Named::every(!all_dead), Vec::new());
    let mut after = None;
    let what = if retry { "put back" } else { "dropped" };
    loop {
        // Exports put back keep their (lower) sequence numbers, and dropped ones may sit in
        // the delivery loop's window: the loop must not start requests meanwhile, and reads
        // the outbox again from its head after. A pending export dropped is not out either:
        // should its request get no answer, the drop must know that the endpoint may have
        // taken it (a drop by id, whether an id is pending is known only under the lock).
        let page = if retry || !all_dead {
            let so_far = match done.count {
                0 => format!("nothing was {what}"),
                n => format!("{n} dead letter(s) were {what}, the rest not"),
            };
            store
                .rewinding_with_nothing_out(wait, || apply(after))
                .map_err(|why| {
                    AdminError::Failed(match why {
                        NotQuiet::StillOut => format!(
                            "{so_far}: exports were still being sent after {} s; try again",
                            wait.as_secs()
                        ),
                        NotQuiet::GaveUp => format!("{so_far}: delivery stopped with requests whose outcome was not recorded (the log says why); once the agent is started again, retry"),
                    })
                })?
        } else {
            store.rewinding(|| apply(after))
        };
        let so_far = format!("export(s) were {what}");
        let page = page.map_err(|e| after_some_done(e, done.count, &so_far))?;
        for id in page.done {
            done.push(Value::String(id));
        }
        missing.extend(page.missing);
        if let Some(stopped) = page.stopped {
            return Err(after_some_done(stopped, done.count, &so_far));
        }
        match page.next_after {
            Some(last) => after = Some(last),
            None => break,
        }
    }
    let verb = if retry { "retried" } else { "dropped" };
    Ok(json!({
        verb: done.ids,
        format!("{verb}_count"): done.count,
        "not_found": missing,
        "unreadable": unreadable.ids,
        "unreadable_count": unreadable.count,
        "already_pending": already_pending,
        "superseded": superseded.ids,
        "superseded_count": superseded.count,
        "maybe_overtaken": maybe_overtaken.ids,
        "maybe_overtaken_count": maybe_overtaken.count,
    }))
}

/// How deep `text`'s arrays and objects nest, outside its strings.
fn nesting_depth(text: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0);
    let (mut in_string, mut escaped) = (false, false);
    for &byte in text {
        match (in_string, byte) {
            (true, _) if escaped => escaped = false,
            (true, b'\\') => escaped = true,
            (true, b'"') | (false, b'"') => in_string = !in_string,
            (false, b'[' | b'{') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (false, b']' | b'}') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ListFilter, Place};

    /// `rejected drop --all` takes a page at a time (50 in tests), and counts every message it
    /// deleted.
    #[test]
    fn dropping_every_rejected_message_goes_page_by_page_and_counts_them_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let mapping = crate::config::Mapping::new(&["name"], &["s"], &[]);
        crate::store::source::commit_rejected(&store, &mapping, (3, 77), 1..=120);
        assert_eq!(store.rejected_ids(None, usize::MAX).unwrap().len(), 120);
        let answer = drop_rejected(&store, &[], true).unwrap();
        assert_eq!(answer["dropped_count"], 120);
        assert_eq!(answer["dropped"].as_array().unwrap().len(), 120);
        assert_eq!(answer["not_found"], json!([]));
        assert!(store.rejected_ids(None, usize::MAX).unwrap().is_empty());
        // Named ones: each once, the missing named.
        let again = drop_rejected(&store, &["3-1".into(), "3-1".into()], false).unwrap();
        assert_eq!(again["dropped_count"], 0);
        assert_eq!(again["not_found"], json!(["3-1"]));
    }

    /// A profile id is anything a producer sent: one not stored is named with its control
    /// characters escaped, since an error keeps its own line breaks on a terminal.
    #[test]
    fn a_profile_not_stored_is_named_with_its_line_breaks_escaped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let id = "a\nb".to_owned();
        let error = execute(&store, &AdminRequest::Profile { id }).unwrap_err();
        assert_eq!(
            error,
            AdminError::NotFound("no profile `a\\nb` is stored".into())
        );
    }

    #[test]
    fn each_kind_of_failure_reaches_the_command_as_that_kind() {
        for error in [
            AdminError::NotFound("no such export".into()),
            AdminError::Usage("bad request".into()),
            AdminError::Failed("store error".into()),
            AdminError::Refused("the file is stale".into()),
            AdminError::InDoubt("disk full".into()),
        ] {
            let line =
                serde_json::to_string(&AdminAnswer::from_result(Err(error.clone()))).unwrap();
            let read: AdminAnswer = serde_json::from_str(&line).unwrap();
            assert_eq!(read.into_result(), Err(error), "{line}");
        }
    }

    /// A repair stopped by an error after some exports were put back or dropped says how
    /// many, keeping the error's kind (and exit status); with none done, the error as it was.
    #[test]
    fn a_repair_stopped_partway_says_what_it_did_before() {
        let reopening = || AdminError::Failed("the store is being reopened".into());
        let dropped = "export(s) were dropped";
        assert_eq!(after_some_done(reopening(), 0, dropped), reopening());
        assert_eq!(
            after_some_done(reopening(), 20000, dropped),
            AdminError::Failed(
                "the store is being reopened; 20000 export(s) were dropped before it".into()
            )
        );
        let in_doubt = after_some_done(
            AdminError::InDoubt("flush failed".into()),
            3,
            "export(s) were put back",
        );
        assert_eq!(
            in_doubt,
            AdminError::InDoubt("flush failed; 3 export(s) were put back before it".into())
        );
    }

    #[test]
    fn nesting_is_counted_outside_strings() {
        let cases = [
            ("1", 0),
            ("[]", 1),
            (r#"{"a":[1,{"b":[]}]}"#, 4),
            (r#"[[],[[]],[]]"#, 3),
            (r#"["[[[{{{"]"#, 1),
            (r#"{"a\"[[":"\\",  "b":[[]]}"#, 3),
            ("]]][", 1),
        ];
        for (text, depth) in cases {
            assert_eq!(nesting_depth(text.as_bytes()), depth, "{text}");
        }
    }

    /// An ingest request carries an update as deep as ingest reads it, though it nests it
    /// two levels deeper; one nested past that is refused as serde_json refuses it.
    #[test]
    fn an_ingest_request_carries_the_deepest_update_ingest_takes() {
        let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let deepest = (1..)
            .take_while(|&depth| serde_json::from_str::<Value>(&nested(depth)).is_ok())
            .last()
            .unwrap();
        let update = |depth: usize| {
            let text = format!(r#"{{"id":"a","profile":{{"x":{}}}}}"#, nested(depth - 2));
            serde_json::from_str::<Value>(&text).map(|update| AdminRequest::Ingest {
                updates: vec![update],
                first: None,
            })
        };
        let request = update(deepest).unwrap();
        let line = serde_json::to_string(&request).unwrap();
        let read: AdminRequest = read_line(line.as_bytes(), MAX_REQUEST_DEPTH).unwrap();
        assert_eq!(read, request);
        let error = serde_json::from_str::<AdminRequest>(&line).unwrap_err();
        assert!(error.to_string().contains("recursion limit"), "{error}");
        assert!(update(deepest + 1).is_err());
        let extra = MAX_REQUEST_DEPTH + 1 - nesting_depth(line.as_bytes());
        let beyond = line
            .replacen("\"x\":", &format!("\"x\":{}", "[".repeat(extra)), 1)
            .replacen("]}", &format!("]{}}}", "]".repeat(extra)), 1);
        assert_eq!(nesting_depth(beyond.as_bytes()), MAX_REQUEST_DEPTH + 1);
        let error = read_line::<AdminRequest>(beyond.as_bytes(), MAX_REQUEST_DEPTH).unwrap_err();
        assert!(error.to_string().contains("recursion limit"), "{error}");
        // An answer showing such a profile nests it a few levels deeper still.
        let answer = |depth: usize| read_line::<Value>(nested(depth).as_bytes(), MAX_ANSWER_DEPTH);
        assert!(answer(MAX_ANSWER_DEPTH).is_ok());
        assert!(answer(MAX_ANSWER_DEPTH + 1).is_err());
    }

    #[test]
    fn a_request_an_older_agent_does_not_know_is_a_failure_that_says_so() {
        let line = serde_json::to_string(&AdminRequest::Stats)
            .unwrap()
            .replace("stats", "a_request_from_a_later_build");
        let error = serde_json::from_str::<AdminRequest>(&line).unwrap_err();
        let answer = AdminAnswer::from_result(Err(unreadable_request(&error)));
        match answer.into_result() {
            Err(AdminError::Failed(message)) => {
                assert!(message.contains("older build"), "{message}");
                assert!(
                    message.contains("a_request_from_a_later_build"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        let error = serde_json::from_str::<AdminRequest>("{\"op\":").unwrap_err();
        let malformed = AdminAnswer::from_result(Err(unreadable_request(&error)));
        assert!(matches!(malformed.into_result(), Err(AdminError::Usage(_))));
    }

    /// A store holding `n` dead letters, one a profile.
    fn dead_letters(dir: &std::path::Path, n: usize) -> Store {
        let store = Store::open(dir, 8 << 20).unwrap();
        let mapping = crate::config::Mapping::new(&["name"], &["s"], &[]);
        let body: String = (0..n)
            .map(|i| {
                format!(
                    r#"{{"id":"p{i}","profile":{{"segmentMembership":{{"ups":{{"s":{{"status":"realized"}}}}}}}}}}"#
                ) + "\n"
            })
            .collect();
        let updates = crate::profile::update::parse_body(body.as_bytes()).unwrap();
        store
            .apply_each(&[&updates], &mapping, Utc::now(), &[])
            .unwrap();
        assert_eq!(store.tally().unwrap().pending, n as u64);
        for export in store.list(&ListFilter::default()).unwrap() {
            assert!(store
                .change_export(export.id.seq, Place::Pending, |r| (Place::Dead, r))
                .unwrap());
        }
        store.flush().unwrap();
        store
    }

    #[test]
    fn an_export_named_twice_is_dropped_once_and_not_reported_missing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let seqs = crate::store::testing::export_each(&store, &[("a", "1"), ("b", "1")]);
        let first = store.export_id(seqs[0]).to_string();
        let second = store.export_id(seqs[1]).to_string();
        let answer = execute(
            &store,
            &AdminRequest::Drop {
                ids: vec![first.clone(), second.clone(), first.clone()],
                all_dead: false,
            },
        )
        .unwrap();
        assert_eq!(answer["dropped"], json!([first, second]), "{answer}");
        assert_eq!(answer["not_found"], json!([]), "{answer}");
    }

    /// `drop --all-dead` drops every dead letter, over more than one page and a last one
    /// short (the pages themselves are not seen from outside; this holds the loop to all),
    /// and names no more than [`IDS_NAMED`] of them.
    #[test]
    fn every_dead_letter_is_dropped_over_several_pages() {
        let dir = tempfile::tempdir().unwrap();
        let store = dead_letters(dir.path(), 2 * DEAD_LETTERS_A_PAGE + 34);
        let answer = execute(
            &store,
            &AdminRequest::Drop {
                ids: vec![],
                all_dead: true,
            },
        )
        .unwrap();
        // Counted, the first of them named.
        assert_eq!(answer["dropped_count"], 2 * DEAD_LETTERS_A_PAGE + 34);
        let dropped = answer["dropped"].as_array().unwrap();
        assert_eq!(dropped.len(), IDS_NAMED.min(2 * DEAD_LETTERS_A_PAGE + 34));
        let distinct: std::collections::HashSet<_> = dropped.iter().collect();
        assert_eq!(distinct.len(), dropped.len());
        assert_eq!(store.tally().unwrap().dead, 0);
        assert!(store.dead_seqs(None, usize::MAX).unwrap().is_empty());
    }

    /// `retry --all-dead` goes over every dead letter once, over several pages: those whose
    /// profile a newer export has superseded at the endpoint stay where they are, more than a
    /// page of them, and the pages go on past them to the ones that can go back.
    #[test]
    fn retry_of_all_dead_letters_goes_past_those_that_stay() {
        use crate::store::outbox::{ExportChange, Outcome};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8 << 20).unwrap();
        let (stay, go) = (DEAD_LETTERS_A_PAGE + 10, DEAD_LETTERS_A_PAGE + 20);
        // One export for each of `count` profiles `{prefix}{i}`: the profiles, the exports.
        let exports = |prefix: &str, count: usize, value: &str| {
            let profiles: Vec<String> = (0..count).map(|i| format!("{prefix}{i}")).collect();
            let updates: Vec<(&str, &str)> = profiles.iter().map(|p| (p.as_str(), value)).collect();
            let seqs = crate::store::testing::export_each(&store, &updates);
            (profiles, seqs)
        };
        let settle = |(profiles, seqs): &(Vec<String>, Vec<u64>), change: &ExportChange| {
            let outcomes: Vec<Outcome> = profiles
                .iter()
                .zip(seqs)
                .map(|(profile, seq)| Outcome {
                    profile: profile.as_str().into(),
                    seq: *seq,
                    change: change.clone(),
                })
                .collect();
            store.apply_export_changes(&outcomes).unwrap();
        };
        let (older, newer, alone) = (
            exports("a", stay, "1"),
            exports("a", stay, "2"),
            exports("b", go, "1"),
        );
        let refused = ExportChange::Rejected {
            error: "HTTP 400".into(),
            at_ms: 1,
        };
        settle(&older, &refused);
        settle(&alone, &refused);
        settle(&newer, &ExportChange::Delivered { retried: false });
        store.flush().unwrap();

        let answer = execute(
            &store,
            &AdminRequest::Retry {
                ids: vec![],
                all_dead: true,
            },
        )
        .unwrap();
        let ids = |seqs: &[u64]| -> Vec<String> {
            seqs.iter()
                .map(|s| store.export_id(*s).to_string())
                .collect()
        };
        assert_eq!(answer["retried"], json!(ids(&alone.1)));
        let superseded: Vec<&str> = answer["superseded"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap())
            .collect();
        assert_eq!(superseded, ids(&older.1));
        let tally = store.tally().unwrap();
        assert_eq!((tally.pending, tally.dead), (go as u64, stay as u64));
    }

    /// `retry --all-dead` and `drop --all-dead` at once: each export is either put back or
    /// dropped, and nothing put back is dropped. A list of dead letters made before the
    /// other repair ran named exports it had since put back, which the drop then deleted.
    #[test]
    fn retry_and_drop_of_all_dead_letters_at_once_lose_nothing_put_back() {
        const N: usize = 2_000;
        for round in 0..4 {
            let dir = tempfile::tempdir().unwrap();
            let store = dead_letters(dir.path(), N);
            let (retried, dropped) = std::thread::scope(|s| {
                let repair = |request: AdminRequest, verb: &'static str| {
                    let store = &store;
                    s.spawn(move || {
                        execute(store, &request).unwrap()[format!("{verb}_count")]
                            .as_u64()
                            .unwrap() as usize
                    })
                };
                let retry = repair(
                    AdminRequest::Retry {
                        ids: vec![],
                        all_dead: true,
                    },
                    "retried",
                );
                let drop = repair(
                    AdminRequest::Drop {
                        ids: vec![],
                        all_dead: true,
                    },
                    "dropped",
                );
                (retry.join().unwrap(), drop.join().unwrap())
            });
            let tally = store.tally().unwrap();
            assert_eq!(retried + dropped, N, "round {round}");
            assert_eq!(tally.pending, retried as u64, "round {round}");
            assert_eq!(tally.dead, 0, "round {round}");
        }
    }
}
