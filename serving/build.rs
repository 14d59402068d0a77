//! Records what `build_info` reports: the git revision (`GIT_REVISION` when the build sets it, as
//! the images' builder does from a checkout it cannot see; else `git rev-parse`; else `unknown`)
//! and the compiler's version.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=GIT_REVISION");
    let revision = std::env::var("GIT_REVISION")
        .ok()
        .filter(|revision| !revision.trim().is_empty())
        .or_else(git_revision)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=SERVING_GIT_REVISION={}", revision.trim());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let version =
        output(Command::new(rustc).arg("--version")).unwrap_or_else(|| "rustc unknown".to_owned());
    println!("cargo:rustc-env=SERVING_RUSTC_VERSION={}", version.trim());
}

/// The checkout's short revision, with `-dirty` when files differ from it; rebuilt when HEAD or
/// the branch it points to moves.
fn git_revision() -> Option<String> {
    let head = output(Command::new("git").args(["rev-parse", "--git-path", "HEAD"]))?;
    println!("cargo:rerun-if-changed={}", head.trim());
    let branch = output(Command::new("git").args(["symbolic-ref", "-q", "HEAD"]));
    if let Some(path) = branch.and_then(|branch| {
        output(Command::new("git").args(["rev-parse", "--git-path", branch.trim()]))
    }) {
        println!("cargo:rerun-if-changed={}", path.trim());
    }
    let revision = output(Command::new("git").args(["rev-parse", "--short=12", "HEAD"]))?;
    Some(revision.trim().to_owned())
}

fn output(command: &mut Command) -> Option<String> {
    let output = command.output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}
