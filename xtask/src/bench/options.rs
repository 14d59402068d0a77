//! The task's flags, declared for clap (`cargo xtask bench --help`), and the options a run reads
//! from them.

use anyhow::bail;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// Load-test Petra and Klaus beside an nginx pair on loopback, and check the performance budget.
///
/// Writes target/bench/summary.md, target/bench/summary.json and oha's reports in
/// target/bench/raw/.
#[derive(Debug, Args)]
#[command(
    after_help = "OTEL_* variables in the bench's environment are passed to every Petra and \
Klaus it starts (nothing else is): with --baseline on an older revision, that measures the cost of \
exporting traces (start a receiver first, such as `tracesink --quiet`)."
)]
pub(crate) struct BenchArgs {
    /// A smoke run: 2 s per case after a 1 s warm-up, 3 startup runs, a quiet-wait of 5 s; the
    /// flags below override these.
    #[arg(long)]
    quick: bool,
    /// Measure only Petra direct or only Klaus end to end (and its nginx reference), or only the
    /// placement cases (Klaus across a link, and under overload).
    #[arg(long, value_name = "SERVICE")]
    only: Option<Service>,
    /// Measured window per case, in seconds (default 10).
    #[arg(long, value_name = "SECS", value_parser = seconds)]
    duration: Option<Duration>,
    /// Warm-up before each case, not measured, in seconds (default 2).
    #[arg(long, value_name = "SECS", value_parser = seconds)]
    warmup: Option<Duration>,
    /// Before each case, wait up to this long for other processes' load to pass, in seconds
    /// (default 30; 0 never waits).
    #[arg(long, value_name = "SECS", value_parser = seconds)]
    quiet_wait: Option<Duration>,
    /// A/B: also build REV's petra and klaus (a git revision: 229de98, HEAD~3) in a temporary
    /// worktree, run Klaus end to end at 64 connections for that pair and the current pair in
    /// interleaved rounds, and check that the current pair's median CPU per request is at most
    /// 1.10x the baseline's.
    #[arg(long, value_name = "REV", value_parser = revision)]
    baseline: Option<String>,
    /// Rounds of the A/B comparison, each pair once per round (default 3; needs --baseline).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=20))]
    rounds: Option<u8>,
}

/// What `--only` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum Service {
    Petra,
    Klaus,
    Placement,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Self::Petra => "petra",
            Self::Klaus => "klaus",
            Self::Placement => "placement",
        }
    }
}

/// A number of seconds in 0..=600, fractions allowed.
fn seconds(value: &str) -> Result<Duration, String> {
    let secs: f64 = value
        .parse()
        .map_err(|_| format!("'{value}' is not a number"))?;
    if !(0.0..=600.0).contains(&secs) {
        return Err(format!("{secs} is outside 0..=600 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A git revision: not empty (clap already refuses one that starts with `-`).
fn revision(value: &str) -> Result<String, String> {
    if value.is_empty() {
        return Err("--baseline needs a git revision".to_owned());
    }
    Ok(value.to_owned())
}

/// The task's options.
#[derive(Debug, Clone)]
pub(super) struct Options {
    pub(super) duration: Duration,
    pub(super) warmup: Duration,
    pub(super) startup_runs: usize,
    only: Option<Service>,
    /// How long to wait before each case for other processes' load to pass.
    pub(super) quiet_wait: Duration,
    /// The revision to compare Klaus with (`--baseline`), if any.
    pub(super) baseline: Option<String>,
    /// Rounds of that comparison; each pair runs once per round.
    pub(super) rounds: usize,
    /// Whether `--rounds` was given (it needs `--baseline`).
    pub(super) rounds_given: bool,
    /// A smoke run (`--quick`): its placement plot is not written to `docs/`.
    pub(super) quick: bool,
}

impl Options {
    /// The options of `args`: `--quick`'s defaults or the full run's, then the flags given.
    pub(super) fn new(args: BenchArgs) -> anyhow::Result<Self> {
        let quick = args.quick;
        let (duration, warmup, startup_runs, quiet_wait) =
            if quick { (2, 1, 3, 5) } else { (10, 2, 7, 30) };
        // A window or warm-up of nothing measures nothing: at least 100 ms each.
        let at_least = |d: Duration| d.max(Duration::from_millis(100));
        let options = Self {
            duration: args
                .duration
                .map_or(Duration::from_secs(duration), at_least),
            warmup: args.warmup.map_or(Duration::from_secs(warmup), at_least),
            startup_runs,
            only: args.only,
            quiet_wait: args.quiet_wait.unwrap_or(Duration::from_secs(quiet_wait)),
            baseline: args.baseline,
            rounds: args.rounds.map_or(3, usize::from),
            rounds_given: args.rounds.is_some(),
            quick,
        };
        check_options(&options)?;
        Ok(options)
    }

    /// Whether the run measures `service` (`petra`, `klaus` or `placement`).
    pub(super) fn measures(&self, service: &str) -> bool {
        self.only.is_none_or(|only| only.name() == service)
    }
}

/// Refuses `--baseline` where the A/B rounds would not run.
fn check_options(options: &Options) -> anyhow::Result<()> {
    if options.baseline.is_none() && options.rounds_given {
        bail!("--rounds counts the rounds of --baseline; give a baseline too");
    }
    if options.baseline.is_some() && !options.measures("klaus") {
        bail!("--baseline compares Klaus end to end; it does not go with --only petra");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn options(args: &[&str]) -> anyhow::Result<Options> {
        let cli = Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))?;
        Options::new(cli.bench)
    }

    #[test]
    fn quick_sets_short_windows_and_flags_override_them() {
        let quick = options(&["--quick"]).expect("valid flags");
        assert_eq!(quick.duration, Duration::from_secs(2));
        assert_eq!(quick.warmup, Duration::from_secs(1));
        assert_eq!(quick.startup_runs, 3);
        assert!(quick.quick);
        let longer = options(&["--quick", "--duration", "4.5"]).expect("valid flags");
        assert_eq!(longer.duration, Duration::from_millis(4500));
        let full = options(&[]).expect("no flags");
        assert_eq!(full.duration, Duration::from_secs(10));
        assert_eq!(full.quiet_wait, Duration::from_secs(30));
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(options(&["--duration", "601"]).is_err());
        assert!(options(&["--duration", "ten"]).is_err());
        assert!(options(&["--only", "nginx"]).is_err());
        assert!(options(&["--rounds", "21", "--baseline", "HEAD"]).is_err());
        assert!(
            options(&["--rounds", "2"]).is_err(),
            "--rounds needs --baseline"
        );
        assert!(options(&["--baseline", "HEAD", "--only", "petra"]).is_err());
        assert!(options(&["--baseline", "-x"]).is_err());
    }

    #[test]
    fn only_narrows_what_is_measured() {
        let only = options(&["--only", "klaus"]).expect("valid flags");
        assert!(only.measures("klaus") && !only.measures("petra"));
        let all = options(&[]).expect("no flags");
        assert!(all.measures("petra") && all.measures("placement"));
    }
}
