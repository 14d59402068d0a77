//! `cargo xtask <task>`: the project's automation, one module per task; CI runs `cargo xtask ci`.

mod alerts;
mod audit;
mod bench;
mod ci;
mod e2e;
mod fuzz;
mod images;
mod k8s;
mod sbom;
mod testssl;
mod util;
mod venv;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  ci       every check CI runs: fmt, clippy, tests, manifests, images and end-to-end tests
  test     the Rust tests only (cargo nextest, or cargo test where nextest is missing)
  images   build petra:dev, klaus:dev, slowlink:dev and tracesink:dev from Dockerfile.<name>; check their SBOMs and
           embedded dependency lists against Cargo.lock
  e2e      build the images, bring up each compose topology and check it end to end, then the fault
           and failover scenarios; cargo xtask e2e [one|split|clouds|faults|failover|monitoring|observability]... runs only those
  k8s      render every kustomize overlay and component, validate and policy-check them
  alerts   check the Prometheus rules and run their promtool unit tests
  bench    load-test Petra and Klaus and check the performance budget
  certs    write a private CA and the service certificates: cargo xtask certs --out DIR
  audit    cargo-deny, hadolint, checkov, testssl.sh on Petra, and no private key in the repository or
           the images
  testssl  testssl.sh against a Petra on loopback (also part of audit)
  fuzz     run the cargo-fuzz targets (libFuzzer, nightly): cargo xtask fuzz [--seconds N] [TARGET...]
";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let task = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    let result = match task.as_str() {
        "ci" => ci::ci(),
        "test" => ci::test(),
        "certs" => ci::certs(&rest),
        "images" => images::images(),
        "e2e" => e2e::e2e_parts(&rest),
        "k8s" => k8s::k8s(),
        "alerts" => alerts::alerts(),
        "bench" => bench::bench(&rest),
        "audit" => audit::audit(&rest),
        "testssl" => testssl::run(),
        "fuzz" => fuzz::fuzz(&rest),
        "" | "help" | "-h" | "--help" => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        other => {
            eprint!("error: unknown task '{other}'\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask {task} failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}
