use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = outpost::cli::Cli::parse();
    // The demo tells its own story, and publish and nats setup print what they did; routine
    // logs (also the NATS client's own, which outpost reports itself) would drown them.
    let default_level = match cli.command {
        outpost::cli::Command::Demo { .. }
        | outpost::cli::Command::Publish { .. }
        | outpost::cli::Command::Nats(_) => "warn",
        _ => "info,async_nats=warn",
    };
    if let Err(e) = outpost::logging::init(cli.log_format, cli.log_level.as_deref(), default_level)
    {
        // No logging to say it through: a line of the same shape as its failure lines.
        match cli.log_format {
            // In tracing's order of keys, for pipelines that read lines as text.
            outpost::cli::LogFormat::Json => eprintln!(
                r#"{{"timestamp":{},"level":"ERROR","fields":{{"message":"outpost failed","error":{},"exit_code":2}},"target":"outpost"}}"#,
                serde_json::Value::from(
                    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                ),
                serde_json::Value::from(e),
            ),
            outpost::cli::LogFormat::Text => eprintln!("outpost: {e}"),
        }
        return ExitCode::from(2);
    }
    outpost::logging::log_panics();
    // What people read and pipe on (`outbox list | head`): a reader that stops early ends
    // the command quietly, as it ends `ls`, not with a panic at the next print. Servers and
    // clients of sockets keep SIGPIPE ignored, as Rust sets it: `check` among them, whose TLS
    // handshake with a server that closes (one of plain HTTP) would otherwise end it silently.
    if matches!(
        cli.command,
        outpost::cli::Command::Outbox(_)
            | outpost::cli::Command::Profile(_)
            | outpost::cli::Command::Rejected(_)
            | outpost::cli::Command::Check { store: true, .. }
            | outpost::cli::Command::Completions { .. }
    ) {
        // SAFETY: at start, before any thread is spawned; only restores the default action.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let log_format = cli.log_format;
    match outpost::commands::dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is_reader_gone() => ExitCode::from(error.exit_code()),
        Err(error) => {
            // With JSON logs, the line that says why the command failed is one of them, for
            // the pipeline that reads them.
            if log_format == outpost::cli::LogFormat::Json
                && tracing::enabled!(tracing::Level::ERROR)
            {
                tracing::error!(error = %error, exit_code = error.exit_code(), "outpost failed");
            } else {
                eprintln!(
                    "outpost: {}",
                    outpost::commands::for_terminal(&error.to_string(), true)
                );
            }
            ExitCode::from(error.exit_code())
        }
    }
}
