//! The Python venvs of the tasks (`k8s`, `audit`): one per requirements file, under `target/`, kept
//! between runs and rebuilt when the requirements change.

use std::path::{Path, PathBuf};

use anyhow::Context;
use xshell::{Shell, cmd};

use crate::util::{pip_install_hashed, root};

/// Creates the venv `target/<name>` from `requirements` (relative to the workspace root) on first
/// use and whenever the file changes; returns the venv's `bin/` folder.
pub(crate) fn ensure(sh: &Shell, name: &str, requirements: &Path) -> anyhow::Result<PathBuf> {
    let venv = root().join("target").join(name);
    let bin = venv.join("bin");
    let python = bin.join("python");
    let requirements = root().join(requirements);
    let wanted = sh.read_file(&requirements)?;
    // A copy of the requirements it was built from marks a finished, current venv.
    let stamp = venv.join("requirements.installed");
    if python.exists() && sh.read_file(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        println!("reusing {}", venv.display());
        return Ok(bin);
    }
    if venv.exists() {
        sh.remove_path(&venv)?;
    }
    cmd!(sh, "python3 -m venv {venv}")
        .run()
        .context("python3 -m venv failed (is python3-venv installed?)")?;
    pip_install_hashed(sh, &python, &requirements)?;
    sh.write_file(&stamp, wanted)?;
    Ok(bin)
}

/// The venv of `cargo xtask k8s` (kubernetes-validate, PyYAML), which also runs the manifest
/// renderer for `cargo xtask audit`; returns its `bin/`.
pub(crate) fn k8s(sh: &Shell) -> anyhow::Result<PathBuf> {
    ensure(sh, "k8s-venv", Path::new("xtask/k8s/requirements.txt"))
}

/// Runs `python -m checks ARGS...` from the k8s venv: the Python checks of the manifests and compose
/// files, whose package lives in `xtask/k8s/checks`.
pub(crate) fn checks<'a>(sh: &'a Shell, bin: &Path) -> xshell::Cmd<'a> {
    let python = bin.join("python");
    let package_root = root().join("xtask").join("k8s");
    cmd!(sh, "{python} -m checks")
        .env("PYTHONPATH", package_root)
        // No __pycache__ folders in the source tree.
        .env("PYTHONDONTWRITEBYTECODE", "1")
}
