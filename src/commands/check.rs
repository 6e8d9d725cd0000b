//! `outpost check`, the preflight: a line for each part of the config and what it names (the
//! store, the ingest listener, the stream, the endpoint, the token), then every problem found.

use serde_json::Value;

use crate::admin::AdminRequest;
use crate::config::{Auth, Config, Destination, Proxy};
use crate::delivery::client::{probe_endpoint, ClientError, HttpClient};
use crate::store::{Store, StoreOwner, StoreUse};

use super::{describe_clock_jumps, display_url, for_terminal, nats, preflight, Backend, CliError};

/// Validates the config (already done by loading it), checks what it names on this host and
/// the stream, builds the TLS client, reaches the endpoint and fetches a token.
pub(super) async fn check(config: &Config) -> Result<(), CliError> {
    print_config(config)?;
    let mut problems = Problems::default();
    let stats = check_store_and_ingest(config, &mut problems)?;
    for warning in &config.warnings {
        report_line!("warning          {warning}")?;
    }
    check_stream(config, &stats, &mut problems).await?;
    let Some(client) = destination_client(config, &mut problems) else {
        return problems.fail();
    };
    // Files the agent would refuse to start for: the destination is not tried with them.
    if problems.unusable_files {
        return problems.fail();
    }
    check_endpoint(config, &mut problems.other).await?;
    check_auth(config, client, &mut problems.other).await?;
    if !problems.is_empty() {
        return problems.fail();
    }
    report_line!("check            ok")?;
    Ok(())
}

/// What `check` found wrong, each kind in the order found.
#[derive(Default)]
struct Problems {
    /// What the agent would refuse to start for (exit 2): files the config names that cannot
    /// be used, a store path through a file.
    refused: Vec<String>,
    /// Some of `refused` are files the destination cannot be tried without.
    unusable_files: bool,
    /// The others (exit 1).
    other: Vec<String>,
}

impl Problems {
    fn is_empty(&self) -> bool {
        self.refused.is_empty() && self.other.is_empty()
    }

    fn unusable_file(&mut self, problem: String) {
        self.refused.push(problem);
        self.unusable_files = true;
    }

    /// `check`'s failure: every problem found, one a line, those the agent would refuse to
    /// start for first; any of them makes it a usage error (exit 2), as the agent's start.
    fn fail(self) -> Result<(), CliError> {
        if self.refused.is_empty() {
            return Err(CliError::Failure(self.other.join("\noutpost: ")));
        }
        let all: Vec<String> = self.refused.into_iter().chain(self.other).collect();
        Err(CliError::Usage(all.join("\noutpost: ")))
    }
}

/// The config's summary: the destination, its endpoint and proxy, the custom headers and the
/// mapping.
fn print_config(config: &Config) -> Result<(), CliError> {
    let d = &config.destination;
    report_line!("config           {} (valid)", config.path.display())?;
    report_line!(
        "destination      {}",
        d.name.as_deref().unwrap_or("(unnamed)")
    )?;
    let query = d.http_endpoint.query_pairs().count();
    report_line!("endpoint         {}", display_url(&d.http_endpoint))?;
    if query > 0 {
        let parameters = if query == 1 {
            "parameter"
        } else {
            "parameters"
        };
        report_line!("                 (+ {query} query {parameters}, sent as given)")?;
    }
    if let Some(proxy) = &d.proxy {
        print_proxy(d, proxy)?;
    }
    let headers: Vec<&str> = d.custom_headers.iter().map(|(n, _)| n.as_str()).collect();
    report_line!(
        "custom headers   {}",
        if headers.is_empty() {
            "-".to_owned()
        } else {
            headers.join(", ")
        }
    )?;
    report_line!(
        "mapping          {} attributes, {} segments, {}",
        config.mapping.attributes.len(),
        config.mapping.segments.len(),
        if config.mapping.identities.is_empty() {
            "all identity namespaces".to_owned()
        } else {
            format!("{} identity namespaces", config.mapping.identities.len())
        }
    )
}

/// The proxy, and which of the endpoint and the token endpoint it tunnels to.
fn print_proxy(d: &Destination, proxy: &Proxy) -> Result<(), CliError> {
    let credentials = match proxy.credentials {
        Some(_) => ", with credentials (set)",
        None => "",
    };
    let mut through = Vec::new();
    if proxy.takes(&d.http_endpoint) {
        through.push("the endpoint");
    }
    if let Auth::OAuth2 { auth_endpoint, .. } = &d.auth {
        if proxy.takes(auth_endpoint) {
            through.push("the token endpoint");
        }
    }
    let through = match through.is_empty() {
        true => "for neither the endpoint nor the token endpoint: destination.no_proxy lists them"
            .to_owned(),
        false => format!("tunnels to {}", through.join(" and ")),
    };
    report_line!(
        "proxy            {} ({through}{credentials})",
        proxy.address()
    )
}

/// What the agent needs on this host: the store folder (and the clock jumps it recorded), the
/// ingest address free, and the ingest TLS files. The store's figures, as read for them.
fn check_store_and_ingest(
    config: &Config,
    problems: &mut Problems,
) -> Result<Result<Value, String>, CliError> {
    let store = preflight::store(config);
    report_line!("store            {}", store.line)?;
    let stats = store_stats(config);
    report_line!("clock            {}", clock_report(&stats))?;
    if let Some(line) = mapping_report(&stats, &config.mapping.segments) {
        report_line!("mapping change   {line}")?;
    }
    let listen = preflight::listen(config);
    report_line!("ingest           {}", listen.line)?;
    if let Some(tls) = &config.ingest.tls {
        match crate::server::tls::acceptor(tls) {
            Ok(_) => report_line!("ingest TLS       certificate and key load")?,
            Err(e) => {
                report_line!("ingest TLS       cannot be used")?;
                problems.unusable_file(e);
            }
        }
    }
    for finding in [store, listen] {
        if let Some(warning) = finding.warning {
            report_line!("warning          {warning}")?;
        }
        match finding.refused_at_start {
            true => problems.refused.extend(finding.problem),
            false => problems.other.extend(finding.problem),
        }
    }
    Ok(stats)
}

/// `[source.nats]`, if given: the files it names, then, if they can be used, the stream and
/// the claims on the partitions the agent owns.
async fn check_stream(
    config: &Config,
    stats: &Result<Value, String>,
    problems: &mut Problems,
) -> Result<(), CliError> {
    if let Some(nats) = &config.nats {
        match nats.check_files() {
            Err(e) => problems.unusable_file(e),
            Ok(()) => match nats::check_nats(
                nats,
                stats,
                Store::exists_at(&config.storage.path).unwrap_or(true),
            )
            .await
            {
                Ok(None) => {}
                Ok(Some(problem)) => problems.other.push(format!("nats: {problem}")),
                Err(e) => {
                    // Unreachable, missing, or made for another partition count: the error
                    // says which.
                    report_line!("stream           not usable (the error below says why)")?;
                    problems.other.push(format!("nats: {e}"));
                }
            },
        }
    }
    Ok(())
}

/// The HTTP client the agent would deliver with, or `None` when the destination's TLS cannot
/// be set up (a file it names that cannot be used is a file problem).
fn destination_client(config: &Config, problems: &mut Problems) -> Option<HttpClient> {
    match HttpClient::new(&config.destination, config.delivery.request_timeout) {
        Ok(client) => Some(client),
        Err(ClientError::Config(message)) => {
            problems.unusable_file(message);
            None
        }
        Err(other) => {
            problems.other.push(format!("destination TLS: {other}"));
            None
        }
    }
}

/// Connects to the endpoint, through TLS for https, sending no export.
async fn check_endpoint(config: &Config, problems: &mut Vec<String>) -> Result<(), CliError> {
    let d = &config.destination;
    let https = d.http_endpoint.scheme() == "https";
    match probe_endpoint(d, &d.http_endpoint, config.delivery.request_timeout).await {
        Ok(Some(version)) => report_line!("endpoint TLS     certificate verifies ({version})")?,
        // No export is sent: a wrong path or a refusal shows only when one is.
        Ok(None) => report_line!("endpoint TCP     accepts connections (no export sent)")?,
        Err(e) if https => {
            report_line!("endpoint TLS     failed")?;
            problems.push(format!("endpoint: {e}"));
        }
        // Not a failure of the set-up: exports wait until the endpoint is there.
        Err(e) => report_line!(
            "warning          endpoint: {e}; exports wait in the outbox until it accepts them"
        )?,
    }
    Ok(())
}

/// The destination's auth; for OAuth2, a token fetched with `client`, as the agent would.
async fn check_auth(
    config: &Config,
    client: HttpClient,
    problems: &mut Vec<String>,
) -> Result<(), CliError> {
    let d = &config.destination;
    match &d.auth {
        Auth::None => report_line!("auth             none")?,
        Auth::Bearer { .. } => report_line!("auth             static bearer token (set)")?,
        Auth::OAuth2 {
            auth_endpoint,
            client_id,
            credentials,
            grant,
            ..
        } => {
            let placement = match credentials {
                crate::config::CredentialsPlacement::Body => "the form body",
                crate::config::CredentialsPlacement::Basic => "a Basic header",
            };
            let grant = match grant {
                crate::config::Grant::ClientCredentials => "client credentials".to_owned(),
                crate::config::Grant::Password { username, .. } => {
                    format!("password grant for user {username}")
                }
            };
            report_line!("auth             oauth2 {grant}, client_id {client_id}, secret sent in {placement}")?;
            report_line!("token endpoint   {}", display_url(auth_endpoint))?;
            let source =
                crate::delivery::auth::TokenSource::new(d.auth.clone(), client, Default::default());
            let fetched = match source.fetch().await {
                Ok(fetched) => fetched,
                Err(e) => {
                    problems.push(format!("token: {e}"));
                    return Ok(());
                }
            };
            report_line!(
                "token            obtained ({} characters, type {}, lifetime {} s{})",
                fetched.token.expose().len(),
                for_terminal(
                    fetched.token_type.as_deref().unwrap_or("unspecified"),
                    false
                ),
                fetched.lifetime.as_secs(),
                if fetched.lifetime_given {
                    ""
                } else {
                    ", assumed: no usable expires_in"
                }
            )?;
            let token_type = fetched.token_type.as_deref();
            if let Some(warning) = crate::delivery::auth::token_type_warning(token_type) {
                report_line!("warning          {warning}")?;
            }
            let bytes = fetched.token.expose().len();
            if let Some(warning) = crate::delivery::auth::token_size_warning(bytes) {
                report_line!("warning          {warning}")?;
            }
        }
    }
    Ok(())
}

/// The wall-clock jumps the store recorded, if the store exists (`check` does not create one).
fn clock_report(stats: &Result<Value, String>) -> String {
    match stats {
        Ok(stats) => format!("wall-clock jumps {}", describe_clock_jumps(stats)),
        Err(why) => why.clone(),
    }
}

/// What the config's segments change from those the store's last run mapped, which the next
/// start (or `outpost ingest` on the store) does: `None` when they are the same, or nothing
/// could be read of the store.
fn mapping_report(stats: &Result<Value, String>, segments: &[String]) -> Option<String> {
    let Some(recorded) = stats.as_ref().ok()?["mapped_segments"].as_array() else {
        // A store that has not run yet records none; an agent of an earlier build says none.
        return Some(
            "not known: the store (or its agent, of an earlier build) does not say which \
             segments it last ran with"
                .to_owned(),
        );
    };
    let recorded: Vec<&str> = recorded.iter().filter_map(Value::as_str).collect();
    let new: Vec<&str> = (segments.iter().map(String::as_str))
        .filter(|s| !recorded.contains(s))
        .collect();
    let left: Vec<&str> = (recorded.iter().copied())
        .filter(|s| !segments.iter().any(|mapped| mapped == s))
        .collect();
    // Quoted, so that a space at an end shows.
    let listed = |ids: &[&str]| {
        ids.iter()
            .map(|id| format!("{id:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut changes = Vec::new();
    if !new.is_empty() {
        changes.push(format!(
            "segments newly mapped: {}; the next start exports each of their stored members \
             once (backfill)",
            listed(&new)
        ));
    }
    if !left.is_empty() {
        changes.push(format!(
            "segments no longer mapped: {}; from the next start payloads leave them out and \
             their changes export nothing",
            listed(&left)
        ));
    }
    (!changes.is_empty()).then(|| changes.join("; "))
}

/// The store's figures, through its agent or on the store itself; `Err` says why not, as
/// the line that would have shown them.
fn store_stats(config: &Config) -> Result<Value, String> {
    if !Store::exists_at(&config.storage.path).unwrap_or(false) {
        return Err("wall clock not watched yet (no store)".to_owned());
    }
    // Run as root, `check` keeps root's rights throughout (for the key files), so it opens
    // the store only where root would keep them too.
    match StoreOwner::of_foreign_store(&config.storage.path, StoreUse::Existing) {
        Ok(None) => {}
        Ok(Some(_)) => {
            return Err("not read: the store is another user's, and check runs with root's rights (run it as that user for this line)".to_owned())
        }
        Err(e) => return Err(format!("not read: {e}")),
    }
    Backend::connect(config)
        .map_err(|e| e.to_string())
        .and_then(|backend| {
            backend
                .execute(&AdminRequest::Stats)
                .map_err(|e| e.to_string())
        })
        .map_err(|e| format!("cannot read the store: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_changed_mapping_does_at_the_next_start() {
        let stats = |recorded: Option<&[&str]>| -> Result<Value, String> {
            Ok(match recorded {
                Some(ids) => serde_json::json!({ "mapped_segments": ids }),
                None => serde_json::json!({}),
            })
        };
        let segments = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ab = segments(&["a", "b"]);
        assert_eq!(mapping_report(&stats(Some(&["a", "b"])), &ab), None);
        assert_eq!(mapping_report(&stats(Some(&["b", "a"])), &ab), None);
        // Nothing read of the store: nothing to tell. Read, but without the segments (an
        // agent of an earlier build): not known, rather than silence read as no change.
        assert_eq!(mapping_report(&Err("no store".into()), &ab), None);
        let unknown = mapping_report(&stats(None), &ab).unwrap();
        assert!(unknown.starts_with("not known:"), "{unknown}");
        let new = mapping_report(&stats(Some(&["a"])), &ab).unwrap();
        assert!(
            new.starts_with("segments newly mapped: \"b\"; the next start exports"),
            "{new}"
        );
        let both = mapping_report(&stats(Some(&["a", "c ", "d"])), &ab).unwrap();
        assert!(
            both.starts_with("segments newly mapped: \"b\";")
                && both.contains("; segments no longer mapped: \"c \", \"d\"; from the next start"),
            "{both}"
        );
    }
}
