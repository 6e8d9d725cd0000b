//! How long an ingest connection lives. A connection that brings no request to the service
//! within `read_timeout` of opening is dropped; one that has had no request open for
//! `read_timeout` since its last one ended is closed gracefully (HTTP/2: GOAWAY), so that an
//! idle connection does not keep its place under `ingest.max_connections`; at shutdown every
//! connection is closed gracefully, letting its open requests finish. A connection one of whose
//! requests was refused for its token is closed once its open requests are answered, so that
//! clients without the token cannot keep the places of those with it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a connection's requests are doing, shared between its service and [`drive`].
pub struct Activity {
    opened: Instant,
    open_requests: AtomicUsize,
    requested: AtomicBool,
    /// When the last request ended, in milliseconds since `opened`.
    last_ended_ms: AtomicU64,
    /// Set (and `close_asked` woken) when the connection is to be closed.
    close_wanted: AtomicBool,
    close_asked: tokio::sync::Notify,
}

/// Held while a request is being served.
pub struct OpenRequest(Arc<Activity>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        let activity = &self.0;
        let ended = activity.opened.elapsed().as_millis() as u64;
        // Before the count falls, so that whoever sees it at zero also sees when it fell.
        activity.last_ended_ms.fetch_max(ended, Ordering::Release);
        activity.open_requests.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            opened: Instant::now(),
            open_requests: AtomicUsize::new(0),
            requested: AtomicBool::new(false),
            last_ended_ms: AtomicU64::new(0),
            close_wanted: AtomicBool::new(false),
            close_asked: tokio::sync::Notify::new(),
        })
    }

    /// Has [`drive`] close the connection gracefully: HTTP/1 once the answer being sent is
    /// written, HTTP/2 with GOAWAY, its open requests left to finish.
    pub fn close_when_answered(&self) {
        self.close_wanted.store(true, Ordering::Release);
        self.close_asked.notify_one();
    }

    /// Called as a request reaches the service; the request is open until the guard drops.
    pub fn request_started(self: &Arc<Self>) -> OpenRequest {
        self.open_requests.fetch_add(1, Ordering::AcqRel);
        self.requested.store(true, Ordering::Release);
        OpenRequest(Arc::clone(self))
    }

    /// When the connection is due to be closed if nothing happens meanwhile: `read_timeout`
    /// after it opened (no request yet) or after its last request ended; `None` while a
    /// request is open.
    fn due(&self, read_timeout: Duration) -> Option<Instant> {
        if self.open_requests.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.last_ended_ms.load(Ordering::Acquire));
        Some(self.opened + since + read_timeout)
    }
}

/// Serves `connection` until it ends, closing it with `close` (its `graceful_shutdown`) once it
/// has been idle for `read_timeout` or at `shutdown`, and dropping it if no request came
/// within `read_timeout` of opening: hyper waits without a timeout for the bytes that tell
/// HTTP/1 from HTTP/2, and for HTTP/2's preface, so a client sending nothing, or part of them,
/// would hold it. A connection asked to close is dropped once it has had no request open for
/// `read_timeout` (counted from when it was asked at the earliest) and still has not ended;
/// requests still open are left to their own timeouts, and at shutdown to the drain's.
///
/// hyper calls the service only from within the connection's poll, on this task, so no
/// request can begin between the connection's poll and the timer's look at `activity`.
pub async fn drive<C, E>(
    connection: C,
    close: impl Fn(Pin<&mut C>),
    activity: &Activity,
    read_timeout: Duration,
    shutdown: &CancellationToken,
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    tokio::pin!(connection);
    // When it was asked to close.
    let mut closing: Option<Instant> = None;
    let due = |closing: Option<Instant>| match activity.due(read_timeout) {
        Some(idle) => closing.map_or(idle, |asked| idle.max(asked + read_timeout)),
        // A request is open: look again later.
        None => Instant::now() + read_timeout,
    };
    loop {
        tokio::select! {
            // The connection first: a request that came as the timer fired counts.
            biased;
            served = &mut connection => return served,
            () = shutdown.cancelled(), if closing.is_none() => {
                close(connection.as_mut());
                closing = Some(Instant::now());
            }
            () = activity.close_asked.notified(), if closing.is_none() => {
                if activity.close_wanted.load(Ordering::Acquire) {
                    close(connection.as_mut());
                    closing = Some(Instant::now());
                }
            }
            () = tokio::time::sleep_until(due(closing)) => {
                let idle = activity.due(read_timeout).is_some() && due(closing) <= Instant::now();
                if !idle {
                    continue;
                }
                if closing.is_some() {
                    tracing::debug!("an ingest connection asked to close did not in time");
                    return Ok(());
                }
                if !activity.requested.load(Ordering::Acquire) {
                    tracing::debug!("an ingest connection sent no request in time");
                    return Ok(());
                }
                tracing::debug!("closing an idle ingest connection");
                close(connection.as_mut());
                closing = Some(Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::Notify;

    const TIMEOUT: Duration = Duration::from_secs(30);

    /// Drives a stand-in connection that ends when asked to close if `obeys`; returns when
    /// [`drive`] returned and when it asked the connection to close, both since the start.
    async fn run(
        activity: &Activity,
        shutdown: &CancellationToken,
        obeys: bool,
    ) -> (Duration, Option<Duration>) {
        let start = Instant::now();
        let closed = Notify::new();
        let asked = std::sync::Mutex::new(None);
        let connection = async {
            closed.notified().await;
            Ok::<(), ()>(())
        };
        let close = |_: Pin<&mut _>| {
            *asked.lock().unwrap() = Some(start.elapsed());
            if obeys {
                closed.notify_one();
            }
        };
        drive(connection, close, activity, TIMEOUT, shutdown)
            .await
            .unwrap();
        let asked = *asked.lock().unwrap();
        (start.elapsed(), asked)
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_is_dropped_after_the_timeout() {
        let (ended, asked) = run(&Activity::new(), &CancellationToken::new(), true).await;
        assert_eq!((ended, asked), (TIMEOUT, None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_closed_once_idle_for_the_timeout_after_its_last_request() {
        let activity = Activity::new();
        let open = activity.request_started();
        let ends_later = {
            let activity = Arc::clone(&activity);
            async move {
                // A request open past several timeouts, then a second one after it.
                tokio::time::sleep(TIMEOUT * 3).await;
                drop(open);
                tokio::time::sleep(TIMEOUT / 2).await;
                drop(activity.request_started());
            }
        };
        let shutdown = CancellationToken::new();
        let (driven, ()) = tokio::join!(run(&activity, &shutdown, true), ends_later);
        let last_ended = TIMEOUT * 3 + TIMEOUT / 2;
        assert_eq!(driven, (last_ended + TIMEOUT, Some(last_ended + TIMEOUT)));
    }

    #[tokio::test(start_paused = true)]
    async fn at_shutdown_a_busy_connection_is_asked_to_close_at_once() {
        let activity = Activity::new();
        let _open = activity.request_started();
        let shutdown = CancellationToken::new();
        let stop = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            shutdown.cancel();
        };
        let (driven, ()) = tokio::join!(run(&activity, &shutdown, true), stop);
        let at = Duration::from_secs(5);
        assert_eq!(driven, (at, Some(at)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_asked_to_close_is_dropped_only_once_idle_for_the_timeout() {
        let activity = Activity::new();
        let open = activity.request_started();
        let shutdown = CancellationToken::new();
        let stop_then_end = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            shutdown.cancel();
            tokio::time::sleep(TIMEOUT * 2).await;
            drop(open);
        };
        let (driven, ()) = tokio::join!(run(&activity, &shutdown, false), stop_then_end);
        let (asked, ended) = (Duration::from_secs(5), Duration::from_secs(5) + TIMEOUT * 2);
        assert_eq!(driven, (ended + TIMEOUT, Some(asked)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_does_not_close_when_asked_is_dropped() {
        let activity = Activity::new();
        drop(activity.request_started());
        let (ended, asked) = run(&activity, &CancellationToken::new(), false).await;
        assert_eq!((ended, asked), (TIMEOUT * 2, Some(TIMEOUT)));
    }
}
