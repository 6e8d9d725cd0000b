//! Building and sending one request: its body and `Idempotency-Key`, its headers and token;
//! and what it came to ([`Attempted`]), with the secrets it carried hidden in the error text
//! of an answer ([`secrets_to_hide`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use hyper::Request;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::ClientError;
use super::credentials::Headers;
use super::retry::{self, classify, Class};
use super::{quota, Deliverer};
use crate::config::Secret;
use crate::store::Export;

const USER_AGENT_VALUE: &str = concat!("outpost/", env!("CARGO_PKG_VERSION"));

pub fn user_agent() -> String {
    USER_AGENT_VALUE.to_owned()
}

/// Exports sent together in one request, with their profiles.
pub(super) type Batch = Vec<(Arc<str>, Export)>;

/// The `Idempotency-Key` and body of a request: one export's payload as it is, or (`array`)
/// a JSON array of the payloads with their ids joined by commas, in the same order.
pub fn request_body(batch: &Batch, array: bool) -> (String, Bytes) {
    if !array {
        let (_, export) = batch.first().expect("a request holds an export");
        return (
            export.id.to_string(),
            Bytes::from(export.record.payload.clone()),
        );
    }
    let size = batch
        .iter()
        .map(|(_, e)| e.record.payload.len() + 1)
        .sum::<usize>()
        + 1;
    let mut body = Vec::with_capacity(size);
    let mut key = String::new();
    body.push(b'[');
    for (i, (_, export)) in batch.iter().enumerate() {
        if i > 0 {
            body.push(b',');
            key.push(',');
        }
        body.extend_from_slice(export.record.payload.as_bytes());
        key.push_str(&export.id.to_string());
    }
    body.push(b']');
    (key, Bytes::from(body))
}

/// What one request came to.
#[derive(Debug)]
pub(super) enum Attempted {
    Answered {
        status: u16,
        retry_after: Option<Duration>,
        /// The endpoint's quota, when the answer advertised it.
        quota: Option<quota::Advertised>,
        /// A 401/403 to a token that an earlier refusal had dropped already: the requests in
        /// flight with a token the destination revoked are refused together, and only the
        /// first says anything of the destination.
        token_dropped_before: bool,
        /// `HTTP <status>: <start of the body>`, for anything but 2xx.
        error: String,
    },
    /// No token could be had; `retry_after`: how long the token endpoint said not to be asked
    /// again.
    TokenFailed {
        error: String,
        retry_after: Option<Duration>,
    },
    /// The agent began to stop before the request was sent (while it waited for its token, which
    /// may take a request timeout or two): the endpoint never saw it, and it goes after the
    /// restart. A stop waits one request timeout for the requests already sent.
    NotSent,
    /// No answer: a connection error or a timeout. `nothing_sent`: the request never left
    /// (no connection, or it could not be made), so the endpoint cannot have taken it.
    SendFailed {
        error: String,
        timeout: bool,
        nothing_sent: bool,
    },
}

/// The most of an attempt's error text kept with its export and logged: an answer's status and
/// the start of its body take a few hundred bytes, but a peer may put hundreds of KiB into a
/// header that the text names (a redirect's `Location`, the token endpoint's `Content-Type`),
/// and each failing export would keep and log it at every attempt.
const MAX_ERROR_BYTES: usize = 2048;

impl Attempted {
    /// Cuts its error text to [`MAX_ERROR_BYTES`].
    pub(super) fn cut_error(&mut self) {
        let error = match self {
            Attempted::Answered { error, .. }
            | Attempted::TokenFailed { error, .. }
            | Attempted::SendFailed { error, .. } => error,
            Attempted::NotSent => return,
        };
        *error = crate::explain::cut_to(std::mem::take(error), MAX_ERROR_BYTES);
    }
}

impl Deliverer {
    fn request(
        &self,
        batch: &Batch,
        token: Option<&Secret>,
        headers: &Headers,
    ) -> Result<Request<Full<Bytes>>, String> {
        let (key, body) = request_body(batch, self.max_profiles_per_request > 1);
        let mut builder = Request::post(self.endpoint.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE))
            .header("idempotency-key", key);
        if let Some(token) = token {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                .map_err(|_| "the access token is not a valid header value".to_owned())?;
            value.set_sensitive(true);
            builder = builder.header(AUTHORIZATION, value);
        }
        for (name, value) in headers.iter() {
            builder = builder.header(name, value);
        }
        builder.body(Full::new(body)).map_err(|e| e.to_string())
    }

    /// One request: a token, the POST, and what came of it. Writes nothing to the store. Not
    /// sent once `stop` is cancelled before its token is had.
    pub(super) async fn attempt(
        &self,
        batch: &Batch,
        sent_at: &mut Instant,
        stop: &CancellationToken,
    ) -> Attempted {
        let token = tokio::select! {
            biased;
            token = self.tokens.token() => token,
            () = stop.cancelled() => return Attempted::NotSent,
        };
        let token = match token {
            Ok(token) => token,
            Err(e) => {
                return Attempted::TokenFailed {
                    error: e.to_string(),
                    retry_after: self.tokens.retry_wait(),
                }
            }
        };
        if stop.is_cancelled() {
            return Attempted::NotSent;
        }
        *sent_at = Instant::now();
        let headers = self.headers.held();
        let request = match self.request(batch, token.as_ref(), &headers) {
            Ok(request) => request,
            Err(error) => {
                return Attempted::SendFailed {
                    error,
                    timeout: false,
                    nothing_sent: true,
                }
            }
        };
        let answer = match self.client.send(request).await {
            Ok(answer) => answer,
            Err(e) => {
                return Attempted::SendFailed {
                    timeout: matches!(e, ClientError::Timeout(_)),
                    nothing_sent: matches!(e, ClientError::Connect(_)),
                    error: e.to_string(),
                }
            }
        };
        let status = answer.status.as_u16();
        let mut token_dropped_before = false;
        if classify(status) == Class::AuthRejected {
            if let Some(token) = &token {
                token_dropped_before = self.tokens.refused(token, stop).await;
            }
            // An API key rotated in `custom_headers_file`: this refusal was of the old one,
            // as a token's refusal is of a token since replaced.
            self.headers.reread_off_the_runtime().await;
            token_dropped_before |= !Arc::ptr_eq(&headers, &self.headers.held());
        }
        let answered_at = SystemTime::now();
        let retry_after = retry::retry_after(&answer.headers, answered_at);
        let quota = self
            .rate_limit_headers
            .then(|| quota::advertised(&answer.headers, answered_at))
            .flatten();
        let error = if answer.status.is_success() {
            String::new()
        } else {
            let mut secrets: Vec<&str> = self.secrets_to_hide.iter().map(String::as_str).collect();
            secrets.extend(token.as_ref().map(Secret::expose));
            let read_again = self.tokens.secrets_read_from_files();
            secrets.extend(read_again.iter().map(Secret::expose));
            // As sent: those read again since the start are not in `secrets_to_hide`.
            let sent_values = secrets_to_hide(
                headers.iter().filter_map(|(_, value)| value.to_str().ok()),
                None,
                std::iter::empty(),
            );
            secrets.extend(sent_values.iter().map(String::as_str));
            let redirect = answer.redirect_note(&secrets, "destination.http_endpoint");
            let cut = answer
                .body_cut
                .as_ref()
                .map(|cut| format!(" ({cut})"))
                .unwrap_or_default();
            format!(
                "HTTP {status}{redirect}: {}{cut}",
                answer.body_start_hiding(&secrets)
            )
        };
        if let (true, Some(cut)) = (answer.status.is_success(), &answer.body_cut) {
            tracing::debug!(status, "delivered, though {cut}");
        }
        Attempted::Answered {
            status,
            retry_after,
            quota,
            token_dropped_before,
            error,
        }
    }
}

/// What an endpoint may echo, to hide in error texts: of what it was sent, the custom headers'
/// values (API keys), each word of them (the key after a scheme, `Bearer <key>`) and the
/// values of the endpoint's query (`?api_key=…`), those shorter than 8 characters (a
/// version, a tenant) left out, or every digit in a body would be hidden; and the secrets
/// outpost holds besides (`held`, [`crate::config::Config::secrets_held`]), whatever their
/// length, as the token endpoint's answers hide them.
pub(super) fn secrets_to_hide<'a>(
    header_values: impl Iterator<Item = &'a str>,
    query: Option<&str>,
    held: impl Iterator<Item = &'a str>,
) -> Vec<String> {
    let mut secrets: Vec<String> = Vec::new();
    for value in header_values {
        secrets.push(value.to_owned());
        secrets.extend(value.split_whitespace().map(str::to_owned));
    }
    // Decoded: hiding cuts out the encoded forms too.
    let query = url::form_urlencoded::parse(query.unwrap_or("").as_bytes());
    secrets.extend(query.map(|(_, value)| value.into_owned()));
    secrets.retain(|secret| secret.len() >= crate::config::SECRET_LEAST_BYTES);
    secrets.extend(held.filter(|secret| !secret.is_empty()).map(str::to_owned));
    secrets.sort();
    secrets.dedup();
    // Longest first, so that a value is hidden whole before a word of it.
    secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
    secrets
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::client;
    use crate::profile::Reason;
    use crate::store::codec::ExportRecord;
    use crate::store::ExportId;

    /// What an endpoint echoes of the custom headers or the endpoint's query is hidden: the
    /// key after a scheme word, a query value as sent (encoded) or decoded, but not values
    /// short enough to be everywhere in a body.
    #[test]
    fn what_an_endpoint_may_echo_is_hidden_in_its_answers() {
        let secrets = secrets_to_hide(
            ["Bearer k3yABCDEF", "v2", "tenant-0000001"].into_iter(),
            Some("api_key=s3cr3t%2Bkey9&format=json&sig=abcdefgh12"),
            ["s3cr3t-Client-Pass", "pass word", "short"].into_iter(),
        );
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let table = [
            (
                r#"{"error":"token k3yABCDEF revoked"}"#,
                r#"{"error":"token *** revoked"}"#,
            ),
            ("bad header: Bearer k3yABCDEF", "bad header: ***"),
            (
                "Cannot POST /x?api_key=s3cr3t%2Bkey9",
                "Cannot POST /x?api_key=***",
            ),
            ("key s3cr3t+key9 unknown", "key *** unknown"),
            ("sig=abcdefgh12 expired", "sig=*** expired"),
            ("tenant tenant-0000001 suspended", "tenant *** suspended"),
            ("api v2 wants format json", "api v2 wants format json"),
            // Held, not sent: a gateway that knows the token endpoint's credentials.
            (
                "bad auth / secret s3cr3t-Client-Pass",
                "bad auth / secret ***",
            ),
            // A held secret is hidden whole, not word by word, and a short one too.
            ("user pass word refused", "user *** refused"),
            ("pass short", "pass ***"),
        ];
        for (body, shown) in table {
            assert_eq!(client::hiding(body, &secrets), shown, "{body}");
        }
        assert!(secrets_to_hide(std::iter::empty(), None, std::iter::empty()).is_empty());
    }

    fn export(seq: u64, payload: &str) -> (Arc<str>, Export) {
        (
            Arc::from(format!("p{seq}").as_str()),
            Export {
                retry_at_uptime_ms: None,
                id: ExportId { store: 0xabc, seq },
                dead: false,
                record: ExportRecord::new_pending(
                    format!("p{seq}"),
                    Reason::Segment,
                    payload.into(),
                    0,
                    0,
                ),
            },
        )
    }

    #[test]
    fn request_bodies_and_keys() {
        let one = vec![export(7, r#"{"a":1}"#)];
        assert_eq!(
            request_body(&one, false),
            ("00000abc-7".into(), Bytes::from_static(br#"{"a":1}"#))
        );
        assert_eq!(
            request_body(&one, true),
            ("00000abc-7".into(), Bytes::from_static(br#"[{"a":1}]"#))
        );
        let three = vec![
            export(7, r#"{"a":1}"#),
            export(9, r#"{"b":2}"#),
            export(8, "{}"),
        ];
        let (key, body) = request_body(&three, true);
        assert_eq!(key, "00000abc-7,00000abc-9,00000abc-8");
        assert_eq!(body, Bytes::from_static(br#"[{"a":1},{"b":2},{}]"#));
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed.as_array().unwrap().len(), 3);
    }
}
