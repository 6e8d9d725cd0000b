//! The one writer of delivery's outcomes: a thread that takes every change waiting, applies
//! them in one transaction, flushes once, and hands back the profiles whose export is now
//! settled for good. Request slots never wait for it; only the settled profiles' next exports
//! do.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::store::outbox::Outcome;
use crate::store::{Store, StoreError};

/// What became of a change the loop waits for.
pub struct Settled {
    pub profile: Arc<str>,
    pub seq: u64,
    /// `false`: delivered or dead-lettered, durably (a change that settles). `true`: an export
    /// the loop must forget rather than send or retry: a failed attempt of one no longer
    /// pending (dropped by `outbox drop`), or an older export of a delivered one's profile,
    /// put back while that one was in flight and now a dead letter again.
    pub vanished: bool,
}

/// Why deliveries cannot be recorded now, while they cannot: the settler retries, and no
/// profile with an outcome waiting sends again meanwhile, so `/healthz` says so (a store that
/// refuses writes is not counted: it says so itself, for as long as it does).
#[derive(Default)]
pub struct RecordingFailure(std::sync::Mutex<Option<String>>);

impl RecordingFailure {
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, failure: Option<String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = failure;
    }
}

/// At most this many changes go into one transaction.
const MAX_GROUP: usize = 4096;

/// While this many changes or more wait to be recorded, the loop starts no request: a store
/// that cannot record them (a full disk) would otherwise be handed a failed attempt of each
/// failing export at each of its retries, held in memory for as long as that lasts.
pub const MAX_BACKLOG: usize = 65_536;

#[derive(Clone)]
pub struct Settler {
    changes: mpsc::UnboundedSender<Vec<Outcome>>,
    /// Changes sent and not yet recorded (or given up on).
    backlog: Arc<AtomicUsize>,
}

impl Settler {
    /// Starts the thread; settled profiles arrive on the returned receiver, a group at a time.
    /// The thread ends once every `Settler` is dropped and what they sent is applied, or could
    /// not be (the store cannot be written): it returns whether everything was recorded.
    pub fn start(
        store: Arc<Store>,
        failure: Arc<RecordingFailure>,
    ) -> (
        Settler,
        mpsc::UnboundedReceiver<Vec<Settled>>,
        std::thread::JoinHandle<bool>,
    ) {
        let (changes, receiver) = mpsc::unbounded_channel();
        let (settled_tx, settled_rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(AtomicUsize::new(0));
        let recorded = Arc::clone(&backlog);
        let thread = std::thread::Builder::new()
            .name("outpost-settler".into())
            .spawn(move || run(&store, receiver, &settled_tx, &failure, &recorded))
            .expect("spawning the settler thread");
        (Settler { changes, backlog }, settled_rx, thread)
    }

    /// Whether [`MAX_BACKLOG`] changes or more wait to be recorded.
    pub fn backlogged(&self) -> bool {
        self.backlog.load(Ordering::Relaxed) >= MAX_BACKLOG
    }

    /// Hands over the changes of one turn of the delivery loop (one wake-up of the thread for
    /// all of them).
    pub fn send(&self, changes: Vec<Outcome>) {
        if changes.is_empty() {
            return;
        }
        self.backlog.fetch_add(changes.len(), Ordering::Relaxed);
        // Fails only once the thread is gone, at exit: the export stays pending (at least once).
        let _ = self.changes.send(changes);
    }
}

fn run(
    store: &Store,
    mut receiver: mpsc::UnboundedReceiver<Vec<Outcome>>,
    settled: &mpsc::UnboundedSender<Vec<Settled>>,
    failure: &RecordingFailure,
    backlog: &AtomicUsize,
) -> bool {
    while let Some(mut group) = receiver.blocking_recv() {
        while group.len() < MAX_GROUP {
            match receiver.try_recv() {
                Ok(more) => group.extend(more),
                Err(_) => break,
            }
        }
        let must_flush = group.iter().any(|c| c.change.settles());
        // A failed write is retried (on a full disk, until the store is reopened with room):
        // the profiles must not send again before it is durable.
        let mut failures = 0u32;
        // Kept from every attempt: one retried after its flush failed may find them withdrawn
        // already, and the loop must still forget them.
        let mut withdrawn: Vec<(Arc<str>, u64)> = Vec::new();
        let missing = loop {
            let attempt = store.write_section().and_then(|_section| {
                let applied = store.apply_export_changes(&group)?;
                for w in applied.withdrawn {
                    if !withdrawn.contains(&w) {
                        withdrawn.push(w);
                    }
                }
                if must_flush {
                    store.flush()?;
                }
                Ok(applied.missing)
            });
            match attempt {
                Ok(missing) => break missing,
                // Delivery has stopped: nothing waits for these any more, and a stop must not
                // wait for a disk to get room. Delivered ones are sent again (at least once).
                Err(e) if receiver.is_closed() => {
                    tracing::warn!(error = %e, changes = group.len(), "stopping with outcomes not recorded in the store; those exports stay pending as they were");
                    return false;
                }
                Err(e) => {
                    // Said again each minute while it lasts: until then no profile with an
                    // outcome waiting here sends again, and repairs wait for them.
                    let said_again = failures > 0 && failures.is_multiple_of(300);
                    let reopening = matches!(e, StoreError::Reopening(_));
                    // A store that refuses writes (a full disk, an I/O error, a reopening)
                    // says so itself, and stops saying so as soon as it takes them again.
                    let refused_by_the_store = reopening
                        || matches!(
                            e,
                            StoreError::NoSpace(_) | StoreError::Io { .. } | StoreError::Sync(_)
                        );
                    failure.set((!refused_by_the_store).then(|| e.to_string()));
                    if (failures == 0 || said_again) && !reopening {
                        tracing::error!(error = %e, failures, "cannot record deliveries in the outbox; retrying");
                    } else {
                        tracing::debug!(error = %e, "cannot record deliveries in the outbox; retrying");
                    }
                    failures += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        };
        backlog.fetch_sub(group.len(), Ordering::Relaxed);
        if failures > 0 {
            failure.set(None);
            tracing::info!(
                changes = group.len(),
                "deliveries recorded after {failures} retries"
            );
        }
        for (_, seq) in &withdrawn {
            tracing::warn!(
                export = %store.export_id(*seq),
                "a dead letter put back while a newer export of its profile was in flight is a dead letter again: that export was acknowledged, so sending this older one would undo it"
            );
        }
        // Withdrawn exports first: the loop forgets them before their profile may send again.
        let withdrawn = withdrawn.into_iter().map(|(profile, seq)| Settled {
            profile,
            seq,
            vanished: true,
        });
        let done: Vec<Settled> = withdrawn
            .chain(group.into_iter().filter_map(|c| {
                let vanished = !c.change.settles() && missing.contains(&c.seq);
                (c.change.settles() || vanished).then_some(Settled {
                    profile: c.profile,
                    seq: c.seq,
                    vanished,
                })
            }))
            .collect();
        if !done.is_empty() && settled.send(done).is_err() {
            return true;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::keys::meta;
    use crate::store::outbox::ExportChange;

    /// A write that fails is reported while the settler retries it, and no longer once it
    /// goes through; meanwhile the profile's outcome is not handed back.
    #[test]
    fn a_failure_to_record_is_reported_until_recording_goes_through() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 8 << 20).unwrap());
        let seqs = crate::store::testing::export_each(&store, &[("a", "1")]);
        let meta_tree = store.trees().unwrap().meta.clone();
        let tally = meta_tree.get(meta::TALLY).unwrap().unwrap();
        meta_tree.insert(meta::TALLY, b"xx").unwrap();
        let failure = Arc::new(RecordingFailure::default());
        let (settler, mut settled, thread) =
            Settler::start(Arc::clone(&store), Arc::clone(&failure));
        settler.send(vec![Outcome {
            profile: "a".into(),
            seq: seqs[0],
            change: ExportChange::Delivered { retried: false },
        }]);
        let started = std::time::Instant::now();
        while failure.get().is_none() && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let reported = failure.get().expect("the failure reported");
        assert!(reported.contains("tally"), "{reported}");
        assert!(settled.try_recv().is_err(), "nothing settled meanwhile");
        meta_tree.insert(meta::TALLY, tally).unwrap();
        let done = settled.blocking_recv().unwrap();
        assert_eq!(done.iter().map(|s| s.seq).collect::<Vec<_>>(), seqs);
        assert_eq!(failure.get(), None);
        drop(settler);
        assert!(thread.join().unwrap());
    }

    /// Outcomes that cannot be recorded count towards the backlog until they are.
    #[test]
    fn outcomes_waiting_to_be_recorded_count_until_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 8 << 20).unwrap());
        let seqs = crate::store::testing::export_each(&store, &[("a", "1")]);
        let meta_tree = store.trees().unwrap().meta.clone();
        let tally = meta_tree.get(meta::TALLY).unwrap().unwrap();
        meta_tree.insert(meta::TALLY, b"xx").unwrap();
        let failure = Arc::new(RecordingFailure::default());
        let (settler, _settled, thread) = Settler::start(Arc::clone(&store), Arc::clone(&failure));
        let failed = Outcome {
            profile: "a".into(),
            seq: seqs[0],
            change: ExportChange::Failed {
                error: "HTTP 500".into(),
                at_ms: 0,
                retry_at_uptime_ms: None,
                unanswered: false,
            },
        };
        settler.send(vec![failed.clone(); MAX_BACKLOG - 1]);
        assert!(!settler.backlogged());
        settler.send(vec![failed]);
        assert!(settler.backlogged());
        meta_tree.insert(meta::TALLY, tally).unwrap();
        let started = std::time::Instant::now();
        while settler.backlogged() && started.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!settler.backlogged(), "recorded");
        drop(settler);
        assert!(thread.join().unwrap());
    }
}
