//! `destination.proxy`: connections to the endpoint and the token endpoint through an HTTP
//! proxy's tunnel (`CONNECT host:port`), for hosts whose only way out is such a proxy. TLS
//! with an `https://` endpoint runs inside the tunnel, so the proxy sees neither requests nor
//! tokens; only the proxy's own credentials go to it, in `Proxy-Authorization`. Hosts that
//! `destination.no_proxy` lists are reached directly.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use super::client::describe_error;
use crate::config::Proxy;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// hyper-util's tunnel error, which it does not export by name.
type TunnelError = <Tunnel<HttpConnector> as Service<Uri>>::Error;

/// Why a connection through the proxy could not be made, worded for people: the proxy's
/// address, never its credentials.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProxyError(pub String);

/// Connects straight to a host, or through the proxy's tunnel.
#[derive(Clone)]
pub struct Route {
    direct: HttpConnector,
    proxy: Option<Arc<Through>>,
}

struct Through {
    /// `destination.no_proxy` as curl reads `NO_PROXY`; every other host goes through.
    matcher: Matcher,
    tunnel: Tunnel<HttpConnector>,
    /// `host:port` of the proxy, for messages.
    address: String,
    /// How long the proxy may take to connect and open a tunnel: the connect timeout.
    within: Duration,
}

impl Route {
    /// `within`: how long making a connection may take, through the proxy as directly.
    pub fn new(proxy: Option<&Proxy>, within: Duration) -> Route {
        let mut direct = HttpConnector::new();
        direct.enforce_http(false);
        direct.set_nodelay(true);
        direct.set_connect_timeout(Some(within));
        let proxy = proxy.and_then(|proxy| {
            let matcher = proxy.matcher()?;
            let proxy_uri: Uri = proxy
                .url
                .as_str()
                .parse()
                .expect("checked to be a URI when the config was loaded");
            let mut tunnel = Tunnel::new(proxy_uri, direct.clone());
            if let Some((user, password)) = &proxy.credentials {
                tunnel = tunnel.with_auth(basic_credentials(user, password.expose()));
            }
            Some(Arc::new(Through {
                matcher,
                tunnel,
                address: proxy.address(),
                within,
            }))
        });
        Route { direct, proxy }
    }

    /// The proxy, when a connection to `uri` goes through it.
    fn through(&self, uri: &Uri) -> Option<&Through> {
        self.proxy
            .as_deref()
            .filter(|p| p.matcher.intercept(uri).is_some())
    }

    /// The proxy's `host:port`, when a connection to `uri` goes through it.
    pub fn proxy_address(&self, uri: &Uri) -> Option<&str> {
        self.through(uri).map(|p| p.address.as_str())
    }
}

/// `Proxy-Authorization: Basic …` of the proxy's user and password.
fn basic_credentials(user: &str, password: &str) -> hyper::header::HeaderValue {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut value = hyper::header::HeaderValue::from_str(&format!("Basic {encoded}"))
        .expect("base64 is a valid header value");
    value.set_sensitive(true);
    value
}

/// `uri` with its port written out: the tunnel asks for port 443 when the URI names none,
/// which an `http://` endpoint does not listen on.
fn with_port(uri: Uri) -> Uri {
    if uri.port().is_some() {
        return uri;
    }
    let port = if uri.scheme_str() == Some("http") {
        80
    } else {
        443
    };
    let Some(host) = uri.host() else {
        return uri;
    };
    let mut parts = uri.clone().into_parts();
    match format!("{host}:{port}").parse() {
        Ok(authority) => {
            parts.authority = Some(authority);
            Uri::from_parts(parts).unwrap_or(uri)
        }
        Err(_) => uri,
    }
}

/// What a failed tunnel means, worded for people (the cause's whole chain for what is not
/// the proxy's answer).
fn tunnel_failed(address: &str, target: &Uri, error: TunnelError) -> ProxyError {
    let target = target.authority().map_or("?", |a| a.as_str());
    let proxy = format!("the proxy at {address} (destination.proxy)");
    ProxyError(match error {
        TunnelError::ProxyAuthRequired => format!(
            "{proxy} asks for credentials (407): give them in its URL, \
             http://user:password@host:port, or check the ones given"
        ),
        TunnelError::TunnelUnsuccessful => format!(
            "{proxy} did not open a tunnel to {target}: it did not answer CONNECT with 200 (its \
             rules refuse it, many proxies allowing port 443 alone; it cannot reach {target}; \
             or what answers there is no HTTP proxy: check the port)"
        ),
        TunnelError::ConnectFailed(e) if crate::explain::connection_refused(&*e) => {
            format!("cannot reach {proxy}: {}", crate::explain::refused(address))
        }
        TunnelError::ConnectFailed(e) => {
            format!("cannot reach {proxy}: {}", describe_error(&*e))
        }
        TunnelError::TunnelUnexpectedEof => {
            format!("{proxy} closed the connection instead of opening a tunnel to {target}")
        }
        other => format!(
            "{proxy} did not open a tunnel to {target}: {}",
            describe_error(&other)
        ),
    })
}

impl Service<Uri> for Route {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // HttpConnector and Tunnel are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        match self.through(&dst) {
            Some(through) => {
                let mut tunnel = through.tunnel.clone();
                let (address, within) = (through.address.clone(), through.within);
                let dst = with_port(dst);
                Box::pin(async move {
                    // A proxy that takes the connection and then says nothing (waiting on
                    // its own way to the host) would hold it beyond any request's timeout.
                    match tokio::time::timeout(within, tunnel.call(dst.clone())).await {
                        Ok(opened) => opened.map_err(|e| tunnel_failed(&address, &dst, e).into()),
                        Err(_) => Err(ProxyError(format!(
                            "the proxy at {address} (destination.proxy) did not open a tunnel to {} within {within:?}",
                            dst.authority().map_or("?", |a| a.as_str())
                        ))
                        .into()),
                    }
                })
            }
            None => {
                let connecting = self.direct.call(dst);
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
        }
    }
}

/// The first [`ProxyError`] in an error's chain.
pub fn find_proxy_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a ProxyError> {
    crate::explain::find_cause(error, |_| true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tunnel_is_asked_for_the_port_the_endpoint_listens_on() {
        for (uri, wanted) in [
            ("https://api.example.com/v1?x=1", "api.example.com:443"),
            ("http://api.example.com/v1", "api.example.com:80"),
            ("https://api.example.com:8443/v1", "api.example.com:8443"),
            ("http://[::1]/v1", "[::1]:80"),
        ] {
            let with = with_port(uri.parse().unwrap());
            assert_eq!(with.authority().unwrap().as_str(), wanted, "{uri}");
            assert_eq!(
                with.path_and_query(),
                uri.parse::<Uri>().unwrap().path_and_query()
            );
        }
    }

    #[test]
    fn hosts_no_proxy_lists_are_reached_directly() {
        let proxy = Proxy {
            url: "http://proxy.internal:3128".parse().unwrap(),
            credentials: None,
            no_proxy: "localhost, .corp.example, 10.0.0.0/8".into(),
        };
        let route = Route::new(Some(&proxy), Duration::from_secs(1));
        for (uri, through) in [
            ("https://api.example.com/v1", true),
            ("http://api.example.com/v1", true),
            ("https://localhost:8443/", false),
            ("https://auth.corp.example/token", false),
            ("https://corp.example/token", false),
            ("https://notcorp.example/token", true),
            ("https://10.1.2.3/", false),
            ("https://11.1.2.3/", true),
        ] {
            assert_eq!(
                route.proxy_address(&uri.parse().unwrap()).is_some(),
                through,
                "{uri}"
            );
        }
        let direct = Route::new(None, Duration::from_secs(1));
        assert!(direct
            .proxy_address(&"https://api.example.com/".parse().unwrap())
            .is_none());
        // `*` takes every host off the proxy, IP addresses too.
        let none = Proxy {
            no_proxy: "*".into(),
            ..proxy
        };
        let all_direct = Route::new(Some(&none), Duration::from_secs(1));
        for uri in [
            "https://api.example.com/",
            "https://10.0.0.5/",
            "https://[::1]:8443/",
        ] {
            assert!(
                all_direct.proxy_address(&uri.parse().unwrap()).is_none(),
                "{uri}"
            );
        }
    }

    #[test]
    fn the_proxys_credentials_go_in_basic_form() {
        let value = basic_credentials("ops", "s3cr:t");
        assert_eq!(value.to_str().unwrap(), "Basic b3BzOnMzY3I6dA==");
        assert!(value.is_sensitive());
    }
}
