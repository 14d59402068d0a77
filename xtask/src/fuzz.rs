//! `cargo xtask fuzz [--seconds N] [TARGET...]`: runs the fuzz targets in `fuzz/` for a bounded
//! time each.
//!
//! The fuzzer is libFuzzer, driven by cargo-fuzz, with AddressSanitizer and debug assertions on.
//! It needs a nightly Rust toolchain (`cargo +nightly`); the project itself builds on stable.
//! cargo-fuzz is installed into `target/tools` (or `$XTASK_TOOLS_ROOT`) on first use. Each target
//! starts from a copy of its seed corpus in `fuzz/corpus/<target>` plus seeds made on the fly
//! (keys, key/certificate pairs: no private key is ever committed), and grows that copy in
//! `target/fuzz/corpus/<target>`, so the repository's corpus stays small and hand-made. A crash,
//! panic, leak or slow input (over [`INPUT_TIMEOUT_SECS`]) fails the task and leaves the input in
//! `target/fuzz/artifacts/<target>/`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use xshell::{Shell, cmd};

use crate::util::{root, shell, step};

/// Total fuzzing time across all targets, unless `--seconds` says otherwise.
const DEFAULT_SECONDS: u64 = 60;

/// The longest a single input may take before libFuzzer reports it as a hang.
const INPUT_TIMEOUT_SECS: u64 = 5;

/// The largest input libFuzzer makes: room for a certificate chain plus a key.
const MAX_LEN: usize = 8192;

/// Where the fuzz targets are built: `$XTASK_FUZZ_TARGET_DIR` when set (a folder outside the
/// clone, so that CI's fresh checkouts do not rebuild the ASan targets every run), otherwise
/// `target/fuzz/build`.
fn build_dir(work: &std::path::Path) -> std::path::PathBuf {
    std::env::var_os("XTASK_FUZZ_TARGET_DIR")
        .filter(|dir| !dir.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| work.join("build"))
}

/// Run the cargo-fuzz targets (libFuzzer, nightly) for a bounded time in total.
#[derive(Debug, clap::Args)]
pub(crate) struct FuzzArgs {
    /// Total fuzzing time across the targets, in whole seconds.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SECONDS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) seconds: u64,
    /// The targets to run (default: every target in fuzz/Cargo.toml).
    #[arg(value_name = "TARGET")]
    pub(crate) targets: Vec<String>,
}

impl Default for FuzzArgs {
    fn default() -> Self {
        Self {
            seconds: DEFAULT_SECONDS,
            targets: Vec::new(),
        }
    }
}

/// Runs every fuzz target (or the named ones) for `--seconds` in total.
pub(crate) fn fuzz(args: FuzzArgs) -> anyhow::Result<()> {
    let FuzzArgs {
        seconds,
        targets: only,
    } = args;
    let sh = shell()?;
    let root = root();
    let work = root.join("target").join("fuzz");
    step("nightly toolchain (cargo-fuzz needs it)", || {
        ensure_nightly(&sh)
    })?;
    let cargo_fuzz = step("cargo-fuzz", || crate::tools::cargo_fuzz(&sh))?;
    let targets = list_targets(&sh, &cargo_fuzz)?;
    let targets: Vec<String> = if only.is_empty() {
        targets
    } else {
        for name in &only {
            if !targets.contains(name) {
                bail!(
                    "no fuzz target '{name}'; the targets are {}",
                    targets.join(", ")
                );
            }
        }
        only
    };
    let per_target = (seconds / targets.len() as u64).max(1);
    step(
        "build the fuzz targets (nightly, ASan, debug assertions)",
        || {
            let target_dir = build_dir(&work);
            fuzz_cmd(&sh, &cargo_fuzz, "build")
                .args(["--debug-assertions", "--target-dir"])
                .arg(&target_dir)
                .run()
                .context("cargo fuzz build failed")?;
            Ok(())
        },
    )?;
    step("seed corpora (fuzz/corpus and generated PEM)", || {
        seed(&sh, &work, &targets)
    })?;
    let mut summary = Vec::new();
    let mut failed = Vec::new();
    for target in &targets {
        let result = step(
            &format!("fuzz {target} for {per_target}s (libFuzzer)"),
            || run_target(&sh, &cargo_fuzz, &work, target, per_target),
        );
        match result {
            Ok(line) => summary.push(line),
            Err(err) => {
                summary.push(format!("{target}: FAILED"));
                failed.push(format!("{target}: {err:#}"));
            }
        }
    }
    println!("fuzz summary (libFuzzer via cargo-fuzz, {per_target}s per target):");
    for line in &summary {
        println!("  {line}");
    }
    if !failed.is_empty() {
        bail!(
            "{} fuzz target(s) failed:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }
    Ok(())
}

/// Fails with a clear message when `cargo +nightly` does not work.
fn ensure_nightly(sh: &Shell) -> anyhow::Result<()> {
    match cmd!(sh, "cargo +nightly --version").quiet().read() {
        Ok(version) => {
            println!("{version}");
            Ok(())
        }
        Err(err) => bail!(
            "cargo xtask fuzz uses cargo-fuzz (libFuzzer), which needs a nightly Rust toolchain \
             for its sanitizer and coverage flags, but `cargo +nightly` does not work here \
             ({err}). \
             Install one (`rustup toolchain install nightly --profile minimal`) and run again; \
             the rest of the project needs only the pinned stable toolchain."
        ),
    }
}

/// `cargo +nightly fuzz ...`, with the pinned cargo-fuzz binary.
fn fuzz_cmd<'a>(sh: &'a Shell, cargo_fuzz: &Path, subcommand: &str) -> xshell::Cmd<'a> {
    // A cargo subcommand binary gets its own name as the first argument; RUSTUP_TOOLCHAIN makes
    // the `cargo` it runs the nightly one, as `cargo +nightly fuzz` would.
    cmd!(sh, "{cargo_fuzz} fuzz {subcommand} --fuzz-dir fuzz").env("RUSTUP_TOOLCHAIN", "nightly")
}

/// The fuzz targets, as cargo-fuzz reads them from `fuzz/Cargo.toml`.
fn list_targets(sh: &Shell, cargo_fuzz: &Path) -> anyhow::Result<Vec<String>> {
    let listed = fuzz_cmd(sh, cargo_fuzz, "list")
        .quiet()
        .read()
        .context("cargo fuzz list failed")?;
    let targets: Vec<String> = listed
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if targets.is_empty() {
        bail!("cargo fuzz list found no targets in fuzz/Cargo.toml");
    }
    Ok(targets)
}

/// Fills `target/fuzz/corpus/<target>` with the repository's seeds and with PEM seeds made now
/// by the project's own certificate tool (`petra certs`), and writes the PEM dictionary.
fn seed(sh: &Shell, work: &Path, targets: &[String]) -> anyhow::Result<()> {
    for target in targets {
        let corpus = sh.create_dir(work.join("corpus").join(target))?;
        let seeds = root().join("fuzz").join("corpus").join(target);
        if sh.path_exists(&seeds) {
            for file in sh.read_dir(&seeds)? {
                if let Some(name) = file.file_name() {
                    sh.copy_file(&file, corpus.join(name))?;
                }
            }
        }
    }
    // Throwaway keys and certificates; they live only under target/.
    let certs = work.join("certs");
    cmd!(
        sh,
        "cargo run --quiet --locked --package petra -- certs --out {certs} --force --new-ca"
    )
    .quiet()
    .ignore_stdout()
    .run()
    .context("`petra certs` could not make the throwaway PEM seeds")?;
    let read = |path: &str| {
        sh.read_binary_file(certs.join(path))
            .with_context(|| format!("petra certs wrote no {path}"))
    };
    let (petra_crt, petra_key) = (read("petra/tls.crt")?, read("petra/tls.key")?);
    let (klaus_crt, klaus_key) = (read("klaus/tls.crt")?, read("klaus/tls.key")?);
    let ca_crt = read("ca.crt")?;
    let keys = key_variants(&petra_key);
    let chain = [petra_crt.as_slice(), ca_crt.as_slice()].concat();
    let mut written = 0;
    let mut write = |target: &str, name: &str, data: &[u8]| -> anyhow::Result<()> {
        if targets.iter().any(|t| t == target) {
            sh.write_file(work.join("corpus").join(target).join(name), data)?;
            written += 1;
        }
        Ok(())
    };
    for (name, key) in &keys {
        write("pem_key", &format!("gen-{name}"), key)?;
        write("pem_certs", &format!("gen-{name}"), key)?;
        write(
            "identity",
            &format!("gen-{name}"),
            &[&petra_crt, &b"\0"[..], key].concat(),
        )?;
    }
    write("pem_certs", "gen-chain", &chain)?;
    write(
        "pem_certs",
        "gen-cert-and-key",
        &[&petra_crt[..], &petra_key].concat(),
    )?;
    write(
        "identity",
        "gen-chain-pair",
        &[&chain[..], b"\0", &petra_key].concat(),
    )?;
    write(
        "identity",
        "gen-klaus-pair",
        &[&klaus_crt[..], b"\0", &klaus_key].concat(),
    )?;
    write(
        "identity",
        "gen-mismatch",
        &[&petra_crt[..], b"\0", &klaus_key].concat(),
    )?;
    println!("{written} generated PEM seeds (throwaway keys from `petra certs`)");
    let dict: String = PEM_LABELS
        .iter()
        .flat_map(|label| {
            [
                format!("-----BEGIN {label}-----"),
                format!("-----END {label}-----"),
            ]
        })
        .chain(["-----".to_owned(), "\n".to_owned()])
        .map(|token| format!("\"{}\"\n", dict_escape(&token)))
        .collect();
    sh.write_file(work.join("pem.dict"), dict)?;
    Ok(())
}

/// A libFuzzer dictionary entry's body: printable ASCII as is, anything else as `\xNN`.
fn dict_escape(token: &str) -> String {
    token
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' => format!("\\{}", char::from(b)),
            b' '..=b'~' => char::from(b).to_string(),
            _ => format!("\\x{b:02X}"),
        })
        .collect()
}

/// PEM labels the parsers know, or nearly know; the dictionary helps libFuzzer reach them.
const PEM_LABELS: &[&str] = &[
    "CERTIFICATE",
    "PRIVATE KEY",
    "RSA PRIVATE KEY",
    "EC PRIVATE KEY",
    "ENCRYPTED PRIVATE KEY",
    "PUBLIC KEY",
    "X509 CRL",
    "CERTIFICATE REQUEST",
];

/// A fresh PKCS#8 key and broken or relabelled forms of it.
fn key_variants(key: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let text = String::from_utf8_lossy(key);
    let relabel = |label: &str| text.replace("PRIVATE KEY", label).into_bytes();
    let mut bad_base64 = key.to_vec();
    if let Some(at) = bad_base64
        .iter()
        .skip(40)
        .position(u8::is_ascii_alphanumeric)
    {
        bad_base64[40 + at] = b'*';
    }
    vec![
        ("key-pkcs8", key.to_vec()),
        ("key-labelled-sec1", relabel("EC PRIVATE KEY")),
        ("key-labelled-pkcs1", relabel("RSA PRIVATE KEY")),
        ("key-labelled-encrypted", relabel("ENCRYPTED PRIVATE KEY")),
        ("key-truncated", key[..key.len() / 2].to_vec()),
        ("key-bad-base64", bad_base64),
        ("key-crlf", text.replace('\n', "\r\n").into_bytes()),
        ("key-twice", [key, key].concat()),
    ]
}

/// Fuzzes one target for `seconds`; returns its summary line (executions, coverage).
fn run_target(
    sh: &Shell,
    cargo_fuzz: &Path,
    work: &Path,
    target: &str,
    seconds: u64,
) -> anyhow::Result<String> {
    let corpus = work.join("corpus").join(target);
    let artifacts = sh.create_dir(work.join("artifacts").join(target))?;
    // Inputs left by earlier runs; only new ones are this run's.
    let earlier = sh.read_dir(&artifacts)?;
    let logs = sh.create_dir(work.join("logs"))?;
    let dict = work.join("pem.dict");
    let mut libfuzzer = vec![
        format!("-max_total_time={seconds}"),
        format!("-timeout={INPUT_TIMEOUT_SECS}"),
        format!("-max_len={MAX_LEN}"),
        format!("-artifact_prefix={}/", artifacts.display()),
        "-print_final_stats=1".to_owned(),
    ];
    if matches!(target, "pem_certs" | "pem_key" | "identity") {
        libfuzzer.push(format!("-dict={}", dict.display()));
    }
    let target_dir = build_dir(work);
    let output = fuzz_cmd(sh, cargo_fuzz, "run")
        .args(["--debug-assertions", "--target-dir"])
        .arg(&target_dir)
        .arg(target)
        .arg(&corpus)
        .arg("--")
        .args(&libfuzzer)
        .quiet()
        .ignore_status()
        .output()
        .with_context(|| format!("could not start cargo fuzz run {target}"))?;
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    let log_path = logs.join(format!("{target}.log"));
    sh.write_file(&log_path, &log)?;
    if !output.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        for line in tail.iter().rev() {
            eprintln!("  | {line}");
        }
        let inputs: Vec<PathBuf> = sh
            .read_dir(&artifacts)?
            .into_iter()
            .filter(|input| !earlier.contains(input))
            .collect();
        if inputs.is_empty() {
            bail!(
                "the fuzz run failed ({}) without leaving an input; the full log is in {}",
                output.status,
                log_path.display()
            );
        }
        let input = inputs[0].display().to_string();
        bail!(
            "libFuzzer found a failing input ({}): {input}; the full log is in {}; reproduce \
             with: cargo +nightly fuzz run --fuzz-dir fuzz {target} {input}",
            output.status,
            log_path.display(),
        );
    }
    let execs = stat(&log, "stat::number_of_executed_units:").unwrap_or("?");
    let per_sec = stat(&log, "stat::average_exec_per_sec:").unwrap_or("?");
    let coverage = log
        .lines()
        .rev()
        .find_map(|line| line.split_once("DONE"))
        .map(|(_, rest)| {
            rest.split_whitespace()
                .take(6)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let corpus_size = sh.read_dir(&corpus)?.len();
    let line = format!(
        "{target}: {execs} executions in {seconds}s ({per_sec}/s); {coverage}; {corpus_size} files in {}",
        corpus.display()
    );
    println!("{line}");
    Ok(line)
}

/// The value of one of libFuzzer's `-print_final_stats` lines.
fn stat<'a>(log: &'a str, key: &str) -> Option<&'a str> {
    log.lines()
        .find_map(|line| line.trim().strip_prefix(key))
        .map(str::trim)
}
