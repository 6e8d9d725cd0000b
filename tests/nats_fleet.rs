//! The NATS JetStream source end to end: a real `nats-server -js` (skipped with a message
//! when it is not installed, a failure under CI), the real binary, real receivers.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::agent_process::{free_port, wait_or_show, AgentProcess};
use common::nats::{nats_server_or_skip, nats_table, NatsServer};
use common::*;
use outpost::receiver::{Receiver, ReceiverOptions};
use outpost::source::claim::taking_over;
use outpost::store::committer::REQUEST_CHUNK;
use rand::Rng;

/// An agent's folder and config: delivering to `base`, ingest on a free port, and (with
/// `nats`) consuming `[source.nats]`.
struct AgentSetup {
    dir: tempfile::TempDir,
    addr: SocketAddr,
}

impl AgentSetup {
    fn new(base: &str, nats: Option<&str>, storage: &str) -> AgentSetup {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let text = agent_config_text(base, &oauth_body(base), "")
            .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{addr}\""))
            .replace("concurrency = 4", "concurrency = 16")
            .replace(
                "cache_bytes = 8388608",
                &format!("cache_bytes = 8388608\n{storage}"),
            );
        let text = format!("{text}\n{}", nats.unwrap_or(""));
        std::fs::write(dir.path().join("outpost.toml"), text).unwrap();
        AgentSetup { dir, addr }
    }

    /// An agent owning all 8 partitions of the stream on `server` (`nats` extra lines of
    /// `[source.nats]`), the stream made by `outpost nats setup`.
    fn on_stream(base: &str, server: &NatsServer, nats: &str, storage: &str) -> AgentSetup {
        let setup = AgentSetup::new(
            base,
            Some(&nats_table(&server.url(), 8, "0-7", nats)),
            storage,
        );
        setup.cli(&["nats", "setup"]);
        setup
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("outpost.toml")
    }

    async fn start(&self) -> AgentProcess {
        AgentProcess::start_with_env(&self.config(), self.addr.port(), &[("OUTPOST_LOG", "warn")])
            .await
    }

    /// `outpost ARGS --config <this agent's config>`, which must succeed; its stdout.
    /// `outpost publish` of `lines` (written to a file in the setup's folder).
    fn publish(&self, lines: &[String]) -> String {
        let file = write_lines(self.dir.path(), lines);
        self.cli(&["publish", file.to_str().unwrap()])
    }

    /// `outpost ARGS --config <this agent's config>`.
    fn run(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(binary())
            .args(args)
            .arg("--config")
            .arg(self.config())
            .output()
            .unwrap()
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "outpost {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn nats_config(&self) -> outpost::source::config::NatsSource {
        outpost::config::Config::load(&self.config())
            .unwrap()
            .nats
            .unwrap()
    }

    /// The claims bucket of this agent's stream, on `server`.
    async fn claims(&self, server: &NatsServer) -> async_nats::jetstream::kv::Store {
        let nats = self.nats_config();
        let js = server.jetstream().await;
        outpost::source::claim::bucket(&js, &nats.stream, &nats.consumer_prefix, 1)
            .await
            .unwrap()
    }
}

/// `outpost nats release` purges a claim only while it says what the command read: one that
/// a hand-over made say "handed over" meanwhile is left as it is, and told apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_leaves_a_claim_written_after_it_was_read() {
    use outpost::source::claim;
    let Some(server_bin) =
        nats_server_or_skip("a_release_leaves_a_claim_written_after_it_was_read")
    else {
        return;
    };
    let server = NatsServer::start(&server_bin);
    let js = server.jetstream().await;
    let claims = claim::bucket(&js, "UPDATES", "outpost", 1).await.unwrap();
    let held = "store 0000abcd on h1";
    put_claims(&claims, &[3], held).await;
    let stale = claim::read(&claims, 3).await.unwrap();
    let handed = claim::handed_over("0000abcd-1");
    put_claims(&claims, &[3], &handed).await;
    let left = claim::release(&claims, &stale).await.unwrap();
    assert_eq!(left, claim::Released::Changed);
    assert_eq!(claim_text(&claims, 3).await, handed);

    let read = claim::read(&claims, 3).await.unwrap();
    let released = claim::release(&claims, &read).await.unwrap();
    assert_eq!(released, claim::Released::Was(handed));
    let gone = claim::read(&claims, 3).await.unwrap();
    assert_eq!(gone.holder, None);
    let again = claim::release(&claims, &gone).await.unwrap();
    assert_eq!(again, claim::Released::NoClaim);
}

/// The bucket of claims gets as many replicas as the stream, not `source.nats.replicas`
/// (which is for `nats setup`): on a server that is no cluster a bucket of 3 cannot be made,
/// and on a cluster a bucket of fewer than the stream stops the fleet while a server the
/// stream survives is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bucket_of_claims_has_as_many_replicas_as_the_stream() {
    use outpost::source::claim;
    let Some(server_bin) =
        nats_server_or_skip("the_bucket_of_claims_has_as_many_replicas_as_the_stream")
    else {
        return;
    };
    let server = NatsServer::start(&server_bin);
    let setup = AgentSetup::new(
        "http://127.0.0.1:9",
        Some(&nats_table(&server.url(), 4, "0-3", "")),
        "",
    );
    setup.cli(&["nats", "setup"]);
    let js = server.jetstream().await;
    let claims = claim::bucket(&js, "UPDATES", "outpost", 3).await.unwrap();
    let mut bucket = js.get_stream(format!("KV_{}", claims.name)).await.unwrap();
    assert_eq!(bucket.info().await.unwrap().config.num_replicas, 1);
    assert_eq!(
        claim::claim(&claims, 2, "store 0000abcd on h1")
            .await
            .unwrap(),
        claim::Claim::Made
    );
}

/// A stream whose limits remove what waits in it unconsumed is warned of by `nats setup` and
/// the agent; so is one whose description is someone else's, which records nothing for the
/// agents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_outpost_cannot_look_after_is_warned_of() {
    let Some(server_bin) = nats_server_or_skip("a_stream_outpost_cannot_look_after_is_warned_of")
    else {
        return;
    };
    let server = NatsServer::start(&server_bin);
    let setup = AgentSetup::new(
        "http://127.0.0.1:9",
        Some(&nats_table(&server.url(), 4, "0-3", "")),
        "",
    );
    let made = setup.cli(&["nats", "setup"]);
    assert!(!made.contains("warning"), "{made}");
    let js = server.jetstream().await;
    let mut config = js
        .get_stream("UPDATES")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    config.max_age = Duration::from_secs(3600);
    config.max_messages_per_subject = 1000;
    js.update_stream(config).await.unwrap();
    let found = setup.cli(&["nats", "setup"]);
    assert!(
        found.contains("warning          stream UPDATES removes messages older than 1h 0m, keeps the newest 1000 messages of each subject (a partition's): updates that wait in it longer"),
        "{found}"
    );
    // And the agent, in its log at start.
    let agent = setup.start().await;
    wait_or_show(
        20,
        "the agent to warn of the limits",
        &[&agent],
        async || {
            agent
                .log()
                .contains("stream UPDATES removes messages older than 1h 0m")
        },
    )
    .await;
    drop(agent);

    // A description of someone else's records nothing of outpost's; setup says so, and
    // records them once it is cleared.
    let described = |text: &'static str| {
        let js = js.clone();
        async move {
            let mut config = js
                .get_stream("UPDATES")
                .await
                .unwrap()
                .cached_info()
                .config
                .clone();
            config.description = Some(text.into()).filter(|t: &String| !t.is_empty());
            js.update_stream(config).await.unwrap();
        }
    };
    described("orders").await;
    let foreign = setup.cli(&["nats", "setup"]);
    assert!(
        foreign.contains("nothing changed")
            && foreign
                .contains("warning          the stream's description (orders) is not outpost's"),
        "{foreign}"
    );
    let checked = setup.run(&["check"]);
    let checked = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.contains("warning          the stream's description (orders) is not outpost's")
            && checked
                .contains("warning          stream UPDATES removes messages older than 1h 0m"),
        "{checked}"
    );
    let agent = setup.start().await;
    wait_or_show(
        20,
        "the agent to warn of the description",
        &[&agent],
        async || {
            agent
                .log()
                .contains("the stream's description (orders) is not outpost's")
        },
    )
    .await;
    drop(agent);
    described("").await;
    let recorded = setup.cli(&["nats", "setup"]);
    assert!(
        recorded.contains("its description now records the partition count")
            && !recorded.contains("is not outpost's"),
        "{recorded}"
    );
}

/// What the claim on `partition` says.
async fn claim_text(claims: &async_nats::jetstream::kv::Store, partition: u32) -> String {
    let claim = claims.get(format!("partition-{partition}")).await.unwrap();
    String::from_utf8_lossy(&claim.expect("a claim")).into_owned()
}

/// Makes the claims on `partitions` say `text`.
async fn put_claims(claims: &async_nats::jetstream::kv::Store, partitions: &[u32], text: &str) {
    for partition in partitions {
        claims
            .put(format!("partition-{partition}"), text.to_string().into())
            .await
            .unwrap();
    }
}

/// Version `v` of profiles `p0` to `p<profiles - 1>`, one line each.
fn versions(profiles: usize, v: usize) -> Vec<String> {
    (0..profiles).map(|p| version_line(p, v)).collect()
}

/// Version `v` of profile `p`. Even versions change the mapped first name (an export), odd
/// ones an unmapped field (no export).
fn version_line(p: usize, v: usize) -> String {
    let name = format!("p{p}-v{}", v - v % 2);
    let mut update: serde_json::Value = serde_json::from_str(&member_update(
        &format!("p{p}"),
        &name,
        "2026-01-01T00:00:00Z",
    ))
    .unwrap();
    update.as_object_mut().unwrap().remove("timestamp");
    update["profile"]["loyalty"] = serde_json::json!({"points": v});
    update.to_string()
}

/// Per profile, the first names delivered, in arrival order, each export counted once.
fn names_by_profile(receiver: &Receiver) -> HashMap<String, Vec<String>> {
    let mut seen_keys = std::collections::HashSet::new();
    let mut names: HashMap<String, Vec<String>> = HashMap::new();
    for r in receiver.delivered() {
        let key = r.header("idempotency-key").unwrap().to_owned();
        if !seen_keys.insert(key) {
            continue;
        }
        let payload = r.json().unwrap();
        names.entry(profile_of(&payload)).or_default().push(
            payload["person"]["name"]["firstName"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    names
}

async fn start_receiver() -> Receiver {
    Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
        .await
        .unwrap()
}

/// Waits (at most 10 s) until the agent's source says it paused fetching.
async fn wait_until_paused(agent: &AgentProcess) {
    wait_or_show(10, "the source to pause", &[agent], async || {
        healthz_json(agent.addr).await["nats"]["state"] == "paused"
    })
    .await;
}

async fn healthz_json(addr: SocketAddr) -> serde_json::Value {
    let (status, body) = http_get(addr, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits (at most 60 s) until the agent's metric `name` reads `value`.
async fn wait_until_metric(agent: &AgentProcess, name: &str, value: f64) {
    let what = format!("{name} to read {value}");
    wait_or_show(60, &what, &[agent], async || {
        metric(agent.addr, name).await == value
    })
    .await;
}

fn write_lines(dir: &Path, lines: &[String]) -> PathBuf {
    let path = dir.join("updates.ndjson");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

/// Needs no nats-server: `--in-flight` is checked before connecting.
#[test]
fn in_flight_beyond_what_the_client_awaits_is_refused_before_anything_is_published() {
    let table = nats_table("nats://127.0.0.1:4222", 12, "0-3", "");
    let setup = AgentSetup::new("http://127.0.0.1:9", Some(&table), "");
    for (n, why) in [("0", "at least 1"), ("5001", "at most 5000")] {
        let out = setup.run(&["publish", "--in-flight", n, "-"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{n}: {stderr}");
        assert!(stderr.contains(why), "{n}: {stderr}");
    }
}

/// A signed NATS JWT (v2): `claims` signed by `issuer`, as `nsc` makes them.
fn nats_jwt(issuer: &nkeys::KeyPair, claims: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = b64(claims.to_string().as_bytes());
    let signed = format!("{header}.{body}");
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", b64(&signature))
}

/// A credentials file's text, as `nsc` writes it.
fn creds_text(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
}

/// A NATS server in operator mode (JWT accounts, decentralised auth), whose user JWTs expire:
/// the server closes a connection when its JWT does, and the agent, reconnecting, reads its
/// creds file again, so a JWT renewed by rewriting the file keeps it consuming without a
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_creds_file_is_used_when_the_expired_jwt_is_cut_off() {
    let Some(server_bin) = nats_server_or_skip("a_renewed_creds_file_is_used") else {
        return;
    };
    let now = chrono::Utc::now().timestamp();
    let (operator, system, account, user) = (
        nkeys::KeyPair::new_operator(),
        nkeys::KeyPair::new_account(),
        nkeys::KeyPair::new_account(),
        nkeys::KeyPair::new_user(),
    );
    let claims = |issuer: &nkeys::KeyPair, subject: &nkeys::KeyPair, nats: serde_json::Value| {
        serde_json::json!({
            "jti": format!("{:x}", rand::thread_rng().gen::<u64>()),
            "iat": now,
            "iss": issuer.public_key(),
            "sub": subject.public_key(),
            "name": "outpost-test",
            "nats": nats,
        })
    };
    let operator_jwt = nats_jwt(
        &operator,
        claims(
            &operator,
            &operator,
            serde_json::json!({"type": "operator", "version": 2}),
        ),
    );
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let account_jwt = nats_jwt(
        &operator,
        claims(
            &operator,
            &account,
            serde_json::json!({"limits": unlimited, "type": "account", "version": 2}),
        ),
    );
    let user_jwt = |lifetime_s: i64| {
        let mut user_claims = claims(
            &account,
            &user,
            serde_json::json!({
                "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                "type": "user", "version": 2,
            }),
        );
        user_claims["exp"] = (chrono::Utc::now().timestamp() + lifetime_s).into();
        nats_jwt(&account, user_claims)
    };
    // JetStream needs a system account.
    let system_jwt = nats_jwt(
        &operator,
        claims(
            &operator,
            &system,
            serde_json::json!({"type": "account", "version": 2}),
        ),
    );
    let conf = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        conf.path(),
        format!(
            "operator: {operator_jwt}\nsystem_account: {system}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {system}: {system_jwt}\n  {account}: {account_jwt}\n}}\n",
            system = system.public_key(),
            account = account.public_key()
        ),
    )
    .unwrap();
    let server = NatsServer::start_with(&server_bin, &["-c", conf.path().to_str().unwrap()]);
    let receiver = start_receiver().await;
    let setup = AgentSetup::new(
        &receiver.base_url(),
        Some(&nats_table(
            &server.url(),
            1,
            "0",
            "creds_file = \"agent.creds\"",
        )),
        "",
    );
    let creds = setup.dir.path().join("agent.creds");
    let seed = user.seed().unwrap();
    std::fs::write(&creds, creds_text(&user_jwt(3600), &seed)).unwrap();
    setup.cli(&["nats", "setup"]);
    setup.publish(&[member_update("p-1", "before", "2026-01-01T00:00:01Z")]);
    // The agent starts with a JWT that expires soon (whole seconds: up to one less).
    let first_lifetime_s = 8;
    std::fs::write(&creds, creds_text(&user_jwt(first_lifetime_s), &seed)).unwrap();
    let expires = std::time::Instant::now() + Duration::from_secs(first_lifetime_s as u64);
    let agent = setup.start().await;
    wait_or_show(20, "the first update delivered", &[&agent], async || {
        distinct_delivered(&receiver) >= 1
    })
    .await;

    // Renewed before the first JWT expires; the server then cuts the agent off.
    std::fs::write(&creds, creds_text(&user_jwt(3600), &seed)).unwrap();
    tokio::time::sleep(expires.saturating_duration_since(std::time::Instant::now())).await;
    wait_or_show(
        20,
        "the server to cut the expired connection",
        &[&agent],
        async || agent.log().contains("disconnected from NATS"),
    )
    .await;
    setup.publish(&[member_update("p-2", "after", "2026-01-01T00:00:01Z")]);
    wait_or_show(
        30,
        "the update published after the expiry delivered",
        &[&agent],
        async || distinct_delivered(&receiver) >= 2,
    )
    .await;
}

/// Needs no nats-server: a credentials file that cannot be used is a configuration error of
/// the agent and of the NATS commands (exit 2, naming the key), before any connection; the
/// commands that do not use NATS go on without it.
#[test]
fn an_unusable_creds_file_is_a_configuration_error_where_nats_is_used() {
    let table = nats_table(
        "nats://127.0.0.1:4222",
        12,
        "0-3",
        "creds_file = \"agent.creds\"",
    );
    let setup = AgentSetup::new("http://127.0.0.1:9", Some(&table), "");
    let creds = setup.dir.path().join("agent.creds");
    for (contents, why) in [
        (None, "No such file"),
        (Some("SUAKEYSEEDNOTAJWT"), "not a NATS credentials file"),
    ] {
        if let Some(contents) = contents {
            std::fs::write(&creds, contents).unwrap();
        }
        for args in [
            &["run"][..],
            &["nats", "setup"],
            &["publish", "-"],
            &["check"],
        ] {
            let out = setup.run(args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(
                stderr.contains("source.nats.creds_file") && stderr.contains(why),
                "{args:?}: {stderr}"
            );
            assert!(!stderr.contains("SUAKEYSEED"), "{stderr}");
        }
    }
    // Checked before the store is opened: the agent made none.
    assert!(!setup.dir.path().join("store").exists());
    // A profile of one of the partitions the agent owns (0-3 of 12).
    let id = (1..)
        .map(|i| format!("p-{i}"))
        .find(|id| outpost::source::partition::partition_of(id, 12) <= 3)
        .unwrap();
    let update = member_update(&id, "x", "2026-01-01T00:00:01Z");
    let out = run_with_config(&setup.config(), &["ingest", "-"], Some(update.as_bytes()));
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // A CA file without a certificate: the NATS client would take it as no roots at all.
    let table = nats_table(
        "nats://127.0.0.1:4222",
        12,
        "0-3",
        "tls_ca_file = \"ca.pem\"",
    );
    let setup = AgentSetup::new("http://127.0.0.1:9", Some(&table), "");
    std::fs::write(setup.dir.path().join("ca.pem"), "not a certificate").unwrap();
    for args in [&["run"][..], &["nats", "setup"], &["check"]] {
        let out = setup.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("source.nats.tls_ca_file") && stderr.contains("no PEM certificate"),
            "{args:?}: {stderr}"
        );
    }
}

/// Needs no nats-server: a bad `[source.nats]` is a configuration error naming the key.
#[test]
fn a_bad_source_config_names_the_key_and_exits_2() {
    let receiver_base = "http://127.0.0.1:9";
    for (table, key) in [
        (
            nats_table("nats://127.0.0.1:4222", 12, "0-12", ""),
            "source.nats.owned",
        ),
        (
            nats_table("nats://127.0.0.1:4222", 12, "0-3", "colour = 1"),
            "colour",
        ),
        (
            nats_table(
                "nats://127.0.0.1:4222",
                12,
                "0-3",
                "token = \"t0ps3cret\"\nuser = \"u\"\npassword = \"p\"",
            ),
            "source.nats.token",
        ),
        (
            nats_table("nats://alice:t0ps3cret@127.0.0.1:4222", 12, "0-3", ""),
            "source.nats.servers",
        ),
    ] {
        let setup = AgentSetup::new(receiver_base, Some(&table), "");
        for args in [
            &["run"][..],
            &["nats", "setup"],
            &["publish", "-"],
            &["rejected", "list"],
        ] {
            let out = setup.run(args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(stderr.contains(key), "{args:?}: {stderr}");
            assert!(
                !stderr.contains("t0ps3cret"),
                "a secret in an error: {stderr}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_from_the_stream_equal_those_over_http() {
    let Some(server_bin) = nats_server_or_skip("deliveries_from_the_stream_equal_those_over_http")
    else {
        return;
    };
    const PROFILES: usize = 2_000;
    const VERSIONS: usize = 10; // 20,000 updates, 10,000 exports
    let server = NatsServer::start(&server_bin);
    let (over_nats, over_http) = (start_receiver().await, start_receiver().await);
    let nats_agent = AgentSetup::new(
        &over_nats.base_url(),
        Some(&nats_table(&server.url(), 8, "0-7", "")),
        "",
    );
    let http_agent = AgentSetup::new(&over_http.base_url(), None, "");
    let lines: Vec<String> = (0..VERSIONS)
        .flat_map(|v| (0..PROFILES).map(move |p| version_line(p, v)))
        .collect();
    let file = write_lines(nats_agent.dir.path(), &lines);

    let setup = nats_agent.cli(&["nats", "setup"]);
    assert!(setup.contains("UPDATES created"), "{setup}");
    let again = nats_agent.cli(&["nats", "setup"]);
    assert!(again.contains("UPDATES found"), "{again}");
    let published = nats_agent.cli(&["publish", file.to_str().unwrap()]);
    assert!(
        published.contains("20000 update(s) published"),
        "{published}"
    );

    let agent_n = nats_agent.start().await;
    let agent_h = http_agent.start().await;
    for chunk in lines.chunks(2_000) {
        let (status, body) = http_post(agent_h.addr, "/v1/updates", chunk.join("\n"), &[]).await;
        assert_eq!(status, 200, "{body}");
    }
    let exports = PROFILES * VERSIONS / 2;
    wait_until(90, "every export over both paths", || {
        distinct_delivered(&over_nats) >= exports && distinct_delivered(&over_http) >= exports
    })
    .await;
    let (from_nats, from_http) = (names_by_profile(&over_nats), names_by_profile(&over_http));
    assert_eq!(from_nats.len(), PROFILES);
    for p in 0..PROFILES {
        let key = format!("p{p}");
        assert_eq!(from_nats[&key], from_http[&key], "profile {key}");
        assert_eq!(from_nats[&key].len(), VERSIONS / 2, "profile {key}");
    }
    let health = healthz_json(agent_n.addr).await;
    assert_eq!(health["nats"]["state"], "consuming", "{health}");
    assert_eq!(
        metric(agent_n.addr, "outpost_source_acks_total").await,
        20_000.0
    );
    assert_eq!(
        metric(
            agent_n.addr,
            "outpost_source_messages_total{result=\"committed\"}"
        )
        .await,
        20_000.0
    );
    // Publishing an input again publishes it again (the same update may be meant twice,
    // A, B, A); with the id of an earlier publish (`--resume`, which a failed one prints)
    // JetStream drops what that one published.
    let one = nats_agent.dir.path().join("one.ndjson");
    std::fs::write(&one, &lines[0]).unwrap();
    for _ in 0..2 {
        let again = nats_agent.cli(&["publish", one.to_str().unwrap()]);
        assert!(again.contains("1 update(s) published"), "{again}");
    }
    // A publish's id: a nonce, the digest of the input it read, and how many of its updates
    // went through in order.
    let digest = outpost::source::partition::fnv1a64(&std::fs::read(&file).unwrap());
    let id = format!("00000000000000aa{digest:016x}{:016x}", 0);
    let other = format!("00000000000000aa{:016x}{:016x}", digest ^ 1, 0);
    let refused = nats_agent.run(&["publish", "--resume", &other, file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not the one that publish read"), "{stderr}");
    let resume = ["publish", "--resume", &id, file.to_str().unwrap()];
    let first = nats_agent.cli(&resume);
    assert!(first.contains("20000 update(s) published"), "{first}");
    let resumed = nats_agent.cli(&resume);
    assert!(
        resumed.contains("0 update(s) published") && resumed.contains("20000 already there"),
        "{resumed}"
    );
    // What went through is not sent again: past the duplicate window JetStream would store it
    // again, after later updates of its profiles. A publish of another nonce said 19,990 went
    // through: only its last 10 are sent.
    let went_through = format!("00000000000000bb{digest:016x}{:016x}", 19_990);
    let rest = nats_agent.cli(&["publish", "--resume", &went_through, file.to_str().unwrap()]);
    assert!(
        rest.contains("10 update(s) published") && rest.contains("the first 19990 went through"),
        "{rest}"
    );
    let committed = "outpost_source_messages_total{result=\"committed\"}";
    let mut taken = 0.0;
    for _ in 0..300 {
        taken = metric(agent_n.addr, committed).await;
        if taken >= 40_012.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        taken, 40_012.0,
        "each publish but the resumed one reached the agent, and the last 10 of the one resumed past what went through"
    );
    drop(agent_h);
    drop(agent_n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_messages_are_rejected_and_do_not_stop_their_partition() {
    let Some(server_bin) = nats_server_or_skip("invalid_messages_are_rejected") else {
        return;
    };
    let server = NatsServer::start(&server_bin);
    let receiver = start_receiver().await;
    let setup = AgentSetup::on_stream(&receiver.base_url(), &server, "max_rejected = 3", "");
    let agent = setup.start().await;
    // p-000001 lives in partition 1 of 8, p-000123 in partition 6.
    let subject = "test.updates.1";
    let messages = [
        member_update("p-000001", "first", "2026-01-01T00:00:01Z"),
        "{bad".to_owned(),
        r#"{"id":"p-000001","profile":{},"extra":1}"#.to_owned(),
        member_update("p-000123", "elsewhere", "2026-01-01T00:00:01Z"),
        member_update("p-000001", "second", "2026-01-01T00:00:02Z"),
    ];
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    for message in &messages {
        js.publish(subject, message.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    wait_or_show(20, "both valid updates delivered", &[&agent], async || {
        distinct_delivered(&receiver) >= 2
    })
    .await;
    let names = names_by_profile(&receiver);
    assert_eq!(names["p-000001"], ["first", "second"]);
    assert!(!names.contains_key("p-000123"));

    // Through the running agent's socket.
    let list = json_lines(&setup.cli(&["rejected", "list", "--json"]));
    let ids: Vec<&str> = list.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["1-2", "1-3", "1-4"]);
    let shown: serde_json::Value =
        serde_json::from_str(&setup.cli(&["rejected", "show", "1-2", "--json"])).unwrap();
    assert_eq!(shown["raw"], "{bad");
    assert_eq!(shown["subject"], subject);
    assert!(
        shown["error"].as_str().unwrap().contains("not valid JSON"),
        "{shown}"
    );
    assert!(
        list[1]["error"].as_str().unwrap().contains("extra"),
        "{}",
        list[1]
    );
    assert!(
        list[2]["error"].as_str().unwrap().contains("partition 6"),
        "{}",
        list[2]
    );
    let human = setup.cli(&["rejected", "list"]);
    assert!(
        human.contains("1-3") && human.contains("test.updates.1"),
        "{human}"
    );
    assert_eq!(
        metric(
            agent.addr,
            "outpost_source_messages_total{result=\"rejected\"}"
        )
        .await,
        3.0
    );
    assert_eq!(metric(agent.addr, "outpost_source_acks_total").await, 5.0);

    // Past `max_rejected`, a rejected message is logged, acknowledged and counted, not kept.
    js.publish(subject, "{bad again".into())
        .await
        .unwrap()
        .await
        .unwrap();
    wait_or_show(20, "the fourth rejected message", &[&agent], async || {
        metric(agent.addr, "outpost_source_acks_total").await == 6.0
    })
    .await;
    let stats: serde_json::Value =
        serde_json::from_str(&setup.cli(&["outbox", "stats", "--json"])).unwrap();
    assert_eq!(
        (&stats["rejected"], &stats["rejected_not_kept"]),
        (&serde_json::json!(3), &serde_json::json!(1)),
        "{stats}"
    );
    let human = setup.cli(&["outbox", "stats"]);
    assert!(
        human.contains("3 stream message(s) kept, 1 more not kept"),
        "{human}"
    );
    let log = agent.log();
    assert!(
        log.contains("rejected messages are no longer kept") && log.contains("seq=6"),
        "{log}"
    );
    assert_eq!(
        json_lines(&setup.cli(&["rejected", "list", "--json"])).len(),
        3
    );

    // A bad line refuses the whole input: nothing is published.
    let stream_messages = || async {
        let client = async_nats::connect(server.url()).await.unwrap();
        let mut stream = async_nats::jetstream::new(client)
            .get_stream("UPDATES")
            .await
            .unwrap();
        stream.info().await.unwrap().state.messages
    };
    let before = stream_messages().await;
    let bad = [
        member_update("p-000001", "third", "2026-01-01T00:00:03Z"),
        "{\"id\":1}".into(),
    ];
    let out = std::process::Command::new(binary())
        .arg("--config") // before the subcommand's name, as well as after it
        .arg(setup.config())
        .arg("publish")
        .arg(write_lines(setup.dir.path(), &bad))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("nothing published") && stderr.contains("line 2"),
        "{stderr}"
    );
    assert_eq!(stream_messages().await, before);

    let dropped: serde_json::Value =
        serde_json::from_str(&setup.cli(&["rejected", "drop", "1-2", "--json"])).unwrap();
    assert_eq!(dropped["dropped"], serde_json::json!(["1-2"]), "{dropped}");
    assert_eq!(
        json_lines(&setup.cli(&["rejected", "list", "--json"])).len(),
        2
    );
    let mut agent = agent;
    agent.terminate().await;
    // Without the agent, straight on the store.
    setup.cli(&["rejected", "drop", "--all"]);
    assert!(setup
        .cli(&["rejected", "list"])
        .contains("no rejected messages"));
}

/// nats-server reports the time it started again as the creation time of a stream edited
/// since its last start. Agents tell a stream made again under the same name by when it was
/// made, which `nats setup` records in its description: the stream edited (a limit raised)
/// and its server restarted is still the stream the store has positions in, and nothing is
/// consumed again from its start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_edited_and_its_server_restarted_is_consumed_on_from_where_it_was() {
    let Some(server_bin) = nats_server_or_skip("a_stream_edited_and_its_server_restarted") else {
        return;
    };
    let mut server = NatsServer::start(&server_bin);
    let receiver = start_receiver().await;
    let setup = AgentSetup::on_stream(&receiver.base_url(), &server, "", "");
    let url = server.url();
    let info = || async {
        let client = async_nats::connect(url.as_str()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream("UPDATES").await.unwrap();
        (js, stream.info().await.unwrap().clone())
    };
    let (_, made) = info().await;
    let description = made.config.description.clone().unwrap_or_default();
    let nanos = made.created.unix_timestamp_nanos();
    assert!(
        description.contains(&format!("made at {nanos} ")),
        "{description}"
    );
    let mut agent = setup.start().await;
    setup.publish(&versions(20, 0));
    wait_or_show(60, "the first versions", &[&agent], async || {
        names_by_profile(&receiver).len() == 20
    })
    .await;
    agent.terminate().await;

    // Restarted, edited, restarted: the server then takes its second start for the
    // stream's creation.
    server.restart();
    let (js, edited) = info().await;
    let mut config = edited.config.clone();
    config.max_messages_per_subject = 1_000;
    js.update_stream(config).await.unwrap();
    server.restart();
    let (_, restarted) = info().await;
    assert_ne!(
        made.created, restarted.created,
        "nats-server reports another creation time once restarted after an edit (the case \
         this test is about)"
    );
    let agent = setup.start().await;
    setup.publish(&versions(20, 2));
    wait_or_show(60, "the second versions", &[&agent], async || {
        names_by_profile(&receiver)
            .values()
            .all(|names| names.len() == 2)
    })
    .await;
    let log = agent.log();
    assert!(!log.contains("one in another stream"), "{log}");
    assert_eq!(
        metric(
            agent.addr,
            "outpost_source_messages_total{result=\"committed\"}"
        )
        .await,
        20.0,
        "only the new versions were consumed"
    );
}

/// Publishes `payload` on `subject` with `header` as its header block, as it is, over the
/// NATS protocol itself: the client library would refuse to send a block it cannot read.
fn publish_with_raw_header(server: &NatsServer, subject: &str, header: &[u8], payload: &[u8]) {
    use std::io::{BufRead, Write};
    let address = server.url().trim_start_matches("nats://").to_owned();
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
    let mut info = String::new();
    reader.read_line(&mut info).unwrap();
    assert!(info.starts_with("INFO"), "{info}");
    let mut message = format!(
        "CONNECT {{\"headers\":true,\"verbose\":false,\"pedantic\":false}}\r\nHPUB {subject} {} {}\r\n",
        header.len(),
        header.len() + payload.len()
    )
    .into_bytes();
    message.extend_from_slice(header);
    message.extend_from_slice(payload);
    message.extend_from_slice(b"\r\nPING\r\n");
    stream.write_all(&message).unwrap();
    let mut pong = String::new();
    reader.read_line(&mut pong).unwrap();
    assert_eq!(pong, "PONG\r\n");
}

/// A message whose header block the NATS client cannot read as a message's stops its
/// partition unless the agent reads around the client. With a status on its first line, the
/// client takes it for the server's answer to the fetch and drops it (404 and 408 end the
/// fetch as if nothing were there, 100 stalls it, others fail it); not UTF-8 (as a producer in
/// another language may write), it breaks the connection each time it is fetched. After two
/// such stops at the same position the partition's next messages are read by their stream
/// sequence, and it goes on. Its update is taken (its headers are not used), in order. Each
/// header is in a partition of its own, so that all recover in one run; the one that breaks
/// the connection, which all partitions share, comes once the others are through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_headers_the_client_cannot_read_does_not_stop_its_partition() {
    let Some(server_bin) = nats_server_or_skip("a_message_whose_headers_the_client_cannot_read")
    else {
        return;
    };
    let with_status: [&[u8]; 4] = [
        b"NATS/1.0 404 No Messages\r\n\r\n",
        b"NATS/1.0 408 Request Timeout\r\n\r\n",
        b"NATS/1.0 100 Idle Heartbeat\r\n\r\n",
        b"NATS/1.0 503\r\n\r\n",
    ];
    let latin1: &[u8] = b"NATS/1.0\r\nX-Source: caf\xe9\r\n\r\n";
    let server = NatsServer::start(&server_bin);
    let receiver = start_receiver().await;
    let setup = AgentSetup::on_stream(&receiver.base_url(), &server, "", "");
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    // Publishes `first`, then `second` behind `header`, then `third`, all of one profile in
    // `partition` (of 8): the profile, and the stream sequence of `second`.
    let publish_around = async |partition: u32, header: &[u8]| {
        let id = (0..)
            .map(|n| format!("p-{n:06}"))
            .find(|id| outpost::source::partition::partition_of(id, 8) == partition)
            .unwrap();
        let subject = format!("test.updates.{partition}");
        let update = |name: &str, second: u32| {
            member_update(&id, name, &format!("2026-01-01T00:00:0{second}Z"))
        };
        let first = js.publish(subject.clone(), update("first", 1).into());
        let first_seq = first.await.unwrap().await.unwrap().sequence;
        publish_with_raw_header(&server, &subject, header, update("second", 2).as_bytes());
        let third = js.publish(subject, update("third", 3).into());
        third.await.unwrap().await.unwrap();
        (id, first_seq + 1)
    };
    let mut published = Vec::new();
    for (partition, header) in (2..).zip(with_status) {
        published.push(publish_around(partition, header).await);
    }
    let agent = setup.start().await;
    let delivered = async |count: usize| {
        wait_or_show(90, "every update delivered", &[&agent], async || {
            distinct_delivered(&receiver) >= count
        })
        .await;
    };
    delivered(3 * published.len()).await;
    assert!(
        !agent.log().contains("disconnected"),
        "a status broke the connection: {}",
        agent.log()
    );
    published.push(publish_around(1, latin1).await);
    delivered(3 * published.len()).await;
    let names = names_by_profile(&receiver);
    let log = agent.log();
    for (id, seq) in published {
        assert_eq!(names[&id], ["first", "second", "third"], "{id}");
        assert!(
            log.lines().any(
                |line| line.contains("whose NATS headers the client cannot read")
                    && line.contains(&format!("seq={seq} "))
            ),
            "seq {seq}: {log}"
        );
    }
}

/// Deploy scripts run `nats setup` on every host of a fleet at once: one makes the stream,
/// the others find it (made, or being described), and none fails or asks for
/// `--record-made-at`; the stream records when it was made. Timing decides which setups
/// race, so each round is run several times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setups_run_at_once_all_succeed() {
    let Some(server_bin) = nats_server_or_skip("setups_run_at_once_all_succeed") else {
        return;
    };
    let server = NatsServer::start(&server_bin);
    let setup = AgentSetup::new(
        "http://127.0.0.1:9",
        Some(&nats_table(&server.url(), 8, "0-7", "")),
        "",
    );
    let js = server.jetstream().await;
    let description = async || {
        let mut stream = js.get_stream("UPDATES").await.unwrap();
        stream
            .info()
            .await
            .unwrap()
            .config
            .description
            .clone()
            .unwrap()
    };
    const SETUPS: usize = 6;
    for round in 0..8 {
        if round > 0 {
            js.delete_stream("UPDATES").await.unwrap();
        }
        let config = setup.config();
        let setups: Vec<_> = (0..SETUPS)
            .map(|_| {
                std::process::Command::new(binary())
                    .args(["nats", "setup", "--config", config.to_str().unwrap()])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut created = 0;
        for running in setups {
            let out = running.wait_with_output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let said = format!(
                "round {round}: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "{said}");
            assert!(!stdout.contains("--record-made-at"), "{said}");
            created += usize::from(stdout.contains("UPDATES created"));
        }
        assert!(created >= 1, "round {round}");
        assert!(description().await.contains("; made at "), "round {round}");
    }
    // As a setup that made it left it before recording when: recorded unasked. As an earlier
    // build described it: left alone, though the stream is empty (an earlier build's agents
    // would consume again what is published after the edit, once the server restarts).
    let mut stream = js.get_stream("UPDATES").await.unwrap();
    let made = description().await;
    let without_made_at = made[..made.find("; made at ").unwrap()].to_owned();
    let mut describe = async |text: String| {
        let mut config = stream.info().await.unwrap().config.clone();
        config.description = Some(text);
        js.update_stream(config).await.unwrap();
    };
    describe(format!("{without_made_at}; made at pending")).await;
    let out = setup.cli(&["nats", "setup"]);
    assert!(
        out.contains("now records when the stream was made"),
        "{out}"
    );
    assert_eq!(description().await, made);
    describe(without_made_at.clone()).await;
    let out = setup.cli(&["nats", "setup"]);
    assert!(out.contains("--record-made-at"), "{out}");
    assert_eq!(description().await, without_made_at);
    assert_eq!(stream.info().await.unwrap().state.messages, 0);
}

/// An update of p-000001 (partition 41 of 64) named `name` at `at`, made `padding` bytes
/// larger by an unmapped attribute.
fn padded_update(name: &str, at: &str, padding: usize) -> String {
    let mut update: serde_json::Value =
        serde_json::from_str(&member_update("p-000001", name, at)).unwrap();
    update["profile"]["padding"] = "x".repeat(padding).into();
    update.to_string()
}

/// A partition fetches at most its share of a byte budget at a time (1 MiB each of 64). A
/// message larger than that, which ends every such fetch before it, is fetched by itself, and
/// the partition goes on in order after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_larger_than_a_fetch_may_take_is_fetched_alone() {
    let Some(server_bin) = nats_server_or_skip("a_message_larger_than_a_fetch_may_take") else {
        return;
    };
    let conf = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(conf.path(), "max_payload: 4MB\n").unwrap();
    let server = NatsServer::start_with(&server_bin, &["-c", conf.path().to_str().unwrap()]);
    let receiver = start_receiver().await;
    let setup = AgentSetup::new(
        &receiver.base_url(),
        Some(&nats_table(&server.url(), 64, "0-63", "")),
        "",
    );
    setup.cli(&["nats", "setup"]);
    setup.publish(&[
        padded_update("first", "2026-01-01T00:00:01Z", 10),
        padded_update("large", "2026-01-01T00:00:02Z", 2 << 20),
        padded_update("after", "2026-01-01T00:00:03Z", 10),
    ]);
    let agent = AgentProcess::start_with_env(
        &setup.config(),
        setup.addr.port(),
        &[("OUTPOST_LOG", "warn,outpost::source::nats=debug")],
    )
    .await;
    wait_or_show(30, "the three updates delivered", &[&agent], async || {
        distinct_delivered(&receiver) >= 3
    })
    .await;
    assert_eq!(
        names_by_profile(&receiver)["p-000001"],
        ["first", "large", "after"]
    );
    let log = agent.log();
    assert!(
        log.contains("fetched by itself") && log.contains("share=1048576"),
        "{log}"
    );
    assert!(setup
        .cli(&["rejected", "list"])
        .contains("no rejected messages"));
}

/// The bytes JetStream counts against a pull request's budget for each message of
/// `partition`, as the agent's consumer gets them (subject, reply, headers and payload: what
/// async-nats reads as `Message::length`), read through a consumer of the agent's name that
/// is then deleted.
async fn budgeted_sizes(server: &NatsServer, partition: u32) -> Vec<usize> {
    use async_nats::jetstream::consumer;
    use futures_util::StreamExt;
    let client = async_nats::connect(server.url()).await.unwrap();
    let stream = async_nats::jetstream::new(client)
        .get_stream("UPDATES")
        .await
        .unwrap();
    let name = format!("outpost-p{partition}");
    let reader: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: format!("test.updates.{partition}"),
            ack_policy: consumer::AckPolicy::Explicit,
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = reader.fetch().max_messages(1000).messages().await.unwrap();
    let mut sizes = Vec::new();
    while let Some(message) = messages.next().await {
        sizes.push(message.unwrap().length);
    }
    stream.delete_consumer(&name).await.unwrap();
    sizes
}

/// JetStream ends a pull request whose messages take its byte budget exactly without a status
/// to say so: the fetch must end there by itself rather than wait for one and stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_whose_messages_take_its_budget_exactly_ends_there() {
    let Some(server_bin) = nats_server_or_skip("a_fetch_whose_messages_take_its_budget") else {
        return;
    };
    // 64 MiB over the 64 partitions owned; p-000001 is in partition 41 of 64 (README).
    const SHARE: usize = 1 << 20;
    const PARTITION: u32 = 41;
    const FILLING: usize = 17;
    let server = NatsServer::start(&server_bin);
    let receiver = start_receiver().await;
    let setup = AgentSetup::new(
        &receiver.base_url(),
        Some(&nats_table(&server.url(), 64, "0-63", "")),
        "",
    );
    let update = |v: usize, padding: usize| {
        padded_update(
            &format!("v{v}"),
            &format!("2026-01-01T00:00:{v:02}Z"),
            padding,
        )
    };
    // The last of the first FILLING messages is made as large as their sum needs to be SHARE.
    let publish = async |last_padding: usize| {
        let js = server.jetstream().await;
        let _ = js.delete_stream("UPDATES").await;
        setup.cli(&["nats", "setup"]);
        for v in 1..=FILLING + 1 {
            let padding = match v {
                v if v < FILLING => 60_000,
                FILLING => last_padding,
                _ => 10,
            };
            js.publish(
                format!("test.updates.{PARTITION}"),
                update(v, padding).into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
        budgeted_sizes(&server, PARTITION).await
    };
    let guess = 60_000;
    let sizes = publish(guess).await;
    assert_eq!(sizes.len(), FILLING + 1);
    let short = SHARE - sizes[..FILLING].iter().sum::<usize>();
    let sizes = publish(guess + short).await;
    assert_eq!(sizes[..FILLING].iter().sum::<usize>(), SHARE, "{sizes:?}");

    let agent = setup.start().await;
    // A fetch waits 10 s for a message before it is taken for stalled.
    let committed = "outpost_source_messages_total{result=\"committed\"}";
    wait_or_show(8, "every message committed", &[&agent], async || {
        metric(agent.addr, committed).await == (FILLING + 1) as f64
    })
    .await;
    assert!(!agent.log().contains("stalled"), "{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_pauses_fetching_until_deliveries_make_room() {
    let Some(server_bin) = nats_server_or_skip("a_full_outbox_pauses_fetching") else {
        return;
    };
    const PROFILES: usize = 300;
    let server = NatsServer::start(&server_bin);
    let receiver = start_receiver().await;
    receiver.set_export_script(Some(outpost::receiver::down()));
    let setup = AgentSetup::on_stream(
        &receiver.base_url(),
        &server,
        "fetch_batch = 5",
        "max_outbox_bytes = 4000",
    );
    let lines: Vec<String> = (0..PROFILES).map(|p| version_line(p, 0)).collect();
    setup.publish(&lines);
    let agent = setup.start().await;

    wait_until_paused(&agent).await;
    // Batches fetched just before the outbox filled are still committed; then nothing moves.
    let committed = "outpost_source_messages_total{result=\"committed\"}";
    let mut before = metric(agent.addr, committed).await;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = metric(agent.addr, committed).await;
        if now == before {
            break;
        }
        before = now;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        metric(agent.addr, committed).await,
        before,
        "fetching goes on"
    );
    assert!(before < PROFILES as f64, "everything was taken: {before}");
    assert_eq!(metric(agent.addr, "outpost_source_paused").await, 1.0);
    let pending = || async {
        healthz_json(agent.addr).await["nats"]["pending"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>()
    };
    assert!(pending().await > 0, "nothing waits in the stream");
    // Published while paused: what waits is counted without a fetch.
    const MORE: usize = 50;
    let more: Vec<String> = (PROFILES..PROFILES + MORE)
        .map(|p| version_line(p, 0))
        .collect();
    setup.publish(&more);
    let waiting = (PROFILES + MORE) as u64 - before as u64;
    let mut seen = 0;
    for _ in 0..100 {
        seen = pending().await;
        if seen == waiting {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, waiting, "messages waiting, as /healthz shows them");

    receiver.set_export_script(None);
    wait_until(60, "every export delivered", || {
        distinct_delivered(&receiver) >= PROFILES + MORE
    })
    .await;
    assert_eq!(
        metric(agent.addr, committed).await,
        (PROFILES + MORE) as f64
    );
    let mut state = serde_json::Value::Null;
    for _ in 0..100 {
        state = healthz_json(agent.addr).await["nats"]["state"].clone();
        if state == "consuming" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state, "consuming");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reconnects_after_a_nats_restart_and_loses_nothing() {
    let Some(server_bin) = nats_server_or_skip("the_agent_reconnects_after_a_nats_restart") else {
        return;
    };
    const PROFILES: usize = 400;
    let mut server = NatsServer::start(&server_bin);
    let receiver = start_receiver().await;
    let setup = AgentSetup::on_stream(&receiver.base_url(), &server, "", "");
    let agent = setup.start().await;
    let config = setup.nats_config();
    let first: Vec<String> = (0..PROFILES).map(|p| version_line(p, 0)).collect();
    let second: Vec<String> = (0..PROFILES).map(|p| version_line(p, 2)).collect();
    setup.publish(&first);
    wait_until(30, "the first half delivered", || {
        distinct_delivered(&receiver) >= PROFILES
    })
    .await;

    server.stop();
    let mut down = false;
    for _ in 0..100 {
        if healthz_json(agent.addr).await["nats"]["state"] == "disconnected" {
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(down, "/healthz never said disconnected");
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.restart();
    let updates = outpost::profile::update::parse_body(second.join("\n").as_bytes()).unwrap();
    let planned = outpost::source::publish::plan(&updates, &config, 2);
    outpost::source::publish::publish(&config, planned, None, 64, |_| {})
        .await
        .unwrap();
    wait_until(60, "the second half delivered", || {
        distinct_delivered(&receiver) >= 2 * PROFILES
    })
    .await;
    let names = names_by_profile(&receiver);
    for p in 0..PROFILES {
        assert_eq!(
            names[&format!("p{p}")],
            [format!("p{p}-v0"), format!("p{p}-v2")]
        );
    }
    assert_eq!(healthz_json(agent.addr).await["nats"]["state"], "consuming");
}

/// Three agents own 12 partitions between them; one is SIGKILLed at random instants, over and
/// over, while updates are published and delivered. Every export arrives; none of a profile
/// after a newer one of it; none twice under different ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_three_loses_nothing_when_one_agent_is_killed_again_and_again() {
    let Some(server_bin) = nats_server_or_skip("a_fleet_of_three_loses_nothing") else {
        return;
    };
    const PROFILES: usize = 120;
    const VERSIONS: usize = 20; // 2,400 updates, 1,200 exports
    const KILLS: usize = 10;
    let server = NatsServer::start(&server_bin);
    let receiver = start_receiver().await;
    let setups: Vec<AgentSetup> = ["0-3", "4-7", "8-11"]
        .iter()
        .map(|owned| {
            AgentSetup::new(
                &receiver.base_url(),
                Some(&nats_table(&server.url(), 12, owned, "fetch_batch = 50")),
                "",
            )
        })
        .collect();
    setups[0].cli(&["nats", "setup"]);
    let config = setups[0].nats_config();
    let _steady = [setups[1].start().await, setups[2].start().await];

    // The publisher: one version of every profile at a time, while the kills go on.
    let publisher = tokio::spawn(async move {
        for v in 0..VERSIONS {
            let lines: Vec<String> = (0..PROFILES).map(|p| version_line(p, v)).collect();
            let updates =
                outpost::profile::update::parse_body(lines.join("\n").as_bytes()).unwrap();
            let planned = outpost::source::publish::plan(&updates, &config, v as u64);
            outpost::source::publish::publish(&config, planned, None, 64, |_| {})
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(120)).await;
        }
    });
    let mut rng = rand::thread_rng();
    // Kills that landed after the agent committed messages in that run, while the publisher
    // was still publishing.
    let mut kills_mid_stream = 0;
    for _ in 0..KILLS {
        let agent = setups[0].start().await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(30..300))).await;
        let committed = metric(
            agent.addr,
            "outpost_source_messages_total{result=\"committed\"}",
        )
        .await;
        let publishing = !publisher.is_finished();
        drop(agent); // SIGKILL
        if committed > 0.0 && publishing {
            kills_mid_stream += 1;
        }
    }
    assert!(
        kills_mid_stream > 0,
        "no kill landed while the agent was consuming"
    );
    publisher.await.unwrap();
    let _survivor = setups[0].start().await;
    let exports = PROFILES * VERSIONS / 2;
    wait_until(60, "every export delivered", || {
        distinct_delivered(&receiver) >= exports
    })
    .await;

    let names = names_by_profile(&receiver);
    for p in 0..PROFILES {
        let expected: Vec<String> = (0..VERSIONS)
            .step_by(2)
            .map(|v| format!("p{p}-v{v}"))
            .collect();
        assert_eq!(names[&format!("p{p}")], expected, "profile p{p}");
    }
    assert_eq!(
        distinct_delivered(&receiver),
        exports,
        "an export arrived twice under two ids"
    );
}

/// NATS down at start: the agent serves anyway (ingest, delivery, `/healthz` saying so), and
/// consumes once the server and its stream are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_starts_without_nats_and_consumes_once_it_is_up() {
    let Some(server_bin) = nats_server_or_skip("the_agent_starts_without_nats") else {
        return;
    };
    let mut server = NatsServer::start(&server_bin);
    server.stop();
    let receiver = start_receiver().await;
    let setup = AgentSetup::new(
        &receiver.base_url(),
        Some(&nats_table(&server.url(), 8, "0-7", "")),
        "",
    );
    let agent = setup.start().await;
    assert_eq!(
        healthz_json(agent.addr).await["nats"]["state"],
        "disconnected"
    );
    // What data/prometheus/outpost-alerts.yml's OutpostNatsDisconnected reads: not connected,
    // and a source configured (its series there before any message).
    let (_, metrics) = http_get(agent.addr, "/metrics").await;
    for sample in [
        "outpost_source_connected 0",
        "outpost_source_messages_total{result=\"committed\"} 0",
        "outpost_source_messages_total{result=\"skipped\"} 0",
        "outpost_source_messages_total{result=\"rejected\"} 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == sample),
            "no {sample} in:\n{metrics}"
        );
    }
    // `outpost top` reads the source's state as it shows it, whether or not `/metrics` was
    // scraped (it has not been).
    let top = setup.cli(&["top", "--once", "--interval", "0.2"]);
    assert!(
        top.contains("NATS lag") && top.contains("waiting (disconnected)"),
        "{top}"
    );
    wait_or_show(
        10,
        "the log saying NATS cannot be reached",
        &[&agent],
        async || {
            let log = agent.log();
            log.contains("cannot connect to NATS")
                && log.contains(&server.url())
                && log.contains("reason=")
        },
    )
    .await;
    let (status, body) = http_post(agent.addr, "/v1/updates", version_line(1, 0), &[]).await;
    assert_eq!(status, 200, "{body}");

    server.restart();
    // Connected, but the stream is not made yet: no partition can be consumed, and
    // `/healthz` says so rather than "consuming".
    wait_or_show(30, "every partition failing", &[&agent], async || {
        let nats = &healthz_json(agent.addr).await["nats"];
        nats["state"] == "consuming none"
            && nats["failing"] == serde_json::json!([0, 1, 2, 3, 4, 5, 6, 7])
    })
    .await;
    setup.cli(&["nats", "setup"]);
    let lines: Vec<String> = (2..12).map(|p| version_line(p, 0)).collect();
    setup.publish(&lines);
    wait_or_show(30, "every export delivered", &[&agent], async || {
        distinct_delivered(&receiver) >= 11
    })
    .await;
    let nats = &healthz_json(agent.addr).await["nats"];
    assert_eq!(nats["state"], "consuming", "{nats}");
    assert_eq!(nats["failing"], serde_json::json!([]), "{nats}");
    let top = setup.cli(&["top", "--once", "--interval", "0.2"]);
    assert!(top.contains("waiting (connected)"), "{top}");
}

/// Credentials the server refuses: the agent says why it cannot connect and what to look
/// at, once, where the client logged its own error at every attempt (several a second at
/// first, then every 4 s) and outpost's warning gave no reason; at the stop, the consumers
/// that could not end are said in one line, not one each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_the_server_refuses_are_said_once_with_why() {
    let Some(server_bin) = nats_server_or_skip("credentials_the_server_refuses") else {
        return;
    };
    let server = NatsServer::start_with(&server_bin, &["--user", "edge", "--pass", "pa55-word"]);
    let receiver = start_receiver().await;
    let setup = AgentSetup::new(
        &receiver.base_url(),
        Some(&nats_table(
            &server.url(),
            8,
            "0-7",
            "user = \"edge\"\npassword = \"n0pe-word\"",
        )),
        "",
    );
    let mut agent = setup.start().await;
    wait_or_show(
        15,
        "the log saying why NATS cannot be reached",
        &[&agent],
        async || agent.log().contains("reason=\"authorization violation\""),
    )
    .await;
    // Long enough for several more attempts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = agent.log();
    assert_eq!(log.matches("cannot connect to NATS").count(), 1, "{log}");
    assert!(log.contains("check user and password"), "{log}");
    assert_eq!(log.matches("async_nats::connector").count(), 1, "{log}");
    assert!(!log.contains("n0pe-word"), "{log}");

    let status = agent
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(15))
        .await;
    assert_eq!(status.code(), Some(0));
    let log = agent.log();
    assert_eq!(
        log.matches("did not end within the grace").count(),
        1,
        "{log}"
    );
    assert!(log.contains("partitions=0-7"), "{log}");
}

#[test]
fn the_fleet_demo_delivers_what_one_agent_would() {
    if nats_server_or_skip("the_fleet_demo").is_none() {
        return;
    }
    let out = std::process::Command::new(binary())
        .args(["demo", "--fleet"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // data/README.md: the sample file makes 823 exports ingested into one agent.
    assert!(stdout.contains("1529 updates published"), "{stdout}");
    assert!(stdout.contains("823 distinct exports accepted"), "{stdout}");
    assert_eq!(stdout.matches("updates committed").count(), 3, "{stdout}");
}

/// A consumer made again behind the agent's back, from the stream's start, would hand again
/// what is in the store, and one made from a later start would skip messages: the agent
/// notices that the consumer numbers its deliveries from 1 again, and starts the partition
/// over from its stored position. Every update is applied once (without timestamps, version
/// 0 applied again would export), every export delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_made_again_behind_the_agents_back_is_noticed() {
    let Some(server_bin) = nats_server_or_skip("a_consumer_made_again_behind_the_agents_back")
    else {
        return;
    };
    const PROFILES: usize = 40;
    let server = NatsServer::start(&server_bin);
    let receiver = start_receiver().await;
    receiver.set_export_script(Some(outpost::receiver::down()));
    let setup = AgentSetup::on_stream(
        &receiver.base_url(),
        &server,
        "fetch_batch = 2",
        "max_outbox_bytes = 3000",
    );
    // Version 0, then version 2 of each profile, without timestamps: applying version 0
    // again would export.
    let lines: Vec<String> = [0, 2]
        .iter()
        .flat_map(|&v| (0..PROFILES).map(move |p| version_line(p, v)))
        .collect();
    setup.publish(&lines);
    let agent = setup.start().await;
    wait_until_paused(&agent).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let committed = "outpost_source_messages_total{result=\"committed\"}";
    let before = metric(agent.addr, committed).await;
    assert!(before > 0.0);

    // Every partition's consumer again from the first message, under the agent's name.
    let client = async_nats::connect(server.url()).await.unwrap();
    let stream = async_nats::jetstream::new(client)
        .get_stream("UPDATES")
        .await
        .unwrap();
    for partition in 0..8 {
        let name = format!("outpost-p{partition}");
        stream.delete_consumer(&name).await.unwrap();
        stream
            .create_consumer(async_nats::jetstream::consumer::pull::Config {
                durable_name: Some(name),
                filter_subject: format!("test.updates.{partition}"),
                ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
                deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
                max_ack_pending: 2,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    receiver.set_export_script(None);
    wait_or_show(60, "every export delivered", &[&agent], async || {
        distinct_delivered(&receiver) >= 2 * PROFILES
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(metric(agent.addr, committed).await, (2 * PROFILES) as f64);
    assert_eq!(
        metric(agent.addr, "outpost_source_acks_total").await,
        (2 * PROFILES) as f64,
        "a message acknowledged twice"
    );
    let log = agent.log();
    assert!(
        log.contains("numbers its deliveries from 1 again"),
        "not noticed:\n{log}"
    );
    assert_eq!(
        distinct_delivered(&receiver),
        2 * PROFILES,
        "an export too many"
    );
    let names = names_by_profile(&receiver);
    for p in 0..PROFILES {
        assert_eq!(
            names[&format!("p{p}")],
            [format!("p{p}-v0"), format!("p{p}-v2")]
        );
    }
}

/// A stream deleted and made again starts its sequences at 1: the agent must consume it from
/// its start rather than skip what lies at or below its position in the old stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_made_again_is_consumed_from_its_start() {
    let Some(server_bin) = nats_server_or_skip("a_stream_made_again_is_consumed_from_its_start")
    else {
        return;
    };
    const PROFILES: usize = 60;
    let server = NatsServer::start(&server_bin);
    let receiver = start_receiver().await;
    let setup = AgentSetup::on_stream(&receiver.base_url(), &server, "", "");
    let version = |v| versions(PROFILES, v);
    setup.publish(&version(0));
    let agent = setup.start().await;
    let js = server.jetstream().await;
    // Not an update: rejected, as sequence PROFILES + 1 of partition 1, in each stream.
    let publish_bad = |raw: &'static str| {
        let js = js.clone();
        async move {
            js.publish("test.updates.1", raw.into())
                .await
                .unwrap()
                .await
                .unwrap()
        }
    };
    assert_eq!(publish_bad("{old").await.sequence, PROFILES as u64 + 1);
    let rejected = "outpost_source_messages_total{result=\"rejected\"}";
    wait_or_show(60, "the first versions delivered", &[&agent], async || {
        distinct_delivered(&receiver) >= PROFILES
    })
    .await;
    wait_until_metric(&agent, rejected, 1.0).await;

    js.delete_stream("UPDATES").await.unwrap();
    setup.cli(&["nats", "setup"]);
    setup.publish(&version(2));
    assert_eq!(publish_bad("{new").await.sequence, PROFILES as u64 + 1);
    wait_or_show(
        60,
        "the versions in the new stream delivered",
        &[&agent],
        async || distinct_delivered(&receiver) >= 2 * PROFILES,
    )
    .await;
    wait_until_metric(&agent, rejected, 2.0).await;
    // The new stream's message rejected at the old one's place is kept beside it.
    let kept: Vec<(String, String)> = json_lines(&setup.cli(&["rejected", "list", "--json"]))
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().into(),
                r["raw"].as_str().unwrap().into(),
            )
        })
        .collect();
    let place = format!("1-{}", PROFILES + 1);
    assert_eq!(
        kept,
        [
            (place.clone(), "{old".to_owned()),
            (format!("{place}-2"), "{new".to_owned())
        ]
    );
    let later = format!("{place}-2");
    let shown: serde_json::Value =
        serde_json::from_str(&setup.cli(&["rejected", "show", &later, "--json"])).unwrap();
    assert_eq!(
        (&shown["id"], &shown["raw"]),
        (&later.as_str().into(), &"{new".into())
    );
    setup.cli(&["rejected", "drop", &later]);
    let left = json_lines(&setup.cli(&["rejected", "list", "--json"]));
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["raw"], "{old");
    let committed = "outpost_source_messages_total{result=\"committed\"}";
    assert_eq!(metric(agent.addr, committed).await, (2 * PROFILES) as f64);
    let names = names_by_profile(&receiver);
    for p in 0..PROFILES {
        assert_eq!(
            names[&format!("p{p}")],
            [format!("p{p}-v0"), format!("p{p}-v2")]
        );
    }
    assert!(
        agent.log().contains("one in another stream"),
        "the agent says why it starts over:\n{}",
        agent.log()
    );
}

/// A `subject_prefix` changed since the stream was made is refused by `check`, `publish` and
/// the agent, naming the stream's subjects: `check` said ok, and the agent ran consuming
/// nothing while it failed to make each partition's consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_prefix_the_stream_was_not_made_for_is_refused() {
    let Some(server_bin) = nats_server_or_skip("a_subject_prefix_the_stream_was_not_made_for")
    else {
        return;
    };
    let server = NatsServer::start(&server_bin);
    let base = "http://127.0.0.1:9";
    let made = AgentSetup::new(base, Some(&nats_table(&server.url(), 4, "0-3", "")), "");
    made.cli(&["nats", "setup"]);
    let moved = nats_table(&server.url(), 4, "0-3", "").replace(
        "subject_prefix = \"test.updates\"",
        "subject_prefix = \"test.moved\"",
    );
    let moved = AgentSetup::new(base, Some(&moved), "");
    let why = "stream UPDATES takes subjects [\"test.updates.*\"], not test.moved.0 (partition 0's";
    let file = write_lines(moved.dir.path(), &[version_line(0, 0)]);
    for args in [&["check"][..], &["publish", file.to_str().unwrap()]] {
        let out = moved.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    }
    // An agent stops at its start, as for a mistake in its config.
    let mut agent = AgentProcess::spawn_with_env(&moved.config(), moved.addr.port(), &[]);
    let status = agent.wait_for_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(2), "{}", agent.log());
    assert!(agent.log().contains(why), "{}", agent.log());

    // A stream made by hand that takes every partition's subject more widely is taken, by
    // `nats setup` (which records the count in it) as by `check`.
    let js = server.jetstream().await;
    js.delete_stream("UPDATES").await.unwrap();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "UPDATES".into(),
        subjects: vec!["test.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    made.cli(&["nats", "setup"]);
    let check = made.run(&["check"]);
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(stdout.contains("stream           UPDATES"), "{stdout}");
    assert!(
        !String::from_utf8_lossy(&check.stderr).contains("takes subjects"),
        "{check:?}"
    );
}

/// The partition count a stream was made for is written in it by `nats setup`: `nats setup`,
/// `publish` and agents with another count are refused, since every profile would be routed
/// to another partition. A stream made without it gets it from `nats setup` when its messages
/// fit the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_made_for_another_partition_count_is_refused() {
    let Some(server_bin) = nats_server_or_skip("a_stream_made_for_another_partition_count") else {
        return;
    };
    let server = NatsServer::start(&server_bin);
    let base = "http://127.0.0.1:9";
    let eight = AgentSetup::new(base, Some(&nats_table(&server.url(), 8, "0-7", "")), "");
    let sixteen = AgentSetup::new(base, Some(&nats_table(&server.url(), 16, "0-15", "")), "");
    let refused = |setup: &AgentSetup, args: &[&str], why: &str| {
        let out = setup.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    };
    let js = server.jetstream().await;
    let messages = |js: async_nats::jetstream::Context| async move {
        let mut stream = js.get_stream("UPDATES").await.unwrap();
        stream.info().await.unwrap().state.messages
    };

    eight.cli(&["nats", "setup"]);
    refused(&sixteen, &["nats", "setup"], "made for 8 partitions");
    let file = write_lines(
        sixteen.dir.path(),
        &(0..20).map(|p| version_line(p, 0)).collect::<Vec<_>>(),
    );
    refused(
        &sixteen,
        &["publish", file.to_str().unwrap()],
        "made for 8 partitions",
    );
    assert_eq!(messages(js.clone()).await, 0, "nothing published");
    // An agent stops at its start, as for a mistake in its config: its consumers would fail
    // on the stream for ever, with the agent running and healthy.
    let mut agent = AgentProcess::spawn_with_env(&sixteen.config(), sixteen.addr.port(), &[]);
    let status = agent.wait_for_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(2), "{}", agent.log());
    assert!(
        agent
            .log()
            .contains("made for 8 partitions, not source.nats.partitions = 16"),
        "{}",
        agent.log()
    );

    // A stream made by hand, without the count, holding a message of partition 12.
    js.delete_stream("UPDATES").await.unwrap();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "UPDATES".into(),
        subjects: vec!["test.updates.*".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish("test.updates.12", version_line(0, 0).into())
        .await
        .unwrap()
        .await
        .unwrap();
    refused(&eight, &["nats", "setup"], "on test.updates.12");
    // A subject that reads as a number but names no partition: no consumer filters on it.
    js.publish("test.updates.01", version_line(1, 0).into())
        .await
        .unwrap()
        .await
        .unwrap();
    refused(&sixteen, &["nats", "setup"], "on test.updates.01");
    let stream = js.get_stream("UPDATES").await.unwrap();
    stream.purge().filter("test.updates.01").await.unwrap();
    let recorded = sixteen.cli(&["nats", "setup"]);
    assert!(
        recorded.contains("now records the partition count"),
        "{recorded}"
    );
    refused(&eight, &["nats", "setup"], "made for 16 partitions");
    assert!(sixteen.cli(&["nats", "setup"]).contains("nothing changed"));
    // As an earlier build described it, without when it was made: recorded, from the
    // server's time, when asked (agents of earlier builds know the stream by the server's
    // time, which the edit may change).
    let mut stream = js.get_stream("UPDATES").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    let description = config.description.clone().unwrap();
    let cut = description.find("; made at ").unwrap();
    config.description = Some(description[..cut].to_owned());
    js.update_stream(config).await.unwrap();
    let unasked = sixteen.cli(&["nats", "setup"]);
    assert!(
        unasked.contains("does not record when the stream was made")
            && unasked.contains("--record-made-at"),
        "{unasked}"
    );
    let info = stream.info().await.unwrap().clone();
    assert_eq!(info.config.description.unwrap(), &description[..cut]);
    let recorded = sixteen.cli(&["nats", "setup", "--record-made-at"]);
    assert!(
        recorded.contains("now records when the stream was made"),
        "{recorded}"
    );
    let info = stream.info().await.unwrap().clone();
    assert_eq!(
        info.config.description.unwrap(),
        format!(
            "{}; made at {} (ns since 1970)",
            &description[..cut],
            info.created.unix_timestamp_nanos()
        )
    );
    assert!(sixteen.cli(&["nats", "setup"]).contains("nothing changed"));

    // Made by hand with `<prefix>.>`: it takes every partition's subject, and deeper ones,
    // which are no partition's.
    js.delete_stream("UPDATES").await.unwrap();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "UPDATES".into(),
        subjects: vec!["test.updates.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish("test.updates.x.3", version_line(0, 0).into())
        .await
        .unwrap()
        .await
        .unwrap();
    refused(&eight, &["nats", "setup"], "on test.updates.x.3");
    js.get_stream("UPDATES")
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    let recorded = eight.cli(&["nats", "setup"]);
    assert!(
        recorded.contains("now records the partition count"),
        "{recorded}"
    );

    // Made by hand with interest retention: it would drop what no consumer holds while the
    // agents make their consumers anew.
    js.delete_stream("UPDATES").await.unwrap();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "UPDATES".into(),
        subjects: vec!["test.updates.*".into()],
        retention: async_nats::jetstream::stream::RetentionPolicy::Interest,
        ..Default::default()
    })
    .await
    .unwrap();
    refused(&eight, &["nats", "setup"], "outpost needs limits retention");
    refused(
        &eight,
        &["publish", file.to_str().unwrap()],
        "outpost needs limits retention",
    );
}

/// An update larger than the server takes as one message (its max_payload, 1 MiB by default)
/// is refused before anything of the input is published, naming its line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_too_large_for_a_message_publishes_nothing() {
    let Some(server_bin) = nats_server_or_skip("an_update_too_large_for_a_message") else {
        return;
    };
    let server = NatsServer::start(&server_bin);
    let setup = AgentSetup::on_stream("http://127.0.0.1:9", &server, "", "");
    let mut big: serde_json::Value = serde_json::from_str(&version_line(1, 0)).unwrap();
    big["profile"]["note"] = serde_json::json!("x".repeat(1_100_000));
    // `outpost publish` of `lines`, which must exit 1; its stderr.
    let refused = |lines: &[String]| {
        let file = write_lines(setup.dir.path(), lines);
        let out = setup.run(&["publish", file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        stderr
    };
    let stderr = refused(&[version_line(0, 0), big.to_string()]);
    assert!(
        stderr.contains("line 2") && stderr.contains("max_payload"),
        "{stderr}"
    );
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut stream = async_nats::jetstream::new(client)
        .get_stream("UPDATES")
        .await
        .unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 0);

    // Its body alone fits, with 20 bytes to spare, but not with its Nats-Msg-Id header, which
    // the server counts too.
    let max_payload = 1_048_576;
    let body_of = |note: usize| {
        let mut update: serde_json::Value = serde_json::from_str(&version_line(1, 0)).unwrap();
        update["profile"]["note"] = serde_json::json!("x".repeat(note));
        let parsed = outpost::profile::update::parse_body(update.to_string().as_bytes()).unwrap();
        (
            update.to_string(),
            outpost::source::publish::payload_of(&parsed[0]).len(),
        )
    };
    let note = max_payload - 20 - body_of(0).1;
    let (near, bytes) = body_of(note);
    assert_eq!(bytes, max_payload - 20);
    let stderr = refused(&[version_line(0, 0), near]);
    assert!(
        stderr.contains("line 2") && stderr.contains("Nats-Msg-Id header"),
        "{stderr}"
    );
    assert_eq!(stream.info().await.unwrap().state.messages, 0);
}

/// Runs `outpost nats setup` against `[source.nats]` `table`; exit code and stderr.
fn setup_with(table: &str) -> (Option<i32>, String) {
    let out = AgentSetup::new("http://127.0.0.1:9", Some(table), "").run(&["nats", "setup"]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Token, user and password, and TLS with a private CA reach a server that requires them;
/// wrong ones are refused without the secret in the error.
#[test]
fn credentials_and_tls_reach_a_server_that_requires_them() {
    let Some(server_bin) = nats_server_or_skip("credentials_and_tls") else {
        return;
    };
    let server = NatsServer::start_with(&server_bin, &["--auth", "s3cr3t-token"]);
    let table = |extra: &str| nats_table(&server.url(), 4, "0-3", extra);
    assert_eq!(setup_with(&table("token = \"s3cr3t-token\"")).0, Some(0));
    let (code, stderr) = setup_with(&table("token = \"wrong-t0ken\""));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(!stderr.contains("wrong-t0ken"), "{stderr}");
    drop(server);

    let server = NatsServer::start_with(&server_bin, &["--user", "edge", "--pass", "pa55-word"]);
    let table = |extra: &str| nats_table(&server.url(), 4, "0-3", extra);
    assert_eq!(
        setup_with(&table("user = \"edge\"\npassword = \"pa55-word\"")).0,
        Some(0)
    );
    let (code, stderr) = setup_with(&table("user = \"edge\"\npassword = \"n0pe-word\""));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(!stderr.contains("n0pe-word"), "{stderr}");
    drop(server);

    // A CA and a server certificate for 127.0.0.1 it signed.
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    std::fs::write(path("ca.pem"), ca.pem()).unwrap();
    std::fs::write(path("cert.pem"), leaf.pem()).unwrap();
    std::fs::write(path("key.pem"), leaf_key.serialize_pem()).unwrap();
    let server = NatsServer::start_with(
        &server_bin,
        &[
            "--tls",
            "--tlscert",
            &path("cert.pem"),
            "--tlskey",
            &path("key.pem"),
        ],
    );
    let url = format!("tls://127.0.0.1:{}", server.port);
    let trusted = format!("tls_ca_file = \"{}\"", path("ca.pem"));
    assert_eq!(setup_with(&nats_table(&url, 4, "0-3", &trusted)).0, Some(0));
    let (code, stderr) = setup_with(&nats_table(&url, 4, "0-3", ""));
    assert_eq!(
        code,
        Some(1),
        "a server certificate of an unknown CA was accepted: {stderr}"
    );
}

/// A client certificate (`tls_cert_file`, `tls_key_file`) reaches a server that verifies
/// clients' certificates; without one the server refuses, and a key that is not the
/// certificate's is refused at start, naming both keys.
#[test]
fn a_client_certificate_reaches_a_server_that_verifies_clients() {
    use common::pki::Ca;
    let Some(server_bin) = nats_server_or_skip("a_client_certificate_reaches") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, contents: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let ca = Ca::new("NATS CA");
    let server_leaf = ca.server_leaf();
    let (client, other) = (ca.client_leaf(), ca.client_leaf());
    let ca_file = write("ca.pem", &ca.pem());
    let server = NatsServer::start_with(
        &server_bin,
        &[
            "--tlsverify",
            "--tlscert",
            &write("server.pem", &server_leaf.cert.pem()),
            "--tlskey",
            &write("server-key.pem", &server_leaf.key.serialize_pem()),
            "--tlscacert",
            &ca_file,
        ],
    );
    let url = format!("tls://127.0.0.1:{}", server.port);
    let cert_file = write("client.pem", &client.cert.pem());
    let table = |key: &str| {
        let files = format!(
            "tls_ca_file = \"{ca_file}\"\ntls_cert_file = \"{cert_file}\"\ntls_key_file = \"{key}\""
        );
        nats_table(&url, 4, "0-3", &files)
    };
    let key_file = write("client-key.pem", &client.key.serialize_pem());
    let (code, stderr) = setup_with(&table(&key_file));
    assert_eq!(code, Some(0), "{stderr}");

    let without = format!("tls_ca_file = \"{ca_file}\"");
    let (code, stderr) = setup_with(&nats_table(&url, 4, "0-3", &without));
    assert_eq!(code, Some(1), "no client certificate: {stderr}");
    assert!(stderr.contains("set source.nats.tls_cert_file"), "{stderr}");

    let other_key = write("other-key.pem", &other.key.serialize_pem());
    let (code, stderr) = setup_with(&table(&other_key));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("source.nats.tls_cert_file / source.nats.tls_key_file")
            && stderr.contains("is the key the certificate's?"),
        "{stderr}"
    );
}

/// With TLS asked for (a CA to trust), the credentials never go in clear text, even to a
/// server that does not ask for TLS (one in the path, say): the client starts TLS, or gives
/// up. No nats-server needed: a listener plays the server's greeting and keeps what comes.
#[test]
fn with_tls_asked_for_a_server_not_asking_for_it_gets_no_credentials() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // What the client sent on its first connection, until it went quiet for 2 s or closed.
    let server = std::thread::spawn(move || {
        let mut received = Vec::new();
        let (mut socket, _) = listener.accept().unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let _ = socket.write_all(
            b"INFO {\"server_id\":\"fake\",\"version\":\"2.9.0\",\"proto\":1,\"host\":\"127.0.0.1\",\"port\":4222,\"max_payload\":1048576,\"headers\":true,\"tls_required\":false}\r\n",
        );
        let mut buffer = [0u8; 4096];
        while let Ok(n @ 1..) = socket.read(&mut buffer) {
            received.extend_from_slice(&buffer[..n]);
        }
        received
    });
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let table = nats_table(
        &format!("nats://127.0.0.1:{port}"),
        4,
        "0-3",
        &format!(
            "token = \"s3cr3t-nats-token\"\ntls_ca_file = \"{}\"",
            ca_file.display()
        ),
    );
    let (code, stderr) = setup_with(&table);
    assert_eq!(code, Some(1), "{stderr}");
    let received = server.join().unwrap();
    assert!(!received.is_empty(), "the client sent nothing");
    let text = String::from_utf8_lossy(&received);
    assert!(
        !text.contains("s3cr3t-nats-token") && !text.contains("CONNECT"),
        "sent in clear text: {text}"
    );
    // A TLS handshake record (ClientHello) is what it sent.
    assert_eq!(received[0], 0x16, "{text}");
}

/// A server whose account has two users: `operator`, who may do anything (`nats setup`,
/// `publish`), and `agent`, with `permissions` (a NATS config value); the server, and its
/// config file, which must outlive it.
fn server_with_agent_user(
    server_bin: &Path,
    permissions: &str,
) -> (NatsServer, tempfile::NamedTempFile) {
    let conf = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        conf.path(),
        format!(
            r#"accounts {{
  EDGE {{
    jetstream: enabled
    users: [
      {{ user: operator, password: "op-pass" }}
      {{ user: agent, password: "agent-pass", permissions: {permissions} }}
    ]
  }}
}}
"#
        ),
    )
    .unwrap();
    let server = NatsServer::start_with(server_bin, &["-c", conf.path().to_str().unwrap()]);
    (server, conf)
}

const OPERATOR_CREDENTIALS: &str = "user = \"operator\"\npassword = \"op-pass\"";

/// A setup on `server` (with `storage` settings) whose commands run as `operator`, and the path
/// of the same config with the `agent` user's credentials instead.
fn setup_with_agent_user(
    receiver: &Receiver,
    server: &NatsServer,
    storage: &str,
) -> (AgentSetup, PathBuf) {
    let setup = AgentSetup::on_stream(&receiver.base_url(), server, OPERATOR_CREDENTIALS, storage);
    let agent_config = setup.dir.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        std::fs::read_to_string(setup.config()).unwrap().replace(
            OPERATOR_CREDENTIALS,
            "user = \"agent\"\npassword = \"agent-pass\"",
        ),
    )
    .unwrap();
    (setup, agent_config)
}

/// The store, not the server, knows how far a partition is durable, so a partition's old
/// consumer must go before a new one starts at the stored position. A server that refuses the
/// deletion (here: the agent's user may not publish to the delete API) keeps the partition
/// from being consumed, and the log says why; the same agent allowed to delete consumes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_the_server_will_not_delete_keeps_its_partition_unconsumed() {
    let Some(server_bin) = nats_server_or_skip("a_consumer_the_server_will_not_delete") else {
        return;
    };
    let (server, _conf) = server_with_agent_user(
        &server_bin,
        r#"{ publish: { deny: ["$JS.API.CONSUMER.DELETE.>"] } }"#,
    );
    let receiver = start_receiver().await;
    let (setup, refused_config) = setup_with_agent_user(&receiver, &server, "");
    setup.publish(&[version_line(1, 0)]);

    let agent = AgentProcess::start_with_env(
        &refused_config,
        setup.addr.port(),
        &[("OUTPOST_LOG", "warn")],
    )
    .await;
    wait_or_show(
        30,
        "the log saying the old consumer could not be deleted",
        &[&agent],
        async || agent.log().contains("deleting the old consumer"),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        distinct_delivered(&receiver),
        0,
        "a partition was consumed without its old consumer deleted"
    );
    let log = agent.log();
    assert!(
        log.contains("the NATS server reported an error")
            && log.contains("$JS.API.CONSUMER.DELETE"),
        "the server's refusal is not in the log: {log}"
    );
    assert!(!log.contains("agent-pass"), "{log}");
    drop(agent);

    let agent = setup.start().await;
    wait_or_show(30, "the update delivered", &[&agent], async || {
        distinct_delivered(&receiver) == 1
    })
    .await;
}

/// The subjects README lists for an agent's user to publish to, for the stream `UPDATES`, the
/// default consumer prefix and its claims bucket. Each is needed: the test fails with any one
/// left out.
const AGENT_PUBLISHES: &[&str] = &[
    "$JS.API.STREAM.INFO.UPDATES",
    "$JS.API.CONSUMER.CREATE.UPDATES.>",
    "$JS.API.CONSUMER.DELETE.UPDATES.>",
    "$JS.API.CONSUMER.INFO.UPDATES.>",
    "$JS.API.CONSUMER.MSG.NEXT.UPDATES.>",
    "$JS.ACK.UPDATES.>",
    "$JS.API.STREAM.INFO.KV_owners_7_UPDATES_outpost",
    "$JS.API.STREAM.CREATE.KV_owners_7_UPDATES_outpost",
    "$JS.API.DIRECT.GET.KV_owners_7_UPDATES_outpost.>",
    "$KV.owners_7_UPDATES_outpost.>",
];

/// An agent whose user may publish to no more than README lists, and subscribe to its inboxes
/// alone, claims and consumes its partitions, and counts what waits in the stream while its
/// outbox is full; its log shows no permission refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_only_the_listed_permissions_claims_and_consumes() {
    let Some(server_bin) = nats_server_or_skip("an_agent_with_only_the_listed_permissions") else {
        return;
    };
    let allowed: Vec<String> = AGENT_PUBLISHES.iter().map(|s| format!("{s:?}")).collect();
    let (server, _conf) = server_with_agent_user(
        &server_bin,
        &format!(
            "{{ publish: {{ allow: [{}] }}, subscribe: {{ allow: [\"_INBOX.>\"] }} }}",
            allowed.join(", ")
        ),
    );
    let receiver = start_receiver().await;
    receiver.set_export_script(Some(outpost::receiver::down()));
    let (setup, agent_config) =
        setup_with_agent_user(&receiver, &server, "max_outbox_bytes = 4000");
    let lines: Vec<String> = (0..16).map(|p| version_line(p, 0)).collect();
    setup.publish(&lines);

    let agent =
        AgentProcess::start_with_env(&agent_config, setup.addr.port(), &[("OUTPOST_LOG", "warn")])
            .await;
    // Paused, each partition asks for its consumer's backlog about once a second.
    wait_until_paused(&agent).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    receiver.set_export_script(None);
    wait_or_show(60, "every update delivered", &[&agent], async || {
        distinct_delivered(&receiver) == 16
    })
    .await;
    // Its last acknowledgements refused would show a moment later.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Started again: its consumers are deleted and made anew, its claims read.
    let first_log = agent.log();
    drop(agent);
    let agent =
        AgentProcess::start_with_env(&agent_config, setup.addr.port(), &[("OUTPOST_LOG", "warn")])
            .await;
    setup.publish(&[version_line(0, 2)]);
    wait_or_show(30, "the new version delivered", &[&agent], async || {
        distinct_delivered(&receiver) == 17
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for log in [first_log, agent.log()] {
        assert!(
            !log.contains("reported an error") && !log.contains("Permissions Violation"),
            "{log}"
        );
    }

    // The same user moves partitions 6 and 7 to a new store: the claims read and written.
    let mut agent = agent;
    agent.terminate().await;
    let taking_config = setup.dir.path().join("taking.toml");
    std::fs::write(
        &taking_config,
        std::fs::read_to_string(&agent_config)
            .unwrap()
            .replace("path = \"store\"", "path = \"taking-store\""),
    )
    .unwrap();
    let file = setup.dir.path().join("6-7.handover");
    let as_agent = |config: &Path, args: &[&str]| {
        let out = std::process::Command::new(binary())
            .args(args)
            .arg("--config")
            .arg(config)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let errors = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "outpost {args:?}: {text}{errors}");
        text
    };
    let handed = as_agent(
        &agent_config,
        &["nats", "hand-over", "6-7", file.to_str().unwrap()],
    );
    assert_eq!(
        handed.matches("claim says: handed over in file").count(),
        2,
        "{handed}"
    );
    let taken = as_agent(
        &taking_config,
        &["nats", "take-over", file.to_str().unwrap()],
    );
    assert_eq!(taken.matches("claim says: store ").count(), 2, "{taken}");
}

/// A TCP proxy to the local port `target` that passes on what the server sends at about
/// `rate` bytes a second (what the client sends, at once): a slow link. Its port.
async fn slow_proxy(target: u16, rate: f64) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    return;
                };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                let up = tokio::io::copy(&mut from_client, &mut to_server);
                let down = async {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = from_server.read(&mut buf).await {
                        if n == 0 || to_client.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate)).await;
                    }
                };
                tokio::select! {
                    _ = up => {}
                    () = down => {}
                }
            });
        }
    });
    port
}

/// A batch that takes longer than a fetch may go without a message to come whole (30 messages
/// of 60 KB over a link of 120 KB/s: 15 s) is taken, since each message keeps it going: the
/// partition is not fetched again and again, never committing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_over_a_slow_link_is_taken_as_long_as_it_keeps_coming() {
    let Some(server_bin) = nats_server_or_skip("a_large_batch_over_a_slow_link") else {
        return;
    };
    let server = NatsServer::start(&server_bin);
    let proxy = slow_proxy(server.port, 120_000.0).await;
    let receiver = start_receiver().await;
    let url = format!("nats://127.0.0.1:{proxy}");
    let setup = AgentSetup::new(
        &receiver.base_url(),
        Some(&nats_table(&url, 8, "0-7", "fetch_batch = 30")),
        "",
    );
    setup.cli(&["nats", "setup"]);
    let lines: Vec<String> = (0..30)
        .map(|v| {
            let mut update: serde_json::Value = serde_json::from_str(&version_line(0, v)).unwrap();
            update["profile"]["note"] = serde_json::json!("n".repeat(60_000));
            update.to_string()
        })
        .collect();
    let published = setup.publish(&lines);
    assert!(published.contains("30 update(s) published"), "{published}");
    let agent = setup.start().await;
    let committed = "outpost_source_messages_total{result=\"committed\"}";
    let started = std::time::Instant::now();
    let mut taken = 0.0;
    while taken < 30.0 && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        taken = metric(agent.addr, committed).await;
    }
    assert_eq!(taken, 30.0, "{}", agent.log());
}

/// Messages on subjects under the prefix that name no partition (`.01`, a number past the
/// partitions) are taken by the stream and consumed by no agent: `outpost check` and the
/// agent's log say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_on_subjects_that_name_no_partition_are_reported() {
    let Some(server_bin) = nats_server_or_skip("messages_on_subjects_that_name_no_partition")
    else {
        return;
    };
    let server = NatsServer::start(&server_bin);
    let receiver = start_receiver().await;
    let setup = AgentSetup::on_stream(&receiver.base_url(), &server, "", "");
    let js = server.jetstream().await;
    // 8 partitions: .3 is one, .01 and .9 are not.
    for subject in [
        "test.updates.01",
        "test.updates.9",
        "test.updates.9",
        "test.updates.3",
    ] {
        let update = member_update("p-000001", "x", "2026-01-01T00:00:01Z");
        js.publish(subject, update.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let check = setup.run(&["check"]);
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        stdout.contains(
            "3 message(s) on 2 subject(s) that name no partition (test.updates.01, test.updates.9)"
        ),
        "{stdout}"
    );
    let agent = setup.start().await;
    wait_until(10, "the agent's warning", || {
        agent
            .log()
            .contains("on 2 subject(s) that name no partition")
    })
    .await;
}

/// A partition whose stored position cannot be read does not start; `outpost nats
/// set-position`, run while the agent runs, starts it again after the sequence given: its
/// messages up to there are not applied again, those after it are, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_position_set_by_hand_starts_its_partition_again() {
    let Some(server_bin) =
        nats_server_or_skip("an_unreadable_position_set_by_hand_starts_its_partition_again")
    else {
        return;
    };
    const PROFILES: usize = 60;
    let server = NatsServer::start(&server_bin);
    let receiver = start_receiver().await;
    let setup = AgentSetup::on_stream(&receiver.base_url(), &server, "", "");
    let version = |v| versions(PROFILES, v);
    // Stream sequences 1 to 120. Applied again, version 0 (without a timestamp) would make an
    // export of its own, and show.
    setup.publish(&version(0));
    setup.publish(&version(2));
    let mut agent = setup.start().await;
    wait_or_show(60, "the first versions delivered", &[&agent], async || {
        distinct_delivered(&receiver) >= 2 * PROFILES
    })
    .await;
    agent.terminate().await;

    let stopped = outpost::source::partition::partition_of("p0", 8);
    let in_stopped = (0..PROFILES)
        .filter(|p| outpost::source::partition::partition_of(&format!("p{p}"), 8) == stopped)
        .count();
    let store = outpost::config::Config::load(&setup.config())
        .unwrap()
        .storage
        .path;
    let db = open_with_sled_alone(&store).unwrap();
    db.open_tree("positions")
        .unwrap()
        .insert(stopped.to_be_bytes(), b"bad")
        .unwrap();
    db.flush().unwrap();
    drop(db);

    // Stream sequences 121 to 180.
    setup.publish(&version(4));
    let agent = setup.start().await;
    wait_or_show(
        60,
        "the other partitions' new versions",
        &[&agent],
        async || distinct_delivered(&receiver) >= 3 * PROFILES - in_stopped,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        distinct_delivered(&receiver),
        3 * PROFILES - in_stopped,
        "the partition with the unreadable position stays stopped"
    );

    // A number past the stream's end would start the partition from the stream's start.
    let out = setup.run(&["nats", "set-position", &stopped.to_string(), "181"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("181 is past the end of stream"), "{said}");
    assert!(said.contains("whose last message is 180"), "{said}");
    let out = setup.cli(&["nats", "set-position", &stopped.to_string(), "120"]);
    assert!(out.contains("position set to 120"), "{out}");
    wait_or_show(
        30,
        "the stopped partition's new versions",
        &[&agent],
        async || distinct_delivered(&receiver) >= 3 * PROFILES,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let names = names_by_profile(&receiver);
    for p in 0..PROFILES {
        assert_eq!(
            names[&format!("p{p}")],
            [format!("p{p}-v0"), format!("p{p}-v2"), format!("p{p}-v4")]
        );
    }
}

/// Two agents configured to own the same partitions: the one that claimed them first consumes
/// them, the other leaves them alone and says which store holds them; once that agent is gone
/// and `outpost nats release` let its claims go, the other takes them over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_two_agents_own_are_consumed_by_the_one_that_claimed_them() {
    let Some(server_bin) = nats_server_or_skip("partitions_two_agents_own") else {
        return;
    };
    const PROFILES: usize = 80;
    let server = NatsServer::start(&server_bin);
    let (first_receiver, second_receiver) = (start_receiver().await, start_receiver().await);
    // The first owns all 8 partitions, the second 6 and 7 as well.
    let (first, second, shared_profiles) =
        first_and_second(&server, &first_receiver, &second_receiver, PROFILES);
    let in_both = in_6_or_7;

    let mut first_agent = first.start().await;
    first.publish(&versions(PROFILES, 0));
    wait_or_show(
        60,
        "the first agent's deliveries",
        &[&first_agent],
        async || names_by_profile(&first_receiver).len() == PROFILES,
    )
    .await;
    let second_agent = second.start().await;
    for partition in [6, 7] {
        let refusal = format!("partition={partition}");
        wait_or_show(
            30,
            "the second agent's refusal",
            &[&second_agent],
            async || {
                second_agent
                    .log()
                    .lines()
                    .any(|l| l.contains("another agent's store claims it") && l.contains(&refusal))
            },
        )
        .await;
    }
    let log = second_agent.log();
    assert!(log.contains("claimed_by=\"store "), "{log}");
    let health = healthz_json(second_agent.addr).await;
    assert_eq!(
        health["nats"]["claimed_elsewhere"],
        serde_json::json!([6, 7])
    );
    assert_eq!(health["nats"]["state"], "consuming none", "{health}");
    assert_eq!(
        metric(second_agent.addr, "outpost_source_claimed_elsewhere").await,
        2.0
    );
    let health = healthz_json(first_agent.addr).await;
    assert_eq!(health["nats"]["claimed_elsewhere"], serde_json::json!([]));
    // `outpost check` says so before an agent is started again on that config.
    let checked = second.run(&["check"]);
    let (out, err) = (
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr),
    );
    assert_eq!(checked.status.code(), Some(1), "{out}\n{err}");
    assert!(
        out.contains("this agent owns: 0 claimed by this store, 2 left alone")
            && out.contains("warning          partition(s) 6-7: store "),
        "{out}"
    );
    assert!(
        err.contains("would consume none of the 2 partition(s)"),
        "{err}"
    );
    let checked = first.cli(&["check"]);
    assert!(
        checked.contains("of the 8 partition(s) this agent owns: 8 claimed by this store\n"),
        "{checked}"
    );
    // New versions go to the first agent alone.
    first.publish(&versions(PROFILES, 2));
    wait_or_show(
        60,
        "the first agent's deliveries",
        &[&first_agent],
        async || {
            names_by_profile(&first_receiver)
                .values()
                .all(|names| names.last().is_some_and(|n| n.ends_with("-v2")))
        },
    )
    .await;
    assert!(
        second_receiver.delivered().is_empty(),
        "the second agent consumed a partition the first one claims"
    );

    // The first agent goes; its claims are released; the second takes partitions 6 and 7
    // (from the stream's start, having no position in them: moved without a hand-over).
    first_agent.terminate().await;
    let released = second.cli(&["nats", "release", "6-7"]);
    assert_eq!(
        released.matches("released (claimed by store ").count(),
        2,
        "{released}"
    );
    second.publish(&versions(PROFILES, 4));
    wait_or_show(
        60,
        "the second agent's deliveries",
        &[&second_agent],
        async || {
            let names = names_by_profile(&second_receiver);
            names.len() == shared_profiles
                && names
                    .values()
                    .all(|n| n.last().is_some_and(|n| n.ends_with("-v4")))
        },
    )
    .await;
    let names = names_by_profile(&second_receiver);
    assert!(
        names.keys().all(|id| in_both(&id[1..].parse().unwrap())),
        "{names:?}"
    );
    let health = healthz_json(second_agent.addr).await;
    assert_eq!(health["nats"]["claimed_elsewhere"], serde_json::json!([]));
    let checked = second.cli(&["check"]);
    assert!(
        checked.contains("this agent owns: 2 claimed by this store\n"),
        "{checked}"
    );
    // Partition 0 is still the gone agent's; released once, it has no claim left.
    let released = second.cli(&["nats", "release", "0"]);
    assert!(
        released.contains("released (claimed by store "),
        "{released}"
    );
    let again = second.cli(&["nats", "release", "0"]);
    assert_eq!(again.trim(), "partition 0      had no claim");
}

/// An update that does not come from the stream, of a profile of a partition this agent does
/// not own, is refused (over HTTP 409, by `outpost ingest` in its checking pass), nothing of
/// its request stored: the agent that owns the partition stores and exports the profile from
/// the stream, and both exported it, in no order between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_of_another_agents_partition_are_refused_outside_the_stream() {
    let Some(server_bin) =
        nats_server_or_skip("updates_of_another_agents_partition_are_refused_outside_the_stream")
    else {
        return;
    };
    let server = NatsServer::start(&server_bin);
    let receiver = start_receiver().await;
    let setup = AgentSetup::new(
        &receiver.base_url(),
        Some(&nats_table(&server.url(), 8, "0-5", "")),
        "",
    );
    setup.cli(&["nats", "setup"]);
    let (foreign, owned) = {
        let mut ids = 0..;
        let foreign = ids.clone().find(in_6_or_7).unwrap();
        (foreign, ids.find(|p| !in_6_or_7(p)).unwrap())
    };
    let said = format!(
        "profile p{foreign} is in partition {}, which this agent does not own \
         (source.nats.owned = \\\"0-5\\\")",
        outpost::source::partition::partition_of(&format!("p{foreign}"), 8)
    );
    // `outpost ingest` into the store, the agent stopped: refused before anything is stored.
    let both = write_lines(
        setup.dir.path(),
        &[version_line(owned, 1), version_line(foreign, 1)],
    );
    let ingested = setup.run(&["ingest", both.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&ingested.stderr);
    assert!(!ingested.status.success(), "{stderr}");
    assert!(
        stderr.contains(&said.replace("\\\"", "\"")) && stderr.contains("nothing was stored"),
        "{stderr}"
    );
    let agent = setup.start().await;
    let (status, body) = http_post(
        agent.addr,
        "/v1/updates",
        format!("{}\n{}", version_line(owned, 1), version_line(foreign, 1)),
        &[],
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains(&said), "{body}");
    // `outpost ingest` through the agent, with a config that owns every partition: the input
    // is checked against what the agent owns, and refused before its first chunk is stored.
    let all_owned = setup.dir.path().join("all-owned.toml");
    let text = std::fs::read_to_string(setup.config()).unwrap();
    std::fs::write(
        &all_owned,
        text.replace(r#"owned = "0-5""#, r#"owned = "0-7""#),
    )
    .unwrap();
    let mut lines: Vec<String> = (0..)
        .filter(|p| !in_6_or_7(p))
        .take(REQUEST_CHUNK)
        .map(|p| version_line(p, 2))
        .collect();
    lines.push(version_line(foreign, 2));
    let input = write_lines(setup.dir.path(), &lines);
    let ingested = run_with_config(&all_owned, &["ingest", input.to_str().unwrap()], None);
    let stderr = String::from_utf8_lossy(&ingested.stderr);
    assert!(!ingested.status.success(), "{stderr}");
    assert!(
        stderr.contains(&said.replace("\\\"", "\"")) && stderr.contains("nothing was stored"),
        "{stderr}"
    );
    let (status, body) = http_post(agent.addr, "/v1/updates", version_line(owned, 1), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(r#""accepted":1,"deleted":0,"exports":1"#),
        "{body}"
    );
}

/// Whether profile `p<p>` falls in partition 6 or 7 of 8.
fn in_6_or_7(p: &usize) -> bool {
    outpost::source::partition::partition_of(&format!("p{p}"), 8) >= 6
}

/// An agent owning all 8 partitions of the stream (made by it) and one owning 6 and 7, for
/// the two receivers; and how many of `profiles` fall in 6 and 7.
fn first_and_second(
    server: &NatsServer,
    first: &Receiver,
    second: &Receiver,
    profiles: usize,
) -> (AgentSetup, AgentSetup, usize) {
    let first = AgentSetup::on_stream(&first.base_url(), server, "", "");
    let second = AgentSetup::new(
        &second.base_url(),
        Some(&nats_table(&server.url(), 8, "6-7", "")),
        "",
    );
    let in_both = (0..profiles).filter(in_6_or_7).count();
    assert!(in_both > 5, "{in_both} profiles in partitions 6-7");
    (first, second, in_both)
}

/// The agent that consumes a partition looks at its claim while it does: released meanwhile
/// (`outpost nats release` while the agent runs), the claim is made again; claimed by another
/// store, consuming stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_released_or_taken_while_its_partition_is_consumed() {
    let Some(server_bin) = nats_server_or_skip("claim_while_consumed") else {
        return;
    };
    const PROFILES: usize = 80;
    let server = NatsServer::start(&server_bin);
    let receiver = start_receiver().await;
    let setup = AgentSetup::on_stream(&receiver.base_url(), &server, "", "");
    let agent = setup.start().await;
    setup.publish(&versions(PROFILES, 0));
    wait_or_show(60, "the deliveries", &[&agent], async || {
        names_by_profile(&receiver).len() == PROFILES
    })
    .await;

    let released = setup.cli(&["nats", "release", "6"]);
    assert!(
        released.contains("released (claimed by store "),
        "{released}"
    );
    wait_or_show(30, "the claim made again", &[&agent], async || {
        agent
            .log()
            .lines()
            .any(|l| l.contains("was released; claimed again") && l.contains("partition=6"))
    })
    .await;
    let claims = setup.claims(&server).await;
    let claimed = claim_text(&claims, 6).await;
    assert!(claimed.starts_with("store "), "{claimed}");

    // Another store's claim on partition 7: the agent leaves it alone from then on.
    put_claims(&claims, &[7], "store 0badc0de on elsewhere").await;
    wait_or_show(30, "partition 7 left alone", &[&agent], async || {
        healthz_json(agent.addr).await["nats"]["claimed_elsewhere"] == serde_json::json!([7])
    })
    .await;
    assert!(
        agent
            .log()
            .contains("claimed_by=\"store 0badc0de on elsewhere\""),
        "{}",
        agent.log()
    );
    setup.publish(&versions(PROFILES, 2));
    let in_7 = |id: &str| outpost::source::partition::partition_of(id, 8) == 7;
    wait_or_show(
        60,
        "the other partitions' deliveries",
        &[&agent],
        async || {
            names_by_profile(&receiver)
                .iter()
                .filter(|(id, _)| !in_7(id))
                .all(|(_, names)| names.last().is_some_and(|n| n.ends_with("-v2")))
        },
    )
    .await;
    let names = names_by_profile(&receiver);
    let left = names.iter().filter(|(id, _)| in_7(id)).collect::<Vec<_>>();
    assert!(!left.is_empty(), "no profile in partition 7");
    assert!(
        left.iter()
            .all(|(_, names)| names.last().is_some_and(|n| n.ends_with("-v0"))),
        "partition 7 was consumed after another store claimed it: {left:?}"
    );
}

/// A partition moved from one agent to another with `outpost nats hand-over` and `take-over`:
/// the second agent goes on from where the first stopped, deciding against the versions the
/// first stored, so the endpoint hears each profile's next change once and nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_handed_over_goes_on_where_its_first_agent_stopped() {
    let Some(server_bin) = nats_server_or_skip("partition_handed_over") else {
        return;
    };
    const PROFILES: usize = 80;
    let server = NatsServer::start(&server_bin);
    let (first_receiver, second_receiver) = (start_receiver().await, start_receiver().await);
    let (first, second, moved_profiles) =
        first_and_second(&server, &first_receiver, &second_receiver, PROFILES);
    let moved = in_6_or_7;
    let file = second.dir.path().join("6-7.handover");
    let file_arg = file.to_str().unwrap();

    let mut first_agent = first.start().await;
    first.publish(&versions(PROFILES, 0));
    wait_or_show(60, "the first deliveries", &[&first_agent], async || {
        names_by_profile(&first_receiver).len() == PROFILES
    })
    .await;
    // Refused while the agent consumes the partitions, through its admin socket.
    let refused = first.run(&["nats", "hand-over", "6-7", file_arg]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("this agent owns partition 6,"), "{stderr}");
    assert!(!file.exists());

    // Taken out of its `owned`, restarted, and handed over while it runs.
    let config = std::fs::read_to_string(first.config()).unwrap();
    std::fs::write(
        first.config(),
        config.replace("owned = \"0-7\"", "owned = \"0-5\""),
    )
    .unwrap();
    first_agent.terminate().await;
    let first_agent = first.start().await;
    // Its config file edited since it started (another attribute mapped): the file says the
    // mapping the agent runs with, which the second agent's config has.
    let running = std::fs::read_to_string(first.config()).unwrap();
    std::fs::write(
        first.config(),
        running.replace(
            "\"person.name.lastName\"]",
            "\"person.name.lastName\", \"person.gender\"]",
        ),
    )
    .unwrap();
    let handed = first.cli(&["nats", "hand-over", "6-7", file_arg]);
    assert!(
        handed.contains("partition 6      handed over, consumed up to stream sequence"),
        "{handed}"
    );
    // It holds customers' profiles: its owner's alone.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    assert!(
        handed.contains(&format!("{moved_profiles} profile(s) written to")),
        "{handed}"
    );
    assert_eq!(
        handed.matches("claim says: handed over in file").count(),
        2,
        "{handed}"
    );

    // Meanwhile the claims are no store's, and not released without --force: the command
    // says so, and exits 1.
    let kept = second.run(&["nats", "release", "6"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&kept.stdout),
        String::from_utf8_lossy(&kept.stderr),
    );
    assert_eq!(kept.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("left as it is: its claim says handed over in file")
            && stderr.contains("1 claim(s) say their partition was handed over"),
        "{stdout}\n{stderr}"
    );

    // A take-over of the same file begun from another store (the claims say so, as it first
    // writes them): this one is refused before its store is made. The hand-over run again
    // gives that take-over up only with --force, making the claims name the file alone.
    let claims = second.claims(&server).await;
    let handed_claim = claim_text(&claims, 6).await;
    let elsewhere = taking_over(&handed_claim, "store 0badc0de on elsewhere");
    put_claims(&claims, &[6, 7], &elsewhere).await;
    let refused = second.run(&["nats", "take-over", file_arg]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("store 0badc0de is taking") && stderr.contains("nothing was stored here"),
        "{stderr}"
    );
    assert!(!second.dir.path().join("store").exists());
    let kept = second.run(&["nats", "release", "6"]);
    let stdout = String::from_utf8_lossy(&kept.stdout);
    assert_eq!(kept.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("left as it is")
            && stdout.contains("store 0badc0de's take-over of that file has not finished"),
        "{stdout}"
    );
    let kept = first.run(&["nats", "hand-over", "6-7", file_arg]);
    let stderr = String::from_utf8_lossy(&kept.stderr);
    assert!(!kept.status.success(), "{stderr}");
    assert!(
        stderr.contains("has not finished") && stderr.contains("give --force"),
        "{stderr}"
    );
    assert_eq!(claim_text(&claims, 7).await, elsewhere);
    let again = first.cli(&["nats", "hand-over", "6-7", file_arg, "--force"]);
    assert_eq!(
        again
            .matches(&format!("claim says: {handed_claim}\n"))
            .count(),
        2,
        "{again}"
    );
    // The store's own refusals come before the claims are changed: here, its running agent
    // owns the partitions.
    let mut second_agent = second.start().await;
    let refused = second.run(&["nats", "take-over", file_arg]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("this agent owns partition"), "{stderr}");
    assert_eq!(claim_text(&claims, 6).await, handed_claim);
    second_agent.terminate().await;

    // The second agent, stopped, takes them over and starts.
    let taken = second.cli(&["nats", "take-over", file_arg]);
    assert!(
        taken.contains(&format!("{moved_profiles} profile(s) stored from")),
        "{taken}"
    );
    assert_eq!(taken.matches("claim says: store ").count(), 2, "{taken}");
    // Stopped after its store's part, before the claims name its store (as the take-over
    // left them then), and run again: nothing is stored twice, and the claims are its store's.
    let second_claim = claim_text(&claims, 6).await;
    put_claims(&claims, &[6, 7], &taking_over(&handed_claim, &second_claim)).await;
    let again = second.cli(&["nats", "take-over", file_arg]);
    assert!(again.contains("0 profile(s) stored from"), "{again}");
    assert_eq!(
        again
            .matches(&format!("claim says: {second_claim}\n"))
            .count(),
        2,
        "{again}"
    );
    let second_agent = second.start().await;
    // Version 1 changes no mapped field: against the stored versions it exports nothing
    // (to an agent that had never seen the profiles, each would be new). Version 2 does.
    first.publish(&versions(PROFILES, 1));
    first.publish(&versions(PROFILES, 2));
    wait_or_show(
        60,
        "the deliveries of version 2",
        &[&first_agent, &second_agent],
        async || {
            names_by_profile(&second_receiver).len() == moved_profiles
                && names_by_profile(&first_receiver)
                    .iter()
                    .filter(|(id, _)| !moved(&id[1..].parse().unwrap()))
                    .all(|(_, names)| names.len() == 2)
        },
    )
    .await;
    // A moment for anything else that was coming.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // It went on from the first agent's positions: versions 1 and 2 of its profiles, and not
    // version 0 again (which, against the stored versions, would also export nothing).
    let mut updates = 0.0;
    for result in outpost::metrics::UPDATE_RESULTS {
        let name = format!("outpost_updates_total{{result=\"{result}\"}}");
        updates += metric(second_agent.addr, &name).await;
    }
    assert_eq!(updates, 2.0 * moved_profiles as f64);
    for (id, names) in names_by_profile(&second_receiver) {
        assert!(
            moved(&id[1..].parse().unwrap()),
            "{id} went to the second agent"
        );
        assert_eq!(names, [format!("{id}-v2")], "{id}");
    }
    for (id, names) in names_by_profile(&first_receiver) {
        let expected: Vec<String> = if moved(&id[1..].parse().unwrap()) {
            vec![format!("{id}-v0")]
        } else {
            vec![format!("{id}-v0"), format!("{id}-v2")]
        };
        assert_eq!(names, expected, "{id}");
    }
    let health = healthz_json(second_agent.addr).await;
    assert_eq!(health["nats"]["claimed_elsewhere"], serde_json::json!([]));

    // The first agent made to own them again by mistake leaves them: it says they were
    // handed over, and claims nothing.
    let mut first_agent = first_agent;
    first_agent.terminate().await;
    std::fs::write(first.config(), &config).unwrap();
    let first_agent = first.start().await;
    wait_or_show(
        30,
        "the first agent's refusal",
        &[&first_agent],
        async || {
            first_agent
                .log()
                .contains("the partition was handed over to another store")
        },
    )
    .await;
    first.publish(&versions(PROFILES, 4));
    wait_or_show(
        60,
        "the deliveries of version 4",
        &[&first_agent, &second_agent],
        async || {
            names_by_profile(&second_receiver)
                .values()
                .all(|names| names.len() == 2)
        },
    )
    .await;
    for (id, names) in names_by_profile(&first_receiver) {
        if moved(&id[1..].parse().unwrap()) {
            assert_eq!(names, [format!("{id}-v0")], "{id}");
        }
    }
    let health = healthz_json(second_agent.addr).await;
    assert_eq!(health["nats"]["claimed_elsewhere"], serde_json::json!([]));
    // The file is stale now (its partitions were taken over and consumed further): a third
    // agent's store cannot take it over.
    let third_receiver = start_receiver().await;
    let third = AgentSetup::new(
        &third_receiver.base_url(),
        Some(&nats_table(&server.url(), 8, "6-7", "")),
        "",
    );
    let stale = third.run(&["nats", "take-over", file_arg]);
    let stderr = String::from_utf8_lossy(&stale.stderr);
    assert!(!stale.status.success(), "{stderr}");
    assert!(
        stderr.contains("claim says store ")
            && stderr.contains("is not the partition's latest hand-over"),
        "{stderr}"
    );

    // The second agent, stopped, hands them over in turn: the first store cannot hand them
    // over again from its old file, which would put that file's claims back.
    let mut second_agent = second_agent;
    second_agent.terminate().await;
    let again_file = second.dir.path().join("6-7.again");
    let again = second.cli(&["nats", "hand-over", "6-7", again_file.to_str().unwrap()]);
    assert_eq!(
        again.matches("claim says: handed over in file").count(),
        2,
        "{again}"
    );
    let old = first.run(&["nats", "hand-over", "6-7", file_arg]);
    let stderr = String::from_utf8_lossy(&old.stderr);
    assert!(!old.status.success(), "{stderr}");
    assert!(
        stderr.contains("another hand-over of it waits for its take-over"),
        "{stderr}"
    );

    // The first agent refuses an update of a moved profile sent to it over HTTP (its stored
    // version went with the partition), and takes one of a profile it kept.
    let moved_one = (0..PROFILES).find(moved).unwrap();
    let kept_one = (0..PROFILES).find(|p| !moved(p)).unwrap();
    let (status, body) = http_post(
        first_agent.addr,
        "/v1/updates",
        version_line(moved_one, 5),
        &[],
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains(&format!("profile p{moved_one} is in partition"))
            && body.contains("send its updates to the stream"),
        "{body}"
    );
    let (status, body) = http_post(
        first_agent.addr,
        "/v1/updates",
        version_line(kept_one, 5),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""accepted":1"#), "{body}");
    // A request larger than a chunk that holds such an update stores nothing either: it is
    // checked whole before its first chunk.
    let new_kept: Vec<String> = (PROFILES..)
        .filter(|p| !moved(p))
        .take(REQUEST_CHUNK)
        .map(|p| version_line(p, 1))
        .collect();
    let with_moved = format!("{}\n{}", new_kept.join("\n"), version_line(moved_one, 6));
    let (status, body) = http_post(first_agent.addr, "/v1/updates", with_moved.clone(), &[]).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("not stored") && body.contains(&format!("profile p{moved_one} is in")),
        "{body}"
    );
    // So does `outpost ingest` of the same updates, through the agent: it is told which
    // partitions went (also in `outbox stats`) and refuses the file before its first chunk.
    let stats = outbox_stats(&first.config());
    assert_eq!(
        stats["handed_over"]["partitions"],
        serde_json::json!([6, 7])
    );
    assert!(first
        .cli(&["outbox", "stats"])
        .contains("handed over      partition(s) 6, 7 of 8"));
    let profiles = stats["profiles"].clone();
    let input = first.dir.path().join("with-moved.ndjson");
    std::fs::write(&input, &with_moved).unwrap();
    let ingest = first.run(&["ingest", input.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&ingest.stderr);
    assert!(!ingest.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "update {}: profile p{moved_one} is in partition",
            REQUEST_CHUNK + 1
        )) && stderr.contains("nothing was stored"),
        "{stderr}"
    );
    assert_eq!(outbox_stats(&first.config())["profiles"], profiles);
    let (status, body) = http_post(first_agent.addr, "/v1/updates", new_kept.join("\n"), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!(r#""exports":{REQUEST_CHUNK}"#)),
        "all new: {body}"
    );
}

/// Forty profiles consumed by `giving`'s agent and delivered to `receiver`, then partitions 6
/// and 7 handed over by its store, the agent stopped: the hand-over file.
async fn hand_over_6_and_7(giving: &AgentSetup, receiver: &Receiver) -> PathBuf {
    let mut agent = giving.start().await;
    giving.publish(&versions(40, 0));
    wait_or_show(60, "the deliveries", &[&agent], async || {
        names_by_profile(receiver).len() == 40
    })
    .await;
    agent.terminate().await;
    let file = giving.dir.path().join("6-7.handover");
    giving.cli(&["nats", "hand-over", "6-7", file.to_str().unwrap()]);
    file
}

/// The claims bucket of the stream on `server`, as the `operator` user of
/// [`server_with_agent_user`].
async fn claims_as_operator(server: &NatsServer) -> async_nats::jetstream::kv::Store {
    let client =
        async_nats::ConnectOptions::with_user_and_password("operator".into(), "op-pass".into())
            .connect(server.url())
            .await
            .unwrap();
    let js = async_nats::jetstream::new(client);
    outpost::source::claim::bucket(&js, "UPDATES", "outpost", 1)
        .await
        .unwrap()
}

/// A take-over that cannot make every claim say it is taking the file over (here: its user may
/// not write partition 7's claim, as if another take-over had written it first) puts back
/// those it made and stores nothing; the file can still be taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_over_that_cannot_reserve_every_claim_puts_back_those_it_made() {
    let Some(server_bin) = nats_server_or_skip("a_take_over_that_cannot_reserve_every_claim")
    else {
        return;
    };
    let (server, _conf) = server_with_agent_user(
        &server_bin,
        r#"{ publish: { deny: ["$KV.owners_7_UPDATES_outpost.partition-7"] } }"#,
    );
    let receiver = start_receiver().await;
    let giving = AgentSetup::on_stream(&receiver.base_url(), &server, OPERATOR_CREDENTIALS, "");
    let file = hand_over_6_and_7(&giving, &receiver).await;
    let file_arg = file.to_str().unwrap();
    let claims = claims_as_operator(&server).await;
    let handed = claim_text(&claims, 6).await;
    assert_eq!(claim_text(&claims, 7).await, handed);

    let taking_as = |credentials: &str| {
        AgentSetup::new(
            &receiver.base_url(),
            Some(&nats_table(&server.url(), 8, "6-7", credentials)),
            "",
        )
    };
    let revision_6 = async || {
        let entry = claims.entry("partition-6").await.unwrap();
        entry.expect("a claim").revision
    };
    let before = revision_6().await;
    let taking = taking_as("user = \"agent\"\npassword = \"agent-pass\"");
    let refused = taking.run(&["nats", "take-over", file_arg]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("partition 7") && stderr.contains("nothing was stored here"),
        "{stderr}"
    );
    assert!(!stderr.contains("could not be put back"), "{stderr}");
    assert_eq!(claim_text(&claims, 6).await, handed, "put back");
    assert!(
        revision_6().await > before,
        "partition 6's claim was written (reserved, then put back)"
    );
    assert_eq!(claim_text(&claims, 7).await, handed);
    assert_eq!(outbox_stats(&taking.config())["profiles"], 0);

    // Another store whose user may write both takes the file over.
    let other = taking_as(OPERATOR_CREDENTIALS);
    let taken = other.cli(&["nats", "take-over", file_arg]);
    assert_eq!(taken.matches("claim says: store ").count(), 2, "{taken}");
}

/// Stands in for a running agent on the admin socket of the store at `store`, as one whose
/// store changes between a take-over's check and the take-over: `stats` gives store
/// `0000abcd`, the check passes, and the take-over is answered `take_over_answer`. Returns
/// the ops asked, once a take-over was (panics when none was within a minute).
fn agent_refusing_the_take_over(
    store: &Path,
    take_over_answer: String,
) -> std::thread::JoinHandle<Vec<String>> {
    agent_standing_in(store, "take_over", move |op| {
        match op {
        "check_take_over" => Some(
            r#"{"ok":{"from_store":"00000001","file_id":"f","partitions":[],"profiles_in_file":40,"stored":0}}"#
                .into(),
        ),
        "take_over" => Some(take_over_answer.clone()),
        other => panic!("not asked of a take-over: {other}"),
    }
    })
}

/// Stands in for a running agent on the admin socket of the store at `store`: `stats` gives
/// store `0000abcd`, another op what `answer` gives it (`None`: the connection is closed
/// without an answer, as by an agent that stopped). Returns the ops asked, once `last` was
/// (panics when it was not within a minute).
fn agent_standing_in(
    store: &Path,
    last: &'static str,
    answer: impl Fn(&str) -> Option<String> + Send + 'static,
) -> std::thread::JoinHandle<Vec<String>> {
    use std::io::{Read, Write};
    std::fs::create_dir_all(store).unwrap();
    let socket = outpost::server::admin::socket_path(store);
    let _ = std::fs::remove_file(&socket);
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut ops = Vec::new();
        loop {
            let mut stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let now = std::time::Instant::now();
                    assert!(now < deadline, "no {last} was asked, only {ops:?}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => panic!("{e}"),
            };
            stream.set_nonblocking(false).unwrap();
            let mut request = String::new();
            stream.read_to_string(&mut request).unwrap();
            // A connection that asks nothing tells whether an agent answers.
            let Ok(request) = serde_json::from_str::<serde_json::Value>(&request) else {
                continue;
            };
            let op = request["op"].as_str().unwrap().to_string();
            let answered = match op.as_str() {
                "stats" => Some(r#"{"ok":{"store_id":"0000abcd"}}"#.to_string()),
                other => answer(other),
            };
            if let Some(answered) = answered {
                stream
                    .write_all(format!("{answered}\n").as_bytes())
                    .unwrap();
            }
            ops.push(op);
            if ops.last().is_some_and(|op| op == last) {
                return ops;
            }
        }
    })
}

/// A hand-over whose running agent stopped before it answered says to run the hand-over
/// again, as a take-over's does: it said only that the connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_over_whose_agent_stopped_before_answering_says_to_run_it_again() {
    let Some(server_bin) = nats_server_or_skip("a_hand_over_whose_agent_stopped") else {
        return;
    };
    let server = NatsServer::start(&server_bin);
    let receiver = start_receiver().await;
    let giving = AgentSetup::new(
        &receiver.base_url(),
        Some(&nats_table(&server.url(), 8, "0-5", "")),
        "",
    );
    giving.cli(&["nats", "setup"]);
    // The store made, by an update of a partition the config owns.
    let owned = (0..).find(|p| !in_6_or_7(p)).unwrap();
    let input = write_lines(giving.dir.path(), &[version_line(owned, 0)]);
    giving.cli(&["ingest", input.to_str().unwrap()]);
    let store = giving.dir.path().join("store");
    let agent = agent_standing_in(&store, "hand_over", |op| match op {
        "hand_over" => None,
        other => panic!("not asked of a hand-over: {other}"),
    });
    let file = giving.dir.path().join("6-7.handover");
    let out = giving.run(&["nats", "hand-over", "6-7", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(agent.join().unwrap(), ["stats", "hand_over"]);
    assert!(
        stderr.contains("the connection closed without an answer")
            && stderr.contains("if the agent stopped, run this hand-over again once it is back"),
        "{stderr}"
    );
}

/// The store refuses the take-over itself, though it passed the check (an update of one of
/// the file's profiles came in between): the claims the command reserved are put back, as a
/// refusal changes nothing. An agent of an older build answers a refusal as failed: the
/// claims then stay reserved, as the store may hold part of the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_over_its_store_refuses_after_the_check_puts_the_claims_back() {
    let Some(server_bin) = nats_server_or_skip("a_take_over_its_store_refuses_after_the_check")
    else {
        return;
    };
    let server = NatsServer::start(&server_bin);
    let receiver = start_receiver().await;
    let giving = AgentSetup::on_stream(&receiver.base_url(), &server, "", "");
    let file = hand_over_6_and_7(&giving, &receiver).await;
    let file_arg = file.to_str().unwrap();
    // Started again with 6 and 7 still in its `owned`, the giving agent leaves them alone,
    // and `/healthz` and `outpost check` say so.
    let mut giving_agent = giving.start().await;
    wait_or_show(
        30,
        "the partitions handed over shown",
        &[&giving_agent],
        async || {
            healthz_json(giving_agent.addr).await["nats"]["handed_over"]
                == serde_json::json!([6, 7])
        },
    )
    .await;
    let checked = giving.cli(&["check"]);
    assert!(
        checked.contains("6 claimed by this store, 2 left alone")
            && checked.contains("partition(s) 6-7: this store handed them over"),
        "{checked}"
    );
    giving_agent.terminate().await;
    let claims = giving.claims(&server).await;
    let handed = claim_text(&claims, 6).await;
    assert_eq!(claim_text(&claims, 7).await, handed);
    let revision = async |partition: u32| {
        let entry = claims
            .entry(format!("partition-{partition}"))
            .await
            .unwrap();
        entry.expect("a claim").revision
    };
    let before = (revision(6).await, revision(7).await);

    let taking = AgentSetup::new(
        &receiver.base_url(),
        Some(&nats_table(&server.url(), 8, "6-7", "")),
        "",
    );
    let store = taking.dir.path().join("store");
    let refusal = "1 profile(s) of these partitions are stored here with other versions";
    // The take-over through the stand-in agent, refused as `kind`: the command's stderr.
    let take_over_refused_as = |kind: &str| {
        let answer = serde_json::json!({"error": refusal, "kind": kind}).to_string();
        let agent = agent_refusing_the_take_over(&store, answer);
        let out = taking.run(&["nats", "take-over", file_arg]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{stderr}");
        assert_eq!(
            agent.join().unwrap(),
            ["stats", "check_take_over", "take_over"]
        );
        stderr
    };
    let stderr = take_over_refused_as("refused");
    assert!(
        stderr.contains(refusal) && stderr.contains("the claims it reserved were put back"),
        "{stderr}"
    );
    assert!(!stderr.contains("claims say"), "{stderr}");
    assert_eq!(claim_text(&claims, 6).await, handed, "put back");
    assert_eq!(claim_text(&claims, 7).await, handed, "put back");
    assert!(
        revision(6).await > before.0 && revision(7).await > before.1,
        "the claims were written (reserved, then put back)"
    );

    let stderr = take_over_refused_as("failed");
    let ours = outpost::source::claim::holder(0xabcd, &outpost::source::claim::host_name());
    let reserved = taking_over(&handed, &ours);
    assert!(
        stderr.contains(refusal) && stderr.contains(&reserved),
        "{stderr}"
    );
    assert_eq!(claim_text(&claims, 6).await, reserved, "left reserved");
    assert_eq!(claim_text(&claims, 7).await, reserved, "left reserved");
}

/// SIGINT while `outpost publish -` reads its input ends it at once with nothing published:
/// it went on reading until the input ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_stopped_while_it_reads_its_input_ends_at_once_with_nothing_published() {
    let Some(server_bin) = nats_server_or_skip("a_publish_stopped_while_it_reads") else {
        return;
    };
    let server = NatsServer::start(&server_bin);
    let receiver = start_receiver().await;
    let setup = AgentSetup::on_stream(&receiver.base_url(), &server, "", "");
    let mut publish = std::process::Command::new(binary());
    publish
        .args(["publish", "-", "--config"])
        .arg(setup.config());
    let line = versions(1, 0).remove(0);
    tokio::task::spawn_blocking(move || stop_while_it_reads_its_input(publish, &line))
        .await
        .unwrap();
    let mut stream = server
        .jetstream()
        .await
        .get_stream("UPDATES")
        .await
        .unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 0);
}

/// A signal stops `outpost publish` between two messages: it waits for the acknowledgements of
/// those sent, says how many of the input went through and how to go on (`--resume`), and
/// the publish resumed puts the rest in the stream, none twice. It ended silently, with
/// nothing to resume from but the input's start, which publishes it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_stopped_by_a_signal_says_how_to_resume_it() {
    let Some(server_bin) = nats_server_or_skip("a_publish_stopped_by_a_signal") else {
        return;
    };
    const UPDATES: usize = 20_000;
    let server = NatsServer::start(&server_bin);
    let receiver = start_receiver().await;
    let setup = AgentSetup::on_stream(&receiver.base_url(), &server, "", "");
    let file = write_lines(setup.dir.path(), &versions(UPDATES, 0));
    let stream_messages = async || {
        let mut stream = server
            .jetstream()
            .await
            .get_stream("UPDATES")
            .await
            .unwrap();
        stream.info().await.unwrap().state.messages
    };
    let publishing = std::process::Command::new(binary())
        .args(["publish", file.to_str().unwrap(), "--config"])
        .arg(setup.config())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_or_show(30, "the first messages in the stream", &[], async || {
        stream_messages().await > 0
    })
    .await;
    let (published, stderr) = stop_with_sigint(publishing);
    assert!(
        stderr.contains(&format!(
            "the first {published} of {UPDATES} update(s) were published in order"
        )),
        "{stderr}"
    );
    assert!(
        published > 0 && published < UPDATES as u64,
        "stopped after {published}: {stderr}"
    );
    assert_eq!(stream_messages().await, published, "{stderr}");
    let id = stderr
        .split("--resume ")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .unwrap_or_else(|| panic!("{stderr}"));
    let resumed = setup.cli(&["publish", file.to_str().unwrap(), "--resume", id]);
    assert!(
        resumed.contains(&format!(
            "{} update(s) published to stream UPDATES (0 already there",
            UPDATES as u64 - published
        )),
        "{resumed}"
    );
    assert_eq!(stream_messages().await, UPDATES as u64);
}

/// `outpost check` run by root on a store another user owns (as systemd's set-up has it)
/// cannot read the store's figures, so it cannot tell the store's own claims from another
/// store's: it says so. It took them all for another store's, failed, and advised releasing
/// them, which would have the agent consume its partitions from the stream's start again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_does_not_judge_claims_it_cannot_tell_from_its_own_stores() {
    let Some(server_bin) = nats_server_or_skip("check_does_not_judge_claims") else {
        return;
    };
    if !running_as_root() {
        return;
    }
    let server = NatsServer::start(&server_bin);
    let receiver = start_receiver().await;
    let setup = AgentSetup::on_stream(&receiver.base_url(), &server, "", "");
    let mut agent = setup.start().await;
    wait_or_show(30, "the claims made", &[&agent], async || {
        setup
            .cli(&["check"])
            .contains("of the 8 partition(s) this agent owns: 8 claimed by this store\n")
    })
    .await;
    agent.terminate().await;
    let store = setup.dir.path().join("store");
    let chown = std::process::Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&store)
        .status()
        .unwrap();
    assert!(chown.success());
    let checked = setup.cli(&["check"]);
    assert!(
        checked.contains("claims           not judged: not read: the store is another user's"),
        "{checked}"
    );
    assert!(!checked.contains("left alone"), "{checked}");
}

/// Credentials that cannot read the bucket of claims: the agent would consume no partition
/// (it consumes none whose claim it cannot read), and `outpost check` says the claims cannot
/// be read, not that the stream is unusable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_when_the_claims_cannot_be_read() {
    let Some(server_bin) = nats_server_or_skip("check_says_when_the_claims_cannot_be_read") else {
        return;
    };
    let (server, _conf) = server_with_agent_user(
        &server_bin,
        r#"{ publish: { deny: ["$JS.API.STREAM.INFO.KV_owners_7_UPDATES_outpost"] } }"#,
    );
    let receiver = start_receiver().await;
    let (_setup, agent_config) = setup_with_agent_user(&receiver, &server, "");
    let out = run_with_config(&agent_config, &["check"], None);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("stream           UPDATES: ")
            && stdout.contains("claims           cannot be read (the error below says why)")
            && !stdout.contains("not usable"),
        "{stdout}"
    );
    assert!(
        stderr.contains(
            "outpost: nats: reading the bucket of partition claims owners_7_UPDATES_outpost"
        ),
        "{stderr}"
    );
}
