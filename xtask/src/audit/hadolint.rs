//! hadolint (`.hadolint.yaml`) on every `Dockerfile*` of the workspace root.

use std::path::Path;

use anyhow::{Context, bail};
use xshell::{Shell, cmd};

use super::{names, root_files};

/// Runs hadolint from the audit venv's `bin/` on every `Dockerfile*`.
pub(super) fn hadolint(sh: &Shell, bin: &Path) -> anyhow::Result<()> {
    let dockerfiles = root_files(sh, "Dockerfile", &[])?;
    if dockerfiles.is_empty() {
        bail!("no Dockerfile* in the workspace root");
    }
    let hadolint = bin.join("hadolint");
    let version = cmd!(sh, "{hadolint} --version").quiet().read()?;
    println!("{version}: {}", names(&dockerfiles));
    cmd!(sh, "{hadolint} --config .hadolint.yaml {dockerfiles...}")
        .run()
        .context(
            "hadolint reported findings (fix them, or ignore the rule in .hadolint.yaml with a \
             reason)",
        )?;
    Ok(())
}
