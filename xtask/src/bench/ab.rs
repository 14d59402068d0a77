//! `cargo xtask bench --baseline REV`: Klaus end to end at 64 connections, another revision's
//! release binaries against the current ones, in interleaved rounds within one run.
//!
//! The baseline is built in a temporary git worktree (removed afterwards) with its own target
//! directory under `target/bench-baseline/`, by the toolchain that builds the current binaries,
//! so that the comparison is of code and not of compilers. Its two binaries are kept there by
//! commit and compiler, so a rerun against the same revision builds nothing. Both pairs are
//! fresh processes started together; the rounds alternate which pair goes first, so that a drift
//! in the machine's load does not always land on the same side.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use serde_json::{Value, json};
use xshell::{Shell, cmd};

use super::Binaries;
use super::budget::{self, Check, median};
use super::cases::{BUDGET_CONNECTIONS, Case, Mode, Target, target};
use super::machine::{Machine, Tools};
use super::measure::{Measured, measure, wait_for_quiet};
use super::options::Options;
use super::services::{klaus_env, petra_env};
use super::stack::Stack;
use crate::util::{root, step};

/// The process groups of the two pairs.
const BASELINE_PETRA: &str = "baseline-petra";
const BASELINE_KLAUS: &str = "baseline-klaus";
const CURRENT_PETRA: &str = "current-petra";
const CURRENT_KLAUS: &str = "current-klaus";

/// Klaus's HTTPS front of each pair; a request costs that Klaus and its own Petra.
const BASELINE: Target = target(
    BASELINE_KLAUS,
    "klaus",
    false,
    &[BASELINE_KLAUS, BASELINE_PETRA],
);
const CURRENT: Target = target(
    CURRENT_KLAUS,
    "klaus",
    true,
    &[CURRENT_KLAUS, CURRENT_PETRA],
);

/// The baseline's release binaries and the two revisions compared.
#[derive(Debug)]
pub(super) struct Baseline {
    /// The revision as given on the command line.
    rev: String,
    commit: String,
    subject: String,
    /// The current revision: `HEAD`'s short hash, and whether tracked files differ from it.
    current: String,
    /// The compiler both pairs are built with.
    toolchain: Toolchain,
    bins: Binaries,
}

impl Baseline {
    /// Resolves `rev` to a commit and finds the toolchain, so that a mistyped revision fails
    /// the run before anything is built.
    pub(super) fn resolve(sh: &Shell, rev: &str) -> anyhow::Result<Self> {
        let spec = format!("{rev}^{{commit}}");
        let commit = cmd!(sh, "git rev-parse --verify --quiet {spec}")
            .quiet()
            .ignore_stderr()
            .read()
            .ok()
            .filter(|c| !c.is_empty())
            .with_context(|| format!("--baseline {rev}: not a commit in this repository"))?;
        let subject = cmd!(sh, "git log -1 --format=%s {commit}").quiet().read()?;
        let head = cmd!(sh, "git rev-parse --short HEAD").quiet().read()?;
        let dirty = !cmd!(sh, "git status --porcelain --untracked-files=no")
            .quiet()
            .read()?
            .is_empty();
        let current = if dirty {
            format!("{head} + uncommitted changes")
        } else {
            head
        };
        let toolchain = Toolchain::current(sh)?;
        let kept = cache().join("bin").join(&commit).join(&toolchain.rustc);
        Ok(Self {
            rev: rev.to_owned(),
            commit,
            subject,
            current,
            toolchain,
            bins: Binaries {
                petra: kept.join("petra"),
                klaus: kept.join("klaus"),
            },
        })
    }

    /// Builds the baseline's petra and klaus in release in a temporary worktree, unless
    /// binaries of that commit and compiler are already kept.
    pub(super) fn build(&self, sh: &Shell) -> anyhow::Result<()> {
        let (rev, commit) = (&self.rev, &self.commit);
        let short = &commit[..commit.len().min(10)];
        if self.bins.petra.is_file() && self.bins.klaus.is_file() {
            println!("    {rev} = {short}: binaries kept from an earlier build");
            return Ok(());
        }
        println!("    {rev} = {short}: building in a temporary worktree");
        let cache = cache();
        let worktree = Worktree::add(sh, &cache.join("src"), commit)?;
        {
            let _dir = sh.push_dir(&worktree.path);
            // A target directory of its own: sharing `target/` (or only its build-dir) would
            // not work, since cargo names a workspace's own crates by their path relative to
            // the workspace root, the same in both checkouts, so each build would overwrite the
            // other's serving, petra and klaus and recompile them every run.
            let _target = sh.push_env("CARGO_TARGET_DIR", cache.join("target"));
            let _toolchain = self
                .toolchain
                .name
                .as_ref()
                .map(|name| sh.push_env("RUSTUP_TOOLCHAIN", name));
            cmd!(sh, "cargo build --release --locked -p petra -p klaus")
                .run()
                .with_context(|| format!("--baseline {rev} ({short}) does not build"))?;
        }
        // Copied next to each other first and then renamed as one, so that a run stopped
        // half-way leaves no pair that looks complete.
        let kept = self
            .bins
            .petra
            .parent()
            .context("no folder for the binaries")?;
        let partial = kept.with_file_name(format!("{}.partial", self.toolchain.rustc));
        for dir in [&partial, kept] {
            if dir.exists() {
                fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
            }
        }
        fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
        for name in ["petra", "klaus"] {
            let built = cache.join("target/release").join(name);
            fs::copy(&built, partial.join(name))
                .with_context(|| format!("copying {}", built.display()))?;
        }
        fs::rename(&partial, kept).with_context(|| format!("renaming {}", kept.display()))?;
        drop(worktree);
        Ok(())
    }
}

/// Where baselines are built and kept: `target/bench-baseline/` (`src` the worktree while it
/// lives, `target` its cargo target directory, `bin/COMMIT/RUSTC/` the binaries).
fn cache() -> PathBuf {
    root().join("target/bench-baseline")
}

/// The compiler that builds the current binaries.
#[derive(Debug)]
struct Toolchain {
    /// The rustup toolchain, when rustup is in use: what `cargo xtask` passes down in
    /// `RUSTUP_TOOLCHAIN`, else what the workspace's `rust-toolchain.toml` selects.
    name: Option<String>,
    /// `rustc`'s release and commit, e.g. `1.95.0-59807616e`: part of where binaries are kept.
    rustc: String,
}

impl Toolchain {
    fn current(sh: &Shell) -> anyhow::Result<Self> {
        let name = std::env::var("RUSTUP_TOOLCHAIN")
            .ok()
            .filter(|name| !name.is_empty())
            .or_else(|| {
                let active = cmd!(sh, "rustup show active-toolchain")
                    .quiet()
                    .ignore_stderr()
                    .read()
                    .ok()?;
                active.split_whitespace().next().map(str::to_owned)
            });
        let version = {
            let _toolchain = name.as_ref().map(|n| sh.push_env("RUSTUP_TOOLCHAIN", n));
            cmd!(sh, "rustc -vV").quiet().read()?
        };
        let field = |key: &str| {
            version
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(str::trim)
                .unwrap_or("unknown")
                .to_owned()
        };
        let hash = field("commit-hash:");
        Ok(Self {
            name,
            rustc: format!("{}-{}", field("release:"), &hash[..hash.len().min(9)]),
        })
    }
}

/// A detached git worktree of one commit. Dropping it removes it (the target directory is
/// elsewhere and stays).
struct Worktree {
    path: PathBuf,
}

impl Worktree {
    fn add(sh: &Shell, path: &Path, commit: &str) -> anyhow::Result<Self> {
        // A run stopped by a signal cannot remove its worktree; this one clears it first.
        if path.exists() {
            let _ = cmd!(sh, "git worktree remove --force {path}")
                .quiet()
                .ignore_stderr()
                .run();
            if path.exists() {
                fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))?;
            }
        }
        cmd!(sh, "git worktree prune").quiet().run()?;
        cmd!(sh, "git worktree add --quiet --detach {path} {commit}")
            .quiet()
            .run()?;
        Ok(Self {
            path: path.to_owned(),
        })
    }
}

impl Drop for Worktree {
    fn drop(&mut self) {
        let removed = Command::new("git")
            .current_dir(root())
            .args(["worktree", "remove", "--force"])
            .arg(&self.path)
            .status();
        if !removed.is_ok_and(|s| s.success()) {
            println!(
                "warning: could not remove the worktree {}; `git worktree remove --force` it",
                self.path.display()
            );
        }
    }
}

/// One pair's measurement in one round.
#[derive(Debug)]
struct Run {
    round: usize,
    baseline: bool,
    measured: Measured,
}

/// What the A/B rounds found.
#[derive(Debug)]
pub(super) struct Ab {
    baseline: Baseline,
    /// In the order they ran.
    runs: Vec<Run>,
}

/// The medians of one pair's rounds.
#[derive(Debug, Clone, Copy)]
struct Medians {
    cpu_us_per_request: f64,
    rps: f64,
    p99_ms: f64,
}

/// Starts both pairs, then measures Klaus's HTTPS front at 64 connections for each in
/// `options.rounds` rounds, the order alternating, each after the quiet-wait and the warm-up.
pub(super) fn run(
    baseline: Baseline,
    current: &Binaries,
    tools: &Tools,
    certs: &Path,
    out: &Path,
    options: &Options,
    machine: &Machine,
) -> anyhow::Result<Ab> {
    let stack = step("A/B: start the baseline pair and the current pair", || {
        start(&baseline.bins, current, tools, certs, out)
    })?;
    let total = 2 * options.rounds;
    let mut runs = Vec::with_capacity(total);
    for round in 1..=options.rounds {
        let order = if round % 2 == 1 {
            [true, false]
        } else {
            [false, true]
        };
        for is_baseline in order {
            let target = if is_baseline { BASELINE } else { CURRENT };
            let case = Case {
                id: format!("{}/r{round}-c{BUDGET_CONNECTIONS}", target.key),
                target,
                conns: BUDGET_CONNECTIONS,
                mode: Mode::KeepAlive,
            };
            let label = format!("[A/B {}/{total}] {}", runs.len() + 1, case.id);
            wait_for_quiet(&stack, machine, options.quiet_wait)?;
            let measured = step(&label, || {
                measure(&stack, tools, certs, out, &case, options, machine)
            })?;
            println!("    {}", measured.one_line());
            runs.push(Run {
                round,
                baseline: is_baseline,
                measured,
            });
        }
    }
    Ok(Ab { baseline, runs })
}

/// Petra and Klaus (HTTPS front, `RUST_LOG=info`) of each revision, each Klaus calling its own
/// Petra, checked once like the main stack.
fn start(
    baseline: &Binaries,
    current: &Binaries,
    tools: &Tools,
    certs: &Path,
    out: &Path,
) -> anyhow::Result<Stack> {
    let mut stack = Stack {
        groups: Default::default(),
        urls: Default::default(),
        procs: Vec::new(),
    };
    for (bins, petra, klaus) in [
        (baseline, BASELINE_PETRA, BASELINE_KLAUS),
        (current, CURRENT_PETRA, CURRENT_KLAUS),
    ] {
        let (env, petra_port) = petra_env(petra, certs, "info")?;
        stack.start_service(&bins.petra, &env, out, tools)?;
        stack
            .urls
            .insert(petra, format!("https://127.0.0.1:{petra_port}/"));
        let (env, port) = klaus_env(klaus, certs, petra_port, true, "info")?;
        stack.start_service(&bins.klaus, &env, out, tools)?;
        stack
            .urls
            .insert(klaus, format!("https://127.0.0.1:{port}/"));
    }
    stack.sanity_check(tools, certs)?;
    Ok(stack)
}

impl Ab {
    fn arm(&self, baseline: bool) -> impl Iterator<Item = &Measured> {
        self.runs
            .iter()
            .filter(move |r| r.baseline == baseline)
            .map(|r| &r.measured)
    }

    fn medians(&self, baseline: bool) -> Medians {
        let of = |f: fn(&Measured) -> f64| {
            let mut values: Vec<f64> = self.arm(baseline).map(f).collect();
            values.sort_by(f64::total_cmp);
            median(&values)
        };
        Medians {
            cpu_us_per_request: of(|m| m.cpu_us_per_request),
            rps: of(|m| m.rps),
            p99_ms: of(|m| m.p99_ms),
        }
    }

    /// Errors and non-2xx responses of one pair over its rounds.
    fn failed(&self, baseline: bool) -> u64 {
        self.arm(baseline).map(|m| m.errors + m.non_2xx).sum()
    }

    /// The current pair's measurements, for the budget's errors line.
    pub(super) fn current(&self) -> impl Iterator<Item = &Measured> {
        self.arm(false)
    }

    /// The budget line: the current pair's median CPU per Klaus request at most
    /// [`budget::AB_CPU_RATIO`] times the baseline's. A comparison in which either pair failed
    /// requests is void, and misses.
    pub(super) fn check(&self) -> Check {
        let (base, cur) = (self.medians(true), self.medians(false));
        let limit = budget::AB_CPU_RATIO * base.cpu_us_per_request;
        let failed_base = self.failed(true);
        let mut figure = format!(
            "{:.1} vs {:.1} µs ({:+.1} %)",
            cur.cpu_us_per_request,
            base.cpu_us_per_request,
            (cur.cpu_us_per_request / base.cpu_us_per_request - 1.0) * 100.0
        );
        if failed_base > 0 {
            let _ = write!(
                figure,
                "; the baseline failed {failed_base} requests, so the comparison is void"
            );
        }
        Check {
            line: format!(
                "CPU per Klaus request vs baseline {} (A/B, medians of {} rounds), 64 conns",
                self.baseline.rev,
                self.rounds()
            ),
            figure,
            limit: format!("≤ {:.2}× baseline = {limit:.1} µs", budget::AB_CPU_RATIO),
            pass: Some(
                cur.cpu_us_per_request <= limit && failed_base == 0 && self.failed(false) == 0,
            ),
        }
    }

    fn rounds(&self) -> usize {
        self.runs.iter().map(|r| r.round).max().unwrap_or(0)
    }

    /// The A/B section of the markdown report: every run, then the medians.
    pub(super) fn markdown(&self, md: &mut String) {
        let b = &self.baseline;
        let _ = writeln!(
            md,
            "\nA/B, Klaus e2e with the HTTPS front at {BUDGET_CONNECTIONS} connections: current \
             {} against baseline {} = {} ({}). {} rounds, the baseline first in odd rounds; both \
             pairs fresh and started together, built by rustc {}; CPU is Klaus + Petra.\n",
            b.current,
            b.rev,
            &b.commit[..b.commit.len().min(10)],
            shorten(&b.subject, 80),
            self.rounds(),
            b.toolchain.rustc
        );
        md.push_str(
            "| round | build | req/s | p50 ms | p99 ms | errors | non-2xx | server CPU µs/req | other load |\n\
             |--:|---|--:|--:|--:|--:|--:|--:|--:|\n",
        );
        for r in &self.runs {
            let m = &r.measured;
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.3} | {:.3} | {} | {} | {:.1} | {:.0} % |",
                r.round,
                if r.baseline { "baseline" } else { "current" },
                m.rps,
                m.p50_ms,
                m.p99_ms,
                m.errors,
                m.non_2xx,
                m.cpu_us_per_request,
                m.background_pct
            );
        }
        for (name, baseline) in [("baseline", true), ("current", false)] {
            let m = self.medians(baseline);
            let _ = writeln!(
                md,
                "| median | {name} | {:.0} | | {:.3} | | | {:.1} | |",
                m.rps, m.p99_ms, m.cpu_us_per_request
            );
        }
    }

    /// The A/B part of `summary.json`.
    pub(super) fn json(&self) -> Value {
        let b = &self.baseline;
        let medians = |baseline| {
            let m = self.medians(baseline);
            json!({
                "cpu_us_per_request": m.cpu_us_per_request,
                "requests_per_second": m.rps,
                "p99_ms": m.p99_ms,
            })
        };
        let (base, cur) = (self.medians(true), self.medians(false));
        json!({
            "rev": b.rev,
            "commit": b.commit,
            "subject": b.subject,
            "current": b.current,
            "rustc": b.toolchain.rustc,
            "rounds": self.rounds(),
            "runs": self.runs.iter().map(|r| {
                let mut run = r.measured.json();
                run["round"] = json!(r.round);
                run["build"] = json!(if r.baseline { "baseline" } else { "current" });
                run
            }).collect::<Vec<_>>(),
            "median": { "baseline": medians(true), "current": medians(false) },
            "cpu_ratio": cur.cpu_us_per_request / base.cpu_us_per_request,
        })
    }
}

/// `text` cut to `max` characters, with an ellipsis when cut.
fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}
