use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = outpost::cli::Cli::parse();
    // The demo tells its own story; the agent's routine logs would drown it.
    let default_level = match cli.command {
        outpost::cli::Command::Demo { .. } => "warn",
        _ => "info",
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
