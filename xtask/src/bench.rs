//! `cargo xtask bench`: load-tests Petra and Klaus on loopback beside an nginx pair doing the
//! same two jobs, records throughput, latency, CPU time per request, memory and startup time,
//! writes `target/bench/*.json` and a markdown table, and checks the performance budget.
//!
//! Everything runs on 127.0.0.1 with ports picked at run time. Every process the task starts
//! is owned by a guard that kills it when dropped, so a failed step leaves nothing behind. The
//! load generator (oha) shares the cores with the servers, so CPU time per request is read
//! from the servers' own `/proc/PID/stat` over the measured window, never from wall time.
//! With `--baseline REV`, [`ab`] also compares Klaus with another revision's build; [`placement`]
//! puts a link between Klaus and Petra and overloads Klaus, and [`plot`] draws what it found.

//!
//! The modules, in the order a run uses them: [`options`] (the flags), [`machine`] (tools and the
//! machine), [`services`] and [`process`] (each process under a guard), [`stack`] (everything
//! under test), [`cases`](mod@cases), [`measure`](mod@measure) (one case), [`report`] (the budget, the table, the JSON);
//! [`nginx`] fills in the reference's configurations from `xtask/bench/`.

mod ab;
mod budget;
mod cases;
mod machine;
mod measure;
mod nginx;
mod options;
mod placement;
mod plot;
mod process;
mod report;
mod services;
mod stack;

use std::fs;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use xshell::cmd;

use self::budget::Check;
use self::cases::{Mode, cases};
use self::machine::{Machine, Tools};
use self::measure::{measure, wait_for_quiet};
pub(crate) use self::options::BenchArgs;
use self::options::Options;
use self::report::Report;
use self::services::startup;
use self::stack::Stack;
use crate::util::{root, shell, step};

/// Runs the benchmark; fails when a figure misses the budget.
pub(crate) fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let options = Options::new(args)?;
    let sh = shell()?;
    let baseline = options
        .baseline
        .as_deref()
        .map(|rev| ab::Baseline::resolve(&sh, rev))
        .transpose()?;
    let out = root().join("target/bench");
    let tools = step("load generator and reference server", || Tools::find(&sh))?;
    step(
        "cargo build --release -p petra -p klaus -p slowlink",
        || {
            cmd!(
                sh,
                "cargo build --release --locked -p petra -p klaus -p slowlink"
            )
            .run()?;
            Ok(())
        },
    )?;
    let bins = Binaries {
        petra: root().join("target/release/petra"),
        klaus: root().join("target/release/klaus"),
    };
    // Built before anything is measured, so that a revision that does not build fails the run
    // at once.
    if let Some(baseline) = &baseline {
        step("baseline: release build of petra and klaus", || {
            baseline.build(&sh)
        })?;
    }
    let certs = out.join("certs");
    step("certificates", || {
        if certs.exists() {
            fs::remove_dir_all(&certs).with_context(|| format!("removing {}", certs.display()))?;
        }
        let (petra, dir) = (&bins.petra, &certs);
        cmd!(sh, "{petra} certs --out {dir}")
            .quiet()
            .ignore_stdout()
            .run()?;
        Ok(())
    })?;
    for dir in ["raw", "logs"] {
        fs::create_dir_all(out.join(dir)).context("creating target/bench")?;
    }
    let machine = Machine::read(&sh, &tools)?;
    println!(
        "machine: {} cores, {}; load average {}",
        machine.cores, machine.cpu, machine.load_before
    );
    if machine.busy() {
        println!(
            "warning: the machine is busy (load average {}); other processes skew every figure, \
             see the 'other load' column",
            machine.load_before
        );
    }

    let startup = step("startup to ready", || {
        startup(&bins, &certs, &out, &options)
    })?;
    let stack = step("start Petra, Klaus and the nginx pair", || {
        Stack::start(&bins, &tools, &certs, &out)
    })?;
    // Let the allocators and the runtimes settle before reading idle memory.
    thread::sleep(Duration::from_secs(1));
    let idle = stack.idle_rss()?;

    let cases = cases(&options);
    let mut results = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let label = format!("[{}/{}] {}", i + 1, cases.len(), case.id);
        wait_for_quiet(&stack, &machine, options.quiet_wait)?;
        let measured = step(&label, || {
            measure(&stack, &tools, &certs, &out, case, &options, &machine)
        })?;
        println!("    {}", measured.one_line());
        results.push(measured);
    }
    let peak = stack.peak_rss()?;
    drop(stack);
    let placement = options
        .measures("placement")
        .then(|| placement::run(&bins, &tools, &certs, &out, &options, &machine))
        .transpose()?;
    let ab = match baseline {
        Some(baseline) => Some(ab::run(
            baseline, &bins, &tools, &certs, &out, &options, &machine,
        )?),
        None => None,
    };
    // The table reads best by kind of load, then by connections; within that, in run order.
    results.sort_by_key(|m| (m.case.mode == Mode::Churn, m.case.conns));

    let machine = machine.finish()?;
    let report = Report {
        machine,
        options,
        startup,
        idle,
        peak,
        results,
        ab,
        placement,
        wall: started.elapsed(),
    };
    let checks = report.checks();
    let markdown = report.markdown(&checks);
    fs::write(out.join("summary.md"), &markdown).context("writing target/bench/summary.md")?;
    let summary = serde_json::to_string_pretty(&report.json(&checks))?;
    fs::write(out.join("summary.json"), summary).context("writing target/bench/summary.json")?;
    if let Some(placement) = &report.placement {
        placement.write(&out, !report.options.quick)?;
    }
    println!("\n{markdown}");
    println!(
        "written: target/bench/summary.md, target/bench/summary.json, target/bench/raw/*.json"
    );
    let missed: Vec<&Check> = checks.iter().filter(|c| c.pass == Some(false)).collect();
    if !missed.is_empty() {
        let lines: Vec<String> = missed
            .iter()
            .map(|c| format!("{}: {} (limit {})", c.line, c.figure, c.limit))
            .collect();
        bail!(
            "{} budget line(s) missed:\n  {}",
            lines.len(),
            lines.join("\n  ")
        );
    }
    Ok(())
}

/// The release binaries under test.
#[derive(Debug)]
struct Binaries {
    petra: PathBuf,
    klaus: PathBuf,
}
