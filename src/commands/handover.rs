//! `outpost nats hand-over` and `outpost nats take-over`: moving stream partitions, with their
//! profiles' stored versions, from one agent's store to another's ([`crate::store::handover`]).
//!
//! The claims bucket carries the move across the fleet: a hand-over makes each partition's
//! claim say which file it was handed over in ([`claim::handed_over`]), which no store holds,
//! so no agent consumes the partition meanwhile; a take-over of that very file claims it for
//! the taking store, first as being taken over by it ([`claim::taking_over`]), before its
//! store is changed, so that of two take-overs of the same file from two stores one at most
//! stores anything. Claims are read before the store is touched and written by
//! compare-and-set, so a stale file, one of another fleet, or two commands at once are refused
//! rather than obeyed.

use std::path::Path;

use serde_json::Value;

use super::nats::{nats_config, STREAM_END_WAIT};
use super::{as_store_owner, runtime, Backend, CliError};
use crate::admin::{AdminError, AdminRequest};
use crate::config::Config;
use crate::source::claim::{self, ReadClaim};
use crate::source::config::NatsSource;
use crate::store::handover_file::{FileReader, Terms};
use crate::store::StoreUse;

/// A path as the agent, whose working folder is not ours, would read it.
fn absolute(file: &Path) -> Result<String, CliError> {
    let path = std::path::absolute(file)
        .map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))?;
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| CliError::Usage(format!("{}: the path is not UTF-8", path.display())))
}

/// What the two agents of a move must agree on, from the config (a running agent uses its
/// own: see [`crate::server::admin::AdminState`]).
fn terms(config: &Config) -> Terms {
    config
        .move_terms()
        .expect("checked by nats_config: the config has [source.nats]")
}

/// The claims bucket of the config's stream, within [`STREAM_END_WAIT`].
async fn open_claims(nats: &NatsSource) -> Result<async_nats::jetstream::kv::Store, String> {
    match tokio::time::timeout(STREAM_END_WAIT, claim::open(nats)).await {
        Ok(opened) => opened.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "NATS did not answer within {} s",
            STREAM_END_WAIT.as_secs()
        )),
    }
}

/// The claims of `partitions`, with this process's rights (NATS credential files), before
/// it acts as the store's owner; and the bucket, to write them after.
fn read_claims(
    runtime: &tokio::runtime::Runtime,
    nats: &NatsSource,
    partitions: &[u32],
    why: &str,
) -> Result<(async_nats::jetstream::kv::Store, Vec<ReadClaim>), CliError> {
    runtime.block_on(async {
        let bucket = open_claims(nats)
            .await
            .map_err(|e| CliError::Failure(format!("the claims could not be read ({e}): {why}")))?;
        let mut read = Vec::new();
        for &partition in partitions {
            let claim = claim::read(&bucket, partition)
                .await
                .map_err(|e| CliError::Failure(e.to_string()))?;
            read.push(claim);
        }
        Ok((bucket, read))
    })
}

/// This store's claim, as its agent makes it.
fn our_claim(backend: &Backend) -> Result<String, CliError> {
    let stats = backend.execute(&AdminRequest::Stats)?;
    let id = stats["store_id"]
        .as_str()
        .and_then(|id| u32::from_str_radix(id, 16).ok())
        .ok_or_else(|| CliError::Failure("the store did not say its id".into()))?;
    Ok(claim::holder(id, &claim::host_name()))
}

/// The claims as a take-over made them say it is taking the file over.
struct Reservation {
    /// Every claim read, as it now is.
    now: Vec<ReadClaim>,
    /// Those this run changed from the file's hand-over, as written.
    made: Vec<ReadClaim>,
}

/// Makes every claim of `read` that says `handed`, or already `taking` ([`claim::taking_over`]),
/// say `taking`, by compare-and-set. Should one have changed since it was read (another
/// take-over of the file, from another store, wrote it first, or the hand-over was run again),
/// those made here are put back and the take-over is refused, before anything is stored.
fn reserve_claims(
    runtime: &tokio::runtime::Runtime,
    bucket: &async_nats::jetstream::kv::Store,
    read: Vec<ReadClaim>,
    (handed, taking): (&str, &str),
    file: &Path,
) -> Result<Reservation, CliError> {
    let mut made: Vec<ReadClaim> = Vec::new();
    let mut now = Vec::with_capacity(read.len());
    for claim in read {
        let was = claim.holder.clone();
        if was.as_deref() != Some(handed) && was.as_deref() != Some(taking) {
            now.push(claim);
            continue;
        }
        match runtime.block_on(claim::replace(bucket, &claim, taking)) {
            Ok(written) => {
                if was.as_deref() == Some(handed) {
                    made.push(written.clone());
                }
                now.push(written);
            }
            Err(e) => {
                let left = put_back(runtime, bucket, &made, handed);
                let stored = if was.as_deref() == Some(taking) {
                    "this store's take-over begun before may have stored part of the file here"
                } else {
                    "nothing was stored here"
                };
                return Err(CliError::Failure(format!(
                    "{e}; {stored} (another take-over of {}, from another store, may have begun, \
                     or the hand-over was run again){left}",
                    file.display()
                )));
            }
        }
    }
    Ok(Reservation { now, made })
}

/// Makes the claims `made` by [`reserve_claims`] say `handed` again, by compare-and-set; says
/// which could not be (empty when all were).
fn put_back(
    runtime: &tokio::runtime::Runtime,
    bucket: &async_nats::jetstream::kv::Store,
    made: &[ReadClaim],
    handed: &str,
) -> String {
    let left: Vec<String> = made
        .iter()
        .filter(|written| {
            runtime
                .block_on(claim::replace(bucket, written, handed))
                .is_err()
        })
        .map(|written| written.partition.to_string())
        .collect();
    if left.is_empty() {
        String::new()
    } else {
        format!(
            "; the claims of partition(s) {} could not be put back as they were read",
            left.join(", ")
        )
    }
}

/// `error` of a take-over's store part once the claims name this store's take-over: they are
/// left so, since the store may hold part of the file.
fn still_taking(error: CliError, taking: &str) -> CliError {
    let then = format!(
        "the partitions' claims say \"{taking}\": run this take-over again once this is fixed \
         (it goes on where it stopped)"
    );
    match error {
        CliError::Failure(message) | CliError::Refused(message) => {
            CliError::Failure(format!("{message}; {then}"))
        }
        CliError::InDoubt(message) => CliError::InDoubt(format!("{message}; {then}")),
        CliError::Store(e) => CliError::Failure(format!("{e}; {then}")),
        other => other,
    }
}

/// The refusal of a take-over whose file another store is taking over, if `claim` says so.
fn taken_by_another(claim: &ReadClaim, handed: &str, file: &Path) -> Option<CliError> {
    let holder = claim.holder.as_deref()?;
    let taker = claim::taker(holder, handed)?;
    Some(CliError::Failure(format!(
        "partition {}'s claim says {holder}: {taker} is taking {} over (a take-over of the same \
         file, from another store); nothing was stored here. That take-over goes on when run \
         again on its store. Only if that store is lost, or will never consume these partitions \
         (it may hold some of their profiles), run the hand-over again on the store that wrote \
         the file with --force, which makes the claims name the file alone",
        claim.partition,
        file.display()
    )))
}

/// What a move prints as it goes once the store's part is done: a line that cannot be
/// written (a full disk, a reader gone) is remembered rather than returned, since the move
/// must still be finished (its claims written), and told once it is.
struct Report {
    out: Box<dyn std::io::Write>,
    failed: Option<std::io::Error>,
}

impl Default for Report {
    fn default() -> Report {
        Report {
            out: Box::new(std::io::stdout()),
            failed: None,
        }
    }
}

impl Report {
    fn line(&mut self, line: std::fmt::Arguments) {
        if self.failed.is_none() {
            if let Err(e) = writeln!(self.out, "{line}") {
                self.failed = Some(e);
            }
        }
    }

    /// Done, or the failure to tell it: `done` says what was done.
    fn finish(self, done: &str) -> Result<(), CliError> {
        match self.failed {
            None => Ok(()),
            Some(e) => Err(CliError::Failure(format!(
                "{done}, but its report could not be written: {e}"
            ))),
        }
    }
}

/// Writes `value` into every claim read that does not say it yet.
fn write_claims(
    runtime: &tokio::runtime::Runtime,
    bucket: &async_nats::jetstream::kv::Store,
    read: &[ReadClaim],
    value: &str,
    then: &str,
    report: &mut Report,
) -> Result<(), CliError> {
    for claim in read {
        if claim.holder.as_deref() != Some(value) {
            runtime
                .block_on(claim::replace(bucket, claim, value))
                .map_err(|e| {
                    CliError::Failure(format!("the store's part is done, but {e}. {then}"))
                })?;
        }
        report.line(format_args!(
            "partition {:<6} claim says: {value}",
            claim.partition
        ));
    }
    Ok(())
}

fn partitions_moved(answer: &Value) -> Vec<(u64, Option<u64>)> {
    answer["partitions"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|p| Some((p["partition"].as_u64()?, p["seq"].as_u64())))
                .collect()
        })
        .unwrap_or_default()
}

fn describe_position(seq: Option<u64>) -> String {
    match seq {
        Some(seq) => format!("consumed up to stream sequence {seq}"),
        None => "never consumed".to_string(),
    }
}

/// `outpost nats hand-over PARTITIONS FILE`.
pub(super) fn hand_over(
    config: &Config,
    partitions: &str,
    file: &Path,
    force: bool,
) -> Result<(), CliError> {
    let nats = nats_config(config)?;
    let partitions = crate::source::partition::parse_owned(partitions, nats.partitions)
        .map_err(|e| CliError::Usage(format!("partitions: {e}")))?;
    let request = |write_only| -> Result<AdminRequest, CliError> {
        Ok(AdminRequest::HandOver {
            partitions: partitions.clone(),
            terms: terms(config),
            path: absolute(file)?,
            write_only,
        })
    };
    let runtime = runtime()?;
    let (bucket, read) = read_claims(
        &runtime,
        nats,
        &partitions,
        "a hand-over checks that no other store holds them, and then writes them",
    )?;
    as_store_owner(config, StoreUse::Existing)?;
    let backend = Backend::connect_existing(config)?;
    let ours = our_claim(&backend)?;
    // A claim that says handed over is this hand-over's own only when run again, with its
    // file at `file`.
    let this_file = std::fs::File::open(file)
        .ok()
        .and_then(|f| FileReader::open(std::io::BufReader::new(f)).ok())
        .map(|(header, _)| claim::handed_over(&header.file_id()));
    // One saying that another store is taking the file over is given up only with `force`:
    // that store may hold part of the file, or all of it.
    let being_taken = |holder: &str| {
        this_file
            .as_deref()
            .is_some_and(|handed| claim::taker(holder, handed).is_some())
    };
    let this_files = |holder: &str| this_file.as_deref() == Some(holder) || being_taken(holder);
    for claim in &read {
        match &claim.holder {
            Some(holder) if holder.starts_with(claim::HANDED_OVER) && !this_files(holder) => {
                return Err(CliError::Failure(format!(
                    "partition {}'s claim says {holder}: another hand-over of it waits for its \
                     take-over, and this store's versions of it are not the latest",
                    claim.partition
                )));
            }
            Some(holder) if !force && being_taken(holder) => {
                return Err(CliError::Failure(format!(
                    "partition {}'s claim says {holder}: that store's take-over of {} has not \
                     finished; run it again there. Only if that store is lost, or will never \
                     consume these partitions (it may hold some of their profiles), give --force \
                     to make the claims name the file alone, for another store to take it over",
                    claim.partition,
                    file.display()
                )));
            }
            Some(holder) if holder.starts_with(claim::HANDED_OVER) => {}
            Some(holder) if claim::judge(holder, &ours) != claim::Claim::Ours => {
                return Err(CliError::Failure(format!(
                    "partition {} is claimed by {holder}, not by this store ({ours}): another \
                     agent consumes it, and its stored versions are there, not here",
                    claim.partition
                )));
            }
            _ => {}
        }
    }
    // An agent that stopped before it answered may have done what was asked, or part of it.
    let run_again = |e: AdminError| match e {
        AdminError::Unanswered(text) => AdminError::Unanswered(format!(
            "{text}; if the agent stopped, run this hand-over again once it is back: it goes on \
             where it stopped"
        )),
        other => other,
    };
    // The file first: a running agent writes it, and may see another `/tmp` than this
    // command (systemd's `PrivateTmp`). Nothing is forgotten before the file is seen here.
    let written = backend.execute(&request(true)?).map_err(run_again)?;
    let file_id = written["file_id"]
        .as_str()
        .ok_or_else(|| CliError::Failure("the store did not name the file".into()))?;
    let seen = std::fs::File::open(file)
        .ok()
        .and_then(|f| FileReader::open(std::io::BufReader::new(f)).ok())
        .map(|(header, _)| header.file_id());
    if seen.as_deref() != Some(file_id) {
        return Err(file_not_seen(file, &written));
    }
    let answer = backend.execute(&request(false)?).map_err(run_again)?;
    drop(backend);
    let mut report = Report::default();
    for (partition, seq) in partitions_moved(&answer) {
        report.line(format_args!(
            "partition {partition:<6} handed over, {}",
            describe_position(seq)
        ));
    }
    let in_file = answer["profiles_in_file"].as_u64().unwrap_or(0);
    if written["wrote"].as_bool() == Some(true) {
        report.line(format_args!(
            "{in_file} profile(s) written to {}",
            file.display()
        ));
    } else {
        report.line(format_args!(
            "{} holds {in_file} profile(s), written before (left as it is)",
            file.display()
        ));
    }
    report.line(format_args!(
        "{} profile(s) forgotten in this store",
        answer["forgotten"].as_u64().unwrap_or(0)
    ));
    let file_id = answer["file_id"]
        .as_str()
        .ok_or_else(|| CliError::Failure("the store did not name the file".into()))?;
    write_claims(
        &runtime,
        &bucket,
        &read,
        &claim::handed_over(file_id),
        "Until the claims say so, no other agent can take the partitions over: run this \
         hand-over again (it goes on where it stopped)",
        &mut report,
    )?;
    report.finish("the hand-over is done")
}

/// The refusal of a take-over whose file the claim does not name.
fn not_latest(claim: &ReadClaim, handed: &str, file: &Path) -> CliError {
    CliError::Failure(format!(
        "partition {}'s claim says {}, not \"{handed}\": {} is not the partition's latest \
         hand-over (it was taken over since, or belongs to another fleet), or the hand-over \
         could not write the claims (run it again)",
        claim.partition,
        claim.holder.as_deref().unwrap_or("nothing (released)"),
        file.display()
    ))
}

/// `outpost nats take-over FILE`.
pub(super) fn take_over(config: &Config, file: &Path) -> Result<(), CliError> {
    let nats = nats_config(config)?;
    // With this process's rights, as the claims are read.
    let opened = std::fs::File::open(file)
        .map_err(|e| CliError::Failure(format!("cannot open {}: {e}", file.display())))?;
    let (header, _) = FileReader::open(std::io::BufReader::new(opened))
        .map_err(|e| CliError::Failure(format!("{}: {e}", file.display())))?;
    let partitions: Vec<u32> = header.partitions.iter().map(|p| p.partition).collect();
    let runtime = runtime()?;
    let (bucket, read) = read_claims(
        &runtime,
        nats,
        &partitions,
        "a take-over checks them first, as they tell whether this file is the partitions' \
         latest hand-over",
    )?;
    let handed = claim::handed_over(&header.file_id());
    // An agent that has not run yet takes partitions over into a store made for it, once
    // the claims say the file's hand-over waits for it: a claim naming a store cannot be its.
    let refusal = |claim: &ReadClaim| {
        taken_by_another(claim, &handed, file).unwrap_or_else(|| not_latest(claim, &handed, file))
    };
    if !crate::store::Store::exists_at(&config.storage.path)? {
        if let Some(claim) = read.iter().find(|c| c.holder.as_deref() != Some(&handed)) {
            return Err(refusal(claim));
        }
    }
    as_store_owner(config, StoreUse::Make)?;
    let backend = Backend::connect(config)?;
    let ours = our_claim(&backend)?;
    let taking = claim::taking_over(&handed, &ours);
    let mut ours_already = false;
    for claim in &read {
        match claim.holder.as_deref() {
            // The file's hand-over, or this store's take-over of it run again.
            Some(holder) if holder == handed || holder == taking => {}
            Some(holder) if claim::judge(holder, &ours) == claim::Claim::Ours => {
                ours_already = true
            }
            _ => return Err(refusal(claim)),
        }
    }
    let path = absolute(file)?;
    // A claim of this store's is a take-over run again: only a finished one fits it.
    let finished_only = ours_already;
    let reserved_before = read.iter().any(|c| c.holder.as_deref() == Some(&taking));
    let reserved_then = |e: AdminError, reserved| match reserved {
        true => still_taking(e.into(), &taking),
        false => CliError::from(e),
    };
    // The store's refusals first, with the claims as they were; then the claims say this
    // store is taking the file over, and only then is anything stored.
    let check = AdminRequest::CheckTakeOver {
        path: path.clone(),
        terms: terms(config),
        finished_only,
    };
    backend
        .execute(&check)
        .map_err(|e| reserved_then(e, reserved_before))?;
    let Reservation { now: read, made } =
        reserve_claims(&runtime, &bucket, read, (&handed, &taking), file)?;
    let reserved = read.iter().any(|c| c.holder.as_deref() == Some(&taking));
    let request = AdminRequest::TakeOver {
        path,
        terms: terms(config),
        finished_only,
    };
    let answer = match backend.execute(&request) {
        Ok(answer) => answer,
        // What the check passed changed since (an update of one of the file's profiles, the
        // agent restarted owning the partitions): the store changed nothing, so neither do
        // the claims.
        Err(AdminError::Refused(text)) => {
            let left = put_back(&runtime, &bucket, &made, &handed);
            let put = if made.is_empty() {
                ""
            } else {
                ", and the claims it reserved were put back"
            };
            let refusal =
                AdminError::Refused(format!("{text}; this take-over stored nothing{put}{left}"));
            return Err(reserved_then(refusal, reserved_before || !left.is_empty()));
        }
        Err(e) => return Err(reserved_then(e, reserved)),
    };
    drop(backend);
    let mut report = Report::default();
    for (partition, seq) in partitions_moved(&answer) {
        report.line(format_args!(
            "partition {partition:<6} taken over, {}",
            describe_position(seq)
        ));
    }
    report.line(format_args!(
        "{} profile(s) stored from {} (handed over by store {}; {} in the file)",
        answer["stored"].as_u64().unwrap_or(0),
        file.display(),
        answer["from_store"].as_str().unwrap_or("?"),
        answer["profiles_in_file"].as_u64().unwrap_or(0)
    ));
    write_claims(
        &runtime,
        &bucket,
        &read,
        &ours,
        "Run this take-over again once NATS answers",
        &mut report,
    )?;
    let next = "add the partitions to source.nats.owned, if not yet, and (re)start the agent";
    report.line(format_args!("{next}"));
    report.finish(&format!("the take-over is done ({next})"))
}

/// The agent wrote the hand-over file where this command does not see it. An agent of a build
/// before the file was written alone first (it ignores being asked to) has forgotten the
/// partitions' profiles already, and says how many: the file it wrote is then their only copy.
fn file_not_seen(file: &Path, written: &Value) -> CliError {
    let private_tmp =
        "the agent's service may have a private /tmp, as systemd's PrivateTmp gives it";
    match written["forgotten"].as_u64().filter(|&n| n > 0) {
        None => CliError::Failure(format!(
            "the agent wrote {} where this command does not find it ({private_tmp}): nothing \
             was forgotten. Run the hand-over again with a path both see, such as one in the \
             store's folder; the partitions stay marked as being handed over until then",
            file.display()
        )),
        Some(forgotten) => CliError::Failure(format!(
            "the agent, of an earlier build, wrote {} where this command does not find it \
             ({private_tmp}) and has forgotten {forgotten} profile(s) of the partitions already: \
             that file is their only copy. Copy it from where the agent sees it (with \
             PrivateTmp, under /tmp/systemd-private-*) to a path both see, such as one in the \
             store's folder, before the agent restarts, which may delete it; run the hand-over \
             again with that path, then take the file over",
            file.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line that cannot be written leaves the move to finish, and is told at its end.
    #[test]
    fn a_report_that_cannot_be_written_is_told_once_the_move_is_done() {
        struct Full;
        impl std::io::Write for Full {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::from_raw_os_error(28))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut report = Report {
            out: Box::new(Full),
            failed: None,
        };
        report.line(format_args!("partition 6      handed over"));
        report.line(format_args!("partition 7      handed over"));
        let error = report.finish("the hand-over is done").unwrap_err();
        assert_eq!(
            error.to_string(),
            "the hand-over is done, but its report could not be written: No space left on device (os error 28)"
        );
        assert_eq!(error.exit_code(), 1);
        let written = Report {
            out: Box::new(Vec::new()),
            failed: None,
        };
        assert!(written.finish("the take-over is done").is_ok());
    }

    #[test]
    fn a_file_not_seen_says_whether_profiles_were_forgotten() {
        let file = Path::new("/tmp/moved");
        let cases = [
            (serde_json::json!({"file_id": "f", "forgotten": 0}), "nothing was forgotten"),
            (serde_json::json!({"file_id": "f"}), "nothing was forgotten"),
            (
                serde_json::json!({"file_id": "f", "forgotten": 12}),
                "has forgotten 12 profile(s) of the partitions already: that file is their only copy",
            ),
        ];
        for (written, said) in cases {
            let error = file_not_seen(file, &written).to_string();
            assert!(
                error.contains(said) && error.contains("/tmp/moved"),
                "{written}: {error}"
            );
        }
    }
}
