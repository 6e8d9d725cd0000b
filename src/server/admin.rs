//! The agent's admin API on a Unix socket in the store folder (mode 0600): one JSON request
//! line in, one JSON answer line out, per connection. The CLI uses it while the agent runs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::admin::{execute, AdminAnswer, AdminError, AdminRequest, OUTBOX_FULL, SOCKET_NAME};
use crate::metrics::Metrics;
use crate::profile::update::{update_from_value_with, FutureLimit};
use crate::store::committer::Committer;
use crate::store::Store;

pub struct AdminState {
    pub store: Arc<Store>,
    pub committer: Committer,
    pub metrics: Arc<Metrics>,
    /// Notified after a repair, so the delivery loop sees exports put back at once.
    pub wake: Arc<Notify>,
    pub max_outbox_bytes: u64,
    /// `ingest.max_future_s`, checked again on the agent's clock.
    pub max_future_s: u64,
}

pub fn socket_path(store_path: &Path) -> PathBuf {
    store_path.join(SOCKET_NAME)
}

/// Binds the socket, replacing a stale one (this process holds the store's lock, so no other
/// agent can be using it), readable and writable by the owner only.
pub fn bind(store_path: &Path) -> std::io::Result<UnixListener> {
    let path = socket_path(store_path);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let state = Arc::clone(&state);
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, &state).await {
                            tracing::debug!(error = %e, "admin connection ended with an error");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "admin accept failed"),
            },
            _ = shutdown.cancelled() => break,
        }
    }
    if let Ok(addr) = listener.local_addr() {
        if let Some(path) = addr.as_pathname() {
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn answer(stream: UnixStream, state: &Arc<AdminState>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    if BufReader::new(read).read_line(&mut line).await? == 0 {
        return Ok(()); // a probe: the CLI checking that the agent answers
    }
    let result = match serde_json::from_str::<AdminRequest>(&line) {
        Err(e) => Err(AdminError::Usage(format!("bad admin request: {e}"))),
        Ok(AdminRequest::Ingest { updates }) => ingest(state, updates).await,
        Ok(AdminRequest::Snapshot) => snapshot(state).await,
        Ok(request) => {
            let repairs = request.repairs();
            let stats = request == AdminRequest::Stats;
            let state = Arc::clone(state);
            let metrics = Arc::clone(&state.metrics);
            let result = tokio::task::spawn_blocking(move || {
                let result = execute(&state.store, &request);
                if repairs {
                    state.wake.notify_one();
                }
                result
            })
            .await
            .unwrap_or_else(|e| Err(AdminError::Failed(e.to_string())));
            match result {
                Ok(mut value) if stats => {
                    add_delivery_state(&mut value, &metrics);
                    Ok(value)
                }
                other => other,
            }
        }
    };
    let mut text =
        serde_json::to_string(&AdminAnswer::from_result(result)).expect("answers serialize");
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    write.shutdown().await
}

/// What only the running delivery loop knows, added to `outbox stats`.
fn add_delivery_state(stats: &mut serde_json::Value, metrics: &Metrics) {
    stats["waiting_for_retry"] = metrics.retry_waiting.get().into();
    stats["in_flight"] = metrics.in_flight.get().into();
    stats["concurrency_limit"] = metrics.concurrency_limit.get().into();
    stats["rate_cap_per_s"] = metrics.rate_cap.get().into();
    stats["destination_down"] = (metrics.destination_down.get() == 1).into();
}

/// The figures of `outpost top`: the `/metrics` text (outbox gauges set first, as a scrape
/// does), the outbox stats with the delivery state, and the token's remaining lifetime.
async fn snapshot(state: &Arc<AdminState>) -> Result<serde_json::Value, AdminError> {
    let store = Arc::clone(&state.store);
    let stats = tokio::task::spawn_blocking(move || store.outbox_stats(chrono::Utc::now()))
        .await
        .map_err(|e| AdminError::Failed(e.to_string()))??;
    state.metrics.set_outbox(&stats);
    let mut stats = serde_json::to_value(&stats).expect("stats serialize");
    add_delivery_state(&mut stats, &state.metrics);
    Ok(serde_json::json!({
        "metrics": state.metrics.render(),
        "stats": stats,
        "token_expires_in_s": state.metrics.token_expiry.remaining_s(),
    }))
}

async fn ingest(
    state: &AdminState,
    values: Vec<serde_json::Value>,
) -> Result<serde_json::Value, AdminError> {
    let limit = FutureLimit {
        now: chrono::Utc::now(),
        max_future_s: state.max_future_s,
    };
    let parsing = state.committer.parsing(limit);
    let sent = values.len();
    // The CLI checked every update with its own config first: one refused here is judged
    // differently by the agent (a stricter `ingest.max_future_s`, a clock stepped back), and
    // the CLI may have stored earlier chunks, which it says.
    let updates = values
        .into_iter()
        .enumerate()
        .map(|(i, value)| update_from_value_with(value, i as u64 + 1, &parsing))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            AdminError::Failed(format!(
                "the agent refused update {} of the {sent} sent together: {}",
                e.line, e.reason
            ))
        })?;
    if state.store.outbox_full(state.max_outbox_bytes)? {
        return Err(AdminError::Failed(OUTBOX_FULL.into()));
    }
    let summary = state
        .committer
        .commit(updates)
        .await
        .map_err(|e| AdminError::Failed(e.to_string()))?;
    state.metrics.record_commit(&summary);
    Ok(summary.report())
}
