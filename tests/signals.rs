//! `outpost run` stops gracefully on SIGTERM however early the signal comes: the handler is
//! installed when `termination_signal` is called, before the agent starts serving, not when
//! the stop task first runs. (Its own test binary: the signal goes to this process.)

use std::time::Duration;

use outpost::agent::termination_signal;

#[tokio::test]
async fn a_sigterm_before_the_wait_begins_is_caught_not_fatal() {
    let terminated = termination_signal();
    // SAFETY: raise(3) of a signal whose handler was installed above.
    assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
    tokio::time::timeout(Duration::from_secs(5), terminated)
        .await
        .expect("the SIGTERM raised before the wait resolves it");
}
