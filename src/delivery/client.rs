//! The HTTP client: hyper over rustls (ring), for `https://` and plain `http://` endpoints.
//! Every request is bounded by the request timeout, the body read included.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::capture_connection;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use rustls::client::WebPkiServerVerifier;

use super::proxy::Route;
use crate::config::Destination;
use crate::tls_files::{
    roots_with, CertAndKeyFiles, FollowedCertifiedKey, FollowedFiles, CA_FILE_SAID,
};

/// How much of an error answer's body is kept.
pub const ERROR_BODY_BYTES: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A certificate or key file named in the configuration is missing or wrong; the message
    /// starts with the key.
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Tls(String),
    #[error("timed out after {0:?} (delivery.request_timeout_ms)")]
    Timeout(Duration),
    #[error("{0}")]
    Transport(String),
    /// No connection could be made: nothing of the request was sent.
    #[error("{0}")]
    Connect(String),
}

/// An answer: status, headers and (the start of) the body.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Why the body stopped before its end: it broke off, or did not end within the timeout
    /// (one cut at [`ANSWER_BYTES`] says nothing here). The status still stands: a delivery
    /// answered 2xx was taken.
    pub body_cut: Option<String>,
}

impl Answer {
    /// Whether the body was read only up to [`ANSWER_BYTES`], the rest of it left unread.
    pub fn cut_at_the_most_read(&self) -> bool {
        self.body.len() >= ANSWER_BYTES
    }

    /// The start of the body as text, for error messages.
    pub fn body_start(&self) -> String {
        let end = self.body.len().min(ERROR_BODY_BYTES);
        String::from_utf8_lossy(&self.body[..end]).into_owned()
    }

    /// What to say of this answer when it is a redirect, which outpost does not follow: where
    /// it points (each of `secrets` hidden, the address cut to what `redacted_address` shows)
    /// and that `setting` must name the place itself; empty for any other answer.
    pub fn redirect_note(&self, secrets: &[&str], setting: &str) -> String {
        if !self.status.is_redirection() {
            return String::new();
        }
        let Some(to) = self
            .headers
            .get(hyper::header::LOCATION)
            .and_then(|v| v.to_str().ok())
        else {
            return " (a redirect without a readable Location, which is not followed)".to_owned();
        };
        // Hidden before it is cut, so that a secret holding `@`, `?` or `#` is hidden whole.
        let to = crate::config::redacted_address(&hiding(to, secrets));
        let to = if still_holds_a_secret(&to, secrets) {
            "(an address not shown: it holds a secret outpost sent)".to_owned()
        } else {
            to
        };
        format!(" (a redirect to {to}, which is not followed: {setting} must name where it is)")
    }

    /// [`Answer::body_start`] with each of `secrets` shown as `***`, also as it may come back
    /// encoded (form- or percent-encoded, or escaped in JSON): an endpoint may echo what it was
    /// sent, and error texts reach logs, the outbox's `last_error` and `outpost check`.
    pub fn body_start_hiding(&self, secrets: &[&str]) -> String {
        // Only the start is shown: a large error page is not searched whole for each failure.
        let window = &self.body[..self.body.len().min(HIDING_WINDOW_BYTES)];
        let mut text = hiding(&String::from_utf8_lossy(window), secrets);
        if still_holds_a_secret(&text, secrets) {
            return WITHHELD_BODY.to_owned();
        }
        let mut end = text.len().min(ERROR_BODY_BYTES);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text
    }
}

/// How an HTML page may escape `"` and `'` (Python's `html.escape`, Go's
/// `html.EscapeString`, PHP's `htmlspecialchars` since 8.1 and before it, which left `'`);
/// `&`, `<` and `>` all escape alike.
const HTML_QUOTES: [(&str, &str); 6] = [
    ("&quot;", "&#x27;"),
    ("&#34;", "&#39;"),
    ("&quot;", "&#039;"),
    ("&quot;", "'"),
    ("&quot;", "&#39;"),
    ("&quot;", "&apos;"),
];

/// `secret` as an HTML page that echoes it may write it, quotes escaped as `quotes` says.
fn html_escaped(secret: &str, (quot, apos): (&str, &str)) -> String {
    let mut out = String::with_capacity(secret.len());
    for c in secret.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str(quot),
            '\'' => out.push_str(apos),
            c => out.push(c),
        }
    }
    out
}

/// `text` with each of `secrets` shown as `***`, also as it may come back encoded (form- or
/// percent-encoded, escaped in JSON or in HTML).
pub fn hiding(text: &str, secrets: &[&str]) -> String {
    let mut forms: Vec<String> = Vec::new();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        if secret.contains(['&', '<', '>', '"', '\'']) {
            forms.extend(HTML_QUOTES.map(|quotes| html_escaped(secret, quotes)));
        }
        let form: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
        let json = serde_json::to_string(secret).unwrap_or_default();
        let json = json.trim_matches('"');
        forms.extend([
            secret.to_string(),
            form.replace('+', "%20"),
            form.to_lowercase(),
            form.replace('+', "%20").to_lowercase(),
            json.to_owned(),
            json.replace('/', "\\/"),
            form,
        ]);
    }
    // Longest first, of every secret's forms: a secret that holds another (a password that
    // begins with the client secret) is cut out whole before the shorter one cuts it apart.
    forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
    let mut text = text.to_owned();
    for form in forms {
        text = text.replace(&form, "***");
    }
    text
}

/// Shown instead of a body that echoes a secret in a form [`Answer::body_start_hiding`] does
/// not cut out.
pub const WITHHELD_BODY: &str =
    "(body not shown: it holds a secret outpost sent, in an encoding it cannot cut out)";

/// Whether `text` still holds one of `secrets` once percent-encoding (`+` as a space, or
/// not), JSON string escapes or HTML character references are undone: encodings other than
/// the few that are cut out, such as percent-encoding that leaves `/` as it is, `\u` escapes
/// of non-ASCII letters, or `&#115;` for an `s`.
pub fn still_holds_a_secret(text: &str, secrets: &[&str]) -> bool {
    let unescaped = json_unescaped(text);
    let views = [
        percent_decoded(text, false),
        percent_decoded(text, true),
        percent_decoded(&unescaped, false),
        unescaped,
        html_escape::decode_html_entities(text).into_owned(),
    ];
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .any(|secret| views.iter().any(|view| view.contains(secret)))
}

fn percent_decoded(text: &str, plus_is_space: bool) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push((high * 16 + low) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `text` with JSON's string escapes (`\"`, `\/`, `\uXXXX`, surrogate pairs …) undone
/// wherever they stand.
fn json_unescaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut pending_high: Option<u32> = None;
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('u') => {
                let code: String = chars.by_ref().take(4).collect();
                let Ok(unit) = u32::from_str_radix(&code, 16) else {
                    out.push_str("\\u");
                    out.push_str(&code);
                    continue;
                };
                match (pending_high.take(), unit) {
                    (None, 0xD800..=0xDBFF) => pending_high = Some(unit),
                    (Some(high), 0xDC00..=0xDFFF) => out.push(
                        char::from_u32(0x10000 + ((high - 0xD800) << 10) + (unit - 0xDC00))
                            .unwrap_or('\u{fffd}'),
                    ),
                    (_, unit) => out.push(char::from_u32(unit).unwrap_or('\u{fffd}')),
                }
            }
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// How much of an error body is searched for echoed secrets: far more than is shown
/// ([`ERROR_BODY_BYTES`]), so that what is shown after the secrets are cut out comes from it.
const HIDING_WINDOW_BYTES: usize = 64 << 10;

/// How much of an answer's body is read: far more than a token answer or an error's text
/// needs ([`HIDING_WINDOW_BYTES`] of it are searched for echoed secrets), so that an endpoint
/// answering with a large file, or a body without end, cannot fill memory within a timeout.
const ANSWER_BYTES: usize = 1 << 20;

/// Up to `cap` bytes of `body`, as many as came by `deadline`, and why it stopped short, if
/// it did (it broke off, or did not end in time). Past `cap` the rest is not read (its
/// connection is then not reused).
async fn first_bytes(
    mut body: hyper::body::Incoming,
    cap: usize,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> (Bytes, Option<String>) {
    let mut kept = bytes::BytesMut::new();
    while kept.len() < cap {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                let cut = format!("its body did not end within {timeout:?}");
                return (kept.freeze(), Some(cut));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return (kept.freeze(), Some(format!("its body broke off: {e}"))),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            let room = cap - kept.len();
            kept.extend_from_slice(&data[..data.len().min(room)]);
        }
    }
    (kept.freeze(), None)
}

#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpsConnector<Route>, Full<Bytes>>,
    timeout: Duration,
    route: Route,
}

/// The rustls configuration: system roots, plus `ca_file` (read again once changed), plus
/// the client certificate for mTLS.
pub fn tls_config(destination: &Destination) -> Result<rustls::ClientConfig, ClientError> {
    let system = rustls_native_certs::load_native_certs().certs;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let builder = match &destination.ca_file {
        None => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in system {
                let _ = roots.add(cert);
            }
            builder.with_root_certificates(roots)
        }
        Some(ca_file) => {
            let path = ca_file.clone();
            let verify = move |contents: &[Vec<u8>]| {
                let roots = roots_with("destination.ca_file", &path, &system, &contents[0])?;
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                    .build()
                    .map_err(|e| format!("destination.ca_file: {}: {e}", path.display()))
            };
            let followed = FollowedFiles::load(
                vec![("destination.ca_file", ca_file.clone())],
                verify,
                CA_FILE_SAID,
            )
            .map_err(ClientError::Config)?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(followed)
        }
    };
    let mut config = match &destination.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert_file, key_file)) => {
            let files = CertAndKeyFiles {
                cert: ("destination.client_cert_file", cert_file.clone()),
                key: ("destination.client_key_file", key_file.clone()),
            };
            let own = FollowedCertifiedKey::certified_key(files, |_, _| Ok(()))
                .map_err(ClientError::Config)?;
            builder.with_client_cert_resolver(own)
        }
    };
    if destination.ca_file.is_some() {
        // A resumed session is not verified again, and rustls resumes one under the same
        // verifier, which the followed CA file keeps: a CA taken out of the file would go on
        // being trusted for the sessions it verified. Connections are kept open and reused,
        // so a full handshake comes with a new connection only.
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(config)
}

/// How often an HTTP/2 connection is pinged, and how long its answer may take before the
/// connection is closed.
const HTTP2_PING_EVERY: Duration = Duration::from_secs(30);
const HTTP2_PING_TIMEOUT: Duration = Duration::from_secs(10);

impl HttpClient {
    pub fn new(destination: &Destination, timeout: Duration) -> Result<HttpClient, ClientError> {
        let route = Route::new(destination.proxy.as_ref(), timeout);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(destination)?)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(route.clone());
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            // Pinged while idle too, so that an HTTP/2 connection gone silent between
            // requests is closed before one is sent on it.
            .http2_keep_alive_interval(HTTP2_PING_EVERY)
            .http2_keep_alive_timeout(HTTP2_PING_TIMEOUT)
            .http2_keep_alive_while_idle(true)
            .build(connector);
        Ok(HttpClient {
            client,
            timeout,
            route,
        })
    }

    /// Sends the request and reads the answer, all within the timeout. Time out before a
    /// connection was ready (name, TCP, TLS) is [`ClientError::Connect`]: nothing was sent.
    /// Once the status has come, the answer is the endpoint's, whatever becomes of its body
    /// ([`Answer::body_cut`]).
    pub async fn send(&self, mut request: Request<Full<Bytes>>) -> Result<Answer, ClientError> {
        let connection = capture_connection(&mut request);
        let uri = request.uri().clone();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let response = match tokio::time::timeout_at(deadline, self.client.request(request)).await {
            Ok(response) => response.map_err(|e| request_error(&uri, &e, e.is_connect()))?,
            Err(_) if connection.connection_metadata().is_none() => {
                // The tunnel's own timeout, as long as this one, may not have fired first; or
                // the tunnel opened and TLS inside it did not finish.
                let through = match self.route.proxy_address(&uri) {
                    Some(address) => format!(": {}", tunnel_not_ready(address, &uri)),
                    // A server that takes the TCP connection and never answers the TLS
                    // handshake ends here too.
                    None if uri.scheme_str() == Some("https") => {
                        " (the TCP connection, or the TLS handshake after it, did not come)"
                            .to_owned()
                    }
                    None => String::new(),
                };
                return Err(ClientError::Connect(format!(
                    "no connection within {:?}{through}",
                    self.timeout
                )));
            }
            Err(_) => {
                // An HTTP/2 connection is shared and stays in the pool while its socket lives:
                // one gone silent (a path through a firewall that drops packets, a hung proxy)
                // would time out every request after this one too. An HTTP/1 one is dropped
                // with its request anyway.
                if let Some(connected) = connection.connection_metadata().as_ref() {
                    connected.poison();
                }
                return Err(ClientError::Timeout(self.timeout));
            }
        };
        let (parts, body) = response.into_parts();
        let (body, body_cut) = first_bytes(body, ANSWER_BYTES, deadline, self.timeout).await;
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
            body_cut,
        })
    }
}

/// Connects to `url`'s host as a request would (directly or through the proxy's tunnel), and
/// for an `https://` URL completes a TLS handshake with the destination's TLS settings,
/// sending no request (`outpost check`): the protocol version agreed (`None` for `http://`),
/// or what is wrong.
pub async fn probe_endpoint(
    destination: &Destination,
    url: &url::Url,
    timeout: Duration,
) -> Result<Option<String>, ClientError> {
    let host = url
        .host_str()
        .ok_or_else(|| ClientError::Transport(format!("{url} names no host")))?
        .trim_matches(['[', ']'])
        .to_owned();
    let port = url.port_or_known_default().unwrap_or(443);
    let server_name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| ClientError::Tls(format!("{host}: {e}")))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(destination)?));
    let mut route = Route::new(destination.proxy.as_ref(), timeout);
    let uri: hyper::Uri = url
        .as_str()
        .parse()
        .map_err(|e| ClientError::Transport(format!("{host}: {e}")))?;
    let not_ready = route
        .proxy_address(&uri)
        .map(|address| tunnel_not_ready(address, &uri));
    let exchange = async {
        use tower_service::Service;
        // Directly or through the proxy's tunnel, as requests connect.
        let tcp = route
            .call(uri.clone())
            .await
            .map_err(|e| request_error(&uri, &*e, true))?
            .into_inner();
        if url.scheme() != "https" {
            return Ok(None);
        }
        let tls = connector.connect(server_name, tcp).await.map_err(|e| {
            let explained = crate::explain::find_tls_error(&e)
                .and_then(|tls| crate::explain::tls_problem(&format!("{host}:{port}"), &host, tls));
            tracing::debug!(error = ?e, "TLS handshake with {host}:{port}");
            match explained {
                Some(message) => ClientError::Tls(message),
                None => ClientError::Tls(format!("TLS with {host}:{port}: {e}")),
            }
        })?;
        Ok(Some(
            tls.get_ref()
                .1
                .protocol_version()
                .map_or_else(|| "?".to_owned(), |v| format!("{v:?}")),
        ))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| match not_ready {
            // The tunnel's own timeout, as long as this one, may not have fired first.
            Some(not_ready) => {
                ClientError::Connect(format!("no connection within {timeout:?}: {not_ready}"))
            }
            None => ClientError::Timeout(timeout),
        })?
}

/// What a connection through the proxy that was not made in time says: the tunnel's own
/// timeout, as long as the request's, may not have fired first, or the tunnel opened and TLS
/// inside it did not finish.
fn tunnel_not_ready(address: &str, uri: &hyper::Uri) -> String {
    let tls = match uri.scheme_str() {
        Some("https") => ", or TLS inside it did not finish,",
        _ => "",
    };
    format!("the proxy at {address} (destination.proxy) did not open a tunnel{tls} in time")
}

/// A request that got no answer: a connection refused or a TLS problem explained (the whole
/// error in the debug log), else the error and its causes. `connect`: it failed while
/// connecting.
fn request_error(
    uri: &hyper::Uri,
    error: &(dyn std::error::Error + 'static),
    connect: bool,
) -> ClientError {
    let described = describe_error(error);
    let unexplained = |described| {
        if connect {
            ClientError::Connect(described)
        } else {
            ClientError::Transport(described)
        }
    };
    let host = uri.host().unwrap_or("?").trim_matches(['[', ']']);
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("http") {
            80
        } else {
            443
        });
    if let Some(proxy) = super::proxy::find_proxy_error(error) {
        tracing::debug!(error = %described, "connecting through the proxy failed");
        return ClientError::Connect(proxy.to_string());
    }
    // The host alone: the endpoint's query may carry a secret.
    if connect && crate::explain::connection_refused(error) {
        tracing::debug!(error = %described, "connecting to {host}:{port} failed");
        return ClientError::Connect(crate::explain::refused(&format!("{host}:{port}")));
    }
    let Some(tls) = crate::explain::find_tls_error(error) else {
        return unexplained(described);
    };
    tracing::debug!(error = %described, tls = ?tls, "TLS with {host}:{port} failed");
    match crate::explain::tls_problem(&format!("{host}:{port}"), host, tls) {
        Some(message) if connect => ClientError::Connect(message),
        Some(message) => ClientError::Tls(message),
        None => unexplained(described),
    }
}

/// The error and its causes on one line ("client error (Connect): tcp connect error: ...").
pub(super) fn describe_error(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn destination_of(url: &str) -> Destination {
        Destination {
            name: None,
            description: None,
            http_endpoint: url.parse().unwrap(),
            custom_headers: vec![],
            custom_headers_file: None,
            ca_file: None,
            client_cert: None,
            proxy: None,
            auth: crate::config::Auth::None,
        }
    }

    fn client_of(url: &str) -> HttpClient {
        HttpClient::new(&destination_of(url), Duration::from_secs(5)).unwrap()
    }

    fn post(url: &str) -> Request<Full<Bytes>> {
        Request::post(url)
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    }

    /// Whether the endpoint may have taken a request that got no answer: not when no
    /// connection was made, but when one was closed after the request was written.
    #[tokio::test]
    async fn a_refused_connection_sent_nothing_a_closed_one_may_have() {
        // Bound, not listening: the port stays this test's, and connecting is refused.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let url = format!("http://{}/", socket.local_addr().unwrap());
        let refused = client_of(&url).send(post(&url)).await.unwrap_err();
        assert!(matches!(refused, ClientError::Connect(_)), "{refused:?}");
        let address = socket.local_addr().unwrap();
        assert_eq!(
            refused.to_string(),
            format!("nothing accepts connections at {address} (connection refused)")
        );
        // So says `outpost check`'s handshake.
        let https = url.replace("http://", "https://");
        let destination = destination_of(&https);
        let shaken = probe_endpoint(
            &destination,
            &destination.http_endpoint,
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert_eq!(shaken.to_string(), refused.to_string());

        // Closed without an answer.
        let (url, server) = raw_endpoint(|_socket| async {}).await;
        let closed = client_of(&url).send(post(&url)).await.unwrap_err();
        assert!(matches!(closed, ClientError::Transport(_)), "{closed:?}");
        server.await.unwrap();
        drop(socket);
    }

    /// An `https://` URL of a server that speaks plain HTTP is told as such, whether a
    /// request or `outpost check`'s handshake meets it.
    #[tokio::test]
    async fn a_server_of_plain_http_named_by_an_https_url_is_told_so() {
        use tokio::io::AsyncWriteExt;
        for handshake in [false, true] {
            let (url, server) = raw_endpoint(|mut socket| async move {
                let answer = "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
                let _ = socket.write_all(answer.as_bytes()).await;
            })
            .await;
            let url = url.replace("http://", "https://");
            let client = client_of(&url);
            let error = match handshake {
                false => client.send(post(&url)).await.unwrap_err(),
                true => {
                    let destination = destination_of(&url);
                    let url = destination.http_endpoint.clone();
                    probe_endpoint(&destination, &url, Duration::from_secs(5))
                        .await
                        .unwrap_err()
                }
            };
            let error = error.to_string();
            assert!(
                error.contains("does not answer in TLS")
                    && error.contains("the URL must say http://"),
                "{error}"
            );
            server.await.unwrap();
        }
    }

    /// An endpoint that takes one connection, reads the request's first bytes, then hands the
    /// connection to `answer`; its URL.
    async fn raw_endpoint<F, Answering>(answer: F) -> (String, tokio::task::JoinHandle<()>)
    where
        F: FnOnce(tokio::net::TcpStream) -> Answering + Send + 'static,
        Answering: std::future::Future<Output = ()> + Send,
    {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await.unwrap();
            answer(socket).await;
        });
        (url, server)
    }

    /// Once the status has come, it is the answer, whether the body then stalls past the
    /// timeout or breaks off: a delivery answered 2xx was taken, and sending it again for a
    /// slow body would only repeat it.
    #[tokio::test]
    async fn an_answer_whose_body_stalls_or_breaks_off_keeps_its_status() {
        use tokio::io::AsyncWriteExt;
        for close in [false, true] {
            let (url, server) = raw_endpoint(move |mut socket| async move {
                let head = "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"ok\":";
                socket.write_all(head.as_bytes()).await.unwrap();
                if !close {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            })
            .await;
            let mut client = client_of(&url);
            client.timeout = Duration::from_millis(300);
            let answer = client.send(post(&url)).await.unwrap();
            assert_eq!(answer.status, StatusCode::OK);
            assert_eq!(&answer.body[..], b"{\"ok\":");
            let cut = answer.body_cut.expect("the body was cut");
            let expected = if close {
                "broke off"
            } else {
                "did not end within 300ms"
            };
            assert!(cut.contains(expected), "{cut}");
            server.abort();
        }
    }

    /// An answer's body is read up to [`ANSWER_BYTES`], however much the endpoint sends.
    #[tokio::test]
    async fn only_the_start_of_a_large_answer_is_read() {
        use crate::receiver::{Receiver, ReceiverOptions, Reply, PROFILES_PATH};
        let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), ReceiverOptions::default())
            .await
            .unwrap();
        let large = "x".repeat(3 * ANSWER_BYTES);
        receiver.set_export_script(Some(Arc::new(move |_, _| {
            Reply::Status(500, vec![], large.clone())
        })));
        let url = format!("{}{PROFILES_PATH}", receiver.base_url());
        let answer = client_of(&url).send(post(&url)).await.unwrap();
        assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(answer.body.len(), ANSWER_BYTES);
        assert!(answer.body.iter().all(|&b| b == b'x'));
    }

    /// A server that takes connections and never answers: over `https` the handshake never
    /// ends (nothing sent), over `http` the request is written and never answered.
    #[tokio::test]
    async fn a_timeout_before_a_connection_is_ready_sent_nothing() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        for (scheme, sent) in [("https", false), ("http", true)] {
            let url = format!("{scheme}://{address}/");
            let mut client = client_of(&url);
            client.timeout = Duration::from_millis(300);
            let error = client.send(post(&url)).await.unwrap_err();
            let timed_out = matches!(error, ClientError::Timeout(_));
            let not_connected = matches!(error, ClientError::Connect(_));
            assert_eq!(
                (timed_out, not_connected),
                (sent, !sent),
                "{scheme}: {error:?}"
            );
        }
        server.abort();
    }

    fn answer(body: &str) -> Answer {
        Answer {
            status: StatusCode::UNAUTHORIZED,
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_owned()),
            body_cut: None,
        }
    }

    #[test]
    fn secrets_echoed_in_a_body_are_hidden() {
        // (body, secrets, what is shown)
        let table: [(&str, &[&str], &str); 14] = [
            ("bad secret s3 cret!", &["s3 cret!"], "bad secret ***"),
            (
                "client_secret=s3+cret%21",
                &["s3 cret!"],
                "client_secret=***",
            ),
            ("no secret here", &["s3 cret!", ""], "no secret here"),
            ("token t0k and t0k", &["t0k"], "token *** and ***"),
            ("s3%20cret%21 s3%20cret%21", &["s3 cret!"], "*** ***"),
            (r#"{"echo":"a\/b\"c"}"#, &["a/b\"c"], r#"{"echo":"***"}"#),
            ("a%2fb a%2Fb", &["a/b"], "*** ***"),
            // A secret that holds another, whichever comes first.
            (
                "pw=hunter2x-prod id=hunter2x",
                &["hunter2x", "hunter2x-prod"],
                "pw=*** id=***",
            ),
            (
                "pw=hunter2x%2Fprod",
                &["hunter2x", "hunter2x/prod"],
                "pw=***",
            ),
            // Echoed in an HTML page, as Python, Go and PHP escape it.
            (
                "<p>bad secret: S3cr3t&amp;x=+y é&lt;z&gt;&quot;q&#x27;</p>",
                &["S3cr3t&x=+y é<z>\"q'"],
                "<p>bad secret: ***</p>",
            ),
            (
                "<p>S3cr3t&amp;x&#34;q&#39;</p>",
                &["S3cr3t&x\"q'"],
                "<p>***</p>",
            ),
            ("<p>a&lt;b&gt;c</p>", &["a<b>c"], "<p>***</p>"),
            (
                "<p>it&#039;s &quot;x&quot;</p>",
                &["it's \"x\""],
                "<p>***</p>",
            ),
            ("<p>it's &quot;x&quot;</p>", &["it's \"x\""], "<p>***</p>"),
        ];
        for (body, secrets, shown) in table {
            assert_eq!(answer(body).body_start_hiding(secrets), shown, "{body}");
        }
        // Encodings that are not cut out: the body is not shown at all.
        for (body, secret) in [
            ("client_secret=AbC/def%2Bghi9Kq%3D", "AbC/def+ghi9Kq="),
            (
                r#"{"echo":"p@ss w+rd/\u00e9\"SECRET"}"#,
                "p@ss w+rd/é\"SECRET",
            ),
            (r#"{"echo":"\ud83d\ude00-s3cret"}"#, "😀-s3cret"),
            ("pw=s3cr%c3%A9t%20two", "s3crét two"),
            ("<p>&#115;3cret &lt;2&#x3E;</p>", "s3cret <2>"),
            ("<p>s3cr&eacute;t</p>", "s3crét"),
        ] {
            assert_eq!(
                answer(body).body_start_hiding(&[secret]),
                WITHHELD_BODY,
                "{body}"
            );
        }
        let plain = "100% sure: a+b \\u00e9";
        assert_eq!(answer(plain).body_start_hiding(&["s3cret"]), plain);
        // Hidden before the body is cut, and cut on a character's boundary.
        let long = format!("{}é{}", "x".repeat(ERROR_BODY_BYTES - 1), "s3cret");
        let shown = answer(&long).body_start_hiding(&["s3cret"]);
        assert_eq!(shown, "x".repeat(ERROR_BODY_BYTES - 1));
        let cut = format!("{}s3cret", "x".repeat(ERROR_BODY_BYTES - 3));
        assert!(!answer(&cut).body_start_hiding(&["s3cret"]).contains("s3c"));
        // A large page: its start is searched, not all of it.
        let page = format!("s3cret {}", "y".repeat(8 << 20));
        let shown = answer(&page).body_start_hiding(&["s3cret"]);
        assert!(
            shown.starts_with("*** yyy") && shown.len() == ERROR_BODY_BYTES,
            "{}",
            shown.len()
        );
    }
}
