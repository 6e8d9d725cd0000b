//! `outpost top`: a live view of a running agent, read through its admin socket (the admin
//! `snapshot` request) once per interval. The figures and the layout are pure ([`crate::top`]);
//! this is the socket, the terminal and the keys.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

use super::backend::{call_agent, AGENT_TIMEOUT};
use super::CliError;
use crate::admin::AdminRequest;
use crate::config::{Auth, Config};
use crate::top::layout::{draw, HISTORY_POINTS};
use crate::top::view::{plain, view, AuthKind, History, Snapshot, View};

pub(super) fn top(config: &Config, once: bool, interval_s: f64) -> Result<(), CliError> {
    if !(0.1..=60.0).contains(&interval_s) {
        return Err(CliError::Usage(
            "--interval must be between 0.1 and 60 seconds".into(),
        ));
    }
    let interval = Duration::from_secs_f64(interval_s);
    let socket = crate::server::admin::socket_path(&config.storage.path);
    if !super::Backend::agent_answers(config)? {
        return Err(CliError::Failure(format!(
            "no agent is running on the store at {} (nothing answers on {}); \
             `outpost top` shows a running agent: start it with `outpost run` (or check \
             storage.path in {})",
            config.storage.path.display(),
            socket.display(),
            config.path.display()
        )));
    }
    if !once && !std::io::stdout().is_terminal() {
        return Err(CliError::Usage(
            "`outpost top` needs a terminal; `outpost top --once` prints one plain-text frame"
                .into(),
        ));
    }
    let auth = match config.destination.auth {
        Auth::None => AuthKind::None,
        Auth::Bearer { .. } => AuthKind::Bearer,
        Auth::OAuth2 { .. } => AuthKind::OAuth2,
    };
    let store = config.storage.path.display().to_string();
    let started = Instant::now();
    let first = snapshot(&socket, started, AGENT_TIMEOUT).map_err(CliError::Failure)?;
    let mut history = History::new(HISTORY_POINTS);
    history.push(&first);
    if once {
        std::thread::sleep(interval);
        let second = snapshot(&socket, started, AGENT_TIMEOUT).map_err(CliError::Failure)?;
        history.push(&second);
        out!("{}", plain(&view(&first, &second, &history, auth, &store)))?;
        return Ok(());
    }
    let snapshots = take_snapshots(socket, started, interval);
    stop_on_signals()
        .map_err(|e| CliError::Failure(format!("cannot set up the signal handlers: {e}")))?;
    // Raw mode may be on when a later step of the set-up fails.
    let mut terminal = ratatui::try_init().map_err(|e| {
        ratatui::restore();
        CliError::Failure(format!("cannot set up the terminal: {e}"))
    })?;
    let first_view = view(&first, &first, &history, auth, &store);
    let result = live(
        &mut terminal,
        first,
        first_view,
        history,
        |p, c, h| view(p, c, h, auth, &store),
        &snapshots,
    );
    ratatui::restore();
    result
}

/// One snapshot from the agent, timed on this process's monotonic clock.
fn snapshot(socket: &Path, started: Instant, timeout: Duration) -> Result<Snapshot, String> {
    let answer =
        call_agent(socket, &AdminRequest::Snapshot, Some(timeout)).map_err(|e| e.to_string())?;
    Snapshot::from_answer(started.elapsed().as_secs_f64(), &answer)
}

/// How long the live view waits for one snapshot before it says the agent does not answer:
/// twice the interval, at least 2 s (an agent busy with a large store call answers late).
fn snapshot_timeout(interval: Duration) -> Duration {
    (interval * 2).clamp(Duration::from_secs(2), AGENT_TIMEOUT)
}

/// Takes a snapshot every `interval` on a thread of its own, so that a hung agent never
/// keeps the view from reading keys; ends when the receiver is dropped (the thread may still
/// be waiting for an answer then, which the process's exit ends).
fn take_snapshots(
    socket: std::path::PathBuf,
    started: Instant,
    interval: Duration,
) -> Receiver<Result<Snapshot, String>> {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let timeout = snapshot_timeout(interval);
        let mut next = Instant::now() + interval;
        loop {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            next = Instant::now() + interval;
            if sender.send(snapshot(&socket, started, timeout)).is_err() {
                return;
            }
        }
    });
    receiver
}

/// Set by SIGTERM, SIGHUP, SIGINT or SIGQUIT while the live view runs, so that it gives the
/// terminal back as it found it before exiting (killed at once, it would leave it in raw mode).
/// In raw mode Ctrl-C is a key; SIGINT comes from another process (`kill -INT`, `timeout`).
static STOP_ASKED: AtomicBool = AtomicBool::new(false);

extern "C" fn ask_to_stop(_signal: libc::c_int) {
    STOP_ASKED.store(true, Ordering::SeqCst);
}

fn stop_on_signals() -> std::io::Result<()> {
    for signal in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGQUIT] {
        // SAFETY: the handler only stores to an atomic, which a signal handler may do.
        let previous =
            unsafe { libc::signal(signal, ask_to_stop as *const () as libc::sighandler_t) };
        if previous == libc::SIG_ERR {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// How often the view looks for a key while it waits for the next snapshot.
const KEY_POLL: Duration = Duration::from_millis(100);

/// Draws, then reads keys and snapshots as they come; until `q`, Esc, Ctrl-C, SIGTERM or
/// SIGHUP. A resize is drawn at once. While the agent does not answer, the last figures stay
/// on screen under a notice, and each interval tries again.
fn live(
    terminal: &mut ratatui::DefaultTerminal,
    first: Snapshot,
    mut shown: View,
    mut history: History,
    make_view: impl Fn(&Snapshot, &Snapshot, &History) -> View,
    snapshots: &Receiver<Result<Snapshot, String>>,
) -> Result<(), CliError> {
    let failed = |e: std::io::Error| CliError::Failure(format!("terminal: {e}"));
    let mut previous = first;
    let mut changed = true;
    loop {
        if STOP_ASKED.load(Ordering::SeqCst) {
            return Ok(());
        }
        if changed {
            terminal.draw(|frame| draw(frame, &shown)).map_err(failed)?;
            changed = false;
        }
        if event::poll(KEY_POLL).map_err(failed)? {
            if let Event::Key(key) = event::read().map_err(failed)? {
                let quit = key.kind == KeyEventKind::Press
                    && (matches!(key.code, KeyCode::Char('q') | KeyCode::Esc)
                        || (key.code == KeyCode::Char('c')
                            && key.modifiers.contains(KeyModifiers::CONTROL)));
                if quit {
                    return Ok(());
                }
            }
            // A resize (or any other event) is drawn again.
            changed = true;
        }
        // Every snapshot that came, so that none waits behind the others however often
        // they come.
        loop {
            match snapshots.try_recv() {
                Ok(Ok(current)) => {
                    history.push(&current);
                    shown = make_view(&previous, &current, &history);
                    previous = current;
                }
                Ok(Err(e)) => {
                    shown.notice = Some(format!(
                        "no answer from the agent at {}: {e}",
                        chrono::Local::now().format("%H:%M:%S")
                    ));
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    return Err(CliError::Failure(
                        "the thread taking the agent's snapshots ended".into(),
                    ))
                }
            }
            changed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_waits_twice_the_interval_and_at_least_two_seconds() {
        for (interval_ms, want_ms) in [
            (100, 2_000),
            (1_000, 2_000),
            (5_000, 10_000),
            (60_000, 120_000),
        ] {
            assert_eq!(
                snapshot_timeout(Duration::from_millis(interval_ms)),
                Duration::from_millis(want_ms),
                "interval {interval_ms} ms"
            );
        }
    }
}
