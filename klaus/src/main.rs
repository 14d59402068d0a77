//! The `klaus` binary: parse the configuration, then serve (or run a subcommand).

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli: klaus::Cli = serving::config::parse();
    klaus::main(cli)
}
