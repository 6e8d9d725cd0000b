//! `outpost ingest`: a file or stdin, validated whole, then committed in chunks.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

use super::{Backend, CliError};
use crate::config::Config;
use crate::profile::layout::Layout;
use crate::profile::prune::KeepTree;
use crate::profile::update::{FutureLimit, InputError, UpdateReader};
use crate::profile::Update;
use crate::store::committer::{what_was_stored, IN_DOUBT};
use crate::store::BatchSummary;

/// How many updates `outpost ingest` commits (and flushes) at a time: bounds memory.
const INGEST_CHUNK: usize = 1_000;

/// Says how much of the input was stored before `error` (a full disk, say): the chunks before
/// it were stored, and the chunk of `in_flight` updates may have been, or part of it, when
/// the agent did not answer for it or answered so, or when its write or flush here met an
/// I/O error (sled writes in the background too, so a chunk whose flush failed may be on the
/// disk all the same).
fn partly_stored(error: CliError, stored: u64, in_flight: usize, count: u64) -> CliError {
    let (message, in_doubt) = match error {
        CliError::Failure(message) => (message, 0),
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
    if stored + in_doubt == 0 {
        return CliError::Failure(format!("{message}; {what}"));
    }
    CliError::Failure(format!(
        "{message}; {what}; once this is fixed, run the same input again (updates already stored are then stale or unchanged)"
    ))
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

/// Two passes so that memory stays bounded and a bad line stores nothing: the first validates
/// every line, the second commits in chunks. A crash during the second pass leaves a prefix
/// stored; running the same file again completes it (updates with timestamps are then stale or
/// unchanged, so no export is made twice).
pub fn ingest_file<F: Read + Seek + Send>(
    backend: &Backend,
    config: &Config,
    file: &mut F,
) -> Result<BatchSummary, CliError> {
    let rewind = |file: &mut F| {
        file.rewind()
            .map_err(|e| CliError::Failure(format!("cannot reread the input: {e}")))
    };
    rewind(file)?;
    // One clock reading for the whole input, so both passes judge every line alike.
    let limit = FutureLimit {
        now: chrono::Utc::now(),
        max_future_s: config.ingest.max_future_s,
    };
    // For the store itself, pruned as they are read: the parts dropped are checked, never
    // built. The agent is sent whole updates and prunes them by its own mapping, which may
    // differ from this config's (edited while the agent runs): pruned by this one, an
    // attribute only the agent maps would read as removed.
    let keep = matches!(backend, Backend::Local(_)).then(|| KeepTree::for_mapping(&config.mapping));
    let mut count = 0u64;
    let mut reader = UpdateReader::new(BufReader::new(&mut *file)).within(limit);
    if let Some(keep) = &keep {
        reader = reader.keeping(keep);
    }
    for update in reader {
        update?;
        count += 1;
    }
    rewind(file)?;
    // Drawn only when stderr is a terminal.
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(count),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} updates, {eta} left")
            .expect("valid template"),
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
            loop {
                let chunk: Result<Vec<Update>, InputError> =
                    reader.by_ref().take(INGEST_CHUNK).collect();
                let last = chunk.as_ref().map_or(true, |c| c.len() < INGEST_CHUNK);
                // Sending fails only when the committing side stopped at an error.
                if chunks.send(chunk).is_err() || last {
                    return;
                }
            }
        });
        for chunk in parsed {
            // The first pass found every line good: the input changed since.
            let chunk = chunk.map_err(|e| {
                let changed = format!("the input changed while it was stored: {e}");
                partly_stored(CliError::Failure(changed), total.accepted, 0, count)
            })?;
            if chunk.is_empty() {
                break;
            }
            let committed = backend
                .ingest(config, mapping.as_ref(), &chunk)
                .map_err(|e| partly_stored(e, total.accepted, chunk.len(), count))?;
            total.add(&committed);
            bar.inc(chunk.len() as u64);
        }
        Ok::<(), CliError>(())
    })?;
    bar.finish_and_clear();
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::AdminError;

    #[test]
    fn a_chunk_the_agent_could_not_tell_of_may_have_been_stored() {
        let error = CliError::from(AdminError::InDoubt(format!("{IN_DOUBT}: no space left")));
        let message = partly_stored(error, 1000, 1000, 2500).to_string();
        assert_eq!(
            message,
            "no space left; the first 1000 of 2500 updates were stored, the next 1000 may have \
             been, the rest not; once this is fixed, run the same input again (updates already \
             stored are then stale or unchanged)"
        );
        let error = CliError::from(AdminError::Failed("no space left".into()));
        let message = partly_stored(error, 1000, 1000, 2500).to_string();
        assert!(
            message.contains("the first 1000 of 2500 updates were stored, the rest not"),
            "{message}"
        );
    }
}
