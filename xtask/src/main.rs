//! `cargo xtask <task>`: the project's automation, one module per task; CI runs `cargo xtask ci`.
//!
//! The tasks' flags are declared here and in each task's module (clap); the helpers they share
//! live once each: [`tools`] (cargo tool installs), [`oha`] (the load generator), [`procfs`]
//! (`/proc` figures), [`http`] (plain-HTTP GETs), [`prometheus`] (metrics text), [`util`] (the
//! workspace root, a shell, timed steps).

mod alerts;
mod audit;
mod bench;
mod ci;
mod e2e;
mod fuzz;
mod http;
mod images;
mod k8s;
mod modgraph;
mod oha;
mod procfs;
mod prometheus;
mod sbom;
mod testssl;
mod tools;
mod up;
mod util;
mod venv;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// The project's automation: `cargo xtask <task>`. CI runs `cargo xtask ci`.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Option<Task>,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Every check CI runs: fmt, clippy, tests, manifests, images and end-to-end tests.
    Ci,
    /// The Rust tests only (cargo nextest, or cargo test where nextest is missing).
    Test,
    /// Run the pair with docker-compose.yml (`compose up --build`), first making the Rust builder
    /// image where no registry can be reached. Arguments after the flags go to `compose up`.
    Up(up::UpArgs),
    /// Build petra:dev, klaus:dev, slowlink:dev and tracesink:dev from the Dockerfile's stages; check
    /// their SBOMs and embedded dependency lists against Cargo.lock.
    Images,
    /// Build the images, bring up each compose topology and check it end to end, then the fault
    /// and failover scenarios.
    E2e(e2e::E2eArgs),
    /// Render every kustomize overlay and component, validate and policy-check them.
    K8s,
    /// Check the Prometheus rules and run their promtool unit tests.
    Alerts,
    /// Load-test Petra and Klaus and check the performance budget.
    Bench(bench::BenchArgs),
    /// Write a private CA and the service certificates (`petra certs`; see
    /// `cargo xtask certs --help`).
    Certs(ci::CertsArgs),
    /// cargo-deny, hadolint, checkov, testssl.sh on Petra, and no private key in the repository
    /// or the images.
    Audit(AuditArgs),
    /// testssl.sh against a Petra on loopback (also part of audit).
    Testssl,
    /// Run the cargo-fuzz targets (libFuzzer, nightly).
    Fuzz(fuzz::FuzzArgs),
}

impl Task {
    /// The task's name, as typed.
    fn name(&self) -> &'static str {
        match self {
            Self::Ci => "ci",
            Self::Test => "test",
            Self::Up(_) => "up",
            Self::Images => "images",
            Self::E2e(_) => "e2e",
            Self::K8s => "k8s",
            Self::Alerts => "alerts",
            Self::Bench(_) => "bench",
            Self::Certs(_) => "certs",
            Self::Audit(_) => "audit",
            Self::Testssl => "testssl",
            Self::Fuzz(_) => "fuzz",
        }
    }

    fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Ci => ci::ci(),
            Self::Test => ci::test(),
            Self::Up(args) => up::up(&args),
            Self::Images => images::images(),
            Self::E2e(args) => e2e::e2e_parts(&args.parts),
            Self::K8s => k8s::k8s(),
            Self::Alerts => alerts::alerts(),
            Self::Bench(args) => bench::bench(args),
            Self::Certs(args) => ci::certs(&args),
            Self::Audit(args) => audit::audit(&args.flags()),
            Self::Testssl => testssl::run(),
            Self::Fuzz(args) => fuzz::fuzz(args),
        }
    }
}

/// The flags of `cargo xtask audit`.
#[derive(Debug, clap::Args)]
struct AuditArgs {
    /// Leave out the two checks that need Docker (the image layers and their self-test); the
    /// last line says they did not run.
    #[arg(long)]
    no_docker: bool,
}

impl AuditArgs {
    /// The flags as `audit::audit` reads them.
    fn flags(&self) -> Vec<String> {
        if self.no_docker {
            vec!["--no-docker".to_owned()]
        } else {
            Vec::new()
        }
    }
}

fn main() -> ExitCode {
    let Some(task) = Cli::parse().task else {
        // No task: the list of tasks, as `help` would print it.
        let _ = Cli::command().print_help();
        return ExitCode::SUCCESS;
    };
    let name = task.name();
    match task.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask {name} failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn tasks_and_their_flags_parse() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("xtask").chain(args.iter().copied()))
        };
        assert!(matches!(parse(&["ci"]).expect("ci").task, Some(Task::Ci)));
        assert!(parse(&["nope"]).is_err());
        assert!(parse(&["audit", "--extra"]).is_err());
        let audit = parse(&["audit", "--no-docker"]).expect("audit's flag");
        assert!(matches!(audit.task, Some(Task::Audit(args)) if args.flags() == ["--no-docker"]));
        let e2e = parse(&["e2e", "faults", "one"]).expect("two parts");
        assert!(matches!(e2e.task, Some(Task::E2e(args)) if args.parts == ["faults", "one"]));
        assert!(parse(&["e2e", "other"]).is_err());
        let certs = parse(&["certs", "--out", "dir", "--force"]).expect("passed through");
        assert!(
            matches!(certs.task, Some(Task::Certs(args)) if args.args == ["--out", "dir", "--force"])
        );
        let fuzz = parse(&["fuzz", "--seconds=30", "pem"]).expect("fuzz flags");
        assert!(
            matches!(fuzz.task, Some(Task::Fuzz(args)) if args.seconds == 30 && args.targets == ["pem"])
        );
        assert!(parse(&["fuzz", "--seconds", "0"]).is_err());
        assert!(parse(&["bench", "--quick", "--only", "petra"]).is_ok());
    }
}
