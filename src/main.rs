use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = outpost::cli::Cli::parse();
    outpost::logging::init(cli.log_format, cli.log_level.as_deref());
    match outpost::commands::dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("outpost: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
