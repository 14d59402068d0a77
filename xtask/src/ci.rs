//! `cargo xtask ci`: every check, in the order that fails fastest; and `test` and `certs`.

use anyhow::Context;
use xshell::cmd;

use crate::util::{shell, step};

/// Runs every check CI runs. Any failure fails the whole run.
pub(crate) fn ci() -> anyhow::Result<()> {
    let sh = shell()?;
    step("cargo fmt --check", || {
        cmd!(sh, "cargo fmt --all --check").run()?;
        Ok(())
    })?;
    step("cargo clippy", || {
        cmd!(
            sh,
            "cargo clippy --workspace --all-targets --locked -- -D warnings"
        )
        .run()?;
        Ok(())
    })?;
    step("tests", test)?;
    step("kubernetes manifests", crate::k8s::k8s)?;
    step("alerting rules", crate::alerts::alerts)?;
    step("images and end-to-end tests", crate::e2e::e2e)?;
    step(
        "audit: dependencies, Dockerfiles, manifests, secrets",
        || crate::audit::audit(&[]),
    )?;
    step("fuzz", || {
        crate::fuzz::fuzz(crate::fuzz::FuzzArgs::default())
    })?;
    Ok(())
}

/// Runs the workspace's tests with cargo-nextest, or `cargo test` where nextest is not installed.
pub(crate) fn test() -> anyhow::Result<()> {
    let sh = shell()?;
    let has_nextest = cmd!(sh, "cargo nextest --version")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .is_ok();
    if has_nextest {
        cmd!(sh, "cargo nextest run --workspace --locked --no-fail-fast").run()?;
    } else {
        cmd!(sh, "cargo test --workspace --locked --no-fail-fast").run()?;
    }
    Ok(())
}

/// The flags of `cargo xtask certs`, passed to `petra certs` as they are: Petra's binary declares
/// them (`cargo xtask certs --help` prints its help).
#[derive(Debug, clap::Args)]
#[command(disable_help_flag = true)]
pub(crate) struct CertsArgs {
    /// The flags of `petra certs`: --out DIR, --namespace, --san, --days, --force, --new-ca.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub(crate) args: Vec<String>,
}

/// Writes a private CA and the service certificates with the project's own tool (`petra certs`).
pub(crate) fn certs(args: &CertsArgs) -> anyhow::Result<()> {
    let sh = shell()?;
    let args = &args.args;
    cmd!(
        sh,
        "cargo run --quiet --locked --package petra -- certs {args...}"
    )
    .run()
    .context("petra certs failed")?;
    Ok(())
}
