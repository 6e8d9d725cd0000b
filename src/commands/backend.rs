//! Where the CLI's requests go: the running agent's admin socket, or the store itself.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;

use super::CliError;
use crate::admin::{execute, AdminAnswer, AdminError, AdminRequest};
use crate::config::Config;
use crate::profile::Update;
use crate::store::{put_back_wait, says_reopening, BatchSummary, Store, StoreError};

/// How long the CLI waits for the agent's answer.
pub(super) const AGENT_TIMEOUT: Duration = Duration::from_secs(120);
/// The most JSON of updates one ingest request to the agent holds (one update alone may take
/// more, up to what the agent reads).
const AGENT_REQUEST_BUDGET: usize = 64 << 20;
/// What an ingest request holds besides its updates' JSON, with room to spare.
const REQUEST_FRAME: usize = 1024;
/// The most JSON one update sent to the agent alone may take.
const MOST_ONE_UPDATE_SENT: usize = crate::server::admin::MAX_REQUEST_BYTES - REQUEST_FRAME;

/// `updates` in runs whose JSON stays within `budget` bytes (an update past it goes alone);
/// refused when one alone takes more than `most`.
fn requests_within(
    updates: &[Update],
    budget: usize,
    most: usize,
) -> Result<Vec<&[Update]>, CliError> {
    let mut requests = Vec::new();
    let (mut from, mut bytes) = (0, 0usize);
    for (i, update) in updates.iter().enumerate() {
        let size = update.json_len();
        if size > most {
            return Err(CliError::Failure(too_large_for_the_agent(
                update, size, most,
            )));
        }
        if i > from && bytes + size > budget {
            requests.push(&updates[from..i]);
            (from, bytes) = (i, 0);
        }
        bytes += size + 1;
    }
    if from < updates.len() {
        requests.push(&updates[from..]);
    }
    Ok(requests)
}

/// Why `update`, whose JSON takes `size` bytes, cannot go to the running agent, which takes
/// at most `most` of one update.
pub(super) fn too_large_for_the_agent(update: &Update, size: usize, most: usize) -> String {
    format!(
        "update `{}` takes {} MiB as JSON, more than the running agent reads in one request ({} \
         MiB); stop the agent and run the command again, which then stores it itself",
        crate::explain::cut_to(update.id.clone(), 100),
        size >> 20,
        (most + REQUEST_FRAME) >> 20
    )
}

/// How long the CLI waits for a store held by a process whose agent does not answer, unless
/// `OUTPOST_STORE_WAIT_S` says otherwise.
const LOCKED_WAIT: Duration = Duration::from_secs(30);

/// How long a request is made again while a running agent's store is being reopened, and how
/// often. A store reopened after an I/O error that lasts (a full disk) still says so then.
const REOPENING_WAIT: Duration = Duration::from_secs(30);
const REOPENING_LOOK_EVERY: Duration = Duration::from_millis(200);

fn locked_wait() -> Result<Duration, CliError> {
    match std::env::var("OUTPOST_STORE_WAIT_S") {
        Err(_) => Ok(LOCKED_WAIT),
        Ok(text) => text.trim().parse().map(Duration::from_secs).map_err(|_| {
            CliError::Usage(format!(
                "OUTPOST_STORE_WAIT_S must be a whole number of seconds, not `{}`",
                text.chars().take(20).collect::<String>()
            ))
        }),
    }
}

/// Where the CLI's requests go.
pub enum Backend {
    /// The running agent's admin socket, and the agent's request timeout, which bounds how
    /// long a retry waits before it puts back.
    Agent {
        socket: PathBuf,
        request_timeout: Duration,
    },
    /// The store on disk, opened by this process.
    Local(Box<Store>),
}

impl Backend {
    /// The agent if one answers on the store's socket, else the store itself. A store held
    /// by another process with no agent answering is waited for up to [`locked_wait`]: an
    /// agent holds its store before its socket answers while it starts (longer when it
    /// upgrades or rebuilds the store), and after its socket is gone while it stops.
    pub fn connect(config: &Config) -> Result<Backend, CliError> {
        Backend::connect_opening(config, Store::open)
    }

    /// [`Backend::connect`], opening the store with `open` when no agent has it.
    pub fn connect_opening(
        config: &Config,
        open: fn(&std::path::Path, u64) -> Result<Store, StoreError>,
    ) -> Result<Backend, CliError> {
        let socket = crate::server::admin::socket_path(&config.storage.path);
        let wait = locked_wait()?;
        // None: a wait too long to count is no limit.
        let deadline = std::time::Instant::now().checked_add(wait);
        let mut said = false;
        loop {
            if Backend::agent_answers(config)? {
                return Ok(Backend::Agent {
                    socket,
                    request_timeout: config.delivery.request_timeout,
                });
            }
            match open(&config.storage.path, config.storage.cache_bytes) {
                Ok(store) => return Ok(Backend::Local(Box::new(store))),
                Err(StoreError::Locked(path))
                    if deadline.is_none_or(|d| std::time::Instant::now() < d) =>
                {
                    if !said {
                        said = true;
                        eprintln!(
                            "the store at {} is in use by another process; waiting up to {} s for an agent to answer on {} or the store to be free",
                            path.display(),
                            wait.as_secs(),
                            socket.display()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(StoreError::Locked(path)) => {
                    return Err(CliError::Failure(format!(
                        "the store at {} is in use by another process, and no agent answered on {} within {} s",
                        path.display(),
                        socket.display(),
                        wait.as_secs()
                    )))
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// [`Backend::connect`] for commands that read or repair what is stored: a store that
    /// does not exist is an error rather than made empty, so that a mistyped `storage.path`
    /// is not taken for an empty outbox. (A running agent has made its store.)
    pub fn connect_existing(config: &Config) -> Result<Backend, CliError> {
        Backend::connect_existing_opening(config, Store::open)
    }

    /// [`Backend::connect_existing`], opening the store with `open` when no agent has it.
    pub fn connect_existing_opening(
        config: &Config,
        open: fn(&std::path::Path, u64) -> Result<Store, StoreError>,
    ) -> Result<Backend, CliError> {
        let path = &config.storage.path;
        if !Store::exists_at(path)? {
            return Err(CliError::Usage(
                StoreError::Missing(path.clone()).to_string(),
            ));
        }
        Backend::connect_opening(config, open)
    }

    /// Whether a running agent answers on the store's admin socket. A socket this user may
    /// not open is an error that says so: an agent of another user runs there, and the store
    /// is not this process's to open meanwhile.
    pub fn agent_answers(config: &Config) -> Result<bool, CliError> {
        use crate::server::admin::{probe_socket, socket_path, SocketProbe};
        match probe_socket(&config.storage.path) {
            SocketProbe::Answers => Ok(true),
            SocketProbe::NotThisUsers => Err(CliError::Failure(format!(
                "the agent's admin socket {} is not open to this user (permission denied): \
                 run the command as the user the agent runs as",
                socket_path(&config.storage.path).display()
            ))),
            SocketProbe::Nothing => Ok(false),
        }
    }

    pub fn execute(&self, request: &AdminRequest) -> Result<Value, AdminError> {
        match self {
            Backend::Local(store) => execute(store, request),
            Backend::Agent {
                socket,
                request_timeout,
            } => call_agent_while_reopening(
                socket,
                request,
                answer_within(request, *request_timeout),
            ),
        }
    }

    /// Before the first chunk of an ingest into the store itself: records the mapping the
    /// store now runs with and runs a queued backfill (see [`run_backfill`]). Once a command
    /// is enough: nothing delivers meanwhile, so a backfill that waits for deliveries waits
    /// for the whole command. The mapping, with its segments' times, for every chunk (`None`
    /// for an agent, which did all this as it started).
    pub(super) fn prepare_ingest(
        &self,
        config: &Config,
    ) -> Result<Option<crate::config::Mapping>, CliError> {
        let Backend::Local(store) = self else {
            return Ok(None);
        };
        // A store whose space kept for delivery was given up on a full disk takes no update
        // here either (`store::reserve`); that space is made, or made again, where there is room.
        store.keep_reserve(config.storage.reserve_bytes)?;
        if let Some(refused) = store.refusing_updates() {
            return Err(refused.into());
        }
        store.number_exports_past_the_clock(std::time::SystemTime::now())?;
        let mut mapping = config.mapping.clone();
        store.record_mapping(&mut mapping, Utc::now().timestamp_millis())?;
        run_backfill(store, &mapping, config.storage.max_outbox_bytes)?;
        Ok(Some(mapping))
    }

    /// The most JSON one update may take to go where this backend sends it: `None` for the
    /// store itself, which takes any.
    pub(super) fn most_one_update_takes(&self) -> Option<usize> {
        match self {
            Backend::Local(_) => None,
            Backend::Agent { .. } => Some(MOST_ONE_UPDATE_SENT),
        }
    }

    /// `updates` cut into the requests they go in: the whole chunk to the store itself; to the
    /// agent, runs whose JSON stays within [`AGENT_REQUEST_BUDGET`] (an update past it goes
    /// alone), so that no request is longer than the agent reads, whatever the input's shape.
    pub(super) fn requests_of<'u>(
        &self,
        updates: &'u [Update],
    ) -> Result<Vec<&'u [Update]>, CliError> {
        match self {
            Backend::Local(_) => Ok(vec![updates]),
            Backend::Agent { .. } => {
                requests_within(updates, AGENT_REQUEST_BUDGET, MOST_ONE_UPDATE_SENT)
            }
        }
    }

    /// Commits one chunk of validated, pruned updates, durably; `mapping` from
    /// [`Backend::prepare_ingest`]; `first`: the number of the first of them in the input.
    pub(super) fn ingest(
        &self,
        config: &Config,
        mapping: Option<&crate::config::Mapping>,
        (updates, first): (&[Update], u64),
    ) -> Result<BatchSummary, CliError> {
        match self {
            Backend::Local(store) => {
                let mapping = mapping.expect("prepared for the store itself");
                if let Some(full) = store.outbox_full(config.storage.max_outbox_bytes)? {
                    let under_way = store.backfill_progress()?.map_or_else(String::new, |p| {
                        format!(
                            " (a backfill of newly mapped segments is under way: {} of about {} profiles scanned, {} exported)",
                            p.scanned, p.profiles, p.exported
                        )
                    });
                    return Err(CliError::Failure(format!("{full}{under_way}")));
                }
                let started = std::time::Instant::now();
                let summaries = store
                    .apply_groups(&[updates], mapping, Utc::now())
                    .map_err(maybe_written)?;
                let decided = started.elapsed();
                store.flush().map_err(maybe_written)?;
                tracing::debug!(
                    updates = updates.len(),
                    apply_us = decided.as_micros() as u64,
                    flush_us = (started.elapsed() - decided).as_micros() as u64,
                    "committed a chunk"
                );
                Ok(summaries[0])
            }
            Backend::Agent { socket, .. } => {
                let request = AdminRequest::Ingest {
                    updates: updates.iter().map(Update::to_value).collect(),
                    first: Some(first),
                };
                let report = call_agent_while_reopening(socket, &request, Some(AGENT_TIMEOUT))?;
                // The agent took the chunk; what it says of it cannot be read.
                BatchSummary::from_report(&report).ok_or_else(|| {
                    CliError::InDoubt(format!("unexpected answer from the agent: {report}"))
                })
            }
        }
    }
}

/// An error from writing a chunk, or from flushing it: on an I/O error, sled may have put the
/// chunk (or part of it) on the disk all the same.
fn maybe_written(e: StoreError) -> CliError {
    match e {
        StoreError::NoSpace(_) | StoreError::Io { .. } => CliError::InDoubt(e.to_string()),
        e => CliError::Store(e),
    }
}

/// Runs a queued backfill before the updates are applied, so that they are judged after it
/// (as the agent's committer would order them), until it ends or the outbox holds the
/// backfill's share of `max_outbox_bytes`, as the agent's does; what it did is kept, and
/// the rest waits for the next run.
fn run_backfill(
    store: &Store,
    mapping: &crate::config::Mapping,
    max_outbox_bytes: u64,
) -> Result<(), CliError> {
    loop {
        if crate::store::backfill::waits_for_deliveries(store.tally()?, max_outbox_bytes) {
            if let Some(p) = store.backfill_progress()? {
                tracing::warn!(
                    scanned = p.scanned,
                    profiles = p.profiles,
                    exported = p.exported,
                    "the backfill of newly mapped segments waits for deliveries (pending exports take half the outbox's room); it goes on at the next run or with the agent"
                );
            }
            return Ok(());
        }
        let Some(progress) =
            store.backfill_step(mapping, crate::store::backfill::STEP_PROFILES, Utc::now())?
        else {
            break;
        };
        store.flush()?;
        if progress.done {
            tracing::info!(
                segments = ?progress.segments,
                scanned = progress.scanned,
                exported = progress.exported,
                "backfill done"
            );
        }
    }
    Ok(())
}

/// How long the agent may take to answer `request`. A compaction takes as long as the store
/// is large, and so do reading every record for the unreadable ones (`check --store`) and
/// acting on them (`repair`), and a repair of every dead letter (a page at a time, a retry's
/// each waiting for the requests in flight); the agent answers when it is done. A retry, and
/// a drop, by id first wait for the requests in flight (see [`put_back_wait`]).
fn answer_within(request: &AdminRequest, request_timeout: Duration) -> Option<Duration> {
    match request {
        AdminRequest::Compact
        | AdminRequest::Unreadable
        | AdminRequest::RepairUnreadable
        | AdminRequest::HandOver { .. }
        | AdminRequest::TakeOver { .. }
        | AdminRequest::CheckTakeOver { .. }
        | AdminRequest::Retry { all_dead: true, .. }
        | AdminRequest::Drop { all_dead: true, .. } => None,
        AdminRequest::Retry { .. } | AdminRequest::Drop { .. } => {
            Some(put_back_wait(request_timeout) + 2 * AGENT_TIMEOUT)
        }
        _ => Some(AGENT_TIMEOUT),
    }
}

/// The most an answer to `request` is read of. Statistics and `outpost top`'s snapshots have
/// a size of their own, whatever the store holds: one that goes on is not the agent's (a
/// command run as root may call a socket in a folder another user owns). Lists, profiles
/// and repairs answer with what the store holds (a page of large exports, every dead letter
/// dropped), and are read whole.
fn answer_limit(request: &AdminRequest) -> u64 {
    match request {
        AdminRequest::Stats | AdminRequest::Snapshot => 16 << 20,
        _ => u64::MAX,
    }
}

/// Sends `request` to the agent and waits `timeout` for its answer (`None`: for ever).
/// [`call_agent`], made again while the agent's store is being reopened. A running agent's
/// store is reopened by a compaction (for under a second) or after an I/O error; it refuses
/// every request meanwhile before changing anything (a chunk of `outpost ingest` too), so the
/// request is made again, as while an agent starts or stops.
fn call_agent_while_reopening(
    socket: &Path,
    request: &AdminRequest,
    timeout: Option<Duration>,
) -> Result<Value, AdminError> {
    let deadline = std::time::Instant::now() + REOPENING_WAIT;
    loop {
        match call_agent(socket, request, timeout) {
            Err(AdminError::Failed(message))
                if says_reopening(&message) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(REOPENING_LOOK_EVERY);
            }
            answer => return answer,
        }
    }
}

pub(super) fn call_agent(
    socket: &Path,
    request: &AdminRequest,
    timeout: Option<Duration>,
) -> Result<Value, AdminError> {
    let failed =
        |e: std::io::Error| AdminError::Failed(format!("agent at {}: {e}", socket.display()));
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        // The socket was there when the command chose to ask the agent: it stopped since.
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            AdminError::Failed(format!(
                "agent at {}: {e}: the agent stopped (it answers again once started)",
                socket.display()
            ))
        }
        _ => failed(e),
    })?;
    stream.set_read_timeout(timeout).map_err(failed)?;
    let mut line = serde_json::to_string(request).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(failed)?;
    stream.shutdown(std::net::Shutdown::Write).map_err(failed)?;
    // From here on, what was asked may have been done, or not.
    let limit = answer_limit(request);
    let mut answer = Vec::new();
    BufReader::new(stream.take(limit))
        .read_until(b'\n', &mut answer)
        .map_err(|e| {
        let why = match (e.kind(), timeout) {
            (std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut, Some(timeout)) => {
                format!("no answer within {} s", timeout.as_secs())
            }
            _ => e.to_string(),
        };
        AdminError::Unanswered(format!(
            "agent at {}: {why}; what was asked may have been done, or not (`outbox stats` tells what is stored)",
            socket.display()
        ))
    })?;
    if answer.is_empty() {
        return Err(AdminError::Unanswered(format!(
            "agent at {}: the connection closed without an answer (did the agent stop?); `outbox stats` tells what is stored",
            socket.display()
        )));
    }
    if answer.len() as u64 == limit && !answer.ends_with(b"\n") {
        return Err(AdminError::Unanswered(format!(
            "agent at {}: the answer goes on past {limit} bytes, more than an agent sends for this; is something else listening there?",
            socket.display()
        )));
    }
    let answer: AdminAnswer = crate::admin::read_line(&answer, crate::admin::MAX_ANSWER_DEPTH)
        .map_err(|e| {
            AdminError::Unanswered(format!(
                "agent at {}: unreadable answer: {e}",
                socket.display()
            ))
        })?;
    answer.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What reads or rewrites the whole store gets all the time it takes, however large the
    /// store and slow its disk; the rest is answered within a bound.
    #[test]
    fn requests_that_walk_the_whole_store_wait_for_their_answer() {
        let timeout = Duration::from_secs(10);
        for request in [
            AdminRequest::Compact,
            AdminRequest::Unreadable,
            AdminRequest::RepairUnreadable,
            AdminRequest::Retry {
                ids: vec![],
                all_dead: true,
            },
        ] {
            assert_eq!(answer_within(&request, timeout), None, "{request:?}");
        }
        assert_eq!(
            answer_within(&AdminRequest::Stats, timeout),
            Some(AGENT_TIMEOUT)
        );
        assert!(answer_within(
            &AdminRequest::Drop {
                ids: vec!["00000001-1".into()],
                all_dead: false
            },
            timeout
        )
        .is_some());
    }

    /// A request the agent refuses while its store is reopened (a chunk of `outpost ingest`
    /// as much as a question) was done nowhere: it is made again until the store is open.
    #[test]
    fn a_request_refused_while_the_store_reopens_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("outpost.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let reopening = AdminAnswer::from_result(Err(AdminError::Failed(
            StoreError::Reopening(dir.path().join("store")).to_string(),
        )));
        let stored = AdminAnswer::from_result(Ok(BatchSummary {
            accepted: 1,
            ..BatchSummary::default()
        }
        .report()));
        let agent = std::thread::spawn(move || {
            let mut asked = Vec::new();
            for answer in [&reopening, &reopening, &stored] {
                let (stream, _) = listener.accept().unwrap();
                let mut request = String::new();
                BufReader::new(&stream).read_line(&mut request).unwrap();
                asked.push(request);
                let line = serde_json::to_string(answer).unwrap() + "\n";
                (&stream).write_all(line.as_bytes()).unwrap();
            }
            asked
        });
        let request = AdminRequest::Ingest {
            updates: vec![serde_json::json!({"id": "a", "profile": {}})],
            first: Some(1),
        };
        let answer = call_agent_while_reopening(&socket, &request, Some(AGENT_TIMEOUT)).unwrap();
        assert_eq!(BatchSummary::from_report(&answer).unwrap().accepted, 1);
        let asked = agent.join().unwrap();
        assert_eq!(asked.len(), 3);
        assert!(asked.iter().all(|r| r == &asked[0]), "{asked:?}");
    }

    /// An agent that stopped between two requests, its socket gone or left behind by a kill,
    /// is said to have stopped, not only named by the system's error.
    #[test]
    fn an_agent_gone_between_requests_is_said_to_have_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("outpost.sock");
        let gone = call_agent(&socket, &AdminRequest::Stats, Some(AGENT_TIMEOUT)).unwrap_err();
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        let left_behind =
            call_agent(&socket, &AdminRequest::Stats, Some(AGENT_TIMEOUT)).unwrap_err();
        for error in [gone, left_behind] {
            let text = error.to_string();
            assert!(
                text.contains(&socket.display().to_string())
                    && text.contains("the agent stopped (it answers again once started)"),
                "{text}"
            );
        }
    }

    #[test]
    fn updates_go_to_the_agent_in_requests_it_reads_whole() {
        let update = |id: &str, bytes: usize| Update {
            id: id.into(),
            op: crate::profile::Op::Upsert,
            profile: [("n".to_owned(), Value::String("x".repeat(bytes)))]
                .into_iter()
                .collect(),
            timestamp: None,
            record: None,
            patch_text: None,
        };
        let ids = |requests: Vec<&[Update]>| -> Vec<Vec<String>> {
            requests
                .iter()
                .map(|r| r.iter().map(|u| u.id.clone()).collect())
                .collect()
        };
        // Each update of 300 bytes of text takes about 350 as JSON: two fit in 1,000.
        let updates = vec![
            update("a", 300),
            update("b", 300),
            update("c", 300),
            update("d", 10),
            update("e", 1_500),
            update("f", 10),
        ];
        let requests = requests_within(&updates, 1_000, 5_000).unwrap();
        assert_eq!(
            ids(requests),
            [vec!["a", "b"], vec!["c", "d"], vec!["e"], vec!["f"]]
        );
        let whole = requests_within(&updates, usize::MAX, usize::MAX).unwrap();
        assert_eq!(whole.len(), 1);

        // More than the agent reads at all: refused before anything is sent.
        let error = requests_within(&updates, 1_000, 1_000)
            .unwrap_err()
            .to_string();
        assert!(error.contains("update `e` takes 0 MiB as JSON"), "{error}");
    }
}
