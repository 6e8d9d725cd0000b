//! Access tokens: OAuth 2.0 (client credentials or password grant), a static bearer token, or
//! none.
//!
//! The cache hands out the current token and refreshes it before it expires (when less than
//! 10% of its lifetime or 60 s remains, whichever is less) or after the destination rejected
//! it. Concurrent callers share one token request: the fetch happens under the cache's lock;
//! while a refresh before expiry is under way, or after it failed, the token held is handed out
//! until it expires (with a new try each second).
//! When a token answer carried a `refresh_token`, the next refresh uses it first and falls back
//! to the original grant if the token endpoint refuses it. Lifetimes are counted on the
//! monotonic clock (`tokio::time::Instant`), so a wall clock that jumps changes nothing.
//! Secrets given in files are read again where a rotated one would be refused
//! ([`super::credentials`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use hyper::Request;
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::HttpClient;
use super::credentials::Credentials;
use crate::config::{Auth, CredentialsPlacement, Grant, Secret};

/// Used when the token endpoint does not say how long its token lives.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// A longer `expires_in` is taken as this (a year): the token is refreshed at least that often,
/// and no lifetime can overflow the clock.
const MAX_LIFETIME_S: u64 = 365 * 24 * 3600;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("token endpoint: {0}")]
    Transport(String),
    #[error("token endpoint answered {status}{redirect}: {body}")]
    Status {
        status: u16,
        /// Where a redirect points, which is not followed ([`client::Answer::redirect_note`]).
        redirect: String,
        body: String,
        /// The answer's `Retry-After` (up to an hour, as the destination's): no token is
        /// asked for until it has passed.
        retry_after: Option<Duration>,
    },
    #[error("token endpoint: unreadable answer: {0}")]
    Answer(String),
    /// A 2xx answer that is not a JSON token (an HTML login page, another format).
    #[error("{0}")]
    NotAToken(String),
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    refresh_token: Option<String>,
}

/// A token just fetched.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub token: Secret,
    pub lifetime: Duration,
    pub lifetime_given: bool,
    pub token_type: Option<String>,
    pub refresh_token: Option<Secret>,
}

/// The grant of one token request.
#[derive(Debug, Clone, Copy)]
pub enum FormGrant<'a> {
    ClientCredentials,
    Password {
        username: &'a str,
        password: &'a Secret,
    },
    RefreshToken(&'a Secret),
}

/// Whether a token endpoint's answer of `status` (with `retry_after`) to a refresh token is a
/// reason to use the original grant at once: every answer but a 408, a 429 or one with a
/// `Retry-After` (a 503 under load), which ask to come back later whatever the grant. The
/// original credentials are always at hand, so a refresh token is never needed: one the
/// endpoint refuses (400, 401, 403: RFC 6749's `invalid_grant`), a grant it does not serve
/// (404, 405, 422) or one it fails on (5xx) would otherwise be tried again at every fetch
/// while nothing is delivered.
fn falls_back_from_refresh(status: u16, retry_after: Option<Duration>) -> bool {
    retry_after.is_none() && !matches!(status, 408 | 429)
}

/// How long before expiry a token is refreshed.
pub fn refresh_margin(lifetime: Duration) -> Duration {
    (lifetime / 10).min(Duration::from_secs(60))
}

/// After a failed refresh, the token held is used this long before the next try (while it
/// lives), twice as long after each further failure: requests go on meanwhile rather than each
/// waiting for a failing token endpoint, and an endpoint that refuses the credentials (or an
/// identity provider counting failed logins) gets a few tries in the refresh margin, not one a
/// second.
const REFRESH_RETRY: Duration = Duration::from_secs(1);

struct Cached {
    token: Secret,
    /// On the monotonic clock: a step of the wall clock neither refreshes a token early nor
    /// keeps one past its lifetime (tests/clock_jumps.rs).
    refresh_at: Instant,
    expires_at: Instant,
    /// When its answer came.
    stored_at: Instant,
    /// Refreshes of this token that failed.
    refresh_failures: u32,
}

impl Cached {
    /// A refresh failed at `now`: the token, if it still lives, to be used until the next try,
    /// and whether this was the first failed refresh of it.
    fn after_failed_refresh(&mut self, now: Instant) -> Option<(Secret, bool)> {
        if now >= self.expires_at {
            return None;
        }
        let wait = REFRESH_RETRY.saturating_mul(1 << self.refresh_failures.min(16));
        self.refresh_at = now
            .checked_add(wait)
            .map_or(self.expires_at, |at| at.min(self.expires_at));
        self.refresh_failures += 1;
        Some((self.token.clone(), self.refresh_failures == 1))
    }
}

/// What the fetch lock guards.
#[derive(Default)]
struct Fetching {
    /// From the last token answer that carried one; kept until refused.
    refresh_token: Option<Secret>,
    /// The last failed fetch: callers that were waiting for it share its error rather than
    /// each trying again (a token endpoint that is down gets one request, not one per caller).
    failed: Option<(Instant, AuthError)>,
    /// The last `token_type` warned of: said once, and again only when another comes.
    told_token_type: Option<String>,
}

/// What to say of a token answer's `token_type`. outpost sends every token as `Bearer` (RFC
/// 6750), and RFC 6749 reads the type whatever its case; another type (`DPoP`, `MAC`, …)
/// asks for more than a header, which the endpoint may then refuse. `None`: a bearer token,
/// or no type given.
pub fn token_type_warning(token_type: Option<&str>) -> Option<String> {
    let given = token_type?;
    if given.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let shown: String = crate::profile::update::truncate(given, 64)
        .escape_debug()
        .collect();
    Some(format!(
        "the token endpoint gives tokens of type \"{shown}\", not Bearer; outpost sends them as Bearer tokens, which the endpoint may refuse"
    ))
}

/// What many servers take of one header line (nginx's default, `large_client_header_buffers
/// 8k`; Node's limit is 16 KiB for all of them).
const HEADER_LINE_MANY_SERVERS_TAKE: usize = 8 << 10;

/// A warning for a token of `bytes`, sent in every request's `Authorization: Bearer` header,
/// when that header line is more than many servers take: they answer 431, and exports then
/// wait.
pub fn token_size_warning(bytes: usize) -> Option<String> {
    let line = "Authorization: Bearer \r\n".len() + bytes;
    (line > HEADER_LINE_MANY_SERVERS_TAKE).then(|| {
        format!(
            "the token is {bytes} bytes: many servers refuse a request header line of more than 8 KiB (431), and exports then wait (a token endpoint configured for a smaller token or fewer scopes, or the endpoint's header limit raised)"
        )
    })
}

/// When the OAuth token held expires: shared by the token source with the metrics, so that
/// `outpost top` can show the remaining lifetime without a request.
#[derive(Debug, Clone, Default)]
pub struct TokenExpiry(Arc<std::sync::Mutex<Option<Instant>>>);

impl TokenExpiry {
    fn set(&self, at: Option<Instant>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = at;
    }

    /// Seconds until the token held expires (0 once expired); `None` while none is held.
    pub fn remaining_s(&self) -> Option<u64> {
        let at = *self.0.lock().unwrap_or_else(|e| e.into_inner());
        at.map(|at| at.saturating_duration_since(Instant::now()).as_secs())
    }
}

pub struct TokenSource {
    auth: Auth,
    /// The secrets of `auth` as held now: those read from files are read again.
    credentials: Credentials,
    client: HttpClient,
    /// The token handed out; read without waiting by every request.
    current: std::sync::RwLock<Option<Cached>>,
    /// Held while a token is fetched, so that concurrent callers share one fetch; holds the
    /// refresh token of the last answer that carried one, kept until refused.
    fetching: Mutex<Fetching>,
    fetches: Counter,
    expiry: TokenExpiry,
    /// No token is asked for before this: the token endpoint's last answer, a failure, said to
    /// retry after it (`Retry-After`). An identity provider that limits its requests (a 429)
    /// counts those sent earlier, and may lock the client out.
    not_before: std::sync::Mutex<Option<Instant>>,
}

impl TokenSource {
    /// `fetches` counts the requests to the token endpoint.
    pub fn new(auth: Auth, client: HttpClient, fetches: Counter) -> TokenSource {
        TokenSource {
            credentials: Credentials::of(&auth),
            auth,
            client,
            current: std::sync::RwLock::new(None),
            fetching: Mutex::new(Fetching::default()),
            fetches,
            expiry: TokenExpiry::default(),
            not_before: std::sync::Mutex::default(),
        }
    }

    /// How long no token is asked for yet: the token endpoint's last failed answer said to
    /// retry after it (`Retry-After`).
    pub fn retry_wait(&self) -> Option<Duration> {
        let not_before = *self.not_before.lock().unwrap_or_else(|e| e.into_inner());
        not_before
            .map(|at| at.saturating_duration_since(Instant::now()))
            .filter(|wait| !wait.is_zero())
    }

    /// Reports the expiry of each token fetched to `expiry`.
    pub fn with_expiry(mut self, expiry: TokenExpiry) -> TokenSource {
        self.expiry = expiry;
        self
    }

    /// The token to send, fetching one if there is none or it is due for refresh.
    pub async fn token(&self) -> Result<Option<Secret>, AuthError> {
        match &self.auth {
            Auth::None => Ok(None),
            Auth::Bearer { .. } => Ok(self
                .credentials
                .token
                .as_ref()
                .map(|t| Secret::clone(&t.held()))),
            Auth::OAuth2 { .. } => {
                if let Some(token) = self.valid_current() {
                    return Ok(Some(token));
                }
                let waiting_since = Instant::now();
                let mut fetching = match self.fetching.try_lock() {
                    Ok(fetching) => fetching,
                    // A refresh is under way: the token held serves meanwhile, while it lives,
                    // rather than every request waiting for the token endpoint.
                    Err(_) => match self.unexpired_current() {
                        Some(token) => return Ok(Some(token)),
                        None => self.fetching.lock().await,
                    },
                };
                // Another caller may have fetched one, or failed to, while this one waited. One
                // fetched meanwhile serves while it lives, even if already due for refresh (its
                // answer took most of a short lifetime): else each waiting caller would fetch
                // another in turn.
                if let Some(token) = self
                    .valid_current()
                    .or_else(|| self.fetched_since(waiting_since))
                {
                    return Ok(Some(token));
                }
                if let Some((at, error)) = &fetching.failed {
                    if *at >= waiting_since {
                        return Err(error.clone());
                    }
                    if self.retry_wait().is_some() {
                        return self.unexpired_current().map(Some).ok_or(error.clone());
                    }
                }
                // The lifetime counts from the asking: the answer may take a while to come.
                let asked_at = Instant::now();
                let fetched = match self.fetch_with(&mut fetching.refresh_token).await {
                    Ok(fetched) => fetched,
                    Err(error) => {
                        let now = Instant::now();
                        let retry_after = match &error {
                            AuthError::Status { retry_after, .. } => *retry_after,
                            _ => None,
                        };
                        *self.not_before.lock().unwrap_or_else(|e| e.into_inner()) =
                            retry_after.map(|wait| now + wait);
                        fetching.failed = Some((now, error.clone()));
                        let held = self
                            .current
                            .write()
                            .unwrap_or_else(|e| e.into_inner())
                            .as_mut()
                            .and_then(|c| c.after_failed_refresh(now));
                        if let Some((token, first)) = held {
                            if first {
                                tracing::warn!(%error, "refreshing the token failed; the one held is used until it expires, and the refresh tried again after 1 s, then after twice as long each time");
                            } else {
                                tracing::debug!(%error, "refreshing the token failed again");
                            }
                            return Ok(Some(token));
                        }
                        return Err(error);
                    }
                };
                fetching.failed = None;
                *self.not_before.lock().unwrap_or_else(|e| e.into_inner()) = None;
                if let Some(warning) = token_type_warning(fetched.token_type.as_deref()) {
                    if fetching.told_token_type != fetched.token_type {
                        tracing::warn!("{warning}");
                        fetching.told_token_type = fetched.token_type.clone();
                    }
                }
                let refresh_at = asked_at + fetched.lifetime - refresh_margin(fetched.lifetime);
                self.expiry.set(Some(asked_at + fetched.lifetime));
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Cached {
                    token: fetched.token.clone(),
                    refresh_at,
                    expires_at: asked_at + fetched.lifetime,
                    stored_at: Instant::now(),
                    refresh_failures: 0,
                });
                if fetched.refresh_token.is_some() {
                    fetching.refresh_token = fetched.refresh_token;
                }
                Ok(Some(fetched.token))
            }
        }
    }

    /// A new token: with the refresh token when there is one, falling back to the original
    /// grant when the token endpoint does not answer it with a token: any status but 408 and
    /// 429, of an answer without `Retry-After` ([`falls_back_from_refresh`]; those say nothing
    /// of the refresh token, which is kept for the next try), or a 2xx that holds no usable
    /// token (`{"error": "invalid_grant"}` with a 200, as some servers answer a refresh token
    /// they no longer take). Kept, such a
    /// refresh token would be tried again at every fetch, and delivery would stop once the
    /// token held expired.
    async fn fetch_with(&self, refresh_token: &mut Option<Secret>) -> Result<Fetched, AuthError> {
        let Some(refresh) = refresh_token.clone() else {
            return self.fetch().await;
        };
        match self.request(FormGrant::RefreshToken(&refresh)).await {
            Err(AuthError::Status {
                status,
                retry_after,
                ..
            }) if falls_back_from_refresh(status, retry_after) => {
                tracing::info!(
                    status,
                    "the token endpoint did not answer the refresh token with a token; using the original grant"
                );
                *refresh_token = None;
                self.fetch().await
            }
            Err(error @ (AuthError::NotAToken(_) | AuthError::Answer(_))) => {
                tracing::info!(
                    %error,
                    "the token endpoint's answer to the refresh token holds no usable token; using the original grant"
                );
                *refresh_token = None;
                self.fetch().await
            }
            other => other,
        }
    }

    /// The token held, until it expires (past its refresh time too).
    fn unexpired_current(&self) -> Option<Secret> {
        self.current_before(|c| c.expires_at)
    }

    /// The token held, until it is due for refresh.
    fn valid_current(&self) -> Option<Secret> {
        self.current_before(|c| c.refresh_at)
    }

    /// The token held, if its answer came at `since` or later and it has not expired.
    fn fetched_since(&self, since: Instant) -> Option<Secret> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current
            .as_ref()
            .filter(|c| c.stored_at >= since && Instant::now() < c.expires_at)
            .map(|c| c.token.clone())
    }

    fn current_before(&self, until: fn(&Cached) -> Instant) -> Option<Secret> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current
            .as_ref()
            .filter(|c| Instant::now() < until(c))
            .map(|c| c.token.clone())
    }

    /// Drops `used` after the destination refused it, unless a newer token already replaced it
    /// (or it was dropped already). Whether it was a token no longer held: `true` for a
    /// refusal of an OAuth token that another refusal (or a refresh) replaced first, and of a
    /// static token whose file now holds another (rotated there: read again on each
    /// refusal); `false` for the token held.
    pub async fn invalidate(&self, used: &Secret) -> bool {
        if let Some(token) = &self.credentials.token {
            token.reread_off_the_runtime().await;
            return *token.held() != *used;
        }
        if !matches!(self.auth, Auth::OAuth2 { .. }) {
            return false;
        }
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let held = current.as_ref().is_some_and(|c| &c.token == used);
        if held {
            *current = None;
            self.expiry.set(None);
        }
        !held
    }

    /// [`TokenSource::invalidate`] after the destination refused `used`, and, when that
    /// dropped the OAuth token held, the next one fetched at once rather than when a request
    /// next needs one (unless `stop` comes first): an endpoint that takes a token only a while
    /// after it was issued (slow to learn of it, or its clock behind the token's `nbf`) was
    /// sent each new token the moment it came, refused it, and never took one.
    pub async fn refused(self: &Arc<Self>, used: &Secret, stop: &CancellationToken) -> bool {
        let dropped_before = self.invalidate(used).await;
        if !dropped_before && matches!(self.auth, Auth::OAuth2 { .. }) {
            let (tokens, stop) = (Arc::clone(self), stop.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokens.token() => {}
                    () = stop.cancelled() => {}
                }
            });
        }
        dropped_before
    }

    /// One request to the token endpoint with the configured grant (also used by `outpost
    /// check`).
    pub async fn fetch(&self) -> Result<Fetched, AuthError> {
        match (&self.auth, &self.credentials.password) {
            (
                Auth::OAuth2 {
                    grant: Grant::Password { username, .. },
                    ..
                },
                Some(password),
            ) => {
                password.reread_off_the_runtime().await;
                let password = password.held();
                self.request(FormGrant::Password {
                    username,
                    password: &password,
                })
                .await
            }
            _ => self.request(FormGrant::ClientCredentials).await,
        }
    }

    /// The secrets held now that came from files, which may have changed since the start.
    pub fn secrets_read_from_files(&self) -> Vec<Secret> {
        self.credentials.read_from_files()
    }

    async fn request(&self, grant: FormGrant<'_>) -> Result<Fetched, AuthError> {
        let (
            Auth::OAuth2 {
                auth_endpoint,
                client_id,
                credentials,
                scope,
                ..
            },
            Some(client_secret),
        ) = (&self.auth, &self.credentials.client_secret)
        else {
            return Err(AuthError::Answer(
                "this destination does not use OAuth 2.0".into(),
            ));
        };
        // Every grant's request carries it.
        client_secret.reread_off_the_runtime().await;
        let client_secret = &client_secret.held();
        self.fetches.inc();
        let mut request = Request::post(auth_endpoint.as_str())
            .header(
                CONTENT_TYPE,
                "application/x-www-form-urlencoded;charset=UTF-8",
            )
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, super::user_agent());
        let mut basic = None;
        if *credentials == CredentialsPlacement::Basic {
            // RFC 6749 2.3.1: each part form-encoded, then joined and base64-encoded.
            let encode =
                |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            let pair = format!("{}:{}", encode(client_id), encode(client_secret.expose()));
            let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
            request = request.header(AUTHORIZATION, format!("Basic {encoded}"));
            basic = Some(encoded);
        }
        let form = token_form(
            grant,
            client_id,
            client_secret,
            *credentials,
            scope.as_deref(),
        );
        let request = request
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| AuthError::Transport(e.to_string()))?;
        let answer = self
            .client
            .send(request)
            .await
            .map_err(|e| AuthError::Transport(e.to_string()))?;
        if !answer.status.is_success() {
            let mut secrets = vec![client_secret.expose()];
            // With `credentials = "basic"` the pair went in a header an endpoint may echo.
            secrets.extend(basic.as_deref());
            match grant {
                FormGrant::Password { password, .. } => secrets.push(password.expose()),
                FormGrant::RefreshToken(refresh) => secrets.push(refresh.expose()),
                FormGrant::ClientCredentials => {}
            }
            return Err(AuthError::Status {
                status: answer.status.as_u16(),
                redirect: answer.redirect_note(&secrets, "destination.auth.auth_endpoint"),
                body: answer.body_start_hiding(&secrets),
                retry_after: super::retry::retry_after(&answer.headers, SystemTime::now()),
            });
        }
        if let Some(cut) = &answer.body_cut {
            return Err(AuthError::Transport(format!(
                "the token endpoint answered {}, but {cut}",
                answer.status.as_u16()
            )));
        }
        if answer.cut_at_the_most_read() {
            // Its first MiB would read as JSON cut short, and the address be blamed.
            return Err(AuthError::NotAToken(format!(
                "the token endpoint answered {} with a body of 1 MiB or more, which outpost does not read whole: a token answer is never that large, nor a token a request's header could carry",
                answer.status.as_u16()
            )));
        }
        let parsed: TokenAnswer = serde_json::from_slice(&answer.body).map_err(|e| {
            let content_type = answer
                .headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok());
            // A wrong-typed field's error quotes its value, which may be a token.
            let error = if e.is_data() {
                format!(
                    "{:?} at line {} column {}",
                    e.classify(),
                    e.line(),
                    e.column()
                )
            } else {
                e.to_string()
            };
            tracing::debug!(
                error,
                content_type,
                bytes = answer.body.len(),
                "the token endpoint's answer is not a JSON token"
            );
            AuthError::NotAToken(crate::explain::token_answer(
                answer.status.as_u16(),
                content_type,
                &answer.body,
                &e,
            ))
        })?;
        if parsed.access_token.is_empty() {
            return Err(AuthError::Answer("empty access_token".into()));
        }
        // Kept, it would fail every request before it is sent, or be read by the endpoint as
        // another token, for the whole of its lifetime: the check a static token gets.
        if !crate::config::header_can_carry(&parsed.access_token) {
            return Err(AuthError::Answer(
                "the access_token holds what no Authorization header can carry as it is (control characters, non-ASCII, or blanks at either end)".into(),
            ));
        }
        let (lifetime, lifetime_given) = lifetime_of(parsed.expires_in.as_ref());
        Ok(Fetched {
            token: Secret::new(parsed.access_token),
            lifetime,
            lifetime_given,
            token_type: parsed.token_type,
            refresh_token: parsed
                .refresh_token
                .filter(|t| !t.is_empty())
                .map(Secret::new),
        })
    }
}

/// A token's lifetime from its answer's `expires_in` (seconds, as a number or a string; a
/// fraction is cut off), and whether the answer gave one that can be used: missing, under a
/// second, negative or unreadable, it is [`DEFAULT_LIFETIME`] (a lifetime of zero would fetch
/// a token for every request).
fn lifetime_of(expires_in: Option<&serde_json::Value>) -> (Duration, bool) {
    let whole_seconds = |s: f64| (s.is_finite() && s >= 1.0).then(|| s.min(u64::MAX as f64) as u64);
    let seconds = match expires_in {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().or_else(|| n.as_f64().and_then(whole_seconds))
        }
        Some(serde_json::Value::String(s)) => {
            let s = s.trim();
            s.parse()
                .ok()
                .or_else(|| s.parse().ok().and_then(whole_seconds))
        }
        _ => None,
    };
    match seconds.filter(|&s| s > 0) {
        Some(s) => (Duration::from_secs(s.min(MAX_LIFETIME_S)), true),
        None => (DEFAULT_LIFETIME, false),
    }
}

/// The form body of a token request: the grant's fields, then the client's id and secret
/// unless they go in a Basic header, then the scope.
fn token_form(
    grant: FormGrant<'_>,
    client_id: &str,
    client_secret: &Secret,
    credentials: CredentialsPlacement,
    scope: Option<&str>,
) -> String {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    match grant {
        FormGrant::ClientCredentials => {
            form.append_pair("grant_type", "client_credentials");
        }
        FormGrant::Password { username, password } => {
            form.append_pair("grant_type", "password");
            form.append_pair("username", username);
            form.append_pair("password", password.expose());
        }
        FormGrant::RefreshToken(token) => {
            form.append_pair("grant_type", "refresh_token");
            form.append_pair("refresh_token", token.expose());
        }
    }
    if credentials == CredentialsPlacement::Body {
        form.append_pair("client_id", client_id);
        form.append_pair("client_secret", client_secret.expose());
    }
    if let Some(scope) = scope {
        form.append_pair("scope", scope);
    }
    form.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::receiver::{Receiver, ReceiverOptions};

    /// A receiver issuing tokens good for 600 s, and a token source of the demo's config
    /// fetching them from it.
    async fn with_receiver() -> (Receiver, TokenSource) {
        with_receiver_issuing(Duration::from_secs(600)).await
    }

    /// [`with_receiver`], the tokens good for `lifetime`.
    async fn with_receiver_issuing(lifetime: Duration) -> (Receiver, TokenSource) {
        let options = ReceiverOptions {
            token_lifetime: lifetime,
            ..ReceiverOptions::default()
        };
        let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), options)
            .await
            .unwrap();
        let text = crate::demo::demo_config_text(&receiver.base_url());
        let config =
            crate::config::Config::parse(std::path::Path::new("outpost.toml"), &text).unwrap();
        let client = HttpClient::new(&config.destination, Duration::from_secs(5)).unwrap();
        let tokens = TokenSource::new(config.destination.auth.clone(), client, Counter::default());
        (receiver, tokens)
    }

    /// The token endpoint fails once the token is due for refresh: the token held is used
    /// until it expires, also by requests that come while the refresh is under way, with a
    /// new try after a [`REFRESH_RETRY`], then after twice as long; then the failure shows.
    #[tokio::test]
    async fn a_failed_refresh_keeps_the_token_until_it_expires() {
        use crate::receiver::Reply;
        let (receiver, tokens) = with_receiver().await;
        let tokens = Arc::new(tokens);
        let first = tokens.token().await.unwrap().unwrap();
        async fn skip(by: Duration) {
            tokio::time::pause();
            tokio::time::advance(by).await;
            tokio::time::resume();
        }

        // Past refresh_at (540 s), before expiry (600 s); the refresh takes 3 s, then fails.
        receiver.set_token_script(Some(Arc::new(|_, _| {
            let failed = Reply::Status(500, vec![], "down".into());
            Reply::After(Duration::from_secs(3), Box::new(failed))
        })));
        skip(Duration::from_secs(545)).await;
        let refreshing = tokio::spawn({
            let tokens = Arc::clone(&tokens);
            async move { tokens.token().await }
        });
        for _ in 0..1000 {
            if receiver.token_requests().len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(receiver.token_requests().len(), 2, "the refresh began");
        let meanwhile = tokio::time::timeout(Duration::from_millis(1500), tokens.token())
            .await
            .expect("a request during the refresh does not wait for it");
        assert_eq!(meanwhile.unwrap(), Some(first.clone()));
        let refreshed = refreshing.await.unwrap();
        assert_eq!(
            refreshed.expect("the token held still lives"),
            Some(first.clone())
        );
        assert_eq!(receiver.token_requests().len(), 2, "one refresh tried");

        receiver.set_token_script(Some(Arc::new(|_, _| {
            Reply::Status(500, vec![], "down".into())
        })));
        tokio::time::pause();
        assert_eq!(tokens.token().await.unwrap(), Some(first.clone()));
        assert_eq!(
            receiver.token_requests().len(),
            2,
            "no new try before a second has passed"
        );
        tokio::time::advance(REFRESH_RETRY).await;
        tokio::time::resume();
        assert_eq!(tokens.token().await.unwrap(), Some(first.clone()));
        assert_eq!(receiver.token_requests().len(), 3, "tried again");
        // Twice as long after each failure.
        tokio::time::pause();
        tokio::time::advance(REFRESH_RETRY).await;
        assert_eq!(tokens.token().await.unwrap(), Some(first.clone()));
        assert_eq!(
            receiver.token_requests().len(),
            3,
            "not again after a second"
        );
        tokio::time::advance(REFRESH_RETRY).await;
        tokio::time::resume();
        assert_eq!(tokens.token().await.unwrap(), Some(first));
        assert_eq!(receiver.token_requests().len(), 4, "again after two");
        skip(Duration::from_secs(60)).await; // expired
        assert!(matches!(
            tokens.token().await,
            Err(AuthError::Status { status: 500, .. })
        ));
    }

    /// A token endpoint that says when to ask again (`Retry-After`, with a 429 or a 503) is
    /// not asked before then: each caller meanwhile gets its last error, and how long is left.
    #[tokio::test]
    async fn the_token_endpoint_is_not_asked_again_before_its_retry_after() {
        use crate::receiver::Reply;
        let (receiver, tokens) = with_receiver().await;
        receiver.set_token_script(Some(Arc::new(|_, _| {
            let retry_after = ("retry-after".to_owned(), "30".to_owned());
            Reply::Status(429, vec![retry_after], "slow down".into())
        })));
        let refused = |result: Result<Option<Secret>, AuthError>| {
            assert!(
                matches!(result, Err(AuthError::Status { status: 429, .. })),
                "{result:?}"
            );
        };
        refused(tokens.token().await);
        assert_eq!(receiver.token_requests().len(), 1);
        let wait = tokens.retry_wait().expect("a wait");
        assert!(wait > Duration::from_secs(29) && wait <= Duration::from_secs(30));
        tokio::time::pause();
        refused(tokens.token().await);
        tokio::time::advance(Duration::from_secs(29)).await;
        refused(tokens.token().await);
        assert_eq!(receiver.token_requests().len(), 1, "asked within its wait");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(tokens.retry_wait(), None);
        tokio::time::resume();
        receiver.set_token_script(None);
        assert!(tokens.token().await.unwrap().is_some());
        assert_eq!(
            receiver.token_requests().len(),
            2,
            "asked once its wait passed"
        );
    }

    /// A refresh refused with `Retry-After` leaves the token held in use, without another
    /// try before then, though the refresh's own schedule would try again after 1 s.
    #[tokio::test]
    async fn the_token_held_serves_while_a_refresh_waits_for_its_retry_after() {
        use crate::receiver::Reply;
        let (receiver, tokens) = with_receiver_issuing(Duration::from_secs(600)).await;
        let held = tokens.token().await.unwrap().expect("a token");
        tokio::time::pause();
        // Past its refresh time (540 s), before its expiry.
        tokio::time::advance(Duration::from_secs(545)).await;
        tokio::time::resume();
        receiver.set_token_script(Some(Arc::new(|_, _| {
            let retry_after = ("retry-after".to_owned(), "30".to_owned());
            Reply::Status(503, vec![retry_after], "busy".into())
        })));
        assert_eq!(tokens.token().await.unwrap(), Some(held.clone()));
        assert_eq!(receiver.token_requests().len(), 2, "the refresh was tried");
        tokio::time::pause();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(tokens.token().await.unwrap(), Some(held));
        assert_eq!(receiver.token_requests().len(), 2, "tried within its wait");
        tokio::time::resume();
    }

    /// A token endpoint that moved answers a redirect, which is not followed: the error says
    /// where it points and which setting must name that place.
    #[tokio::test]
    async fn a_redirect_from_the_token_endpoint_names_where_it_points() {
        use crate::receiver::Reply;
        let (receiver, tokens) = with_receiver().await;
        receiver.set_token_script(Some(Arc::new(|_, _| {
            let to = "https://idp.example.com/oauth/token?tenant=7".to_owned();
            Reply::Status(301, vec![("location".into(), to)], String::new())
        })));
        let error = tokens.token().await.unwrap_err().to_string();
        assert_eq!(
            error,
            "token endpoint answered 301 (a redirect to https://idp.example.com/oauth/token?…, \
             which is not followed: destination.auth.auth_endpoint must name where it is): "
        );
    }

    /// A token's lifetime counts from when it was asked for: an answer that took 3 s leaves
    /// the token 3 s less to live, and the refresh comes that much earlier.
    #[tokio::test]
    async fn a_token_lifetime_counts_from_the_asking() {
        use crate::receiver::Reply;
        let (receiver, tokens) = with_receiver().await;
        receiver.set_token_script(Some(Arc::new(|_, _| Reply::Delay(Duration::from_secs(3)))));
        let first = tokens.token().await.unwrap().unwrap();
        receiver.set_token_script(None);
        // 538 s after the answer came: 541 s after the asking, past the refresh (540 s).
        tokio::time::pause();
        tokio::time::advance(Duration::from_secs(538)).await;
        tokio::time::resume();
        let second = tokens.token().await.unwrap().unwrap();
        assert_eq!(receiver.token_requests().len(), 2, "refreshed");
        assert_ne!(second, first);
    }

    /// A token no header can carry is refused as an answer, not kept: kept, it would fail
    /// every request before it is sent until it expired.
    #[tokio::test]
    async fn a_token_no_header_can_carry_is_refused() {
        use crate::receiver::Reply;
        let (receiver, tokens) = with_receiver().await;
        for token in [r"abc\u0001", "abcé", " abc", "abc "] {
            let body =
                format!(r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":600}}"#);
            receiver.set_token_script(Some(Arc::new(move |_, _| {
                Reply::Status(
                    200,
                    vec![("content-type".into(), "application/json".into())],
                    body.clone(),
                )
            })));
            match tokens.token().await {
                Err(AuthError::Answer(error)) => {
                    assert!(
                        error.contains("no Authorization header can carry"),
                        "{token}: {error}"
                    )
                }
                other => panic!("{token}: {other:?}"),
            }
        }
        receiver.set_token_script(None);
        let token = tokens.token().await.unwrap().unwrap();
        assert!(!token.expose().contains('\u{1}'));
    }

    /// Requests waiting for a fetch whose answer came when the token was already due for
    /// refresh (a 4 s token answered after 3.65 s) take that token: one fetch serves them all.
    #[tokio::test]
    async fn callers_waiting_for_a_slow_fetch_of_a_short_lived_token_share_it() {
        use crate::receiver::Reply;
        let (receiver, tokens) = with_receiver_issuing(Duration::from_secs(4)).await;
        let tokens = Arc::new(tokens);
        receiver.set_token_script(Some(Arc::new(|_, _| {
            Reply::Delay(Duration::from_millis(3650))
        })));
        let callers: Vec<_> = (0..5)
            .map(|_| {
                let tokens = Arc::clone(&tokens);
                tokio::spawn(async move { tokens.token().await })
            })
            .collect();
        let mut got = Vec::new();
        for caller in callers {
            got.push(caller.await.unwrap().unwrap().unwrap());
        }
        assert_eq!(receiver.token_arrivals(), 1);
        assert!(got.iter().all(|token| *token == got[0]));
    }

    /// Within the refresh margin (the last 10% of the lifetime) a new token is fetched
    /// before the held one is handed out; before it, the held one is.
    #[tokio::test]
    async fn a_token_is_refreshed_within_its_margin_before_it_expires() {
        let (receiver, tokens) = with_receiver().await;
        let first = tokens.token().await.unwrap().unwrap();
        tokio::time::pause();
        tokio::time::advance(Duration::from_secs(535)).await;
        tokio::time::resume();
        assert_eq!(tokens.token().await.unwrap(), Some(first.clone()));
        assert_eq!(receiver.token_requests().len(), 1, "held before the margin");
        tokio::time::pause();
        tokio::time::advance(Duration::from_secs(10)).await; // 545 s: past 540 s, before 600 s
        tokio::time::resume();
        let second = tokens.token().await.unwrap().unwrap();
        assert_eq!(
            receiver.token_requests().len(),
            2,
            "refreshed within the margin"
        );
        assert_ne!(second, first);
    }

    #[test]
    fn a_token_larger_than_many_servers_take_in_headers_is_warned_of() {
        // (token's bytes, warned)
        let table = [
            (0, false),
            (1_500, false),
            // The header line is 24 bytes more than the token.
            (8_168, false),
            (8_169, true),
            (900_000, true),
        ];
        for (bytes, warned) in table {
            assert_eq!(token_size_warning(bytes).is_some(), warned, "{bytes}");
        }
        let warning = token_size_warning(900_000).unwrap();
        assert!(
            warning.starts_with("the token is 900000 bytes"),
            "{warning}"
        );
    }

    #[test]
    fn a_token_type_other_than_bearer_is_warned_of() {
        // (token_type, warned)
        let table = [
            (None, false),
            (Some("Bearer"), false),
            (Some("bearer"), false),
            (Some("BEARER"), false),
            (Some("DPoP"), true),
            (Some("mac"), true),
            (Some(""), true),
            (Some("Bearer "), true),
        ];
        for (token_type, warned) in table {
            let warning = token_type_warning(token_type);
            assert_eq!(warning.is_some(), warned, "{token_type:?}: {warning:?}");
            if let (Some(warning), Some(given)) = (warning, token_type) {
                assert!(warning.contains(&format!("\"{given}\"")), "{warning}");
            }
        }
        let long = token_type_warning(Some(&"x".repeat(1000))).unwrap();
        assert!(long.len() < 300, "{long}");
        let escaped = token_type_warning(Some("a\u{1b}[2J")).unwrap();
        assert!(!escaped.contains('\u{1b}'), "{escaped}");
    }

    #[test]
    fn token_form_table() {
        let secret = Secret::new("s&cr=t");
        let table = [
            (CredentialsPlacement::Body, None, "grant_type=client_credentials&client_id=edge+agent&client_secret=s%26cr%3Dt"),
            (CredentialsPlacement::Body, Some("a b"), "grant_type=client_credentials&client_id=edge+agent&client_secret=s%26cr%3Dt&scope=a+b"),
            (CredentialsPlacement::Basic, None, "grant_type=client_credentials"),
            (CredentialsPlacement::Basic, Some("x"), "grant_type=client_credentials&scope=x"),
        ];
        for (placement, scope, expected) in table {
            assert_eq!(
                token_form(
                    FormGrant::ClientCredentials,
                    "edge agent",
                    &secret,
                    placement,
                    scope
                ),
                expected
            );
        }
    }

    #[test]
    fn token_form_for_each_grant() {
        let secret = Secret::new("s");
        let password = Secret::new("p w&");
        let refresh = Secret::new("r/1");
        let table = [
            (
                FormGrant::Password {
                    username: "ops@acme",
                    password: &password,
                },
                "grant_type=password&username=ops%40acme&password=p+w%26&client_id=c&client_secret=s",
            ),
            (
                FormGrant::RefreshToken(&refresh),
                "grant_type=refresh_token&refresh_token=r%2F1&client_id=c&client_secret=s",
            ),
        ];
        for (grant, expected) in table {
            assert_eq!(
                token_form(grant, "c", &secret, CredentialsPlacement::Body, None),
                expected
            );
        }
    }

    #[test]
    fn lifetime_table() {
        use serde_json::json;
        let hour = DEFAULT_LIFETIME.as_secs();
        // (expires_in, lifetime in seconds, given)
        let table = [
            (Some(json!(300)), 300, true),
            (Some(json!("300")), 300, true),
            (Some(json!(" 45 ")), 45, true),
            (Some(json!(10_u64.pow(12))), MAX_LIFETIME_S, true),
            (Some(json!(0)), hour, false),
            (Some(json!("0")), hour, false),
            (Some(json!(-5)), hour, false),
            (Some(json!(2.5)), 2, true),
            (Some(json!(299.9)), 299, true),
            (Some(json!("59.5")), 59, true),
            (Some(json!(0.5)), hour, false),
            (Some(json!(1e300)), MAX_LIFETIME_S, true),
            (Some(json!("NaN")), hour, false),
            (Some(json!("inf")), hour, false),
            (Some(json!("soon")), hour, false),
            (Some(json!(null)), hour, false),
            (None, hour, false),
        ];
        for (expires_in, seconds, given) in table {
            assert_eq!(
                lifetime_of(expires_in.as_ref()),
                (Duration::from_secs(seconds), given),
                "{expires_in:?}"
            );
        }
    }

    #[test]
    fn a_refresh_token_not_answered_with_a_token_gives_way_to_the_original_grant() {
        // (status of the answer to the refresh token, its Retry-After) -> the original grant
        // at once
        let later = Some(Duration::from_secs(30));
        let table = [
            (400, None, true),
            (401, None, true),
            (403, None, true),
            (404, None, true),
            (405, None, true),
            (422, None, true),
            (500, None, true),
            (503, None, true),
            (503, later, false),
            (500, later, false),
            (408, None, false),
            (429, None, false),
            (429, later, false),
        ];
        for (status, retry_after, expected) in table {
            assert_eq!(
                falls_back_from_refresh(status, retry_after),
                expected,
                "{status} {retry_after:?}"
            );
        }
    }

    #[test]
    fn refresh_margin_is_the_lesser_of_10_percent_and_60_s() {
        let table = [(10, 1), (100, 10), (600, 60), (3600, 60), (1, 0)];
        for (lifetime, margin) in table {
            assert_eq!(
                refresh_margin(Duration::from_secs(lifetime)).as_secs(),
                margin,
                "lifetime {lifetime}"
            );
        }
    }
}
