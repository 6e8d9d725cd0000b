//! `outpost nats hand-over` and `outpost nats take-over` SIGKILLed at instants spread over
//! their run, each run again until it finishes: the store and the file are consistent after
//! every kill (no profile lost or stored twice, no partition consumable half-moved), and the
//! profiles end up in the taking store exactly as the giving store held them. The claims go
//! through a real `nats-server -js` (skipped with a message when it is not installed, a
//! failure under CI).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::nats::{nats_server_or_skip, NatsServer};
use common::*;
use outpost::config::Config;
use outpost::profile::record::ProfileRecord;
use outpost::profile::update::parse_body;
use outpost::source::claim;
use outpost::source::partition::partition_of;
use outpost::store::source::{Recorded, SourcePosition};
use outpost::store::{ListFilter, Place, Store};

const PROFILES: usize = 20_000;
const PARTITIONS: u32 = 8;
const STREAM: u64 = 0xfeed;
const MOVED: [u32; 4] = [4, 5, 6, 7];

/// A folder with a config whose store is `<folder>/store`, its `[source.nats]` on `server`.
fn config_in(dir: &Path, server: &NatsServer, owned: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let base = "http://127.0.0.1:9";
    let nats = format!(
        "[source.nats]\nservers = [\"{}\"]\nstream = \"UPDATES\"\nsubject_prefix = \"u\"\npartitions = {PARTITIONS}\nowned = \"{owned}\"\n",
        server.url()
    );
    let text = format!("{}\n{nats}", agent_config_text(base, &oauth_body(base), ""));
    let path = dir.join("outpost.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn moved_id(id: &str) -> bool {
    MOVED.contains(&partition_of(id, PARTITIONS))
}

/// The giving store: `PROFILES` profiles, partitions 0-7 consumed up to 1000 + partition,
/// every export delivered. Returns the moved profiles' records, by id.
fn fill(config: &Path) -> Vec<(String, ProfileRecord)> {
    let config = Config::load(config).unwrap();
    let store = Store::open(&config.storage.path, 8 << 20).unwrap();
    for chunk in (0..PROFILES).collect::<Vec<_>>().chunks(1_000) {
        let body: Vec<String> = chunk
            .iter()
            .map(|i| {
                member_update(
                    &format!("p{i}"),
                    &format!("name-{i}"),
                    "2026-01-01T00:00:00Z",
                )
            })
            .collect();
        let updates = parse_body(body.join("\n").as_bytes()).unwrap();
        let consumed: Vec<(usize, SourcePosition)> = (0..PARTITIONS)
            .map(|partition| {
                let position = SourcePosition {
                    partition,
                    stream: STREAM,
                    seq: 1000 + u64::from(partition),
                    rejected: Vec::new(),
                };
                (0, position)
            })
            .collect();
        store
            .apply_each(&[&updates], &config.mapping, chrono::Utc::now(), &consumed)
            .unwrap();
    }
    loop {
        let filter = ListFilter {
            limit: 1_000,
            ..ListFilter::default()
        };
        let page = store.list(&filter).unwrap();
        if page.is_empty() {
            break;
        }
        for export in page {
            store.remove_export(export.id.seq, Place::Pending).unwrap();
        }
    }
    store.flush().unwrap();
    (0..PROFILES)
        .map(|i| format!("p{i}"))
        .filter(|id| moved_id(id))
        .map(|id| {
            let record = store.profile_record(&id).unwrap().unwrap();
            (id, record)
        })
        .collect()
}

/// Runs `outpost ARGS --config CONFIG`, SIGKILLed after `delay` unless it ended before:
/// its success, or `None` when killed.
fn run_killed(args: &[&str], config: &Path, delay: Duration) -> Option<bool> {
    let child = Command::new(binary())
        .args(args)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KilledOnDrop(child);
    let deadline = Instant::now() + delay;
    while Instant::now() < deadline {
        if let Some(status) = child.0.try_wait().unwrap() {
            if !status.success() {
                let mut stderr = String::new();
                std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut stderr)
                    .unwrap();
                panic!("outpost {args:?} failed: {stderr}");
            }
            return Some(true);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    None
}

/// Runs the command, killing it at growing instants, until it finishes; checks `consistent`
/// after each kill. Returns how many kills there were.
fn until_done(args: &[&str], config: &Path, consistent: impl Fn() -> bool) -> usize {
    until_done_in_steps(args, config, |delay| delay.mul_f64(1.3), consistent)
}

/// [`until_done`], each instant `next` of the one before.
fn until_done_in_steps(
    args: &[&str],
    config: &Path,
    next: impl Fn(Duration) -> Duration,
    consistent: impl Fn() -> bool,
) -> usize {
    let mut delay = Duration::from_millis(15);
    let mut kills = 0;
    loop {
        match run_killed(args, config, delay) {
            Some(_) => return kills,
            None => {
                kills += 1;
                assert!(consistent(), "inconsistent after a kill at {delay:?}");
            }
        }
        delay = next(delay);
        assert!(kills < 200, "outpost {args:?} never finished");
    }
}

/// The claims on the moved partitions, read for a config's stream.
struct Claims {
    runtime: tokio::runtime::Runtime,
    bucket: async_nats::jetstream::kv::Store,
}

impl Claims {
    fn of(config: &Path) -> Claims {
        let nats = Config::load(config).unwrap().nats.unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let bucket = runtime.block_on(async {
            let client = async_nats::connect(nats.servers[0].as_str()).await.unwrap();
            let js = async_nats::jetstream::new(client);
            claim::bucket(&js, &nats.stream, &nats.consumer_prefix, 1)
                .await
                .unwrap()
        });
        Claims { runtime, bucket }
    }

    fn read(&self) -> Vec<String> {
        self.runtime.block_on(async {
            let mut said = Vec::new();
            for partition in MOVED {
                let read = claim::read(&self.bucket, partition).await.unwrap();
                said.push(read.holder.unwrap_or_default());
            }
            said
        })
    }
}

fn profiles_present(store: &Store, moved: &[(String, ProfileRecord)]) -> usize {
    moved
        .iter()
        .filter(|(id, record)| match store.profile_record(id).unwrap() {
            Some(stored) => {
                assert_eq!(&stored, record, "{id} changed");
                true
            }
            None => false,
        })
        .count()
}

/// Asserts that the store at `store` holds `moved` as the giving store held them, and
/// nothing else, with the positions the file gave their partitions.
fn assert_taken_over(store: &Path, moved: &[(String, ProfileRecord)]) {
    let store = Store::open(store, 8 << 20).unwrap();
    assert_eq!(profiles_present(&store, moved), moved.len());
    assert_eq!(store.profile_count().unwrap() as usize, moved.len());
    for partition in MOVED {
        assert_eq!(
            store.source_position(partition, STREAM, 5000).unwrap(),
            Recorded::At(1000 + u64::from(partition))
        );
    }
}

fn read_file(path: &Path) -> Vec<String> {
    let (_, mut reader) = outpost::store::handover_file::FileReader::open(std::io::BufReader::new(
        std::fs::File::open(path).unwrap(),
    ))
    .unwrap();
    let mut ids = Vec::new();
    while let Some((id, _)) = reader.next_profile().unwrap() {
        ids.push(id);
    }
    ids
}

#[test]
fn hand_over_and_take_over_finish_after_sigkills() {
    let Some(server_bin) = nats_server_or_skip("hand_over_and_take_over_finish_after_sigkills")
    else {
        return;
    };
    let server = NatsServer::start(&server_bin);
    let dir = tempfile::tempdir().unwrap();
    let giving = config_in(&dir.path().join("a"), &server, "0-3");
    let taking = config_in(&dir.path().join("b"), &server, "4-7");
    let store_of = |config: &Path| Config::load(config).unwrap().storage.path;
    let moved = fill(&giving);
    assert!(moved.len() > PROFILES / 3, "{} moved", moved.len());
    let mut expected: Vec<String> = moved.iter().map(|(id, _)| id.clone()).collect();
    expected.sort();
    let file = dir.path().join("4-7.handover");
    let file_arg = file.to_str().unwrap();

    // What the kills left: not begun, marked while the file is written, forgetting.
    let seen = std::cell::RefCell::new([0usize; 3]);
    let kills = until_done(&["nats", "hand-over", "4-7", file_arg], &giving, || {
        let store = Store::open(&store_of(&giving), 8 << 20).unwrap();
        let present = profiles_present(&store, &moved);
        assert_eq!(
            store.profile_count().unwrap() as usize,
            PROFILES - moved.len() + present
        );
        let why = store.partition_moved(MOVED[0]).unwrap().unwrap_or_default();
        // The partitions are marked together.
        for partition in MOVED {
            let also = store
                .partition_moved(partition)
                .unwrap()
                .unwrap_or_default();
            assert_eq!(also, why, "partition {partition}");
        }
        let handed = why.contains("was handed over");
        seen.borrow_mut()[usize::from(!why.is_empty()) + usize::from(handed)] += 1;
        if handed {
            // Forgetting only once the file is whole, and holds every moved profile.
            let mut in_file = read_file(&file);
            in_file.sort();
            assert_eq!(in_file, expected);
        } else {
            assert_eq!(present, moved.len(), "forgotten before the file was whole");
        }
        true
    });
    println!("hand-over: {kills} kills, leaving (not begun, writing, forgetting) {seen:?}");
    let seen = seen.into_inner();
    assert!(
        seen[1] > 0,
        "no kill came while the hand-over wrote its file: {seen:?}"
    );
    let store = Store::open(&store_of(&giving), 8 << 20).unwrap();
    assert_eq!(profiles_present(&store, &moved), 0);
    assert_eq!(
        store.profile_count().unwrap() as usize,
        PROFILES - moved.len()
    );
    drop(store);
    let mut in_file = read_file(&file);
    in_file.sort();
    assert_eq!(in_file, expected);

    // Not begun, marked, finished; and how often the claims said the file was being taken
    // over by the taking store.
    let seen = std::cell::RefCell::new([0usize; 3]);
    let claims = Claims::of(&taking);
    let handed = {
        let (header, _) = outpost::store::handover_file::FileReader::open(std::io::BufReader::new(
            std::fs::File::open(&file).unwrap(),
        ))
        .unwrap();
        claim::handed_over(&header.file_id())
    };
    let reserved = std::cell::Cell::new(0);
    let kills = until_done(&["nats", "take-over", file_arg], &taking, || {
        let said = claims.read();
        if !store_of(&taking).exists() {
            assert!(said.iter().all(|c| *c == handed), "{said:?}");
            seen.borrow_mut()[0] += 1;
            return true;
        }
        let store = Store::open(&store_of(&taking), 8 << 20).unwrap();
        let ours = claim::holder(store.store_id(), &claim::host_name());
        let taking_over = claim::taking_over(&handed, &ours);
        reserved.set(reserved.get() + usize::from(said.iter().all(|c| *c == taking_over)));
        // Once anything of the file is stored here, the claims let no other store take it.
        let touched = profiles_present(&store, &moved) > 0
            || MOVED
                .iter()
                .any(|p| store.partition_moved(*p).unwrap().is_some());
        for claim in &said {
            let allowed = *claim == taking_over || *claim == ours || (!touched && *claim == handed);
            assert!(allowed, "claims {said:?} with the store touched: {touched}");
        }
        let present = profiles_present(&store, &moved);
        assert_eq!(store.profile_count().unwrap() as usize, present);
        for partition in MOVED {
            let marked = store.partition_moved(partition).unwrap();
            if partition == MOVED[0] {
                let state = match (&marked, present) {
                    (Some(_), _) => 1,
                    (None, 0) => 0,
                    (None, _) => 2,
                };
                seen.borrow_mut()[state] += 1;
            }
            match marked {
                // Marked: not consumed until the take-over finishes.
                Some(why) => assert!(why.contains("take-over did not finish"), "{why}"),
                // Not begun (nothing stored), or finished (every profile stored).
                None => match store.source_position(partition, STREAM, 5000).unwrap() {
                    Recorded::Nothing => assert_eq!(present, 0),
                    Recorded::At(seq) => {
                        assert_eq!(seq, 1000 + u64::from(partition));
                        assert_eq!(present, moved.len());
                    }
                    other => panic!("partition {partition}: {other:?}"),
                },
            }
        }
        true
    });
    println!(
        "take-over: {kills} kills, leaving (not begun, marked, finished) {seen:?}, {} with the \
         claims saying it was being taken over",
        reserved.get()
    );
    let seen = seen.into_inner();
    assert!(seen[1] > 0, "no kill came during the take-over: {seen:?}");
    assert!(
        reserved.get() > 0,
        "no kill came while the claims said the file was being taken over"
    );
    assert_taken_over(&store_of(&taking), &moved);
    // Run again once finished (the claims now name this store): nothing left to do.
    let again = run_killed(
        &["nats", "take-over", file_arg],
        &taking,
        Duration::from_secs(60),
    );
    assert_eq!(again, Some(true));
}

/// `outpost nats take-over` through the taking store's running agent (which owns other
/// partitions), SIGKILLed at growing instants: the agent carries on or stops the store part
/// on its own, the claims never say more than the take-over did, and the command run again
/// finishes it; the agent's store then holds the file's profiles as the giving store held them.
#[test]
fn a_take_over_through_a_running_agent_finishes_after_its_command_is_killed() {
    let Some(server_bin) = nats_server_or_skip("a_take_over_through_a_running_agent") else {
        return;
    };
    let server = NatsServer::start(&server_bin);
    let dir = tempfile::tempdir().unwrap();
    let giving = config_in(&dir.path().join("a"), &server, "0-3");
    let moved = fill(&giving);
    let file = dir.path().join("4-7.handover");
    let file_arg = file.to_str().unwrap();
    let handed = run_killed(
        &["nats", "hand-over", "4-7", file_arg],
        &giving,
        Duration::from_secs(60),
    );
    assert_eq!(handed, Some(true));

    let taking = config_in(&dir.path().join("b"), &server, "0-3");
    let port = common::agent_process::free_port();
    let text = std::fs::read_to_string(&taking).unwrap();
    std::fs::write(
        &taking,
        text.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        ),
    )
    .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut agent = runtime.block_on(common::agent_process::AgentProcess::start_with_env(
        &taking,
        port,
        &[("OUTPOST_LOG", "warn")],
    ));
    let store_id = outbox_stats(&taking)["store_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ours = claim::holder(
        u32::from_str_radix(&store_id, 16).unwrap(),
        &claim::host_name(),
    );
    let handed = claim::handed_over(&{
        let (header, _) = outpost::store::handover_file::FileReader::open(std::io::BufReader::new(
            std::fs::File::open(&file).unwrap(),
        ))
        .unwrap();
        header.file_id()
    });
    let taking_over = claim::taking_over(&handed, &ours);
    let claims = Claims::of(&taking);
    let reserved = std::cell::Cell::new(0);
    // The claims say it is being taken over in the last 60 ms or so of a run of 800 (most of
    // it the command's start): steps of 1.3 times the last came through it once or not at all,
    // and none when the machine was busy. Steps of 20 ms, and 3% past 667 ms.
    let finer = |delay: Duration| (delay + Duration::from_millis(20)).max(delay.mul_f64(1.03));
    let kills = until_done_in_steps(&["nats", "take-over", file_arg], &taking, finer, || {
        let said = claims.read();
        for claim in &said {
            assert!(
                *claim == handed || *claim == taking_over || *claim == ours,
                "{said:?}"
            );
        }
        reserved.set(reserved.get() + usize::from(said.contains(&taking_over)));
        let profiles = outbox_stats(&taking)["profiles"].as_u64().unwrap() as usize;
        assert!(profiles <= moved.len(), "{profiles} profiles");
        true
    });
    println!(
        "take-over through the agent: {kills} kills, {} with claims reserved",
        reserved.get()
    );
    assert!(
        kills > 0 && reserved.get() > 0,
        "no kill came once the claims were reserved"
    );
    assert_eq!(claims.read(), vec![ours; MOVED.len()]);
    runtime.block_on(agent.terminate());
    assert_taken_over(&Config::load(&taking).unwrap().storage.path, &moved);
}
