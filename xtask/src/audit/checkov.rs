//! checkov (`.checkov.yaml`) on the rendered Kubernetes manifests, the Dockerfiles and the compose
//! files (checkov has no compose framework, so those get its secrets scan); and its self-test.
//!
//! The manifests come from the one renderer, `python -m checks render` (xtask/k8s/checks/render.py):
//! every overlay and component combination that `cargo xtask k8s` checks, each document once. The
//! bases are left out: they set no namespace and are never applied alone.
//!
//! `cargo xtask k8s` leaves some pod settings to checkov (xtask/k8s/checks/workloads.py says which),
//! so the self-test proves on each run that checkov, with the project's skip list, still fails on a
//! workload broken once for each of them (xtask/k8s/checks/checkov_cases.py).

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, bail};
use serde_json::Value;
use xshell::{Cmd, Shell, cmd};

use super::{names, root_files};
use crate::util::root;
use crate::venv;

/// Renders the manifests and runs checkov on them and on the Dockerfiles and compose files, then
/// the self-test. `bin` is the audit venv's `bin/`, `k8s_venv` the one that runs the renderer.
pub(super) fn checkov(sh: &Shell, bin: &Path, k8s_venv: &Path, work: &Path) -> anyhow::Result<()> {
    let rendered = work.join("k8s-rendered");
    let cases = work.join("checkov-cases");
    venv::checks(sh, k8s_venv)
        .args(["render", "--distinct", "--root"])
        .arg(root())
        .arg("--out")
        .arg(&rendered)
        .arg("--checkov-cases")
        .arg(&cases)
        .run()
        .context("rendering the manifests failed")?;
    let overlays = rendered.join("overlays");
    let mut files = root_files(sh, "Dockerfile", &[])?;
    files.extend(root_files(sh, "docker-compose", &[".yml", ".yaml"])?);
    let file_args: Vec<String> = files
        .iter()
        .flat_map(|file| ["--file".to_owned(), file.display().to_string()])
        .collect();
    let checkov = bin.join("checkov");
    println!("checkov on {} and {}", overlays.display(), names(&files));
    checkov_cmd(sh, &checkov)
        .arg("--directory")
        .arg(&overlays)
        .args(file_args)
        .run()
    .context(
        "checkov reported findings (fix them, or skip the check in .checkov.yaml with a reason)",
    )?;
    self_test(sh, &checkov, &cases)
}

/// `checkov --config-file .checkov.yaml`, offline; the caller adds what to scan.
fn checkov_cmd<'a>(sh: &'a Shell, checkov: &Path) -> Cmd<'a> {
    cmd!(sh, "{checkov} --config-file .checkov.yaml")
        // No network here besides package registries: no platform, no guideline download.
        .env("BC_SKIP_MAPPING", "TRUE")
        .env("CHECKOV_SKIP_VERSION_CHECK", "TRUE")
}

/// Runs checkov on the broken workloads of `cases` (one file `CHECK_ID.N.yaml` each) and fails
/// unless every file fails the check its name gives.
fn self_test(sh: &Shell, checkov: &Path, cases: &Path) -> anyhow::Result<()> {
    let output = checkov_cmd(sh, checkov)
        .args([
            "--framework",
            "kubernetes",
            "--output",
            "json",
            "--directory",
        ])
        .arg(cases)
        .quiet()
        .ignore_status()
        .output()
        .context("could not run checkov")?;
    let report = String::from_utf8_lossy(&output.stdout);
    let failed = failed_checks(&report).with_context(|| {
        format!(
            "checkov's JSON report on {} did not parse: {}",
            cases.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )
    })?;
    let mut missed = Vec::new();
    let mut total = 0;
    for file in sh.read_dir(cases)? {
        let Some(name) = file.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(check) = name.split('.').next().filter(|id| id.starts_with("CKV")) else {
            continue;
        };
        total += 1;
        if !failed.contains(&(check.to_owned(), name.to_owned())) {
            missed.push(name.to_owned());
        }
    }
    if total == 0 {
        bail!("no broken workloads in {}", cases.display());
    }
    if !missed.is_empty() {
        bail!(
            "checkov did not fail the check each of these broken workloads names: {} (in {}). \
             `cargo xtask k8s` leaves those settings to checkov (xtask/k8s/checks/workloads.py): \
             take the check out of .checkov.yaml's skip-check, or check it in workloads.py again",
            missed.join(", "),
            cases.display()
        );
    }
    println!(
        "self-test: checkov failed each of {total} broken workloads on the check meant for it"
    );
    Ok(())
}

/// (check id, file name) of every failed check in checkov's JSON report: one report object, or a
/// list of them when several frameworks ran.
fn failed_checks(report: &str) -> anyhow::Result<BTreeSet<(String, String)>> {
    let json: Value = serde_json::from_str(report)?;
    let reports = match json {
        Value::Array(reports) => reports,
        report => vec![report],
    };
    Ok(reports
        .iter()
        .filter_map(|report| report["results"]["failed_checks"].as_array())
        .flatten()
        .filter_map(|check| {
            let id = check["check_id"].as_str()?;
            let file = Path::new(check["file_path"].as_str()?)
                .file_name()?
                .to_str()?;
            Some((id.to_owned(), file.to_owned()))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_checks_are_read_from_one_report_or_a_list() {
        let one = r#"{"check_type": "kubernetes", "results": {"failed_checks": [
            {"check_id": "CKV_K8S_22", "file_path": "/CKV_K8S_22.8.yaml"},
            {"check_id": "CKV_K8S_21", "file_path": "/CKV_K8S_22.8.yaml"}]}}"#;
        let found = failed_checks(one).expect("one report parses");
        assert!(found.contains(&("CKV_K8S_22".to_owned(), "CKV_K8S_22.8.yaml".to_owned())));
        assert_eq!(found.len(), 2);
        let list = format!("[{one}, {{\"check_type\": \"secrets\", \"results\": {{}}}}]");
        assert_eq!(failed_checks(&list).expect("a list parses"), found);
        assert!(failed_checks("checkov crashed").is_err());
    }
}
