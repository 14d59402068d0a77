//! The `petra` binary: parse the configuration, then serve (or run a subcommand).

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli: petra::Cli = serving::config::parse();
    petra::main(cli)
}
