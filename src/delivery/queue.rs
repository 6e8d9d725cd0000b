//! The delivery loop's view of the outbox: a read-ahead window of pending exports, in order,
//! grouped by profile, with each profile's state. No I/O: the loop fills it from the store and
//! tells it what happened.
//!
//! Invariants:
//! - a profile has at most one export out of the window (in flight, or delivered and waiting
//!   for its removal to be durable): that is what keeps one profile's exports in order;
//! - a profile's exports are handed out in sequence order; a failed one goes back to the head;
//! - ready profiles are handed out oldest head first, so the oldest exports go first; but for
//!   the probe of a destination that looks down, which prefers an export that has not failed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::retry;
use crate::store::Export;

/// How many ready profiles a probe looks through for one whose export has not failed.
const PROBE_SCAN: usize = 1024;
/// A profile's exports behind its head are let go of only once the head failed this many
/// times in a row, or waits [`LET_GO_AFTER_WAIT`]: a 429 (with a `Retry-After` of a minute,
/// say) or a passing error on one profile's long backlog must not make the window read the
/// rest of the outbox and then again from its head.
pub const LET_GO_AFTER_FAILURES: u32 = 3;
/// ... or at once when its head waits at least this long: a `Retry-After` of an hour on one
/// profile's long backlog would otherwise leave every other profile's exports further in the
/// outbox unread for two more such waits. Above the `Retry-After`s endpoints commonly give
/// (seconds to a minute), which cost the other profiles at most two such waits.
pub const LET_GO_AFTER_WAIT: Duration = Duration::from_secs(120);
/// The most exports held, also while few profiles are ready (the rest wait behind failing
/// exports). `heaptrack` put 16,384 decoded exports of the agent bench's tiny profiles at 7.5 MB.
pub const MAX_HELD: usize = 65_536;
/// Heads are let go of ([`Queue::let_go_of_blocked`], [`Queue::let_go_of_failed_heads`]) only
/// while the window knows fewer than this many profiles beyond those that may hold exports
/// ([`MAX_HELD`], one an export at most): each profile let go of keeps an entry (its state
/// and retry schedule, a few hundred bytes) while none of its exports is held.
pub const MAX_LET_GO: usize = 16_384;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing out; ready when it holds an export.
    Idle,
    /// Its head export is out: in flight, or its removal or dead-lettering is being flushed.
    Busy,
    /// Its head export failed and waits for its retry time.
    Waiting(Instant),
}

#[derive(Debug)]
struct Profile<B> {
    exports: VecDeque<Export>,
    state: State,
    /// The head export's retry schedule, while it keeps failing. Boxed: few profiles ever
    /// need one, and a window holds thousands of profiles.
    backoff: Option<Box<B>>,
    /// The head export must go alone (an array holding it was refused).
    solo: bool,
    /// Attempts of the head export that failed in a row and wait for a retry time (not an
    /// array split, nor the first refused token).
    failures: u32,
    /// An attempt of the head export was refused for its token (401/403). Only the first
    /// refusal is retried at once, with a new token: an endpoint that refuses one export for
    /// good while it takes the others would otherwise have it sent, and a token fetched, as
    /// fast as they answer.
    token_refused: bool,
    /// While it waits with nothing held (the window forgot what it held, [`Queue::forget_held`],
    /// or let go of its head, [`Queue::let_go_of_blocked`]): the head export it waits with.
    /// Read again, that export waits as before; another read first (the head was dropped, or
    /// an older export put back below it) is a new head.
    forgotten_head: Option<u64>,
}

impl<B> Profile<B> {
    /// Whether an attempt of the head export failed, in this run or (by its stored retry time)
    /// before.
    fn head_failed(&self) -> bool {
        self.backoff.is_some()
            || self
                .exports
                .front()
                .is_some_and(|e| e.retry_at_uptime_ms.is_some())
    }

    /// Forgets what was kept of the head export's attempts: the head is another now, with the
    /// failed attempts stored with it.
    fn new_head(&mut self) {
        self.backoff = None;
        self.solo = false;
        self.failures = self.stored_failures();
        self.token_refused = false;
    }

    /// The failed attempts stored with the head export, which count towards letting go of it
    /// as those of this run do: read again after a restart or a start-over, or come to the
    /// head behind another, a head that waits long would otherwise hold a full window for as
    /// many attempts again. (They count every attempt stored, also those sent again at once.)
    fn stored_failures(&self) -> u32 {
        self.exports
            .front()
            .map_or(0, |head| retry::failures_before(&head.record))
    }
}

/// See the module docs. `B` is the per-export retry schedule kept while an export fails.
#[derive(Debug)]
pub struct Queue<B> {
    profiles: HashMap<Arc<str>, Profile<B>>,
    /// Idle profiles that hold an export, by the sequence number of their head.
    ready: BTreeMap<u64, Arc<str>>,
    waiting: BTreeSet<(Instant, Arc<str>)>,
    /// Sequence numbers out of the window; a reader that starts over skips them.
    out: HashSet<u64>,
    /// Retry times of exports read behind another export of their profile (a dead letter put
    /// back below a failed export): each waits for its time once it is the head.
    not_before: HashMap<u64, Instant>,
    held: usize,
    /// What the exports held take in memory, about ([`footprint`]).
    held_bytes: usize,
    /// Profiles whose exports behind a failed head were let go of to make room
    /// ([`Queue::let_go_of_blocked`]): reads skip their exports, so none overtakes those
    /// let go of, until the window starts over.
    let_go: HashSet<Arc<str>>,
    /// A profile of `let_go` has nothing held any more: the window must start over to read
    /// its next exports.
    start_over: bool,
    /// Profiles of `let_go` whose head, let go of too, may go now: it is to be read back
    /// ([`Queue::take_heads_to_read`]). Each stays `Waiting`, out of `waiting`, until then.
    heads_to_read: Vec<(Arc<str>, u64)>,
}

/// About what a held export takes in memory: its record and the text it owns.
fn footprint(export: &Export) -> usize {
    let r = &export.record;
    std::mem::size_of::<Export>()
        + r.payload.len()
        + r.profile_id.len()
        + r.last_error.as_ref().map_or(0, String::len)
}

impl<B> Default for Queue<B> {
    fn default() -> Self {
        Queue {
            profiles: HashMap::new(),
            ready: BTreeMap::new(),
            waiting: BTreeSet::new(),
            out: HashSet::new(),
            not_before: HashMap::new(),
            held: 0,
            held_bytes: 0,
            let_go: HashSet::new(),
            start_over: false,
            heads_to_read: Vec::new(),
        }
    }
}

impl<B> Queue<B> {
    /// Exports held in the window (not counting those out).
    pub fn held(&self) -> usize {
        self.held
    }

    /// About what the exports held take in memory.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Exports waiting for their retry time.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn ready(&self) -> usize {
        self.ready.len()
    }

    /// Adds an export read from the store; exports must come in sequence order per profile.
    pub fn push(&mut self, export: Export) {
        self.push_waiting(export, None);
    }

    /// [`Queue::push`], for an export that is not to go before `at`: a failed export read
    /// again (after a restart) keeps its retry time. It is most often its profile's head,
    /// since a profile's later exports wait behind a failed one; behind another export, it
    /// waits for `at` once it becomes the head.
    ///
    /// An export its profile holds already is skipped: one put back after a start-over, which
    /// the reader had not passed yet, comes again (a profile's exports come in sequence order,
    /// so it is the last one held).
    pub fn push_waiting(&mut self, export: Export, at: Option<Instant>) {
        if self.out.contains(&export.id.seq)
            || (!self.let_go.is_empty() && self.let_go.contains(export.record.profile_id.as_str()))
        {
            return;
        }
        let id: Arc<str> = Arc::from(export.record.profile_id.as_str());
        let profile = self.profiles.entry(Arc::clone(&id)).or_insert(Profile {
            // Most profiles hold one export in the window; a deque grows from four otherwise.
            exports: VecDeque::with_capacity(1),
            state: State::Idle,
            backoff: None,
            solo: false,
            failures: 0,
            token_refused: false,
            forgotten_head: None,
        });
        let seq = export.id.seq;
        if profile
            .exports
            .back()
            .is_some_and(|last| last.id.seq >= seq)
        {
            return;
        }
        if let (State::Waiting(when), true) = (profile.state, profile.exports.is_empty()) {
            if profile.forgotten_head.take() == Some(seq) {
                // The head it waits with, read again: it goes on waiting, as it was.
                self.held += 1;
                self.held_bytes += footprint(&export);
                profile.exports.push_back(export);
                return;
            }
            // Its own retry time, if it has one, and its own schedule.
            self.waiting.remove(&(when, Arc::clone(&id)));
            profile.state = State::Idle;
            profile.new_head();
        }
        self.held += 1;
        self.held_bytes += footprint(&export);
        profile.exports.push_back(export);
        if profile.state == State::Idle && profile.exports.len() == 1 {
            profile.failures = profile.stored_failures();
            match at {
                Some(at) => {
                    profile.state = State::Waiting(at);
                    self.waiting.insert((at, id));
                }
                None => {
                    self.ready.insert(seq, id);
                }
            }
        } else if let Some(at) = at {
            self.not_before.insert(seq, at);
        }
    }

    /// Takes up to `n` ready exports of distinct profiles, oldest first, and marks their
    /// profiles busy. An export that must go alone comes alone (`n` is then ignored).
    pub fn take(&mut self, n: usize) -> Vec<(Arc<str>, Export)> {
        let mut taken = Vec::new();
        while taken.len() < n {
            let Some((&seq, id)) = self.ready.first_key_value() else {
                break;
            };
            let profile = self.profiles.get(id).expect("a ready profile is known");
            if profile.solo && !taken.is_empty() {
                break;
            }
            let solo = profile.solo;
            taken.push(self.take_ready(seq));
            if solo {
                break;
            }
        }
        taken
    }

    /// Takes one ready export to probe a destination that looks down: the oldest whose
    /// attempts have not failed, if one of the first [`PROBE_SCAN`] ready has none, else the
    /// oldest. An export that fails for what it holds (a server error on that profile alone)
    /// would otherwise be the probe every time, keeping every other profile waiting.
    pub fn take_probe(&mut self) -> Option<(Arc<str>, Export)> {
        let seq = self
            .fresh_ready()
            .or_else(|| self.ready.first_key_value().map(|(&seq, _)| seq))?;
        Some(self.take_ready(seq))
    }

    /// The oldest ready export of the first [`PROBE_SCAN`] whose attempts have not failed.
    fn fresh_ready(&self) -> Option<u64> {
        self.ready
            .iter()
            .take(PROBE_SCAN)
            .find(|(_, id)| {
                let profile = self.profiles.get(*id).expect("a ready profile is known");
                !profile.head_failed()
            })
            .map(|(&seq, _)| seq)
    }

    /// Whether a probe would find a ready export whose attempts have not failed.
    pub fn has_fresh_ready(&self) -> bool {
        self.fresh_ready().is_some()
    }

    /// Hands out the head export of the ready profile whose head is `seq`.
    fn take_ready(&mut self, seq: u64) -> (Arc<str>, Export) {
        let id = self.ready.remove(&seq).expect("a ready head");
        let profile = self
            .profiles
            .get_mut(&id)
            .expect("a ready profile is known");
        let export = profile
            .exports
            .pop_front()
            .expect("a ready profile holds one");
        profile.state = State::Busy;
        self.held -= 1;
        self.held_bytes -= footprint(&export);
        self.out.insert(export.id.seq);
        (id, export)
    }

    /// Its head export may go now, or at its retry time if it was read with one.
    fn make_ready(&mut self, id: &Arc<str>) {
        let profile = self.profiles.get_mut(id).expect("known profile");
        profile.state = State::Idle;
        match profile.exports.front() {
            Some(head) => match self.not_before.remove(&head.id.seq) {
                Some(at) => {
                    profile.state = State::Waiting(at);
                    self.waiting.insert((at, Arc::clone(id)));
                }
                None => {
                    self.ready.insert(head.id.seq, Arc::clone(id));
                }
            },
            None => {
                self.profiles.remove(id);
                if self.let_go.contains(id) {
                    self.start_over = true;
                }
            }
        }
    }

    /// The export that was out is done with for good (delivered or dead-lettered, durably):
    /// the profile's next export may go.
    pub fn settled(&mut self, id: &Arc<str>, seq: u64) {
        self.out.remove(&seq);
        if let Some(profile) = self.profiles.get_mut(id) {
            profile.new_head();
            self.make_ready(id);
        }
    }

    /// The export that was out failed: it goes back to the head of its profile, and the
    /// profile waits until `at` (or is ready at once with `at` = None). An older export of the
    /// profile read while it was out (a dead letter put back) stays ahead of it and goes now;
    /// the failed one then waits for `at` once it is the head.
    pub fn put_back(&mut self, id: &Arc<str>, export: Export, at: Option<Instant>) {
        let seq = export.id.seq;
        self.out.remove(&seq);
        let Some(profile) = self.profiles.get_mut(id) else {
            return;
        };
        let place = profile
            .exports
            .iter()
            .position(|e| e.id.seq > seq)
            .unwrap_or(profile.exports.len());
        self.held += 1;
        self.held_bytes += footprint(&export);
        profile.exports.insert(place, export);
        if place > 0 {
            // The schedule and the flags were the failed export's; the head is another.
            profile.new_head();
            if let Some(at) = at {
                self.not_before.insert(seq, at);
            }
            self.make_ready(id);
            return;
        }
        if at.is_some() {
            profile.failures = profile.failures.saturating_add(1);
        }
        match at {
            Some(at) => {
                profile.state = State::Waiting(at);
                self.waiting.insert((at, Arc::clone(id)));
            }
            None => self.make_ready(id),
        }
    }

    /// Forgets export `seq` of a profile (it left the outbox behind the window's back: dropped
    /// by the operator). If it was the profile's head, the next one may go.
    pub fn remove(&mut self, id: &Arc<str>, seq: u64) {
        let Some(profile) = self.profiles.get_mut(id) else {
            return;
        };
        let Some(at) = profile.exports.iter().position(|e| e.id.seq == seq) else {
            return;
        };
        if let Some(export) = profile.exports.remove(at) {
            self.held -= 1;
            self.held_bytes -= footprint(&export);
        }
        self.not_before.remove(&seq);
        if at > 0 {
            return;
        }
        profile.new_head();
        match profile.state {
            State::Waiting(when) => {
                self.waiting.remove(&(when, Arc::clone(id)));
                self.make_ready(id);
            }
            State::Idle => {
                self.ready.remove(&seq);
                self.make_ready(id);
            }
            State::Busy => {}
        }
    }

    /// The sequence numbers out of the window now.
    pub fn out(&self) -> &HashSet<u64> {
        &self.out
    }

    /// Marks the head export of a profile that is out as one that must go alone.
    pub fn set_solo(&mut self, id: &Arc<str>) {
        if let Some(profile) = self.profiles.get_mut(id) {
            profile.solo = true;
        }
    }

    /// Notes that the profile's head export was refused for its token; whether it had been
    /// already, since it became the head.
    pub fn token_refused_again(&mut self, id: &Arc<str>) -> bool {
        self.profiles
            .get_mut(id)
            .is_some_and(|p| std::mem::replace(&mut p.token_refused, true))
    }

    /// The retry schedule of the profile's head export, made by `new` on its first failure.
    pub fn backoff_of(&mut self, id: &Arc<str>, new: impl FnOnce() -> B) -> Option<&mut B> {
        let profile = self.profiles.get_mut(id)?;
        Some(profile.backoff.get_or_insert_with(|| Box::new(new())))
    }

    /// Makes the profiles whose retry time has come ready.
    pub fn wake_due(&mut self, now: Instant) {
        while let Some((at, _)) = self.waiting.first() {
            if *at > now {
                break;
            }
            let (_, id) = self.waiting.pop_first().expect("just looked at");
            if let Some(seq) = self.let_go_head(&id) {
                self.heads_to_read.push((id, seq));
                continue;
            }
            self.make_ready(&id);
        }
    }

    /// The earliest retry time still to come.
    pub fn next_due(&self) -> Option<Instant> {
        self.waiting.first().map(|(at, _)| *at)
    }

    /// Forgets every export held (the outbox changed under the window: exports were put back
    /// or dropped), keeping what is out and each profile's state; the reader starts over and
    /// [`Queue::push`] skips what is out.
    pub fn forget_held(&mut self) {
        self.ready.clear();
        self.not_before.clear();
        self.held = 0;
        self.held_bytes = 0;
        self.let_go.clear();
        self.start_over = false;
        self.heads_to_read.clear();
        for (id, profile) in &mut self.profiles {
            if let State::Waiting(at) = profile.state {
                match profile.exports.front() {
                    Some(head) => profile.forgotten_head = Some(head.id.seq),
                    // A head let go of that was due, or being read back: it waits as the
                    // others do until the reader reads it again.
                    None => {
                        self.waiting.insert((at, Arc::clone(id)));
                    }
                }
            }
            profile.exports.clear();
        }
        self.profiles.retain(|_, p| p.state != State::Idle);
    }

    /// Lets go of the exports held of each profile whose head waits for its retry time after
    /// [`LET_GO_AFTER_FAILURES`] failed attempts in a row, or for [`LET_GO_AFTER_WAIT`] or more
    /// from `now`, its head too while fewer than
    /// [`MAX_LET_GO`] profiles are let go of (the profile keeps its state and schedule): when
    /// nothing is ready and the window is full, so that the exports of other profiles further
    /// in the outbox can be read. Reads skip those profiles' exports. A head let go of is read
    /// back alone once its retry time comes ([`Queue::take_heads_to_read`],
    /// [`Queue::read_back`]). Once one of those profiles has nothing held any more,
    /// [`Queue::start_over_wanted`] tells the window to [`Queue::forget_held`] and read from
    /// the head again. Returns how many exports it let go of.
    pub fn let_go_of_blocked(&mut self, now: Instant) -> usize {
        let heads_too = self.profiles.len() < MAX_HELD + MAX_LET_GO;
        let mut count = 0;
        for (retry_at, id) in &self.waiting {
            let profile = self
                .profiles
                .get_mut(id)
                .expect("a waiting profile is known");
            let keep = if heads_too { 0 } else { 1 };
            let blocked = profile.failures >= LET_GO_AFTER_FAILURES
                || retry_at.saturating_duration_since(now) >= LET_GO_AFTER_WAIT;
            if profile.exports.len() <= keep || !blocked {
                continue;
            }
            if keep == 0 {
                profile.forgotten_head = profile.exports.front().map(|head| head.id.seq);
            }
            for export in profile.exports.drain(keep..) {
                self.held -= 1;
                self.held_bytes -= footprint(&export);
                self.not_before.remove(&export.id.seq);
                count += 1;
            }
            // A long backlog's room is not to stay with an entry that holds one export or none.
            profile.exports.shrink_to_fit();
            self.let_go.insert(Arc::clone(id));
        }
        count
    }

    /// While the destination looks down and no ready export could show it back (each one
    /// failed before), lets go of the failed heads of profiles with nothing else held, ready
    /// or waiting, while fewer than [`MAX_LET_GO`] profiles are let go of: so that the window
    /// reads on to exports that did not fail, the probes that can show the destination back
    /// (a window full of exports that each fail for what they hold, while others would go,
    /// would otherwise be probed one at a time until they expire). Each profile keeps its
    /// state and schedule; a head whose time came is read back as [`Queue::let_go_of_blocked`]
    /// says. Profiles with exports held behind their head keep them: reading on past those,
    /// through what may be the rest of the outbox, is left to [`Queue::let_go_of_blocked`].
    /// Returns how many it let go of.
    pub fn let_go_of_failed_heads(&mut self, now: Instant) -> usize {
        if self.profiles.len() >= MAX_HELD + MAX_LET_GO {
            return 0;
        }
        let ready = self.ready.iter().map(|(&seq, id)| (Some(seq), id));
        let waiting = self.waiting.iter().map(|(_, id)| (None, id));
        // A head read back since it was let go of stays for its turn as the probe.
        let heads: Vec<(Option<u64>, Arc<str>)> = ready
            .chain(waiting)
            .filter(|(ready_seq, id)| {
                let profile = self.profiles.get(*id).expect("a profile held is known");
                profile.exports.len() == 1
                    && (ready_seq.is_none() || profile.head_failed() && !self.let_go.contains(*id))
            })
            .map(|(seq, id)| (seq, Arc::clone(id)))
            .collect();
        let mut count = 0;
        for (ready_seq, id) in heads {
            let profile = self.profiles.get_mut(&id).expect("a profile held is known");
            let head = profile.exports.pop_front().expect("one held");
            self.held -= 1;
            self.held_bytes -= footprint(&head);
            self.not_before.remove(&head.id.seq);
            profile.forgotten_head = Some(head.id.seq);
            if let Some(seq) = ready_seq {
                // Its time has come: it is to be read back, and waits until then.
                self.ready.remove(&seq);
                profile.state = State::Waiting(now);
                self.heads_to_read.push((Arc::clone(&id), seq));
            }
            self.let_go.insert(id);
            count += 1;
        }
        count
    }

    /// The head a profile let go of with it waits with, if that is what it is now.
    fn let_go_head(&self, id: &Arc<str>) -> Option<u64> {
        let profile = self.profiles.get(id)?;
        let let_go = matches!(profile.state, State::Waiting(_))
            && profile.exports.is_empty()
            && self.let_go.contains(id);
        profile.forgotten_head.filter(|_| let_go)
    }

    /// Up to `n` of the heads let go of whose retry time came, to be read from the store and
    /// handed to [`Queue::read_back`] (or [`Queue::read_back_later`] if the read fails).
    pub fn take_heads_to_read(&mut self, n: usize) -> Vec<(Arc<str>, u64)> {
        let n = n.min(self.heads_to_read.len());
        self.heads_to_read.drain(..n).collect()
    }

    /// Heads that could not be read now, to be read first at the next try.
    pub fn read_back_later(&mut self, heads: Vec<(Arc<str>, u64)>) {
        self.heads_to_read.splice(0..0, heads);
    }

    /// A head let go of, read back from the store: it may go now. `None`: it is no longer
    /// pending (dropped, or dead-lettered as unreadable), and the profile's next exports are
    /// to be read.
    pub fn read_back(&mut self, id: &Arc<str>, seq: u64, export: Option<Export>) {
        if self.let_go_head(id) != Some(seq) {
            return; // the window started over meanwhile and reads it again
        }
        let profile = self.profiles.get_mut(id).expect("a profile let go of");
        match export {
            Some(export) => {
                profile.forgotten_head = None;
                profile.state = State::Idle;
                self.held += 1;
                self.held_bytes += footprint(&export);
                profile.exports.push_back(export);
                self.ready.insert(seq, Arc::clone(id));
            }
            None => {
                self.profiles.remove(id);
                self.start_over = true;
            }
        }
    }

    /// Whether the window must start over (see [`Queue::let_go_of_blocked`]), until it
    /// does ([`Queue::forget_held`]).
    pub fn start_over_wanted(&self) -> bool {
        self.start_over
    }

    /// Whether nothing is held, waiting or out.
    pub fn is_empty(&self) -> bool {
        self.held == 0 && self.out.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Reason;
    use crate::store::codec::ExportRecord;
    use crate::store::ExportId;
    use std::time::Duration;

    fn export(seq: u64, profile: &str) -> Export {
        Export {
            id: ExportId { store: 1, seq },
            dead: false,
            record: ExportRecord::new_pending(profile.into(), Reason::Segment, "{}".into(), 0, 0),
            retry_at_uptime_ms: None,
        }
    }

    fn queue(items: &[(u64, &str)]) -> Queue<u32> {
        let mut q = Queue::default();
        for &(seq, p) in items {
            q.push(export(seq, p));
        }
        q
    }

    fn seqs(taken: &[(Arc<str>, Export)]) -> Vec<u64> {
        taken.iter().map(|(_, e)| e.id.seq).collect()
    }

    /// An export out when the window starts over, put back before the reader gets to it, is
    /// not held twice when the reader comes to it: it would be sent again after its delivery.
    #[test]
    fn an_export_put_back_after_a_start_over_is_not_read_in_twice() {
        let start = Instant::now();
        let mut q = queue(&[(1, "a"), (300, "q")]);
        let q_id: Arc<str> = "q".into();
        assert_eq!(seqs(&q.take(10)), [1, 300]);
        q.forget_held();
        let at = start + Duration::from_secs(30);
        q.put_back(&q_id, export(300, "q"), Some(at));
        q.push_waiting(export(300, "q"), Some(at));
        q.push(export(301, "q"));
        assert_eq!(q.held(), 2, "300 once, and 301");
        q.wake_due(at);
        let (_, head) = q.take(10).remove(0);
        assert_eq!(head.id.seq, 300);
        q.settled(&q_id, 300);
        assert_eq!(seqs(&q.take(10)), [301]);
        q.settled(&q_id, 301);
        assert!(q.take(10).is_empty());
        assert_eq!(q.held(), 0);
    }

    /// A profile that waits for its head's retry time when the window starts over (exports
    /// were dropped or put back) waits on only for that export: another export read first is
    /// a new head, with its own time and schedule.
    #[test]
    fn after_a_start_over_a_profile_waits_only_for_the_head_it_waited_with() {
        let start = Instant::now();
        let later = start + Duration::from_secs(3600);
        let p: Arc<str> = "p".into();
        let failed_head = |q: &mut Queue<u32>| {
            let (_, head) = q.take(1).remove(0);
            q.put_back(&p, head, Some(later));
            *q.backoff_of(&p, || 0).unwrap() += 5;
        };

        // Read again, the head waits on, with its schedule.
        let mut q = queue(&[(10, "p"), (11, "p")]);
        failed_head(&mut q);
        q.forget_held();
        q.push_waiting(export(10, "p"), None);
        q.push(export(11, "p"));
        assert!(q.take(10).is_empty(), "the head waits for its time");
        assert_eq!(
            *q.backoff_of(&p, || 0).unwrap(),
            5,
            "and keeps its schedule"
        );
        q.wake_due(later);
        assert_eq!(seqs(&q.take(10)), [10]);

        // The head was dropped: the next export goes at once, on a schedule of its own.
        let mut q = queue(&[(10, "p"), (11, "p")]);
        failed_head(&mut q);
        q.forget_held();
        q.push(export(11, "p"));
        assert_eq!(seqs(&q.take(10)), [11]);
        assert_eq!(*q.backoff_of(&p, || 0).unwrap(), 0);

        // An older export put back below it goes first, at once; the head waits for the
        // time it was read with once it is the head again.
        let mut q = queue(&[(10, "p")]);
        failed_head(&mut q);
        q.forget_held();
        q.push(export(4, "p"));
        q.push_waiting(export(10, "p"), Some(later));
        assert_eq!(seqs(&q.take(10)), [4]);
        q.settled(&p, 4);
        assert!(q.take(10).is_empty(), "10 waits for its time");
        q.wake_due(later);
        assert_eq!(seqs(&q.take(10)), [10]);
    }

    #[test]
    fn one_export_per_profile_out_oldest_first() {
        let mut q = queue(&[(1, "a"), (2, "b"), (3, "a"), (4, "c"), (5, "b")]);
        assert_eq!(seqs(&q.take(10)), [1, 2, 4]);
        assert_eq!(q.held(), 2);
        assert!(q.take(10).is_empty(), "every profile is busy");
        let b: Arc<str> = "b".into();
        q.settled(&b, 2);
        assert_eq!(seqs(&q.take(10)), [5]);
        let a: Arc<str> = "a".into();
        q.settled(&a, 1);
        assert_eq!(seqs(&q.take(10)), [3]);
    }

    #[test]
    fn held_bytes_follow_the_exports_held() {
        let mut q = queue(&[(1, "a"), (2, "a"), (3, "b")]);
        let one = footprint(&export(1, "a"));
        assert!(one > std::mem::size_of::<Export>());
        assert_eq!(q.held_bytes(), 3 * one);
        let (a, mut failed) = q.take(1).remove(0);
        assert_eq!(q.held_bytes(), 2 * one);
        failed.record.last_error = Some("HTTP 503: busy".into());
        let failed_size = footprint(&failed);
        assert!(failed_size > one);
        q.put_back(&a, failed, None);
        assert_eq!(q.held_bytes(), 2 * one + failed_size);
        q.remove(&"b".into(), 3);
        assert_eq!(q.held_bytes(), one + failed_size);
        q.remove(&"b".into(), 3);
        assert_eq!(q.held_bytes(), one + failed_size, "already gone");
        q.forget_held();
        assert_eq!(q.held_bytes(), 0);
    }

    #[test]
    fn exports_behind_a_failed_head_are_let_go_of_and_read_again_once_it_moves() {
        let start = Instant::now();
        let mut q = queue(&[(1, "a"), (2, "a"), (3, "b"), (4, "a"), (5, "b")]);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        assert_eq!(q.let_go_of_blocked(start), 0, "nothing waits");
        let mut at = start;
        for failure in 1..=LET_GO_AFTER_FAILURES {
            if failure > 1 {
                q.wake_due(at);
            }
            let (_, head) = q.take(1).remove(0);
            assert_eq!(head.id.seq, 1);
            at += Duration::from_secs(1);
            q.put_back(&a, head, Some(at));
            if failure < LET_GO_AFTER_FAILURES {
                assert_eq!(q.let_go_of_blocked(start), 0, "a passing failure");
            }
        }
        assert_eq!(
            q.let_go_of_blocked(start),
            3,
            "a's head, 2 and 4 go; a keeps its state"
        );
        assert_eq!(q.held(), 2);
        assert_eq!(q.held_bytes(), 2 * footprint(&export(1, "a")));
        assert_eq!(q.waiting(), 1, "a waits for its head's time");
        q.push(export(6, "a"));
        q.push(export(7, "c"));
        assert_eq!(q.held(), 3, "a's later exports are skipped, c's kept");
        assert_eq!(seqs(&q.take(10)), [3, 7], "b and c go on");
        q.settled(&b, 3);
        assert!(!q.start_over_wanted());
        assert!(
            q.take_heads_to_read(usize::MAX).is_empty(),
            "a's head is not due yet"
        );
        q.wake_due(at);
        assert_eq!(seqs(&q.take(10)), [5], "a's head is not held: b goes on");
        let heads = q.take_heads_to_read(usize::MAX);
        assert_eq!(heads, [(Arc::clone(&a), 1)], "a's head is to be read back");
        q.read_back_later(heads);
        let heads = q.take_heads_to_read(usize::MAX);
        assert_eq!(heads.len(), 1, "still to be read after a failed read");
        q.read_back(&a, 1, Some(export(1, "a")));
        // a's head fails again: still nothing to read again.
        let (_, head) = q.take(1).remove(0);
        assert_eq!(head.id.seq, 1);
        assert_eq!(*q.backoff_of(&a, || 0).unwrap(), 0);
        q.put_back(&a, head, None);
        assert!(!q.start_over_wanted());
        let (_, head) = q.take(1).remove(0);
        q.settled(&a, head.id.seq);
        assert!(
            q.start_over_wanted(),
            "a moved: its exports let go of must be read"
        );
        q.forget_held();
        assert!(!q.start_over_wanted());
        for (seq, profile) in [(2, "a"), (4, "a"), (5, "b"), (6, "a")] {
            q.push(export(seq, profile));
        }
        assert_eq!(
            q.held(),
            3,
            "after a start-over, a's exports are read again (b's 5 is out)"
        );
        assert_eq!(seqs(&q.take(10)), [2]);
        q.settled(&a, 2);
        assert_eq!(seqs(&q.take(10)), [4]);
        q.settled(&a, 4);
        assert_eq!(seqs(&q.take(10)), [6], "in order");
    }

    /// A head told to wait long (a `Retry-After` of an hour) is let go of with the exports
    /// behind it at its first failure; one told to wait a few seconds is not.
    #[test]
    fn exports_behind_a_head_that_waits_long_are_let_go_of_at_once() {
        let start = Instant::now();
        let a: Arc<str> = "a".into();
        let minute = Duration::from_secs(60);
        for (wait, let_go) in [
            (Duration::from_secs(5), 0),
            (minute, 0),
            (LET_GO_AFTER_WAIT, 3),
        ] {
            let mut q = queue(&[(1, "a"), (2, "a"), (3, "a")]);
            let (_, head) = q.take(1).remove(0);
            q.put_back(&a, head, Some(start + wait));
            assert_eq!(q.let_go_of_blocked(start), let_go, "{wait:?}");
        }
    }

    /// Fails the head of `id` (a profile with one export held) until it may be let go of,
    /// counting its schedule up once a failure; returns when it waits.
    fn fail_until_let_go(q: &mut Queue<u32>, id: &Arc<str>, at: Instant) -> Instant {
        let mut at = at;
        for failure in 1..=LET_GO_AFTER_FAILURES {
            if failure > 1 {
                q.wake_due(at);
            }
            let (_, head) = q.take(1).remove(0);
            *q.backoff_of(id, || 0).unwrap() += 1;
            at += Duration::from_secs(1);
            q.put_back(id, head, Some(at));
        }
        at
    }

    /// A window full of failing heads alone (one export each) lets go of the heads too, so
    /// that other profiles' exports are read; each keeps its schedule and is read back alone
    /// when its time comes.
    #[test]
    fn failing_heads_are_let_go_of_and_read_back_when_due() {
        let start = Instant::now();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut q = queue(&[(1, "a")]);
        let due_a = fail_until_let_go(&mut q, &a, start + Duration::from_secs(100));
        q.push(export(2, "b"));
        let due_b = fail_until_let_go(&mut q, &b, start);
        assert!(due_b < due_a);
        assert_eq!(q.let_go_of_blocked(start), 2);
        assert_eq!((q.held(), q.held_bytes()), (0, 0));
        q.push(export(3, "a"));
        q.push(export(4, "c"));
        assert_eq!(seqs(&q.take(10)), [4], "a's next export is skipped");

        q.wake_due(due_a);
        let mut heads = q.take_heads_to_read(usize::MAX);
        assert_eq!(
            heads,
            [(Arc::clone(&b), 2), (Arc::clone(&a), 1)],
            "by due time"
        );
        q.read_back(&a, 1, Some(export(1, "a")));
        q.read_back_later(vec![heads.remove(0)]);
        let (_, head) = q.take(10).remove(0);
        assert_eq!(head.id.seq, 1);
        assert_eq!(
            *q.backoff_of(&a, || 0).unwrap(),
            LET_GO_AFTER_FAILURES,
            "a keeps its schedule"
        );
        q.put_back(&a, head, Some(due_a + Duration::from_secs(1)));
        assert_eq!(
            q.let_go_of_blocked(start),
            1,
            "a failed again: let go of at once"
        );
        q.wake_due(due_a + Duration::from_secs(1));
        let heads = q.take_heads_to_read(usize::MAX);
        assert_eq!(heads.len(), 2, "b's, still to be read, and a's");
        q.read_back(&a, 1, Some(export(1, "a")));
        let (_, head) = q.take(10).remove(0);
        q.settled(&a, head.id.seq);
        assert!(
            q.start_over_wanted(),
            "a moved: its next export is to be read"
        );

        // b's head was dropped while let go of: read back as gone, its next exports are read.
        let mut q = queue(&[(2, "b")]);
        let due_b = fail_until_let_go(&mut q, &b, due_b);
        assert_eq!(q.let_go_of_blocked(start), 1);
        q.wake_due(due_b);
        let heads = q.take_heads_to_read(usize::MAX);
        assert_eq!(heads, [(Arc::clone(&b), 2)]);
        q.read_back(&b, 2, None);
        assert!(q.start_over_wanted());
        q.forget_held();
        q.push(export(5, "b"));
        assert_eq!(seqs(&q.take(10)), [5], "b's next export goes at once");
    }

    /// While the destination looks down, failed heads with nothing behind them are let go
    /// of, ready or waiting; fresh exports and profiles with a backlog are kept; a ready one
    /// is to be read back at once, a waiting one once its time comes.
    #[test]
    fn while_down_failed_heads_alone_are_let_go_of() {
        let start = Instant::now();
        let later = start + Duration::from_secs(60);
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        let mut q = queue(&[(1, "a"), (2, "b"), (3, "c"), (4, "c"), (5, "d")]);
        let mut stored_failure = export(6, "e");
        stored_failure.retry_at_uptime_ms = Some(0);
        q.push(stored_failure);
        // a failed and is ready again; b failed and waits; c failed with one behind it.
        for (id, at) in [(&a, None), (&b, Some(later)), (&c, None)] {
            let taken = q.take(10);
            let (_, head) = taken.iter().find(|(p, _)| p == id).unwrap().clone();
            for (p, e) in taken {
                if &p != id {
                    q.put_back(&p, e, None);
                }
            }
            *q.backoff_of(id, || 0).unwrap() += 1;
            q.put_back(id, head, at);
        }
        assert!(q.has_fresh_ready(), "d's has not failed");
        assert_eq!(q.let_go_of_failed_heads(start), 3, "a's, b's and e's");
        assert_eq!(q.held(), 3, "c's two and d's");
        let mut heads = q.take_heads_to_read(usize::MAX);
        heads.sort();
        assert_eq!(
            heads,
            [(Arc::clone(&a), 1), ("e".into(), 6)],
            "the ready ones"
        );
        let taken = q.take(10);
        assert_eq!(seqs(&taken), [3, 5], "c and d go on");
        for (p, e) in taken {
            q.put_back(&p, e, None);
        }
        assert!(q.take_heads_to_read(usize::MAX).is_empty());
        q.wake_due(later);
        assert_eq!(q.take_heads_to_read(usize::MAX), [(Arc::clone(&b), 2)]);
        q.read_back(&b, 2, Some(export(2, "b")));
        assert_eq!(*q.backoff_of(&b, || 0).unwrap(), 1, "b keeps its schedule");
        assert_eq!(
            q.let_go_of_failed_heads(later),
            0,
            "b, read back, waits for its turn as the probe"
        );
    }

    /// Heads are let go of only while the window knows fewer than [`MAX_HELD`] +
    /// [`MAX_LET_GO`] profiles, so that the entries of those let go of stay bounded.
    #[test]
    fn heads_are_let_go_of_only_while_few_profiles_are_known() {
        let failed = |seq: u64| {
            let mut e = export(seq, &format!("p{seq}"));
            e.retry_at_uptime_ms = Some(0);
            e
        };
        let cap = (MAX_HELD + MAX_LET_GO) as u64;
        let mut q: Queue<u32> = Queue::default();
        for seq in 0..cap - 1 {
            q.push(failed(seq));
        }
        assert_eq!(q.let_go_of_failed_heads(Instant::now()), cap as usize - 1);
        q.push(failed(cap));
        assert_eq!(q.held(), 1);
        assert_eq!(q.let_go_of_failed_heads(Instant::now()), 0, "at the bound");
        assert_eq!(q.held(), 1);
    }

    /// A head let go of that came due, or was being read back, when the window starts over
    /// is read again by the reader, in the loop's order (start over, wake what is due, read):
    /// it goes at once, as it was due, once, in order. Its profile's entry is gone by then,
    /// and with it the schedule kept in memory: the loop makes the next one from the attempts
    /// stored with the export (`retry::failures_before`).
    #[test]
    fn a_head_let_go_of_when_the_window_starts_over_is_read_again_and_goes() {
        let start = Instant::now();
        let a: Arc<str> = "a".into();
        let mut q = queue(&[(1, "a")]);
        let due = fail_until_let_go(&mut q, &a, start);
        assert_eq!(q.let_go_of_blocked(start), 1);
        q.wake_due(due);
        let heads = q.take_heads_to_read(usize::MAX);
        assert_eq!(heads.len(), 1, "being read back");
        q.forget_held();
        q.wake_due(due);
        assert!(
            q.take_heads_to_read(usize::MAX).is_empty(),
            "not let go of any more"
        );
        q.push(export(1, "a"));
        q.push(export(2, "a"));
        assert_eq!(q.held(), 2);
        assert_eq!(seqs(&q.take(10)), [1]);
        q.settled(&a, 1);
        assert_eq!(seqs(&q.take(10)), [2]);
    }

    /// A head let go of that is not due yet when the window starts over waits on for its time
    /// once the reader reads it again, with its schedule.
    #[test]
    fn a_head_let_go_of_waits_on_after_a_start_over() {
        let start = Instant::now();
        let a: Arc<str> = "a".into();
        let mut q = queue(&[(1, "a")]);
        let due = fail_until_let_go(&mut q, &a, start);
        assert_eq!(q.let_go_of_blocked(start), 1);
        q.forget_held();
        q.wake_due(due - Duration::from_millis(1));
        q.push(export(1, "a"));
        assert!(q.take(10).is_empty(), "it waits for its time");
        q.wake_due(due);
        assert_eq!(seqs(&q.take(10)), [1]);
        assert_eq!(*q.backoff_of(&a, || 0).unwrap(), LET_GO_AFTER_FAILURES);
    }

    /// A head read again with a retry time stored (after a restart) counts the failed
    /// attempts stored with it towards letting go, as the window that made them did; so does
    /// one read again after its retry time, once it fails again.
    #[test]
    fn failures_stored_with_a_head_read_again_count_towards_letting_go() {
        let later = Instant::now() + Duration::from_secs(600);
        // Shortly before the retry time: a wait that lets go of nothing by its length.
        let now = later - Duration::from_secs(1);
        let a: Arc<str> = "a".into();
        for (attempts, let_go) in [(LET_GO_AFTER_FAILURES - 1, 0), (LET_GO_AFTER_FAILURES, 2)] {
            let failed = || {
                let mut head = export(1, "a");
                head.record.attempts = attempts;
                head.record.last_attempt_at_ms = Some(1);
                head
            };
            let mut q: Queue<u32> = Queue::default();
            q.push_waiting(failed(), Some(later));
            q.push(export(2, "a"));
            assert_eq!(
                q.let_go_of_blocked(now),
                let_go,
                "{attempts} attempts stored"
            );

            let mut q: Queue<u32> = Queue::default();
            q.push_waiting(failed(), None);
            q.push(export(2, "a"));
            let (_, head) = q.take(1).remove(0);
            q.put_back(&a, head, Some(later));
            let one_more = usize::from(attempts + 1 >= LET_GO_AFTER_FAILURES) * 2;
            assert_eq!(q.let_go_of_blocked(now), one_more, "{attempts} stored, due");
        }
    }

    #[test]
    fn only_failures_that_wait_for_a_retry_time_count_towards_letting_go() {
        let start = Instant::now();
        let mut q = queue(&[(1, "a"), (2, "a")]);
        let a: Arc<str> = "a".into();
        // An array split or a refused token: sent again at once.
        for _ in 0..LET_GO_AFTER_FAILURES {
            let (_, head) = q.take(1).remove(0);
            q.put_back(&a, head, None);
        }
        let (_, head) = q.take(1).remove(0);
        q.put_back(&a, head, Some(start));
        assert_eq!(q.let_go_of_blocked(start), 0);
    }

    #[test]
    fn only_the_first_token_refusal_of_a_head_is_the_first() {
        let mut q = queue(&[(1, "a"), (2, "a")]);
        let a: Arc<str> = "a".into();
        assert!(!q.token_refused_again(&a));
        assert!(q.token_refused_again(&a));
        let (_, head) = q.take(1).remove(0);
        q.settled(&a, head.id.seq);
        assert!(!q.token_refused_again(&a), "export 2 is the head now");
    }

    #[test]
    fn a_probe_is_the_oldest_export_that_has_not_failed_else_the_oldest() {
        let start = Instant::now();
        let mut q: Queue<u32> = Queue::default();
        q.push(export(1, "a"));
        let mut read_failed = export(2, "b"); // failed in an earlier run
        read_failed.retry_at_uptime_ms = Some(0);
        q.push(read_failed);
        q.push(export(3, "c"));
        // a fails and comes back, ready again.
        let (a, first) = q.take(1).remove(0);
        q.backoff_of(&a, || 0);
        q.put_back(&a, first, Some(start));
        q.wake_due(start);
        let (_, probe) = q.take_probe().unwrap();
        assert_eq!(probe.id.seq, 3, "c has not failed");
        let (_, probe) = q.take_probe().unwrap();
        assert_eq!(probe.id.seq, 1, "only failed ones left: the oldest");
        assert_eq!(q.take_probe().unwrap().1.id.seq, 2);
        assert!(q.take_probe().is_none());
    }

    #[test]
    fn take_hands_out_at_most_n_distinct_profiles() {
        let mut q = queue(&[(1, "a"), (2, "a"), (3, "b"), (4, "c")]);
        let taken = q.take(2);
        assert_eq!(seqs(&taken), [1, 3]);
        let ids: Vec<&str> = taken.iter().map(|(id, _)| &**id).collect();
        assert_eq!(ids, ["a", "b"]);
    }

    #[test]
    fn a_failed_export_waits_at_the_head_of_its_profile_and_others_go_on() {
        let start = Instant::now();
        let mut q = queue(&[(1, "a"), (2, "a"), (3, "b"), (4, "b")]);
        let mut taken = q.take(10);
        let (a, first) = taken.remove(0);
        let retry_at = start + Duration::from_secs(1);
        q.put_back(&a, first, Some(retry_at));
        assert_eq!(q.waiting(), 1);
        let (b, _) = taken.remove(0);
        q.settled(&b, 3);
        assert_eq!(seqs(&q.take(10)), [4], "b goes on, a waits");
        assert_eq!(q.next_due(), Some(retry_at));
        q.wake_due(start + Duration::from_millis(999));
        assert!(q.take(10).is_empty());
        q.wake_due(retry_at);
        assert_eq!(seqs(&q.take(10)), [1], "the failed export again, before 2");
    }

    #[test]
    fn an_export_read_with_a_retry_time_waits_for_it_and_its_profile_with_it() {
        let start = Instant::now();
        let at = start + Duration::from_secs(30);
        let mut q: Queue<u32> = Queue::default();
        q.push_waiting(export(1, "a"), Some(at));
        q.push(export(2, "a"));
        q.push_waiting(export(3, "b"), None);
        assert_eq!(q.waiting(), 1);
        assert_eq!(seqs(&q.take(10)), [3], "a waits with its later export");
        assert_eq!(q.next_due(), Some(at));
        q.wake_due(at - Duration::from_millis(1));
        assert!(q.take(10).is_empty());
        q.wake_due(at);
        assert_eq!(seqs(&q.take(10)), [1]);
    }

    #[test]
    fn an_export_read_with_a_retry_time_behind_another_waits_for_it_as_the_head() {
        // A dead letter (1) put back below an export that had failed (2), read after a restart.
        let start = Instant::now();
        let at = start + Duration::from_secs(600);
        let a: Arc<str> = "a".into();
        let mut q: Queue<u32> = Queue::default();
        q.push(export(1, "a"));
        q.push_waiting(export(2, "a"), Some(at));
        assert_eq!(q.waiting(), 0, "the head goes at once");
        assert_eq!(seqs(&q.take(10)), [1]);
        q.settled(&a, 1);
        assert!(q.take(10).is_empty(), "2 keeps its retry time");
        assert_eq!(q.next_due(), Some(at));
        q.wake_due(at);
        assert_eq!(seqs(&q.take(10)), [2]);

        // Read again while the head is out, and dropped before it is the head: forgotten.
        let mut q: Queue<u32> = Queue::default();
        q.push(export(1, "a"));
        assert_eq!(seqs(&q.take(10)), [1]);
        q.forget_held();
        q.push_waiting(export(2, "a"), Some(at));
        q.push(export(3, "a"));
        q.remove(&a, 2);
        q.settled(&a, 1);
        assert_eq!(seqs(&q.take(10)), [3]);
    }

    #[test]
    fn a_failed_export_goes_back_behind_an_older_one_read_while_it_was_out() {
        // 2 is out when a dead letter 1 of its profile is put back and the window read again;
        // then 2 fails.
        let mut q = queue(&[(2, "a")]);
        let (id, two) = q.take(10).pop().unwrap();
        q.forget_held();
        q.push(export(1, "a"));
        let at = Instant::now() + Duration::from_secs(60);
        q.put_back(&id, two, Some(at));
        assert_eq!(seqs(&q.take(10)), [1], "the older export first");
        q.settled(&id, 1);
        assert!(q.take(10).is_empty(), "2 waits for its retry time");
        assert_eq!(q.next_due(), Some(at));
        q.wake_due(at);
        assert_eq!(seqs(&q.take(10)), [2]);
    }

    #[test]
    fn a_solo_export_is_never_batched() {
        let mut q = queue(&[(1, "a"), (2, "b"), (3, "c")]);
        let taken = q.take(3);
        assert_eq!(seqs(&taken), [1, 2, 3]);
        for (id, export) in taken {
            q.set_solo(&id);
            q.put_back(&id, export, None);
        }
        assert_eq!(seqs(&q.take(3)), [1]);
        assert_eq!(seqs(&q.take(3)), [2]);
        let a: Arc<str> = "a".into();
        q.settled(&a, 1);
        q.push(export(7, "a"));
        let c: Arc<str> = "c".into();
        let mut c_export = q.take(1);
        assert_eq!(seqs(&c_export), [3]);
        q.put_back(&c, c_export.remove(0).1, None);
        assert_eq!(seqs(&q.take(3)), [3], "still alone");
        assert_eq!(seqs(&q.take(3)), [7], "settled: batched again");
    }

    #[test]
    fn starting_over_skips_what_is_out_and_keeps_profiles_busy() {
        let mut q = queue(&[(5, "a"), (6, "a"), (7, "b")]);
        assert_eq!(seqs(&q.take(1)), [5]);
        q.forget_held();
        assert_eq!(q.held(), 0);
        // An export put back under an older number comes first for its profile.
        for (seq, p) in [(1, "b"), (5, "a"), (6, "a"), (7, "b")] {
            q.push(export(seq, p));
        }
        assert_eq!(q.held(), 3, "5 is out");
        assert_eq!(seqs(&q.take(10)), [1]);
        let a: Arc<str> = "a".into();
        q.settled(&a, 5);
        assert_eq!(seqs(&q.take(10)), [6]);
    }

    #[test]
    fn a_removed_head_lets_the_next_export_go_and_others_are_just_forgotten() {
        let start = Instant::now();
        let mut q = queue(&[(1, "a"), (2, "a"), (3, "a"), (4, "b")]);
        let (a, first) = q.take(1).remove(0);
        q.put_back(&a, first, Some(start + Duration::from_secs(60)));
        assert_eq!(seqs(&q.take(10)), [4]);
        // Export 1, waiting for its retry time, was dropped: 2 goes now.
        q.remove(&a, 1);
        assert_eq!(q.waiting(), 0);
        q.remove(&a, 3);
        assert_eq!(seqs(&q.take(10)), [2]);
        q.settled(&a, 2);
        assert!(q.take(10).is_empty(), "3 was forgotten");
        assert_eq!(q.held(), 0);
        // An idle, ready head.
        let mut q = queue(&[(7, "c"), (8, "c")]);
        let c: Arc<str> = "c".into();
        q.remove(&c, 7);
        assert_eq!(seqs(&q.take(10)), [8]);
    }

    #[test]
    fn the_backoff_lives_while_the_export_fails_and_goes_with_its_delivery() {
        let mut q = queue(&[(1, "a")]);
        let (a, e) = q.take(1).remove(0);
        *q.backoff_of(&a, || 0).unwrap() += 1;
        q.put_back(&a, e, None);
        let (a, _) = q.take(1).remove(0);
        assert_eq!(*q.backoff_of(&a, || 0).unwrap(), 1, "kept across attempts");
        q.settled(&a, 1);
        assert!(q.is_empty());
        assert!(q.backoff_of(&a, || 0).is_none(), "forgotten once delivered");
    }
}
