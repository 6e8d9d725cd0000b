//! The one writer of delivery's outcomes: a thread that takes every change waiting, applies
//! them in one transaction, flushes once, and hands back the profiles whose export is now
//! settled for good. Request slots never wait for it; only the settled profiles' next exports
//! do.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::store::outbox::{ExportChange, Outcome};
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

#[derive(Clone)]
pub struct Settler {
    changes: mpsc::UnboundedSender<Vec<Outcome>>,
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
        let thread = std::thread::Builder::new()
            .name("outpost-settler".into())
            .spawn(move || run(&store, receiver, &settled_tx, &failure))
            .expect("spawning the settler thread");
        (Settler { changes }, settled_rx, thread)
    }

    /// Hands over the changes of one turn of the delivery loop (one wake-up of the thread for
    /// all of them).
    pub fn send(&self, changes: Vec<Outcome>) {
        if changes.is_empty() {
            return;
        }
        // Fails only once the thread is gone, at exit: the export stays pending (at least once).
        let _ = self.changes.send(changes);
    }
}

/// Outcomes that came while a group could not be recorded, in the order they came, the failed
/// attempts of each export made one: delivery goes on meanwhile, and a failing export is tried
/// again at each of its retry times, so that kept one by one they would grow for as long as
/// the store cannot record them. One failed attempt stands for those before it (its error, its
/// time and its retry time are the last's; once one got no answer, so has the one kept), so
/// the attempts they count as are fewer; each export holds at most one of them, and what it
/// settles with comes after.
#[derive(Default)]
struct Waiting {
    outcomes: VecDeque<Outcome>,
    /// How many outcomes were taken before the first of `outcomes`: positions in `failed_at`
    /// count from the first ever pushed, so that taking a group leaves the others' as they are.
    taken: usize,
    /// Where each export's failed attempt is, while nothing came after it.
    failed_at: HashMap<u64, usize>,
}

impl Waiting {
    fn push(&mut self, outcome: Outcome) {
        let ExportChange::Failed {
            error,
            at_ms,
            retry_at_uptime_ms,
            unanswered,
        } = &outcome.change
        else {
            self.failed_at.remove(&outcome.seq);
            self.outcomes.push_back(outcome);
            return;
        };
        let Some(&at) = self.failed_at.get(&outcome.seq) else {
            let at = self.taken + self.outcomes.len();
            self.failed_at.insert(outcome.seq, at);
            self.outcomes.push_back(outcome);
            return;
        };
        if let ExportChange::Failed {
            error: kept_error,
            at_ms: kept_at,
            retry_at_uptime_ms: kept_retry,
            unanswered: kept_unanswered,
        } = &mut self.outcomes[at - self.taken].change
        {
            kept_error.clone_from(error);
            *kept_at = *at_ms;
            *kept_retry = *retry_at_uptime_ms;
            *kept_unanswered |= *unanswered;
        }
    }

    /// The first `n` outcomes, oldest first, to be recorded in one group. A failed attempt
    /// taken is no longer one a later attempt of its export is made one with.
    fn take(&mut self, n: usize) -> Vec<Outcome> {
        let taken: Vec<Outcome> = self.outcomes.drain(..n.min(self.outcomes.len())).collect();
        for (at, outcome) in (self.taken..).zip(&taken) {
            if self.failed_at.get(&outcome.seq) == Some(&at) {
                self.failed_at.remove(&outcome.seq);
            }
        }
        self.taken += taken.len();
        taken
    }
}

fn run(
    store: &Store,
    mut receiver: mpsc::UnboundedReceiver<Vec<Outcome>>,
    settled: &mpsc::UnboundedSender<Vec<Settled>>,
    failure: &RecordingFailure,
) -> bool {
    let mut waiting = Waiting::default();
    loop {
        let mut group = match waiting.outcomes.is_empty() {
            false => waiting.take(MAX_GROUP),
            true => match receiver.blocking_recv() {
                Some(group) => group,
                None => break,
            },
        };
        // Topped up from the channel only once nothing waits before what comes now.
        while group.len() < MAX_GROUP && waiting.outcomes.is_empty() {
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
                    let mut changes = group.len() + waiting.outcomes.len();
                    while let Ok(more) = receiver.try_recv() {
                        changes += more.len();
                    }
                    tracing::warn!(error = %e, changes, "stopping with outcomes not recorded in the store; those exports stay pending as they were");
                    return false;
                }
                Err(e) => {
                    // Said again each minute while it lasts: until then no profile with an
                    // outcome waiting here sends again, and repairs wait for them.
                    let said_again = failures > 0 && failures.is_multiple_of(300);
                    let reopening = matches!(e, StoreError::Reopening(_));
                    // A store that refuses writes (a full disk, an I/O error, a reopening)
                    // says so itself, and stops saying so as soon as it takes them again.
                    failure.set((!e.is_transient()).then(|| e.to_string()));
                    if (failures == 0 || said_again) && !reopening {
                        tracing::error!(error = %e, failures, "cannot record deliveries in the outbox; retrying");
                    } else {
                        tracing::debug!(error = %e, "cannot record deliveries in the outbox; retrying");
                    }
                    failures += 1;
                    std::thread::sleep(Duration::from_millis(200));
                    while let Ok(more) = receiver.try_recv() {
                        for outcome in more {
                            waiting.push(outcome);
                        }
                    }
                }
            }
        };
        if failures > 0 {
            failure.set(None);
            tracing::info!(
                changes = group.len(),
                retries = failures,
                "deliveries recorded again after failed tries"
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

    fn failed(seq: u64, error: &str, unanswered: bool) -> Outcome {
        Outcome {
            profile: "a".into(),
            seq,
            change: ExportChange::Failed {
                error: error.into(),
                at_ms: 0,
                retry_at_uptime_ms: None,
                unanswered,
            },
        }
    }

    fn delivered(seq: u64) -> Outcome {
        Outcome {
            profile: "a".into(),
            seq,
            change: ExportChange::Delivered { retried: true },
        }
    }

    /// Each export holds one failed attempt among the outcomes waiting, the last's, unanswered
    /// once any was; what settles it comes after, and a failure after that is kept apart.
    #[test]
    fn outcomes_waiting_keep_one_failed_attempt_an_export() {
        let mut waiting = Waiting::default();
        for outcome in [
            failed(1, "e1", false),
            failed(1, "e2", true),
            delivered(2),
            failed(1, "e3", false),
            delivered(1),
            failed(1, "e4", false),
        ] {
            waiting.push(outcome);
        }
        let kept: Vec<(u64, Option<(String, bool)>)> = waiting
            .take(usize::MAX)
            .into_iter()
            .map(|o| match o.change {
                ExportChange::Failed {
                    error, unanswered, ..
                } => (o.seq, Some((error, unanswered))),
                _ => (o.seq, None),
            })
            .collect();
        assert_eq!(
            kept,
            [
                (1, Some(("e3".to_owned(), true))),
                (2, None),
                (1, None),
                (1, Some(("e4".to_owned(), false))),
            ]
        );
        assert!(waiting.take(usize::MAX).is_empty());

        // Taken a group at a time, oldest first: what is left still holds one failed
        // attempt an export.
        for outcome in [failed(1, "e1", false), delivered(2), failed(3, "e3", false)] {
            waiting.push(outcome);
        }
        assert_eq!(waiting.take(1).len(), 1);
        waiting.push(failed(3, "e3 again", true));
        waiting.push(failed(1, "e1 again", false));
        let seqs: Vec<u64> = waiting.take(usize::MAX).iter().map(|o| o.seq).collect();
        assert_eq!(seqs, [2, 3, 1]);
    }

    /// A settler whose writes fail until [`Unrecording::mend`]: its store's tally is damaged.
    struct Unrecording {
        _dir: tempfile::TempDir,
        store: Arc<Store>,
        seqs: Vec<u64>,
        meta_tree: sled::Tree,
        tally: sled::IVec,
        failure: Arc<RecordingFailure>,
        settler: Settler,
        settled: mpsc::UnboundedReceiver<Vec<Settled>>,
        thread: std::thread::JoinHandle<bool>,
    }

    fn unrecording(exports: &[(&str, &str)]) -> Unrecording {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 8 << 20).unwrap());
        let seqs = crate::store::testing::export_each(&store, exports);
        let meta_tree = store.trees().unwrap().meta.clone();
        let tally = meta_tree.get(meta::TALLY).unwrap().unwrap();
        meta_tree.insert(meta::TALLY, b"xx").unwrap();
        let failure = Arc::new(RecordingFailure::default());
        let (settler, settled, thread) = Settler::start(Arc::clone(&store), Arc::clone(&failure));
        Unrecording {
            _dir: dir,
            store,
            seqs,
            meta_tree,
            tally,
            failure,
            settler,
            settled,
            thread,
        }
    }

    impl Unrecording {
        /// What the settler reports once it has failed to write.
        fn reported(&self) -> String {
            let started = std::time::Instant::now();
            while self.failure.get().is_none() && started.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(10));
            }
            self.failure.get().expect("the failure reported")
        }

        fn mend(&self) {
            self.meta_tree.insert(meta::TALLY, &self.tally).unwrap();
        }

        fn stop(self) {
            drop(self.settler);
            assert!(self.thread.join().unwrap());
        }
    }

    /// While the store cannot record them, an export failing again and again is held as one
    /// failed attempt, not one each time: recorded, it counts two attempts, not a thousand.
    #[test]
    fn attempts_that_come_while_recording_fails_are_held_as_one() {
        let mut u = unrecording(&[("a", "1"), ("b", "1")]);
        let (a, b) = (u.seqs[0], u.seqs[1]);
        u.settler.send(vec![failed(a, "first", false)]);
        u.reported();
        for i in 0..1000 {
            u.settler.send(vec![failed(a, &format!("try {i}"), false)]);
        }
        u.settler.send(vec![delivered(b)]);
        // Taken in while the write is tried again, every 0.2 s.
        std::thread::sleep(Duration::from_millis(1000));
        u.mend();
        let done = u.settled.blocking_recv().unwrap();
        assert_eq!(done.iter().map(|s| s.seq).collect::<Vec<_>>(), [b]);
        let a = u.store.export(u.store.export_id(a)).unwrap().unwrap();
        assert_eq!(a.record.attempts, 2);
        assert_eq!(a.record.last_error.as_deref(), Some("try 999"));
        u.stop();
    }

    /// A write that fails is reported while the settler retries it, and no longer once it
    /// goes through; meanwhile the profile's outcome is not handed back.
    #[test]
    fn a_failure_to_record_is_reported_until_recording_goes_through() {
        let mut u = unrecording(&[("a", "1")]);
        u.settler.send(vec![delivered(u.seqs[0])]);
        let reported = u.reported();
        assert!(reported.contains("tally"), "{reported}");
        assert!(u.settled.try_recv().is_err(), "nothing settled meanwhile");
        u.mend();
        let done = u.settled.blocking_recv().unwrap();
        assert_eq!(done.iter().map(|s| s.seq).collect::<Vec<_>>(), u.seqs);
        assert_eq!(u.failure.get(), None);
        u.stop();
    }
}
