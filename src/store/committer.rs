//! The single writer. Requests queue here; the committer thread takes every request waiting,
//! applies them all in one transaction, flushes once, then answers each in arrival order
//! (group commit). One writer means no transaction conflicts and commit order = ack order.
//! Backfill steps (`store::backfill`) queue here too and run between groups.

use std::sync::Arc;

use chrono::Utc;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::backfill::{BackfillProgress, STEP_PROFILES};
use super::source::SourcePosition;
use super::{BatchSummary, Store, StoreError};
use crate::config::Mapping;
use crate::profile::engine;
use crate::profile::layout::Layout;
use crate::profile::prune::KeepTree;
use crate::profile::update::{BodyItem, FutureLimit, LocatedBody, Parsing};
use crate::profile::{Op, Update};
use crate::source::partition::{id_hash, Ownership};

/// At most this many updates go into one transaction; more waiting requests go into the next.
/// A request larger than this goes whole: only a stream batch can be (`fetch_batch` above
/// this), since [`Committer::commit_located`] queues a request [`REQUEST_CHUNK`] updates at a
/// time. What a group parses into and writes is held until it is flushed: 34 requests of 500
/// updates at once took the agent's peak RSS to 111-116 MB with this at 4,000, 126-205 MB at
/// 20,000, in the same time (README "Memory and the size of an HTTP request"); a flush per
/// 4,000 updates costs little.
const MAX_GROUP_UPDATES: usize = 4_000;

/// A request of more updates than this is committed this many at a time, each chunk in a
/// transaction of its own, durable before the next is queued: what a transaction's updates
/// parse into and write is held until it is flushed. One HTTP request of 17,953 ~1 KB updates
/// (15 MiB) took the agent's peak RSS to 260 MB committed whole, 78 MB in chunks of 1,000
/// (README "Memory and the size of an HTTP request").
pub const REQUEST_CHUNK: usize = 1_000;

/// How [`CommitError::InDoubt`] begins.
pub const IN_DOUBT: &str = "may have been stored or not";

#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    #[error("{0}")]
    Store(String),
    /// The disk is full, or the store is being reopened after an I/O error: nothing of the
    /// request was acknowledged, and the same request can be sent again later.
    #[error("{0}")]
    Unavailable(String),
    /// The group was written, or its transaction failed on an I/O error, and it was not
    /// flushed (the store is then failed and reopened): sled may have put it on the disk all
    /// the same, or part of it, so it may be stored or not.
    #[error("{IN_DOUBT}: {0}")]
    InDoubt(String),
    /// This request alone was refused: it updates a profile whose stored version cannot be
    /// read. Nothing of it was stored.
    #[error("{0}")]
    Refused(String),
    /// This request alone was refused: it updates a profile of a partition another agent
    /// holds: one this store handed over, or is handing over, or one this agent does not own
    /// ([`Ownership`]). Nothing of it was stored; sent again here, it is refused again.
    #[error("{0}")]
    Elsewhere(String),
    #[error("the committer has stopped")]
    Stopped,
}

/// A request committed in chunks that stopped at `error`: the chunks before were stored.
#[derive(Debug)]
pub struct PartlyCommitted {
    /// What the stored chunks did: the first `stored.accepted` updates were stored.
    pub stored: BatchSummary,
    /// How many updates after those may have been stored too: the chunk whose write or flush
    /// failed (`error` is [`CommitError::InDoubt`]); none otherwise.
    pub in_doubt: u64,
    pub error: CommitError,
}

impl PartlyCommitted {
    fn nothing_stored(error: CommitError) -> Self {
        PartlyCommitted {
            stored: BatchSummary::default(),
            in_doubt: 0,
            error,
        }
    }

    /// Whether, of a request of `count` updates, some were stored, or may have been, and
    /// others not: not when nothing was, nor when all of them may have been (a request
    /// committed in one chunk whose flush failed).
    pub fn stored_in_part(&self, count: u64) -> bool {
        self.stored.accepted > 0 || (self.in_doubt > 0 && self.in_doubt < count)
    }
}

/// Says which part of an input of `count` updates was stored when storing it stopped: the
/// first `stored`, and the `in_doubt` after them may have been.
pub fn what_was_stored(stored: u64, in_doubt: u64, count: u64) -> String {
    let rest = count.saturating_sub(stored + in_doubt);
    match (stored, in_doubt, rest) {
        (0, 0, _) => "nothing of the input was stored".to_string(),
        (0, _, 0) => format!("the {count} updates may have been stored"),
        (0, _, _) => format!("the first {in_doubt} of {count} updates may have been stored, the rest not"),
        (_, 0, _) => format!("the first {stored} of {count} updates were stored, the rest not"),
        (_, _, 0) => format!(
            "the first {stored} of {count} updates were stored, the last {in_doubt} may have been"
        ),
        _ => format!(
            "the first {stored} of {count} updates were stored, the next {in_doubt} may have been, the rest not"
        ),
    }
}

/// The room reserved for an HTTP request's body ([`crate::server::body::BodyBudget`]), held
/// by each job of the request until the committer is done with it: a client that goes away
/// drops its request's task, but not the jobs it queued, which hold its updates until then.
pub type Room = Option<Arc<tokio::sync::OwnedSemaphorePermit>>;

struct Job {
    updates: Vec<Update>,
    /// For updates from a stream: how far it was consumed, recorded in the same transaction.
    position: Option<SourcePosition>,
    _room: Room,
    /// The answer, with the updates handed back: freeing their JSON trees takes the
    /// committer thread a fifth of its time, which the caller's thread can spare.
    reply: oneshot::Sender<Answer>,
}

type Answer = (Result<BatchSummary, CommitError>, Vec<Update>);

impl Job {
    fn answer(self, result: Result<BatchSummary, CommitError>) {
        let _ = self.reply.send((result, self.updates));
    }
}

type BackfillReply = oneshot::Sender<Result<Option<BackfillProgress>, CommitError>>;

enum Request {
    Commit(Job),
    BackfillStep(BackfillReply),
    /// Makes the thread panic, as a fault in it would.
    #[cfg(test)]
    Panic,
}

/// Told what the committer thread panicked with, should it: it then takes no more commits
/// (those queued and later ones are answered [`CommitError::Stopped`]; those it held,
/// [`CommitError::InDoubt`]).
pub type OnPanic = Box<dyn FnOnce(Box<dyn std::any::Any + Send>) + Send>;

/// Told what each request stored, once it is durable and before it is answered: so it is
/// counted also when nobody waits for the answer any more (a client gone between chunks).
pub type OnStored = Box<dyn Fn(&BatchSummary) + Send>;

/// What the committer thread tells of itself.
pub struct Watch {
    pub on_stored: OnStored,
    pub on_panic: OnPanic,
}

impl Default for Watch {
    fn default() -> Self {
        Watch {
            on_stored: Box::new(|_| {}),
            on_panic: Box::new(|_| {}),
        }
    }
}

#[derive(Clone)]
pub struct Committer {
    jobs: mpsc::Sender<Request>,
    store: Arc<Store>,
    keep: Arc<KeepTree>,
    layout: Arc<Layout>,
    ownership: Option<Arc<Ownership>>,
}

/// The refusal of the first of `updates` of a partition `ownership` does not own.
fn refuse_not_owned(ownership: &Ownership, updates: &[Update]) -> Result<(), CommitError> {
    let hashes = updates.iter().map(|update| id_hash(&update.id));
    match ownership.first_not_owned(hashes) {
        Some((index, partition)) => Err(CommitError::Elsewhere(
            ownership.refusal(&updates[index].id, partition),
        )),
        None => Ok(()),
    }
}

impl Committer {
    /// Starts the committer thread; `committed` is notified after every durable group.
    pub fn start(
        store: Arc<Store>,
        mapping: Arc<Mapping>,
        committed: Arc<Notify>,
    ) -> (Committer, std::thread::JoinHandle<()>) {
        Committer::start_watched(store, mapping, committed, Watch::default())
    }

    /// [`Committer::start`], telling `watch` what it stores, and should the thread panic.
    pub fn start_watched(
        store: Arc<Store>,
        mapping: Arc<Mapping>,
        committed: Arc<Notify>,
        watch: Watch,
    ) -> (Committer, std::thread::JoinHandle<()>) {
        let Watch {
            on_stored,
            on_panic,
        } = watch;
        let (jobs, receiver) = mpsc::channel::<Request>(1024);
        let keep = Arc::new(KeepTree::for_mapping(&mapping));
        let layout = Arc::new(Layout::new(&mapping));
        let thread_store = Arc::clone(&store);
        let handle = std::thread::Builder::new()
            .name("outpost-committer".into())
            .spawn(move || {
                let store = thread_store;
                let mut receiver = receiver;
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(&mut receiver, &store, &mapping, &committed, &on_stored)
                }));
                if let Err(panic) = ran {
                    on_panic(panic);
                    // The jobs it held went with the unwinding (their callers are told they
                    // may have been stored); those still queued were not, and are told so.
                    receiver.close();
                    while let Ok(request) = receiver.try_recv() {
                        match request {
                            Request::Commit(job) => job.answer(Err(CommitError::Stopped)),
                            Request::BackfillStep(reply) => {
                                let _ = reply.send(Err(CommitError::Stopped));
                            }
                            #[cfg(test)]
                            Request::Panic => {}
                        }
                    }
                }
            })
            .expect("spawning the committer thread");
        (
            Committer {
                jobs,
                store,
                keep,
                layout,
                ownership: None,
            },
            handle,
        )
    }

    /// This committer, refusing updates that do not come from the stream of profiles whose
    /// partitions are not owned (see [`Ownership`]).
    pub fn owning(mut self, ownership: Ownership) -> Committer {
        self.ownership = Some(Arc::new(ownership));
        self
    }

    /// How to parse updates for [`Committer::commit`]: keeping only the part of each profile
    /// the store keeps (the rest is never built), and making each upsert its record at once.
    pub fn parsing(&self, limit: FutureLimit) -> Parsing<'_> {
        Parsing {
            limit: Some(limit),
            keep: Some(&self.keep),
            layout: Some(&self.layout),
        }
    }

    /// Commits the updates as one atomic group; returns once they are durable.
    ///
    /// Upserts not parsed with [`Committer::parsing`] are made records here, and merges pruned
    /// to their mapped parts, on the caller's task, so that the single committer thread only
    /// does what must be serial.
    pub async fn commit(&self, updates: Vec<Update>) -> Result<BatchSummary, CommitError> {
        self.commit_at(updates, None).await
    }

    /// Commits a request's updates in order, [`REQUEST_CHUNK`] at a time (one chunk, and so
    /// whole or not at all, up to that many), each durable before the next is queued; returns
    /// once all are. `located` holds the first chunk parsed (`locate_body` with
    /// [`REQUEST_CHUNK`]); each later chunk is parsed again from the body with `parsing` as it
    /// is queued (the next while one is committed), so at most two chunks' updates are held at
    /// a time. A request that stops partway (an error, the caller gone between chunks, or
    /// `stopping` cancelled) has its first chunks stored, and says how far it got: sent again
    /// whole, the updates already stored are then stale or unchanged when they have timestamps
    /// (without, an earlier update of a profile the request updates twice is applied again
    /// over its later one, as on any resend of a stored request).
    ///
    /// Once `stopping` is cancelled (the agent stops), no chunk after the first is queued: a
    /// request of many chunks could outlast the stop's wait for open requests and be cut off
    /// unanswered, its client left not knowing what was stored.
    pub async fn commit_located(
        &self,
        mut located: LocatedBody<'_>,
        parsing: &Parsing<'_>,
        room: Room,
        stopping: &CancellationToken,
    ) -> Result<BatchSummary, PartlyCommitted> {
        let first = std::mem::take(&mut located.first);
        let rest_id_hashes = std::mem::take(&mut located.rest_id_hashes);
        // A later update was parsed before with the same checks: its id is found again.
        let id_of = |i: usize| match first.get(i) {
            Some(update) => update.id.clone(),
            None => located
                .rest()
                .nth(i - first.len())
                .and_then(|item| item.parse(parsing).ok())
                .map_or_else(|| format!("(update {})", i + 1), |update| update.id),
        };
        let hashes = || {
            let first = first.iter().map(|update| id_hash(&update.id));
            first.chain(rest_id_hashes.iter().copied())
        };
        // Every update is checked before the first chunk is queued: the request is refused
        // whole.
        if let Some(ownership) = &self.ownership {
            if let Some((index, partition)) = ownership.first_not_owned(hashes()) {
                let refusal = ownership.refusal(&id_of(index), partition);
                return Err(PartlyCommitted::nothing_stored(CommitError::Elsewhere(
                    refusal,
                )));
            }
        }
        if !rest_id_hashes.is_empty() {
            self.store.refuse_given_away(hashes(), id_of).map_err(|e| {
                PartlyCommitted::nothing_stored(match e {
                    StoreError::PartitionGivenAway { .. } => refusal(e),
                    e => commit_error(e),
                })
            })?;
        }
        drop(rest_id_hashes);
        let mut rest = located.rest();
        let later = std::iter::from_fn(move || {
            let chunk: Vec<BodyItem> = rest.by_ref().take(REQUEST_CHUNK).collect();
            let parsed = chunk
                .iter()
                .map(|item| item.parse(parsing))
                .collect::<Result<Vec<Update>, _>>()
                // Parsed before with the same checks and clock reading: cannot happen.
                .map_err(|e| {
                    CommitError::Store(format!("line {} read otherwise: {}", e.line, e.reason))
                });
            (!chunk.is_empty()).then_some(parsed)
        });
        self.commit_chunks(
            std::iter::once(Ok(first)).chain(later),
            room,
            Some(stopping),
        )
        .await
    }

    /// Commits a request's updates, all parsed and at most [`REQUEST_CHUNK`] of them, whole or
    /// not at all.
    pub async fn commit_parsed(
        &self,
        updates: Vec<Update>,
        room: Room,
    ) -> Result<BatchSummary, PartlyCommitted> {
        self.commit_chunks(std::iter::once(Ok(updates)), room, None)
            .await
    }

    /// Commits each chunk in turn, each durable before the next is queued, until one fails
    /// or, past the first, `stopping` is cancelled. The next chunk is made (parsed) while the
    /// one before is committed.
    async fn commit_chunks(
        &self,
        mut chunks: impl Iterator<Item = Result<Vec<Update>, CommitError>>,
        room: Room,
        stopping: Option<&CancellationToken>,
    ) -> Result<BatchSummary, PartlyCommitted> {
        let mut stored = BatchSummary::default();
        let mut next = chunks.next();
        let mut first = true;
        while let Some(chunk) = next {
            let failed = |stored, in_doubt, error| PartlyCommitted {
                stored,
                in_doubt,
                error,
            };
            if !first && stopping.is_some_and(CancellationToken::is_cancelled) {
                return Err(failed(stored, 0, CommitError::Unavailable(STOPPING.into())));
            }
            first = false;
            let chunk = chunk.map_err(|error| failed(stored, 0, error))?;
            let len = chunk.len() as u64;
            let answer = self
                .queue(chunk, None, room.clone())
                .await
                .map_err(|error| failed(stored, 0, error))?;
            next = chunks.next();
            let (result, _updates) = answer
                .await
                .map_err(|_| failed(stored, len, stopped_before_answering()))?;
            match result {
                Ok(summary) => stored.add(&summary),
                Err(error) => {
                    let in_doubt = if matches!(error, CommitError::InDoubt(_)) {
                        len
                    } else {
                        0
                    };
                    return Err(failed(stored, in_doubt, error));
                }
            }
        }
        Ok(stored)
    }

    /// [`Committer::commit`] for updates from a stream partition: `position` (how far the
    /// partition was consumed, and its rejected messages) is written in the same transaction.
    pub async fn commit_at(
        &self,
        updates: Vec<Update>,
        position: Option<SourcePosition>,
    ) -> Result<BatchSummary, CommitError> {
        let answer = self.queue(updates, position, None).await?;
        let (result, _updates) = answer.await.map_err(|_| stopped_before_answering())?;
        result
    }

    /// Prepares the updates and queues them for the committer thread, which answers on the
    /// receiver returned.
    async fn queue(
        &self,
        mut updates: Vec<Update>,
        position: Option<SourcePosition>,
        room: Room,
    ) -> Result<oneshot::Receiver<Answer>, CommitError> {
        if let (Some(ownership), None) = (&self.ownership, &position) {
            refuse_not_owned(ownership, &updates)?;
        }
        for update in &mut updates {
            match update.op {
                Op::Upsert => engine::prepare(update, &self.layout),
                Op::Merge | Op::Delete => self.keep.prune(&mut update.profile),
            }
        }
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Request::Commit(Job {
                updates,
                position,
                _room: room,
                reply,
            }))
            .await
            .map_err(|_| CommitError::Stopped)?;
        Ok(answer)
    }

    /// Runs one step of the queued backfill, durably, between groups of updates; `None` when
    /// no backfill is queued.
    pub async fn backfill_step(&self) -> Result<Option<BackfillProgress>, CommitError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Request::BackfillStep(reply))
            .await
            .map_err(|_| CommitError::Stopped)?;
        answer.await.map_err(|_| CommitError::Stopped)?
    }
}

fn commit_error(e: StoreError) -> CommitError {
    if e.is_transient() {
        tracing::debug!(error = %e, "commit failed");
        CommitError::Unavailable(e.to_string())
    } else {
        tracing::error!(error = %e, "commit failed");
        CommitError::Store(e.to_string())
    }
}

fn backfill_step(
    store: &Store,
    mapping: &Mapping,
    committed: &Notify,
) -> Result<Option<BackfillProgress>, CommitError> {
    let progress = store
        .update_section()
        .and_then(|_section| {
            let progress = store.backfill_step(mapping, STEP_PROFILES, Utc::now())?;
            store.flush()?;
            Ok(progress)
        })
        .map_err(commit_error)?;
    if progress.is_some() {
        committed.notify_one();
    }
    Ok(progress)
}

fn run(
    receiver: &mut mpsc::Receiver<Request>,
    store: &Store,
    mapping: &Mapping,
    committed: &Notify,
    on_stored: &dyn Fn(&BatchSummary),
) {
    // A backfill step that came while a group was being gathered runs after that group.
    let mut held: Option<BackfillReply> = None;
    loop {
        if let Some(reply) = held.take() {
            let _ = reply.send(backfill_step(store, mapping, committed));
        }
        let first = match receiver.blocking_recv() {
            None => return,
            Some(Request::BackfillStep(reply)) => {
                held = Some(reply);
                continue;
            }
            Some(Request::Commit(job)) => job,
            #[cfg(test)]
            Some(Request::Panic) => panic!("asked to"),
        };
        let mut total = first.updates.len();
        let mut jobs = vec![first];
        while total < MAX_GROUP_UPDATES && held.is_none() {
            match receiver.try_recv() {
                Ok(Request::Commit(job)) => {
                    total += job.updates.len();
                    jobs.push(job);
                }
                Ok(Request::BackfillStep(reply)) => held = Some(reply),
                #[cfg(test)]
                Ok(Request::Panic) => panic!("asked to"),
                Err(_) => break,
            }
        }
        let consumed: Vec<(usize, SourcePosition)> = jobs
            .iter_mut()
            .enumerate()
            .filter_map(|(group, j)| Some((group, j.position.take()?)))
            .collect();
        let groups: Vec<&[Update]> = jobs.iter().map(|j| j.updates.as_slice()).collect();
        let started = std::time::Instant::now();
        let mut decided = std::time::Duration::ZERO;
        let (mut writing, mut applied) = (false, None);
        let flushed = store.update_section().and_then(|_section| {
            writing = true;
            applied = Some(store.apply_each(&groups, mapping, Utc::now(), &consumed)?);
            decided = started.elapsed();
            store.flush()
        });
        tracing::debug!(
            requests = jobs.len(),
            updates = total,
            apply_us = decided.as_micros() as u64,
            flush_us = (started.elapsed() - decided).as_micros() as u64,
            "committed a group"
        );
        let summaries = match (flushed, applied) {
            (Ok(()), Some(summaries)) => {
                committed.notify_one();
                summaries
            }
            (Err(e), Some(summaries)) => {
                tracing::debug!(error = %e, "the flush of a written group failed");
                let in_doubt = CommitError::InDoubt(e.to_string());
                for (job, summary) in jobs.into_iter().zip(summaries) {
                    // A request refused whole wrote nothing.
                    job.answer(match summary {
                        Ok(_) => Err(in_doubt.clone()),
                        Err(refused) => Err(refusal(refused)),
                    });
                }
                continue;
            }
            // sled applies a transaction's writes tree by tree: one that failed on an I/O
            // error may have left some of them to reach the disk. (Its reads failing the same
            // way are counted in too.)
            (Err(e @ (StoreError::NoSpace(_) | StoreError::Io { .. })), None) if writing => {
                tracing::debug!(error = %e, "the write of a group failed");
                answer_all(jobs, &CommitError::InDoubt(e.to_string()));
                continue;
            }
            (Err(e), _) => {
                answer_all(jobs, &commit_error(e));
                continue;
            }
            (Ok(()), None) => unreachable!("applied before the flush"),
        };
        for (job, summary) in jobs.into_iter().zip(summaries) {
            if let Ok(stored) = &summary {
                on_stored(stored);
            }
            job.answer(summary.map_err(refusal));
        }
    }
}

/// Why a request was stopped between its chunks.
const STOPPING: &str = "the agent is stopping";

/// A job queued and never answered: the committer stopped (it panicked) while it held it,
/// maybe after the group's write, or even its flush, so the job may have been stored or not.
fn stopped_before_answering() -> CommitError {
    CommitError::InDoubt("the committer stopped before it answered".into())
}

/// Why one request of a group was refused, its other requests stored.
fn refusal(e: StoreError) -> CommitError {
    match e {
        StoreError::PartitionGivenAway { .. } => CommitError::Elsewhere(e.to_string()),
        e => CommitError::Refused(e.to_string()),
    }
}

fn answer_all(jobs: Vec<Job>, error: &CommitError) {
    for job in jobs {
        job.answer(Err(error.clone()));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::profile::update::{locate_body, parse_body};

    fn line(id: &str) -> String {
        format!(
            r#"{{"id":"{id}","profile":{{"name":"1","segmentMembership":{{"ups":{{"s":{{"status":"realized"}}}}}}}}}}"#
        )
    }

    fn update(id: &str) -> Vec<Update> {
        parse_body(line(id).as_bytes()).unwrap()
    }

    /// A committer on a store in which profile `x`'s group cannot be read: an update of it is
    /// refused whole.
    fn committer_with_x_unreadable() -> (
        tempfile::TempDir,
        Arc<Store>,
        Committer,
        std::thread::JoinHandle<()>,
    ) {
        let (dir, store) = store_with_x_unreadable();
        let mapping = Arc::new(Mapping::new(&["name"], &["s"], &[]));
        let (committer, thread) = Committer::start(Arc::clone(&store), mapping, Arc::default());
        (dir, store, committer, thread)
    }

    fn store_with_x_unreadable() -> (tempfile::TempDir, Arc<Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 8 << 20).unwrap());
        store
            .trees()
            .unwrap()
            .profile_groups
            .insert(super::super::groups::group_key("x"), &[0xff][..])
            .unwrap();
        (dir, store)
    }

    // The lock held across the awaits is what keeps the committer thread (not a task) waiting.
    #[allow(clippy::await_holding_lock)]
    #[tokio::test]
    async fn a_group_whose_flush_failed_may_have_been_stored_but_not_its_refused_requests() {
        let (_dir, store, committer, thread) = committer_with_x_unreadable();

        // The first group waits for the right to write profiles, and the next two requests
        // queue behind it, to be committed together; the first group's flush goes through,
        // theirs fails.
        let writer = store.lock_profile_writer();
        let first = committer.queue(update("a"), None, None).await.unwrap();
        while committer.jobs.capacity() < committer.jobs.max_capacity() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        *store.failing_sync.lock().unwrap() = Some((1, Duration::ZERO));
        let written = committer.queue(update("b"), None, None).await.unwrap();
        let refused = committer.queue(update("x"), None, None).await.unwrap();
        drop(writer);

        first.await.unwrap().0.unwrap();
        let written = written.await.unwrap().0;
        assert!(
            matches!(written, Err(CommitError::InDoubt(_))),
            "{written:?}"
        );
        assert!(written.unwrap_err().to_string().starts_with(IN_DOUBT));
        let refused = refused.await.unwrap().0;
        assert!(
            matches!(refused, Err(CommitError::Refused(_))),
            "{refused:?}"
        );
        // The store is failed now: the next group is refused before anything of it is written.
        let after = committer.commit(update("c")).await;
        assert!(
            matches!(after, Err(CommitError::Unavailable(_))),
            "{after:?}"
        );
        drop(committer);
        thread.join().unwrap();
    }

    /// A request of `new` updates of new profiles `{prefix}{i}`, then `last`'s.
    fn request(prefix: &str, new: usize, last: &str) -> String {
        let mut lines: Vec<String> = (0..new).map(|i| line(&format!("{prefix}{i}"))).collect();
        lines.push(line(last));
        lines.join("\n")
    }

    /// Commits `body` as `POST /v1/updates` does (which hands a body it parsed whole to
    /// [`Committer::commit_parsed`] only to drop the body first).
    async fn commit_body(
        committer: &Committer,
        body: &str,
    ) -> Result<BatchSummary, PartlyCommitted> {
        commit_body_unless_stopping(committer, body, &CancellationToken::new()).await
    }

    async fn commit_body_unless_stopping(
        committer: &Committer,
        body: &str,
        stopping: &CancellationToken,
    ) -> Result<BatchSummary, PartlyCommitted> {
        let parsing = committer.parsing(FutureLimit {
            now: Utc::now(),
            max_future_s: 0,
        });
        let located = locate_body(body.as_bytes(), &parsing, REQUEST_CHUNK).unwrap();
        committer
            .commit_located(located, &parsing, None, stopping)
            .await
    }

    /// Profile ids `{prefix}{i}` whose partition, of 4, `owned` says whether it is among
    /// 0 and 1.
    fn ids_in(prefix: &str, owned: bool, count: usize) -> Vec<String> {
        let partition = |id: &String| crate::source::partition::partition_of(id, 4);
        (0..)
            .map(|i| format!("{prefix}{i}"))
            .filter(|id| (partition(id) < 2) == owned)
            .take(count)
            .collect()
    }

    #[tokio::test]
    async fn updates_of_partitions_this_agent_does_not_own_are_refused_whole() {
        let (_dir, store, committer, thread) = committer_with_x_unreadable();
        let committer = committer.owning(Ownership::new(4, &[0, 1]));
        let owned = ids_in("o", true, REQUEST_CHUNK + 1);
        let foreign = &ids_in("f", false, 1)[0];
        let summary = committer.commit(update(&owned[0])).await.unwrap();
        assert_eq!(summary.accepted, 1);
        let refused = committer.commit(update(foreign)).await.unwrap_err();
        let partition = crate::source::partition::partition_of(foreign, 4);
        let said = format!(
            "profile {foreign} is in partition {partition}, which this agent does not own \
             (source.nats.owned = \"0-1\")"
        );
        assert!(
            matches!(&refused, CommitError::Elsewhere(e) if e.starts_with(&said)),
            "{refused:?}"
        );
        assert!(store.profile(foreign).unwrap().is_none());
        // A request of more than a chunk, the last update of another agent's partition: the
        // chunks before it are not stored either.
        let lines: Vec<String> = owned[1..]
            .iter()
            .chain([foreign])
            .map(|id| line(id))
            .collect();
        let partly = commit_body(&committer, &lines.join("\n"))
            .await
            .unwrap_err();
        assert_eq!((partly.stored.accepted, partly.in_doubt), (0, 0));
        assert!(
            matches!(&partly.error, CommitError::Elsewhere(e) if e.starts_with(&said)),
            "{partly:?}"
        );
        assert!(store.profile(&owned[1]).unwrap().is_none());
        drop(committer);
        thread.join().unwrap();
    }

    /// Once the agent stops, a request of several chunks stops before its second, and says
    /// how far it got; a request of one chunk is committed whole.
    #[tokio::test]
    async fn a_request_of_several_chunks_stops_at_the_next_once_the_agent_stops() {
        let (_dir, store, committer, thread) = committer_with_x_unreadable();
        let stopping = CancellationToken::new();
        stopping.cancel();

        let one_chunk = request("o", REQUEST_CHUNK - 1, "o-last");
        let whole = commit_body_unless_stopping(&committer, &one_chunk, &stopping).await;
        assert_eq!(whole.unwrap().accepted, REQUEST_CHUNK as u64);

        let three_chunks = request("t", 2 * REQUEST_CHUNK + 1, "t-last");
        let partly = commit_body_unless_stopping(&committer, &three_chunks, &stopping).await;
        let partly = partly.expect_err("stopped after the first chunk");
        assert_eq!(
            (partly.stored.accepted, partly.in_doubt),
            (REQUEST_CHUNK as u64, 0)
        );
        assert!(
            matches!(&partly.error, CommitError::Unavailable(why) if why == STOPPING),
            "{partly:?}"
        );
        let stored = |i: usize| store.profile(&format!("t{i}")).unwrap().is_some();
        assert!(stored(REQUEST_CHUNK - 1) && !stored(REQUEST_CHUNK));

        drop(committer);
        thread.join().unwrap();
    }

    #[tokio::test]
    async fn a_request_larger_than_a_chunk_that_stops_partway_says_how_far_it_got() {
        let (_dir, store, committer, thread) = committer_with_x_unreadable();
        let trees = store.trees().unwrap();

        // Up to a chunk, a request is stored whole or not at all.
        let whole = commit_body(&committer, &request("n", REQUEST_CHUNK - 1, "x")).await;
        let refused = whole.expect_err("x is unreadable");
        assert_eq!((refused.stored.accepted, refused.in_doubt), (0, 0));
        assert!(
            matches!(refused.error, CommitError::Refused(_)),
            "{refused:?}"
        );
        assert!(store.profile("n0").unwrap().is_none());

        // Past it, the chunks before the one that was refused are stored.
        let large = request("n", REQUEST_CHUNK + 1, "x");
        let partly = commit_body(&committer, &large).await;
        let partly = partly.expect_err("x is unreadable");
        assert!(
            matches!(partly.error, CommitError::Refused(_)),
            "{partly:?}"
        );
        assert_eq!(partly.stored.accepted, REQUEST_CHUNK as u64);
        assert_eq!(partly.stored.exports, REQUEST_CHUNK as u64);
        assert_eq!(partly.in_doubt, 0);
        assert!(store
            .profile(&format!("n{}", REQUEST_CHUNK - 1))
            .unwrap()
            .is_some());
        assert!(store
            .profile(&format!("n{REQUEST_CHUNK}"))
            .unwrap()
            .is_none());

        // Sent again once x is readable, the stored ones change nothing.
        trees
            .profile_groups
            .remove(super::super::groups::group_key("x"))
            .unwrap();
        let again = commit_body(&committer, &large).await.unwrap();
        assert_eq!(
            (again.accepted, again.unchanged, again.exports),
            (REQUEST_CHUNK as u64 + 2, REQUEST_CHUNK as u64, 2)
        );

        // A body that is a JSON array goes the same way.
        let items: Vec<String> = (0..=REQUEST_CHUNK)
            .map(|i| line(&format!("a{i}")))
            .collect();
        let array = format!("[{}]", items.join(",\n"));
        let stored = commit_body(&committer, &array).await.unwrap();
        let all = REQUEST_CHUNK as u64 + 1;
        assert_eq!((stored.accepted, stored.exports), (all, all));
        assert!(store
            .profile(&format!("a{REQUEST_CHUNK}"))
            .unwrap()
            .is_some());

        // A chunk whose flush fails may have been stored.
        *store.failing_sync.lock().unwrap() = Some((1, Duration::ZERO));
        let fresh = request("m", REQUEST_CHUNK, "last");
        let in_doubt = commit_body(&committer, &fresh)
            .await
            .expect_err("the flush fails");
        assert!(
            matches!(in_doubt.error, CommitError::InDoubt(_)),
            "{in_doubt:?}"
        );
        assert_eq!(
            (in_doubt.stored.accepted, in_doubt.in_doubt),
            (REQUEST_CHUNK as u64, 1)
        );
        drop(committer);
        thread.join().unwrap();
    }

    #[test]
    fn what_was_stored_names_the_stored_and_the_doubtful_part() {
        for (stored, in_doubt, said) in [
            (0, 0, "nothing of the input was stored"),
            (
                0,
                10,
                "the first 10 of 30 updates may have been stored, the rest not",
            ),
            (0, 30, "the 30 updates may have been stored"),
            (
                20,
                0,
                "the first 20 of 30 updates were stored, the rest not",
            ),
            (
                10,
                10,
                "the first 10 of 30 updates were stored, the next 10 may have been, the rest not",
            ),
            (
                20,
                10,
                "the first 20 of 30 updates were stored, the last 10 may have been",
            ),
        ] {
            assert_eq!(what_was_stored(stored, in_doubt, 30), said);
        }
    }

    /// A request is told of once stored, also when nobody waits for its answer (a client
    /// gone), and a request refused is not.
    #[tokio::test]
    async fn what_is_stored_is_told_of_whether_or_not_its_answer_is_awaited() {
        let (_dir, store) = store_with_x_unreadable();
        let mapping = Arc::new(Mapping::new(&["name"], &["ups"], &[]));
        let (told, heard) = std::sync::mpsc::channel();
        let watch = Watch {
            on_stored: Box::new(move |stored| told.send(stored.accepted).unwrap()),
            ..Watch::default()
        };
        let (committer, _thread) = Committer::start_watched(store, mapping, Arc::default(), watch);
        let mut two = update("a");
        two.extend(update("b"));
        drop(committer.queue(two, None, None).await.unwrap());
        assert_eq!(heard.recv_timeout(Duration::from_secs(5)), Ok(2));
        assert!(committer.commit(update("x")).await.is_err());
        committer.commit(update("c")).await.unwrap();
        assert_eq!(heard.try_iter().collect::<Vec<_>>(), [1]);
    }

    /// A request's room is held by the jobs it queued until they are committed, also once
    /// its caller went away: their updates are held until then.
    #[tokio::test]
    async fn a_requests_room_is_held_until_its_updates_are_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 8 << 20).unwrap());
        let mapping = Arc::new(Mapping::new(&["name"], &["ups"], &[]));
        let budget = Arc::new(tokio::sync::Semaphore::new(1));
        let (told, heard) = std::sync::mpsc::channel();
        let watched = Arc::clone(&budget);
        let watch = Watch {
            on_stored: Box::new(move |_| told.send(watched.available_permits()).unwrap()),
            ..Watch::default()
        };
        let (committer, _thread) = Committer::start_watched(store, mapping, Arc::default(), watch);
        let room = Arc::clone(&budget).acquire_owned().await.unwrap();
        let mut caller = Box::pin(committer.commit_parsed(update("a"), Some(Arc::new(room))));
        // Queued at its first poll; then the caller goes: its task is dropped, its job not.
        assert!(futures_util::poll!(&mut caller).is_pending());
        drop(caller);
        let held_while_stored = heard.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(
            held_while_stored, 0,
            "given back before its updates were stored"
        );
        for _ in 0..100 {
            if budget.available_permits() == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the room was not given back once the job was committed");
    }

    /// A committer that stops while it holds a job (here after the job's group was flushed)
    /// answers nothing: the job may have been stored, and its caller is told so, not that it
    /// was not stored.
    #[tokio::test]
    async fn a_job_the_committer_stopped_holding_may_have_been_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 8 << 20).unwrap());
        let mapping = Arc::new(Mapping::new(&["name"], &["s"], &[]));
        let watch = Watch {
            on_stored: Box::new(|_| panic!("after the flush")),
            on_panic: Box::new(|_| {}),
        };
        let (committer, _thread) =
            Committer::start_watched(Arc::clone(&store), mapping, Arc::default(), watch);
        let error = committer.commit(update("a")).await.unwrap_err();
        assert!(matches!(error, CommitError::InDoubt(_)), "{error:?}");
        assert!(error.to_string().starts_with(IN_DOUBT), "{error}");
        assert!(store.profile("a").unwrap().is_some(), "it was stored");
        // Not queued at all once the committer has stopped: not stored.
        for _ in 0..500 {
            if committer.jobs.is_closed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let error = committer.commit(update("b")).await.unwrap_err();
        assert!(matches!(error, CommitError::Stopped), "{error:?}");
    }

    /// Jobs still queued when the committer stops were not stored, and are told so.
    #[tokio::test]
    async fn jobs_queued_behind_a_panic_are_told_they_were_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 8 << 20).unwrap());
        let mapping = Arc::new(Mapping::new(&["name"], &["s"], &[]));
        let first = std::sync::atomic::AtomicBool::new(true);
        let watch = Watch {
            // Holds the thread on the first job while the others are queued behind it.
            on_stored: Box::new(move |_| {
                if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(300));
                }
            }),
            on_panic: Box::new(|_| {}),
        };
        let (committer, _thread) =
            Committer::start_watched(Arc::clone(&store), mapping, Arc::default(), watch);
        let held = committer.clone();
        let a = tokio::spawn(async move { held.commit(update("a")).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        committer.jobs.send(Request::Panic).await.unwrap();
        let b = committer.commit(update("b")).await;
        assert!(a.await.unwrap().is_ok());
        assert!(matches!(b, Err(CommitError::Stopped)), "{b:?}");
        assert!(store.profile("b").unwrap().is_none());
    }

    #[tokio::test]
    async fn a_committer_that_panics_says_so_and_takes_no_more_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 8 << 20).unwrap());
        let mapping = Arc::new(Mapping::new(&["name"], &["s"], &[]));
        let (told, said) = std::sync::mpsc::channel();
        let on_panic: OnPanic = Box::new(move |panic| {
            let message = panic.downcast_ref::<&str>().map(|s| s.to_string());
            told.send(message).unwrap();
        });
        let watch = Watch {
            on_panic,
            ..Watch::default()
        };
        let (committer, thread) =
            Committer::start_watched(Arc::clone(&store), mapping, Arc::default(), watch);
        committer.commit(update("a")).await.unwrap();
        committer.jobs.send(Request::Panic).await.unwrap();
        assert_eq!(
            said.recv_timeout(Duration::from_secs(5))
                .unwrap()
                .as_deref(),
            Some("asked to")
        );
        let after = committer.commit(update("b")).await;
        assert!(matches!(after, Err(CommitError::Stopped)), "{after:?}");
        assert!(thread.join().is_ok(), "the panic was caught");
    }
}
