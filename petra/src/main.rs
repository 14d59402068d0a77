//! The `petra` binary: parse the configuration, then serve (or run a subcommand).

use std::process::ExitCode;

/// mimalloc instead of glibc's allocator: callgrind counted 8 % fewer instructions per Klaus
/// request (109.7k → 100.8k) and 5 % fewer per Petra request, for about 0.6 MB more idle RSS
/// (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli: petra::Cli = serving::config::parse();
    petra::main(cli)
}
