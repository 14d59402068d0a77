//! Small helpers shared by the tasks: the workspace root, a shell, timed steps.

use std::path::PathBuf;
use std::time::Instant;

use xshell::Shell;

/// The workspace root (the folder above `xtask/`).
pub(crate) fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// A shell whose current directory is the workspace root.
pub(crate) fn shell() -> anyhow::Result<Shell> {
    let sh = Shell::new()?;
    sh.change_dir(root());
    Ok(sh)
}

/// Runs one named step, printing its name before and its wall time after.
pub(crate) fn step<T>(name: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    println!("==> {name}");
    let started = Instant::now();
    let result = f();
    let secs = started.elapsed().as_secs_f64();
    match &result {
        Ok(_) => println!("<== {name}: ok in {secs:.1}s"),
        Err(err) => println!("<== {name}: FAILED in {secs:.1}s: {err:#}"),
    }
    result
}
