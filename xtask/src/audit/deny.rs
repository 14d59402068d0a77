//! cargo-deny on the workspace and on `fuzz/` (`deny.toml`): licences, bans, sources, and advisories
//! where a local copy of the advisory database exists.

use std::path::PathBuf;

use anyhow::{Context, bail};
use xshell::{Shell, cmd};

use crate::util::root;

/// Runs cargo-deny on the workspace and on `fuzz/`; adds a note when advisories were not checked.
pub(super) fn cargo_deny(sh: &Shell, notes: &mut Vec<String>) -> anyhow::Result<()> {
    let deny = crate::tools::cargo_deny(sh)?;
    let config = root().join("deny.toml");
    let db = advisory_db();
    let mut checks = vec!["licenses", "bans", "sources"];
    let mut fetch = Vec::new();
    match &db {
        Some(path) => {
            println!(
                "advisory database found at {}: checking advisories too (not refreshed)",
                path.display()
            );
            checks.push("advisories");
            fetch.push("--offline");
        }
        None => {
            let note = "ADVISORIES NOT CHECKED: cargo-deny's advisory database (RustSec) is a git \
                        repository on GitHub, which this network cannot reach (no crate or PyPI \
                        package carries it), and no local copy exists under \
                        $CARGO_HOME/advisory-dbs. Licences, bans and sources were checked; run \
                        `cargo deny check advisories` where GitHub is reachable, or scan the images' \
                        embedded dependency lists (/sbom.cdx.json, cargo-auditable) elsewhere."
                .to_owned();
            if std::env::var("XTASK_REQUIRE_ADVISORIES").is_ok_and(|v| v == "1") {
                bail!("{note} (XTASK_REQUIRE_ADVISORIES=1 makes this a failure)");
            }
            print!("{}", banner(&note));
            notes.push(note);
        }
    }
    // The libFuzzer licence exception applies to fuzz/ only; the workspace need not meet it.
    let runs: [(&str, &[&str]); 2] = [
        (
            "Cargo.toml",
            &["--allow", "license-exception-not-encountered"],
        ),
        ("fuzz/Cargo.toml", &[]),
    ];
    for (manifest, allow) in runs {
        let (fetch, checks) = (&fetch, &checks);
        println!("cargo deny: {manifest}");
        cmd!(
            sh,
            "{deny} deny --locked {fetch...} --manifest-path {manifest} --config {config} check {checks...} {allow...}"
        )
        .run()
        .with_context(|| format!("cargo deny check failed for {manifest}"))?;
    }
    Ok(())
}

/// A skipped check as it must show in a log that nobody reads closely: a framed block, and under CI
/// (`CI` set) a warning annotation, which GitHub Actions and GitLab show on the run's page.
fn banner(note: &str) -> String {
    let rule = "!".repeat(100);
    let mut out = format!("{rule}\n");
    let mut line = String::from("!!");
    for word in note.split_whitespace() {
        if line.len() + word.len() + 1 > 96 {
            out.push_str(&line);
            out.push('\n');
            line = String::from("!!");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
    out.push_str(&rule);
    out.push('\n');
    if std::env::var_os("CI").is_some() {
        out.push_str(&format!("::warning title=advisories not checked::{note}\n"));
    }
    out
}

/// The local advisory database cargo-deny would use, if one was ever fetched on this machine.
fn advisory_db() -> Option<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))?;
    let dbs = cargo_home.join("advisory-dbs");
    std::fs::read_dir(&dbs)
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.join("crates").is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_banner_frames_every_word_of_the_note() {
        let note = "ADVISORIES NOT CHECKED: ".to_owned() + &"word ".repeat(60);
        let text = banner(&note);
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("::")).collect();
        assert!(lines.len() > 4, "{text}");
        assert!(
            lines.iter().all(|l| l.starts_with("!!") && l.len() <= 100),
            "{text}"
        );
        // Every word once in the frame (under CI the note is also repeated as a `::warning` line).
        let framed: usize = lines.iter().map(|l| l.matches("word").count()).sum();
        assert_eq!(framed, 60, "{text}");
    }
}
