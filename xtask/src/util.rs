//! Small helpers shared by the tasks: the workspace root, a shell, timed steps, hashed pip installs,
//! and the open-files limit that load tests raise for their children.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use xshell::{Shell, cmd};

/// The open-files limit below which load tests raise it: thousands of connections need a socket each, and
/// through Klaus a second one towards Petra.
const NOFILE_WANTED: u64 = 4096;

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

/// Installs a requirements file into a venv's `python` with pip's hash-checking mode: every package,
/// transitive ones included, must be pinned with `==` and carry the `--hash` of its file, or pip refuses.
/// Compile the file from its `requirements.in` with `pip-compile --generate-hashes` (its header says how).
pub(crate) fn pip_install_hashed(
    sh: &Shell,
    python: &Path,
    requirements: &Path,
) -> anyhow::Result<()> {
    let text = sh.read_file(requirements)?;
    if let Some(unhashed) = unhashed_requirements(&text).first() {
        anyhow::bail!(
            "{}: `{unhashed}` has no --hash: compile the file again from requirements.in with \
             `pip-compile --generate-hashes` (see its header)",
            requirements.display()
        );
    }
    cmd!(
        sh,
        "{python} -m pip install --quiet --disable-pip-version-check --require-hashes --requirement {requirements}"
    )
    .run()
    .with_context(|| format!("pip could not install {}", requirements.display()))?;
    Ok(())
}

/// The requirements (`name==version` and the lines that continue them) that carry no `--hash=`.
pub(crate) fn unhashed_requirements(text: &str) -> Vec<String> {
    // Join continued lines, then drop comments and options such as `--find-links`.
    let joined = text.replace("\\\n", " ");
    joined
        .lines()
        .map(|line| line.split(" #").next().unwrap_or(line).trim())
        .filter(|line| !line.is_empty() && !line.starts_with('#') && !line.starts_with('-'))
        .filter(|line| !line.contains("--hash=sha256:"))
        .map(|line| line.split_whitespace().next().unwrap_or(line).to_owned())
        .collect()
}

/// The hard open-files limit, when the soft one is below [`NOFILE_WANTED`] and the hard one is higher: the
/// limit load tests run their children with (see [`with_nofile`]).
pub(crate) fn nofile_to_raise() -> anyhow::Result<Option<u64>> {
    let Some((soft, hard)) = crate::procfs::open_files_limits()? else {
        return Ok(None);
    };
    if soft >= NOFILE_WANTED {
        return Ok(None);
    }
    if hard < NOFILE_WANTED {
        println!(
            "warning: the open-files limit is {soft} (hard {hard}); runs with thousands of connections may fail"
        );
    }
    Ok((hard > soft).then_some(hard.min(65536)))
}

/// A command that runs `program` with the open-files limit raised to `nofile`, keeping its PID (the shell
/// `exec`s it); a plain command when there is nothing to raise.
pub(crate) fn with_nofile(program: &Path, nofile: Option<u64>) -> Command {
    match nofile {
        None => Command::new(program),
        Some(limit) => {
            let mut command = Command::new("sh");
            command
                .arg("-c")
                .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                .arg(program);
            command
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both venvs install with hashes: a requirement without one would be refused by pip only at install
    /// time, on a fresh machine; this says so at test time.
    #[test]
    fn every_python_requirement_is_pinned_with_a_hash() {
        for file in ["xtask/k8s/requirements.txt", "xtask/audit/requirements.txt"] {
            let text = std::fs::read_to_string(root().join(file)).expect("must succeed");
            assert_eq!(unhashed_requirements(&text), Vec::<String>::new(), "{file}");
            let pinned = text.lines().filter(|l| l.contains("==")).count();
            assert!(pinned >= 2, "{file} pins {pinned} packages");
        }
    }

    #[test]
    fn a_requirement_without_a_hash_is_found() {
        let text = "# comment\nfoo==1.0 \\\n    --hash=sha256:abc\n    # via bar\nbar==2.0\n--find-links x\n";
        assert_eq!(unhashed_requirements(text), vec!["bar==2.0".to_owned()]);
    }
}
