//! `cargo xtask audit`: supply-chain, configuration and secret checks.
//!
//! 1. cargo-deny (`deny.toml`): licences, banned crates (OpenSSL, native-tls), duplicate versions,
//!    sources, for the workspace and for `fuzz/`. Advisories only where a local copy of the
//!    advisory database exists: RustSec publishes it only as a git repository (no crate or PyPI
//!    package carries it), on a host this network cannot reach. Without it the task says so in a
//!    banner, in CI's annotations and in its last line ("advisories NOT CHECKED"), never "all checks
//!    passed"; `XTASK_REQUIRE_ADVISORIES=1` turns the skip into a failure.
//! 2. hadolint (`.hadolint.yaml`) on every `Dockerfile*`.
//! 3. checkov (`.checkov.yaml`) on the rendered Kubernetes manifests (every overlay and component
//!    combination that `cargo xtask k8s` checks, from its renderer), the Dockerfiles and the compose
//!    files; checkov has no compose framework, so the compose files get its secrets scan. A
//!    self-test proves checkov still fails on what `cargo xtask k8s` leaves to it.
//! 4. No private key in the repository (tracked and untracked, not ignored files) and none in any
//!    layer of the images petra:dev, klaus:dev, slowlink:dev and tracesink:dev (built by `cargo xtask images`). The layer
//!    check proves itself on each run against a throwaway image that holds a fake key.
//! 5. testssl.sh against a Petra on loopback (`testssl.rs`): TLS 1.3 only, no finding above LOW.
//!
//! cargo-deny is installed into `target/tools` (or `$XTASK_TOOLS_ROOT`), hadolint and checkov
//! into the venv `target/audit-venv` (pinned with hashes in `xtask/audit/requirements.txt`); the
//! manifests are rendered in `cargo xtask k8s`'s venv. All are kept between runs.
//! Every check runs even when an earlier one fails; the task fails if any did. `--no-docker` leaves
//! out the two checks that need Docker (the image layers and their self-test) and says so in the
//! last line, as for any check that did not run.
//!
//! One module per check: `deny`, `hadolint`, `checkov`, `keys` (the repository), `layers` (the
//! images); testssl.sh is `crate::testssl`.

mod checkov;
mod deny;
mod hadolint;
mod keys;
mod layers;

use std::path::{Path, PathBuf};

use anyhow::bail;
use xshell::Shell;

use crate::util::{root, shell, step};
use crate::venv;

/// Scratch space: rendered manifests, saved images.
const WORK: &str = "target/audit";

/// Runs every audit check and fails if any failed. `args` may be `--no-docker`.
pub(crate) fn audit(args: &[String]) -> anyhow::Result<()> {
    let docker = match args {
        [] => true,
        [flag] if flag == "--no-docker" => false,
        [arg, ..] => bail!("cargo xtask audit takes only --no-docker (got '{arg}')"),
    };
    let sh = shell()?;
    let work = root().join(WORK);
    sh.create_dir(&work)?;
    let mut failed: Vec<String> = Vec::new();
    // Checks that did not run, each with the reason: they keep the summary from saying "all passed".
    let mut notes: Vec<String> = Vec::new();
    let mut record = |name: &str, result: anyhow::Result<()>| {
        if let Err(err) = result {
            failed.push(format!("{name}: {err:#}"));
        }
    };

    record(
        "cargo-deny",
        step(
            "cargo-deny (licenses, bans, sources; advisories if a local db exists)",
            || deny::cargo_deny(&sh, &mut notes),
        ),
    );
    let venvs = step(
        "python venvs (hadolint, checkov; the manifest renderer)",
        || {
            Ok((
                venv::ensure(&sh, "audit-venv", Path::new("xtask/audit/requirements.txt"))?,
                venv::k8s(&sh)?,
            ))
        },
    );
    match venvs {
        Ok((bin, k8s_venv)) => {
            record(
                "hadolint",
                step("hadolint Dockerfile*", || hadolint::hadolint(&sh, &bin)),
            );
            record(
                "checkov",
                step(
                    "checkov: rendered k8s manifests, Dockerfiles, compose files; self-test",
                    || checkov::checkov(&sh, &bin, &k8s_venv, &work),
                ),
            );
        }
        Err(err) => record("python venvs", Err(err)),
    }
    record(
        "testssl.sh",
        step(
            "testssl.sh against Petra (TLS 1.3 only, nothing above LOW)",
            || crate::testssl::testssl(&sh, &work),
        ),
    );
    record(
        "repository keys",
        step("no private key in the repository", || keys::repo_keys(&sh)),
    );
    if docker {
        record(
            "layer check self-test",
            step("layer check finds a planted key (throwaway image)", || {
                layers::layer_selftest(&sh, &work)
            }),
        );
        record(
            "image keys",
            step(
                "no key in any layer of petra:dev, klaus:dev, slowlink:dev and tracesink:dev",
                || layers::image_keys(&sh, &work),
            ),
        );
    } else {
        notes.push(
            "IMAGE LAYERS NOT CHECKED: --no-docker left out the key scan of the images' layers \
             and its self-test"
                .to_owned(),
        );
    }

    for note in &notes {
        println!("NOTE: {note}");
    }
    if !failed.is_empty() {
        bail!(
            "{} audit check(s) failed:\n  {}",
            failed.len(),
            failed.join("\n  ")
        );
    }
    println!("{}", summary(&notes));
    Ok(())
}

/// The audit's last line when nothing failed: "all checks passed" only when nothing was skipped.
fn summary(skipped: &[String]) -> String {
    if skipped.is_empty() {
        return "audit: all checks passed".to_owned();
    }
    let what: Vec<&str> = skipped
        .iter()
        .map(|note| note.split(':').next().unwrap_or(note))
        .collect();
    format!(
        "audit: passed, but {} check(s) NOT RUN: {} (see the NOTE lines above)",
        skipped.len(),
        what.join("; ")
    )
}

/// The files in the workspace root whose name starts with `prefix` and ends with one of `suffixes`.
fn root_files(sh: &Shell, prefix: &str, suffixes: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = sh
        .read_dir(root())?
        .into_iter()
        .filter(|path| path.is_file())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| {
                    name.starts_with(prefix)
                        && (suffixes.is_empty() || suffixes.iter().any(|s| name.ends_with(s)))
                })
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The file names of `files`, comma-separated.
fn names(files: &[PathBuf]) -> String {
    files
        .iter()
        .filter_map(|file| file.file_name().and_then(|n| n.to_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skipped_check_keeps_the_summary_from_saying_all_passed() {
        assert_eq!(summary(&[]), "audit: all checks passed");
        let skipped = vec!["ADVISORIES NOT CHECKED: no database".to_owned()];
        let line = summary(&skipped);
        assert!(!line.contains("all checks passed"), "{line}");
        assert!(line.contains("NOT RUN: ADVISORIES NOT CHECKED"), "{line}");
    }
}
