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
    outpost::logging::init(cli.log_format, cli.log_level.as_deref(), default_level);
    match outpost::commands::dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("outpost: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
