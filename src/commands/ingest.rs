//! `outpost ingest`: a file or stdin, validated whole, then committed in chunks.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek};
use std::path::Path;

use super::progress::Progress;
use super::{Backend, CliError};
use crate::admin::AdminRequest;
use crate::config::Config;
use crate::profile::layout::Layout;
use crate::profile::prune::KeepTree;
use crate::profile::update::{FutureLimit, InputError, UpdateReader};
use crate::profile::Update;
use crate::source::partition::{partition_of, Ownership};
use crate::store::committer::{what_was_stored, IN_DOUBT};
use crate::store::{BatchSummary, StoreError};

/// How many updates `outpost ingest` commits (and flushes) at a time: bounds memory.
const INGEST_CHUNK: usize = 1_000;
/// A chunk also ends once it holds this much input (and the update that passed it): a
/// thousand updates of a few MB each would take GBs, in this process and, through the socket,
/// in the agent's.
const INGEST_CHUNK_BYTES: u64 = 16 << 20;

/// Says how much of the input was stored before `error` (a full disk, say): the chunks before
/// it were stored, and the chunk of `in_flight` updates may have been, or part of it, when
/// the agent did not answer for it or answered so, or when its write or flush here met an
/// I/O error (sled writes in the background too, so a chunk whose flush failed may be on the
/// disk all the same).
fn partly_stored(error: CliError, stored: u64, in_flight: usize, count: u64) -> CliError {
    let refused = matches!(
        error,
        CliError::Refused(_) | CliError::Store(StoreError::PartitionGivenAway { .. })
    );
    let (message, in_doubt) = match error {
        CliError::Failure(message) | CliError::Refused(message) => (message, 0),
        // The agent could not read what was sent (an agent of an earlier build, an update
        // nested as deep as JSON allows, two levels deeper in the request): what came before
        // it was stored all the same.
        CliError::Usage(message) if stored > 0 => (message, 0),
        CliError::InDoubt(message) => {
            let plain = message.strip_prefix(&format!("{IN_DOUBT}: "));
            (
                plain.map_or(message.clone(), str::to_owned),
                in_flight as u64,
            )
        }
        CliError::Store(e) => (e.to_string(), 0),
        other => return other,
    };
    let what = what_was_stored(stored, in_doubt, count);
    let partly = |message: String| CliError::PartlyStored {
        message,
        stored,
        in_doubt,
        updates: count,
    };
    if stored + in_doubt == 0 || refused {
        return partly(format!("{message}; {what}"));
    }
    partly(format!(
        "{message}; {what}; once this is fixed, run the same input again with --skip {stored}, \
         which stores the rest (run whole, the updates stored would be applied again: an update \
         without a timestamp, or of a profile the input later deletes, would count as new)"
    ))
}

/// What `outpost ingest` says when a signal stopped it between two requests: `stored`
/// updates from the input's start are stored, none after them.
fn stopped_as_asked(stored: u64, count: u64) -> CliError {
    let what = what_was_stored(stored, 0, count);
    let message = match stored {
        0 => format!("{}; {what}", super::interrupt::STOPPED),
        _ => format!(
            "{}; {what}; run the same input again with --skip {stored}, which stores the rest",
            super::interrupt::STOPPED
        ),
    };
    CliError::PartlyStored {
        message,
        stored,
        in_doubt: 0,
        updates: count,
    }
}

/// What `ingest --json` prints when a signal ends it before it stored anything: as
/// [`error_json`] (`stored` counts from the input's start, `--skip` included), a line.
pub(super) fn stopped_before_parts_json(skip: u64) -> String {
    let error = serde_json::json!({
        "error": super::interrupt::STOPPED_BEFORE_PARTS,
        "stored": skip,
    });
    format!("{error}\n")
}

/// What `ingest --json` prints of a failure: the message, and how many updates from the
/// input's start are stored (`skip` where this run stored none: those an earlier run stored),
/// and for one that stopped partway, how many may have been after them.
pub(super) fn error_json(error: &CliError, skip: u64) -> serde_json::Value {
    match error {
        CliError::PartlyStored {
            message,
            stored,
            in_doubt,
            updates,
        } => serde_json::json!({
            "error": message,
            "stored": stored,
            "in_doubt": in_doubt,
            "updates": updates,
        }),
        CliError::SkipPastEnd { updates, .. } => {
            serde_json::json!({ "error": error.to_string(), "stored": updates })
        }
        other => serde_json::json!({ "error": other.to_string(), "stored": skip }),
    }
}

/// How the input was found changed in the pass that stores it.
enum Changed {
    /// It holds more updates than the `checked`: those were stored, the others not.
    Grew { checked: u64 },
    /// It holds fewer updates than were checked.
    Shrank,
    /// An update checked good is refused now.
    Unreadable(InputError),
}

impl std::fmt::Display for Changed {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Changed::Grew { checked } => write!(
                f,
                "it holds more updates than the {checked} checked, which were stored; those \
                 added after them were not (ingest them apart)"
            ),
            Changed::Shrank => f.write_str("it holds fewer updates than were checked"),
            Changed::Unreadable(e) => e.fmt(f),
        }
    }
}

/// What the store's statistics say of its partitions: those it handed over, and, from a
/// running agent, those it owns. When they say nothing (an agent of an earlier build), or
/// cannot be read, each chunk is still checked as it is stored.
#[derive(Default)]
struct Partitions {
    handed_over: Option<(u32, BTreeSet<u32>)>,
    owned_by_agent: Option<Ownership>,
}

fn partitions(backend: &Backend) -> Partitions {
    let stats = match backend.execute(&AdminRequest::Stats) {
        Ok(stats) => stats,
        Err(e) => {
            tracing::debug!(error = %e, "the store's statistics, for its partitions");
            serde_json::Value::Null
        }
    };
    // (partition count, partitions) of one of the statistics' entries.
    let read = |entry: &serde_json::Value| {
        let count = entry["partition_count"].as_u64();
        let count = count
            .and_then(|c| u32::try_from(c).ok())
            .filter(|c| *c > 0)?;
        let partitions = entry["partitions"].as_array().into_iter().flatten();
        let partitions = partitions.filter_map(|p| p.as_u64()?.try_into().ok());
        Some((
            count,
            partitions
                .filter(|&p: &u32| p < count)
                .collect::<Vec<u32>>(),
        ))
    };
    Partitions {
        handed_over: read(&stats["handed_over"])
            .map(|(count, partitions)| (count, partitions.into_iter().collect())),
        owned_by_agent: read(&stats["owned"])
            .map(|(count, partitions)| Ownership::new(count, &partitions)),
    }
}

/// Opens the input file so that it can be read twice (once to validate every line, once to act
/// on them): for `-` standard input, and for a file that is not a regular file (a pipe such as
/// `<(zcat updates.gz)` or `/dev/stdin`, a FIFO), its contents spooled to a temporary file.
pub(super) fn open_input(path: &Path) -> Result<File, CliError> {
    if path == Path::new("-") {
        return spool(&mut std::io::stdin().lock(), "standard input");
    }
    let mut file = File::open(path)
        .map_err(|e| CliError::Failure(format!("cannot open {}: {e}", path.display())))?;
    let regular = file
        .metadata()
        .map_err(|e| CliError::Failure(format!("cannot read {}: {e}", path.display())))?
        .is_file();
    if regular {
        return Ok(file);
    }
    spool(&mut file, &path.display().to_string())
}

fn spool(input: &mut impl Read, what: &str) -> Result<File, CliError> {
    let mut spool = tempfile::tempfile()
        .map_err(|e| CliError::Failure(format!("cannot create a temporary file: {e}")))?;
    std::io::copy(input, &mut spool)
        .map_err(|e| CliError::Failure(format!("cannot read {what}: {e}")))?;
    Ok(spool)
}

/// Ingests a file, or stdin for `-` (spooled to a temporary file so it can be read twice).
pub fn ingest_path(
    backend: &Backend,
    config: &Config,
    path: &Path,
) -> Result<BatchSummary, CliError> {
    let mut file = open_input(path)?;
    ingest_file(backend, config, &mut file)
}

/// An input the first pass found good: its count of updates, as judged at `limit`.
pub struct Checked {
    count: u64,
    limit: FutureLimit,
}

impl Checked {
    /// `--skip N` past what the input holds is refused, before anything is stored or made.
    pub fn refuse_skip_past_the_end(&self, skip: u64) -> Result<(), CliError> {
        match skip > self.count {
            true => Err(CliError::SkipPastEnd {
                skip,
                updates: self.count,
            }),
            false => Ok(()),
        }
    }
}

/// What the store keeps of each update when this process stores it itself, pruned as they are
/// read: the parts dropped are checked, never built. The agent is sent whole updates and prunes
/// them by its own mapping, which may differ from this config's (edited while the agent runs):
/// pruned by this one, an attribute only the agent maps would read as removed.
fn kept_by(backend: Option<&Backend>, config: &Config) -> Option<KeepTree> {
    let local = backend.is_none_or(|b| matches!(b, Backend::Local(_)));
    local.then(|| KeepTree::for_mapping(&config.mapping))
}

/// The first pass: every update read as it will be stored, none in a partition the store
/// `handed_over`, and none whose JSON takes more than `most_sent` (what the running agent
/// takes of one). Refused whole, as over HTTP: one bad update stores nothing rather than the
/// chunks before it.
fn check_input<F: Read + Seek>(
    config: &Config,
    file: &mut F,
    keep: Option<&KeepTree>,
    partitions: Partitions,
    most_sent: Option<usize>,
) -> Result<Checked, CliError> {
    let Partitions {
        handed_over,
        owned_by_agent,
    } = partitions;
    // A running agent's own, else the config's.
    let ownership = owned_by_agent.or_else(|| {
        (config.nats.as_ref()).map(|nats| Ownership::new(nats.partitions, &nats.owned))
    });
    rewind(file)?;
    // One clock reading for the whole input, so both passes judge every line alike.
    let limit = FutureLimit {
        now: chrono::Utc::now(),
        max_future_s: config.ingest.max_future_s,
    };
    let mut count = 0u64;
    let mut reader = UpdateReader::new(BufReader::new(&mut *file)).within(limit);
    if let Some(keep) = keep {
        reader = reader.keeping(keep);
    }
    for update in reader {
        let update = update?;
        count += 1;
        if let Some(most) = most_sent {
            let size = update.json_len();
            if size > most {
                let refusal = super::backend::too_large_for_the_agent(&update, size, most);
                return Err(CliError::Refused(format!(
                    "update {count}: {refusal}; nothing was stored"
                )));
            }
        }
        if let Some(ownership) = &ownership {
            if let Some(partition) = ownership.not_owning(&update.id) {
                let refusal = ownership.refusal(&update.id, partition);
                return Err(CliError::Refused(format!(
                    "update {count}: {refusal}; nothing was stored"
                )));
            }
        }
        // A hand-over that begins after this pass is caught by each chunk's own check.
        if let Some((partition_count, partitions)) = &handed_over {
            let partition = partition_of(&update.id, *partition_count);
            if partitions.contains(&partition) {
                let refusal = StoreError::PartitionGivenAway {
                    id: update.id,
                    partition,
                };
                return Err(CliError::Refused(format!(
                    "update {count}: {refusal}; nothing was stored"
                )));
            }
        }
    }
    Ok(Checked { count, limit })
}

/// The first pass for a store not made yet, before it is made: refused input then leaves no
/// empty store behind. Such a store has handed nothing over.
pub fn check_before_making_store<F: Read + Seek>(
    config: &Config,
    file: &mut F,
) -> Result<Checked, CliError> {
    let partitions = Partitions::default();
    check_input(
        config,
        file,
        kept_by(None, config).as_ref(),
        partitions,
        None,
    )
}

/// The next `wanted` updates, or fewer once they hold [`INGEST_CHUNK_BYTES`] of input.
fn next_chunk<R: BufRead>(
    reader: &mut UpdateReader<'_, R>,
    wanted: usize,
) -> Result<Vec<Update>, Changed> {
    let from = reader.bytes_read();
    let mut chunk = Vec::new();
    while chunk.len() < wanted && reader.bytes_read() - from < INGEST_CHUNK_BYTES {
        match reader.next() {
            Some(update) => chunk.push(update.map_err(Changed::Unreadable)?),
            None => return Err(Changed::Shrank),
        }
    }
    Ok(chunk)
}

fn rewind<F: Seek>(file: &mut F) -> Result<(), CliError> {
    file.rewind()
        .map_err(|e| CliError::Failure(format!("cannot reread the input: {e}")))
}

/// Two passes so that memory stays bounded and a bad line stores nothing: the first validates
/// every line, the second commits in chunks. A crash during the second pass leaves a prefix
/// stored; [`ingest_checked`] with its count as `skip` stores the rest.
pub fn ingest_file<F: Read + Seek + Send>(
    backend: &Backend,
    config: &Config,
    file: &mut F,
) -> Result<BatchSummary, CliError> {
    ingest_checked(backend, config, file, None, 0)
}

/// [`ingest_file`], its first pass skipped when `checked` by [`check_before_making_store`]
/// and this process stores the input itself (an agent that made the store meanwhile prunes by
/// its own mapping, so the input is checked again as it will read it).
pub fn ingest_checked<F: Read + Seek + Send>(
    backend: &Backend,
    config: &Config,
    file: &mut F,
    checked: Option<Checked>,
    skip: u64,
) -> Result<BatchSummary, CliError> {
    let keep = kept_by(Some(backend), config);
    let checked = match checked {
        Some(checked) if keep.is_some() => checked,
        _ => check_input(
            config,
            file,
            keep.as_ref(),
            partitions(backend),
            backend.most_one_update_takes(),
        )?,
    };
    checked.refuse_skip_past_the_end(skip)?;
    let Checked { count, limit } = checked;
    rewind(file)?;
    super::interrupt::parts_begin();
    let progress = Progress::new(
        count - skip,
        0,
        "{bar:30} {pos}/{len} updates, {eta} left",
        "accepted",
    );
    // Chunks are parsed on a thread of their own while the previous chunk is committed; at
    // most two wait, so memory stays bounded. For the store itself that thread also makes each
    // upsert its record (the agent is sent the updates as they were read).
    let prepare = matches!(backend, Backend::Local(_));
    let mapping = backend.prepare_ingest(config)?;
    let mut total = BatchSummary::default();
    std::thread::scope(|scope| {
        let (chunks, parsed) = std::sync::mpsc::sync_channel(1);
        scope.spawn(move || {
            let layout = Layout::new(&config.mapping);
            let mut reader = UpdateReader::new(BufReader::new(file)).within(limit);
            if let Some(keep) = &keep {
                reader = reader.keeping(keep);
            }
            if prepare {
                reader = reader.preparing(&layout);
            }
            // Those a run before stored, read past (and checked again as they are read).
            let mut to_skip = skip;
            while to_skip > 0 {
                let wanted = INGEST_CHUNK.min(usize::try_from(to_skip).unwrap_or(usize::MAX));
                match next_chunk(&mut reader, wanted) {
                    Ok(skipped) => to_skip -= skipped.len() as u64,
                    Err(changed) => {
                        let _ = chunks.send(Err(changed));
                        return;
                    }
                }
            }
            // Only as many updates as the first pass checked.
            let mut left = count - skip;
            loop {
                let wanted = INGEST_CHUNK.min(usize::try_from(left).unwrap_or(usize::MAX));
                let chunk: Result<Vec<Update>, Changed> = match wanted {
                    0 => match reader.next() {
                        None => return,
                        Some(_) => Err(Changed::Grew { checked: count }),
                    },
                    _ => next_chunk(&mut reader, wanted),
                };
                left -= chunk.as_ref().map_or(0, |c| c.len() as u64);
                // Sending fails only when the committing side stopped at an error.
                if chunks.send(chunk).is_err() {
                    return;
                }
            }
        });
        for chunk in parsed {
            // The first pass found every update good, and counted them: the input changed.
            let chunk = chunk.map_err(|changed| {
                let error =
                    CliError::Failure(format!("the input changed while it was stored: {changed}"));
                match changed {
                    // Every update checked was stored.
                    Changed::Grew { .. } => CliError::PartlyStored {
                        message: error.to_string(),
                        stored: count,
                        in_doubt: 0,
                        updates: count,
                    },
                    _ => partly_stored(error, skip + total.accepted, 0, count),
                }
            })?;
            for request in backend
                .requests_of(&chunk)
                .map_err(|e| partly_stored(e, skip + total.accepted, 0, count))?
            {
                if super::interrupt::asked() {
                    return Err(stopped_as_asked(skip + total.accepted, count));
                }
                let committed = backend
                    .ingest(
                        config,
                        mapping.as_ref(),
                        (request, skip + total.accepted + 1),
                    )
                    .map_err(|e| partly_stored(e, skip + total.accepted, request.len(), count))?;
                total.add(&committed);
                progress.inc(request.len() as u64);
            }
        }
        Ok::<(), CliError>(())
    })?;
    progress.finish();
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::AdminError;

    /// An input whose text is `then` from its second rewind on: as read by the pass that
    /// stores it, after the pass that checks it.
    struct ChangingInput {
        text: std::io::Cursor<Vec<u8>>,
        then: Option<Vec<u8>>,
        rewinds: usize,
    }

    impl Read for ChangingInput {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.text.read(buf)
        }
    }

    impl Seek for ChangingInput {
        fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
            self.rewinds += 1;
            if self.rewinds == 2 {
                self.text = std::io::Cursor::new(self.then.take().unwrap());
            }
            self.text.seek(to)
        }
    }

    #[test]
    fn a_chunk_ends_at_a_count_of_updates_or_once_it_holds_enough_input() {
        let update = |i: usize, size: usize| {
            format!(
                r#"{{"id":"p{i}","profile":{{"name":"{}"}}}}"#,
                "n".repeat(size)
            )
        };
        let large = INGEST_CHUNK_BYTES as usize / 3;
        let input: Vec<String> = (0..7)
            .map(|i| update(i, if i < 5 { large } else { 10 }))
            .collect();
        let input = input.join("\n");
        let mut reader = UpdateReader::new(input.as_bytes());
        let mut sizes = Vec::new();
        let mut left = 7;
        while left > 0 {
            match next_chunk(&mut reader, left) {
                Ok(chunk) => {
                    left -= chunk.len();
                    sizes.push(chunk.len());
                }
                Err(changed) => panic!("{changed}"),
            }
        }
        // Three thirds reach the bound; the other four do not.
        assert_eq!(sizes, [3, 4]);
        // Asked for more than the input holds: it shrank.
        assert!(matches!(next_chunk(&mut reader, 1), Err(Changed::Shrank)));
    }

    /// The input changed between the pass that checks it and the one that stores it (a file
    /// still being written): only as many updates as were checked are stored, and the command
    /// says what became of the others.
    #[test]
    fn an_input_changed_between_its_passes_stores_no_more_than_was_checked() {
        let lines = |n: usize| -> Vec<u8> {
            let line = |i| format!(r#"{{"id":"p{i}","profile":{{"name":"n"}}}}"#);
            (0..n).map(line).collect::<Vec<_>>().join("\n").into_bytes()
        };
        let checked = 2 * INGEST_CHUNK + 1;
        for (then, expected, stored) in [
            (lines(checked), None, checked),
            (
                lines(checked + 5),
                Some("more updates than the 2001 checked, which were stored"),
                checked,
            ),
            (
                lines(INGEST_CHUNK + 10),
                Some("fewer updates than were checked; the first 1000 of 2001 updates were stored"),
                INGEST_CHUNK,
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let config = config_in(dir.path());
            let store = crate::store::Store::open(&config.storage.path, 1 << 20).unwrap();
            let backend = Backend::Local(Box::new(store));
            let mut input = ChangingInput {
                text: std::io::Cursor::new(lines(checked)),
                then: Some(then),
                rewinds: 0,
            };
            let result = ingest_file(&backend, &config, &mut input);
            match expected {
                None => assert_eq!(result.unwrap().accepted, checked as u64),
                Some(expected) => {
                    let message = result.unwrap_err().to_string();
                    assert!(message.contains(expected), "{message}");
                }
            }
            let Backend::Local(store) = &backend else {
                unreachable!()
            };
            assert_eq!(store.profile_count().unwrap(), stored as u64);
        }
    }

    /// A config whose store is in `dir`, mapping `name` and segment `s`.
    fn config_in(dir: &Path) -> Config {
        let text = format!(
            "[destination]\nhttp_endpoint = \"http://127.0.0.1:1/p\"\n\
             [destination.auth]\ntype = \"none\"\n[mapping]\nattributes = [\"name\"]\nsegments = [\"s\"]\n\
             [storage]\npath = {:?}\n",
            dir.join("store")
        );
        Config::parse(&dir.join("outpost.toml"), &text).unwrap()
    }

    /// An update larger than the running agent takes is refused by the first pass, before
    /// any chunk is sent.
    #[test]
    fn an_update_the_agent_would_not_take_is_refused_before_anything_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        let line = |i: usize, size: usize| {
            format!(
                r#"{{"id":"p{i}","profile":{{"name":"{}"}}}}"#,
                "n".repeat(size)
            )
        };
        let text = [line(0, 10), line(1, 10), line(2, 500)].join("\n");
        let mut input = std::io::Cursor::new(text.into_bytes());
        let none = Partitions::default;
        let checked = check_input(&config, &mut input, None, none(), None).unwrap();
        assert_eq!(checked.count, 3);
        let refused = check_input(&config, &mut input, None, none(), Some(400))
            .err()
            .expect("refused")
            .to_string();
        assert!(
            refused.starts_with("update 3: update `p2` takes 0 MiB as JSON")
                && refused.ends_with("nothing was stored"),
            "{refused}"
        );
    }

    #[test]
    fn a_chunk_the_agent_could_not_tell_of_may_have_been_stored() {
        let error = CliError::from(AdminError::InDoubt(format!("{IN_DOUBT}: no space left")));
        let message = partly_stored(error, 1000, 1000, 2500).to_string();
        assert_eq!(
            message,
            "no space left; the first 1000 of 2500 updates were stored, the next 1000 may have \
             been, the rest not; once this is fixed, run the same input again with --skip 1000, \
             which stores the rest (run whole, the updates stored would be applied again: an \
             update without a timestamp, or of a profile the input later deletes, would count \
             as new)"
        );
        let error = CliError::from(AdminError::Failed("no space left".into()));
        let message = partly_stored(error, 1000, 1000, 2500).to_string();
        assert!(
            message.contains("the first 1000 of 2500 updates were stored, the rest not"),
            "{message}"
        );
    }

    /// A refusal that running the input again would meet again (a profile of a partition
    /// handed over meanwhile) is not told to be run again; an answer the agent could not read
    /// still says what was stored before it.
    #[test]
    fn what_a_stop_partway_advises_depends_on_what_stopped_it() {
        let given_away = || StoreError::PartitionGivenAway {
            id: "p7".into(),
            partition: 3,
        };
        let again = "run the same input again";
        for (error, stored, says, advises_again) in [
            (
                CliError::Refused(given_away().to_string()),
                1000,
                "the first 1000 of 2500 updates were stored",
                false,
            ),
            (
                CliError::Store(given_away()),
                1000,
                "profile p7 is in partition 3",
                false,
            ),
            (
                CliError::Failure("no space left".into()),
                1000,
                "no space left; the first 1000",
                true,
            ),
            (
                CliError::Usage("recursion limit exceeded".into()),
                1000,
                "recursion limit exceeded; the first 1000",
                true,
            ),
            (
                CliError::Failure("no space left".into()),
                0,
                "nothing of the input was stored",
                false,
            ),
        ] {
            let message = partly_stored(error, stored, 1000, 2500).to_string();
            assert!(message.contains(says), "{message}");
            assert_eq!(message.contains(again), advises_again, "{message}");
        }
        let usage = partly_stored(CliError::Usage("bad".into()), 0, 1000, 2500);
        assert!(
            matches!(usage, CliError::Usage(_)),
            "nothing stored: still exit 2"
        );
    }
}
