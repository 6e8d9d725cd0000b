//! `outpost check`, the preflight: a line for each part of the config and what it names (the
//! store, the ingest listener, the stream, the endpoint, the token), then every problem found.

use crate::admin::AdminRequest;
use crate::config::{Auth, Config};
use crate::store::{Store, StoreOwner, StoreUse};

use super::{describe_clock_jumps, display_url, for_terminal, nats, preflight, Backend, CliError};

/// Validates the config (already done by loading it), builds the TLS client, fetches a token.
pub(super) async fn check(config: &Config) -> Result<(), CliError> {
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
            true => {
                "for neither the endpoint nor the token endpoint: destination.no_proxy lists them"
                    .to_owned()
            }
            false => format!("tunnels to {}", through.join(" and ")),
        };
        report_line!(
            "proxy            {} ({through}{credentials})",
            proxy.address()
        )?;
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
    )?;
    let store = preflight::store(config);
    report_line!("store            {}", store.line)?;
    report_line!("clock            {}", clock_report(config))?;
    let listen = preflight::listen(config);
    report_line!("ingest           {}", listen.line)?;
    let mut problems: Vec<String> = Vec::new();
    // Files the config names that cannot be used, or a store path through a file: the agent
    // would refuse to start (exit 2).
    let mut file_problems: Vec<String> = Vec::new();
    if let Some(tls) = &config.ingest.tls {
        match crate::server::tls::acceptor(tls) {
            Ok(_) => report_line!("ingest TLS       certificate and key load")?,
            Err(e) => {
                report_line!("ingest TLS       cannot be used")?;
                file_problems.push(e);
            }
        }
    }
    for finding in [store, listen] {
        if let Some(warning) = finding.warning {
            report_line!("warning          {warning}")?;
        }
        match finding.refused_at_start {
            true => file_problems.extend(finding.problem),
            false => problems.extend(finding.problem),
        }
    }
    for warning in &config.warnings {
        report_line!("warning          {warning}")?;
    }
    if let Some(nats) = &config.nats {
        match nats.check_files() {
            Err(e) => file_problems.push(e),
            Ok(()) => {
                if let Err(e) = nats::check_nats(nats).await {
                    report_line!("stream           cannot be read")?;
                    problems.push(format!("nats: {e}"));
                }
            }
        }
    }
    let client = match crate::delivery::client::HttpClient::new(d, config.delivery.request_timeout)
    {
        Ok(client) => client,
        Err(crate::delivery::client::ClientError::Config(message)) => {
            file_problems.push(message);
            return fail_with_files(problems, file_problems);
        }
        Err(other) => {
            problems.push(format!("destination TLS: {other}"));
            return fail_with_files(problems, file_problems);
        }
    };
    if !file_problems.is_empty() {
        return fail_with_files(problems, file_problems);
    }
    let https = d.http_endpoint.scheme() == "https";
    match crate::delivery::client::probe_endpoint(
        d,
        &d.http_endpoint,
        config.delivery.request_timeout,
    )
    .await
    {
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
                    return fail(problems);
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
        }
    }
    if !problems.is_empty() {
        return fail(problems);
    }
    report_line!("check            ok")?;
    Ok(())
}

/// `check`'s failure: every problem found, one a line.
fn fail(problems: Vec<String>) -> Result<(), CliError> {
    Err(CliError::Failure(problems.join("\noutpost: ")))
}

/// `check`'s failure when files the config names cannot be used, as the agent would refuse
/// them (exit 2): those, then the other problems found.
fn fail_with_files(problems: Vec<String>, files: Vec<String>) -> Result<(), CliError> {
    if files.is_empty() {
        return fail(problems);
    }
    let all: Vec<String> = files.into_iter().chain(problems).collect();
    Err(CliError::Usage(all.join("\noutpost: ")))
}

/// The wall-clock jumps the store recorded, if the store exists (`check` does not create one).
fn clock_report(config: &Config) -> String {
    if !Store::exists_at(&config.storage.path).unwrap_or(false) {
        return "wall clock not watched yet (no store)".to_owned();
    }
    // Run as root, `check` keeps root's rights throughout (for the key files), so it opens
    // the store only where root would keep them too.
    match StoreOwner::of_foreign_store(&config.storage.path, StoreUse::Existing) {
        Ok(None) => {}
        Ok(Some(_)) => {
            return "not read: the store is another user's, and check runs with root's rights (run it as that user for this line)".to_owned()
        }
        Err(e) => return format!("not read: {e}"),
    }
    let stats = Backend::connect(config)
        .map_err(|e| e.to_string())
        .and_then(|backend| {
            backend
                .execute(&AdminRequest::Stats)
                .map_err(|e| e.to_string())
        });
    match stats {
        Ok(stats) => format!("wall-clock jumps {}", describe_clock_jumps(&stats)),
        Err(e) => format!("cannot read the store: {e}"),
    }
}
