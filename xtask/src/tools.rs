//! The cargo tools the tasks install for themselves (oha, cargo-fuzz, cargo-deny), each pinned to a
//! release and kept in one folder outside the build, and the lookup of programs on `PATH`.

use std::path::PathBuf;

use anyhow::Context;
use xshell::{Shell, cmd};

/// The oha release installed when none is on `PATH`: its JSON report is what `bench` and `e2e` read.
const OHA_VERSION: &str = "1.16.0";

/// The cargo-fuzz release `fuzz` runs.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The cargo-deny release `audit` runs.
const CARGO_DENY_VERSION: &str = "0.20.2";

/// Where `cargo install` puts the tasks' cargo tools: `target/tools`, or `$XTASK_TOOLS_ROOT` when
/// set (a folder outside the clone survives fresh CI checkouts).
pub(crate) fn dir() -> PathBuf {
    std::env::var_os("XTASK_TOOLS_ROOT")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::util::root().join("target").join("tools"))
}

/// The HTTP load generator: `oha` from `PATH`, else from [`dir`], installed there (the pinned
/// release, a few minutes, once) when it is in neither. Any release found is used.
pub(crate) fn oha(sh: &Shell) -> anyhow::Result<PathBuf> {
    if let Some(oha) = which("oha").or_else(|| existing(dir().join("bin").join("oha"))) {
        return Ok(oha);
    }
    println!("oha is missing");
    install(sh, "oha", OHA_VERSION)
}

/// The cargo-fuzz binary in [`dir`], installed there when missing or at another release.
pub(crate) fn cargo_fuzz(sh: &Shell) -> anyhow::Result<PathBuf> {
    pinned(sh, "cargo-fuzz", CARGO_FUZZ_VERSION)
}

/// The cargo-deny binary in [`dir`], installed there when missing or at another release.
pub(crate) fn cargo_deny(sh: &Shell) -> anyhow::Result<PathBuf> {
    pinned(sh, "cargo-deny", CARGO_DENY_VERSION)
}

/// The tool `name` in [`dir`] when its `--version` ends with `version`; installed otherwise.
fn pinned(sh: &Shell, name: &str, version: &str) -> anyhow::Result<PathBuf> {
    let bin = dir().join("bin").join(name);
    let installed = cmd!(sh, "{bin} --version")
        .quiet()
        .ignore_stderr()
        .read()
        .unwrap_or_default();
    if installed.split_whitespace().last() == Some(version) {
        println!("{installed} ({})", bin.display());
        return Ok(bin);
    }
    install(sh, name, version)
}

/// `cargo install --locked` of one crate's release into [`dir`]; returns its binary.
fn install(sh: &Shell, name: &str, version: &str) -> anyhow::Result<PathBuf> {
    let tools = dir();
    println!(
        "installing {name} {version} into {} (a few minutes, once)",
        tools.display()
    );
    cmd!(
        sh,
        "cargo install --locked --force {name} --version {version} --root {tools}"
    )
    .run()
    .with_context(|| format!("cargo install {name} failed"))?;
    Ok(tools.join("bin").join(name))
}

/// The file `name` on `PATH`, if there is one.
pub(crate) fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find_map(|dir| existing(dir.join(name)))
}

/// `path`, if it is a file.
pub(crate) fn existing(path: PathBuf) -> Option<PathBuf> {
    path.is_file().then_some(path)
}
