//! `cargo xtask k8s`: render every kustomize overlay and component combination, validate and check them;
//! and check that no compose file lets a running service see the CA's key.
//!
//! The Rust side prepares the tools: `kubectl` (for `kubectl kustomize`), a Python venv under
//! `target/` with the pinned, hashed packages of `xtask/k8s/requirements.txt`, and one build of
//! both services for their contracts (`petra contract`, `klaus contract`) and throwaway
//! certificates (`petra certs`). The checks themselves are the Python package `xtask/k8s/checks`
//! (`python -m checks check` and `python -m checks compose`).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use xshell::{Shell, cmd};

use crate::util::{root, shell, step};
use crate::venv;

/// Kubernetes versions whose official schemas every rendered document must pass (strict mode).
/// 1.32 is the oldest minor still in the big managed offerings' extended support and the one this
/// machine's kubectl speaks; 1.35 is the oldest minor the Kubernetes project itself still supports;
/// 1.37 is the newest schema set kubernetes-validate ships.
const VERSIONS: &[&str] = &["1.32.0", "1.35.0", "1.37.0"];

/// The oldest kustomize (built into kubectl) that handles the components and replacements used here.
const MIN_KUSTOMIZE_MAJOR: u32 = 5;

/// The services whose `contract` subcommand describes ports, admin paths and env vars.
const SERVICES: &[&str] = &["petra", "klaus"];

/// Renders and checks all Kubernetes manifests under `k8s/`; fails on the first broken rule.
pub(crate) fn k8s() -> anyhow::Result<()> {
    let sh = shell()?;
    let out = root().join("target").join("k8s");
    sh.create_dir(&out)?;
    step("kubectl", || ensure_kubectl(&sh))?;
    let venv = step("python venv (kubernetes-validate, PyYAML)", || {
        venv::k8s(&sh)
    })?;
    step("compose files: ca.key only in the certs job", || {
        let root = root();
        venv::checks(&sh, &venv)
            .args(["compose", "--root"])
            .arg(root)
            .run()
            .context("a compose file lets a running service see a key it must not (see FAIL lines above)")
    })?;
    let bins = step("build petra and klaus", || build_services(&sh))?;
    let contracts = step("service contracts", || write_contracts(&sh, &bins, &out))?;
    let petra = bins.join("petra");
    step("render, validate and check the manifests", || {
        let root = root();
        let versions = VERSIONS.join(",");
        let contract_args: Vec<String> = contracts
            .iter()
            .flat_map(|(service, path)| {
                [
                    "--contract".to_owned(),
                    format!("{service}={}", path.display()),
                ]
            })
            .collect();
        venv::checks(&sh, &venv)
            .args(["check", "--root"])
            .arg(root)
            .arg("--out")
            .arg(&out)
            .args(["--versions", &versions])
            .args(contract_args)
            .arg("--")
            .arg(&petra)
            .arg("certs")
            .run()
            .context("the Kubernetes manifests failed a check (see FAIL lines above)")?;
        Ok(())
    })
}

/// Makes sure `kubectl` with a recent built-in kustomize is on the PATH, installing Debian's
/// package where the machine's package lists offer it.
fn ensure_kubectl(sh: &Shell) -> anyhow::Result<()> {
    if cmd!(sh, "kubectl version --client")
        .quiet()
        .ignore_stderr()
        .read()
        .is_err()
    {
        let policy = cmd!(sh, "apt-cache policy kubectl")
            .quiet()
            .ignore_stderr()
            .read()
            .unwrap_or_default();
        let candidate = policy
            .lines()
            .find_map(|line| line.trim().strip_prefix("Candidate:"))
            .map(str::trim)
            .filter(|version| *version != "(none)");
        match candidate {
            Some(version) => {
                println!("installing kubectl {version} from the machine's package lists");
                cmd!(sh, "apt-get install -y --no-install-recommends kubectl")
                    .run()
                    .context("apt-get install kubectl failed (it needs root)")?;
            }
            None => bail!(
                "kubectl is not installed and the machine's package lists have no `kubectl` \
                 package (`apt-cache policy kubectl`). Debian's own `kubernetes-client` is too old \
                 (its kustomize lacks components). Install kubectl 1.27 or newer, which has \
                 kustomize v5 built in, and run `cargo xtask k8s` again."
            ),
        }
    }
    let version = cmd!(sh, "kubectl version --client").quiet().read()?;
    let kustomize = version
        .lines()
        .find_map(|line| line.strip_prefix("Kustomize Version: v"))
        .context("`kubectl version --client` names no kustomize version")?;
    let major: u32 = kustomize
        .split('.')
        .next()
        .unwrap_or_default()
        .parse()
        .unwrap_or(0);
    if major < MIN_KUSTOMIZE_MAJOR {
        bail!(
            "kubectl's kustomize is v{kustomize}; these manifests need v{MIN_KUSTOMIZE_MAJOR} or newer"
        );
    }
    println!("{}", version.lines().collect::<Vec<_>>().join(", "));
    Ok(())
}

/// Builds both services once (debug) and returns the folder that holds their binaries, so the
/// contract and the certificates come from the same build even while the sources change.
fn build_services(sh: &Shell) -> anyhow::Result<PathBuf> {
    let packages: Vec<String> = SERVICES.iter().map(|s| format!("--package={s}")).collect();
    cmd!(sh, "cargo build --quiet --locked {packages...}")
        .run()
        .context("building petra and klaus failed")?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let bins = target.join("debug");
    for service in SERVICES {
        if !bins.join(service).is_file() {
            bail!("cargo build left no {}", bins.join(service).display());
        }
    }
    Ok(bins)
}

/// Writes each service's `contract` JSON into `out` and returns (service, file) pairs.
fn write_contracts(sh: &Shell, bins: &Path, out: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    SERVICES
        .iter()
        .map(|service| {
            let binary = bins.join(service);
            let json = cmd!(sh, "{binary} contract")
                .read()
                .with_context(|| format!("`{service} contract` failed"))?;
            let path = out.join(format!("{service}.contract.json"));
            sh.write_file(&path, json)?;
            println!("{service}: {}", path.display());
            Ok((service.to_string(), path))
        })
        .collect()
}
