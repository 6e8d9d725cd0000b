//! An HTTP proxy that opens tunnels (`CONNECT host:port`), as corporate proxies do, on a real
//! socket: it records what it was asked for, and may require credentials.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct ConnectProxy {
    pub addr: SocketAddr,
    /// The `host:port` of each tunnel opened.
    pub tunnels: Arc<Mutex<Vec<String>>>,
    /// The `Proxy-Authorization` values of requests refused with 407.
    pub refused: Arc<Mutex<Vec<Option<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ConnectProxy {
    /// `credentials`: the `Proxy-Authorization` value required, if any.
    pub async fn start(credentials: Option<&str>) -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tunnels: Arc<Mutex<Vec<String>>> = Arc::default();
        let refused: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
        let required = credentials.map(str::to_owned);
        let (opened, denied) = (Arc::clone(&tunnels), Arc::clone(&refused));
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (opened, denied, required) =
                    (Arc::clone(&opened), Arc::clone(&denied), required.clone());
                tokio::spawn(async move {
                    let _ = tunnel(client, opened, denied, required).await;
                });
            }
        });
        ConnectProxy {
            addr,
            tunnels,
            refused,
            task,
        }
    }

    pub fn tunnels(&self) -> Vec<String> {
        self.tunnels.lock().unwrap().clone()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tunnel(
    mut client: TcpStream,
    opened: Arc<Mutex<Vec<String>>>,
    denied: Arc<Mutex<Vec<Option<String>>>>,
    required: Option<String>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte).await? == 0 || head.len() > 16 << 10 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let request = lines.next().unwrap_or("");
    let Some(target) = request
        .strip_prefix("CONNECT ")
        .and_then(|rest| rest.strip_suffix(" HTTP/1.1"))
    else {
        client
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    };
    let given = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("proxy-authorization"))
        .map(|(_, value)| value.trim().to_owned());
    if required.is_some() && given != required {
        denied.lock().unwrap().push(given);
        client
            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nproxy-authenticate: Basic realm=\"proxy\"\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    }
    let mut upstream = match TcpStream::connect(target).await {
        Ok(upstream) => upstream,
        Err(_) => {
            client
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                .await?;
            return Ok(());
        }
    };
    opened.lock().unwrap().push(target.to_owned());
    client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}
