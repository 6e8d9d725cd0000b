//! The single writer. Requests queue here; the committer thread takes every request waiting,
//! applies them all in one transaction, flushes once, then answers each in arrival order
//! (group commit). One writer means no transaction conflicts and commit order = ack order.

use std::sync::Arc;

use chrono::Utc;
use tokio::sync::{mpsc, oneshot, Notify};

use super::source::SourcePosition;
use super::{BatchSummary, Store};
use crate::config::Mapping;
use crate::profile::prune::KeepTree;
use crate::profile::Update;

/// At most this many updates go into one transaction; more waiting requests go into the next.
const MAX_GROUP_UPDATES: usize = 20_000;

#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    #[error("{0}")]
    Store(String),
    /// The disk is full, or the store is being reopened after an I/O error: nothing of the
    /// request was acknowledged, and the same request can be sent again later.
    #[error("{0}")]
    Unavailable(String),
    /// This request alone was refused: it updates a profile whose stored version cannot be
    /// read. Nothing of it was stored.
    #[error("{0}")]
    Refused(String),
    #[error("the committer has stopped")]
    Stopped,
}

struct Job {
    updates: Vec<Update>,
    /// For updates from a stream: how far it was consumed, recorded in the same transaction.
    position: Option<SourcePosition>,
    reply: oneshot::Sender<Result<BatchSummary, CommitError>>,
}

#[derive(Clone)]
pub struct Committer {
    jobs: mpsc::Sender<Job>,
    keep: Arc<KeepTree>,
}

impl Committer {
    /// Starts the committer thread; `committed` is notified after every durable group.
    pub fn start(
        store: Arc<Store>,
        mapping: Arc<Mapping>,
        committed: Arc<Notify>,
    ) -> (Committer, std::thread::JoinHandle<()>) {
        let (jobs, receiver) = mpsc::channel::<Job>(1024);
        let keep = Arc::new(KeepTree::for_mapping(&mapping));
        let handle = std::thread::Builder::new()
            .name("outpost-committer".into())
            .spawn(move || run(receiver, &store, &mapping, &committed))
            .expect("spawning the committer thread");
        (Committer { jobs, keep }, handle)
    }

    /// Commits the updates as one atomic group; returns once they are durable.
    ///
    /// The updates are pruned to their mapped parts here, on the caller's task, so that the
    /// single committer thread only does what must be serial.
    pub async fn commit(&self, updates: Vec<Update>) -> Result<BatchSummary, CommitError> {
        self.commit_at(updates, None).await
    }

    /// [`Committer::commit`] for updates from a stream partition: `position` (how far the
    /// partition was consumed, and its rejected messages) is written in the same transaction.
    pub async fn commit_at(
        &self,
        mut updates: Vec<Update>,
        position: Option<SourcePosition>,
    ) -> Result<BatchSummary, CommitError> {
        for update in &mut updates {
            self.keep.prune(&mut update.profile);
        }
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                updates,
                position,
                reply,
            })
            .await
            .map_err(|_| CommitError::Stopped)?;
        answer.await.map_err(|_| CommitError::Stopped)?
    }
}

fn run(mut receiver: mpsc::Receiver<Job>, store: &Store, mapping: &Mapping, committed: &Notify) {
    while let Some(first) = receiver.blocking_recv() {
        let mut total = first.updates.len();
        let mut jobs = vec![first];
        while total < MAX_GROUP_UPDATES {
            match receiver.try_recv() {
                Ok(job) => {
                    total += job.updates.len();
                    jobs.push(job);
                }
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
        let applied = store.apply_each(&groups, mapping, Utc::now(), &consumed);
        let decided = started.elapsed();
        let result = applied.and_then(|summaries| store.flush().map(|()| summaries));
        tracing::debug!(
            requests = jobs.len(),
            updates = total,
            apply_us = decided.as_micros() as u64,
            flush_us = (started.elapsed() - decided).as_micros() as u64,
            "committed a group"
        );
        match result {
            Ok(summaries) => {
                committed.notify_one();
                for (job, summary) in jobs.into_iter().zip(summaries) {
                    let _ = job
                        .reply
                        .send(summary.map_err(|e| CommitError::Refused(e.to_string())));
                }
            }
            Err(e) => {
                let error = if e.is_transient() {
                    tracing::debug!(error = %e, "commit failed");
                    CommitError::Unavailable(e.to_string())
                } else {
                    tracing::error!(error = %e, "commit failed");
                    CommitError::Store(e.to_string())
                };
                for job in jobs {
                    let _ = job.reply.send(Err(error.clone()));
                }
            }
        }
    }
}
