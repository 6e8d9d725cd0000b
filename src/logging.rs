//! tracing set-up: human or JSON lines on stderr; level from `--log-level`, else `$OUTPOST_LOG`,
//! else the command's default.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// The levels a filter may name.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Targets that log, which a filter may name alone (all their events): outpost and the crates
/// beneath it.
const TARGETS: [&str; 10] = [
    "outpost",
    "async_nats",
    "hyper",
    "hyper_util",
    "hyper_rustls",
    "h2",
    "rustls",
    "sled",
    "tokio",
    "mio",
];

/// Panics are logged as every other failure is, through the log set up by [`init`]: in one
/// line, JSON with `--log-format json`, control characters escaped, rather than as raw text
/// a pipeline reading JSON cannot parse. The backtrace goes with it when `RUST_BACKTRACE`
/// asks for one. Where the log would not show it (its filter leaves errors out), or should
/// logging itself panic, Rust's own hook says it.
pub fn log_panics() {
    let rust_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        thread_local! {
            static IN_HOOK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        }
        if CALLER_SAYS_IT.with(std::cell::Cell::get) {
            return;
        }
        if IN_HOOK.with(std::cell::Cell::get) || !tracing::enabled!(tracing::Level::ERROR) {
            rust_hook(info);
            return;
        }
        IN_HOOK.with(|in_hook| in_hook.set(true));
        let message = panic_message(info.payload());
        let location = info.location().map(ToString::to_string).unwrap_or_default();
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            tracing::error!(panic = %message, location, thread, %backtrace, "outpost panicked");
        } else {
            tracing::error!(panic = %message, location, thread, "outpost panicked");
        }
        IN_HOOK.with(|in_hook| in_hook.set(false));
    }));
}

/// The message a panic was raised with, when it has one.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

thread_local! {
    /// Set while [`panic_said_by_caller`] runs its work.
    static CALLER_SAYS_IT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `work`, catching a panic of it without logging it: the caller says what it means
/// (sled panicking on damaged files, say, is an error of the store's, not a bug to report).
pub fn panic_said_by_caller<R>(work: impl FnOnce() -> R) -> std::thread::Result<R> {
    let before = CALLER_SAYS_IT.with(|says| says.replace(true));
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
    CALLER_SAYS_IT.with(|says| says.set(before));
    ran
}

/// Sets up logging; refuses a filter with a word alone that is neither a level nor a target
/// that logs (a level mistyped, `warnig`, reads as a target's name and hides every line).
pub fn init(format: LogFormat, level: Option<&str>, default: &str) -> Result<(), String> {
    // Empty (as `Environment=OUTPOST_LOG=` leaves it) is unset.
    let (from_env, not_utf8) = match std::env::var("OUTPOST_LOG") {
        Ok(text) => (Some(text).filter(|text| !text.trim().is_empty()), false),
        Err(std::env::VarError::NotUnicode(_)) => (None, level.is_none()),
        Err(std::env::VarError::NotPresent) => (None, false),
    };
    let (filter, given_as) = match (level, &from_env) {
        (Some(level), _) => (Some(level), "--log-level"),
        (None, Some(text)) => (Some(text.as_str()), "OUTPOST_LOG"),
        (None, None) => (None, ""),
    };
    if let Some(word) = filter.and_then(unknown_word) {
        return Err(format!(
            "{given_as}: `{word}` is neither a level ({}) nor a target outpost knows ({}); for another target, give its level: `{word}=debug`",
            LEVELS.join(", "),
            TARGETS.join(", ")
        ));
    }
    // One that cannot be read leaves the default, and says so once logging is set up.
    let mut unreadable = not_utf8.then(|| "it is not UTF-8".to_owned());
    let filter = match (level, &from_env) {
        // Given on the command line, as the words above are: refused, not set aside.
        (Some(level), _) => {
            EnvFilter::try_new(level).map_err(|e| format!("--log-level `{level}`: {e}"))?
        }
        (None, Some(text)) => EnvFilter::try_new(text).unwrap_or_else(|e| {
            unreadable = Some(e.to_string());
            EnvFilter::new(default)
        }),
        (None, None) => EnvFilter::new(default),
    };
    use tracing_subscriber::filter::FilterExt;
    use tracing_subscriber::layer::{Layer, SubscriberExt};
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = filter.and(SeldomRepeated::default());
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        // A line that cannot be written (its reader gone, journald restarted) is lost, rather
        // than said with `eprintln!`, which panics on the same broken stderr: an agent would
        // stop for its log, and a panic logged through it abort.
        .log_internal_errors(false)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(layer.fmt_fields(EscapedFields).with_filter(filter))
            .try_init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(layer.json().with_filter(filter))
            .try_init(),
    };
    if let Some(error) = unreadable {
        tracing::warn!(%error, "OUTPOST_LOG cannot be read; logging at the default level");
    }
    Ok(())
}

/// How often a line of the NATS client's connection code is let through (see
/// [`SeldomRepeated`]).
const CLIENT_REPEATS_SAID_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// The NATS client logs each failed attempt to connect (at error: `authorization
/// violation`), and tries again every few seconds for as long as that fails: each line of
/// its connection code is let through once every [`CLIENT_REPEATS_SAID_EVERY`], and
/// outpost's own warning, with the attempts counted, says that it goes on. Its debug lines,
/// asked for to look into a connection, come whole.
#[derive(Default)]
struct SeldomRepeated {
    said: std::sync::Mutex<
        std::collections::HashMap<tracing::callsite::Identifier, crate::log_limit::AtMostEvery>,
    >,
}

impl SeldomRepeated {
    fn limits(metadata: &tracing::Metadata<'_>) -> bool {
        // Warnings and errors only: what `async_nats=debug` asks for comes whole.
        metadata.is_event()
            && *metadata.level() <= tracing::Level::WARN
            && metadata.target().starts_with("async_nats::connector")
    }

    /// Whether a line of `callsite` that comes now is let through.
    fn admit(&self, callsite: tracing::callsite::Identifier) -> bool {
        self.said
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(callsite)
            .or_insert_with(|| crate::log_limit::AtMostEvery::new(CLIENT_REPEATS_SAID_EVERY))
            .due(tokio::time::Instant::now())
            .is_some()
    }
}

impl<S> tracing_subscriber::layer::Filter<S> for SeldomRepeated {
    fn enabled(
        &self,
        metadata: &tracing::Metadata<'_>,
        _: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        !Self::limits(metadata) || self.admit(metadata.callsite())
    }

    fn callsite_enabled(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if Self::limits(metadata) {
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::always()
        }
    }
}

/// Fields as the text format writes them (`message`, then ` name=value`), their control
/// characters escaped: ids, error bodies and rejected messages carry what inputs and
/// endpoints sent, and written as they are, a newline in one would forge a log line and an
/// escape sequence recolour the terminal of whoever reads the log. A value that holds a
/// blank, `=`, `"` or `\\` is quoted ([`field_value`]), so that an id
/// `p-1 level=ERROR` reads as one field, not two. (JSON lines escape them already.)
struct EscapedFields;

impl<'writer> tracing_subscriber::fmt::FormatFields<'writer> for EscapedFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: tracing_subscriber::fmt::format::Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        let mut visitor = EscapingVisitor {
            writer,
            empty: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<'writer> {
    writer: tracing_subscriber::fmt::format::Writer<'writer>,
    empty: bool,
    result: std::fmt::Result,
}

impl EscapingVisitor<'_> {
    fn record_text(&mut self, field: &tracing::field::Field, text: &str) {
        let name = field.name();
        // What the `log` crate's records carry besides their message (sled logs through
        // it), which the event's own line shows already.
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        let pad = if self.empty { "" } else { " " };
        self.empty = false;
        self.result = match name {
            "message" => write!(
                self.writer,
                "{pad}{}",
                crate::commands::for_terminal(text, false)
            ),
            name => write!(
                self.writer,
                "{pad}{}={}",
                name.trim_start_matches("r#"),
                field_value(text)
            ),
        };
    }
}

impl tracing::field::Visit for EscapingVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.record_text(field, &format!("{value:?}"));
    }

    /// As it is, not as `Debug` quotes it: [`field_value`] quotes what needs it.
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.record_text(field, value);
    }
}

/// A field's value as the text format shows it: as it is when it is one word of printable
/// characters, else quoted with its `"` and `\\` escaped, and its control characters escaped
/// as [`crate::commands::for_terminal`] escapes them (after the quoting, so that a
/// backslash that came in the value shows as `\\\\` and one of an escape as `\\`).
fn field_value(text: &str) -> std::borrow::Cow<'_, str> {
    let plain = !text.is_empty()
        && !text
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '=' | '"' | '\\'));
    if plain {
        return crate::commands::for_terminal(text, false);
    }
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        if matches!(c, '"' | '\\') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    std::borrow::Cow::Owned(crate::commands::for_terminal(&quoted, false).into_owned())
}

/// The first directive of `filter` that is a word alone, neither a level nor a known target.
fn unknown_word(filter: &str) -> Option<&str> {
    filter
        .split(',')
        .map(str::trim)
        .filter(|directive| !directive.is_empty() && !directive.contains(['=', '[']))
        .find(|word| {
            let known = |names: &[&str]| names.iter().any(|name| name.eq_ignore_ascii_case(word));
            // tracing also takes a level as its number, 0 (off) to 5 (trace).
            let numbered = word.parse::<u8>().is_ok_and(|n| n <= 5);
            !known(&LEVELS) && !known(&TARGETS) && !numbered && !word.contains("::")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_that_could_read_as_more_than_one_field_is_quoted() {
        // (value, as the text format shows it)
        let table = [
            ("p-1", "p-1"),
            ("store 0badc0de", "\"store 0badc0de\""),
            ("p-1 level=ERROR", "\"p-1 level=ERROR\""),
            ("a=b", "\"a=b\""),
            ("say \"hi\"", "\"say \\\"hi\\\"\""),
            ("", "\"\""),
            // A newline is escaped, and a backslash that came in the value is doubled, so
            // that the two cannot be told apart no more.
            ("p\nq", "\"p\\nq\""),
            ("p\\nq", "\"p\\\\nq\""),
            // Escaped, but one word: an escape sequence can only come from a control
            // character, since a backslash in the value would have it quoted.
            ("\u{1b}[31mred", "\\u{1b}[31mred"),
        ];
        for (value, shown) in table {
            assert_eq!(field_value(value), shown, "{value:?}");
        }
    }

    #[test]
    fn a_word_alone_must_be_a_level_or_a_known_target() {
        // (filter, the word refused)
        let table = [
            ("warn", None),
            ("WARN", None),
            ("debug,hyper=info", None),
            ("outpost", None),
            ("outpost::delivery", None),
            ("info, async_nats", None),
            ("outpost=dbug", None),
            ("[span]=debug", None),
            ("", None),
            ("3", None),
            ("warnig", Some("warnig")),
            ("6", Some("6")),
            ("info,degub", Some("degub")),
            ("warning", Some("warning")),
        ];
        for (filter, refused) in table {
            assert_eq!(unknown_word(filter), refused, "{filter}");
        }
    }

    /// A `--log-level` tracing cannot read is refused as a word alone is; set aside, it left
    /// the default level and exit 0. (Only refusals here: a filter taken would set up the
    /// test process's logging.)
    #[test]
    fn a_log_level_that_cannot_be_read_is_refused() {
        for (level, says) in [
            (
                "outpost=dbug",
                "--log-level `outpost=dbug`: error parsing level filter",
            ),
            ("[", "--log-level `[`: invalid filter directive"),
        ] {
            let error = init(LogFormat::Text, Some(level), "info").unwrap_err();
            assert!(error.starts_with(says), "{level}: {error}");
        }
    }
}
