//! Time on edge hosts, whose wall clock may be wrong at boot and stepped later (NTP).
//!
//! Two clocks, for two purposes:
//! - the **wall clock** says when something happened, for people: `created_at`, `dead_at`,
//!   timestamps in payloads. It may jump forward or back at any moment.
//! - the **run time** of the store says how long exports have waited: the time agents have run
//!   on this store, in milliseconds, counted on the monotonic clock within a run and carried
//!   across restarts in the store ([`ClockRecord::uptime_ms`], checkpointed every
//!   [`CHECKPOINT_EVERY`] and at shutdown). `delivery.max_age_s` is measured on it only, so a
//!   wall clock set forward or back expires nothing. A crash loses the run time since the last
//!   checkpoint, which only errs towards not expiring.
//!
//! Jumps of the wall clock are noticed two ways: while the agent runs, by comparing wall-clock
//! progress with the progress of the boot clock between two [`Sample`]s; at start, by
//! comparing the wall time last seen in the store with now (exactly when the host has not
//! rebooted since, from the boot clock; after a reboot only a clock that went back is sure to
//! be a jump). A jump beyond [`JUMP_THRESHOLD`] is logged once, counted in `/metrics` and kept
//! in the store for `outpost check` and `outbox stats`.
//!
//! The decisions ([`expired`], [`jump_ms`], [`startup_jump_ms`]) are pure and table-tested;
//! reading the clocks is kept to [`Sample::now`] and [`RunClock`], and the agent's task that
//! samples, records and logs is [`Watcher`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::codec::ExportRecord;
use crate::store::{Store, StoreError};

/// A wall clock that moved this much more (or less) than the monotonic clock has jumped.
pub const JUMP_THRESHOLD: Duration = Duration::from_secs(60);

/// How often the agent samples the clocks to notice a jump.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// How often the agent checkpoints its run time (also at once after a jump, and at shutdown).
/// Not every sample: an idle agent on flash storage should not write every second.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);

/// The clock state the store keeps (`meta/clock`).
#[derive(Debug, Clone, Default, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct ClockRecord {
    /// Run time of the store at the last checkpoint.
    pub uptime_ms: u64,
    /// The wall clock (ms since the Unix epoch) at the last checkpoint; 0 before the first.
    pub wall_ms: i64,
    /// The boot the last checkpoint was taken in, and the boot clock then.
    pub boot_id: Option<String>,
    pub boot_ms: Option<u64>,
    /// Wall-clock jumps noticed on this store, and the last one.
    pub jumps: u64,
    pub last_jump: Option<Jump>,
}

/// A wall-clock jump: by how much (positive: set forward) and when it was noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct Jump {
    pub by_ms: i64,
    /// Wall clock (ms since the Unix epoch) when noticed, after the jump.
    pub noticed_at_ms: i64,
}

impl ClockRecord {
    /// The record after noticing `jump`.
    pub fn with_jump(mut self, jump: Jump) -> ClockRecord {
        self.jumps += 1;
        self.last_jump = Some(jump);
        self
    }

    /// The record after a checkpoint taken at `sample` with run time `uptime_ms`.
    pub fn checkpointed(mut self, sample: &Sample, uptime_ms: u64) -> ClockRecord {
        self.uptime_ms = uptime_ms;
        self.wall_ms = sample.wall_ms;
        self.boot_id = sample.boot_id.clone();
        self.boot_ms = Some(sample.mono_ms);
        self
    }
}

/// The run time of the store, as this process counts it: the run time when the store was
/// opened, plus the monotonic time since. Cheap to copy.
#[derive(Debug, Clone, Copy)]
pub struct RunClock {
    base_ms: u64,
    since: Instant,
}

impl RunClock {
    /// A clock that reads `base_ms` now and counts on from there.
    pub fn starting_at(base_ms: u64) -> RunClock {
        RunClock {
            base_ms,
            since: Instant::now(),
        }
    }

    pub fn uptime_ms(&self) -> u64 {
        self.base_ms
            .saturating_add(self.since.elapsed().as_millis() as u64)
    }

    /// Whether `record` has waited in the outbox longer than `max_age` (`delivery.max_age_s`).
    pub fn expired(&self, record: &ExportRecord, max_age: Duration) -> bool {
        expired(self.uptime_ms(), record.queued_at_uptime_ms, max_age)
    }

    /// [`retry_before_expiry`] of `record`, now.
    pub fn retry_before_expiry(
        &self,
        record: &ExportRecord,
        max_age: Duration,
        retry_in: Duration,
    ) -> Duration {
        retry_before_expiry(
            self.uptime_ms(),
            record.queued_at_uptime_ms,
            max_age,
            retry_in,
        )
    }
}

/// How long an export queued at run time `queued_ms` has waited at run time `now_ms`. An export
/// queued after a checkpoint that a crash then lost looks queued in the future: it has waited 0.
pub fn waited_ms(now_ms: u64, queued_ms: u64) -> u64 {
    now_ms.saturating_sub(queued_ms)
}

/// The expiry rule: an export expires once it has waited more than `max_age` of run time.
pub fn expired(now_ms: u64, queued_ms: u64, max_age: Duration) -> bool {
    u128::from(waited_ms(now_ms, queued_ms)) > max_age.as_millis()
}

/// How far past its expiry an export whose retry would come later is taken up again: by
/// then [`expired`] says so, whatever a millisecond's rounding between the clocks.
const PAST_EXPIRY: Duration = Duration::from_secs(1);

/// When an export queued at `queued_ms` is next taken up, at run time `now_ms`, its retry due
/// after `retry_in`: no later than just past its expiry, where it is dead-lettered. A retry
/// due after that can never be sent (a `Retry-After` forbids sending it sooner), and waiting
/// for it left the export pending far past `max_age` (up to the hour a `Retry-After` may ask).
pub fn retry_before_expiry(
    now_ms: u64,
    queued_ms: u64,
    max_age: Duration,
    retry_in: Duration,
) -> Duration {
    // From when it expires, not from how long it waited: an export queued after a checkpoint
    // that a crash lost looks queued in the future, and expires that much later.
    let expires_at_ms = u128::from(queued_ms).saturating_add(max_age.as_millis());
    let expires_in = expires_at_ms.saturating_sub(u128::from(now_ms));
    let expires_in = Duration::from_millis(u64::try_from(expires_in).unwrap_or(u64::MAX));
    retry_in.min(expires_in.saturating_add(PAST_EXPIRY))
}

/// The wall clock and the boot clock read together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Wall clock, ms since the Unix epoch.
    pub wall_ms: i64,
    /// A clock that does not jump: the boot clock (which also counts a suspended host, so a
    /// suspend is not taken for a jump) when known, else the monotonic clock of this process.
    pub mono_ms: u64,
    /// Which boot `mono_ms` counts from; `None` when it is the process's monotonic clock.
    pub boot_id: Option<String>,
}

impl Sample {
    /// Reads the clocks. The boot clock comes from `/proc/uptime` (CLOCK_BOOTTIME) and the
    /// boot from `/proc/sys/kernel/random/boot_id`; without them, `process_start` is the origin.
    pub fn now(process_start: Instant) -> Sample {
        let wall_ms = chrono::Utc::now().timestamp_millis();
        match (read_boot_id(), read_boot_ms()) {
            (Some(boot_id), Some(mono_ms)) => Sample {
                wall_ms,
                mono_ms,
                boot_id: Some(boot_id),
            },
            _ => Sample {
                wall_ms,
                mono_ms: process_start.elapsed().as_millis() as u64,
                boot_id: None,
            },
        }
    }
}

fn read_boot_id() -> Option<String> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(text.trim().to_owned()).filter(|id| !id.is_empty())
}

fn read_boot_ms() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    parse_proc_uptime(&text)
}

/// The first field of `/proc/uptime` ("12345.67 ..."), in ms.
fn parse_proc_uptime(text: &str) -> Option<u64> {
    let seconds: f64 = text.split_whitespace().next()?.parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| (seconds * 1000.0).round() as u64)
}

/// How far the wall clock moved beyond the time that passed between two samples of one clock
/// origin (positive: set forward). Not a jump unless [`is_jump`].
pub fn jump_ms(earlier: &Sample, later: &Sample) -> i64 {
    // Saturating: a damaged clock record may hold any value.
    let wall = later.wall_ms.saturating_sub(earlier.wall_ms);
    let passed = (i128::from(later.mono_ms) - i128::from(earlier.mono_ms))
        .clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
    wall.saturating_sub(passed)
}

pub fn is_jump(by_ms: i64) -> bool {
    by_ms.unsigned_abs() > JUMP_THRESHOLD.as_millis() as u64
}

/// The jump between the last checkpoint of the store and `now`, at start, if one is sure.
///
/// In the same boot the boot clock tells how much time really passed, so any jump beyond the
/// threshold is found. After a reboot (or without a boot clock) the time the host was off is
/// unknown: a wall clock that went forward may be right, so only one that went back by more
/// than the threshold is taken for a jump, of at least that much.
pub fn startup_jump_ms(last: &ClockRecord, now: &Sample) -> Option<i64> {
    if last.wall_ms == 0 {
        return None; // never checkpointed
    }
    let by = match (&last.boot_id, last.boot_ms, &now.boot_id) {
        // A boot clock behind the checkpoint's is not the same boot's, whatever the id says:
        // a container's own /proc/uptime (lxcfs) starts again with the container.
        (Some(last_boot), Some(last_ms), Some(now_boot))
            if last_boot == now_boot && now.mono_ms >= last_ms =>
        {
            let earlier = Sample {
                wall_ms: last.wall_ms,
                mono_ms: last_ms,
                boot_id: last.boot_id.clone(),
            };
            jump_ms(&earlier, now)
        }
        _ => now.wall_ms.saturating_sub(last.wall_ms).min(0),
    };
    is_jump(by).then_some(by)
}

/// Milliseconds to the nearest whole second (half away from zero): jumps are measured between
/// two clocks read a moment apart, so a step of a day reads a few ms short of it.
pub fn whole_seconds(ms: i64) -> i64 {
    ms.saturating_add(ms.signum() * 500) / 1000
}

/// A jump for people, to the second: "+10d 0h 0m 0s", "-1h 1m 40s", "+1m 30s".
pub fn describe_jump(by_ms: i64) -> String {
    let sign = if by_ms < 0 { '-' } else { '+' };
    let s = whole_seconds(by_ms).unsigned_abs();
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{sign}{d}d {h}h {m}m {s}s")
    } else if h > 0 {
        format!("{sign}{h}h {m}m {s}s")
    } else {
        format!("{sign}{m}m {s}s")
    }
}

/// The agent's clock task: checks for a jump since the last run at start, then samples the
/// clocks every [`SAMPLE_EVERY`], notes jumps, and checkpoints the run time every
/// [`CHECKPOINT_EVERY`].
pub struct Watcher {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    process_start: Instant,
    last: Sample,
    last_checkpoint: Instant,
    record: ClockRecord,
}

impl Watcher {
    /// Compares the store's last checkpoint with now, and checkpoints.
    pub fn start(store: Arc<Store>, metrics: Arc<Metrics>) -> Result<Watcher, StoreError> {
        let process_start = Instant::now();
        let record = store.clock_record()?;
        let now = Sample::now(process_start);
        let mut watcher = Watcher {
            store,
            metrics,
            process_start,
            last: now.clone(),
            last_checkpoint: process_start,
            record,
        };
        if let Some(by_ms) = startup_jump_ms(&watcher.record, &now) {
            watcher.noticed(by_ms, now.wall_ms, "since the agent last ran");
        }
        watcher.checkpoint(&now)?;
        Ok(watcher)
    }

    /// Samples the clocks and notes a jump since the last sample; checkpoints after a jump, or
    /// when [`CHECKPOINT_EVERY`] has passed, or when `force`d (at shutdown).
    pub fn tick(&mut self, force: bool) -> Result<(), StoreError> {
        let now = Sample::now(self.process_start);
        let mut jumped = false;
        if now.boot_id == self.last.boot_id {
            let by_ms = jump_ms(&self.last, &now);
            if is_jump(by_ms) {
                self.noticed(by_ms, now.wall_ms, "while the agent ran");
                jumped = true;
            }
        }
        self.last = now.clone();
        // Ticks come a sample apart, give or take: one due a little after the interval is
        // taken at this tick, not the next, so that checkpoints are the interval apart.
        let due = self.last_checkpoint.elapsed() + SAMPLE_EVERY / 2 >= CHECKPOINT_EVERY;
        if force || jumped || due {
            self.checkpoint(&now)?;
        }
        Ok(())
    }

    fn noticed(&mut self, by_ms: i64, at_ms: i64, when: &str) {
        let jump = Jump {
            by_ms,
            noticed_at_ms: at_ms,
        };
        self.record = std::mem::take(&mut self.record).with_jump(jump);
        self.metrics.clock_jumps.inc();
        self.metrics
            .clock_last_jump_seconds
            .set(whole_seconds(by_ms));
        tracing::warn!(
            by_s = whole_seconds(by_ms),
            "the wall clock jumped {} {when}; delivery.max_age_s counts the agent's run time and is not affected",
            describe_jump(by_ms)
        );
    }

    fn checkpoint(&mut self, now: &Sample) -> Result<(), StoreError> {
        let uptime_ms = self.store.run_clock().uptime_ms();
        self.record = std::mem::take(&mut self.record).checkpointed(now, uptime_ms);
        self.last_checkpoint = Instant::now();
        self.store.write_clock_record(&self.record)
    }

    /// Ticks until `shutdown`, then hands itself back for the last checkpoint, taken once the
    /// deliveries in flight have finished.
    pub async fn run(mut self, shutdown: CancellationToken) -> Watcher {
        let mut every = tokio::time::interval(SAMPLE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await; // the first tick is immediate; start() has just checkpointed
        loop {
            tokio::select! {
                _ = every.tick() => {
                    match self.tick(false) {
                        Ok(()) => {}
                        // Logged once by the store; checkpointed again once it is reopened.
                        Err(e) if e.is_transient() => {
                            tracing::debug!(error = %e, "cannot checkpoint the run time");
                        }
                        Err(e) => tracing::error!(error = %e, "cannot checkpoint the run time"),
                    }
                }
                _ = shutdown.cancelled() => return self,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: i64 = 86_400_000;

    fn sample(wall_ms: i64, mono_ms: u64, boot: Option<&str>) -> Sample {
        Sample {
            wall_ms,
            mono_ms,
            boot_id: boot.map(str::to_owned),
        }
    }

    #[test]
    fn expiry_table() {
        let hour = Duration::from_secs(3600);
        // (now, queued, max_age, expired)
        let table: &[(u64, u64, Duration, bool)] = &[
            (0, 0, hour, false),
            (3_600_000, 0, hour, false), // exactly max_age: not yet
            (3_600_001, 0, hour, true),
            (10_000_000, 6_400_001, hour, false),
            (10_000_000, 6_399_999, hour, true),
            (5, 10, Duration::from_millis(1), false), // queued after a lost checkpoint
            (u64::MAX, 0, Duration::from_secs(u64::MAX), false),
        ];
        for &(now, queued, max_age, want) in table {
            assert_eq!(
                expired(now, queued, max_age),
                want,
                "now {now}, queued {queued}, max_age {max_age:?}"
            );
        }
    }

    #[test]
    fn a_retry_due_after_expiry_comes_just_past_it() {
        let hour = Duration::from_secs(3600);
        let s = Duration::from_secs;
        // (now, queued, max_age, retry in, taken up in)
        let table: &[(u64, u64, Duration, Duration, Duration)] = &[
            (0, 0, hour, s(10), s(10)),
            (0, 0, s(20), hour, s(21)),
            (15_000, 0, s(20), hour, s(6)),
            (15_000, 0, s(20), s(3), s(3)),
            (30_000, 0, s(20), s(5), s(1)), // expired in flight
            (0, 5_000, s(20), hour, s(26)), // queued after a lost checkpoint
            (0, 0, Duration::MAX, hour, hour),
        ];
        for &(now, queued, max_age, retry_in, want) in table {
            let got = retry_before_expiry(now, queued, max_age, retry_in);
            assert_eq!(got, want, "now {now}, queued {queued}, max_age {max_age:?}");
            let taken_up_at = now + got.as_millis() as u64;
            if got < retry_in {
                assert!(expired(taken_up_at, queued, max_age), "{taken_up_at}");
            }
        }
    }

    #[test]
    fn run_clock_counts_on_from_its_base() {
        let clock = RunClock::starting_at(5_000);
        let first = clock.uptime_ms();
        assert!((5_000..15_000).contains(&first), "{first}");
        std::thread::sleep(Duration::from_millis(30));
        assert!(clock.uptime_ms() >= first + 30);
        let record = |queued_at_uptime_ms| ExportRecord {
            queued_at_uptime_ms,
            ..crate::store::codec::tests::sample_export()
        };
        assert!(clock.expired(&record(0), Duration::from_secs(4)));
        assert!(!clock.expired(&record(2_000), Duration::from_secs(4)));
    }

    #[test]
    fn jump_table() {
        // (earlier, later, jump, is a jump)
        let table = [
            (
                sample(1_000, 10, None),
                sample(2_000, 1_010, None),
                0,
                false,
            ),
            (
                sample(1_000, 10, None),
                sample(1_000 + 10 * DAY_MS, 1_010, None),
                10 * DAY_MS - 1_000,
                true,
            ),
            (
                sample(DAY_MS, 0, None),
                sample(1_000, 1_000, None),
                -DAY_MS,
                true,
            ),
            (sample(0, 0, None), sample(60_000, 0, None), 60_000, false), // at the threshold
            (sample(0, 0, None), sample(60_001, 0, None), 60_001, true),
            (sample(0, 0, None), sample(-60_001, 0, None), -60_001, true),
            // A slewing clock drifts by milliseconds: no jump.
            (sample(0, 0, None), sample(5_005, 5_000, None), 5, false),
            // Values a damaged clock record may hold: the most either way, no overflow.
            (
                sample(i64::MIN, 0, None),
                sample(i64::MAX, 0, None),
                i64::MAX,
                true,
            ),
            (
                sample(0, u64::MAX, None),
                sample(0, 0, None),
                i64::MAX,
                true,
            ),
            (
                sample(0, 0, None),
                sample(i64::MIN, u64::MAX, None),
                i64::MIN,
                true,
            ),
        ];
        for (earlier, later, want, jump) in table {
            let by = jump_ms(&earlier, &later);
            assert_eq!(by, want, "{earlier:?} -> {later:?}");
            assert_eq!(is_jump(by), jump, "{by} ms");
        }
    }

    #[test]
    fn startup_jump_table() {
        let last = |wall_ms, boot: Option<&str>, boot_ms| ClockRecord {
            wall_ms,
            boot_id: boot.map(str::to_owned),
            boot_ms,
            ..ClockRecord::default()
        };
        let t = 1_800_000_000_000i64;
        // (last checkpoint, now, jump)
        let table = [
            // Never checkpointed.
            (last(0, None, None), sample(t, 5, Some("b")), None),
            // Same boot, 10 s later on both clocks: no jump.
            (
                last(t, Some("b"), Some(1_000)),
                sample(t + 10_000, 11_000, Some("b")),
                None,
            ),
            // Same boot: stopped while 10 days behind, started with the clock right.
            (
                last(t - 10 * DAY_MS, Some("b"), Some(1_000)),
                sample(t, 6_000, Some("b")),
                Some(10 * DAY_MS - 5_000),
            ),
            // Same boot, clock set back a day.
            (
                last(t, Some("b"), Some(1_000)),
                sample(t - DAY_MS + 2_000, 3_000, Some("b")),
                Some(-DAY_MS),
            ),
            // Another boot, 10 days later: the host may have been off that long.
            (
                last(t - 10 * DAY_MS, Some("a"), Some(1_000)),
                sample(t, 6_000, Some("b")),
                None,
            ),
            // Another boot, the clock behind the last checkpoint: a jump of at least that.
            (
                last(t, Some("a"), Some(1_000)),
                sample(t - DAY_MS, 6_000, Some("b")),
                Some(-DAY_MS),
            ),
            // No boot clock now: judged like another boot.
            (
                last(t, Some("a"), Some(1_000)),
                sample(t - 30_000, 6_000, None),
                None,
            ),
            // A damaged record: the most either way, no overflow.
            (
                last(i64::MAX, Some("a"), Some(1_000)),
                sample(i64::MIN, 6_000, None),
                Some(i64::MIN),
            ),
            (
                last(i64::MIN, Some("b"), Some(1_000)),
                sample(t, 6_000, Some("b")),
                Some(i64::MAX - 5_000),
            ),
            // The same boot id with the boot clock behind the checkpoint (a container's own
            // uptime, started again with it): judged like another boot.
            (
                last(t - 10 * DAY_MS, Some("b"), Some(50_000_000)),
                sample(t, 6_000, Some("b")),
                None,
            ),
            (
                last(t, Some("b"), Some(50_000_000)),
                sample(t - DAY_MS, 6_000, Some("b")),
                Some(-DAY_MS),
            ),
        ];
        for (record, now, want) in table {
            assert_eq!(
                startup_jump_ms(&record, &now),
                want,
                "{record:?} -> {now:?}"
            );
        }
    }

    #[test]
    fn records_count_jumps_and_checkpoints() {
        let record = ClockRecord::default()
            .with_jump(Jump {
                by_ms: 5,
                noticed_at_ms: 1,
            })
            .with_jump(Jump {
                by_ms: -DAY_MS,
                noticed_at_ms: 2,
            })
            .checkpointed(&sample(7, 8, Some("b")), 9);
        assert_eq!(record.jumps, 2);
        assert_eq!(record.last_jump.unwrap().by_ms, -DAY_MS);
        assert_eq!(
            (record.uptime_ms, record.wall_ms, record.boot_ms),
            (9, 7, Some(8))
        );
    }

    #[test]
    fn proc_uptime_and_descriptions() {
        assert_eq!(parse_proc_uptime("345.87 1234.00\n"), Some(345_870));
        assert_eq!(parse_proc_uptime(""), None);
        assert_eq!(parse_proc_uptime("x 1"), None);
        assert_eq!(describe_jump(10 * DAY_MS), "+10d 0h 0m 0s");
        assert_eq!(describe_jump(-DAY_MS - 61_000), "-1d 0h 1m 1s");
        assert_eq!(describe_jump(90_000), "+1m 30s");
        assert_eq!(describe_jump(-3_700_000), "-1h 1m 40s");
        assert_eq!(describe_jump(-DAY_MS + 400), "-1d 0h 0m 0s");
        assert_eq!(describe_jump(10 * DAY_MS - 499), "+10d 0h 0m 0s");
        assert_eq!(describe_jump(90_600), "+1m 31s");
        let rounded = [
            (0, 0),
            (499, 0),
            (500, 1),
            (-500, -1),
            (-86_399_600, -86_400),
            (i64::MAX, i64::MAX / 1000),
            (i64::MIN, i64::MIN / 1000),
        ];
        for (ms, s) in rounded {
            assert_eq!(whole_seconds(ms), s, "{ms} ms");
        }
    }
}
